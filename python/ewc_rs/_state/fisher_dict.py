"""A Fisher as a mapping: ``FisherDict`` (``{name: F}`` with ``.metadata``) and the check every
Fisher taken from a user passes (``checked``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch


class FisherDict(dict):  # type: ignore[type-arg]
    """``{parameter name: F}`` with ``.metadata``: what the estimation or the file says about it."""

    def __init__(self, data: Mapping[str, torch.Tensor] = (), metadata: Optional[Mapping[str, Any]] = None) -> None:  # type: ignore[assignment]
        super().__init__(data)
        self.metadata: dict[str, Any] = dict(metadata or {})


def checked(fisher: Any) -> dict[str, torch.Tensor]:
    """``fisher`` as a dict, if it maps names to finite non-negative float tensors.

    Raises:
        ValueError: anything else (named by ``fisher``).
    """
    if not isinstance(fisher, Mapping) or not fisher:
        raise ValueError("fisher: expected a non-empty mapping of parameter names to tensors")
    for n, f in fisher.items():
        if not isinstance(n, str) or not isinstance(f, torch.Tensor):
            raise ValueError(f"fisher: expected parameter names (str) mapped to tensors; got {n!r}: {type(f).__name__}")
        if not f.is_floating_point() or not torch.isfinite(f).all():
            raise ValueError(f"fisher: '{n}' must be a finite floating-point tensor")
        if (f < 0).any():
            raise ValueError(f"fisher: '{n}' has negative values (a Fisher is non-negative)")
    return dict(fisher)
