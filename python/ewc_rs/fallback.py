"""The exact per-sample fallback for parameters no rule covers (custom modules with raw
parameters, RNNs, cross-attention, ...): ``torch.func`` ``vmap`` of ``jacrev`` over samples, or,
when the model cannot be vmapped, one forward/backward per sample through the Rust driver."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from . import _core
from .batches import LikelihoodFn, call_model, check_outputs, loglik, take, unsqueeze
from .recording import Plan

#: Tests set this to False to exercise the one-sample-at-a-time fallback.
USE_VMAP_FALLBACK = True


def fallback_step(model: nn.Module, x: Any, y: Any, n: int, lik: str, likelihood: Union[str, LikelihoodFn],
                   kind: str, mc: Optional[torch.Tensor], plan: Plan, accs: list[torch.Tensor], budget: int) -> None:
    """Exact per-sample squared gradients of the parameters without a rule.

    First choice: ``torch.func`` (``vmap`` over samples of ``jacrev`` of the per-sample terms),
    one vectorised pass. If the model cannot be vmapped (some RNN kernels, data-dependent
    control flow), it falls back for good to one forward/backward per sample through the Rust
    driver. Both are exact; a parameter shared with rule layers is entirely computed here.
    """
    slots = sorted(plan.fallback)
    if USE_VMAP_FALLBACK and plan.vmap_ok is not False:
        try:
            with warnings.catch_warnings():
                # functorch's note that an op runs through its slower per-sample loop: still exact.
                warnings.filterwarnings("ignore", message="There is a performance drop")
                sums = _vmap_sq_grads(model, x, y, n, lik, likelihood, kind, mc, plan, slots, budget)
        except Exception:
            if plan.vmap_ok:
                raise  # vmap worked on earlier batches: this is a real error
            plan.vmap_ok = False
        else:
            plan.vmap_ok = True
            for s, t in zip(slots, sums):
                accs[s].add_(t.to(accs[s].device))
            return
    direct = [(plan.params[s], s) for s in slots]
    for i in range(n):
        sl = slice(i, i + 1)
        xi, yi = take(x, sl), take(y, sl)
        out_i = check_outputs(call_model(model, xi))
        _core.fisher_accumulate(out_i, yi, kind, lik, None if mc is None else mc[sl],
                                loglik(likelihood, out_i, yi), [], direct, accs, plan.names, budget)


def _terms(out: torch.Tensor, y: Any, mc: Optional[torch.Tensor], lik: str,
           likelihood: Union[str, LikelihoodFn], kind: str) -> torch.Tensor:
    """The roots of the Rust driver (``src/fisher/roots.rs``) for a batch of one sample, as a vector."""
    if lik == "custom":
        return likelihood(out, y).reshape(1)  # type: ignore[operator]
    if lik == "categorical":
        logp = torch.log_softmax(out.float(), dim=-1).reshape(-1)
        if kind == "empirical":
            return logp.gather(0, y.reshape(1).long())  # gather, not indexing: vmap cannot .item()
        if kind == "exact":
            return logp * logp.detach().exp().sqrt()
        assert mc is not None
        draws = mc.reshape(-1).long()
        if draws.numel() > logp.numel():  # more draws than classes: group them by class (as in Rust)
            counts = (draws.unsqueeze(1) == torch.arange(logp.numel(), device=draws.device)).sum(0)
            return logp * (counts.float() / draws.numel()).sqrt()
        return logp.gather(0, draws) / draws.numel() ** 0.5
    f = out.float().reshape(-1)
    if kind == "empirical":
        return (-0.5 * (y.float().reshape(-1) - f).square().sum()).reshape(1)
    if kind == "exact":
        return f
    assert mc is not None
    eps = mc.float().reshape(-1, f.numel())
    return (eps @ f) / eps.shape[0] ** 0.5


def _vmap_sq_grads(model: nn.Module, x: Any, y: Any, n: int, lik: str, likelihood: Union[str, LikelihoodFn],
                   kind: str, mc: Optional[torch.Tensor], plan: Plan, slots: list[int], budget: int) -> list[torch.Tensor]:
    from torch.func import functional_call, jacrev, vmap

    names = [plan.names[s] for s in slots]
    theta = {nm: plan.params[s].detach() for nm, s in zip(names, slots)}

    def per_sample(th: dict, xn: Any, yn: Any, mcn: Optional[torch.Tensor]) -> torch.Tensor:
        xb = unsqueeze(xn)  # each sample as a batch of one inside the vmapped function
        out = check_outputs(_functional_forward(functional_call, model, th, xb))
        yb = None if yn is None else unsqueeze(yn)
        return _terms(out, yb, mcn, lik, likelihood, kind)

    in_dims = (None, 0, None if y is None else 0, None if mc is None else 0)
    fn = vmap(jacrev(per_sample), in_dims=in_dims)
    per_sample_elems = sum(t.numel() for t in theta.values()) * (plan_roots(kind, lik, mc, y) + 1)
    chunk = max(1, min(n, budget // max(1, 4 * per_sample_elems)))
    sums = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in theta.values()]
    for start in range(0, n, chunk):
        sl = slice(start, start + chunk)
        # no_grad: jacrev still differentiates w.r.t. theta, but the other parameters (rule
        # layers, requires_grad) must not tie the Fisher to an autograd graph.
        with torch.no_grad():
            jac = fn(theta, take(x, sl), take(y, sl), None if mc is None else mc[sl])
        for i, nm in enumerate(names):
            sums[i] += jac[nm].float().square().sum(dim=(0, 1))
    return sums


def plan_roots(kind: str, lik: str, mc: Optional[torch.Tensor], y: Any) -> int:
    """Rough number of terms per sample (for chunking the vmapped Jacobians)."""
    if kind == "mc" and mc is not None:
        return int(mc.shape[1])
    if kind == "exact":
        return 1000 if lik == "categorical" else 100
    return 1


def _functional_forward(functional_call: Callable[..., Any], model: nn.Module, th: dict, x: Any) -> Any:
    if isinstance(x, dict):
        return functional_call(model, th, (), x, strict=False)
    if isinstance(x, (tuple, list)):
        return functional_call(model, th, tuple(x), strict=False)
    return functional_call(model, th, (x,), strict=False)
