"""The options of one Fisher estimation, checked (:func:`parse_options`), and what is derived from
them per batch: the native root specification (``_core.RootSpec``) and the ``mc`` draws."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from . import _core
from .batches import LikelihoodFn, loglik

KINDS = ("exact", "mc", "empirical", "batched")
LIKELIHOODS = ("categorical", "gaussian")


@dataclass(frozen=True)
class FisherOptions:
    """The validated options of one estimation (see ``fisher.fisher_diag``)."""

    kind: str
    #: 'categorical', 'gaussian', or 'custom' when ``loglik_fn`` is given.
    likelihood: str
    loglik_fn: Optional[LikelihoodFn]
    mc_samples: int
    num_samples: Optional[int]
    generator: Optional[torch.Generator]

    def roots(
        self, out: torch.Tensor, y: Any, *, mc_draws: Optional[torch.Tensor] = None, kind: Optional[str] = None
    ) -> _core.RootSpec:
        """The native root specification for a batch's outputs and targets."""
        fn = self.loglik_fn
        return _core.RootSpec(
            kind=kind or self.kind,
            likelihood=self.likelihood,
            targets=y if fn is None else None,
            mc_draws=mc_draws,
            loglik=None if fn is None else loglik(fn, out, y),
        )

    def draw_mc(self, outputs: torch.Tensor) -> torch.Tensor:
        """Labels ``[N, S]`` drawn from p(·|x) (categorical) or noise ``[N, S, D]`` (gaussian)."""
        out = outputs.detach().float()
        # Checked here because torch.multinomial would fail first, with a message naming neither.
        if self.likelihood == "categorical" and out.dim() != 2:
            raise ValueError(
                f"model outputs: likelihood 'categorical' expects logits of shape [N, C], got {list(out.shape)}"
            )
        if not torch.isfinite(out).all():
            raise ValueError(
                "model outputs: non-finite values (NaN or inf), so kind='mc' cannot draw labels from "
                "them: check the model's outputs and the data for NaN/inf"
            )
        gen = self.generator
        gen_device = gen.device if gen is not None else out.device
        if self.likelihood == "categorical":
            probs = torch.softmax(out, dim=1).to(gen_device)
            draws = torch.multinomial(probs, self.mc_samples, replacement=True, generator=gen)
        else:
            out2 = out.reshape(out.shape[0], -1)
            draws = torch.randn(out2.shape[0], self.mc_samples, out2.shape[1], generator=gen, device=gen_device)
        return draws.to(out.device)


def parse_options(
    kind: str,
    likelihood: Union[str, LikelihoodFn],
    mc_samples: int,
    num_samples: Optional[int],
    generator: Optional[torch.Generator],
) -> FisherOptions:
    """Checks the options; every failure names the argument and what was expected."""
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
    if num_samples is not None and (
        isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1
    ):
        raise ValueError(f"num_samples: expected None or a positive integer, got {num_samples!r}")
    loglik_fn = likelihood if callable(likelihood) else None
    return FisherOptions(
        kind=kind,
        likelihood=lik,
        loglik_fn=loglik_fn,
        mc_samples=mc_samples,
        num_samples=num_samples,
        generator=generator,
    )
