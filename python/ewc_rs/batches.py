"""Batches as the Fisher engine meets them: ``(inputs, targets)`` where inputs are a tensor
(``model(x)``), a tuple/list (``model(*x)``) or a dict (``model(**x)``); moving, slicing and
checking them, and calling the model on them."""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from torch import nn

#: A callable likelihood: ``(outputs, targets) -> per-sample log-likelihood [N]``.
LikelihoodFn = Callable[[Any, Any], torch.Tensor]


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], x: Any) -> Any:
    """``fn`` applied to every tensor of a batch element (a tensor, or a tuple/list/dict of them);
    anything else is returned as it is."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, (tuple, list)):
        return type(x)(map_tensors(fn, v) for v in x)
    if isinstance(x, dict):
        return {k: map_tensors(fn, v) for k, v in x.items()}
    return x


def to_device(x: Any, device: torch.device) -> Any:
    return map_tensors(lambda t: t.to(device), x)


def take(x: Any, sl: slice) -> Any:
    """Rows ``sl`` of a batch element."""
    return map_tensors(lambda t: t[sl], x)


def unsqueeze(x: Any) -> Any:
    """A batch of one: a leading dimension on every tensor."""
    return map_tensors(lambda t: t.unsqueeze(0), x)


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
        f"loader: batch {index}: inputs must be a tensor, or a tuple/list/dict holding tensors; got {type(x).__name__}"
    )


def unpack(batch: Any, index: int) -> tuple[Any, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        what = f"a {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        raise ValueError(f"loader: batch {index} must be a pair (inputs, targets), got {what}")
    return batch[0], batch[1]


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
