"""Saved states of earlier format versions, brought to the current one on load.

Version 1 (ewc_rs 0.1.0 before the block model): the state dict's tasks under ``"pairs"``, each
``{"fisher": {name: F}, "star": {name: θ*}}`` plus ``"kron": {layer: {"A", "G"}}`` for
``structure="kfac"``; its file held ``"{t}.fisher.{i}"``/``"{t}.star.{i}"`` for the i-th name of
the task's ``"layout"`` entry and ``"{t}.kron.{j}.A"``/``".G"`` for the j-th layer of its
``"kron_layout"`` entry. Version 2 keeps each block kind's payload under the kind's name.
Version 3 adds ``"fisher_bits"`` (None before: F in the storage dtype). Test data written by
earlier versions: ``tests/state/data_v1/``, ``tests/state/data_v2/``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

#: A version-1 task key → the block kind that holds it now.
_V1_KINDS = {"fisher": "diagonal", "kron": "kronecker"}


def migrate(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict of any known version, as the current version (3) lays it out.

    Args:
        state: a state dict (checked afterwards; what this does not recognise is left for the check).

    Returns:
        A new dict (tensors shared), or ``state`` itself when it is of no earlier version.
    """
    if state.get("version") == 1:
        state = _v1_to_v2(state)
    if state.get("version") == 2:
        state = {**state, "version": 3, "fisher_bits": None}
    return state


def _v1_to_v2(state: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in state.items() if k != "pairs"}
    out["version"] = 2
    out.setdefault("structure", "diag")
    tasks = state.get("pairs")
    if isinstance(tasks, list):
        tasks = [_task_v1(t) for t in tasks]
    out["tasks"] = tasks
    return out


def _task_v1(task: Any) -> Any:
    if not isinstance(task, dict):
        return task
    # A key version 1 did not know stays as it is, so that the version-2 check names it.
    return {_V1_KINDS.get(k, k): v for k, v in task.items()}


def read_v1_tasks(meta: dict[str, Any], get: Callable[[str], torch.Tensor], keys: set[str]) -> list[dict[str, Any]]:
    """The tasks of a version-1 file, as a version-1 state dict holds them.

    Args:
        meta: the file's ``"ewc_rs"`` metadata (with ``"layout"`` and ``"kron_layout"``).
        get: reads a tensor by key.
        keys: the keys the file holds.

    Returns:
        The tasks, each ``{"fisher", "star"[, "kron"]}``.
    """
    layouts = meta["layout"]
    kron_layouts = meta.get("kron_layout", [[] for _ in layouts])
    tasks = []
    for t, (names, layers) in enumerate(zip(layouts, kron_layouts)):
        fisher_keys = {n: f"{t}.fisher.{i}" for i, n in enumerate(names)}
        task: dict[str, Any] = {
            "fisher": {n: get(k) for n, k in fisher_keys.items() if k in keys},
            "star": {n: get(f"{t}.star.{i}") for i, n in enumerate(names)},
        }
        if layers:
            task["kron"] = {m: {w: get(f"{t}.kron.{j}.{w}") for w in "AG"} for j, m in enumerate(layers)}
        tasks.append(task)
    return tasks
