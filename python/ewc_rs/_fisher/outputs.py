"""From what a model returns to the tensor the likelihood reads.

1. ``select_logits``: a tensor as it is; a tuple or list, its first element; a dict or Hugging Face
   ``ModelOutput``, its ``"logits"``; anything else through the user's ``outputs=`` callable.
2. ``to_positions``: categorical logits with several positions per sample, in the layout the native
   roots read, ``[N, P, C]`` with targets ``[N, P]``:
   - ``likelihood="categorical"``: ``[N, ..., C]`` with targets ``[N, ...]`` (``class_dim=-1``, the
     Hugging Face layout) or ``[N, C, d1, ...]`` with targets ``[N, d1, ...]`` (``class_dim=1``, the
     layout of ``torch.nn.functional.cross_entropy``); ``[N, C]`` stays as it is;
   - ``likelihood="causal_lm"``: logits ``[N, T, V]`` and labels ``[N, T]`` as a causal language
     model takes them: position t predicts label t+1 (shifted here, as in its loss).

``to_positions`` is tensor operations only, so it also runs inside ``torch.func.vmap`` (the exact
fallback); ``check_positions`` holds the checks, run once per batch outside it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch

#: A callable that picks the logits (or predictions) out of whatever the model returns.
OutputsFn = Callable[[Any], torch.Tensor]


def select_logits(raw: Any, pick: Optional[OutputsFn] = None) -> torch.Tensor:
    """The logits (categorical) or predictions (gaussian) in a model's return value.

    Args:
        raw: what the model returned.
        pick: the user's ``outputs=`` callable, used when given.

    Returns:
        A tensor whose first dimension is the sample index.

    Raises:
        ValueError: nothing in ``raw`` is recognisably the logits.
    """
    out = pick(raw) if pick is not None else _default_pick(raw)
    if not isinstance(out, torch.Tensor):
        how = "the outputs= callable returned" if pick is not None else "model outputs: expected a tensor, got"
        raise ValueError(
            f"{how} {type(out).__name__}; pass outputs= a callable that picks the logits (categorical) "
            "or predictions (gaussian) from what the model returns"
        )
    return out


def _default_pick(raw: Any) -> Any:
    if isinstance(raw, torch.Tensor):
        return raw
    if isinstance(raw, (tuple, list)) and raw:
        return raw[0]
    if isinstance(raw, Mapping):  # dicts and Hugging Face ModelOutput (an OrderedDict)
        if "logits" in raw:
            return raw["logits"]
        raise ValueError(
            f"model outputs: a mapping without 'logits' (keys: {sorted(map(str, raw))}); pass outputs= a "
            "callable that picks the logits from it"
        )
    return raw


def to_positions(out: torch.Tensor, y: Any, likelihood: str, class_dim: int) -> tuple[torch.Tensor, Any]:
    """Logits (and targets) in the layout the roots read: ``[N, C]`` / ``[N]``, or ``[N, P, C]`` /
    ``[N, P]``. Other likelihoods pass through unchanged.

    Args:
        out: the selected logits.
        y: the targets (None, or a tensor).
        likelihood: ``"categorical"``, ``"causal_lm"``, ``"gaussian"`` or ``"custom"``.
        class_dim: the class dimension of categorical logits with more than two dimensions.

    Returns:
        ``(logits, targets)``.
    """
    has_y = isinstance(y, torch.Tensor)
    if likelihood == "causal_lm":
        return out[:, :-1, :], (y[:, 1:] if has_y else y)
    if likelihood != "categorical" or out.dim() <= 2:
        return out, y
    n = out.shape[0]
    if class_dim % out.dim() != out.dim() - 1:
        out = out.movedim(class_dim, -1)
    if out.dim() > 3:
        out = out.reshape(n, -1, out.shape[-1])
        y = y.reshape(n, -1) if has_y else y
    return out, y


def check_positions(out: torch.Tensor, y: Any, likelihood: str, class_dim: int) -> None:
    """Checks the logits' and targets' shapes before ``to_positions`` (once per batch).

    Args:
        out: the selected logits.
        y: the targets.
        likelihood: as for :func:`to_positions`.
        class_dim: as for :func:`to_positions`.

    Raises:
        ValueError: logits or targets of a shape the likelihood cannot read, naming what was expected.
    """
    shape = list(out.shape)
    if likelihood == "causal_lm":
        if out.dim() != 3 or out.shape[1] < 2:
            raise ValueError(f"model outputs: likelihood 'causal_lm' expects logits [N, T, V] with T >= 2, got {shape}")
        if isinstance(y, torch.Tensor) and list(y.shape) != shape[:2]:
            raise ValueError(
                f"targets: likelihood 'causal_lm' expects labels of shape {shape[:2]}, got {list(y.shape)}"
            )
        return
    if likelihood != "categorical" or out.dim() <= 2:
        return
    if not -out.dim() <= class_dim < out.dim() or class_dim % out.dim() == 0:
        raise ValueError(
            f"class_dim: expected a dimension of the logits {shape} other than the sample dimension 0, got {class_dim}"
        )
    expected = shape[: class_dim % out.dim()] + shape[class_dim % out.dim() + 1 :]
    if isinstance(y, torch.Tensor) and list(y.shape) != expected:
        raise ValueError(
            f"targets: expected shape {expected} (the logits {shape} without their class dimension "
            f"class_dim={class_dim}), got {list(y.shape)}"
        )
