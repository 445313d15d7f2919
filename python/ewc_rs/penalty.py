"""The fused penalty's plan and its autograd glue: value and gradient come from one Rust pass.

A :class:`PenaltyPlan` is built once per consolidation (and model placement): the stored tasks
folded into one quadratic, θ* and F as flat buffers per (device, dtype) group of parameters. Each
training step then costs one Rust call per group, plus a cheap check that the model still holds the
same parameter objects.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from . import _core, distributed, sharding
from .tasks import TaskRecord, first_misfit

# Count of owners of a tensor's storage (torch is pinned, so the private helper is stable).
_storage_use_count: Optional[Callable[[int], int]] = getattr(torch._C, "_storage_Use_Count", None)


def _sole_owner(buffer: torch.Tensor) -> bool:
    """True when no tensor but ``buffer`` itself uses its memory (e.g. no ``.grad`` views it).

    Asking creates one temporary storage reference, hence the 2.
    """
    if _storage_use_count is None:
        return False
    return _storage_use_count(buffer.untyped_storage()._cdata) <= 2


@dataclass
class FlatGroup:
    """Parameters that share a device and dtype, with θ* and F as flat buffers in their order.

    ``star`` and ``fisher`` are the combined quadratic of every stored task (see :meth:`PenaltyPlan.build`):
    Σ_t F_t (θ − θ*_t)² = F (θ − θ*)² + const, with F = Σ_t F_t and θ* the F-weighted mean.
    """

    index: list[int]  # positions of this group's parameters in the plan's parameter list
    params: list[torch.Tensor]
    device: torch.device
    dtype: torch.dtype
    star: torch.Tensor
    fisher: torch.Tensor
    #: FSDP2 parameters (DTensors): ``star`` and ``fisher`` hold this rank's shards only.
    sharded: bool = False
    # The last gradient buffer. Reused when nothing else holds it any more (the usual case once
    # `zero_grad()` dropped the `.grad` views): a fresh allocation of a large buffer costs page
    # faults that take longer than the pass itself.
    buffer: Optional[torch.Tensor] = None

    def evaluate(self, lam: float, *, reuse: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        out = self.buffer if reuse and self.buffer is not None and _sole_owner(self.buffer) else None
        value, flat, views = _core.penalty(self.locals(), self.star, self.fisher, lam, out)
        if reuse:
            self.buffer = flat
        return value, flat, views

    def locals(self) -> list[torch.Tensor]:
        """The parameters as the Rust pass reads them: this rank's shards of DTensors."""
        return [sharding.local(p) for p in self.params] if self.sharded else self.params


@dataclass
class Evaluation:
    """One penalty evaluation, handed to :class:`FusedPenalty` (a plain object, not a tensor, so
    autograd does not treat it as an input)."""

    value: torch.Tensor
    flats: list[torch.Tensor]
    grads: list[Optional[torch.Tensor]]  # per parameter of the plan, views into ``flats``


@dataclass
class PenaltyPlan:
    """Everything a training step needs: parameters in order, their groups, and the constant."""

    model: nn.Module  # unwrapped from DDP
    names: list[str]
    params: list[torch.Tensor]
    groups: list[FlatGroup]
    const: float
    #: FSDP2: the constant of this rank's shards, and the group the sharded part is summed over.
    sharded_const: float = 0.0
    group: distributed.Group = None
    # (dict, key, object) links: while each ``dict[key] is object`` holds, the model would give
    # the same parameter objects under the same names, so the plan is still valid.
    links: sharding.ParameterLinks = field(init=False)

    def __post_init__(self) -> None:
        self.links = sharding.parameter_links(self.model)

    @classmethod
    def build(cls, model: nn.Module, tasks: Sequence[TaskRecord], storage_dtype: torch.dtype) -> PenaltyPlan:
        """Folds the stored tasks into one quadratic per weight, laid out for ``model``'s parameters.

        Σ_t F_t (θ − θ*_t)² = F (θ − m)² + c with F = Σ_t F_t, m = Σ_t F_t θ*_t / F and
        c = Σ_t F_t θ*_t² − F m² (≥ 0, summed in float64), so the penalty is one pass whatever the
        number of tasks. Where F = 0, m is the latest θ*.

        Args:
            model: the model being trained.
            tasks: the stored (F, θ*) records, oldest first (at least one).
            storage_dtype: dtype of the flat θ* and F buffers.

        Returns:
            The plan, one :class:`FlatGroup` per (device, dtype, sharded) of the parameters (FSDP2
            parameters: their local shards, the value summed over the mesh's group).

        Raises:
            ValueError: a consolidated parameter is missing from ``model`` or changed shape.
        """
        model = sharding.unwrap(model)
        named = dict(sharding.named_parameters(model))
        _check_fits(tasks, named)
        names = sorted({n for task in tasks for n in task.fisher})
        params: list[torch.Tensor] = [named[n] for n in names]
        by_group: dict[tuple[torch.device, torch.dtype, bool], list[int]] = {}
        for i, p in enumerate(params):
            by_group.setdefault((p.device, p.dtype, sharding.is_sharded(p)), []).append(i)
        groups, consts = [], [0.0, 0.0]  # plain, sharded
        for (device, dtype, sharded), index in by_group.items():
            stars, fishers = [], []
            for i in index:
                m, f_tot, c = _fold_parameter(tasks, names[i], device)
                if m.shape != sharding.local(params[i]).shape:
                    raise ValueError(
                        f"model: parameter '{names[i]}' holds a shard of shape {list(sharding.local(params[i]).shape)} "
                        f"but its stored F and θ* a shard of shape {list(m.shape)}: load the state for this mesh"
                    )
                consts[sharded] += c
                stars.append(m.reshape(-1))
                fishers.append(f_tot.reshape(-1))
            groups.append(
                FlatGroup(
                    index=index,
                    params=[params[i] for i in index],
                    device=device,
                    dtype=dtype,
                    star=torch.cat(stars).to(storage_dtype),
                    fisher=torch.cat(fishers).to(storage_dtype),
                    sharded=sharded,
                )
            )
        group = distributed.mesh_group(params)
        return cls(model, names, params, groups, max(consts[0], 0.0), max(consts[1], 0.0), group)

    def matches(self, model: nn.Module) -> bool:
        """Same model, same parameter objects and, with several groups, each still on its group's
        device and dtype. With one group that check (≈0.15 µs a parameter, every step) is left to
        the Rust pass, which refuses a moved or retyped parameter before writing anything; the
        caller then rebuilds (:func:`ewc_rs.kfac_penalty.run_on_plan`)."""
        if sharding.unwrap(model) is not self.model or not self.links.hold():
            return False
        return len(self.groups) == 1 or self.placement_holds()

    def placement_holds(self) -> bool:
        """Each parameter still on its group's device and dtype."""
        return all(p.device == g.device and p.dtype == g.dtype for g in self.groups for p in g.params)

    def evaluate(self, lam: float, *, reuse: bool = True) -> Evaluation:
        flats: list[torch.Tensor] = []
        grads: list[Optional[torch.Tensor]] = [None] * len(self.params)
        values = []
        for g in self.groups:
            value, flat, views = g.evaluate(lam, reuse=reuse)
            values.append(value)
            flats.append(flat)
            for i, v in zip(g.index, views):
                grads[i] = sharding.grad_like(v, self.params[i]) if g.sharded else v
        return Evaluation(self._value(values, lam), flats, grads)

    def _value(self, group_values: list[torch.Tensor], lam: float) -> torch.Tensor:
        """The penalty from its per-group parts, plus the constant of the folded tasks; the
        sharded groups' part summed over the ranks (one scalar all-reduce)."""
        sharded = [v for g, v in zip(self.groups, group_values) if g.sharded]
        plain = [v for g, v in zip(self.groups, group_values) if not g.sharded]
        total = None
        if sharded:
            local = _sum(sharded) + 0.5 * lam * self.sharded_const
            total = distributed.all_reduce_(local.float().clone(), self.group, op="penalty_all_reduce")
        if plain:
            part = _sum(plain)
            total = part if total is None else total.to(part.device) + part
        assert total is not None, "a plan has at least one group"
        return total + 0.5 * lam * self.const if self.const else total

    def add_to_grads(self, lam: float, scale: float) -> torch.Tensor:
        """Adds ``scale``·λF(θ−θ*) to each parameter's ``.grad`` as ``backward()`` would (only
        parameters that require grad; ``.grad`` created when absent); returns the penalty."""
        values = []
        for g in self.groups:
            params = g.params
            if g.sharded:  # this rank's shards: flat gradient, added to the DTensor .grad's local part
                value, flat, views = _core.penalty(g.locals(), g.star, g.fisher, lam)
                if scale != 1.0:
                    flat.mul_(scale)
                sharding.add_local_grads(params, views)
                values.append(value)
                continue
            if g.device.type in ("cpu", "cuda"):  # one fused pass straight into the .grad memory
                value, pending = _core.penalty_add_to_grads(params, g.star, g.fisher, lam, scale)
            else:  # flat gradient, then one multi-tensor add
                value, flat, views = _core.penalty(params, g.star, g.fisher, lam)
                if scale != 1.0:
                    flat.mul_(scale)
                wants = [i for i, p in enumerate(params) if p.requires_grad]
                have = [i for i in wants if params[i].grad is not None]
                if have:
                    torch._foreach_add_([params[i].grad for i in have], [views[i] for i in have])  # type: ignore[misc]
                pending = [(i, views[i]) for i in wants if params[i].grad is None]
            for i, t in pending:
                p = params[i]
                if p.grad is None:
                    p.grad = t
                else:  # a .grad of another dtype or layout
                    p.grad.add_(t)
            values.append(value)
        return self._value(values, lam)


def zero_penalty(model: nn.Module) -> torch.Tensor:
    """The penalty before any consolidation: a 0-d zero on the parameters' device.

    Args:
        model: the model being trained.

    Returns:
        A 0-d float32 zero.
    """
    first = next(model.parameters(), None)
    return torch.zeros((), device=first.device if first is not None else None)


def _sum(values: list[torch.Tensor]) -> torch.Tensor:
    total = values[0]
    for v in values[1:]:
        total = total + v.to(total.device)
    return total


def _check_fits(tasks: Sequence[TaskRecord], named: dict[str, nn.Parameter]) -> None:
    misfit = first_misfit(tasks, {n: p.shape for n, p in named.items()})
    if misfit is None:
        return
    n, stored, shape = misfit
    if shape is None:
        raise ValueError(f"model: parameter '{n}' was consolidated but the model has no such parameter")
    raise ValueError(f"model: parameter '{n}' has shape {tuple(shape)} but was consolidated with shape {tuple(stored)}")


def _fold_parameter(
    tasks: Sequence[TaskRecord], name: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(m, F, c) of one parameter over the tasks that store it, in float64 on ``device``."""
    terms = [
        (
            sharding.local(task.fisher[name]).to(device, torch.float64),
            sharding.local(task.star[name]).to(device, torch.float64),
        )
        for task in tasks
        if name in task.fisher
    ]
    f_tot = torch.stack([f for f, _ in terms]).sum(0)
    fs_tot = torch.stack([f * s for f, s in terms]).sum(0)
    m = torch.where(f_tot > 0, fs_tot / f_tot.clamp_min(1e-300), terms[-1][1])
    const = float(sum(float((f * s * s).sum()) for f, s in terms) - float((f_tot * m * m).sum()))
    return m, f_tot, const


_TWICE = (
    b"ewc_rs: the EWC penalty has no second derivative (its gradient comes from one fused Rust "
    b"pass); differentiate it once only"
)


def _first_order_only(backward: Callable[..., tuple]) -> Callable[..., tuple]:
    """Like ``torch.autograd.function.once_differentiable``, but strict.

    ``once_differentiable`` returns a graph-less gradient when the incoming gradient does not
    require grad (``torch.autograd.grad(loss, params, create_graph=True)``), so a second
    derivative of ``ce + penalty`` silently drops the penalty's Hessian λF; and its error node
    hangs off detached copies, which ``torch.autograd.grad(..., params)`` prunes. Here, whenever a
    graph is being built (``create_graph=True``), each gradient gets a zero-valued term that runs
    through a ``DelayedError`` node connected to its parameter, so differentiating it again
    (``backward()`` or ``autograd.grad`` w.r.t. the parameters) raises a RuntimeError.
    """

    @functools.wraps(backward)
    def wrapper(ctx: Any, *args: Any) -> tuple:
        params = ctx.params
        with torch.no_grad():
            outputs = backward(ctx, *args)
        if not torch.is_grad_enabled():
            return outputs
        out = list(outputs)
        offset = len(out) - len(params)
        live = [i for i in range(len(params)) if out[offset + i] is not None]
        if live:
            err = torch._C._functions.DelayedError(_TWICE, len(live))
            tied = err(*[params[i] for i in live])
            tied = tied if isinstance(tied, tuple) else (tied,)
            for i, t in zip(live, tied):
                out[offset + i] = out[offset + i] + t * 0
        return tuple(out)

    return wrapper


class FusedPenalty(torch.autograd.Function):
    """Returns an :class:`Evaluation`'s value; backward hands out its precomputed gradient.

    Call :meth:`run` rather than ``apply``: the same, minus ``Function.apply``'s per-argument
    scan for dead functorch wrappers (about 1 µs per parameter) when no functorch transform is
    active, which is always the case for an EWC penalty outside ``vmap``/``grad``.
    """

    @classmethod
    def run(cls, evaluation: Evaluation, plan: Any, lam: float, *params: torch.Tensor) -> torch.Tensor:
        if torch._C._are_functorch_transforms_active():
            return cls.apply(evaluation, plan, lam, *params)
        return super(torch.autograd.Function, cls).apply(evaluation, plan, lam, *params)  # type: ignore[misc]

    @staticmethod
    def forward(ctx: Any, evaluation: Evaluation, plan: Any, lam: float, *params: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.evaluation = evaluation
        ctx.plan = plan
        ctx.lam = lam
        # Plain references (no saved-tensor version check): used to tie the double-backward error
        # node and to recompute the gradient when backward runs again (retain_graph=True).
        ctx.params = params
        ctx.versions = [p._version for p in params]
        return evaluation.value

    @staticmethod
    @_first_order_only
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:  # type: ignore[override]
        evaluation: Optional[Evaluation] = ctx.evaluation
        # Dropped now: the views become `.grad` without a copy only when nothing else holds them,
        # and the buffers must be free for the next step.
        ctx.evaluation = None
        if evaluation is None:  # a second backward through a retained graph: recompute
            if any(p._version != v for p, v in zip(ctx.params, ctx.versions)):
                raise RuntimeError(
                    "ewc_rs: a parameter was modified in place after the penalty was computed; "
                    "cannot run its backward again (compute the penalty anew)"
                )
            evaluation = ctx.plan.evaluate(ctx.lam, reuse=False)
        unit = grad_out.device.type == "cpu" and float(grad_out) == 1.0
        if not unit:  # scale the flat buffers in place: one kernel per group, views follow
            for flat in evaluation.flats:
                flat.mul_(grad_out.to(flat.device, flat.dtype))
        return (None, None, None, *evaluation.grads)
