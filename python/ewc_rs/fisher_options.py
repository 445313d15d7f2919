"""The options of one Fisher estimation, checked (:func:`parse_options`), and what is derived from
them per batch: the model's outputs read as the likelihood needs them (``prepare``), the native
root specification (``_core.RootSpec``) and the ``mc`` draws."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from . import _core
from .batches import LikelihoodFn
from .outputs import OutputsFn, check_positions, select_logits, to_positions

KINDS = ("exact", "mc", "empirical", "batched")
LIKELIHOODS = ("categorical", "causal_lm", "gaussian")


@dataclass(frozen=True)
class FisherOptions:
    """The validated options of one estimation (see ``fisher.fisher_diag``)."""

    kind: str
    #: 'categorical', 'causal_lm', 'gaussian', or 'custom' when ``loglik_fn`` is given.
    likelihood: str
    loglik_fn: Optional[LikelihoodFn]
    mc_samples: int
    num_samples: Optional[int]
    generator: Optional[torch.Generator]
    class_dim: int = -1
    ignore_index: int = -100
    #: The user's ``outputs=`` callable (None: tensor, first element, or ``"logits"``).
    pick: Optional[OutputsFn] = None

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


def parse_options(kind: str, likelihood: Union[str, LikelihoodFn], **options: Any) -> FisherOptions:
    """Checks the options of ``fisher_diag``; every failure names the argument and what was expected.

    Args:
        kind: the Fisher kind.
        likelihood: a name of :data:`LIKELIHOODS` or a callable.
        **options: ``mc_samples``, ``num_samples``, ``generator``, ``class_dim``, ``ignore_index``,
            ``outputs`` as ``fisher_diag`` takes them.

    Returns:
        The checked options.
    """
    mc_samples, num_samples = options["mc_samples"], options["num_samples"]
    class_dim, ignore_index, pick = options["class_dim"], options["ignore_index"], options["outputs"]
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
    return FisherOptions(
        kind=kind,
        likelihood=lik,
        loglik_fn=likelihood if callable(likelihood) else None,
        mc_samples=mc_samples,
        num_samples=num_samples,
        generator=options["generator"],
        class_dim=class_dim,
        ignore_index=ignore_index,
        pick=pick,
    )
