"""One Fisher estimation as an object: the state of a ``fisher_diag`` call (model, rule coverage,
options, sums, counters) and its steps, batch by batch.

Per batch: one recorded forward pass, then the native engine (``_core.FisherSums.add_batch``:
one backward pass per root, each layer's rule, sums of squares); the parameters no rule covers go
to ``fallback``. Once per estimation, on the first samples of the first batch, the rules are
checked against autograd and any parameter they cannot see completely goes to the fallback too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import nn

from . import _core, distributed
from .batches import as_tensors, batch_size, call_model, take, to_device, unpack
from .fallback import Fallback
from .fisher_options import FisherOptions
from .recording import Recorder, RuleCoverage, cover_model

#: Rules whose check against autograd differs by more than this use the fallback instead.
_MISMATCH_TOL = 1e-3

#: Samples of the first batch that the once-per-estimation rule checks run on. The checks look at
#: how the model uses its parameters, which a few samples show (at least 2: one probe row against
#: the others); each costs about a forward and two backward passes, which with language models
#: (a sample is a whole sequence) was a quarter of a 32-sequence estimate at 16 samples.
_CHECK_SAMPLES = 4


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


class Estimation:
    """The state of one ``fisher_diag`` call and its steps."""

    def __init__(self, model: nn.Module, options: FisherOptions, group: distributed.Group = None) -> None:
        self.model = model
        self.options = options
        self.group = group  # sums and count are all-reduced over it in `result` (None: this process only)
        self.coverage: RuleCoverage = cover_model(model)
        if not self.coverage.params:
            raise ValueError("model: no parameter requires grad, so there is no Fisher to estimate")
        self.device = self.coverage.params[0].device
        if group is not None:
            distributed.check_same_model(
                self.coverage.names, [p.shape for p in self.coverage.params], group, self.device
            )
        self.budget = _budget_bytes()
        self.sums = _core.FisherSums(params=self.coverage.params, names=self.coverage.names, budget_bytes=self.budget)
        self.fallback = Fallback(model, self.coverage, options, self.sums, self.budget)
        self.seen = 0  # samples
        self.batches = 0
        self.checked = False  # the once-per-estimation rule check

    # ------------------------------------------------------------------ the loop
    def run(self, loader: Iterable[Any], *, progress: bool = False) -> dict[str, torch.Tensor]:
        """Estimates over ``loader``; ``.grad`` and every module's mode are left as they were."""
        params = self.coverage.params
        grads_before = [p.grad for p in params]
        bar = None
        if progress:
            from tqdm.auto import tqdm  # type: ignore[import-untyped]

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
                distributed.all_reduce_sums(self.sums.totals, 0, self.group, failed=True)
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

    def result(self) -> dict[str, torch.Tensor]:
        """``{name: F}``: the sums over the count (batches for ``batched``, else samples); under a
        group, the sums and counts of all ranks (one all-reduce, which an empty rank joins too)."""
        count = self.batches if self.options.kind == "batched" else self.seen
        totals = self.sums.totals
        if self.group is not None:
            totals, count, failed = distributed.all_reduce_sums(totals, count, self.group)
            if failed:
                raise ValueError(
                    f"loader: the estimation failed on {failed} other rank(s) of the process group (see their error)"
                )
            if count == 0:
                raise ValueError("loader: the loaders of all ranks produced no batches (an empty loader has no Fisher)")
        elif self.batches == 0:
            raise ValueError("loader: produced no batches (an empty loader has no Fisher)")
        result = {}
        for name, total in zip(self.coverage.names, totals):
            f = total / count
            if not torch.isfinite(f).all():
                raise ValueError(
                    f"Fisher of parameter '{name}' has non-finite values (NaN or inf): check the model's "
                    "outputs and the data for NaN/inf"
                )
            result[name] = f
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
        self.sums.add_batch(out, self.options.roots(out, y), whole_slots=list(range(len(self.coverage.params))))

    def _rules_step(self, x: Any, y: Any, n: int, recorder: Recorder) -> None:
        """One batch through the rules, then the fallback parameters sample by sample."""
        if not self.checked:
            self._check_rules(x, y, n, recorder)
            self.checked = True
        out, yp = self._recorded_forward(x, y, n, recorder)
        self._drop_uninterpretable(recorder, n)
        mc = self.options.draw_mc(out) if self.options.kind == "mc" else None
        self.sums.add_batch(out, self.options.roots(out, yp, mc_draws=mc), calls=recorder.layer_calls())
        if self.coverage.fallback:
            self.fallback.step(x, y, n, mc)

    def _recorded_forward(self, x: Any, y: Any, n: int, recorder: Recorder) -> tuple[torch.Tensor, Any]:
        """Forward pass with the layer calls recorded (as copies if an in-place op touched one)."""
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

    def _check_rules(self, x: Any, y: Any, n: int, recorder: Recorder) -> None:
        """Once per estimation, on the first samples of the first batch: hands to the fallback every
        parameter whose rule would be wrong, i.e. where dim 0 of a recorded call is not the sample
        index, or where the parameter is also used outside the layer that owns it."""
        k = min(n, _CHECK_SAMPLES)
        sliceable = all(isinstance(v, (torch.Tensor, tuple, list, dict)) for v in (x, y))
        if k < n and sliceable:
            x, y, n = take(x, slice(0, k)), take(y, slice(0, k)), k
        out, yp = self._recorded_forward(x, y, n, recorder)
        if not recorder.calls:
            return
        self._drop_uninterpretable(recorder, n)
        self.coverage.to_fallback(_not_per_sample(out, recorder, n))
        # Any per-sample root with a non-zero gradient serves the comparison; for `mc` the random
        # draws are left alone (the generator stays untouched): gaussian uses `exact`'s first root,
        # categorical label 0 at every position (no class-by-class roots are built).
        kind, fixed = self.options.kind, None
        if kind == "mc" and self.options.likelihood == "gaussian":
            kind = "exact"
        elif kind == "mc":
            fixed = torch.zeros(*self.options.draw_shape(out), dtype=torch.long, device=out.device)
        slots = sorted({s for c in recorder.calls for s in c.site.slots()})
        roots = self.options.roots(out, yp, mc_draws=fixed, kind=kind)
        mismatch = self.sums.rule_mismatch(out, roots, recorder.layer_calls(), slots)
        self.coverage.to_fallback(s for s, err in mismatch if err > _MISMATCH_TOL)


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
