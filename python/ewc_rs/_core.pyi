"""Typed signatures of the native module ``ewc_rs._core`` (Rust, tch, pyo3)."""

from typing import Optional, Sequence

import torch

__all__ = ["__version__", "TORCH_VERSION", "fisher_accumulate", "fisher_rule_mismatch", "penalty", "accumulate"]
__version__: str
TORCH_VERSION: str

_Capture = tuple[
    str, torch.Tensor, torch.Tensor, Optional[int], Optional[int], Sequence[int], Sequence[float], Sequence[torch.Tensor]
]

def fisher_accumulate(
    outputs: torch.Tensor,
    targets: Optional[torch.Tensor],
    kind: str,
    likelihood: str,
    mc: Optional[torch.Tensor],
    loglik: Optional[torch.Tensor],
    captures: Sequence[_Capture],
    direct: Sequence[tuple[torch.Tensor, int]],
    accumulators: Sequence[torch.Tensor],
    names: Sequence[str],
    budget_bytes: int,
) -> None:
    """Adds one batch's Σ_n (per-sample gradient)² into ``accumulators`` in place."""

def fisher_rule_mismatch(
    outputs: torch.Tensor,
    targets: Optional[torch.Tensor],
    kind: str,
    likelihood: str,
    mc: Optional[torch.Tensor],
    loglik: Optional[torch.Tensor],
    captures: Sequence[_Capture],
    params: Sequence[tuple[int, torch.Tensor]],
    budget_bytes: int,
) -> list[tuple[int, float]]:
    """Relative difference per slot between the rules' summed gradients and autograd's."""

def penalty(
    params: Sequence[torch.Tensor],
    star: torch.Tensor,
    fisher: torch.Tensor,
    lam: float,
    out: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(λ/2) Σ F (θ−θ*)² as a 0-d tensor, λF(θ−θ*) as one flat tensor (``out`` if given), and
    that tensor's views shaped like each parameter."""


def accumulate(
    params: Sequence[torch.Tensor],
    star: torch.Tensor,
    fisher: torch.Tensor,
    lam: float,
    scale: float,
) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
    """Adds ``scale``·λF(θ−θ*) into the parameters' ``.grad`` in place (CPU); returns the penalty
    and ``(index, gradient)`` for each parameter whose ``.grad`` was absent or not writable in
    place, for the caller to install or add."""
