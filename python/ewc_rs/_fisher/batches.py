"""Batches as the Fisher engine meets them: ``(inputs, targets)`` where inputs are a tensor
(``model(x)``), a tuple/list (``model(*x)``) or a dict (``model(**x)``), numpy arrays allowed
anywhere tensors are; converting, moving, slicing and checking them, and calling the model on them."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn

#: A callable likelihood: ``(outputs, targets) -> per-sample log-likelihood [N]``.
LikelihoodFn = Callable[[Any, Any], torch.Tensor]


def map_tensors(fn: Callable[[Any], Any], x: Any, leaf: type = torch.Tensor) -> Any:
    """``fn`` applied to every ``leaf`` (a tensor, by default) of a batch element (a leaf, or a
    tuple/list/dict of them); anything else is returned as it is."""
    if isinstance(x, leaf):
        return fn(x)
    if isinstance(x, (tuple, list)):
        return type(x)(map_tensors(fn, v, leaf) for v in x)
    if isinstance(x, dict):
        return {k: map_tensors(fn, v, leaf) for k, v in x.items()}
    return x


def as_tensors(x: Any) -> Any:
    """A batch element with every numpy array turned into a tensor: zero-copy (``torch.from_numpy``,
    which keeps the array alive) when the array is writable, else a copy."""
    return map_tensors(_numpy_to_tensor, x, np.ndarray)


def _numpy_to_tensor(a: np.ndarray) -> torch.Tensor:
    if a.dtype == object or a.dtype.kind in "USV":
        raise TypeError(f"loader: a numpy array of dtype {a.dtype} cannot become a tensor; expected numbers")
    return torch.from_numpy(a) if a.flags.writeable else torch.tensor(a)


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
