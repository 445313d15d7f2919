"""A stored task: θ* by parameter name plus a list of blocks (at most one of each kind) that
cover its parameters; the tasks after a consolidation (separate: appended; online: folded).

Separate mode (Kirkpatrick et al. 2017) keeps one task per consolidation; online mode (Schwarz
et al. 2018) keeps one, folded block kind by block kind (``Block.fold``: F ← γ F_old + F_new for
the diagonal; the nearest Kronecker product for Kronecker factors; ...), θ* ← the latest weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .._blocks.base import Block


@dataclass(frozen=True)
class Task:
    """θ* of one task (every protected parameter) and the blocks that hold its curvature.

    Frozen: a task is replaced, never edited (the dicts are not copied, so do not edit them
    either; the penalty plan built from a task would not notice).
    """

    star: dict[str, torch.Tensor]
    blocks: tuple[Block, ...]

    def block(self, kind: str) -> Optional[Block]:
        """The task's block of ``kind``, or None."""
        return next((b for b in self.blocks if b.kind == kind), None)

    def with_fisher_bits(self, bits: Optional[int]) -> Task:
        """The same task with each block's F stored in ``bits`` bits (None: the storage dtype).

        Raises:
            ValueError: 8 bits for a block that cannot hold them (FSDP2-sharded F).
        """
        return Task(self.star, tuple(b.with_fisher_bits(bits) for b in self.blocks))

    def to(self, device: torch.device) -> Task:
        """The same task with every tensor on ``device`` (dtypes kept; tensors already there shared)."""
        return Task({n: t.to(device) for n, t in self.star.items()}, tuple(b.to(device) for b in self.blocks))


def fold_online(old: Optional[Task], new: Task, gamma: float) -> Task:
    """Online EWC's one task after a consolidation: each of ``new``'s blocks folded with ``old``'s
    block of its kind (γ in [0, 1] decays the old one), θ* ← the new weights.

    Args:
        old: the task so far (None before the first consolidation).
        new: the task just learned, already in the storage dtype.
        gamma: decay γ of the old curvature.

    Returns:
        The folded task (``new`` itself when there is nothing to fold).
    """
    if old is None:
        return new
    return Task(new.star, tuple(b.fold(old.block(b.kind), gamma) for b in new.blocks))


def add_task(
    tasks: list[Task], new: Task, *, online: bool, gamma: float, fisher_bits: Optional[int] = None
) -> list[Task]:
    """The stored tasks after a consolidation: ``new`` appended (separate EWC), or folded into the
    one task (online EWC, :func:`fold_online`, in float); then stored in ``fisher_bits``.

    Args:
        tasks: the tasks so far, oldest first (already in ``fisher_bits``).
        new: the task just learned.
        online: whether to fold instead of appending.
        gamma: decay γ of the old curvature when folding.
        fisher_bits: None (F in the storage dtype) or 8 (:meth:`Task.with_fisher_bits`).

    Returns:
        A new list; ``tasks`` is left as it is.

    Raises:
        ValueError: 8 bits for a block that cannot hold them (FSDP2-sharded F).
    """
    last = new if not online else fold_online(tasks[0] if tasks else None, new, gamma)
    if fisher_bits is not None:
        last = last.with_fisher_bits(fisher_bits)
    return [*tasks, last] if not online else [last]


def first_misfit(
    tasks: Iterable[Task], shapes: Mapping[str, torch.Size]
) -> Optional[tuple[str, torch.Size, Optional[torch.Size]]]:
    """The first stored parameter (in name order) that ``shapes`` lacks or holds with another shape.

    Args:
        tasks: the stored tasks.
        shapes: the model's parameter shapes by name.

    Returns:
        ``(name, stored shape, model's shape or None when the model has no such parameter)``, or
        None when every stored θ* fits.
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


def misfit(tasks: Iterable[Task], model: nn.Module, named: Mapping[str, nn.Parameter]) -> Optional[str]:
    """Why the stored tasks do not fit ``model``, or None: a θ* the model lacks or holds with another
    shape, or a block that does not fit (a layer the model lacks, factors of another size).

    Args:
        tasks: the stored tasks.
        model: the model (unwrapped).
        named: its parameters by name.

    Returns:
        A message naming the parameter or layer and both shapes, or None.
    """
    tasks = list(tasks)
    bad = first_misfit(tasks, {n: p.shape for n, p in named.items()})
    if bad is not None:
        n, stored, shape = bad
        if shape is None:
            return f"parameter '{n}' was consolidated but the model has no such parameter"
        return f"parameter '{n}' has shape {tuple(shape)} but was consolidated with shape {tuple(stored)}"
    for task in tasks:
        for block in task.blocks:
            why = block.misfit(model, named)
            if why is not None:
                return why
    return None
