"""Autograd glue for the fused penalty: the value and the gradient come from one Rust pass."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from . import _core


@dataclass
class FlatGroup:
    """Parameters that share a device and dtype, with θ* and F as flat buffers in their order.

    ``star`` and ``fisher`` are the combined quadratic of every stored task (see ``EWC``):
    Σ_t F_t (θ − θ*_t)² = F (θ − θ*)² + const, with F = Σ_t F_t and θ* the F-weighted mean.
    """

    index: list[int]  # positions of this group's parameters in the penalty's parameter list
    shapes: list[torch.Size]
    star: torch.Tensor
    fisher: torch.Tensor


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
    """P = (λ/2) Σ F (θ−θ*)² + (λ/2)·const; backward returns the gradient computed with P."""

    @staticmethod
    def forward(ctx: Any, lam: float, const: float, groups: Sequence[FlatGroup], *params: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        total = None
        flats = []
        for g in groups:
            value, grad = _core.penalty([params[i].detach() for i in g.index], g.star, g.fisher, lam)
            total = value if total is None else total + value.to(total.device)
            flats.append(grad)
        assert total is not None
        ctx.groups = groups
        ctx.flats = flats
        ctx.nparams = len(params)
        ctx.lam = lam
        # Plain references (no saved-tensor version check): used to tie the double-backward error
        # node and to recompute the gradient when backward runs again (retain_graph=True).
        ctx.params = params
        ctx.versions = [p._version for p in params]
        return total + 0.5 * lam * const

    @staticmethod
    @_first_order_only
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:  # type: ignore[override]
        grads: list = [None] * ctx.nparams
        unit = grad_out.device.type == "cpu" and float(grad_out) == 1.0
        flats = ctx.flats
        if flats is None:  # a second backward through a retained graph: recompute the gradient
            if any(p._version != v for p, v in zip(ctx.params, ctx.versions)):
                raise RuntimeError(
                    "ewc_rs: a parameter was modified in place after the penalty was computed; "
                    "cannot run its backward again (compute the penalty anew)"
                )
            flats = [
                _core.penalty([ctx.params[i].detach() for i in g.index], g.star, g.fisher, ctx.lam)[1]
                for g in ctx.groups
            ]
        for g, flat in zip(ctx.groups, flats):
            if not unit:
                flat = flat * grad_out.to(flat.device, flat.dtype)
            sizes = [int(torch.Size(s).numel()) for s in g.shapes]
            for i, piece, shape in zip(g.index, flat.split(sizes), g.shapes):
                grads[i] = piece.view(shape)
        ctx.flats = None  # frees the flat gradient even if the caller keeps the loss alive
        return (None, None, None, *grads)
