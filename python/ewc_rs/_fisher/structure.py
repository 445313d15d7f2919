"""Models whose structure alone shows what the once-per-estimation rule check tests: plain stacks
of layers that never mix samples, so the check can be left out.

The rule check (``Estimation._check_rules``) runs the model on two samples and compares the rules'
gradients with autograd's, to find parameters used outside the layer that owns them and layers whose
rows are not the batch's samples. In an ``nn.Sequential`` of the layers below, with no hooks, every
parameter is used by its own layer's forward only, and every tensor keeps the sample in dim 0, so
the check cannot find anything: it costs a forward and two backward passes for nothing (a third of
a one-batch estimate of a small MLP). Anything else (another module type, a subclass, an instance
``forward``, hooks, a parameter the rules do not cover, a callable likelihood, another dtype, a call
the rule would read across samples) leaves the check in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import torch
from torch import nn

from .recording import Call, RuleCoverage

#: Modules without parameters that act on each sample alone, whatever the input's shape (pooling
#: reads an unbatched input's dim 0 as channels, which it also keeps apart; dropout is off).
PER_SAMPLE: frozenset[type] = frozenset(
    {
        nn.Identity,
        nn.ReLU,
        nn.ReLU6,
        nn.LeakyReLU,
        nn.ELU,
        nn.SELU,
        nn.CELU,
        nn.GELU,
        nn.SiLU,
        nn.Mish,
        nn.Tanh,
        nn.Sigmoid,
        nn.Hardtanh,
        nn.Hardsigmoid,
        nn.Hardswish,
        nn.Softplus,
        nn.Dropout,
        nn.Dropout1d,
        nn.Dropout2d,
        nn.AlphaDropout,
        nn.MaxPool1d,
        nn.MaxPool2d,
        nn.AvgPool1d,
        nn.AvgPool2d,
        nn.AdaptiveAvgPool1d,
        nn.AdaptiveAvgPool2d,
        nn.AdaptiveMaxPool1d,
        nn.AdaptiveMaxPool2d,
    }
)

#: Layers with a rule, each with the test that an input of that many dimensions is a batch (so that
#: the layer keeps its rows apart): not an unbatched convolution input, not a normalisation over
#: dim 0.
_KEEPS_SAMPLES: dict[type, Callable[[Any, int], bool]] = {
    nn.Linear: lambda m, d: d >= 2,
    nn.Conv1d: lambda m, d: d == 3,
    nn.Conv2d: lambda m, d: d == 4,
    nn.BatchNorm1d: lambda m, d: d in (2, 3),
    nn.BatchNorm2d: lambda m, d: d == 4,
    nn.LayerNorm: lambda m, d: d > len(m.normalized_shape),
    nn.GroupNorm: lambda m, d: d >= 2,
    nn.Embedding: lambda m, d: d >= 1,
}
if hasattr(nn, "RMSNorm"):
    _KEEPS_SAMPLES[nn.RMSNorm] = lambda m, d: d > len(m.normalized_shape)

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def plain_stack(model: nn.Module, coverage: RuleCoverage, own_hooks: set[int]) -> bool:
    """Whether ``model`` is a plain stack whose rule check cannot find anything, as far as its
    structure tells (the first batch's calls are looked at by :func:`calls_keep_samples`).

    Args:
        model: the model being estimated.
        coverage: its rule coverage (every trainable parameter must be covered by a rule).
        own_hooks: ids of the recorder's own forward hooks (any other hook disqualifies).

    Returns:
        True when every module is an ``nn.Sequential``, a layer of ``PER_SAMPLE`` or a layer with
        a rule and trainable parameters (exact types, class ``forward``, no hooks), every trainable
        parameter is float32, has no gradient hook and is covered by a rule, and no
        global module hook is registered.
    """
    if coverage.fallback or coverage.decomposed():
        return False
    if any(len(getattr(torch.nn.modules.module, name, {})) for name in _GLOBAL_HOOKS):
        return False
    for p in coverage.params:
        if p.dtype != torch.float32 or p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None):
            return False
    recorded = {id(site.module) for site in coverage.sites}
    for m in model.modules():
        kind = type(m)
        if "forward" in vars(m):
            return False
        # Frozen or without parameters, its calls are not recorded, so not looked at. (What mixes
        # samples with parameters, an Embedding with max_norm or a BatchNorm without running
        # statistics, has no rule: its parameters are in the fallback, refused above.)
        if kind in _KEEPS_SAMPLES and id(m) not in recorded:
            return False
        if (
            kind is not nn.Sequential
            and kind not in PER_SAMPLE
            and kind not in _KEEPS_SAMPLES
            and kind is not nn.Flatten
        ):
            return False
        if kind is nn.Flatten and not (isinstance(m.start_dim, int) and m.start_dim >= 1):
            return False
        for name in _HOOK_DICTS:
            if set(getattr(m, name, {})) - own_hooks:
                return False
    return True


def calls_keep_samples(calls: Sequence[Call], n: int) -> bool:
    """Whether every recorded call of a :func:`plain_stack` reads sample i from row i: each input
    has the batch's ``n`` rows in dim 0 and the dimensions for which its layer keeps them apart.

    Args:
        calls: the first batch's recorded calls.
        n: the batch's sample count.

    Returns:
        True when every call is readable, not a broadcast shared row, and of a shape its layer
        treats as a batch.
    """
    for c in calls:
        if not c.readable or c.broadcast or c.input.dim() == 0 or c.input.shape[0] != n:
            return False
        keeps = _KEEPS_SAMPLES.get(type(c.site.module))
        if keeps is None or not keeps(c.site.module, c.input.dim()):
            return False
    return True
