"""The eigenvalue-corrected Kronecker block kind (EKFAC; George et al. 2018), and its penalty term.

Per layer with a Kronecker form: the eigenbases Q_A, Q_G of the KFAC factors (A = Q_A Λ_A Q_Aᵀ,
G = Q_G Λ_G Q_Gᵀ) and, in place of the Kronecker eigenvalues Λ_G ⊗ Λ_A, the corrected diagonal

    S = E_n[(Q_Gᵀ ∇_W̃ ℓ_n Q_A)²]        ([out, in(+1)], one entry per eigen-direction)

estimated in a second pass over the data, exactly for every Fisher kind: the layer runs as three
(``_Rotated``): ã ↦ u = Q_Aᵀ ã (fixed), u ↦ z = V u with V = Q_Gᵀ W̃ Q_A (the only parameter that
requires grad in that pass), z ↦ Q_G z (fixed); the layer's output is unchanged, and V's
per-sample gradient is Q_Gᵀ (Σ_t g_t ã_tᵀ) Q_A, so V's diagonal Fisher from the ordinary engine is
S. The bias is the homogeneous coordinate of A (W̃ = [W, b]), as for :mod:`.kronecker`.

Penalty ½λ Σ_t Σ_l Σ S_tl ⊙ (Q_Gtlᵀ ΔW̃_tl Q_Atl)², gradient λ Q_G (S ⊙ Q_Gᵀ ΔW̃ Q_A) Q_Aᵀ: per step,
the (layer, task) pairs of one shape stacked, four batched matrix products (torch ops on the
layers' devices).

Online folding (:meth:`Ekfac.fold`): the curvature γ C_old + C_new is kept in the new eigenbasis,
its diagonal there being S_new + γ (R_G ∘ R_G) S_old (R_A ∘ R_A)ᵀ with R_G = Q_Gᵀ Q_G,old and
R_A = Q_Aᵀ Q_A,old: the Frobenius-nearest matrix diagonal in the new basis (the orthogonal
projection onto those matrices; C_new already is one), positive semi-definite, trace kept.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from .._parallel import sharding
from .base import Block, Entry, LayerBlock, LayerTerm, Rerun, check_factor
from .layers import kfac_form, layer_misfit, matrix, param_name

#: Q_A ``[in(+1), in(+1)]``, Q_G ``[out, out]``, S ``[out, in(+1)]``.
Eigen = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Ekfac(LayerBlock):
    """(Q_A, Q_G, S) per layer, by module name; covers the layer's weight (and bias, with A's row)."""

    layers: dict[str, Eigen]
    #: The modules whose bias is part of W̃ (the last row of Q_A, the last column of S).
    with_bias: frozenset[str] = field(default_factory=frozenset)

    kind: ClassVar[str] = "ekfac"
    second_pass: ClassVar[bool] = True

    @classmethod
    def from_factors(
        cls,
        model: nn.Module,
        factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        with_bias: frozenset[str],
        rerun: Rerun,
    ) -> Ekfac:
        bases = {m: (_eigenbasis(a), _eigenbasis(g)) for m, (a, g) in factors.items()}
        if not bases:
            return Ekfac({}, with_bias)
        s = _corrected_diagonal(model, bases, with_bias, rerun)
        return Ekfac({m: (qa, qg, s[m]) for m, (qa, qg) in bases.items()}, with_bias)

    def estimate(self) -> dict[str, dict[str, tuple[torch.Tensor, ...]]]:
        return {"ekfac": dict(self.layers)}

    @property
    def params(self) -> set[str]:
        return {param_name(m, "weight") for m in self.layers} | {param_name(m, "bias") for m in self.with_bias}

    def to(self, device: torch.device) -> Ekfac:
        return Ekfac({m: tuple(t.to(device) for t in e) for m, e in self.layers.items()}, self.with_bias)  # type: ignore[misc]

    def cast(self, dtype: torch.dtype) -> Ekfac:
        return Ekfac({m: tuple(t.to(dtype) for t in e) for m, e in self.layers.items()}, self.with_bias)  # type: ignore[misc]

    def fold(self, old: Optional[Block], gamma: float) -> Ekfac:
        """Per layer, γ·old + this one kept in this block's eigenbasis (see the module doc); a layer
        that ``old`` lacks, or whose shapes changed, is taken as it is."""
        if not isinstance(old, Ekfac):
            return self
        out = dict(self.layers)
        for m, (qa, qg, s) in self.layers.items():
            prev = old.layers.get(m)
            if prev is None or prev[0].shape != qa.shape or prev[1].shape != qg.shape:
                continue
            qa64, qg64 = qa.double(), qg.double()
            ra = (qa64.T @ prev[0].to(qa.device, torch.float64)).square()
            rg = (qg64.T @ prev[1].to(qg.device, torch.float64)).square()
            folded = s.double() + gamma * rg @ prev[2].to(s.device, torch.float64) @ ra.T
            out[m] = (qa, qg, folded.clamp_min(0).to(s.dtype))
        return Ekfac(out, self.with_bias)

    def misfit(self, model: nn.Module, named: Mapping[str, nn.Parameter]) -> Optional[str]:
        for m, (qa, qg, s) in self.layers.items():
            why = layer_misfit(m, (qa.shape[0], qg.shape[0]), m in self.with_bias, model, named)
            if why is not None:
                return why
            if tuple(s.shape) != (qg.shape[0], qa.shape[0]):
                return (
                    f"layer '{m}': S {tuple(s.shape)} does not fit its bases (expected ({qg.shape[0]}, {qa.shape[0]}))"
                )
        return None

    def to_state(self) -> dict[str, Any]:
        return {m: {"QA": qa, "QG": qg, "S": s} for m, (qa, qg, s) in self.layers.items()}

    @classmethod
    def from_state(cls, payload: Any, where: str, storage: torch.dtype, star: Mapping[str, Any]) -> Ekfac:
        if not isinstance(payload, dict):
            raise ValueError(f"state: {where}: '{cls.kind}' must map layer names to {{'QA', 'QG', 'S'}}")
        out = {}
        for m, entry in payload.items():
            at = f"{where}, layer '{m}'"
            if not isinstance(entry, dict) or set(entry) != {"QA", "QG", "S"}:
                raise ValueError(f"state: {at}: expected exactly the tensors 'QA', 'QG' and 'S'")
            qa, qg = check_factor(at, "QA", entry["QA"]), check_factor(at, "QG", entry["QG"])
            s = entry["S"]
            if not isinstance(s, torch.Tensor) or tuple(s.shape) != (qg.shape[0], qa.shape[0]):
                raise ValueError(f"state: {at}: S must be a tensor of shape ({qg.shape[0]}, {qa.shape[0]})")
            if not torch.isfinite(s.float()).all() or (s < 0).any():
                raise ValueError(f"state: {at}: S must be finite and non-negative")
            out[m] = (qa.detach().to(storage), qg.detach().to(storage), s.detach().to(storage))
        return Ekfac(out, frozenset(m for m in out if param_name(m, "bias") in star))

    def to_tensors(self) -> tuple[list[str], dict[str, torch.Tensor]]:
        layers = sorted(self.layers)
        tensors = {}
        for j, m in enumerate(layers):
            for what, t in zip(("QA", "QG", "S"), self.layers[m]):
                tensors[f"{j}.{what}"] = t.detach().cpu().contiguous()
        return layers, tensors

    @classmethod
    def from_tensors(cls, layout: Sequence[str], get: Callable[[str], torch.Tensor]) -> Any:
        return {m: {w: get(f"{j}.{w}") for w in ("QA", "QG", "S")} for j, m in enumerate(layout)}

    @classmethod
    def term(
        cls, model: nn.Module, named: Mapping[str, nn.Parameter], entries: Sequence[Entry], storage: torch.dtype
    ) -> EkfacTerm:
        return EkfacTerm.build(model, named, entries)


def _eigenbasis(factor: torch.Tensor) -> torch.Tensor:
    """The eigenvectors (columns) of a symmetric PSD factor, in float64 then float32."""
    sym = factor.double()
    _, vectors = torch.linalg.eigh(0.5 * (sym + sym.T))
    return vectors.to(torch.float32)


class _Rotated(nn.Module):
    """A layer with a Kronecker form as three: Q_Aᵀ (fixed), V (the parameter), Q_G (fixed); same output."""

    def __init__(self, layer: Any, qa: torch.Tensor, qg: torch.Tensor, has_bias: bool) -> None:
        super().__init__()
        form = kfac_form(layer)
        assert form is not None
        inputs, outputs, transposed = form
        weight: torch.Tensor = layer.weight
        bias: Optional[torch.Tensor] = layer.bias if has_bias else None
        dev, dt = weight.device, weight.dtype
        qa, qg = qa.to(dev, torch.float32), qg.to(dev, torch.float32)
        core = qg.T @ matrix(weight, bias, transposed).to(dev) @ qa  # V = Q_Gᵀ W̃ Q_A, [out, a]
        a_dim = qa.shape[0]
        into_w, into_b = qa[:inputs].T, (qa[inputs] if has_bias else None)
        if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
            conv: Any = type(layer)
            kernel = weight.shape[2:]
            ones = (1,) * len(kernel)
            self.into: nn.Module = conv(
                weight.shape[1],
                a_dim,
                kernel,
                layer.stride,
                layer.padding,
                layer.dilation,
                bias=has_bias,  # type: ignore[arg-type]
            )
            self.into.weight.data = into_w.reshape(a_dim, *weight.shape[1:]).to(dt)
            self.core: nn.Module = conv(a_dim, outputs, ones, bias=False)
            self.core.weight.data = core.reshape(outputs, a_dim, *ones).to(dt)
            self.out: nn.Module = conv(outputs, outputs, ones, bias=False)
            self.out.weight.data = qg.reshape(outputs, outputs, *ones).to(dt)
        else:  # nn.Linear, transformers' Conv1D: a Linear on the last dim
            self.into = nn.Linear(inputs, a_dim, bias=has_bias)
            self.into.weight.data = into_w.to(dt).contiguous()
            self.core = nn.Linear(a_dim, outputs, bias=False)
            self.core.weight.data = core.to(dt).contiguous()
            self.out = nn.Linear(outputs, outputs, bias=False)
            self.out.weight.data = qg.to(dt).contiguous()
        if into_b is not None:
            self.into.bias.data = into_b.to(dt)
        self.to(dev)
        for p in (*self.into.parameters(), *self.out.parameters()):
            p.requires_grad_(False)
        self.has_layer_bias = layer.bias is not None and not has_bias
        if self.has_layer_bias:  # a bias left out of the protected set: added as it is
            self.register_buffer("layer_bias", layer.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.out(self.core(self.into(x)))
        if self.has_layer_bias:
            b: torch.Tensor = self.layer_bias  # type: ignore[assignment]
            y = y + (b.view(-1, *([1] * (y.dim() - 2))) if isinstance(self.core, (nn.Conv1d, nn.Conv2d)) else b)
        return y


def _corrected_diagonal(
    model: nn.Module, bases: Mapping[str, tuple[torch.Tensor, torch.Tensor]], with_bias: frozenset[str], rerun: Rerun
) -> dict[str, torch.Tensor]:
    """S per layer: the diagonal Fisher of V in the model with each layer rotated (module doc).

    The layers are swapped in place and every other parameter stops requiring grad for the pass;
    both are restored afterwards, also on error.
    """
    everything = dict(bases)
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    frozen = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(False)
        if "" in bases:  # the model is the layer itself
            qa, qg = bases[""]
            fisher = rerun(_Rotated(model, qa, qg, "" in with_bias))
            bases = {}
        for m, (qa, qg) in bases.items():
            parent_name, _, child = m.rpartition(".")
            parent = model.get_submodule(parent_name)
            layer = parent._modules[child]
            assert layer is not None
            parent._modules[child] = _Rotated(layer, qa, qg, m in with_bias)
            swapped.append((parent, child, layer))
        if swapped:
            fisher = rerun(model)
    finally:
        for parent, child, layer in reversed(swapped):
            parent._modules[child] = layer
        for p in frozen:
            p.requires_grad_(True)
    out = {}
    for m, (qa, qg) in everything.items():
        f = fisher[param_name(m, "core.weight")]
        out[m] = f.reshape(qg.shape[0], qa.shape[0]).float()
    return out


@dataclass
class EkfacTerm(LayerTerm):
    """The EKFAC blocks of every task: the layers' weights and biases, and the stacked pairs."""

    weights: list[torch.Tensor]
    biases: list[Optional[torch.Tensor]]
    transposed: list[bool]
    #: Per stack: layer indices [k], W̃* [k, out, a], Q_A [k, a, a], Q_G [k, out, out], S [k, out, a].
    stacks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]

    @classmethod
    def build(cls, model: nn.Module, named: Mapping[str, nn.Parameter], entries: Sequence[Entry]) -> EkfacTerm:
        """Stacks every (layer, task) pair by shape, on the layers' devices (float32).

        Raises:
            ValueError: a layer with EKFAC blocks is sharded (FSDP2).
        """
        pairs = [(b, star) for b, star in entries if isinstance(b, Ekfac)]
        layers = sorted({m for b, _ in pairs for m in b.layers})
        forms = [kfac_form(model.get_submodule(m)) for m in layers]
        weights: list[torch.Tensor] = [named[param_name(m, "weight")] for m in layers]
        if any(sharding.is_sharded(w) for w in weights):
            raise ValueError(
                "model: a layer with EKFAC blocks is sharded (FSDP2); structure='ekfac' needs whole weights"
            )
        biases: list[Optional[torch.Tensor]] = [
            named[param_name(m, "bias")] if m in pairs[-1][0].with_bias else None for m in layers
        ]
        stacks: dict[tuple[Any, ...], list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        for i, (m, form, w, b) in enumerate(zip(layers, forms, weights, biases)):
            assert form is not None  # the block's misfit checked it
            for block, star in pairs:
                if m not in block.layers:
                    continue
                bias = star.get(param_name(m, "bias")) if b is not None else None
                target = matrix(star[param_name(m, "weight")], bias, form[2]).to(w.device)
                qa, qg, s = (t.to(w.device, torch.float32) for t in block.layers[m])
                stacks.setdefault((tuple(target.shape), w.device), []).append((i, target, qa, qg, s))
        stacked = []
        for items in stacks.values():
            index = torch.tensor([t[0] for t in items], device=items[0][1].device)
            target, qa, qg, s = (torch.stack([t[k] for t in items]).contiguous() for k in (1, 2, 3, 4))  # type: ignore[misc]
            stacked.append((index, target, qa, qg, s))
        return cls(weights, biases, [bool(f[2]) for f in forms if f is not None], stacked)  # type: ignore[arg-type]

    def _run(self, lam: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.no_grad():
            current = [matrix(w, b, t) for w, b, t in zip(self.weights, self.biases, self.transposed)]
            totals = [torch.zeros_like(c) for c in current]
            value = torch.zeros((), device=self.weights[0].device)
            for index, target, qa, qg, s in self.stacks:
                now = torch.stack([current[i] for i in index.tolist()])
                rotated = qg.transpose(1, 2) @ (now - target) @ qa
                weighted = s * rotated
                value = value + (0.5 * lam) * (weighted * rotated).sum().to(value.device)
                grad = lam * (qg @ weighted @ qa.transpose(1, 2))
                for k, i in enumerate(index.tolist()):
                    totals[i] += grad[k]
            grads = []
            for total, w, t in zip(totals, self.weights, self.transposed):
                inner = total[:, : w.numel() // total.shape[0]]
                grads.append((inner.T if t else inner.reshape(w.shape)).to(w.dtype).contiguous())
            bias_grads = [total[:, -1].to(b.dtype) for total, b in zip(totals, self.biases) if b is not None]
        return value, [*grads, *bias_grads]
