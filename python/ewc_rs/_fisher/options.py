"""The options of one Fisher estimation, one type for every entry, and what each batch derives from them.

:class:`FisherOptions`' field defaults are the only place every default stands (``fisher_diag``,
``fisher_kfac`` and ``EWC.consolidate`` read them from :data:`DEFAULTS`), checked once
(:func:`parse_options`). Per batch: the model's outputs read as the likelihood needs them
(``prepare``), the native root specification (``_core.RootSpec``) and the ``mc`` draws."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from .. import _core
from .._parallel.collectives import Group
from .batches import LikelihoodFn
from .outputs import OutputsFn, check_positions, select_logits, to_positions

KINDS = ("exact", "mc", "empirical", "batched")
LIKELIHOODS = ("categorical", "causal_lm", "gaussian")


@dataclass(frozen=True)
class FisherOptions:
    """The validated options of one estimation (their meaning: ``ewc_rs.fisher_diag``'s Args).

    The field defaults are the defaults of every public entry (:data:`DEFAULTS`).
    """

    kind: str = "exact"
    #: 'categorical', 'causal_lm', 'gaussian', or 'custom' when ``loglik_fn`` is given.
    likelihood: str = "categorical"
    loglik_fn: Optional[LikelihoodFn] = None
    mc_samples: int = 1
    num_samples: Optional[int] = None
    generator: Optional[torch.Generator] = None
    class_dim: int = -1
    ignore_index: int = -100
    #: The user's ``outputs=`` callable (None: tensor, first element, or ``"logits"``).
    pick: Optional[OutputsFn] = None
    progress: bool = False
    #: The process group given (None: the default group when one is initialised).
    group: Group = None

    def prepare(self, raw: Any, y: Any, *, check: bool = True) -> tuple[torch.Tensor, Any]:
        """What the roots read from a batch: ``(logits, targets)`` laid out per position
        (:mod:`.outputs`), or, for a callable likelihood, ``(log-likelihood [N], None)``.

        Args:
            raw: what the model returned (given as it is to a callable likelihood).
            y: the batch's targets.
            check: check shapes (off inside ``vmap``, where checks cannot read values).

        Returns:
            ``(out, targets)``.
        """
        if self.loglik_fn is not None:
            ll = self.loglik_fn(raw, y)
            if not isinstance(ll, torch.Tensor):
                raise TypeError(f"likelihood: the callable must return a tensor [N], got {type(ll).__name__}")
            return ll, None
        out = select_logits(raw, self.pick)
        if check:
            check_positions(out, y, self.likelihood, self.class_dim)
        return to_positions(out, y, self.likelihood, self.class_dim)

    def roots(
        self, out: torch.Tensor, y: Any, *, mc_draws: Optional[torch.Tensor] = None, kind: Optional[str] = None
    ) -> _core.RootSpec:
        """The native root specification for a prepared batch (see :meth:`prepare`)."""
        custom = self.loglik_fn is not None
        return _core.RootSpec(
            kind=kind or self.kind,
            # causal_lm's logits are shifted by `prepare`: from here on they are categorical.
            likelihood="categorical" if self.likelihood == "causal_lm" else self.likelihood,
            targets=None if custom else y,
            mc_draws=mc_draws,
            loglik=out if custom else None,
            ignore_index=self.ignore_index,
        )

    def draw_shape(self, outputs: torch.Tensor) -> tuple[int, ...]:
        """Shape of the ``mc`` draws for these outputs (see :meth:`draw_mc`)."""
        if self.likelihood == "gaussian":
            return (outputs.shape[0], self.mc_samples, outputs[0].numel())
        return (*outputs.shape[:-1], self.mc_samples)

    def draw_mc(self, outputs: torch.Tensor, targets: Any = None) -> torch.Tensor:
        """Labels drawn from p(·|x): ``[N, S]`` for logits ``[N, C]``, ``[N, P, S]`` for ``[N, P, C]``
        (one per position and draw, under teacher forcing; with ``targets [N, P]``, a position
        whose target is ``ignore_index`` counts for nothing and draws nothing: its labels are 0);
        or noise ``[N, S, D]`` (gaussian). See :func:`draw_categorical`."""
        out = outputs.detach().float()
        # The sum is finite when every value is (a NaN or inf makes it NaN or inf), one reduction
        # instead of an element-wise test; only an overflowing sum needs the latter.
        if not (torch.isfinite(out.sum()) or torch.isfinite(out).all()):
            raise ValueError(
                "model outputs: non-finite values (NaN or inf), so kind='mc' cannot draw labels from "
                "them: check the model's outputs and the data for NaN/inf"
            )
        gen = self.generator
        if self.likelihood == "gaussian":
            gen_device = gen.device if gen is not None else out.device
            return torch.randn(self.draw_shape(out), generator=gen, device=gen_device).to(out.device)
        keep = None
        if isinstance(targets, torch.Tensor) and out.dim() == 3 and tuple(targets.shape) == tuple(out.shape[:-1]):
            keep = targets != self.ignore_index
            if bool(keep.all()):
                keep = None  # every position draws: no gathers
        return draw_categorical(out, self.mc_samples, gen, keep=keep)


#: Bound on the float32 block of logits that :func:`draw_categorical` exponentiates at once (bytes).
_DRAW_ROWS_BYTES = 64 * 2**20
#: Classes per block of :func:`draw_categorical`'s two-level search.
_DRAW_BLOCK = 128


def draw_categorical(
    logits: torch.Tensor,
    samples: int,
    generator: Optional[torch.Generator] = None,
    *,
    keep: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``samples`` labels per row of ``logits [..., C]`` drawn from softmax(logits), as ``[..., samples]``
    (int64, on the logits' device), by inversion of the cumulative distribution in two levels.

    Per row, e = exp(l − max l) (float32, as softmax computes it before normalising), cut into
    blocks of 128 classes, with their masses m_b (float32 sums); per draw, u ~ U[0, 1) (float64,
    from ``generator``, or the global generator of the logits' device when None) picks the first
    block b whose float64 running sum of masses exceeds u·Σ m, and the remainder, as a fraction
    f ∈ [0, 1) of m_b, picks the first class k of the block whose float64 running sum of e
    exceeds f·Σ_block e. Class k is so drawn with probability (m_b / Σ m)·(e_k / Σ_block e), i.e.
    e_k / Σ e up to the float32 rounding of the block masses (relative 1e-7, the rounding of a
    float32 softmax's own probabilities); a class or block of zero mass is never drawn. This
    costs one uniform number and an O(C) pass of float32 adds per row and draw;
    ``torch.multinomial`` draws one with the exponential trick, an exponential variate (a
    logarithm) per class, which for a language model's vocabulary cost more than half a training
    step. The rows are walked in blocks of at most 64 MiB of logits.

    Reproducible: the uniforms of every row (``[rows, samples]``, row-major) are drawn in one call
    whatever ``keep`` is, so a generator in a given state gives the same draws.

    Args:
        logits: float32 ``[..., C]``, finite (the caller checks).
        samples: draws per row.
        generator: where the uniforms come from (its device; the draws move to the logits').
        keep: bool ``[...]`` (the logits' leading shape): the rows that draw; the others get label
            0, and no work.

    Returns:
        int64 ``[..., samples]``.
    """
    classes = logits.shape[-1]
    device = logits.device
    gen_device = generator.device if generator is not None else device
    total_rows = logits.numel() // max(classes, 1)
    u = torch.rand(total_rows, samples, dtype=torch.float64, generator=generator, device=gen_device).to(device)
    draws = torch.zeros(total_rows, samples, dtype=torch.long, device=device)
    if logits.dim() == 3 and not logits.is_contiguous() and logits.stride(-1) == 1 and logits.shape[0] > 0:
        # Shifted logits ([:, :-1] of a causal LM's): sample by sample, each a view (no copy of the whole).
        per = logits.shape[1]
        for i in range(logits.shape[0]):
            _draw_rows(
                logits[i],
                u[i * per : (i + 1) * per],
                draws[i * per : (i + 1) * per],
                None if keep is None else keep[i],
            )
    else:
        _draw_rows(logits.reshape(-1, classes), u, draws, keep)
    return draws.reshape(*logits.shape[:-1], samples)


def _draw_rows(flat: torch.Tensor, u: torch.Tensor, draws: torch.Tensor, keep: Optional[torch.Tensor]) -> None:
    """:func:`draw_categorical` for logits ``[R, C]`` (rows with unit stride), uniforms ``[R, S]``,
    into ``draws [R, S]`` (``keep [R]``: the rows that draw)."""
    classes = flat.shape[-1]
    device = flat.device
    rows = None if keep is None else keep.reshape(-1).to(device).nonzero().squeeze(1)
    count = flat.shape[0] if rows is None else rows.numel()
    size = max(1, min(_DRAW_BLOCK, classes))
    full = classes // size  # whole blocks; the rest of the classes form one last, shorter block
    offsets = torch.arange(size, device=device)
    step = max(1, _DRAW_ROWS_BYTES // (4 * max(classes, 1)))
    for start in range(0, count, step):
        at: Union[slice, torch.Tensor] = slice(start, start + step) if rows is None else rows[start : start + step]
        block = flat[at]
        e = (block - block.amax(dim=1, keepdim=True)).exp_()
        b = e.shape[0]
        mass = e[:, : full * size].reshape(b, full, size).sum(dim=2)
        if full * size < classes:
            mass = torch.cat([mass, e[:, full * size :].sum(dim=1, keepdim=True)], dim=1)
        cum = mass.cumsum(dim=1, dtype=torch.float64)
        total = cum[:, -1:].contiguous()
        v = u[at] * total
        # u·Σ m may round up to Σ m: such a draw takes the last block of positive mass, the first
        # whose running sum reaches the total (and likewise the last class inside a block).
        j = torch.minimum(torch.searchsorted(cum, v, right=True), torch.searchsorted(cum, total))
        below = torch.where(j > 0, cum.gather(1, (j - 1).clamp(min=0)), 0.0)
        frac = (v - below) / mass.gather(1, j).double()
        cols = j.unsqueeze(2) * size + offsets  # [b, S, size]
        inside = e.gather(1, cols.clamp(max=classes - 1).reshape(b, -1)).reshape(cols.shape)
        inside = inside.masked_fill(cols >= classes, 0.0).cumsum(dim=2, dtype=torch.float64)
        last = inside[:, :, -1:].contiguous()
        k = torch.minimum(
            torch.searchsorted(inside, frac.unsqueeze(2) * last, right=True), torch.searchsorted(inside, last)
        )
        draws[at] = j * size + k.squeeze(2)


#: Every default of a Fisher estimation, once.
DEFAULTS = FisherOptions()

#: The keyword options ``EWC.consolidate`` passes on (its ``kind`` apart), as ``fisher_diag`` names them.
OPTION_NAMES = (
    "likelihood",
    "mc_samples",
    "num_samples",
    "progress",
    "generator",
    "class_dim",
    "ignore_index",
    "outputs",
    "group",
)


def parse_options(
    kind: str = DEFAULTS.kind,
    likelihood: Union[str, LikelihoodFn] = DEFAULTS.likelihood,
    *,
    where: str = "fisher_diag",
    **options: Any,
) -> FisherOptions:
    """Checks the options of an estimation; every failure names the argument and what was expected.

    Args:
        kind: the Fisher kind.
        likelihood: a name of :data:`LIKELIHOODS` or a callable.
        where: the entry the options were given to (named by the error for an unknown option).
        **options: any of :data:`OPTION_NAMES` but ``likelihood``, as ``fisher_diag`` takes them;
            absent ones take :data:`DEFAULTS`.

    Returns:
        The checked options.

    Raises:
        TypeError: an option that no estimation takes.
        ValueError: a value outside what the option accepts.
    """
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(
            f"{where}: unexpected Fisher option(s) {', '.join(unknown)}; expected any of {', '.join(OPTION_NAMES)}"
        )
    mc_samples = options.get("mc_samples", DEFAULTS.mc_samples)
    num_samples = options.get("num_samples", DEFAULTS.num_samples)
    class_dim = options.get("class_dim", DEFAULTS.class_dim)
    ignore_index = options.get("ignore_index", DEFAULTS.ignore_index)
    pick = options.get("outputs", DEFAULTS.pick)
    progress = options.get("progress", DEFAULTS.progress)
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
        raise ValueError(
            f"likelihood: expected 'categorical', 'causal_lm', 'gaussian' or a callable; got {likelihood!r}"
        )
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples: expected a positive integer, got {mc_samples!r}")
    if num_samples is not None and (
        isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1
    ):
        raise ValueError(f"num_samples: expected None or a positive integer, got {num_samples!r}")
    for name, value in (("class_dim", class_dim), ("ignore_index", ignore_index)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}: expected an integer, got {value!r}")
    if pick is not None and not callable(pick):
        raise ValueError(f"outputs: expected None or a callable that picks the logits, got {pick!r}")
    if not isinstance(progress, bool):
        raise ValueError(f"progress: expected True or False, got {progress!r}")
    return FisherOptions(
        kind=kind,
        likelihood=lik,
        loglik_fn=likelihood if callable(likelihood) else None,
        mc_samples=mc_samples,
        num_samples=num_samples,
        generator=options.get("generator", DEFAULTS.generator),
        class_dim=class_dim,
        ignore_index=ignore_index,
        pick=pick,
        progress=progress,
        group=options.get("group", DEFAULTS.group),
    )
