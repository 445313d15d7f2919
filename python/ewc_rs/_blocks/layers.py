"""A layer's weight and bias as one matrix W̃ = [W, b] (``[out, in(+1)]``): the Kronecker form
that the native rule registry gives a layer type, and the parameter names of a layer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch
from torch import nn

from .. import _core


def param_name(module: str, attr: str) -> str:
    """The parameter name of ``module``'s ``attr`` (``"weight"``/``"bias"``) in ``named_parameters``."""
    return f"{module}.{attr}" if module else attr


def kfac_form(module: nn.Module) -> Optional[tuple[int, int, bool]]:
    """``(inputs, outputs, transposed)`` of ``module``'s weight as a KFAC matrix, or None.

    Args:
        module: any module.

    Returns:
        The form, or None when the module has no Kronecker-factored rule (or no weight).
    """
    weight = getattr(module, "weight", None)
    rule = _core.layer_rule(module)
    if rule is None or not isinstance(weight, torch.Tensor):
        return None
    return rule.kfac_form(list(weight.shape))


def matrix(weight: torch.Tensor, bias: Optional[torch.Tensor], transposed: bool) -> torch.Tensor:
    """W̃ = [W, b] as ``[out, in(+1)]`` in float32 (detached)."""
    w = weight.detach().float()
    m = w.T if transposed else w.reshape(w.shape[0], -1)
    return torch.cat([m, bias.detach().float()[:, None]], 1) if bias is not None else m


def layer_misfit(
    name: str, dims: tuple[int, int], has_bias: bool, model: nn.Module, named: Mapping[str, nn.Parameter]
) -> Optional[str]:
    """Why a stored layer with a ``dims = (in(+1), out)`` matrix form does not fit ``model``, or None.

    Args:
        name: the layer's module name.
        dims: the stored form's rows of A (inputs, plus one with a bias) and of G (outputs).
        has_bias: whether the stored form includes the bias.
        model: the model.
        named: its parameters by name.

    Returns:
        A message naming the layer and both shapes, or None.
    """
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    form = kfac_form(module) if module is not None else None
    if module is None or form is None:
        return f"layer '{name}' has Kronecker factors, but the model has no such Linear/Conv layer"
    want = (form[0] + int(has_bias), form[1])
    weight: torch.Tensor = module.weight  # type: ignore[assignment]  # kfac_form found a tensor there
    if tuple(dims) != want:
        return (
            f"layer '{name}': factors A {(dims[0], dims[0])} and G {(dims[1], dims[1])} do not fit its weight "
            f"{tuple(weight.shape)} (expected A ({want[0]}, {want[0]}), G ({want[1]}, {want[1]}))"
        )
    if has_bias and param_name(name, "bias") not in named:
        return f"layer '{name}': its factors include a bias, but the model's layer has none"
    return None
