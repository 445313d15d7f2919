"""What EWC stores per consolidated task: the Fisher F and the anchor weights θ*, by parameter name.

Separate mode keeps one :class:`TaskRecord` per task; online mode keeps one, folded by
:func:`fold_online` (Schwarz et al. 2018: F ← γ F_old + F_new, θ* ← the latest weights). With
``structure="kfac"`` a record also holds Kronecker factors (A, G) per layer (:mod:`.kfac_tasks`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Optional

import torch

from .kfac_tasks import fold_kron


@dataclass(frozen=True)
class TaskRecord:
    """F and θ* of one task: ``star`` names every protected parameter, ``fisher`` those with a
    diagonal F (of θ*'s shape), ``kron`` the layers with Kronecker factors (A, G) instead, whose
    weight and bias are in ``star`` only (``structure="kfac"``; empty otherwise).

    Frozen: a record is replaced, never edited (the dicts are not copied, so do not edit them
    either; the penalty plan built from a record would not notice).
    """

    fisher: dict[str, torch.Tensor]
    star: dict[str, torch.Tensor]
    kron: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def snapshot(
        cls, params: Mapping[str, torch.Tensor], fisher: Mapping[str, torch.Tensor], storage_dtype: torch.dtype
    ) -> TaskRecord:
        """The record of the task just learned: its Fisher and a copy of the current weights as θ*.

        Args:
            params: the protected parameters by name.
            fisher: F by name (at least ``params``' names; detached).
            storage_dtype: dtype of the stored F and θ*.

        Returns:
            A record over ``params``' names.
        """
        return cls(
            fisher={n: fisher[n].to(storage_dtype) for n in params},
            star={n: p.detach().to(storage_dtype, copy=True) for n, p in params.items()},
        )

    def to(self, device: torch.device) -> TaskRecord:
        """The same record with every tensor on ``device`` (dtypes kept).

        Args:
            device: where the tensors go.

        Returns:
            A new record (tensors already there are shared, as ``Tensor.to`` does).
        """
        return TaskRecord(
            fisher={n: t.to(device) for n, t in self.fisher.items()},
            star={n: t.to(device) for n, t in self.star.items()},
            kron={m: (a.to(device), g.to(device)) for m, (a, g) in self.kron.items()},
        )


def fold_online(old: Optional[TaskRecord], new: TaskRecord, gamma: float, storage_dtype: torch.dtype) -> TaskRecord:
    """Online EWC's one record after a consolidation: F ← γ F_old + F_new, θ* ← the new weights.

    Summed in float32, stored in ``storage_dtype``. Only the new record's parameters are kept; a
    parameter whose shape changed since ``old`` starts afresh from its new Fisher. Kronecker
    factors: A ⊗ G ← the Frobenius-nearest Kronecker product to γ A_old ⊗ G_old + A_new ⊗ G_new
    (:func:`ewc_rs.kfac_tasks.fold_kron`).

    Args:
        old: the record so far (None before the first consolidation).
        new: F and θ* of the task just learned, already in ``storage_dtype``.
        gamma: decay γ in [0, 1] of the old Fisher.
        storage_dtype: dtype of the stored F.

    Returns:
        The folded record (``new`` itself when there is nothing to fold).
    """
    if old is None:
        return new
    fisher = dict(new.fisher)
    for n, f in new.fisher.items():
        prev = old.fisher.get(n)
        if prev is not None and prev.shape == f.shape:
            fisher[n] = (gamma * prev.to(f.device, torch.float32) + f.float()).to(storage_dtype)
    return TaskRecord(fisher=fisher, star=new.star, kron=fold_kron(old.kron, new.kron, gamma))


def add_task(tasks: list[TaskRecord], new: TaskRecord, *, online: bool, gamma: float) -> list[TaskRecord]:
    """The stored records after a consolidation: ``new`` appended (separate EWC), or folded into
    the one record (online EWC, :func:`fold_online`; F stays in ``new``'s dtype).

    Args:
        tasks: the records so far, oldest first.
        new: F and θ* of the task just learned.
        online: whether to fold instead of appending.
        gamma: decay γ of the old Fisher when folding.

    Returns:
        A new list; ``tasks`` is left as it is.
    """
    if not online:
        return [*tasks, new]
    dtype = next(iter(new.star.values())).dtype if new.star else torch.float32
    return [fold_online(tasks[0] if tasks else None, new, gamma, dtype)]


def first_misfit(
    tasks: Iterable[TaskRecord], shapes: Mapping[str, torch.Size]
) -> Optional[tuple[str, torch.Size, Optional[torch.Size]]]:
    """The first stored parameter (in name order) that ``shapes`` lacks or holds with another shape.

    Args:
        tasks: the stored records.
        shapes: the model's parameter shapes by name.

    Returns:
        ``(name, stored shape, model's shape or None when the model has no such parameter)``, or
        None when every stored F fits.
    """
    tasks = list(tasks)
    for n in sorted({n for task in tasks for n in task.star}):
        stored = [task.star[n].shape for task in tasks if n in task.star]
        if n not in shapes:
            return n, stored[0], None
        for shape in stored:
            if shape != shapes[n]:
                return n, shape, shapes[n]
    return None
