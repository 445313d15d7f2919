"""The Kronecker block kind (KFAC; Martens & Grosse 2015, Ritter et al. 2018): per layer, factors
(A, G) with the layer's Fisher block ≈ A ⊗ G for W̃ = [W, b] (``[out, in(+1)]``, vec stacking
columns; A indexed input-then-bias), and its penalty term.

Penalty ½λ Σ_t Σ_l tr(ΔW̃_tlᵀ G_tl ΔW̃_tl A_tl), ΔW̃_tl = W̃_l − W̃*_tl the change of layer l's
weight and bias in matrix form since task t; gradient λ Σ_t G_tl ΔW̃_tl A_tl. The term is one Rust
call per step (``_core.KronPlan``: the (layer, task) pairs of one shape stacked once, two batched
matrix products each).

Online folding (:meth:`Kronecker.fold`): one pair per layer must stand for γ A₁ ⊗ G₁ + A₂ ⊗ G₂, which is
in general not a Kronecker product. We keep its Frobenius-nearest Kronecker product (Van Loan &
Pitsianis 1993): rearranging A ⊗ G to vec(A) vec(G)ᵀ turns the sum into a rank-2 matrix
R = Σ_i c_i vec(A_i) vec(G_i)ᵀ, whose best rank-1 approximation vec(X) vec(Y)ᵀ has X = Σ α_i A_i,
Y = Σ β_i G_i, with α the top eigenvector of the 2×2 matrix C 𝒢_G C 𝒢_A (𝒢 the Gram matrices
⟨A_i, A_j⟩_F, ⟨G_i, G_j⟩_F, C = diag(c)) and β = C 𝒢_A α / αᵀ𝒢_A α: no large SVD.

Guarantees (tested in ``tests/blocks/test_kronecker.py``): ‖X ⊗ Y − Σ c_i A_i ⊗ G_i‖_F is the least over all
Kronecker products of these shapes; it is exact when one term is zero (γ = 0, a zero factor) or
when the A's or the G's are proportional; X and Y are non-negative combinations of the factors
(the Gram matrices have non-negative entries, so by Perron–Frobenius α, β ≥ 0), hence symmetric
positive semi-definite like them. Ritter et al. 2018 instead add the factors (γA₁ + A₂) ⊗ (γG₁ + G₂)
up to a heuristic scaling, which is exact only in special cases.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from .. import _core
from .._parallel import sharding
from .base import Block, Entry, LayerBlock, LayerTerm, Rerun, check_factor
from .layers import kfac_form, layer_misfit, matrix, param_name

Factors = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Kronecker(LayerBlock):
    """Factors (A, G) per layer, by module name; the layer's weight (and bias, when A has its row)
    are the parameters covered."""

    factors: dict[str, Factors]
    #: The modules whose bias is part of W̃ (A's last row and column).
    with_bias: frozenset[str] = field(default_factory=frozenset)

    kind: ClassVar[str] = "kronecker"

    @property
    def params(self) -> set[str]:
        names = {param_name(m, "weight") for m in self.factors}
        return names | {param_name(m, "bias") for m in self.with_bias}

    @classmethod
    def from_factors(
        cls,
        model: nn.Module,
        factors: Mapping[str, Factors],
        with_bias: frozenset[str],
        rerun: Rerun,
    ) -> Kronecker:
        return Kronecker(dict(factors), with_bias)

    def estimate(self) -> dict[str, dict[str, tuple[torch.Tensor, ...]]]:
        return {"kron": dict(self.factors)}

    def to(self, device: torch.device) -> Kronecker:
        return Kronecker({m: (a.to(device), g.to(device)) for m, (a, g) in self.factors.items()}, self.with_bias)

    def cast(self, dtype: torch.dtype) -> Kronecker:
        return Kronecker({m: (a.to(dtype), g.to(dtype)) for m, (a, g) in self.factors.items()}, self.with_bias)

    def damped(self, damping: float) -> Kronecker:
        """Each factor plus √damping · I: the block (A + √d I) ⊗ (G + √d I) = A ⊗ G + √d (A ⊗ I + I ⊗ G)
        + d I, Ritter et al.'s (2018) prior precision on the factors (d = 0: this block)."""
        if damping == 0.0:
            return self
        root = math.sqrt(damping)
        out = {}
        for m, (a, g) in self.factors.items():
            eye_a = torch.eye(a.shape[0], device=a.device, dtype=a.dtype)
            eye_g = torch.eye(g.shape[0], device=g.device, dtype=g.dtype)
            out[m] = (a + root * eye_a, g + root * eye_g)
        return Kronecker(out, self.with_bias)

    def fold(self, old: Optional[Block], gamma: float) -> Kronecker:
        """Per layer, the nearest Kronecker product to γ A_old ⊗ G_old + A_new ⊗ G_new (this block's
        pair as it is when ``old`` lacks the layer or its shapes changed), in this block's dtype."""
        if not isinstance(old, Kronecker):
            return self
        out = dict(self.factors)
        for m, (a, g) in self.factors.items():
            prev = old.factors.get(m)
            if prev is None or prev[0].shape != a.shape or prev[1].shape != g.shape:
                continue
            x, y = nearest_kronecker_sum([(gamma, prev[0], prev[1]), (1.0, a, g)])
            out[m] = (x.to(a.device, a.dtype), y.to(g.device, g.dtype))
        return Kronecker(out, self.with_bias)

    def misfit(self, model: nn.Module, named: Mapping[str, nn.Parameter]) -> Optional[str]:
        for m, (a, g) in self.factors.items():
            why = layer_misfit(m, (a.shape[0], g.shape[0]), m in self.with_bias, model, named)
            if why is not None:
                return why
        return None

    def to_state(self) -> dict[str, Any]:
        return {m: {"A": a, "G": g} for m, (a, g) in self.factors.items()}

    @classmethod
    def from_state(cls, payload: Any, where: str, storage: torch.dtype, star: Mapping[str, Any]) -> Kronecker:
        """A layer's bias is part of W̃ when the task's θ* stores it."""
        if not isinstance(payload, dict):
            raise ValueError(f"state: {where}: '{cls.kind}' must map layer names to {{'A': A, 'G': G}}")
        out = {}
        for m, pair in payload.items():
            if not isinstance(pair, dict) or set(pair) != {"A", "G"}:
                raise ValueError(f"state: {where}, layer '{m}': expected exactly the factors 'A' and 'G'")
            a, g = (check_factor(f"{where}, layer '{m}'", f"factor {w}", pair[w]) for w in "AG")
            out[m] = (a.detach().to(storage), g.detach().to(storage))
        return Kronecker(out, frozenset(m for m in out if param_name(m, "bias") in star))

    def to_tensors(self) -> tuple[list[str], dict[str, torch.Tensor]]:
        layers = sorted(self.factors)
        tensors = {}
        for j, m in enumerate(layers):
            for what, f in zip("AG", self.factors[m]):
                tensors[f"{j}.{what}"] = f.detach().cpu().contiguous()
        return layers, tensors

    @classmethod
    def from_tensors(cls, layout: Sequence[str], get: Callable[[str], torch.Tensor]) -> Any:
        return {m: {w: get(f"{j}.{w}") for w in "AG"} for j, m in enumerate(layout)}

    @classmethod
    def term(
        cls, model: nn.Module, named: Mapping[str, nn.Parameter], entries: Sequence[Entry], storage: torch.dtype
    ) -> KroneckerTerm:
        return KroneckerTerm.build(model, named, entries)


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
class KroneckerTerm(LayerTerm):
    """The Kronecker blocks of every task: the layers' weights and biases, and the stacked pairs."""

    kron: _core.KronPlan
    weights: list[torch.Tensor]
    biases: list[Optional[torch.Tensor]]

    @classmethod
    def build(cls, model: nn.Module, named: Mapping[str, nn.Parameter], entries: Sequence[Entry]) -> KroneckerTerm:
        """Stacks every (layer, task) pair by shape, on the layers' devices.

        Args:
            model: the model being trained (unwrapped).
            named: its parameters by name.
            entries: ``(Kronecker, θ*)`` per task storing Kronecker factors, oldest first.

        Returns:
            The term.

        Raises:
            ValueError: a layer with factors is sharded (FSDP2).
        """
        pairs = [(b, star) for b, star in entries if isinstance(b, Kronecker)]
        layers = sorted({m for b, _ in pairs for m in b.factors})
        forms = [kfac_form(model.get_submodule(m)) for m in layers]
        weights: list[torch.Tensor] = [named[param_name(m, "weight")] for m in layers]
        sharded = [m for m, w in zip(layers, weights) if sharding.is_sharded(w)]
        if sharded:
            raise ValueError(
                f"model: layer '{sharded[0]}' is sharded (FSDP2); structure='kfac' needs whole weights, so use "
                "structure='diag' with fully_shard, or DDP"
            )
        has_bias = [m in pairs[-1][0].with_bias for m in layers]
        biases: list[Optional[torch.Tensor]] = [
            named[param_name(m, "bias")] if b else None for m, b in zip(layers, has_bias)
        ]
        stacks: dict[tuple[Any, ...], list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        for i, (m, form, w, b) in enumerate(zip(layers, forms, weights, biases)):
            assert form is not None  # the block's misfit checked it
            for block, star in pairs:
                if m not in block.factors:
                    continue
                bias = star.get(param_name(m, "bias")) if b is not None else None
                target = matrix(star[param_name(m, "weight")], bias, form[2]).to(w.device)
                a, g = (f.to(w.device, torch.float32) for f in block.factors[m])
                stacks.setdefault((tuple(target.shape), w.device), []).append((i, target, a, g))
        kron = _core.KronPlan(
            transposed=[bool(f[2]) for f in forms if f is not None],
            has_bias=[b is not None for b in biases],
            stacks=[_stacked(terms) for terms in stacks.values()],
        )
        return cls(kron, weights, biases)

    def _run(self, lam: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
        value, wg, bg = self.kron.evaluate(self.weights, self.biases, lam)
        return value, [*wg, *(g for g in bg if g is not None)]
