"""Pure-PyTorch float64 reference for the Kronecker-factored Fisher (KFAC). Never imports ewc_rs.

One sample at a time, on a float64 CPU copy of the model: forward hooks keep each Linear/Conv2d
layer's input and output; ``torch.autograd.grad`` of log p(c|x_n) w.r.t. the outputs gives the
output gradients. Conventions (KFAC-expand, Grosse & Martens 2016; Martens & Grosse 2015 for one
position): rows ã = the layer input per position (a Conv2d's unfolded patch, ``F.unfold``) with a
1 appended when there is a bias; A = mean of ã ãᵀ over every sample and position;
G = (1/N) Σ_n Σ_c w_nc Σ_t g_nct g_nctᵀ with w = p(c|x_n) (``exact``) or the data's label
(``empirical``). Other parameters: the diagonal Fisher, per-sample gradients squared.

EKFAC (George et al. 2018): in given eigenbases (Q_A, Q_G) per layer, S = (1/N) Σ_n Σ_c w_nc
(Q_Gᵀ M_nc Q_A)² with M_nc = Σ_t g_nct ã_ntᵀ the per-sample gradient of W̃ (rotate, square, average),
and its penalty ½λ Σ S ⊙ (Q_Gᵀ ΔW̃ Q_A)².

Also the Kronecker penalty with the full matrix materialised (``torch.kron``), and the
Frobenius-nearest Kronecker product of a sum of two, from a full SVD of the rearranged matrix.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ekfac_penalty", "kron_penalty", "nearest_kronecker", "reference_ekfac", "reference_kfac", "weight_matrix"]


def _rows(module: nn.Module, inp: Tensor) -> Tensor:
    if isinstance(module, nn.Conv2d):
        u = F.unfold(inp, module.kernel_size, module.dilation, module.padding, module.stride)  # [1, C·k, L]
        rows = u.transpose(1, 2).reshape(-1, u.shape[1])
    else:
        rows = inp.reshape(-1, inp.shape[-1])
    if module.bias is not None:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)
    return rows


def _grad_rows(module: nn.Module, g: Tensor) -> Tensor:
    if isinstance(module, nn.Conv2d):
        return g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2).reshape(-1, g.shape[1])
    return g.reshape(-1, g.shape[-1])


def reference_kfac(model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]], kind: str = "exact") -> dict[str, Any]:
    """KFAC factors of every ``nn.Linear``/``nn.Conv2d`` and the diagonal Fisher of the rest.

    Args:
        model: a classifier returning logits ``[N, C]``.
        batches: ``(x, y)`` pairs.
        kind: ``"exact"`` or ``"empirical"``.

    Returns:
        ``{"kron": {module: (A, G)}, "diag": {parameter: F}}`` in float64.
    """
    m = copy.deepcopy(model).cpu().double().eval()
    layers = {n: mod for n, mod in m.named_modules() if isinstance(mod, (nn.Linear, nn.Conv2d))}
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    hooks = [
        mod.register_forward_hook(lambda mod, args, out, n=n: seen.__setitem__(n, (args[0], out)))
        for n, mod in layers.items()
    ]
    kron_params = {id(p) for mod in layers.values() for p in mod.parameters()}
    others = [(n, p) for n, p in m.named_parameters() if id(p) not in kron_params and p.requires_grad]
    a_sum = {n: 0.0 for n in layers}
    g_sum = {n: 0.0 for n in layers}
    rows = dict.fromkeys(layers, 0)
    diag = {n: torch.zeros_like(p) for n, p in others}
    count = 0
    try:
        for x, y in batches:
            for i in range(len(x)):
                seen.clear()
                logp = F.log_softmax(m(x[i : i + 1].double()), -1)[0]
                outs = [seen[n][1] for n in layers]
                for n, mod in layers.items():
                    r = _rows(mod, seen[n][0].detach())
                    a_sum[n] = a_sum[n] + r.T @ r
                    rows[n] += r.shape[0]
                weights = logp.exp().detach() if kind == "exact" else F.one_hot(y[i], logp.shape[0]).double()
                for c in range(logp.shape[0]):
                    if weights[c] == 0:
                        continue
                    grads = torch.autograd.grad(logp[c], outs + [p for _, p in others], retain_graph=True)
                    for (n, mod), g in zip(layers.items(), grads):
                        gr = _grad_rows(mod, g)
                        g_sum[n] = g_sum[n] + weights[c] * gr.T @ gr
                    for (n, _), g in zip(others, grads[len(outs) :]):
                        diag[n] += weights[c] * g.square()
                count += 1
    finally:
        for h in hooks:
            h.remove()
    kron = {n: (a_sum[n] / rows[n], g_sum[n] / count) for n in layers}
    return {"kron": kron, "diag": {n: f / count for n, f in diag.items()}}


def weight_matrix(module: nn.Module) -> Tensor:
    """W̃ = [W.reshape(out, -1), b] of a Linear/Conv2d (float64)."""
    w = module.weight.detach().double()
    w = w.reshape(w.shape[0], -1)
    if module.bias is not None:
        w = torch.cat([w, module.bias.detach().double()[:, None]], 1)
    return w


def kron_penalty(delta: Tensor, a: Tensor, g: Tensor, lam: float) -> Tensor:
    """½λ vec(ΔW̃)ᵀ (A ⊗ G) vec(ΔW̃), vec stacking columns, with A ⊗ G materialised."""
    d = delta.double().T.reshape(-1)
    return 0.5 * lam * d @ (torch.kron(a.double(), g.double()) @ d)


def nearest_kronecker(terms: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """The Frobenius-nearest X ⊗ Y to Σ_i A_i ⊗ G_i (Van Loan & Pitsianis), from the full SVD of
    the rearrangement R(Σ A_i ⊗ G_i) = Σ vec(A_i) vec(G_i)ᵀ (row-major vec)."""
    r = sum(a.double().reshape(-1, 1) @ g.double().reshape(1, -1) for a, g in terms)
    assert isinstance(r, Tensor)
    u, s, vh = torch.linalg.svd(r)
    n, k = terms[0][0].shape[0], terms[0][1].shape[0]
    x = (u[:, 0] * s[0].sqrt()).reshape(n, n)
    y = (vh[0] * s[0].sqrt()).reshape(k, k)
    return x, y


def reference_ekfac(
    model: nn.Module,
    batches: Sequence[tuple[Tensor, Tensor]],
    bases: dict[str, tuple[Tensor, Tensor]],
    kind: str = "exact",
    without_bias: frozenset[str] = frozenset(),
) -> dict[str, Tensor]:
    """S per layer of ``bases`` ({module: (Q_A, Q_G)}), float64, one sample and class at a time.

    Args:
        model: a classifier returning logits ``[N, C]`` (Linear/Conv2d layers in ``bases``).
        batches: ``(x, y)`` pairs.
        bases: the eigenbases to rotate into.
        kind: ``"exact"`` or ``"empirical"``.
        without_bias: layers whose bias is not part of W̃ (left out of the protected set).

    Returns:
        ``{module: S}``, S ``[out, in(+1)]``.
    """
    m = copy.deepcopy(model).cpu().double().eval()
    layers = {n: mod for n, mod in m.named_modules() if n in bases}
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    hooks = [
        mod.register_forward_hook(lambda mod, args, out, n=n: seen.__setitem__(n, (args[0], out)))
        for n, mod in layers.items()
    ]
    q = {n: (qa.double(), qg.double()) for n, (qa, qg) in bases.items()}
    total: dict[str, Any] = dict.fromkeys(layers, 0.0)
    count = 0
    try:
        for x, y in batches:
            for i in range(len(x)):
                seen.clear()
                logp = F.log_softmax(m(x[i : i + 1].double()), -1)[0]
                outs = [seen[n][1] for n in layers]
                rows = {n: _rows(mod, seen[n][0].detach()) for n, mod in layers.items()}
                rows = {n: r[:, :-1] if n in without_bias else r for n, r in rows.items()}
                weights = logp.exp().detach() if kind == "exact" else F.one_hot(y[i], logp.shape[0]).double()
                for c in range(logp.shape[0]):
                    if weights[c] == 0:
                        continue
                    grads = torch.autograd.grad(logp[c], outs, retain_graph=True)
                    for (n, mod), g in zip(layers.items(), grads):
                        per_sample = _grad_rows(mod, g).T @ rows[n]  # Σ_t g_t ã_tᵀ, [out, in(+1)]
                        qa, qg = q[n]
                        total[n] = total[n] + weights[c] * (qg.T @ per_sample @ qa).square()
                count += 1
    finally:
        for h in hooks:
            h.remove()
    return {n: t / count for n, t in total.items()}


def ekfac_penalty(delta: Tensor, qa: Tensor, qg: Tensor, s: Tensor, lam: float) -> Tensor:
    """½λ Σ S ⊙ (Q_Gᵀ ΔW̃ Q_A)² in float64 (differentiable in ``delta``)."""
    rotated = qg.double().T @ delta.double() @ qa.double()
    return 0.5 * lam * (s.double() * rotated.square()).sum()
