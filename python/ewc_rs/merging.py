"""Fisher-weighted model merging (Matena & Raffel 2022, "Merging Models with Fisher-Weighted
Averaging"): ``fisher_merge``.

For each tensor of the models' state dicts, with weights w_i (default: equal) and ε = ``eps``::

    θ = Σ_i w_i (F_i + ε) θ_i / Σ_i w_i (F_i + ε)

with F_i the diagonal Fisher of model i (e.g. :func:`ewc_rs.fisher_diag`, or a file from
:func:`ewc_rs.save_fisher`). The sums run in Rust, one pass per tensor over the inputs, writing
only the output (no copy of any model). Tensors without a Fisher (buffers such as BatchNorm's
running statistics, frozen parameters) are averaged with the weights, Σ w_i θ_i / Σ w_i, as are
elements where every w_i (F_i + ε) is 0; integer buffers (``num_batches_tracked``) are taken from
the first model. Tensors that share memory in the first model (tied weights) stay shared.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Optional, Union

import torch
from torch import nn

from . import _core
from ._state.fisher_dict import checked
from ._state.fisher_file import load_fisher

__all__ = ["fisher_merge"]

ModelLike = Union[nn.Module, Mapping[str, torch.Tensor]]
FisherLike = Union[Mapping[str, torch.Tensor], str, "os.PathLike[str]"]


def fisher_merge(
    models_or_state_dicts: Sequence[ModelLike],
    fishers: Optional[Sequence[FisherLike]],
    *,
    weights: Optional[Sequence[float]] = None,
    eps: float = 1e-8,
) -> dict[str, torch.Tensor]:
    """Merges models by Fisher-weighted averaging (formula and rules: the module doc).

    Args:
        models_or_state_dicts: the models (``nn.Module``) or their state dicts, with the same keys,
            shapes and dtypes.
        fishers: one diagonal Fisher per model, ``{parameter name: F}`` or the folder of a Fisher
            file; every Fisher names the same parameters, each a floating-point entry of the state
            dicts, with its shape. None: no Fisher, every tensor is the weighted average (the
            baseline a Fisher merge is compared with).
        weights: one non-negative weight per model, with a positive sum (default: equal).
        eps: added to every Fisher (≥ 0); where all Fishers of an element are 0 the weighted
            average is used whatever ``eps``.

    Returns:
        The merged state dict (keys in the first model's order, tensors on its devices and dtypes),
        ready for ``model.load_state_dict``.

    Raises:
        ValueError: fewer than one model, a count of Fishers or weights other than the models',
            state dicts whose keys, shapes or dtypes differ, a Fisher naming a tensor the models
            lack or of another shape, Fishers naming different parameters, a negative or
            non-finite Fisher, weights or ``eps`` that are negative, not finite, or sum to 0.

    Examples:
        ```python
        import torch
        from torch import nn
        from ewc_rs import fisher_diag, fisher_merge

        task_a, task_b = nn.Linear(4, 3), nn.Linear(4, 3)
        fishers = [
            fisher_diag(model, [(torch.randn(16, 4), torch.randint(0, 3, (16,)))], kind="exact")
            for model in (task_a, task_b)
        ]
        merged = fisher_merge([task_a, task_b], fishers)
        model = nn.Linear(4, 3)
        model.load_state_dict(merged)
        lo = torch.minimum(task_a.weight, task_b.weight)
        hi = torch.maximum(task_a.weight, task_b.weight)
        assert bool(((lo - 1e-6 <= model.weight) & (model.weight <= hi + 1e-6)).all())  # elementwise between
        ```
    """
    states = _state_dicts(models_or_state_dicts)
    n = len(states)
    if fishers is not None and (isinstance(fishers, (str, os.PathLike, Mapping)) or len(fishers) != n):
        got = "one" if isinstance(fishers, (str, os.PathLike, Mapping)) else len(fishers)
        raise ValueError(f"fishers: expected a sequence of one Fisher per model ({n}), got {got}")
    w = _weights(weights, n)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps: expected a finite non-negative number, got {eps!r}")
    no_fisher: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    loaded = no_fisher if fishers is None else [_fisher(f, f"fishers[{i}]") for i, f in enumerate(fishers)]
    names = set(loaded[0])
    for i, f in enumerate(loaded):
        if set(f) != names:
            odd = sorted(set(f) ^ names)[0]
            raise ValueError(f"fishers[{i}]: names other parameters than fishers[0] (e.g. '{odd}')")
        for name, t in f.items():
            ref = states[0].get(name)
            if ref is None or not ref.is_floating_point() or ref.shape != t.shape:
                has = (
                    "no such entry"
                    if ref is None
                    else f"shape {tuple(ref.shape)}, {str(ref.dtype).replace('torch.', '')}"
                )
                raise ValueError(f"fishers[{i}]: '{name}' has shape {tuple(t.shape)}; the models' state dict has {has}")
    merged: dict[str, torch.Tensor] = {}
    shared: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], str] = {}
    for key, ref in states[0].items():
        alias = (ref.untyped_storage().data_ptr(), int(ref.storage_offset()), tuple(ref.shape), ref.stride())
        if ref.numel() and alias in shared and all(_same(s[key], s[shared[alias]]) for s in states):
            merged[key] = merged[shared[alias]]
            continue
        shared.setdefault(alias, key)
        thetas = [s[key].detach() for s in states]
        if not ref.is_floating_point():
            merged[key] = thetas[0].clone()
            continue
        fs = [f[key].detach().to(ref.device) for f in loaded] if key in names else None
        merged[key] = _core.merge(thetas, fs, w, float(eps))
    return merged


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def _state_dicts(models: Sequence[ModelLike]) -> list[dict[str, torch.Tensor]]:
    if isinstance(models, (nn.Module, Mapping)) or not isinstance(models, Sequence) or not models:
        raise ValueError("models_or_state_dicts: expected a non-empty sequence of models or state dicts")
    states = []
    for i, m in enumerate(models):
        if isinstance(m, nn.Module):
            states.append(dict(m.state_dict(keep_vars=False)))
        elif isinstance(m, Mapping) and all(isinstance(t, torch.Tensor) for t in m.values()):
            states.append(dict(m))
        else:
            raise ValueError(f"models_or_state_dicts[{i}]: expected an nn.Module or a state dict of tensors")
    first = states[0]
    for i, s in enumerate(states[1:], start=1):
        if set(s) != set(first):
            odd = sorted(set(s) ^ set(first))[0]
            raise ValueError(f"models_or_state_dicts[{i}]: its keys differ from the first model's (e.g. '{odd}')")
        for key, t in s.items():
            ref = first[key]
            if t.shape != ref.shape or t.dtype != ref.dtype:
                raise ValueError(
                    f"models_or_state_dicts[{i}]: '{key}' has shape {tuple(t.shape)} {t.dtype}, "
                    f"the first model's {tuple(ref.shape)} {ref.dtype}"
                )
    return states


def _weights(weights: Optional[Sequence[float]], n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) != n:
        raise ValueError(f"weights: expected one weight per model ({n}), got {weights!r}")
    out = []
    for i, v in enumerate(weights):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"weights[{i}]: expected a finite non-negative number, got {v!r}")
        out.append(float(v))
    if sum(out) <= 0:
        raise ValueError(f"weights: expected a positive sum, got {weights!r}")
    return out


def _fisher(fisher: FisherLike, where: str) -> dict[str, torch.Tensor]:
    if isinstance(fisher, (str, os.PathLike)):
        try:
            return load_fisher(fisher)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    try:
        return checked(fisher)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
