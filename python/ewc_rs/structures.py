"""What ``EWC.consolidate`` stores for each ``structure``: the diagonal Fisher (``"diag"``), or
Kronecker factors per Linear/Conv layer plus the diagonal Fisher of the rest (``"kfac"``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Callable

import torch

from .fisher import fisher_diag
from .fisher_options import parse_options
from .kfac import estimate_kfac
from .kfac_tasks import warn_diagonal_layers
from .options import check_choice
from .tasks import TaskRecord

STRUCTURES = ("diag", "kfac")
_KFAC_DEFAULTS: dict[str, Any] = {
    "likelihood": "categorical",
    "mc_samples": 1,
    "num_samples": None,
    "generator": None,
    "class_dim": -1,
    "ignore_index": -100,
    "outputs": None,
}


def check_structure(structure: Any, model: torch.nn.Module, selector: Callable[[str, torch.nn.Parameter], bool]) -> str:
    """``structure`` checked; for ``"kfac"``, says once which protected layers stay diagonal.

    Args:
        structure: ``"diag"`` or ``"kfac"``.
        model: the model to protect.
        selector: the ``params=`` predicate.

    Returns:
        The structure.

    Raises:
        ValueError: another value.
    """
    structure = check_choice("structure", structure, STRUCTURES)
    if structure == "kfac":
        warn_diagonal_layers(model, selector)
    return structure


def snapshot(
    model: torch.nn.Module,
    chosen: Mapping[str, torch.nn.Parameter],
    loader: Iterable[Any],
    structure: str,
    storage_dtype: torch.dtype,
    *,
    kind: str = "exact",
    **fisher_options: Any,
) -> tuple[TaskRecord, dict[str, Any]]:
    """Estimates the task's Fisher in the given structure and snapshots θ* (both detached).

    Args:
        model: the model just trained.
        chosen: the protected parameters by name.
        loader: the task's ``(inputs, targets)`` batches.
        structure: ``"diag"`` or ``"kfac"``.
        storage_dtype: dtype of the stored F, factors and θ*.
        kind: Fisher kind.
        **fisher_options: for :func:`ewc_rs.fisher_diag` / :func:`ewc_rs.fisher_kfac`.

    Returns:
        ``(record, fisher)``: the record to store, and the estimate: ``{name: F}`` for ``"diag"``,
        ``{"kron": {module: (A, G)}, "diag": {name: F}}`` for ``"kfac"`` (protected parameters only).
    """
    if structure == "diag":
        full = {n: f.detach() for n, f in fisher_diag(model, loader, kind=kind, **fisher_options).items()}
        return TaskRecord.snapshot(chosen, full, storage_dtype), {n: full[n] for n in chosen}
    fisher_options.pop("progress", None)
    unknown = sorted(set(fisher_options) - set(_KFAC_DEFAULTS))
    if unknown:
        raise TypeError(f"consolidate: unexpected Fisher option(s) {', '.join(unknown)}")
    opts = {**_KFAC_DEFAULTS, **fisher_options}
    options = parse_options(kind, opts.pop("likelihood"), **opts)
    result, _ = estimate_kfac(model, loader, options, chosen=set(chosen))
    kron = {m: (a.detach(), g.detach()) for m, (a, g) in result["kron"].items()}
    diag = {n: f.detach() for n, f in result["diag"].items() if n in chosen}
    record = TaskRecord(
        fisher={n: f.to(storage_dtype) for n, f in diag.items()},
        star={n: p.detach().to(storage_dtype, copy=True) for n, p in chosen.items()},
        kron={m: (a.to(storage_dtype), g.to(storage_dtype)) for m, (a, g) in kron.items()},
    )
    return record, {"kron": kron, "diag": diag}
