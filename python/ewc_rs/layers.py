"""Registry of layer types whose per-sample squared gradients have a vectorised rule in Rust.

Looked up by exact type (a subclass may override ``forward`` and break the rule's maths). A rule
spec tells the Rust side which rule to run and with which configuration; ``None`` means "this
instance's configuration is not covered" and its parameters go to the exact fallback.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple

import torch
from torch import nn

#: ``(rule name, ints, floats, tensors)`` as the Rust side expects them.
RuleSpec = Tuple[str, Sequence[int], Sequence[float], Sequence[torch.Tensor]]
SpecFn = Callable[[nn.Module], Optional[RuleSpec]]

_RULES: dict[type, SpecFn] = {}


def register_rule(*types: type) -> Callable[[SpecFn], SpecFn]:
    """Registers a spec function for the given module types (exact type match)."""

    def deco(fn: SpecFn) -> SpecFn:
        for t in types:
            _RULES[t] = fn
        return fn

    return deco


def rule_for(module: nn.Module) -> Optional[RuleSpec]:
    """The rule spec of ``module``, or None when it has no rule (its parameters use the fallback)."""
    fn = _RULES.get(type(module))
    return fn(module) if fn is not None else None


@register_rule(nn.Linear)
def _linear(m: Any) -> Optional[RuleSpec]:
    return ("linear", [], [], [])


def _explicit_padding(m: Any) -> Optional[list[int]]:
    """Padding as integers; string padding ('same', 'valid') when it is symmetric, else None."""
    pad = m.padding
    if not isinstance(pad, str):
        return list(pad)
    if pad == "valid":
        return [0] * len(m.kernel_size)
    out = []
    for k, d in zip(m.kernel_size, m.dilation):
        total = d * (k - 1)
        if total % 2:
            return None  # asymmetric 'same' padding: leave it to the fallback
        out.append(total // 2)
    return out


@register_rule(nn.Conv1d, nn.Conv2d)
def _conv(m: Any) -> Optional[RuleSpec]:
    if m.padding_mode != "zeros":
        return None
    pad = _explicit_padding(m)
    if pad is None:
        return None
    k = list(m.kernel_size)
    ints = [len(k), *k, *m.stride, *pad, *m.dilation, m.groups]
    return ("conv", ints, [], [])


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d)
def _batch_norm(m: Any) -> Optional[RuleSpec]:
    # Without running statistics, eval mode normalises with batch statistics: samples interact.
    if m.running_mean is None or m.running_var is None:
        return None
    return ("batch_norm", [], [m.eps], [m.running_mean, m.running_var])


@register_rule(nn.LayerNorm)
def _layer_norm(m: Any) -> Optional[RuleSpec]:
    return ("layer_norm", [len(m.normalized_shape)], [m.eps], [])


@register_rule(nn.GroupNorm)
def _group_norm(m: Any) -> Optional[RuleSpec]:
    return ("group_norm", [m.num_groups], [m.eps], [])


@register_rule(nn.Embedding)
def _embedding(m: Any) -> Optional[RuleSpec]:
    # max_norm renormalises the table inside forward; scale_grad_by_freq couples samples.
    if m.max_norm is not None or m.scale_grad_by_freq:
        return None
    pad = m.padding_idx
    return ("embedding", [m.num_embeddings, -1 if pad is None else pad], [], [])
