"""Kronecker-factored tasks: consolidating one (``structure="kfac"``), folding two in online mode,
and checking stored factors against a model.

Online folding (``fold_kron``): one pair per layer must stand for γ A₁ ⊗ G₁ + A₂ ⊗ G₂, which is
in general not a Kronecker product. We keep its Frobenius-nearest Kronecker product (Van Loan &
Pitsianis 1993): rearranging A ⊗ G to vec(A) vec(G)ᵀ turns the sum into a rank-2 matrix
R = Σ_i c_i vec(A_i) vec(G_i)ᵀ, whose best rank-1 approximation vec(X) vec(Y)ᵀ has X = Σ α_i A_i,
Y = Σ β_i G_i, with α the top eigenvector of the 2×2 matrix C 𝒢_G C 𝒢_A (𝒢 the Gram matrices
⟨A_i, A_j⟩_F, ⟨G_i, G_j⟩_F, C = diag(c)) and β = C 𝒢_A α / αᵀ𝒢_A α: no large SVD.

Guarantees (tested in ``tests/test_kfac.py``): ‖X ⊗ Y − Σ c_i A_i ⊗ G_i‖_F is the least over all
Kronecker products of these shapes; it is exact when one term is zero (γ = 0, a zero factor) or
when the A's or the G's are proportional; X and Y are non-negative combinations of the factors
(the Gram matrices have non-negative entries, so by Perron–Frobenius α, β ≥ 0), hence symmetric
positive semi-definite like them. Ritter et al. 2018 instead add the factors (γA₁ + A₂) ⊗ (γG₁ + G₂)
up to a heuristic scaling, which is exact only in special cases.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable, Optional

import torch
from torch import nn

Factors = tuple[torch.Tensor, torch.Tensor]

__all__ = ["fold_kron", "kron_misfit", "nearest_kronecker_sum", "param_name", "warn_diagonal_layers"]


def param_name(module: str, attr: str) -> str:
    """The parameter name of ``module``'s ``attr`` (``"weight"``/``"bias"``) in ``named_parameters``."""
    return f"{module}.{attr}" if module else attr


def nearest_kronecker_sum(terms: Sequence[tuple[float, torch.Tensor, torch.Tensor]]) -> Factors:
    """The Frobenius-nearest X ⊗ Y to Σ_i c_i A_i ⊗ G_i (Van Loan & Pitsianis; see the module doc).

    Args:
        terms: ``(c_i, A_i, G_i)`` with c_i ≥ 0; all A_i of one shape, all G_i of one shape.

    Returns:
        ``(X, Y)`` in float32 on the first A's device, X a combination of the A_i, Y of the G_i;
        zeros when the sum is zero.
    """
    a = torch.stack([t[1].double() for t in terms])
    g = torch.stack([t[2].to(a.device, torch.float64) for t in terms])
    c = torch.diag(torch.tensor([float(t[0]) for t in terms], dtype=torch.float64, device=a.device))
    gram_a = torch.einsum("ixy,jxy->ij", a, a)
    gram_g = torch.einsum("ixy,jxy->ij", g, g)
    k = c @ gram_g @ c @ gram_a
    values, vectors = torch.linalg.eig(k)
    order = torch.argsort(values.real, descending=True)
    for i in order.tolist():
        alpha = vectors[:, i].real
        norm = alpha @ gram_a @ alpha
        if float(norm) > 0 and float(values[i].real) > 0:
            beta = c @ gram_a @ alpha / norm
            if float(alpha.sum()) < 0:  # X ⊗ Y = (−X) ⊗ (−Y): keep the traces non-negative
                alpha, beta = -alpha, -beta
            x = torch.einsum("i,ixy->xy", alpha, a)
            y = torch.einsum("i,ixy->xy", beta, g)
            return x.float(), y.float()
    return torch.zeros_like(a[0]).float(), torch.zeros_like(g[0]).float()


def fold_kron(old: Mapping[str, Factors], new: Mapping[str, Factors], gamma: float) -> dict[str, Factors]:
    """Online folding of the Kronecker factors: per layer of ``new``, the nearest Kronecker product to
    γ A_old ⊗ G_old + A_new ⊗ G_new (``new``'s pair as it is when ``old`` lacks the layer or its
    shapes changed). Stored in ``new``'s dtype.

    Args:
        old: the folded factors so far, by layer.
        new: the task just learned.
        gamma: decay γ in [0, 1] of the old term.

    Returns:
        The folded factors by layer.
    """
    out = dict(new)
    for m, (a, g) in new.items():
        prev = old.get(m)
        if prev is None or prev[0].shape != a.shape or prev[1].shape != g.shape:
            continue
        x, y = nearest_kronecker_sum([(gamma, prev[0], prev[1]), (1.0, a, g)])
        out[m] = (x.to(a.device, a.dtype), y.to(g.device, g.dtype))
    return out


def warn_diagonal_layers(model: nn.Module, selector: Callable[[str, nn.Parameter], bool]) -> None:
    """Says once (``warnings.warn``) which layers with protected parameters have no Kronecker form
    and get the diagonal Fisher under ``structure="kfac"``.

    Args:
        model: the model.
        selector: the ``params=`` predicate.
    """
    from .kfac import kfac_form

    plain = []
    for name, module in model.named_modules():
        own = [(k, p) for k, p in module.named_parameters(recurse=False) if p.requires_grad]
        if any(selector(param_name(name, k), p) for k, p in own) and kfac_form(module) is None:
            plain.append(f"{type(module).__name__} '{name}'")
    if plain:
        warnings.warn(
            "structure='kfac': these layers have no Kronecker-factored form (Linear, Conv1d/Conv2d with "
            f"groups=1, transformers' Conv1D) and get the diagonal Fisher: {', '.join(plain)}",
            stacklevel=4,  # the caller of EWC(...)
        )


def kron_misfit(kron_layers: Iterable[tuple[str, torch.Tensor, torch.Tensor, bool]], model: nn.Module) -> Optional[str]:
    """Why stored factors do not fit ``model``, or None.

    Args:
        kron_layers: ``(module name, A, G, has_bias)`` per stored layer.
        model: the model.

    Returns:
        A message naming the layer and both shapes, or None when every layer fits.
    """
    from .kfac import kfac_form

    modules = dict(model.named_modules())
    for name, a, g, has_bias in kron_layers:
        module = modules.get(name)
        form = kfac_form(module) if module is not None else None
        if module is None or form is None:
            return f"layer '{name}' has Kronecker factors, but the model has no such Linear/Conv layer"
        want_a, want_g = form[0] + int(has_bias), form[1]
        if tuple(a.shape) != (want_a, want_a) or tuple(g.shape) != (want_g, want_g):
            return (
                f"layer '{name}': factors A {tuple(a.shape)} and G {tuple(g.shape)} do not fit its weight "
                f"{tuple(module.weight.shape)} (expected A ({want_a}, {want_a}), G ({want_g}, {want_g}))"
            )
    return None


def stored_layers(tasks: Iterable[Any]) -> list[tuple[str, torch.Tensor, torch.Tensor, bool]]:
    """``(module, A, G, has_bias)`` of every Kronecker pair in ``tasks`` (records with ``kron`` and
    ``star``); the bias is part of the pair when the module's bias is stored."""
    return [(m, a, g, param_name(m, "bias") in task.star) for task in tasks for m, (a, g) in task.kron.items()]
