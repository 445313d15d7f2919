"""Diagonal Fisher information of any ``torch.nn.Module``.

Definitions (van de Ven 2025 names): per-sample log-likelihood ℓ_n(θ) = log p(y_n | x_n, θ);
diagonal Fisher F = (1/N) Σ_n (∇θ ℓ_n)², the mean of squared **per-sample** gradients.

This module is the Python half of the engine: it records layer calls with forward hooks, moves
batches to the model's device, samples labels for ``mc`` and handles the exact per-sample fallback
for modules without a rule. The maths (likelihood roots, backward passes, per-layer rules,
accumulation) runs in Rust, ``ewc_rs._core``, with the GIL released.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
from torch import nn

from . import _core
from .attention import Decomposed
from .attention import eligible as attention_eligible
from .layers import RuleSpec, rule_for

KINDS = ("exact", "mc", "empirical", "batched")
LIKELIHOODS = ("categorical", "gaussian")

#: A callable likelihood: ``(outputs, targets) -> per-sample log-likelihood [N]``.
LikelihoodFn = Callable[[Any, Any], torch.Tensor]

#: Rules whose check against autograd differs by more than this use the fallback instead.
_MISMATCH_TOL = 1e-3


def _budget_bytes() -> int:
    """Bound on per-sample intermediates (``EWC_RS_CHUNK_MB``, default 256 MiB)."""
    return int(float(os.environ.get("EWC_RS_CHUNK_MB", "256")) * 2**20)


@dataclass
class _Site:
    """A module with a rule, and the accumulator slots of its weight and bias."""

    module: nn.Module
    spec: RuleSpec
    slots: list[Optional[int]]


@dataclass
class _Plan:
    names: list[str]
    params: list[torch.Tensor]
    sites: list[_Site]
    fallback: set[int] = field(default_factory=set)
    #: Whether ``torch.func.vmap`` handles the fallback for this model (None: not tried yet).
    vmap_ok: Optional[bool] = None
    #: Attention layers whose projections run through Linear proxies while recording.
    attention: list[Decomposed] = field(default_factory=list)

    def drop_from_rules(self, slots: Iterable[int]) -> None:
        """Sends ``slots`` to the exact per-sample fallback."""
        for s in slots:
            self.fallback.add(s)
            for site in self.sites:
                site.slots = [None if x == s else x for x in site.slots]


def _plan(model: nn.Module) -> _Plan:
    """Assigns each trainable parameter a slot and decides rule or fallback for it.

    A parameter gets the rule path only if every module that owns it has a rule; otherwise (a
    custom module with raw parameters, an RNN, cross-attention, ...) it goes to the exact fallback;
    self-attention layers go through `attention.Decomposed` (two Linear proxies).
    """
    names: list[str] = []
    params: list[torch.Tensor] = []
    slot_of: dict[int, int] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            slot_of[id(p)] = len(params)
            names.append(name)
            params.append(p)
    plan = _Plan(names, params, [])

    def to_fallback(ps: list[torch.Tensor]) -> None:
        plan.drop_from_rules(slot_of[id(p)] for p in ps if id(p) in slot_of)

    plan.attention = [Decomposed(m, to_fallback) for m in model.modules() if attention_eligible(m)]
    covered = {id(p) for a in plan.attention for p in a.parameters()}
    for module in model.modules():
        own = [(k, p) for k, p in module._parameters.items()
               if p is not None and id(p) in slot_of and id(p) not in covered]
        if not own:
            continue
        spec = rule_for(module)
        if spec is None or any(k not in ("weight", "bias") for k, _ in own):
            plan.fallback.update(slot_of[id(p)] for _, p in own)
            continue
        slots: list[Optional[int]] = [None, None]
        for k, p in own:
            slots[0 if k == "weight" else 1] = slot_of[id(p)]
        plan.sites.append(_Site(module, spec, slots))
    for a in plan.attention:
        for proxy in (a.in_proj, a.out_proj):
            bias = proxy.bias
            pslots = [slot_of.get(id(proxy.weight)), None if bias is None else slot_of.get(id(bias))]
            plan.sites.append(_Site(proxy, ("linear", [], [], []), pslots))
    plan.drop_from_rules(set(plan.fallback))
    plan.sites = [s for s in plan.sites if any(x is not None for x in s.slots)]
    return plan


class _Recorder:
    """Forward hooks that record (site, input, output) for every call of a module with a rule."""

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan
        self.enabled = False
        self.clone_outputs = False  # set when an in-place op modified a recorded output
        self.calls: list[tuple[_Site, torch.Tensor, torch.Tensor, int]] = []
        self.handles = [
            s.module.register_forward_hook(self._hook(s), with_kwargs=True) for s in plan.sites
        ]
        for a in plan.attention:
            a.install()

    def _hook(self, site: _Site) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if not self.enabled:
                return None
            inp = args[0] if args else kwargs.get("input")
            if not isinstance(inp, torch.Tensor) or not isinstance(output, torch.Tensor):
                self.calls.append((site, torch.empty(0), torch.empty(0), -1))
                return None
            if not output.requires_grad:
                return None
            self.calls.append((site, inp.detach(), output, output._version))
            # Returning a copy keeps later in-place ops (ReLU(inplace=True)) off the recorded output.
            return output.clone() if self.clone_outputs else None

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for a in self.plan.attention:
            a.remove()


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the estimation (BatchNorm uses running statistics, dropout is off); every
    submodule's own ``training`` flag is restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _take(x: Any, sl: slice) -> Any:
    """Rows ``sl`` of a batch element (tensor, tuple/list or dict of tensors)."""
    if isinstance(x, torch.Tensor):
        return x[sl]
    if isinstance(x, (tuple, list)):
        return type(x)(_take(v, sl) for v in x)
    if isinstance(x, dict):
        return {k: _take(v, sl) for k, v in x.items()}
    return x


def _forward(model: nn.Module, x: Any) -> Any:
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def _batch_size(x: Any, index: int) -> int:
    if isinstance(x, torch.Tensor):
        if x.dim() == 0:
            raise ValueError(f"loader: batch {index}: inputs are a 0-d tensor; expected a batch dimension")
        return int(x.shape[0])
    items = list(x.values()) if isinstance(x, dict) else list(x) if isinstance(x, (tuple, list)) else []
    for v in items:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise ValueError(
        f"loader: batch {index}: inputs must be a tensor, or a tuple/list/dict holding tensors; "
        f"got {type(x).__name__}"
    )


def _unpack(batch: Any, index: int) -> tuple[Any, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        what = f"a {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        raise ValueError(f"loader: batch {index} must be a pair (inputs, targets), got {what}")
    return batch[0], batch[1]


def _validate(kind: str, likelihood: Union[str, LikelihoodFn], mc_samples: int, num_samples: Optional[int]) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {', '.join(map(repr, KINDS))}; got {kind!r}")
    if callable(likelihood):
        if kind in ("exact", "mc"):
            raise ValueError(
                f"kind={kind!r} needs the model's predictive distribution, which a callable likelihood "
                "does not define; use kind='empirical' or kind='batched' with a callable likelihood"
            )
        lik = "custom"
    elif likelihood in LIKELIHOODS:
        lik = str(likelihood)
    else:
        raise ValueError(f"likelihood: expected 'categorical', 'gaussian' or a callable; got {likelihood!r}")
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples: expected a positive integer, got {mc_samples!r}")
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1):
        raise ValueError(f"num_samples: expected None or a positive integer, got {num_samples!r}")
    return lik


def _draw_mc(outputs: torch.Tensor, lik: str, samples: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Labels ``[N, S]`` drawn from p(·|x) (categorical) or noise ``[N, S, D]`` (gaussian)."""
    out = outputs.detach().float()
    # Checked here because torch.multinomial would fail first, with a message naming neither.
    if lik == "categorical" and out.dim() != 2:
        raise ValueError(
            f"model outputs: likelihood 'categorical' expects logits of shape [N, C], got {list(out.shape)}"
        )
    if not torch.isfinite(out).all():
        raise ValueError(
            "model outputs: non-finite values (NaN or inf), so kind='mc' cannot draw labels from "
            "them: check the model's outputs and the data for NaN/inf"
        )
    gen_device = generator.device if generator is not None else out.device
    if lik == "categorical":
        probs = torch.softmax(out, dim=1).to(gen_device)
        draws = torch.multinomial(probs, samples, replacement=True, generator=generator)
    else:
        out2 = out.reshape(out.shape[0], -1)
        draws = torch.randn(out2.shape[0], samples, out2.shape[1], generator=generator, device=gen_device)
    return draws.to(out.device)


def fisher_diag(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    kind: str = "exact",
    likelihood: Union[str, LikelihoodFn] = "categorical",
    mc_samples: int = 1,
    num_samples: Optional[int] = None,
    progress: bool = False,
    generator: Optional[torch.Generator] = None,
) -> dict[str, torch.Tensor]:
    """Estimates the diagonal Fisher information of ``model`` on the data in ``loader``.

    F = (1/N) Σ_n (∇θ log p(y_n | x_n, θ))², the mean of squared per-sample gradients, with
    y_n chosen by ``kind``:

    - ``"exact"``: the expectation over the model's predictive distribution,
      F = (1/N) Σ_n Σ_c p(c|x_n) (∇ log p(c|x_n))² (one backward pass per class).
    - ``"mc"``: y_n sampled from p(·|x_n), averaged over ``mc_samples`` draws.
    - ``"empirical"``: y_n = the data's label.
    - ``"batched"``: the seed article's estimator: the square of each batch-mean gradient,
      averaged over batches. Biased: it is about 1/batch_size of the Fisher, and gradients of
      opposite sign cancel inside a batch. Kept only to reproduce the article.

    The model runs in eval mode (BatchNorm uses its running statistics, dropout is off) and every
    submodule's mode is restored afterwards; ``.grad`` of the parameters is not touched.
    Parameters of layers with a rule (Linear, Conv1d/2d, BatchNorm1d/2d, LayerNorm, GroupNorm,
    Embedding) are computed in one backward pass per root; any other parameter (custom modules,
    RNNs, attention, parameters used outside their module) by an exact per-sample pass.

    Args:
        model: any module whose log-likelihood is a sum of per-sample terms.
        loader: iterable of ``(inputs, targets)``; inputs a tensor (``model(x)``), a tuple/list
            (``model(*x)``) or a dict (``model(**x)``). Moved to the model's device.
        kind: ``"exact"``, ``"mc"``, ``"empirical"`` or ``"batched"``.
        likelihood: ``"categorical"`` (outputs are logits ``[N, C]``, targets class indices),
            ``"gaussian"`` (outputs ``[N, D]``, unit variance) or a callable
            ``(outputs, targets) -> [N]`` per-sample log-likelihood (``empirical``/``batched`` only).
        mc_samples: draws per sample for ``kind="mc"``.
        num_samples: use at most this many samples (the last batch is cut).
        progress: show a tqdm bar with samples/s.
        generator: random generator for ``kind="mc"`` (reproducible draws).

    Returns:
        ``{name: F}`` for every parameter that requires grad (names of
        ``model.named_parameters()``), float32, with the parameter's shape and device.

    Raises:
        ValueError: unknown kind or likelihood, empty loader, malformed batch, outputs or targets
            that do not fit the likelihood, labels out of range, non-finite results.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    lik = _validate(kind, likelihood, mc_samples, num_samples)
    plan = _plan(model)
    if not plan.params:
        raise ValueError("model: no parameter requires grad, so there is no Fisher to estimate")
    device = plan.params[0].device
    accs = [torch.zeros(p.shape, dtype=torch.float32, device=device if p.device == device else p.device) for p in plan.params]
    grads_before = [p.grad for p in plan.params]
    budget = _budget_bytes()
    bar = None
    if progress:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]

        bar = tqdm(total=num_samples, unit="sample", desc=f"Fisher ({kind})")

    recorder = _Recorder(plan) if kind != "batched" else None
    seen = batches = 0
    checked = False
    try:
        with _eval_mode(model), torch.enable_grad():
            for index, batch in enumerate(loader):
                if num_samples is not None and seen >= num_samples:
                    break
                x, y = _unpack(batch, index)
                n = _batch_size(x, index)
                if num_samples is not None and seen + n > num_samples:
                    n = num_samples - seen
                    x, y = _take(x, slice(0, n)), _take(y, slice(0, n))
                if n == 0:
                    continue
                x, y = _to(x, device), _to(y, device)
                if recorder is None:
                    _batched_step(model, x, y, lik, likelihood, plan, accs)
                else:
                    checked = _rules_step(model, x, y, n, lik, likelihood, kind, mc_samples, generator,
                                          plan, recorder, accs, budget, checked)
                seen += n
                batches += 1
                if bar is not None:
                    bar.update(n)
    finally:
        if recorder is not None:
            recorder.remove()
        if bar is not None:
            bar.close()
        for p, g in zip(plan.params, grads_before):
            p.grad = g

    if batches == 0:
        raise ValueError("loader: produced no batches (an empty loader has no Fisher)")
    count = batches if kind == "batched" else seen
    result = {}
    for name, acc in zip(plan.names, accs):
        f = acc / count
        if not torch.isfinite(f).all():
            raise ValueError(
                f"Fisher of parameter '{name}' has non-finite values (NaN or inf): check the model's "
                "outputs and the data for NaN/inf"
            )
        result[name] = f
    return result


def _loglik(likelihood: Union[str, LikelihoodFn], out: Any, y: Any) -> Optional[torch.Tensor]:
    if not callable(likelihood):
        return None
    ll = likelihood(out, y)
    if not isinstance(ll, torch.Tensor):
        raise TypeError(f"likelihood: the callable must return a tensor [N], got {type(ll).__name__}")
    return ll


def _check_outputs(out: Any) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise ValueError(
            f"model outputs: expected a tensor, got {type(out).__name__}; wrap the model so that it "
            "returns the logits (categorical) or predictions (gaussian)"
        )
    return out


def _batched_step(model: nn.Module, x: Any, y: Any, lik: str, likelihood: Union[str, LikelihoodFn],
                  plan: _Plan, accs: list[torch.Tensor]) -> None:
    out = _check_outputs(_forward(model, x))
    direct = list(zip(plan.params, range(len(plan.params))))
    _core.fisher_accumulate(out, y, "batched", lik, None, _loglik(likelihood, out, y), [],
                            direct, accs, plan.names, 0)


def _not_per_sample(out: torch.Tensor, calls: list[tuple[_Site, torch.Tensor, torch.Tensor, int]],
                    n: int) -> set[int]:
    """Slots of layer calls whose output rows are not the batch's samples.

    The rules read row i of a layer's input and output as sample i. A layout where dim 0 is
    something else of the same length (sequence-first ``[T, N, F]`` with T == N, as inside
    ``nn.TransformerEncoderLayer(batch_first=False)``) passes the shape test, and the summed
    gradients still agree, so it is caught here: sample 0's output may depend on row 0 only.
    """
    if n < 2 or out.dim() == 0 or out.shape[0] != n:
        return set()
    sel = [(site, o) for site, inp, o, v in calls
           if v >= 0 and inp.shape[:1] == (n,) and any(s is not None for s in site.slots)]
    if not sel:
        return set()
    row = out[0].reshape(-1).float()
    # Unequal weights: a row sum can be constant (centred logits), a weighted sum is not.
    probe = (row * torch.linspace(1.0, 2.0, row.numel(), device=row.device)).sum()
    grads = torch.autograd.grad(probe, [o for _, o in sel], retain_graph=True, allow_unused=True)
    return {s for (site, _), g in zip(sel, grads)
            if g is not None and bool(torch.count_nonzero(g[1:]) > 0)
            for s in site.slots if s is not None}


#: Samples of the first batch that the once-per-estimation rule checks run on: enough for every
#: use of a parameter to show up, few enough to cost little next to the estimation itself.
_CHECK_SAMPLES = 16


def _recorded_forward(model: nn.Module, x: Any, recorder: _Recorder) -> torch.Tensor:
    """Forward pass with the layer calls recorded (as copies if an in-place op touched one)."""
    while True:
        recorder.calls = []
        recorder.enabled = True
        for a in recorder.plan.attention:
            a.recording = True
        try:
            out = _check_outputs(_forward(model, x))
        finally:
            recorder.enabled = False
            for a in recorder.plan.attention:
                a.recording = False
        modified = any(v >= 0 and o._version != v for _, _, o, v in recorder.calls)
        if modified and not recorder.clone_outputs:
            recorder.clone_outputs = True  # an in-place op touched a recorded output: record copies
            continue
        return out


def _drop_uninterpretable(plan: _Plan, recorder: _Recorder, n: int) -> None:
    """Calls the rules cannot interpret (non-tensor input, batch not in dim 0) go to the fallback."""
    bad = {s for site, inp, _, v in recorder.calls if v < 0 or inp.shape[:1] != (n,)
           for s in site.slots if s is not None}
    if bad:
        plan.drop_from_rules(bad)


def _captures(recorder: _Recorder) -> list[tuple]:
    return [(site.spec[0], inp, o, site.slots[0], site.slots[1], list(site.spec[1]),
             list(site.spec[2]), list(site.spec[3]))
            for site, inp, o, v in recorder.calls
            if v >= 0 and any(s is not None for s in site.slots)]


def _check_rules(model: nn.Module, x: Any, y: Any, n: int, kind: str, lik: str,
                 likelihood: Union[str, LikelihoodFn], plan: _Plan, recorder: _Recorder, budget: int) -> None:
    """Once per estimation, on the first samples of the first batch: hands to the fallback every
    parameter whose rule would be wrong, i.e. where dim 0 of a recorded call is not the sample
    index, or where the parameter is also used outside the layer that owns it."""
    k = min(n, _CHECK_SAMPLES)
    sliceable = all(isinstance(v, (torch.Tensor, tuple, list, dict)) for v in (x, y))
    if k < n and sliceable:
        x, y, n = _take(x, slice(0, k)), _take(y, slice(0, k)), k
    out = _recorded_forward(model, x, recorder)
    if not recorder.calls:
        return
    _drop_uninterpretable(plan, recorder, n)
    plan.drop_from_rules(_not_per_sample(out, recorder.calls, n))
    # Any root serves the comparison; `exact` needs no random draws (mc's generator stays untouched).
    check_kind = "exact" if kind == "mc" else kind
    rule_slots = sorted({s for site, *_ in recorder.calls for s in site.slots if s is not None})
    pairs = [(s, plan.params[s]) for s in rule_slots]
    mism = _core.fisher_rule_mismatch(out, y, check_kind, lik, None, _loglik(likelihood, out, y),
                                      _captures(recorder), pairs, budget)
    plan.drop_from_rules(s for s, err in mism if err > _MISMATCH_TOL)


def _rules_step(model: nn.Module, x: Any, y: Any, n: int, lik: str, likelihood: Union[str, LikelihoodFn],
                kind: str, mc_samples: int, generator: Optional[torch.Generator], plan: _Plan,
                recorder: _Recorder, accs: list[torch.Tensor], budget: int, checked: bool) -> bool:
    """One batch through the rules, then the fallback parameters sample by sample."""
    if not checked:
        _check_rules(model, x, y, n, kind, lik, likelihood, plan, recorder, budget)
        checked = True
    out = _recorded_forward(model, x, recorder)
    _drop_uninterpretable(plan, recorder, n)
    mc = _draw_mc(out, lik, mc_samples, generator) if kind == "mc" else None
    ll = _loglik(likelihood, out, y)
    _core.fisher_accumulate(out, y, kind, lik, mc, ll, _captures(recorder), [], accs, plan.names, budget)

    if plan.fallback:
        _fallback_step(model, x, y, n, lik, likelihood, kind, mc, plan, accs, budget)
    return checked


#: Tests set this to False to exercise the one-sample-at-a-time fallback.
USE_VMAP_FALLBACK = True


def _fallback_step(model: nn.Module, x: Any, y: Any, n: int, lik: str, likelihood: Union[str, LikelihoodFn],
                   kind: str, mc: Optional[torch.Tensor], plan: _Plan, accs: list[torch.Tensor], budget: int) -> None:
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
        xi, yi = _take(x, sl), _take(y, sl)
        out_i = _check_outputs(_forward(model, xi))
        _core.fisher_accumulate(out_i, yi, kind, lik, None if mc is None else mc[sl],
                                _loglik(likelihood, out_i, yi), [], direct, accs, plan.names, budget)


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
        return logp.gather(0, mc.reshape(-1).long()) / mc.numel() ** 0.5
    f = out.float().reshape(-1)
    if kind == "empirical":
        return (-0.5 * (y.float().reshape(-1) - f).square().sum()).reshape(1)
    if kind == "exact":
        return f
    assert mc is not None
    eps = mc.float().reshape(-1, f.numel())
    return (eps @ f) / eps.shape[0] ** 0.5


def _vmap_sq_grads(model: nn.Module, x: Any, y: Any, n: int, lik: str, likelihood: Union[str, LikelihoodFn],
                   kind: str, mc: Optional[torch.Tensor], plan: _Plan, slots: list[int], budget: int) -> list[torch.Tensor]:
    from torch.func import functional_call, jacrev, vmap

    names = [plan.names[s] for s in slots]
    theta = {nm: plan.params[s].detach() for nm, s in zip(names, slots)}
    unsqueeze = slice(None)  # rows are re-batched to size 1 inside the vmapped function

    def per_sample(th: dict, xn: Any, yn: Any, mcn: Optional[torch.Tensor]) -> torch.Tensor:
        xb = _take(_unsqueeze(xn), unsqueeze)
        out = _check_outputs(_functional_forward(functional_call, model, th, xb))
        yb = None if yn is None else _unsqueeze(yn)
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
            jac = fn(theta, _take(x, sl), _take(y, sl), None if mc is None else mc[sl])
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


def _unsqueeze(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.unsqueeze(0)
    if isinstance(x, (tuple, list)):
        return type(x)(_unsqueeze(v) for v in x)
    if isinstance(x, dict):
        return {k: _unsqueeze(v) for k, v in x.items()}
    return x


def _functional_forward(functional_call: Callable[..., Any], model: nn.Module, th: dict, x: Any) -> Any:
    if isinstance(x, dict):
        return functional_call(model, th, (), x, strict=False)
    if isinstance(x, (tuple, list)):
        return functional_call(model, th, tuple(x), strict=False)
    return functional_call(model, th, (x,), strict=False)
