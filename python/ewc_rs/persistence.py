"""``EWC``'s state: the ``state_dict`` format, its checks, and the safetensors file.

State dict, version 1: ``{"version", "lam", "mode", "gamma", "norm_stats", "storage_dtype",
"pairs", "structure"}``, where ``"pairs"`` is the list of stored tasks, each ``{"fisher": {name:
F}, "star": {name: θ*}}``, plus ``"kron": {layer: {"A": A, "G": G}}`` for ``structure="kfac"``
(then ``"star"`` also names the layers' weights and biases, which have no ``"fisher"``). The key
keeps its version-1 name so that saved states stay readable (``"structure"`` defaults to
``"diag"``); in memory a task is a :class:`~ewc_rs.tasks.TaskRecord`.

File (:func:`write_file`): tensors ``"{task}.star.{i}"`` and, where there is one,
``"{task}.fisher.{i}"``, the i-th parameter name of each task listed in the ``"layout"`` of the
JSON metadata ``"ewc_rs"``; ``"{task}.kron.{j}.A"``/``".G"`` for the j-th layer of
``"kron_layout"``; the config next to them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import distributed, sharding
from .kfac_tasks import kron_misfit, param_name, stored_layers
from .options import MODES, NORM_STATS, check_choice, check_gamma, check_lam
from .tasks import TaskRecord, first_misfit

STATE_VERSION = 1
#: The state dict's key for the list of tasks (its version-1 name, kept for compatibility).
TASKS_KEY = "pairs"
_CONFIG_KEYS = ("version", "lam", "mode", "gamma", "norm_stats", "storage_dtype", "structure")
STRUCTURES = ("diag", "kfac")


@dataclass(frozen=True)
class EWCState:
    """Everything an ``EWC`` restores from a state: its config and its stored tasks."""

    lam: float
    mode: str
    gamma: float
    norm_stats: str
    storage_dtype: torch.dtype
    tasks: list[TaskRecord]
    structure: str = "diag"


def to_state_dict(state: EWCState) -> dict[str, Any]:
    """The version-1 state dict of ``state`` (tensors shared, dicts new).

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
        TASKS_KEY: [_task_to_dict(task) for task in state.tasks],
    }


def _task_to_dict(task: TaskRecord) -> dict[str, Any]:
    out: dict[str, Any] = {"fisher": dict(task.fisher), "star": dict(task.star)}
    if task.kron:
        out["kron"] = {m: {"A": a, "G": g} for m, (a, g) in task.kron.items()}
    return out


def from_state_dict(state: Any, model: nn.Module) -> EWCState:
    """Checks a state dict against the format and against ``model``, and converts it.

    Args:
        state: a dict from :func:`to_state_dict` (possibly through ``torch.save``/``torch.load``).
        model: the model the state is for: every stored parameter must be one of its parameters,
            of the same shape.

    Returns:
        The config and the tasks (F and θ* detached, in the storage dtype).

    Raises:
        ValueError: wrong version, bad config values, a task without matching F/θ* tensors,
            non-finite F or θ*, negative F, or a stored parameter that ``model`` lacks or holds
            with another shape. For a sharded (FSDP2) model: a DTensor laid out otherwise than
            its parameter, and on every rank when any rank's part fails (one 4-byte all-reduce).
    """
    named = dict(sharding.named_parameters(model))
    group = distributed.mesh_group(list(named.values()))
    if group is None:
        return _from_state_dict(state, model, named)
    try:
        loaded, error = _from_state_dict(state, model, named), None
    except ValueError as e:
        loaded, error = None, e
    if distributed.any_rank(error is not None, group, next(iter(named.values())).device):
        raise error or ValueError("state: another rank of the process group could not load its part of the state")
    assert loaded is not None
    return loaded


def _from_state_dict(state: Any, model: nn.Module, named: dict[str, nn.Parameter]) -> EWCState:
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ValueError(f"state: expected an EWC state dict of version {STATE_VERSION}")
    lam = check_lam(state.get("lam"))
    mode = check_choice("mode", state.get("mode"), MODES)
    gamma = check_gamma(state.get("gamma"))
    norm_stats = check_choice("norm_stats", state.get("norm_stats"), NORM_STATS)
    structure = check_choice("structure", state.get("structure", "diag"), STRUCTURES)
    dtype_name = state.get("storage_dtype")
    if dtype_name not in ("float32", "bfloat16"):
        raise ValueError(f"state: storage_dtype must be 'float32' or 'bfloat16', got {dtype_name!r}")
    storage = getattr(torch, dtype_name)
    tasks = state.get(TASKS_KEY)
    if not isinstance(tasks, list) or (mode == "online" and len(tasks) > 1):
        raise ValueError(f"state: '{TASKS_KEY}' (the stored tasks) must be a list (at most one task in online mode)")
    clean = [_task_from_dict(t, task, storage) for t, task in enumerate(tasks)]
    _check_fits_model(clean, model, named)
    if structure == "diag" and any(t.kron for t in clean):
        raise ValueError("state: structure 'diag' with stored Kronecker factors ('kron'); expected structure 'kfac'")
    placed = [TaskRecord(_place(task.fisher, named), _place(task.star, named), task.kron) for task in clean]
    return EWCState(lam, mode, gamma, norm_stats, storage, placed, structure)


def _task_from_dict(t: int, task: Any, storage: torch.dtype) -> TaskRecord:
    if not isinstance(task, dict) or not {"fisher", "star"} <= set(task) <= {"fisher", "star", "kron"}:
        raise ValueError(f"state: task {t} must have the keys 'fisher' and 'star' (and 'kron' for structure 'kfac')")
    fisher, star = task["fisher"], task["star"]
    kron = _kron_from_dict(t, task.get("kron", {}), storage)
    in_kron = {param_name(m, k) for m in kron for k in ("weight", "bias")}
    if not set(fisher) <= set(star) or not set(star) - set(fisher) <= in_kron:
        raise ValueError(f"state: task {t}: 'fisher' and 'star' name different parameters")
    for n in star:
        s = star[n]
        f = fisher.get(n, s.abs() if isinstance(s, torch.Tensor) else s)  # θ* only: its own check
        if not isinstance(f, torch.Tensor) or not isinstance(s, torch.Tensor) or f.shape != s.shape:
            raise ValueError(f"state: task {t}, parameter '{n}': F and θ* must be tensors of one shape")
        f, s = sharding.local(f), sharding.local(s)  # this rank's part (the other ranks check theirs)
        if not (torch.isfinite(f.float()).all() and torch.isfinite(s.float()).all()):
            raise ValueError(f"state: task {t}, parameter '{n}': F or θ* has non-finite values")
        if (f < 0).any():
            raise ValueError(f"state: task {t}, parameter '{n}': F has negative values")
    return TaskRecord(
        fisher={n: v.detach().to(storage) for n, v in fisher.items()},
        star={n: v.detach().to(storage) for n, v in star.items()},
        kron=kron,
    )


def _place(tensors: dict[str, torch.Tensor], named: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Each tensor laid out like its parameter: a full tensor for a sharded parameter becomes this
    rank's shard; a DTensor must already be laid out like its parameter."""
    out = {}
    for n, t in tensors.items():
        p = named[n]
        if not sharding.is_sharded(t):
            out[n] = sharding.shard_like(t.to(p.device), p) if sharding.is_sharded(p) else t
            continue
        if not sharding.is_sharded(p):
            raise ValueError(f"state: parameter '{n}' is stored sharded (a DTensor) but the model's parameter is not")
        if t.device_mesh != p.device_mesh or tuple(t.placements) != tuple(p.placements):  # type: ignore[attr-defined]
            raise ValueError(
                f"state: parameter '{n}' is stored on mesh {t.device_mesh} as {tuple(t.placements)}, but the "  # type: ignore[attr-defined]
                f"model's parameter is on mesh {p.device_mesh} as {tuple(p.placements)}: load a checkpoint of "  # type: ignore[attr-defined]
                "another layout with ewc_rs.checkpoint.load, which re-shards it"
            )
        out[n] = t
    return out


def _kron_from_dict(t: int, kron: Any, storage: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A task's Kronecker factors, checked: per layer two finite square tensors A and G."""
    if not isinstance(kron, dict):
        raise ValueError(f"state: task {t}: 'kron' must map layer names to {{'A': A, 'G': G}}")
    out = {}
    for m, pair in kron.items():
        if not isinstance(pair, dict) or set(pair) != {"A", "G"}:
            raise ValueError(f"state: task {t}, layer '{m}': expected exactly the factors 'A' and 'G'")
        for what in ("A", "G"):
            f = pair[what]
            if not isinstance(f, torch.Tensor) or f.dim() != 2 or f.shape[0] != f.shape[1]:
                raise ValueError(f"state: task {t}, layer '{m}': factor {what} must be a square matrix")
            if not torch.isfinite(f.float()).all():
                raise ValueError(f"state: task {t}, layer '{m}': factor {what} has non-finite values")
        out[m] = (pair["A"].detach().to(storage), pair["G"].detach().to(storage))
    return out


def _check_fits_model(tasks: list[TaskRecord], model: nn.Module, named: dict[str, nn.Parameter]) -> None:
    # At load time, not at the first penalty: a state for another model fails where it is loaded.
    kron = kron_misfit(stored_layers(tasks), sharding.unwrap(model))
    if kron is not None:
        raise ValueError(f"state: {kron}")
    misfit = first_misfit(tasks, {n: p.shape for n, p in named.items()})
    if misfit is None:
        return
    n, stored, shape = misfit
    has = "the model has no such parameter" if shape is None else f"the model's parameter has shape {tuple(shape)}"
    raise ValueError(f"state: parameter '{n}' is stored with shape {tuple(stored)}, but {has}")


def write_file(state: EWCState, path: str) -> None:
    """Writes ``state`` to a safetensors file (tensors on CPU, config and layout as metadata).

    Sharded (FSDP2) F and θ* are gathered first (a collective: every rank calls this) and only
    rank 0 writes the file.

    Args:
        state: the config and tasks of an ``EWC``.
        path: file to write.
    """
    from safetensors.torch import save_file

    tensors, layout, kron_layout, group = {}, [], [], None
    for t, task in enumerate(state.tasks):
        names = sorted(task.star)
        layout.append(names)
        for i, n in enumerate(names):
            group = group or distributed.mesh_group([task.star[n]])
            if n in task.fisher:
                tensors[f"{t}.fisher.{i}"] = sharding.gather(task.fisher[n]).detach().cpu().contiguous()
            tensors[f"{t}.star.{i}"] = sharding.gather(task.star[n]).detach().cpu().contiguous()
        layers = sorted(task.kron)
        kron_layout.append(layers)
        for j, m in enumerate(layers):
            for what, f in zip("AG", task.kron[m]):
                tensors[f"{t}.kron.{j}.{what}"] = f.detach().cpu().contiguous()
    if group is not None and distributed.rank(group) != 0:
        return
    config = to_state_dict(state)
    meta = {k: config[k] for k in _CONFIG_KEYS}
    save_file(tensors, path, metadata={"ewc_rs": json.dumps({**meta, "layout": layout, "kron_layout": kron_layout})})


def read_file(path: str) -> dict[str, Any]:
    """Reads a file written by :func:`write_file` back into a state dict (not yet checked).

    Args:
        path: a safetensors file from :func:`write_file`.

    Returns:
        The state dict, tensors on CPU.

    Raises:
        ValueError: the file has no ``"ewc_rs"`` metadata.
    """
    from safetensors import safe_open

    with safe_open(path, framework="pt") as fh:
        raw = (fh.metadata() or {}).get("ewc_rs")
        if raw is None:
            raise ValueError(f"path: {path} is not an ewc_rs file (no 'ewc_rs' metadata)")
        meta = json.loads(raw)
        keys = set(fh.keys())
        layouts = meta.pop("layout")
        kron_layouts = meta.pop("kron_layout", [[] for _ in layouts])
        tasks = []
        for t, (names, layers) in enumerate(zip(layouts, kron_layouts)):
            fisher_keys = {n: f"{t}.fisher.{i}" for i, n in enumerate(names)}
            task: dict[str, Any] = {
                "fisher": {n: fh.get_tensor(k) for n, k in fisher_keys.items() if k in keys},
                "star": {n: fh.get_tensor(f"{t}.star.{i}") for i, n in enumerate(names)},
            }
            if layers:
                task["kron"] = {m: {w: fh.get_tensor(f"{t}.kron.{j}.{w}") for w in "AG"} for j, m in enumerate(layers)}
            tasks.append(task)
    return {**meta, TASKS_KEY: tasks}
