"""One Fisher estimation as an object: the state of a ``fisher_diag`` or ``fisher_kfac`` call
(model, rule coverage, options, sums, counters) and its steps, batch by batch.

Per batch: one recorded forward pass, then the native engine (``_core.FisherSums.add_batch``:
one backward pass per root, each layer's rule, sums of squares); the parameters no rule covers go
to ``fallback``. Once per estimation, on the first samples of the first batch, the rules are
checked against autograd and any parameter they cannot see completely goes to the fallback too;
a plain stack of layers whose structure shows what the check tests skips it (:mod:`.structure`).

The Kronecker part (``kronecker=True``) is empty for a diagonal estimation: the candidate layers
(:mod:`.sites`) get zero factor sums when the estimation starts, the same on every rank; the layer
calls of those that are still sites after the rule checks add Σ ã ãᵀ and Σ g gᵀ in the same
native passes, instead of their squared gradients. Under a process group, the factor sums and
their row counts travel in the one all-reduce of the diagonal sums, and the ranks that saw data
must agree on which candidates are sites.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm  # type: ignore[import-untyped]

from .. import _core
from .._parallel import collectives
from .batches import as_tensors, batch_size, call_model, take, to_device, unpack
from .fallback import Fallback
from .options import FisherOptions
from .recording import Recorder, RuleCoverage, cover_model
from .sites import KfacSite, kfac_sites
from .structure import calls_keep_samples, plain_stack

#: Rules whose check against autograd differs by more than this use the fallback instead.
_MISMATCH_TOL = 1e-3

#: Samples of the first batch that the once-per-estimation rule checks run on. The checks look at
#: how the model uses its parameters, which a few samples show (at least 2: one probe row against
#: the others); they cost a recorded forward pass of these samples, two backward passes (one
#: without parameter gradients) and, when a shared row was expanded, a plain forward pass, which
#: with language models (a sample is a whole sequence) was a quarter of a 32-sequence estimate at
#: 16 samples, and still a fifth of an 8-sequence one at 4.
_CHECK_SAMPLES = 2


def _budget_bytes() -> int:
    """Bound on per-sample intermediates (``EWC_RS_CHUNK_MB``, default 256 MiB)."""
    return int(float(os.environ.get("EWC_RS_CHUNK_MB", "256")) * 2**20)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the estimation (BatchNorm uses running statistics, dropout is off); every
    submodule's own ``training`` flag is restored afterwards.

    A layer with activation checkpointing switched on (Hugging Face's ``gradient_checkpointing``,
    which checkpoints only while ``self.training``) keeps its own flag, so that it still recomputes
    its activations in the backward pass instead of storing them; its submodules (dropout,
    attention) are in eval mode like every other module.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    for m, _ in modes:
        if getattr(m, "gradient_checkpointing", False) is True:
            m.training = True
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@dataclass
class Result:
    """What an estimation found: the diagonal Fisher of every parameter without Kronecker factors,
    and ``(A, G)`` per site (empty for a diagonal estimation), float32 on the model's device."""

    diag: dict[str, torch.Tensor]
    kron: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    sites: list[KfacSite] = field(default_factory=list)
    #: The parameters that took the exact per-sample fallback (no rule, or a rule check failed).
    fallback: list[str] = field(default_factory=list)
    #: Samples, and counted target positions (not ``ignore_index``; one per sample without
    #: positions), over every rank of the process group.
    samples: int = 0
    tokens: int = 0


class Estimation:
    """The state of one estimation and its steps.

    Args:
        model: the (unwrapped) model.
        options: checked options.
        group: the process group the sums are all-reduced over (None: this process only).
        kronecker: whether the layers with a Kronecker form get factors (``fisher_kfac``).
        chosen: the names of the parameters whose layers may get factors (None: all).

    Raises:
        ValueError: no parameter requires grad; ``kronecker`` with ``kind="batched"``; under a
            group: the ranks hold different models.
    """

    def __init__(
        self,
        model: nn.Module,
        options: FisherOptions,
        group: collectives.Group = None,
        *,
        kronecker: bool = False,
        chosen: Optional[set[str]] = None,
    ) -> None:
        if kronecker and options.kind == "batched":
            raise ValueError("kind: 'batched' has no Kronecker-factored form; use 'exact', 'mc' or 'empirical'")
        self.model = model
        self.options = options
        self.group = group  # sums and count are all-reduced over it in `result` (None: this process only)
        self.coverage: RuleCoverage = cover_model(model)
        if not self.coverage.params:
            raise ValueError("model: no parameter requires grad, so there is no Fisher to estimate")
        self.device = self.coverage.params[0].device
        if group is not None:
            collectives.check_same_model(
                self.coverage.names, [p.shape for p in self.coverage.params], group, self.device
            )
        self.budget = _budget_bytes()
        self.sums = _core.FisherSums(params=self.coverage.params, names=self.coverage.names, budget_bytes=self.budget)
        self.fallback = Fallback(model, self.coverage, options, self.sums, self.budget)
        self.seen = 0  # samples
        self.batches = 0
        # counted target positions (not ignore_index), summed on the device: read once, in `result`
        self.tokens = torch.zeros((), dtype=torch.long, device=self.device)
        self.checked = False  # the once-per-estimation rule check
        # The Kronecker part: candidates fixed now (the same on every rank), sites after the check.
        self.chosen = chosen
        self.candidates = kfac_sites(model, self.coverage, chosen) if kronecker else []
        self.is_site = [False] * len(self.candidates)
        self.a_sums = [torch.zeros(k.a_dim, k.a_dim, device=self.device) for k, _ in self.candidates]
        self.g_sums = [torch.zeros(k.outputs, k.outputs, device=self.device) for k, _ in self.candidates]
        self.kfac = _core.KfacSums(a_sums=self.a_sums, g_sums=self.g_sums) if kronecker else None

    # ------------------------------------------------------------------ the loop
    def run(self, loader: Iterable[Any]) -> Result:
        """Estimates over ``loader``; ``.grad`` and every module's mode are left as they were."""
        params = self.coverage.params
        grads_before = [p.grad for p in params]
        bar = None
        if self.options.progress:
            bar = tqdm(total=self.options.num_samples, unit="sample", desc=f"Fisher ({self.options.kind})")
        recorder = Recorder(self.coverage) if self.options.kind != "batched" else None
        try:
            with _eval_mode(self.model), torch.enable_grad():
                for index, batch in enumerate(loader):
                    n = self._add(batch, index, recorder)
                    if n is None:
                        break
                    if bar is not None and n:
                        bar.update(n)
        except Exception:
            if self.group is not None:  # the other ranks wait in `result`'s all-reduce: join it, flagged
                collectives.all_reduce_sums(self._totals(), self._counts(), self.group, failed=True)
            raise
        finally:
            if recorder is not None:
                recorder.remove()
            if bar is not None:
                bar.close()
            for p, g in zip(params, grads_before):
                p.grad = g
        return self.result()

    def _add(self, batch: Any, index: int, recorder: Optional[Recorder]) -> Optional[int]:
        """Adds one batch; returns its sample count, or None once ``num_samples`` are in."""
        limit = self.options.num_samples
        if limit is not None and self.seen >= limit:
            return None
        x, y = unpack(batch, index)
        x, y = as_tensors(x), as_tensors(y)
        n = batch_size(x, index)
        if limit is not None and self.seen + n > limit:
            n = limit - self.seen
            x, y = take(x, slice(0, n)), take(y, slice(0, n))
        if n == 0:
            return 0
        x, y = to_device(x, self.device), to_device(y, self.device)
        if recorder is None:
            self._batched_step(x, y, n)
        else:
            self._rules_step(x, y, n, recorder)
        self.seen += n
        self.batches += 1
        return n

    def _totals(self) -> list[torch.Tensor]:
        """The sums one all-reduce carries: per parameter, then A and G per candidate."""
        return [*self.sums.totals, *self.a_sums, *self.g_sums]

    def _counts(self) -> list[int]:
        """The counts it carries: samples or batches, whether this rank saw data, the input rows
        per candidate, and per candidate whether this rank made it a site."""
        count = self.batches if self.options.kind == "batched" else self.seen
        head = [count, self.seen, int(self.tokens)]
        if not self.candidates:  # a diagonal estimation: the counts alone
            return head
        rows = self.kfac.rows if self.kfac is not None else []
        return [*head, int(self.batches > 0), *rows, *(int(s) for s in self.is_site)]

    def result(self) -> Result:
        """The sums over the count (batches for ``batched``, else samples), A over its rows; under a
        group, the sums and counts of all ranks (one all-reduce, which an empty rank joins too)."""
        totals, counts = self._totals(), self._counts()
        if self.group is not None:
            totals, counts, failed = collectives.all_reduce_sums(totals, counts, self.group)
            if failed:
                raise ValueError(
                    f"loader: the estimation failed on {failed} other rank(s) of the process group (see their error)"
                )
            if counts[0] == 0:
                raise ValueError("loader: the loaders of all ranks produced no batches (an empty loader has no Fisher)")
        elif self.batches == 0:
            raise ValueError("loader: produced no batches (an empty loader has no Fisher)")
        k = len(self.candidates)
        count, samples, tokens = counts[:3]
        with_data = counts[3] if k else 0
        rows, sites = counts[4 : 4 + k], counts[4 + k :]
        p = len(self.coverage.names)
        diag_totals, a_totals, g_totals = totals[:p], totals[p : p + k], totals[p + k :]
        fallback = sorted(self.coverage.names[s] for s in self.coverage.fallback)
        result = Result(diag={}, fallback=fallback, samples=samples, tokens=tokens)
        for name, total in zip(self.coverage.names, diag_totals):
            # In place: the sums are this estimation's own (a fresh copy of an LM head's size costs
            # more in page faults than the division). Their sum is finite exactly when every value
            # is (a NaN or inf makes it NaN or inf), a cheaper test than an element-wise one.
            f = total.div_(count)
            if not (torch.isfinite(f.sum()) or torch.isfinite(f).all()):
                raise ValueError(
                    f"Fisher of parameter '{name}' has non-finite values (NaN or inf): check the model's "
                    "outputs and the data for NaN/inf"
                )
            result.diag[name] = f
        for (site, _), a, g, r, votes in zip(self.candidates, a_totals, g_totals, rows, sites):
            if votes == 0:
                continue
            if votes != with_data:
                raise ValueError(
                    f"model: layer '{site.module}' has Kronecker factors on {votes} of the {with_data} ranks that saw "
                    "data (the rule checks differed): the ranks must run the same model the same way"
                )
            factors = (a / max(r, 1), g / count)
            for what, t in zip("AG", factors):
                if not torch.isfinite(t).all():
                    raise ValueError(f"KFAC factor {what} of layer '{site.module}' has non-finite values (NaN or inf)")
            result.kron[site.module] = factors
            result.sites.append(site)
            for covered in (site.weight, site.bias):
                if covered is not None:
                    result.diag.pop(covered, None)
        return result

    # ------------------------------------------------------------------ steps
    def forward(self, x: Any, y: Any, n: int) -> tuple[torch.Tensor, Any]:
        """The model's outputs for ``x`` as the roots read them, with the targets (see
        ``FisherOptions.prepare``)."""
        out, y = self.options.prepare(call_model(self.model, x), y)
        if self.options.loglik_fn is not None and tuple(out.shape) != (n,):
            raise ValueError(
                f"likelihood: a callable likelihood must return the per-sample log-likelihood of shape [{n}], "
                f"got {list(out.shape)}"
            )
        return out, y

    def _batched_step(self, x: Any, y: Any, n: int) -> None:
        """The seed's estimator: every parameter's whole batch gradient, squared."""
        out, y = self.forward(x, y, n)
        self._count_tokens(y, n)
        self.sums.add_batch(out, self.options.roots(out, y), whole_slots=list(range(len(self.coverage.params))))

    def _rules_step(self, x: Any, y: Any, n: int, recorder: Recorder) -> None:
        """One batch through the rules (and the Kronecker sites), then the fallback parameters
        sample by sample."""
        recorded = None
        if not self.checked:
            recorded = self._plain_stack_forward(x, y, n, recorder)
            if recorded is None:
                self._check_rules(x, y, n, recorder)
            self.checked = True
            self._choose_sites()
        out, yp = recorded or self._recorded_forward(x, y, n, recorder)
        self._count_tokens(yp, n)
        self._drop_uninterpretable(recorder, n)
        mc = self.options.draw_mc(out, yp) if self.options.kind == "mc" else None
        roots = self.options.roots(out, yp, mc_draws=mc)
        self.sums.add_batch(out, roots, calls=self._calls(recorder), kfac=self.kfac)
        if self.coverage.fallback:
            self.fallback.step(x, y, n, mc)

    def _count_tokens(self, y: Any, n: int) -> None:
        """Adds the batch's counted target positions: those of a per-position target that are not
        ``ignore_index``, else one per sample."""
        if isinstance(y, torch.Tensor) and y.dim() > 1 and self.options.likelihood in ("categorical", "causal_lm"):
            self.tokens += (y != self.options.ignore_index).sum()
        else:
            self.tokens += n

    def _choose_sites(self) -> None:
        """The candidates that the rule checks left with the rules, weight and bias as they were,
        are the sites."""
        if not self.candidates:
            return
        still = {k for k, _ in kfac_sites(self.model, self.coverage, self.chosen)}
        self.is_site = [k in still for k, _ in self.candidates]

    def _calls(self, recorder: Recorder) -> list[_core.LayerCall]:
        """The recorded calls as the engine takes them; a site's call names its factor sums."""
        if not self.candidates:
            return recorder.layer_calls()
        index = {id(site): i for i, (_, site) in enumerate(self.candidates) if self.is_site[i]}
        calls = []
        for c in recorder.calls:
            i = index.get(id(c.site))
            if i is not None and (not c.readable or c.site.weight_slot is None):
                raise ValueError(
                    f"model: layer '{self.candidates[i][0].module}' was called in a way its KFAC rule cannot read "
                    "(non-tensor input, or no sample dimension)"
                )
            if c.readable and (c.site.slots() or i is not None):
                calls.append(c.layer_call(kfac_site=i))
        return calls

    def _recorded_forward(self, x: Any, y: Any, n: int, recorder: Recorder) -> tuple[torch.Tensor, Any]:
        """Forward pass with the layer calls recorded (as copies if an in-place op touched one)."""
        recorder.batch = n
        while True:
            with recorder.recording():
                out, yp = self.forward(x, y, n)
            if recorder.modified_outputs() and not recorder.clone_outputs:
                recorder.clone_outputs = True  # an in-place op touched a recorded output: record copies
                continue
            return out, yp

    def _drop_uninterpretable(self, recorder: Recorder, n: int) -> None:
        """Calls the rules cannot interpret (non-tensor input, batch not in dim 0) go to the fallback."""
        self.coverage.to_fallback(
            s for c in recorder.calls if not c.readable or c.input.shape[:1] != (n,) for s in c.site.slots()
        )

    def _plain_stack_forward(self, x: Any, y: Any, n: int, recorder: Recorder) -> Optional[tuple[torch.Tensor, Any]]:
        """The first batch's recorded forward pass when the model's structure and these calls show
        what the rule check would test (:mod:`.structure`); None when the check must run."""
        own = {h.id for h in recorder.handles}
        # A callable likelihood or outputs= may read the parameters themselves: the check compares.
        user_code = self.options.loglik_fn is not None or self.options.pick is not None
        if user_code or not plain_stack(self.model, self.coverage, own):
            return None
        out, yp = self._recorded_forward(x, y, n, recorder)
        return (out, yp) if calls_keep_samples(recorder.calls, n) else None

    def _check_rules(self, x: Any, y: Any, n: int, recorder: Recorder) -> None:
        """Once per estimation, on the first samples of the first batch: hands to the fallback every
        parameter whose rule would be wrong, i.e. where dim 0 of a recorded call is not the sample
        index, or where the parameter is also used outside the layer that owns it.

        Two backward passes of probes (weighted sums of one sample's outputs): the first sample's
        (:func:`_not_per_sample`), then the last sample's, which serves at once as the root of the
        comparison of the rules' summed gradients with autograd's, and as the test that no call's
        other rows reach that sample (for a call of one shared row expanded per sample, the test
        that the expansion is sound)."""
        k = min(n, _CHECK_SAMPLES)
        sliceable = all(isinstance(v, (torch.Tensor, tuple, list, dict)) for v in (x, y))
        whole = (x, y, n)
        if k < n and sliceable:
            x, y, n = take(x, slice(0, k)), take(y, slice(0, k)), k
        try:
            out, yp = self._recorded_forward(x, y, n, recorder)
        except ValueError:
            if n < whole[2]:  # say what does not fit in the shapes of the batch given, not of its slice
                with torch.no_grad():
                    self.forward(*whole)
            raise
        except Exception:
            if not recorder.expand_shared_rows:
                raise
            recorder.expand_shared_rows = False  # the model cannot take one copy per sample
            out, yp = self._recorded_forward(x, y, n, recorder)
        if any(c.broadcast for c in recorder.calls) and not _expansion_keeps_outputs(self, x, y, n, out):
            recorder.expand_shared_rows = False
            out, yp = self._recorded_forward(x, y, n, recorder)
        if not recorder.calls:
            return
        self._drop_uninterpretable(recorder, n)
        not_per_sample = _not_per_sample(out, recorder, n)
        probed = n >= 2 and out.dim() > 0 and out.shape[0] == n
        if probed:
            # The last sample's probe, as a per-sample log-likelihood that is 0 for the others.
            row = out.reshape(n, -1).float()
            weights = torch.zeros_like(row)
            weights[n - 1] = torch.linspace(1.0, 2.0, row.shape[1], device=row.device)
            ll = (row * weights).sum(1)
            check_out, roots = ll, _core.RootSpec(kind="empirical", likelihood="custom", loglik=ll)
        else:
            # Any per-sample root with a non-zero gradient serves the comparison; for `mc` the random
            # draws are left alone (the generator stays untouched): gaussian uses `exact`'s first
            # root, categorical label 0 at every position (no class-by-class roots are built).
            kind, fixed = self.options.kind, None
            if kind == "mc" and self.options.likelihood == "gaussian":
                kind = "exact"
            elif kind == "mc":
                fixed = torch.zeros(*self.options.draw_shape(out), dtype=torch.long, device=out.device)
            check_out, roots = out, self.options.roots(out, yp, mc_draws=fixed, kind=kind)
        calls = [c for c in recorder.calls if c.readable and c.site.slots()]
        slots = sorted({s for c in calls for s in c.site.slots()})
        mismatch, crossing = self.sums.rule_mismatch(
            check_out, roots, [c.layer_call() for c in calls], slots, row=n - 1 if probed else None
        )
        if any(calls[i].broadcast for i in crossing):
            # A copy of a shared row reaches another sample's outputs: the model does not use the
            # copies one per sample. Without the expansion, the check starts again.
            recorder.expand_shared_rows = False
            self._check_rules(x, y, n, recorder)
            return
        self.coverage.to_fallback(not_per_sample)
        self.coverage.to_fallback(s for i in crossing for s in calls[i].site.slots())
        self.coverage.to_fallback(s for s, err in mismatch if err > _MISMATCH_TOL)


def _expansion_keeps_outputs(est: Estimation, x: Any, y: Any, n: int, out: torch.Tensor) -> bool:
    """Whether the recorded forward pass, with its calls of one shared input row expanded to one
    copy per sample (:meth:`Recorder._expand`), computed what the model computes. (That each
    sample's output depends on its own copy only is probed in the rule check's backward passes:
    the first sample by `_not_per_sample`, the last by the comparison's probe.)"""
    with torch.no_grad():
        plain, _ = est.forward(x, y, n)
    scale = float(plain.detach().abs().max()) if plain.numel() else 0.0
    return plain.shape == out.shape and torch.allclose(out.detach(), plain, rtol=1e-5, atol=1e-6 * max(scale, 1.0))


def _not_per_sample(out: torch.Tensor, recorder: Recorder, n: int) -> set[int]:
    """Slots of layer calls whose output rows are not the batch's samples.

    The rules read row i of a layer's input and output as sample i. A layout where dim 0 is
    something else of the same length (sequence-first ``[T, N, F]`` with T == N, as inside
    ``nn.TransformerEncoderLayer(batch_first=False)``) passes the shape test, and the summed
    gradients still agree, so it is caught here: sample 0's output may depend on row 0 only.
    """
    if n < 2 or out.dim() == 0 or out.shape[0] != n:
        return set()
    sel = [c for c in recorder.calls if c.readable and c.input.shape[:1] == (n,) and c.site.slots()]
    if not sel:
        return set()
    row = out[0].reshape(-1).float()
    # Unequal weights: a row sum can be constant (centred logits), a weighted sum is not.
    probe = (row * torch.linspace(1.0, 2.0, row.numel(), device=row.device)).sum()
    grads = torch.autograd.grad(probe, [c.output for c in sel], retain_graph=True, allow_unused=True)
    return {
        s for c, g in zip(sel, grads) if g is not None and bool(torch.count_nonzero(g[1:]) > 0) for s in c.site.slots()
    }
