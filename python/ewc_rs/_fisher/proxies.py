"""``linear_proxy``: an ``nn.Linear`` holding a layer's own raw parameters, so the Linear rule can record
projections that attention and recurrent layers compute from raw weights."""

from __future__ import annotations

from typing import Optional, cast

import torch
from torch import nn


def linear_proxy(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    """An ``nn.Linear`` holding the given parameter objects (not copies), allocating nothing.

    Args:
        weight: a ``[out, in]`` parameter of the layer.
        bias: its ``[out]`` bias parameter, or None.

    Returns:
        The proxy; its ``weight``/``bias`` are the very objects given.
    """
    lin = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(lin)
    lin.in_features, lin.out_features = weight.shape[1], weight.shape[0]
    # The layers keep their projection weights and biases as nn.Parameter objects.
    lin.register_parameter("weight", cast(nn.Parameter, weight))
    lin.register_parameter("bias", cast(Optional[nn.Parameter], bias))
    return lin
