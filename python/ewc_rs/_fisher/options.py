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

    def draw_mc(self, outputs: torch.Tensor) -> torch.Tensor:
        """Labels drawn from p(·|x): ``[N, S]`` for logits ``[N, C]``, ``[N, P, S]`` for ``[N, P, C]``
        (one per position and draw, under teacher forcing); or noise ``[N, S, D]`` (gaussian)."""
        out = outputs.detach().float()
        if not torch.isfinite(out).all():
            raise ValueError(
                "model outputs: non-finite values (NaN or inf), so kind='mc' cannot draw labels from "
                "them: check the model's outputs and the data for NaN/inf"
            )
        gen = self.generator
        gen_device = gen.device if gen is not None else out.device
        shape = self.draw_shape(out)
        if self.likelihood != "gaussian":
            probs = torch.softmax(out, dim=-1).to(gen_device)
            flat = probs.reshape(-1, probs.shape[-1])
            draws = torch.multinomial(flat, self.mc_samples, replacement=True, generator=gen).reshape(shape)
        else:
            draws = torch.randn(shape, generator=gen, device=gen_device)
        return draws.to(out.device)


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
