"""Pure-PyTorch reference for categorical likelihoods with several positions per sample
(sequences, segmentation maps). Like ``reference.py`` it never imports ``ewc_rs``, runs on a
float64 CPU eval-mode deep copy of the model and loops over single samples.

Per sample n with logits turned into ``[P, C]`` and targets ``[P]`` (positions whose target is
``ignore_index`` left out, mask m_p): ℓ_n = Σ_p m_p log p(y_p); F = (1/N) Σ_n F_n with
- empirical: F_n = (∇ℓ_n)²,
- exact: F_n = Σ_p m_p Σ_c p(c|p) (∇ log p(c|p))² (labels independent across positions),
- mc: F_n = (1/S) Σ_s (∇ Σ_p m_p log p(y_ps))² for given draws y_ps,
- batched: per batch, the square of the gradient of the mean over samples of −ℓ_n; averaged over
  batches.

Layouts: ``"last"`` (logits ``[1, ..., C]``, targets ``[1, ...]``), ``"class_dim1"`` (logits
``[1, C, ...]``), ``"causal_lm"`` (logits ``[1, T, V]`` predict labels ``[1, T]`` shifted by one).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LAYOUTS = ("last", "class_dim1", "causal_lm")


def logits_of(raw: Any) -> Tensor:
    """A tensor as it is, a tuple's first element, a mapping's ``"logits"``."""
    if isinstance(raw, Tensor):
        return raw
    if isinstance(raw, (tuple, list)):
        return raw[0]
    if isinstance(raw, Mapping):
        return raw["logits"]
    raise TypeError(f"cannot find logits in {type(raw).__name__}")


def positions(logits: Tensor, y: Optional[Tensor], layout: str) -> tuple[Tensor, Optional[Tensor]]:
    """One sample's logits ``[1, ...]`` as ``[P, C]`` and its targets ``[1, ...]`` as ``[P]``."""
    if layout == "causal_lm":
        logits, y = logits[:, :-1], (None if y is None else y[:, 1:])
    elif layout == "class_dim1":
        logits = logits.movedim(1, -1)
    c = logits.shape[-1]
    return logits.reshape(-1, c), (None if y is None else y.reshape(-1))


def _model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).cpu().double().eval()


def _x(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _x(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_x(v) for v in x)
    return x


def _call(model: nn.Module, x: Any) -> Any:
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def _rows(x: Any, i: int) -> Any:
    if isinstance(x, Tensor):
        return x[i : i + 1]
    if isinstance(x, dict):
        return {k: _rows(v, i) for k, v in x.items()}
    return type(x)(_rows(v, i) for v in x)


def _grad(scalar: Tensor, params: list[nn.Parameter]) -> list[Tensor]:
    gs = torch.autograd.grad(scalar, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]


def sequence_fisher(
    model: nn.Module,
    batches: Sequence[tuple[Any, Tensor]],
    *,
    kind: str,
    layout: str = "last",
    ignore_index: int = -100,
    mc_labels: Optional[Sequence[Tensor]] = None,
) -> dict[str, Tensor]:
    """The reference Fisher (see the module docstring).

    Args:
        model: returns logits (a tensor, a tuple or a mapping with ``"logits"``).
        batches: ``(x, y)`` pairs; ``y`` holds the targets per position.
        kind: ``"exact"``, ``"mc"``, ``"empirical"`` or ``"batched"``.
        layout: one of :data:`LAYOUTS`.
        ignore_index: positions with this target do not count.
        mc_labels: for ``mc``, per batch the draws ``[B, P, S]`` (P positions after the layout).

    Returns:
        ``{name: float64 CPU tensor}`` for every parameter that requires grad.
    """
    m = _model(model)
    named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [p for _, p in named]
    total = [torch.zeros_like(p) for p in params]
    count = 0
    for b, (x, y) in enumerate(batches):
        x = _x(x)
        if kind == "batched":
            per_sample = []
            for i in range(y.shape[0]):
                lp, yi, mask = _sample(m, _rows(x, i), y[i : i + 1], layout, ignore_index)
                per_sample.append((lp.gather(1, yi.clamp_min(0).unsqueeze(1)).squeeze(1) * mask).sum())
            for t, g in zip(total, _grad(-torch.stack(per_sample).mean(), params)):
                t += g.pow(2)
            count += 1
            continue
        for i in range(y.shape[0]):
            lp, yi, mask = _sample(m, _rows(x, i), y[i : i + 1], layout, ignore_index)
            if kind == "empirical":
                ll = (lp.gather(1, yi.clamp_min(0).unsqueeze(1)).squeeze(1) * mask).sum()
                contrib = [g.pow(2) for g in _grad(ll, params)]
            elif kind == "exact":
                contrib = [torch.zeros_like(p) for p in params]
                prob = lp.detach().exp()
                for pos in range(lp.shape[0]):
                    if mask[pos] == 0:
                        continue
                    for c in range(lp.shape[1]):
                        for acc, g in zip(contrib, _grad(lp[pos, c], params)):
                            acc += prob[pos, c] * g.pow(2)
            else:
                assert mc_labels is not None
                draws = mc_labels[b][i].long()  # [P, S]
                contrib = [torch.zeros_like(p) for p in params]
                for s in range(draws.shape[1]):
                    ll = (lp.gather(1, draws[:, s : s + 1]).squeeze(1) * mask).sum()
                    for acc, g in zip(contrib, _grad(ll, params)):
                        acc += g.pow(2) / draws.shape[1]
            for t, c in zip(total, contrib):
                t += c
            count += 1
    return {n: t / count for n, t in zip(names, total)}


def _sample(m: nn.Module, x: Any, y: Tensor, layout: str, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """Log-probabilities ``[P, C]``, targets ``[P]`` and mask ``[P]`` of one sample."""
    logits, yi = positions(logits_of(_call(m, x)), y, layout)
    assert yi is not None
    return F.log_softmax(logits, dim=-1), yi.long(), (yi != ignore_index).double()
