"""The fused penalty's autograd glue: ``FusedPenalty`` returns a plan's value, its backward hands
out the gradient the same native pass computed; a second derivative raises an error."""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch

from .._blocks.base import Evaluation

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
