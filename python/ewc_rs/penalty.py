"""Autograd glue for the fused penalty: the value and the gradient come from one Rust pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.autograd.function import once_differentiable

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
        return total + 0.5 * lam * const

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:  # type: ignore[override]
        grads: list = [None] * ctx.nparams
        unit = grad_out.device.type == "cpu" and float(grad_out) == 1.0
        for g, flat in zip(ctx.groups, ctx.flats):
            if not unit:
                flat = flat * grad_out.to(flat.device, flat.dtype)
            sizes = [int(torch.Size(s).numel()) for s in g.shapes]
            for i, piece, shape in zip(g.index, flat.split(sizes), g.shapes):
                grads[i] = piece.view(shape)
        ctx.flats = None
        return (None, None, None, *grads)
