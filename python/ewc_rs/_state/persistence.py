"""``EWC``'s state: the ``state_dict`` format, its checks, and the safetensors file.

State dict, version 3: ``{"version", "lam", "mode", "gamma", "norm_stats", "storage_dtype",
"structure", "fisher_bits", "tasks"}``, where ``"tasks"`` lists the stored tasks, each
``{"star": {name: θ*}}`` plus one entry per block the task holds, under the block kind's name
(``"diagonal": {name: F}``, an 8-bit F as ``{"codes", "scales", "block"}``; ``"kronecker": {layer:
{"A": A, "G": G}}``, ...: each kind's ``to_state``). Every θ* is covered by exactly one block.
Earlier versions are migrated on load (:mod:`.migration`).

File (:func:`write_file`): tensors ``"{t}.star.{i}"`` for the i-th name of task t's ``"star"``
layout and ``"{t}.{kind}.{suffix}"`` for its blocks (each kind's ``to_tensors``); the config and
the per-task layouts (``"layouts": [{"star": [...], kind: [...]}]``) as the JSON metadata
``"ewc_rs"``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .._blocks.base import Block
from .._blocks.diagonal import Diagonal, place
from .._blocks.fisher8 import check_bits
from .._blocks.registry import BLOCK_KINDS, STRUCTURES
from .._options import MODES, NORM_STATS, check_choice, check_gamma, check_lam
from .._parallel import collectives, sharding
from .migration import migrate, read_v1_tasks
from .task import Task, first_misfit

STATE_VERSION = 3
#: The state dict's key for the list of tasks.
TASKS_KEY = "tasks"
_CONFIG_KEYS = ("version", "lam", "mode", "gamma", "norm_stats", "storage_dtype", "structure", "fisher_bits")


@dataclass(frozen=True)
class EWCState:
    """Everything an ``EWC`` restores from a state: its config and its stored tasks."""

    lam: float
    mode: str
    gamma: float
    norm_stats: str
    storage_dtype: torch.dtype
    tasks: list[Task]
    structure: str = "diag"
    fisher_bits: Optional[int] = None


def to_state_dict(state: EWCState) -> dict[str, Any]:
    """The current-version state dict of ``state`` (tensors shared, dicts new).

    Args:
        state: the config and tasks of an ``EWC``.

    Returns:
        A dict of plain Python values and tensors (``torch.save``-able).
    """
    return {
        "version": STATE_VERSION,
        "lam": state.lam,
        "mode": state.mode,
        "gamma": state.gamma,
        "norm_stats": state.norm_stats,
        "storage_dtype": str(state.storage_dtype).replace("torch.", ""),
        "structure": state.structure,
        "fisher_bits": state.fisher_bits,
        TASKS_KEY: [{"star": dict(task.star), **{b.kind: b.to_state() for b in task.blocks}} for task in state.tasks],
    }


def from_state_dict(state: Any, model: nn.Module) -> EWCState:
    """Checks a state dict (of this or an earlier version) against the format and ``model``.

    Args:
        state: a dict from :func:`to_state_dict` (possibly through ``torch.save``/``torch.load``),
            or from an earlier version.
        model: the model the state is for: every stored parameter must be one of its parameters,
            of the same shape.

    Returns:
        The config and the tasks (tensors detached, in the storage dtype).

    Raises:
        ValueError: unknown version, bad config values, a task whose blocks do not cover its θ*
            exactly, malformed blocks (non-finite or negative F, factors that are not finite square
            matrices), a block kind the structure does not use, or a stored parameter or layer
            that ``model`` lacks or holds with another shape. For a sharded (FSDP2) model: a
            DTensor laid out otherwise than its parameter, and on every rank when any rank's part
            fails (one 4-byte all-reduce).
    """
    named = dict(sharding.named_parameters(model))
    group = collectives.mesh_group(list(named.values()))
    if group is None:
        return _from_state_dict(state, model, named)
    try:
        loaded, error = _from_state_dict(state, model, named), None
    except ValueError as e:
        loaded, error = None, e
    if collectives.any_rank(error is not None, group, next(iter(named.values())).device):
        raise error or ValueError("state: another rank of the process group could not load its part of the state")
    assert loaded is not None
    return loaded


def _from_state_dict(state: Any, model: nn.Module, named: dict[str, nn.Parameter]) -> EWCState:
    if isinstance(state, dict):
        state = migrate(state)
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ValueError(
            f"state: expected an EWC state dict of version {STATE_VERSION} (or an earlier one, migrated on load)"
        )
    lam = check_lam(state.get("lam"))
    mode = check_choice("mode", state.get("mode"), MODES)
    gamma = check_gamma(state.get("gamma"))
    norm_stats = check_choice("norm_stats", state.get("norm_stats"), NORM_STATS)
    structure = check_choice("structure", state.get("structure", "diag"), tuple(STRUCTURES))
    try:
        bits = check_bits(state.get("fisher_bits"))
    except ValueError as e:
        raise ValueError(f"state: {e}") from None
    dtype_name = state.get("storage_dtype")
    if dtype_name not in ("float32", "bfloat16"):
        raise ValueError(f"state: storage_dtype must be 'float32' or 'bfloat16', got {dtype_name!r}")
    storage = getattr(torch, dtype_name)
    tasks = state.get(TASKS_KEY)
    if not isinstance(tasks, list) or (mode == "online" and len(tasks) > 1):
        raise ValueError(f"state: '{TASKS_KEY}' must be a list (at most one task in online mode)")
    allowed = {"diagonal", STRUCTURES[structure]}
    clean = [_task_from_dict(f"task {t}", task, storage, allowed, structure) for t, task in enumerate(tasks)]
    _check_fits_model(clean, sharding.unwrap(model), named)
    placed = [Task(place(task.star, named), tuple(b.placed(named) for b in task.blocks)) for task in clean]
    placed = [task.with_fisher_bits(bits) for task in placed]  # as the config says, whatever was stored
    return EWCState(lam, mode, gamma, norm_stats, storage, placed, structure, bits)


def _task_from_dict(where: str, task: Any, storage: torch.dtype, allowed: set[str], structure: str) -> Task:
    kinds = [k for k in BLOCK_KINDS if k in allowed]
    if not isinstance(task, dict) or "star" not in task or not set(task) - {"star"} <= set(BLOCK_KINDS):
        raise ValueError(f"state: {where} must have the key 'star' and blocks under {', '.join(map(repr, kinds))}")
    other = sorted(set(task) - {"star"} - allowed)
    if other:
        raise ValueError(
            f"state: {where} holds '{other[0]}' blocks, which structure {structure!r} does not use "
            f"(it uses {', '.join(map(repr, kinds))})"
        )
    star = task["star"]
    if not isinstance(star, dict):
        raise ValueError(f"state: {where}: 'star' must map parameter names to θ*")
    blocks: list[Block] = [BLOCK_KINDS[k].from_state(task[k], where, storage, star) for k in BLOCK_KINDS if k in task]
    covered: dict[str, str] = {}
    for b in blocks:
        for n in b.params:
            if n in covered or n not in star:
                raise ValueError(f"state: {where}: the blocks and 'star' name different parameters ('{n}')")
            covered[n] = b.kind
    if set(covered) != set(star):
        missing = sorted(set(star) - set(covered))[0]
        raise ValueError(f"state: {where}: the blocks and 'star' name different parameters ('{missing}')")
    diagonal = next((b.fisher for b in blocks if isinstance(b, Diagonal)), {})
    for n, s in star.items():
        f = diagonal.get(n)
        if not isinstance(s, torch.Tensor) or (f is not None and f.shape != s.shape):
            raise ValueError(f"state: {where}, parameter '{n}': F and θ* must be tensors of one shape")
        if not torch.isfinite(sharding.local(s).float()).all():
            raise ValueError(f"state: {where}, parameter '{n}': θ* has non-finite values")
    return Task({n: v.detach().to(storage) for n, v in star.items()}, tuple(blocks))


def _check_fits_model(tasks: list[Task], model: nn.Module, named: dict[str, nn.Parameter]) -> None:
    # At load time, not at the first penalty: a state for another model fails where it is loaded.
    for task in tasks:
        for block in task.blocks:
            why = block.misfit(model, named)
            if why is not None:
                raise ValueError(f"state: {why}")
    bad = first_misfit(tasks, {n: p.shape for n, p in named.items()})
    if bad is None:
        return
    n, stored, shape = bad
    has = "the model has no such parameter" if shape is None else f"the model's parameter has shape {tuple(shape)}"
    raise ValueError(f"state: parameter '{n}' is stored with shape {tuple(stored)}, but {has}")


def write_file(state: EWCState, path: str) -> None:
    """Writes ``state`` to a safetensors file (tensors on CPU, config and layouts as metadata).

    Sharded (FSDP2) F and θ* are gathered first (a collective: every rank calls this) and only
    rank 0 writes the file.

    Args:
        state: the config and tasks of an ``EWC``.
        path: file to write.
    """
    tensors: dict[str, torch.Tensor] = {}
    layouts: list[dict[str, list[str]]] = []
    group = None
    for t, task in enumerate(state.tasks):
        names = sorted(task.star)
        layout = {"star": names}
        for i, n in enumerate(names):
            group = group or collectives.mesh_group([task.star[n]])
            tensors[f"{t}.star.{i}"] = sharding.gather(task.star[n]).detach().cpu().contiguous()
        for block in task.blocks:
            layout[block.kind], parts = block.to_tensors()
            tensors.update({f"{t}.{block.kind}.{k}": v for k, v in parts.items()})
        layouts.append(layout)
    if group is not None and collectives.rank(group) != 0:
        return
    config = to_state_dict(EWCState(**{**state.__dict__, "tasks": []}))
    meta = {k: config[k] for k in _CONFIG_KEYS}
    save_file(tensors, path, metadata={"ewc_rs": json.dumps({**meta, "layouts": layouts})})


def read_file(path: str) -> dict[str, Any]:
    """Reads a file written by :func:`write_file` (or an earlier version) back into a state dict
    (not yet checked).

    Args:
        path: a safetensors file from :func:`write_file`.

    Returns:
        The state dict, tensors on CPU.

    Raises:
        ValueError: the file is not an ewc_rs file, or its layout names a tensor it does not hold.
    """
    with safe_open(path, framework="pt") as fh:
        raw = (fh.metadata() or {}).get("ewc_rs")
        if raw is None:
            raise ValueError(f"path: {path} is not an ewc_rs file (no 'ewc_rs' metadata)")
        meta = json.loads(raw)
        keys = set(fh.keys())

        def get(key: str) -> torch.Tensor:
            if key not in keys:
                raise ValueError(f"path: {path} lists the tensor '{key}' in its layout but does not hold it")
            return fh.get_tensor(key)

        if meta.get("version") == 1:
            tasks = read_v1_tasks(meta, get, keys)
            return {**{k: v for k, v in meta.items() if k not in ("layout", "kron_layout")}, "pairs": tasks}
        layouts = meta.pop("layouts", None)
        if not isinstance(layouts, list):
            raise ValueError(f"path: {path} has no task layouts in its 'ewc_rs' metadata")
        return {**meta, TASKS_KEY: [_read_task(t, layout, get) for t, layout in enumerate(layouts)]}


def _get_part(get: Callable[[str], torch.Tensor], prefix: str, suffix: str) -> torch.Tensor:
    return get(prefix + suffix)


def _read_task(t: int, layout: Mapping[str, Any], get: Callable[[str], torch.Tensor]) -> dict[str, Any]:
    task: dict[str, Any] = {"star": {n: get(f"{t}.star.{i}") for i, n in enumerate(layout.get("star", []))}}
    for kind, names in layout.items():
        if kind == "star":
            continue
        if kind not in BLOCK_KINDS:
            raise ValueError(f"state: task {t} holds '{kind}' blocks, which this version does not know")
        task[kind] = BLOCK_KINDS[kind].from_tensors(names, functools.partial(_get_part, get, f"{t}.{kind}."))
    return task
