"""``EWC`` states through ``torch.distributed.checkpoint`` (DCP): sharded saves and loads, into the
same or another world size.

Under FSDP2 ``EWC.state_dict()`` holds DTensors (each rank's shards of F and θ*), which DCP saves
as they are (every rank writes its shards). Loading needs a state dict of the right structure to
load into; :func:`load` builds it from the checkpoint's metadata and the model's parameters (its
shards laid out like the model's, whatever the world size that saved it), lets DCP re-shard, and
hands the result to ``EWC.load_state_dict`` (which checks it; on error nothing changes).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ._parallel.sharding import named_parameters
from .ewc import EWC

__all__ = ["load", "save"]

#: The keys a checkpoint's tasks may sit under: the current format's, and version 1's (migrated on load).
_TASKS_KEYS = ("tasks", "pairs")


def save(ewc: EWC, checkpoint_id: str) -> None:
    """Saves ``ewc.state_dict()`` with ``torch.distributed.checkpoint.save`` (call on every rank).

    Without a process group DCP saves as a single process (with a ``UserWarning`` saying so).

    Args:
        ewc: the EWC object.
        checkpoint_id: the checkpoint's folder.

    Raises:
        torch.distributed.checkpoint.api.CheckpointException: ``checkpoint_id`` cannot be written (e.g. it is a
            file); DCP raises it on every rank, with each failed rank's error.

    Examples:
        ```python
        import os
        import tempfile

        import torch
        from torch import nn
        from ewc_rs import EWC, checkpoint

        model = nn.Linear(4, 3)
        ewc = EWC(model, lam=10.0)
        ewc.consolidate([(torch.randn(8, 4), torch.randint(0, 3, (8,)))])
        with tempfile.TemporaryDirectory() as folder:
            checkpoint.save(ewc, folder)
            assert any(name.endswith(".distcp") for name in os.listdir(folder))
        ```
    """
    dcp.save(ewc.state_dict(), checkpoint_id=checkpoint_id)


def _template(ewc: EWC, checkpoint_id: str) -> dict[str, Any]:
    """A state dict shaped like the checkpoint's, with tensors laid out like ``ewc``'s model's
    parameters (DTensors for sharded ones): what ``dcp.load`` fills in.

    Args:
        ewc: the EWC object whose model the state is for.
        checkpoint_id: the checkpoint's folder.

    Returns:
        The state dict to load into.

    Raises:
        ValueError: the checkpoint is not an EWC state, or names a parameter the model lacks or
            holds with another shape (the same on every rank: it reads the same metadata).
    """
    metadata = dcp.FileSystemReader(checkpoint_id).read_metadata()
    paths = metadata.planner_data or {}
    params = dict(named_parameters(ewc.model))
    state: dict[str, Any] = {"version": 0, "lam": 0.0, "mode": "", "gamma": 0.0, "norm_stats": "", "storage_dtype": ""}
    tasks: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    tasks_key = _TASKS_KEYS[0]
    for key, meta in metadata.state_dict_metadata.items():
        path = paths.get(key, (key,))
        if not isinstance(meta, TensorStorageMetadata):
            continue
        # DCP checkpoints hold the parameter-wise parts: θ* and the diagonal F (version 1: "fisher").
        if len(path) != 4 or path[0] not in _TASKS_KEYS or path[2] not in ("diagonal", "fisher", "star"):
            raise ValueError(f"checkpoint_id: {checkpoint_id} holds '{key}', which is not part of an EWC state")
        tasks_key, t, kind, name = str(path[0]), int(path[1]), str(path[2]), str(path[3])
        p = params.get(name)
        if p is None or tuple(p.shape) != tuple(meta.size):
            has = "the model has no such parameter" if p is None else f"the model's has shape {list(p.shape)}"
            raise ValueError(f"checkpoint_id: parameter '{name}' is stored with shape {list(meta.size)}, but {has}")
        entry = tasks.setdefault(t, {})
        entry.setdefault(kind, {})[name] = torch.zeros_like(
            p, dtype=meta.properties.dtype, requires_grad=False
        ).detach()
    state[tasks_key] = [tasks[t] for t in sorted(tasks)]
    return state


def load(ewc: EWC, checkpoint_id: str) -> None:
    """Loads a checkpoint from :func:`save`, of any world size, into ``ewc`` (call on every rank).

    Args:
        ewc: the EWC object (its model, possibly ``fully_shard``-ed, gives the layout).
        checkpoint_id: the checkpoint's folder.

    Raises:
        ValueError: the checkpoint is not an EWC state or does not fit the model (on every rank; ``ewc`` is
            unchanged).
        FileNotFoundError: ``checkpoint_id`` holds no DCP checkpoint (no ``.metadata`` file).

    Examples:
        ```python
        import tempfile

        import torch
        from torch import nn
        from ewc_rs import EWC, checkpoint

        model = nn.Linear(4, 3)
        saved = EWC(model, lam=10.0)
        saved.consolidate([(torch.randn(8, 4), torch.randint(0, 3, (8,)))])
        with tempfile.TemporaryDirectory() as folder:
            checkpoint.save(saved, folder)
            restored = EWC(model, lam=1.0)
            checkpoint.load(restored, folder)
        assert restored.num_tasks == 1 and restored.lam == 10.0
        ```
    """
    state = _template(ewc, checkpoint_id)
    dcp.load(state, checkpoint_id=checkpoint_id)
    ewc.load_state_dict(state)
