"""The exact per-sample fallback for parameters no rule covers (custom modules with raw
parameters, cross-attention, recurrent layers the unrolling refuses, ...): ``torch.func``
``vmap`` of ``jacrev`` over samples, or, when the model cannot be vmapped, one forward/backward
per sample through the native engine."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from .. import _core
from .batches import call_model, take, unsqueeze
from .options import FisherOptions
from .recording import RuleCoverage

#: ``EWC_RS_VMAP_FALLBACK=0`` takes the one-sample-at-a-time path even where ``vmap`` would run
#: (the tests exercise it so; read when an estimation starts).
VMAP_VAR = "EWC_RS_VMAP_FALLBACK"


@dataclass
class Fallback:
    """The fallback of one estimation: the model, which slots it serves (``coverage.fallback``),
    the options, and the sums it adds into."""

    model: nn.Module
    coverage: RuleCoverage
    options: FisherOptions
    sums: _core.FisherSums
    budget: int

    def step(self, x: Any, y: Any, n: int, mc: Optional[torch.Tensor]) -> None:
        """Exact per-sample squared gradients of the parameters without a rule, added to the sums.

        First choice: ``torch.func`` (``vmap`` over samples of ``jacrev`` of the per-sample
        terms), one vectorised pass. If the model cannot be vmapped (some RNN kernels,
        data-dependent control flow), it falls back for good to one forward/backward per sample
        through the native engine. Both are exact; a parameter shared with rule layers is
        entirely computed here.
        """
        cov = self.coverage
        slots = sorted(cov.fallback)
        if os.environ.get(VMAP_VAR, "1") != "0" and cov.vmap_ok is not False:
            try:
                with warnings.catch_warnings():
                    # functorch's note that an op runs through its slower per-sample loop: still exact.
                    warnings.filterwarnings("ignore", message="There is a performance drop")
                    sums = self._vmap_sq_grads((x, y, mc), n, slots)
            except Exception:
                if cov.vmap_ok:
                    raise  # vmap worked on earlier batches: this is a real error
                cov.vmap_ok = False
            else:
                cov.vmap_ok = True
                for s, t in zip(slots, sums):
                    self.sums.add(s, t)
                return
        for i in range(n):
            sl = slice(i, i + 1)
            xi, yi = take(x, sl), take(y, sl)
            out_i, yi = self.options.prepare(call_model(self.model, xi), yi)
            mc_i = None if mc is None else mc[sl]
            self.sums.add_batch(out_i, self.options.roots(out_i, yi, mc_draws=mc_i), whole_slots=slots)

    def _vmap_sq_grads(
        self, batch: tuple[Any, Any, Optional[torch.Tensor]], n: int, slots: list[int]
    ) -> list[torch.Tensor]:
        """Σ over the batch's samples of each fallback parameter's squared per-sample gradients
        (summed over the roots), by ``vmap(jacrev(...))`` in chunks that fit the memory budget."""
        x, y, mc = batch
        cov, options, model = self.coverage, self.options, self.model
        names = [cov.names[s] for s in slots]
        theta = {nm: cov.params[s].detach() for nm, s in zip(names, slots)}

        def per_sample(th: dict, xn: Any, yn: Any, mcn: Optional[torch.Tensor]) -> torch.Tensor:
            xb = unsqueeze(xn)  # each sample as a batch of one inside the vmapped function
            yb = None if yn is None else unsqueeze(yn)
            out, yb = options.prepare(_functional_forward(functional_call, model, th, xb), yb, check=False)
            return _terms(out, yb, mcn, options)

        in_dims = (None, 0, None if y is None else 0, None if mc is None else 0)
        fn = vmap(jacrev(per_sample), in_dims=in_dims)
        per_sample_elems = sum(t.numel() for t in theta.values()) * (_roots_per_sample(options, mc) + 1)
        chunk = max(1, min(n, self.budget // max(1, 4 * per_sample_elems)))
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


def _terms(out: torch.Tensor, y: Any, mc: Optional[torch.Tensor], options: FisherOptions) -> torch.Tensor:
    """The roots of the native engine (``src/fisher/roots/``) for a batch of one sample, as a vector
    (``out`` and ``y`` as ``FisherOptions.prepare`` leaves them)."""
    kind = options.kind
    if options.loglik_fn is not None:
        return out.reshape(1)  # `prepare` computed the log-likelihood
    if options.likelihood == "gaussian":
        f = out.float().reshape(-1)
        if kind == "empirical":
            return (-0.5 * (y.float().reshape(-1) - f).square().sum()).reshape(1)
        if kind == "exact":
            return f
        assert mc is not None
        eps = mc.float().reshape(-1, f.numel())
        return (eps @ f) / eps.shape[0] ** 0.5
    if out.dim() == 3:
        return _position_terms(out, y, mc, options)
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


def _position_terms(out: torch.Tensor, y: Any, mc: Optional[torch.Tensor], options: FisherOptions) -> torch.Tensor:
    """``_terms`` for logits ``[1, P, C]`` (``src/fisher/roots/sequence.rs``): positions whose target
    is ``ignore_index`` left out."""
    logp = torch.log_softmax(out.float(), dim=-1)[0]  # [P, C]
    mask = torch.ones(logp.shape[0], device=logp.device) if y is None else (y[0] != options.ignore_index).float()
    if options.kind == "empirical":
        labels = y[0].long().clamp_min(0).unsqueeze(1)
        return (logp.gather(1, labels).squeeze(1) * mask).sum().reshape(1)
    if options.kind == "exact":
        return (logp * logp.detach().exp().sqrt() * mask.unsqueeze(1)).reshape(-1)
    assert mc is not None
    draws = mc.reshape(logp.shape[0], -1).long()  # [P, S]
    return (logp.gather(1, draws) * mask.unsqueeze(1)).sum(0) / draws.shape[1] ** 0.5


def _roots_per_sample(options: FisherOptions, mc: Optional[torch.Tensor]) -> int:
    """Rough number of terms per sample (for chunking the vmapped Jacobians)."""
    if options.kind == "mc" and mc is not None:
        return int(mc.shape[-1])
    if options.kind == "exact":
        return 1000 if options.likelihood == "categorical" else 100
    return 1


def _functional_forward(functional_call: Callable[..., Any], model: nn.Module, th: dict, x: Any) -> Any:
    if isinstance(x, dict):
        out = functional_call(model, th, (), x, strict=False)
    elif isinstance(x, (tuple, list)):
        out = functional_call(model, th, tuple(x), strict=False)
    else:
        out = functional_call(model, th, (x,), strict=False)
    return out
