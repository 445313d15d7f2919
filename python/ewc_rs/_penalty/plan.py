"""The penalty plan: one term per block kind over the stored tasks (each term one Rust call per
step), the check that the model still holds the parameters it was built for, and the rebuild when
a parameter moved or changed dtype.

A plan is built once per consolidation (and model placement); each training step then costs one
native call per term (the diagonal term: one per bucket of parameters), plus a cheap check that
the model still holds the same parameter objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable, Optional, TypeVar

import torch
from torch import nn

from .._blocks.base import Evaluation, Term
from .._blocks.registry import BLOCK_KINDS
from .._parallel import sharding
from .._state.task import Task, misfit


@dataclass
class Plan:
    """Everything a training step needs: the terms, and their parameters in order."""

    model: nn.Module  # unwrapped from DDP
    terms: list[Term]
    params: list[torch.Tensor] = field(init=False)
    # (dict, key, object) links: while each ``dict[key] is object`` holds, the model would give
    # the same parameter objects under the same names, so the plan is still valid.
    links: sharding.ParameterLinks = field(init=False)

    def __post_init__(self) -> None:
        self.params = [p for t in self.terms for p in t.params]
        self.links = sharding.parameter_links(self.model)

    @classmethod
    def build(cls, model: nn.Module, tasks: Sequence[Task], storage_dtype: torch.dtype) -> Plan:
        """One term per block kind that some task holds, in registry order.

        Args:
            model: the model being trained.
            tasks: the stored tasks, oldest first (at least one).
            storage_dtype: dtype of the terms' buffers.

        Returns:
            The plan.

        Raises:
            ValueError: a stored parameter or layer is missing from ``model`` or does not fit it.
        """
        model = sharding.unwrap(model)
        named = dict(sharding.named_parameters(model))
        why = misfit(tasks, model, named)
        if why is not None:
            raise ValueError(f"model: {why}")
        terms = []
        for name, kind in BLOCK_KINDS.items():
            entries = [(b, task.star) for task in tasks if (b := task.block(name)) is not None]
            if entries:
                terms.append(kind.term(model, named, entries, storage_dtype))
        return cls(model, terms)

    @classmethod
    def current(
        cls, cached: Optional[Plan], model: nn.Module, tasks: Sequence[Task], storage_dtype: torch.dtype, *, fresh: bool
    ) -> Plan:
        """``cached`` while it still fits ``model`` (:meth:`matches`), else a new plan (also when ``fresh``).

        Args:
            cached: the plan last built, or None.
            model, tasks, storage_dtype: as for :meth:`build`.
            fresh: build a new plan whatever ``cached`` is.

        Returns:
            The plan to use.
        """
        if fresh or cached is None or not cached.matches(model):
            return cls.build(model, tasks, storage_dtype)
        return cached

    def matches(self, model: nn.Module) -> bool:
        """Same model, same parameter objects, and each term's placement (where a term checks it
        per step; see ``Term.needs_placement_check``)."""
        if sharding.unwrap(model) is not self.model or not self.links.hold():
            return False
        return all(t.placement_holds() for t in self.terms if t.needs_placement_check)

    def placement_holds(self) -> bool:
        """Each parameter still on the device and dtype the plan was made for."""
        return all(t.placement_holds() for t in self.terms)

    def evaluate(self, lam: float, *, reuse: bool = True) -> Evaluation:
        """Value and gradient of the whole penalty (gradients in ``params`` order)."""
        if len(self.terms) == 1:
            return self.terms[0].evaluate(lam, reuse=reuse)
        parts = [t.evaluate(lam, reuse=reuse) for t in self.terms]
        value = parts[0].value
        for p in parts[1:]:
            value = value + p.value.to(value.device)
        return Evaluation(value, [f for p in parts for f in p.flats], [g for p in parts for g in p.grads])

    def add_to_grads(self, lam: float, scale: float) -> torch.Tensor:
        """Adds ``scale`` × the gradient to ``.grad`` (created when absent; only parameters that
        require grad); returns the penalty's value."""
        value = self.terms[0].add_to_grads(lam, scale)
        for t in self.terms[1:]:
            value = value + t.add_to_grads(lam, scale).to(value.device)
        return value


def zero_penalty(model: nn.Module) -> torch.Tensor:
    """The penalty before any consolidation: a 0-d zero on the parameters' device.

    Args:
        model: the model being trained.

    Returns:
        A 0-d float32 zero.
    """
    first = next(model.parameters(), None)
    return torch.zeros((), device=first.device if first is not None else None)


T = TypeVar("T")


def run_on_plan(plan_for: Callable[[bool], Plan], step: Callable[[Plan], T]) -> tuple[Plan, T]:
    """``step`` on the cached plan; once more on a fresh one when the Rust pass refused a parameter
    that moved or changed dtype since the plan was made (a one-bucket diagonal term leaves that
    check to the pass, which then writes nothing; see ``DiagonalTerm.needs_placement_check``).

    Args:
        plan_for: the cached plan (``False``) or a fresh one (``True``), e.g. ``EWC._plan``.
        step: what to run on the plan (evaluate, add to ``.grad``).

    Returns:
        The plan used and what ``step`` returned.
    """
    plan = plan_for(False)
    try:
        return plan, step(plan)
    except (ValueError, TypeError):
        if plan.placement_holds():
            raise
    plan = plan_for(True)
    return plan, step(plan)
