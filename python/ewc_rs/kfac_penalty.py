"""The penalty plan of ``structure="kfac"``: Kronecker-factored layers plus the diagonal rest.

P(θ) = ½λ Σ_t Σ_l tr(ΔW̃_tlᵀ G_tl ΔW̃_tl A_tl) + (λ/2) Σ_t Σ_i F_ti (θ_i − θ*_ti)², with
ΔW̃_tl = W̃_l − W̃*_tl the change of layer l's weight and bias in matrix form ``[out, in(+1)]``
since task t; gradient λ Σ_t G_tl ΔW̃_tl A_tl. The Kronecker part is one Rust call per step
(``_core.KronPlan``: the (layer, task) terms of one shape stacked once, two batched matrix
products each), the diagonal part the fused :class:`~ewc_rs.penalty.PenaltyPlan`; both feed
:class:`~ewc_rs.penalty.FusedPenalty` and ``EWC.backward`` like the diagonal plan alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, TypeVar, Union

import torch
from torch import nn

from . import _core, sharding
from .kfac import kfac_form
from .kfac_tasks import kron_misfit, param_name, stored_layers
from .penalty import Evaluation, PenaltyPlan, _check_fits
from .tasks import TaskRecord


def _matrix(weight: torch.Tensor, bias: Optional[torch.Tensor], transposed: bool) -> torch.Tensor:
    """W̃ = [W, b] as ``[out, in(+1)]`` in float32."""
    w = weight.detach().float()
    m = w.T if transposed else w.reshape(w.shape[0], -1)
    return torch.cat([m, bias.detach().float()[:, None]], 1) if bias is not None else m


def _stacked(
    terms: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]],
) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]:
    """One group's ``(layers, W̃* [k, out, in'], A [k, in', in'], G [k, out, out])``."""
    return (
        [t[0] for t in terms],
        torch.stack([t[1] for t in terms]).contiguous(),
        torch.stack([t[2] for t in terms]).contiguous(),
        torch.stack([t[3] for t in terms]).contiguous(),
    )


@dataclass
class KfacPlan:
    """A training step's view of ``structure="kfac"`` tasks (same interface as ``PenaltyPlan``)."""

    model: nn.Module
    diag: Optional[PenaltyPlan]
    kron: _core.KronPlan
    weights: list[torch.Tensor]
    biases: list[Optional[torch.Tensor]]
    params: list[torch.Tensor] = field(init=False)
    links: sharding.ParameterLinks = field(init=False)
    placement: list[tuple[torch.device, torch.dtype]] = field(init=False)

    def __post_init__(self) -> None:
        diag = self.diag.params if self.diag is not None else []
        self.params = [*diag, *self.weights, *(b for b in self.biases if b is not None)]
        self.links = sharding.parameter_links(self.model)
        self.placement = [(p.device, p.dtype) for p in self.params]

    @classmethod
    def build(cls, model: nn.Module, tasks: Sequence[TaskRecord], storage_dtype: torch.dtype) -> KfacPlan:
        """Stacks every (layer, task) term by shape, on the layers' devices.

        Args:
            model: the model being trained.
            tasks: the stored records, oldest first.
            storage_dtype: dtype of the diagonal part's buffers.

        Returns:
            The plan.

        Raises:
            ValueError: a stored parameter or layer is missing from ``model`` or does not fit it, or a
                layer with factors is sharded (FSDP2).
        """
        model = sharding.unwrap(model)  # DDP: the inner module (its parameters are replicated)
        named = dict(sharding.named_parameters(model))
        _check_fits(tasks, named)
        misfit = kron_misfit(stored_layers(tasks), model)
        if misfit is not None:
            raise ValueError(f"model: {misfit}")
        diag = PenaltyPlan.build(model, tasks, storage_dtype) if any(t.fisher for t in tasks) else None
        layers = sorted({m for t in tasks for m in t.kron})
        forms = [kfac_form(model.get_submodule(m)) for m in layers]
        weights: list[torch.Tensor] = [named[param_name(m, "weight")] for m in layers]
        sharded = [m for m, w in zip(layers, weights) if sharding.is_sharded(w)]
        if sharded:
            raise ValueError(
                f"model: layer '{sharded[0]}' is sharded (FSDP2); structure='kfac' needs whole weights, so use "
                "structure='diag' with fully_shard, or DDP"
            )
        has_bias = [param_name(m, "bias") in tasks[-1].star for m in layers]
        biases: list[Optional[torch.Tensor]] = [
            named[param_name(m, "bias")] if b else None for m, b in zip(layers, has_bias)
        ]
        groups: dict[tuple[Any, ...], list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        for i, (m, form, w, b) in enumerate(zip(layers, forms, weights, biases)):
            assert form is not None  # kron_misfit checked it
            for t in tasks:
                if m not in t.kron:
                    continue
                bias = t.star.get(param_name(m, "bias")) if b is not None else None
                star = _matrix(t.star[param_name(m, "weight")], bias, form[2]).to(w.device)
                a, g = (f.to(w.device, torch.float32) for f in t.kron[m])
                groups.setdefault((tuple(star.shape), w.device), []).append((i, star, a, g))
        kron = _core.KronPlan(
            transposed=[bool(f[2]) for f in forms if f is not None],
            has_bias=[b is not None for b in biases],
            groups=[_stacked(terms) for terms in groups.values()],
        )
        return cls(model, diag, kron, weights, biases)

    def matches(self, model: nn.Module) -> bool:
        """Same model, same parameter objects, each still on its device and dtype."""
        if sharding.unwrap(model) is not self.model or not self.links.hold():
            return False
        if self.diag is not None and not self.diag.matches(model):
            return False
        return self.placement_holds()

    def placement_holds(self) -> bool:
        """Each parameter still on the device and dtype the plan was made for."""
        if self.diag is not None and not self.diag.placement_holds():
            return False
        return all((p.device, p.dtype) == pl for p, pl in zip(self.params, self.placement))

    def _kron(self, lam: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
        value, wg, bg = self.kron.evaluate(self.weights, self.biases, lam)
        return value, [*wg, *(g for g in bg if g is not None)]

    def evaluate(self, lam: float, *, reuse: bool = True) -> Evaluation:
        """Value and gradient of the whole penalty (the gradients fresh tensors or views of the
        diagonal part's flat buffers, listed in ``flats`` so that a scale reaches each once)."""
        value, grads = self._kron(lam)
        if self.diag is None:
            return Evaluation(value, list(grads), list(grads))
        d = self.diag.evaluate(lam, reuse=reuse)
        total = d.value + value.to(d.value.device)
        return Evaluation(total, [*d.flats, *grads], [*d.grads, *grads])

    def add_to_grads(self, lam: float, scale: float) -> torch.Tensor:
        """Adds ``scale`` × the gradient to ``.grad`` (created when absent; only parameters that
        require grad); returns the penalty's value."""
        value, grads = self._kron(lam)
        kron_params = self.params[len(self.params) - len(grads) :]
        for p, g in zip(kron_params, grads):
            if not p.requires_grad:
                continue
            if scale != 1.0:
                g.mul_(scale)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
        if self.diag is None:
            return value
        diag = self.diag.add_to_grads(lam, scale)
        return diag + value.to(diag.device)


#: The plan of either structure.
AnyPlan = Union[PenaltyPlan, KfacPlan]


def build_plan(model: nn.Module, tasks: Sequence[TaskRecord], storage_dtype: torch.dtype) -> AnyPlan:
    """The penalty plan for ``tasks``: :class:`KfacPlan` when any holds Kronecker factors.

    Args:
        model: the model being trained.
        tasks: the stored records (at least one).
        storage_dtype: dtype of the diagonal buffers.

    Returns:
        The plan.
    """
    if any(t.kron for t in tasks):
        return KfacPlan.build(model, tasks, storage_dtype)
    return PenaltyPlan.build(model, tasks, storage_dtype)


T = TypeVar("T")


def run_on_plan(plan_for: Callable[[bool], AnyPlan], step: Callable[[AnyPlan], T]) -> tuple[AnyPlan, T]:
    """``step`` on the cached plan; once more on a fresh one when the Rust pass refused a parameter
    that moved or changed dtype since the plan was made (a one-group plan leaves that check to the
    pass, which then writes nothing; see :meth:`PenaltyPlan.matches`).

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
