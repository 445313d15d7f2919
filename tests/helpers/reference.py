"""Pure-PyTorch reference implementations used by the test suite.

This module never imports ``ewc_rs``.  Everything is computed in float64 on CPU on a deep copy of
the model (``copy.deepcopy(model).cpu().double().eval()``), so the caller's model, its mode and its
``.grad`` fields are never touched.  Floating inputs/targets are cast to float64; integer inputs
(token ids, class labels) are kept as they are.

Conventions
-----------
* ``batches`` is a list of ``(x, y)`` pairs.  ``x`` is a tensor (``model(x)``), a tuple/list
  (``model(*x)``) or a dict (``model(**x)``); the batch dimension is dim 0 of every tensor in ``x``
  and of ``y``.  Non-tensor elements of a tuple/dict input are passed through unchanged.
* Categorical models return logits ``[B, C]`` and ``y`` is a LongTensor ``[B]``.
  Gaussian models return means ``[B, D]`` (unit variance) and ``y`` is a float tensor ``[B, D]``.
* The returned Fisher dicts are keyed by ``model.named_parameters()`` names (shared parameters
  appear once, under their first name) for parameters with ``requires_grad``; values are float64
  CPU tensors with the parameter's shape.

The maths (see docs/explanation/maths.md): per-sample log-likelihood
ℓ_n(θ) = log p(y_n | x_n, θ), diagonal Fisher F = (1/N) Σ_n (∇θ ℓ_n)², penalty
P(θ) = (λ/2) Σ_i F_i (θ_i − θ*_i)².
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "KINDS",
    "LIKELIHOODS",
    "draw_mc_labels",
    "naive_penalty",
    "reference_fisher",
    "relative_error",
    "seed_batched_fisher",
]

Inputs = Union[Tensor, Sequence[Any], Mapping[str, Any]]
Batch = tuple[Inputs, Tensor]
LogLikelihood = Callable[[Tensor, Tensor], Tensor]

KINDS = ("exact", "mc", "empirical", "batched")
LIKELIHOODS = ("categorical", "gaussian")


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _prepare_model(model: nn.Module) -> nn.Module:
    """Deep copy of ``model`` on CPU, in float64 and eval mode (dropout off, BN running stats)."""
    m = copy.deepcopy(model).cpu().double()
    m.eval()
    m.zero_grad(set_to_none=True)
    return m


def _to_double_cpu(x: Any) -> Any:
    """Move every tensor in ``x`` to CPU, floating ones to float64 (recursing into tuples/dicts)."""
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        return x.double() if x.is_floating_point() else x
    if isinstance(x, Mapping):
        return {k: _to_double_cpu(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to_double_cpu(v) for v in x)
    return x


def _slice(x: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` along dim 0 of every tensor in ``x``."""
    if isinstance(x, Tensor):
        return x[start:stop]
    if isinstance(x, Mapping):
        return {k: _slice(v, start, stop) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_slice(v, start, stop) for v in x)
    return x


def _forward(model: nn.Module, x: Any) -> Tensor:
    """``model(x)``, ``model(*x)`` or ``model(**x)`` depending on the type of ``x``."""
    if isinstance(x, Mapping):
        out = model(**x)
    elif isinstance(x, (tuple, list)):
        out = model(*x)
    else:
        out = model(x)
    if not isinstance(out, Tensor):
        raise TypeError(f"model must return a tensor, got {type(out).__name__}")
    return out


def _trainable(model: nn.Module) -> tuple[list[str], list[nn.Parameter]]:
    names, params = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            names.append(name)
            params.append(p)
    return names, params


def _grad(scalar: Tensor, params: list[nn.Parameter]) -> list[Tensor]:
    """∇ of ``scalar`` w.r.t. ``params``; unused parameters get zeros. The graph is retained."""
    if not scalar.requires_grad:
        return [torch.zeros_like(p) for p in params]
    grads = torch.autograd.grad(scalar, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _iter_batches(
    batches: Sequence[Batch], num_samples: int | None, mc_labels: Sequence[Tensor] | None
) -> Iterator[tuple[Any, Tensor, Tensor | None]]:
    """Yield ``(x, y, labels)`` per batch in float64/CPU, stopping after ``num_samples`` samples."""
    seen = 0
    for b, (x, y) in enumerate(batches):
        if num_samples is not None and seen >= num_samples:
            break
        bs = int(y.shape[0])
        take = bs if num_samples is None else min(bs, num_samples - seen)
        lab = None
        if mc_labels is not None:
            if b >= len(mc_labels):
                raise ValueError("mc_labels must hold one tensor per batch")
            lab = _to_double_cpu(mc_labels[b])[:take]
        yield _slice(_to_double_cpu(x), 0, take), _to_double_cpu(y)[:take], lab
        seen += take


def _check_out(out: Tensor, likelihood: str | LogLikelihood) -> None:
    if isinstance(likelihood, str) and out.dim() != 2:
        raise ValueError(f"{likelihood} likelihood expects outputs [B, K], got {tuple(out.shape)}")


# --------------------------------------------------------------------------------------------------
# Fisher
# --------------------------------------------------------------------------------------------------
def reference_fisher(
    model: nn.Module,
    batches: Sequence[Batch],
    *,
    kind: str,
    likelihood: str | LogLikelihood = "categorical",
    mc_samples: int = 1,
    num_samples: int | None = None,
    mc_labels: Sequence[Tensor] | None = None,
) -> dict[str, Tensor]:
    """Diagonal Fisher F = (1/N) Σ_n (∇θ ℓ_n)² by an explicit loop over single samples.

    Args:
        model: any module; a float64 CPU eval-mode deep copy is used.
        batches: list of ``(x, y)`` (see module docstring).
        kind: ``"exact"``, ``"mc"``, ``"empirical"`` or ``"batched"`` (biased seed estimator:
            mean over batches of the squared gradient of the batch-mean NLL).
        likelihood: ``"categorical"`` (logits), ``"gaussian"`` (unit-variance mean) or a callable
            ``(outputs, targets) -> per-sample log-likelihood [B]`` (only with empirical/batched).
        mc_samples: S, number of label draws per sample for ``kind="mc"``; must match ``mc_labels``.
        num_samples: use only the first N samples in loader order (may cut a batch).
        mc_labels: for ``kind="mc"``, one tensor per batch: categorical LongTensor ``[B, S]`` of
            sampled classes, gaussian float ``[B, S, D]`` of noise ε (y = out + ε). ``[B]`` resp.
            ``[B, D]`` is accepted when S = 1.

    Returns:
        ``{name: float64 CPU tensor shaped like the parameter}``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown Fisher kind {kind!r}; expected one of {KINDS}")
    if callable(likelihood):
        if kind not in ("empirical", "batched"):
            raise ValueError(f"a callable likelihood supports only kind='empirical' or 'batched', not {kind!r}")
    elif likelihood not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {likelihood!r}; expected one of {LIKELIHOODS}")
    if num_samples is not None and num_samples <= 0:
        raise ValueError("num_samples must be positive")
    if kind == "mc":
        if mc_labels is None:
            raise ValueError("kind='mc' requires mc_labels")
        if mc_samples < 1:
            raise ValueError("mc_samples must be >= 1")
    elif mc_labels is not None:
        raise ValueError("mc_labels is only meaningful with kind='mc'")

    model = _prepare_model(model)
    names, params = _trainable(model)
    fisher = [torch.zeros_like(p, dtype=torch.float64) for p in params]

    if kind == "batched":
        num_batches = 0
        for x, y, _ in _iter_batches(batches, num_samples, None):
            out = _forward(model, x)
            _check_out(out, likelihood)
            if callable(likelihood):
                nll = -likelihood(out, y).mean()
            elif likelihood == "categorical":
                nll = F.cross_entropy(out, y)
            else:
                nll = (0.5 * (y - out).pow(2).sum(dim=1)).mean()
            for acc, g in zip(fisher, _grad(nll, params)):
                acc += g.pow(2)
            num_batches += 1
        if num_batches == 0:
            raise ValueError("no data")
        return {n: f / num_batches for n, f in zip(names, fisher)}

    n_total = 0
    for x, y, labels in _iter_batches(batches, num_samples, mc_labels):
        for i in range(int(y.shape[0])):
            xi, yi = _slice(x, i, i + 1), y[i : i + 1]
            out = _forward(model, xi)
            _check_out(out, likelihood)
            if out.shape[0] != 1:
                raise ValueError(f"per-sample forward must give batch 1, got {tuple(out.shape)}")
            lab = None if labels is None else labels[i]
            contrib = _sample_fisher(out, yi, lab, params, kind, likelihood, mc_samples)
            for acc, c in zip(fisher, contrib):
                acc += c
            n_total += 1
    if n_total == 0:
        raise ValueError("no data")
    return {n: f / n_total for n, f in zip(names, fisher)}


def _sample_fisher(
    out: Tensor,
    y: Tensor,
    labels: Tensor | None,
    params: list[nn.Parameter],
    kind: str,
    likelihood: str | LogLikelihood,
    mc_samples: int,
) -> list[Tensor]:
    """Contribution F_n of one sample (``out`` has batch size 1)."""
    if callable(likelihood):  # kind == "empirical"
        ll = likelihood(out, y)
        if ll.numel() != 1:
            raise ValueError(f"likelihood must return one value per sample, got {tuple(ll.shape)}")
        return [g.pow(2) for g in _grad(ll.sum(), params)]

    if likelihood == "categorical":
        logp = F.log_softmax(out[0], dim=-1)
        num_classes = logp.shape[0]
        if kind == "empirical":
            return [g.pow(2) for g in _grad(logp[int(y[0])], params)]
        if kind == "exact":
            p = logp.detach().exp()
            acc = [torch.zeros_like(q) for q in params]
            for c in range(num_classes):
                for a, g in zip(acc, _grad(logp[c], params)):
                    a += p[c] * g.pow(2)
            return acc
        # mc: (1/S) Σ_s (∇ log p(c_s))² — grouped by class, identical to the loop over s.
        assert labels is not None
        lab = labels.reshape(-1).long()
        if lab.numel() != mc_samples:
            raise ValueError(f"mc_labels hold {lab.numel()} draws/sample, mc_samples={mc_samples}")
        counts = torch.bincount(lab, minlength=num_classes)
        if counts.numel() > num_classes:
            raise ValueError("mc_labels contain a class index >= number of classes")
        acc = [torch.zeros_like(q) for q in params]
        for c in range(num_classes):
            if counts[c] == 0:
                continue
            w = counts[c].item() / mc_samples
            for a, g in zip(acc, _grad(logp[c], params)):
                a += w * g.pow(2)
        return acc

    # gaussian, unit variance: ℓ = -0.5 ||y - out||², ∇ℓ = J^T (y - out)
    mean = out[0]
    if kind == "empirical":
        ll = -0.5 * (y[0] - mean).pow(2).sum()
        return [g.pow(2) for g in _grad(ll, params)]
    jac = [_grad(mean[d], params) for d in range(mean.shape[0])]  # jac[d][k] = ∇_k out_d
    if kind == "exact":
        # E_{ε~N(0,I)} (J^T ε)² = Σ_d (∇ out_d)²
        return [torch.stack([jd[k] for jd in jac]).pow(2).sum(0) for k in range(len(params))]
    # mc: ∇(ε · out) = J^T ε for each draw ε_s
    assert labels is not None
    eps = labels.reshape(-1, mean.shape[0]).double()
    if eps.shape[0] != mc_samples:
        raise ValueError(f"mc_labels hold {eps.shape[0]} draws/sample, mc_samples={mc_samples}")
    result = []
    for k in range(len(params)):
        jk = torch.stack([jac[d][k] for d in range(len(jac))])  # [D, *shape]
        gs = torch.tensordot(eps, jk, dims=1)  # [S, *shape]
        result.append(gs.pow(2).mean(dim=0))
    return result


def seed_batched_fisher(model: nn.Module, batches: Sequence[Batch]) -> dict[str, Tensor]:
    """The seed article's procedure, literally: per batch ``zero_grad``,
    ``cross_entropy(...).backward()``, accumulate ``p.grad ** 2``; divide by the number of batches.
    Categorical likelihood, data labels.

    Runs on a float64 CPU eval-mode deep copy (as the article calls ``model.eval()``)."""
    model = _prepare_model(model)
    fisher = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    count = 0
    for x, y in batches:
        x, y = _to_double_cpu(x), _to_double_cpu(y)
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(_forward(model, x), y)
        loss.backward()
        for n, p in model.named_parameters():
            if n in fisher and p.grad is not None:
                fisher[n] += p.grad.detach() ** 2
        count += 1
    if count == 0:
        raise ValueError("no data")
    return {n: f / count for n, f in fisher.items()}


def draw_mc_labels(
    model: nn.Module,
    batches: Sequence[Batch],
    *,
    likelihood: str = "categorical",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """Draw ``mc_labels`` for :func:`reference_fisher` (kind="mc") from the model's predictive.

    categorical: LongTensor ``[B, S]`` sampled from softmax(logits) (float64, eval mode);
    gaussian: float64 ``[B, S, D]`` standard normal noise ε."""
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {likelihood!r}")
    model = _prepare_model(model)
    labels = []
    with torch.no_grad():
        for x, _ in batches:
            out = _forward(model, _to_double_cpu(x))
            if likelihood == "categorical":
                probs = F.softmax(out, dim=-1)
                draws = torch.multinomial(probs, mc_samples, replacement=True, generator=generator)
                labels.append(draws)
            else:
                b, d = out.shape
                eps = torch.randn(b, mc_samples, d, dtype=torch.float64, generator=generator)
                labels.append(eps)
    return labels


# --------------------------------------------------------------------------------------------------
# penalty and comparison
# --------------------------------------------------------------------------------------------------
def naive_penalty(model: nn.Module, star: Mapping[str, Tensor], fisher: Mapping[str, Tensor], lam: float) -> Tensor:
    """(λ/2) Σ_i F_i (θ_i − θ*_i)² with ordinary torch ops, autograd-connected to ``model``.

    Only parameters whose name is in ``fisher`` count. Computed in float64 on the parameters'
    device; its gradient w.r.t. θ is λ F (θ − θ*)."""
    total: Tensor | None = None
    for name, p in model.named_parameters():
        if name not in fisher:
            continue
        f = fisher[name].to(device=p.device, dtype=torch.float64)
        s = star[name].to(device=p.device, dtype=torch.float64)
        term = (f * (p.double() - s).pow(2)).sum()
        total = term if total is None else total + term
    if total is None:
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        total = torch.zeros((), dtype=torch.float64, device=dev)
    return 0.5 * lam * total


def relative_error(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """sqrt(Σ_k ||a_k − b_k||²) / sqrt(Σ_k ||b_k||²) over all keys jointly, in float64 on CPU.

    ``b`` is the reference. Raises ``ValueError`` if the key sets or a shape differ.
    Returns 0.0 when both are all zero, ``inf`` when only ``b`` is."""
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise ValueError(f"key sets differ: only in a {only_a}, only in b {only_b}")
    num = 0.0
    den = 0.0
    for k in b:
        ak = a[k].detach().to("cpu", torch.float64)
        bk = b[k].detach().to("cpu", torch.float64)
        if ak.shape != bk.shape:
            raise ValueError(f"shape mismatch for {k!r}: {tuple(ak.shape)} vs {tuple(bk.shape)}")
        num += float((ak - bk).pow(2).sum())
        den += float(bk.pow(2).sum())
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num) / math.sqrt(den)
