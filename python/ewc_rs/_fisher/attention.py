"""``nn.MultiheadAttention`` for the Fisher engine: its projections seen as two Linear layers.

An attention layer keeps its input and output projections as raw parameters
(``in_proj_weight``/``in_proj_bias``, and ``out_proj``'s weight and bias used directly by
``F.multi_head_attention_forward``), so no per-layer rule can see them and they would go to the
(slower) per-sample fallback. While a Fisher estimate records, each eligible attention layer runs
an equivalent decomposed forward instead: ``qkv = in_proj(x)``, scaled dot-product attention per
head, ``out_proj(attn)``, where ``in_proj`` and ``out_proj`` are ``nn.Linear`` proxies holding the
layer's own parameter objects. The Linear rule then gives exact per-sample gradients.

Guards, so that this can only make things faster, never wrong:
- only self-attention calls (``query is key is value``, batched) without ``bias_k``/``bias_v``/
  ``add_zero_attn``, in eval mode; any other call runs the original forward and hands the layer's
  parameters to the fallback from then on;
- the first call of each kind (masks, ``need_weights``, …) is compared with the original forward;
  a difference beyond float rounding also hands the parameters to the fallback;
- the engine's own once-per-estimation check compares the rules' per-sample sums with autograd.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from .proxies import linear_proxy

#: Relative difference between the decomposed and the original forward that counts as "not the
#: same function" (float32 rounding of a few matmuls is far below it).
_VERIFY_RTOL = 1e-4


def eligible(m: nn.Module) -> bool:
    """An attention layer whose projections the decomposed forward reproduces."""
    return (
        type(m) is nn.MultiheadAttention
        and m._qkv_same_embed_dim
        and m.in_proj_weight is not None
        and m.bias_k is None
        and m.bias_v is None
        and not m.add_zero_attn
        and "forward" not in m.__dict__
    )


def _float_mask(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Boolean masks (True = masked out) as additive -inf masks, float masks as they are."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


class Decomposed:
    """One attention layer's proxies and its decomposed forward (installed while recording)."""

    def __init__(self, mha: nn.Module, on_failure: Callable[[list[torch.Tensor]], None]) -> None:
        assert isinstance(mha, nn.MultiheadAttention)
        self.mha = mha
        self.in_proj = linear_proxy(mha.in_proj_weight, mha.in_proj_bias)
        self.out_proj = linear_proxy(mha.out_proj.weight, mha.out_proj.bias)
        self.recording = False  # True while the Fisher engine records a forward pass
        self.failed = False
        self._verified: set[tuple] = set()
        self._on_failure = on_failure  # hands the layer's parameters to the fallback

    def parameters(self) -> list[torch.Tensor]:
        return [
            p
            for p in (self.mha.in_proj_weight, self.mha.in_proj_bias, self.mha.out_proj.weight, self.mha.out_proj.bias)
            if p is not None
        ]

    def proxies(self) -> list[nn.Linear]:
        return [self.in_proj, self.out_proj]

    def install(self) -> None:
        self.mha.forward = self.forward  # type: ignore[method-assign]

    def remove(self) -> None:
        self.mha.__dict__.pop("forward", None)

    def _fail(self) -> None:
        if not self.failed:
            self.failed = True
            self._on_failure(self.parameters())

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[torch.Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        original = type(self.mha).forward
        args = (query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)
        if not self.recording or self.failed:
            return original(self.mha, *args)
        usable = (
            query is key
            and key is value
            and query.dim() == 3
            and not self.mha.training
            and not (is_causal and attn_mask is None)
        )
        if not usable:
            self._fail()
            return original(self.mha, *args)
        out = self._decomposed(query, key_padding_mask, need_weights, attn_mask, average_attn_weights)
        signature = (
            None if key_padding_mask is None else (key_padding_mask.dtype, key_padding_mask.dim()),
            None if attn_mask is None else (attn_mask.dtype, attn_mask.dim()),
            need_weights,
            average_attn_weights,
        )
        if signature not in self._verified:
            with torch.no_grad():
                ref = original(self.mha, *args)
            if not _same(out, ref):
                self._fail()
                return original(self.mha, *args)
            self._verified.add(signature)
        return out

    def _decomposed(
        self,
        x: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor],
        need_weights: bool,
        attn_mask: Optional[torch.Tensor],
        average: bool,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        mha = self.mha
        if not mha.batch_first:
            x = x.transpose(0, 1)  # the proxies see [N, T, E]: sample index first, as the rules read it
        n, t, e = x.shape
        h = mha.num_heads
        d = e // h
        qkv = self.in_proj(x)  # [N, T, 3E]
        q, k, v = (z.reshape(n, t, h, d).transpose(1, 2) for z in qkv.chunk(3, dim=-1))  # [N, H, T, D]
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d)  # [N, H, T, T]
        am = _float_mask(attn_mask, scores.dtype)
        if am is not None:
            scores = scores + (am if am.dim() == 2 else am.reshape(n, h, t, t))
        kpm = _float_mask(key_padding_mask, scores.dtype)
        if kpm is not None:
            scores = scores + kpm.reshape(n, 1, 1, t)
        weights = torch.softmax(scores, dim=-1)
        attn = (weights @ v).transpose(1, 2).reshape(n, t, e)
        out = self.out_proj(attn)
        if not mha.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(dim=1) if average else weights


def _same(ours: tuple, ref: tuple) -> bool:
    for a, b in zip(ours, ref):
        if (a is None) != (b is None):
            return False
        if a is None:
            continue
        if a.shape != b.shape:
            return False
        a, b = a.detach().float(), b.detach().float()
        finite = torch.isfinite(b)
        if not torch.equal(finite, torch.isfinite(a)):
            return False
        scale = b[finite].abs().max() if bool(finite.any()) else torch.tensor(0.0)
        if bool(finite.any()) and float((a[finite] - b[finite]).abs().max()) > _VERIFY_RTOL * max(float(scale), 1e-6):
            return False
    return True
