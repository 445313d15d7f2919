"""Batches as the Fisher engine meets them: ``(inputs, targets)`` where inputs are a tensor
(``model(x)``), a tuple/list (``model(*x)``) or a dict (``model(**x)``); moving, slicing and
checking them, and calling the model on them."""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from torch import nn

#: A callable likelihood: ``(outputs, targets) -> per-sample log-likelihood [N]``.
LikelihoodFn = Callable[[Any, Any], torch.Tensor]


def to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def take(x: Any, sl: slice) -> Any:
    """Rows ``sl`` of a batch element (tensor, tuple/list or dict of tensors)."""
    if isinstance(x, torch.Tensor):
        return x[sl]
    if isinstance(x, (tuple, list)):
        return type(x)(take(v, sl) for v in x)
    if isinstance(x, dict):
        return {k: take(v, sl) for k, v in x.items()}
    return x


def call_model(model: nn.Module, x: Any) -> Any:
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def batch_size(x: Any, index: int) -> int:
    if isinstance(x, torch.Tensor):
        if x.dim() == 0:
            raise ValueError(f"loader: batch {index}: inputs are a 0-d tensor; expected a batch dimension")
        return int(x.shape[0])
    items = list(x.values()) if isinstance(x, dict) else list(x) if isinstance(x, (tuple, list)) else []
    for v in items:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise ValueError(
        f"loader: batch {index}: inputs must be a tensor, or a tuple/list/dict holding tensors; "
        f"got {type(x).__name__}"
    )


def unpack(batch: Any, index: int) -> tuple[Any, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        what = f"a {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        raise ValueError(f"loader: batch {index} must be a pair (inputs, targets), got {what}")
    return batch[0], batch[1]


def unsqueeze(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.unsqueeze(0)
    if isinstance(x, (tuple, list)):
        return type(x)(unsqueeze(v) for v in x)
    if isinstance(x, dict):
        return {k: unsqueeze(v) for k, v in x.items()}
    return x


def loglik(likelihood: Union[str, LikelihoodFn], out: Any, y: Any) -> Optional[torch.Tensor]:
    if not callable(likelihood):
        return None
    ll = likelihood(out, y)
    if not isinstance(ll, torch.Tensor):
        raise TypeError(f"likelihood: the callable must return a tensor [N], got {type(ll).__name__}")
    return ll


def check_outputs(out: Any) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise ValueError(
            f"model outputs: expected a tensor, got {type(out).__name__}; wrap the model so that it "
            "returns the logits (categorical) or predictions (gaussian)"
        )
    return out
