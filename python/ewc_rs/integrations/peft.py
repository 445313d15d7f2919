"""EWC with PEFT/LoRA models: two recipes.

(a) Protect the adapters. ``EWC(peft_model, lam)`` selects the parameters that require grad
(``params=None``), and PEFT freezes the base model, so F and θ* are those of the LoRA matrices (and
of any ``modules_to_save``): train adapter on task A, ``ewc.consolidate(loader_a)``, keep training the
same adapter on task B with ``loss + ewc.penalty(peft_model)``. No code here is needed for it.

(b) Protect the base weights through a new adapter, :func:`lora_delta_penalty`. Estimate the Fisher
of the base weights on task A (``fisher_diag(model, loader_a)`` before ``get_peft_model``, which
changes the model in place; or on ``copy.deepcopy(peft_model).merge_and_unload()`` when task A was
learnt by an adapter that is now merged), then train a new LoRA adapter on task B with
``loss + lora_delta_penalty(peft_model, fisher, lam)``. Each LoRA layer's merged weight is
W = W0 + ΔW, ΔW = scaling · B @ A; with θ* = W0 (the frozen base weights) the EWC penalty of the
merged weights is (λ/2) Σ F (W − W0)² = (λ/2) Σ F ΔW².

Example (b)::

    fisher = fisher_diag(model, loader_a)                 # keys: the base model's names
    peft_model = get_peft_model(model, LoraConfig(target_modules=["fc1", "fc2"]))
    for x, y in loader_b:
        loss = F.cross_entropy(peft_model(x), y) + lora_delta_penalty(peft_model, fisher, lam=100.0)
        loss.backward(); opt.step(); opt.zero_grad()
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Optional

import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from ewc_rs.ewc import check_lam

__all__ = ["lora_delta_penalty", "lora_layers"]


def lora_delta_penalty(
    model: nn.Module, fisher: Mapping[str, Tensor], lam: float, *, adapters: Optional[Sequence[str]] = None
) -> Tensor:
    """The EWC penalty of the merged weights of a LoRA model, θ* = the base weights:
    P = (λ/2) Σ_layers Σ_i F_W,i ΔW_i², ΔW = Σ_adapters scaling · B @ A (PEFT's ``get_delta_weight``,
    so Linear, Conv, Embedding and ``fan_in_fan_out`` layers alike).

    This is what ``EWC`` would charge for the merged model ``merge_and_unload()`` whose θ* are the base
    weights W0, as long as the base weights stay frozen at W0 (PEFT's default) and only the LoRA
    matrices train. It is differentiable through autograd w.r.t. the LoRA parameters; memory: one ΔW
    per LoRA layer is materialised (and kept for the backward pass).

    Args:
        model: a PEFT model (``get_peft_model``) or a model with LoRA layers injected.
        fisher: ``{name: F}`` of the base weights, keyed by the base model's names (``"fc1.weight"``,
            as ``fisher_diag`` or ``EWC.consolidate`` on the model without LoRA return them); entries of
            other parameters are ignored.
        lam: λ ≥ 0.
        adapters: the adapters whose ΔW count; default: each layer's active adapters.

    Returns:
        A 0-d tensor (float32, or float64 for float64 weights) on the LoRA parameters' device.

    Raises:
        ValueError: no LoRA layer; a LoRA layer's base weight missing from ``fisher`` or of another
            shape; a merged adapter; a LoRA variant (DoRA, ...) or ``lora_bias``, whose merge is not W0 + ΔW;
            ``lam`` negative or not finite.

    Examples:
        ```python
        from collections import OrderedDict

        import torch
        import torch.nn.functional as F
        from peft import LoraConfig, get_peft_model
        from torch import nn
        from ewc_rs import fisher_diag
        from ewc_rs.integrations.peft import lora_delta_penalty

        model = nn.Sequential(OrderedDict(fc1=nn.Linear(4, 8), act=nn.Tanh(), fc2=nn.Linear(8, 3)))
        fisher = fisher_diag(model, [(torch.randn(16, 4), torch.randint(0, 3, (16,)))])  # task A, base names
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["fc1", "fc2"]))
        assert lora_delta_penalty(peft_model, fisher, lam=100.0).item() == 0.0  # PEFT starts with ΔW = 0
        opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
        for x, y in [(torch.randn(16, 4), torch.randint(0, 3, (16,)))] * 3:  # task B, a new adapter
            loss = F.cross_entropy(peft_model(x), y) + lora_delta_penalty(peft_model, fisher, lam=100.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert lora_delta_penalty(peft_model, fisher, lam=100.0).item() > 0.0
        ```
    """
    lam = check_lam(lam)
    total: Optional[Tensor] = None
    for name, layer in lora_layers(model):
        chosen = _adapters(name, layer, adapters)
        if not chosen:
            continue
        delta = sum(layer.get_delta_weight(a) for a in chosen)
        assert isinstance(delta, Tensor)
        f = _fisher_entry(fisher, f"{name}.weight", name, tuple(delta.shape))
        dtype = torch.promote_types(delta.dtype, torch.float32)
        term = (f.to(device=delta.device, dtype=dtype) * delta.to(dtype).square()).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("model: no LoRA layer with an active (or named) adapter found")
    return 0.5 * lam * total


def lora_layers(model: nn.Module) -> Iterator[tuple[str, Any]]:
    """The LoRA layers of ``model`` named as in the base model (a PEFT model's ``get_base_model()``).

    Args:
        model: a PEFT model, or any module with LoRA layers.

    Yields:
        ``(name, layer)``; ``f"{name}.weight"`` is the base weight's name in the model without LoRA.

    Examples:
        ```python
        from collections import OrderedDict

        from peft import LoraConfig, get_peft_model
        from torch import nn
        from ewc_rs.integrations.peft import lora_layers

        model = nn.Sequential(OrderedDict(fc1=nn.Linear(4, 8), act=nn.Tanh(), fc2=nn.Linear(8, 3)))
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["fc2"]))
        assert [name for name, layer in lora_layers(peft_model)] == ["fc2"]
        ```
    """
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _adapters(name: str, layer: Any, adapters: Optional[Sequence[str]]) -> list[str]:
    wanted = list(layer.active_adapters) if adapters is None else list(adapters)
    chosen = [a for a in wanted if a in layer.scaling]
    for a in chosen:
        if a in layer.merged_adapters:
            raise ValueError(f"model: adapter {a!r} of {name!r} is merged into the base weight; unmerge it first")
        if a in getattr(layer, "lora_variant", {}):
            raise ValueError(
                f"model: adapter {a!r} of {name!r} is a LoRA variant (e.g. DoRA): its merge is not W0 + ΔW"
            )
        if getattr(layer, "lora_bias", {}).get(a, False):
            raise ValueError(f"model: adapter {a!r} of {name!r} has lora_bias=True, which also changes the bias")
    return chosen


def _fisher_entry(fisher: Mapping[str, Tensor], key: str, layer: str, shape: tuple[int, ...]) -> Tensor:
    if key not in fisher:
        raise ValueError(
            f"fisher: no entry {key!r} for the base weight of LoRA layer {layer!r}; estimate F on the model "
            "without LoRA (or on a merged copy), whose parameter names these are"
        )
    f = fisher[key]
    if tuple(f.shape) != shape:
        raise ValueError(f"fisher: {key!r} has shape {tuple(f.shape)}, the LoRA layer's weight {shape}")
    return f
