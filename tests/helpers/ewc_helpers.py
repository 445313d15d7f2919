"""Helpers shared by the EWC test files: zoo models with fresh data, perturbations, consolidated
``EWC`` objects, hand-made states, and the naive reference's value and gradient.

The reference is ``naive_penalty`` from ``tests/helpers/reference.py``: (λ/2) Σ_i F_i (θ_i − θ*_i)² with
ordinary torch ops in float64. Random inputs come from generators seeded by the ``seed`` fixture
(``tests/conftest.py``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ewc_rs import EWC, fisher_diag
from models import MODELS
from reference import naive_penalty

TOL = 1e-5  # float32: value and gradient against the float64 reference


Pair = tuple[dict[str, Tensor], dict[str, Tensor]]  # (θ*, F) of one task


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def task_model(name: str, seed: int) -> tuple[nn.Module, Callable[[int], list]]:
    """A zoo model (weights from ``seed``) and a function returning fresh batches of its data."""
    model, sample = MODELS[name](seed % 100_000)
    g = gen(seed + 1)
    return model, lambda n=3: [sample(8, g) for _ in range(n)]


def perturb(model: nn.Module, g: torch.Generator, scale: float = 0.1) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_((scale * torch.randn(p.shape, generator=g)).to(p.dtype))


def fisher_of(model: nn.Module, data: Any) -> dict[str, Tensor]:
    """``ewc_rs.fisher_diag`` (detached: some fallback paths return graph-attached tensors)."""
    return {n: f.detach() for n, f in fisher_diag(model, data).items()}


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def grads_of(model: nn.Module, names: Any = None) -> dict[str, Tensor]:
    """``.grad`` of every (or the named) parameters, zeros where None."""
    out = {}
    for n, p in model.named_parameters():
        if names is None or n in names:
            out[n] = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
    return out


def ewc_value_and_grads(model: nn.Module, ewc: EWC, scale: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    model.zero_grad(set_to_none=True)
    value = ewc.penalty(model)
    (scale * value).backward()
    return value.detach(), grads_of(model)


def naive_value_and_grads(model: nn.Module, pairs: list[Pair], lam: float) -> tuple[float, dict[str, Tensor]]:
    """Σ_t naive_penalty(model, θ*_t, F_t, λ) and its autograd gradient (on a copy of ``model``)."""
    ref = copy.deepcopy(model)
    ref.zero_grad(set_to_none=True)
    total = sum(naive_penalty(ref, star, fisher, lam) for star, fisher in pairs)
    assert isinstance(total, Tensor)
    if total.requires_grad:
        total.backward()
    return float(total.detach()), grads_of(ref)


def rel(a: float, b: float) -> float:
    if b == 0.0:
        return 0.0 if a == 0.0 else math.inf
    return abs(a - b) / abs(b)


def fisher_state(
    model: nn.Module, star: Mapping[str, Tensor], fisher: Mapping[str, Tensor], lam: float, **extra: Any
) -> dict[str, Any]:
    """A hand-made EWC state dict (current format) with one task: θ* and its diagonal F."""
    state = {
        "version": 2,
        "lam": lam,
        "mode": "separate",
        "gamma": 1.0,
        "norm_stats": "freeze",
        "storage_dtype": "float32",
        "tasks": [{"diagonal": dict(fisher), "star": dict(star)}],
    }
    state.update(extra)
    return state


def consolidated_model(
    name: str, seed: int, lam: float = 100.0, **kw: Any
) -> tuple[nn.Module, EWC, list[Pair], Callable]:
    """A zoo model, an ``EWC(**kw)`` consolidated once on fresh data, then the model perturbed.

    Returns ``(model, ewc, [(θ*, F)], batches)``."""
    g = gen(seed)
    model, batches = task_model(name, seed)
    ewc = EWC(model, lam=lam, **kw)
    data = batches()
    fisher = fisher_of(model, data)
    star = snapshot(model)
    ewc.consolidate(data)
    perturb(model, g)
    return model, ewc, [(star, fisher)], batches


def consolidated_mlp(seed: int) -> tuple[nn.Module, EWC, torch.Generator, list[Pair]]:
    """``consolidated_model("mlp_bn")`` with a random λ, and a generator for further perturbations."""
    lam = float(torch.empty(()).uniform_(1.0, 100.0, generator=gen(seed + 2)))
    model, ewc, pairs, _ = consolidated_model("mlp_bn", seed, lam=lam)
    return model, ewc, gen(seed + 3), pairs
