"""A Fisher as a mapping: ``FisherDict`` (``{name: F}`` with ``.metadata``) and the check every
Fisher taken from a user passes (``checked``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch


class FisherDict(dict):  # type: ignore[type-arg]
    """``{parameter name: F}`` with ``.metadata``: what the estimation or the file says about it.

    :func:`ewc_rs.fisher_diag` and :func:`ewc_rs.load_fisher` return one; it is a ``dict`` in every other way.

    Args:
        data: the ``{parameter name: F}`` entries (a mapping, or ``(name, F)`` pairs, as ``dict`` takes).
        metadata: what is known about the Fisher (``kind``, ``likelihood``, ``samples``, ...); copied.

    Raises:
        TypeError: ``data`` is neither a mapping nor an iterable of pairs, or ``metadata`` is not a mapping.
        ValueError: an item of ``data`` is a sequence of other than two elements.

    Examples:
        ```python
        import torch
        from torch import nn
        from ewc_rs import FisherDict, fisher_diag

        model = nn.Linear(4, 3)
        fisher = fisher_diag(model, [(torch.randn(8, 4), torch.randint(0, 3, (8,)))], kind="exact")
        assert isinstance(fisher, FisherDict) and fisher.metadata["samples"] == 8
        scaled = FisherDict({n: 2 * f for n, f in fisher.items()}, metadata=fisher.metadata)
        assert scaled.metadata["kind"] == "exact" and set(scaled) == {"weight", "bias"}
        ```
    """

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
