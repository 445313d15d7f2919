"""Diagonal Fisher information of any ``torch.nn.Module``.

Definitions (van de Ven 2025 names): per-sample log-likelihood ℓ_n(θ) = log p(y_n | x_n, θ);
diagonal Fisher F = (1/N) Σ_n (∇θ ℓ_n)², the mean of squared **per-sample** gradients.

This module is the Python half of the engine's driver: the batch loop, validation, ``mc`` label
draws and the once-per-estimation rule checks. Beside it: ``recording`` (which parameters the
rules cover; forward hooks), ``attention`` (self-attention as Linear proxies), ``fallback`` (exact
per-sample path for the rest) and ``batches`` (batch handling). The maths (likelihood roots,
backward passes, per-layer rules, accumulation) runs in Rust, ``ewc_rs._core``, with the GIL
released.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Optional, Union

import torch
from torch import nn

from . import _core
from .batches import LikelihoodFn, batch_size, call_model, check_outputs, loglik, take, to_device, unpack
from .fallback import fallback_step
from .recording import Plan, Recorder, Site, make_plan

KINDS = ("exact", "mc", "empirical", "batched")
LIKELIHOODS = ("categorical", "gaussian")

#: Rules whose check against autograd differs by more than this use the fallback instead.
_MISMATCH_TOL = 1e-3


def _budget_bytes() -> int:
    """Bound on per-sample intermediates (``EWC_RS_CHUNK_MB``, default 256 MiB)."""
    return int(float(os.environ.get("EWC_RS_CHUNK_MB", "256")) * 2**20)


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
    Embedding, and the projections of ``nn.MultiheadAttention`` self-attention) are computed in
    one backward pass per root; any other parameter (custom modules, RNNs, cross-attention,
    parameters used outside their module) by an exact per-sample pass.

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
    plan = make_plan(model)
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

    recorder = Recorder(plan) if kind != "batched" else None
    seen = batches = 0
    checked = False
    try:
        with _eval_mode(model), torch.enable_grad():
            for index, batch in enumerate(loader):
                if num_samples is not None and seen >= num_samples:
                    break
                x, y = unpack(batch, index)
                n = batch_size(x, index)
                if num_samples is not None and seen + n > num_samples:
                    n = num_samples - seen
                    x, y = take(x, slice(0, n)), take(y, slice(0, n))
                if n == 0:
                    continue
                x, y = to_device(x, device), to_device(y, device)
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


def _batched_step(model: nn.Module, x: Any, y: Any, lik: str, likelihood: Union[str, LikelihoodFn],
                  plan: Plan, accs: list[torch.Tensor]) -> None:
    out = check_outputs(call_model(model, x))
    direct = list(zip(plan.params, range(len(plan.params))))
    _core.fisher_accumulate(out, y, "batched", lik, None, loglik(likelihood, out, y), [],
                            direct, accs, plan.names, 0)


def _not_per_sample(out: torch.Tensor, calls: list[tuple[Site, torch.Tensor, torch.Tensor, int]],
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


def _recorded_forward(model: nn.Module, x: Any, recorder: Recorder) -> torch.Tensor:
    """Forward pass with the layer calls recorded (as copies if an in-place op touched one)."""
    while True:
        with recorder.recording():
            out = check_outputs(call_model(model, x))
        modified = any(v >= 0 and o._version != v for _, _, o, v in recorder.calls)
        if modified and not recorder.clone_outputs:
            recorder.clone_outputs = True  # an in-place op touched a recorded output: record copies
            continue
        return out


def _drop_uninterpretable(plan: Plan, recorder: Recorder, n: int) -> None:
    """Calls the rules cannot interpret (non-tensor input, batch not in dim 0) go to the fallback."""
    bad = {s for site, inp, _, v in recorder.calls if v < 0 or inp.shape[:1] != (n,)
           for s in site.slots if s is not None}
    if bad:
        plan.drop_from_rules(bad)


def _captures(recorder: Recorder) -> list[tuple]:
    return [(site.spec[0], inp, o, site.slots[0], site.slots[1], list(site.spec[1]),
             list(site.spec[2]), list(site.spec[3]))
            for site, inp, o, v in recorder.calls
            if v >= 0 and any(s is not None for s in site.slots)]


def _check_rules(model: nn.Module, x: Any, y: Any, n: int, kind: str, lik: str,
                 likelihood: Union[str, LikelihoodFn], plan: Plan, recorder: Recorder, budget: int) -> None:
    """Once per estimation, on the first samples of the first batch: hands to the fallback every
    parameter whose rule would be wrong, i.e. where dim 0 of a recorded call is not the sample
    index, or where the parameter is also used outside the layer that owns it."""
    k = min(n, _CHECK_SAMPLES)
    sliceable = all(isinstance(v, (torch.Tensor, tuple, list, dict)) for v in (x, y))
    if k < n and sliceable:
        x, y, n = take(x, slice(0, k)), take(y, slice(0, k)), k
    out = _recorded_forward(model, x, recorder)
    if not recorder.calls:
        return
    _drop_uninterpretable(plan, recorder, n)
    plan.drop_from_rules(_not_per_sample(out, recorder.calls, n))
    # Any root serves the comparison; `exact` needs no random draws (mc's generator stays untouched).
    check_kind = "exact" if kind == "mc" else kind
    rule_slots = sorted({s for site, *_ in recorder.calls for s in site.slots if s is not None})
    pairs = [(s, plan.params[s]) for s in rule_slots]
    mism = _core.fisher_rule_mismatch(out, y, check_kind, lik, None, loglik(likelihood, out, y),
                                      _captures(recorder), pairs, budget)
    plan.drop_from_rules(s for s, err in mism if err > _MISMATCH_TOL)


def _rules_step(model: nn.Module, x: Any, y: Any, n: int, lik: str, likelihood: Union[str, LikelihoodFn],
                kind: str, mc_samples: int, generator: Optional[torch.Generator], plan: Plan,
                recorder: Recorder, accs: list[torch.Tensor], budget: int, checked: bool) -> bool:
    """One batch through the rules, then the fallback parameters sample by sample."""
    if not checked:
        _check_rules(model, x, y, n, kind, lik, likelihood, plan, recorder, budget)
        checked = True
    out = _recorded_forward(model, x, recorder)
    _drop_uninterpretable(plan, recorder, n)
    mc = _draw_mc(out, lik, mc_samples, generator) if kind == "mc" else None
    ll = loglik(likelihood, out, y)
    _core.fisher_accumulate(out, y, kind, lik, mc, ll, _captures(recorder), [], accs, plan.names, budget)

    if plan.fallback:
        fallback_step(model, x, y, n, lik, likelihood, kind, mc, plan, accs, budget)
    return checked


