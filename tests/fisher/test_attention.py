"""The decomposed ``nn.MultiheadAttention`` of the Fisher engine (``ewc_rs/_fisher/attention.py``).

Every variant must match the float64 per-sample reference; the variants the decomposition covers
must also really run through the rules (their parameters not in the fallback), and the others
(cross-attention, bias_k, …) must go to the fallback and still be exact. Inputs are drawn fresh;
the seed is printed (``EWC_RS_TEST_SEED`` pins it).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import pytest
import torch
from torch import Tensor, nn

from ewc_rs import fisher_diag
from ewc_rs._fisher.api import estimate
from ewc_rs._fisher.options import parse_options
from reference import reference_fisher, relative_error

pytestmark = pytest.mark.core

TOL = 1e-4
E, H, T, C = 8, 2, 5, 4  # embedding, heads, tokens, classes


class Attn(nn.Module):
    """One attention layer and a head; ``mode`` picks how it is called."""

    def __init__(self, mode: str, batch_first: bool = True, **mha: Any) -> None:
        super().__init__()
        self.mode, self.batch_first = mode, batch_first
        self.attn = nn.MultiheadAttention(E, H, batch_first=batch_first, **mha)
        self.other = nn.Linear(E, E)
        self.head = nn.Linear(E, C)

    def forward(self, x: Tensor, pad: Optional[Tensor] = None) -> Tensor:
        seq = x if self.batch_first else x.transpose(0, 1)
        kw: dict[str, Any] = {}
        if self.mode == "need_weights":
            out, w = self.attn(seq, seq, seq, need_weights=True, average_attn_weights=False)
            return self.head(out.mean(dim=1)) + w.sum(dim=(1, 2)).mean(dim=-1, keepdim=True)
        if self.mode == "key_padding":
            kw = {"key_padding_mask": pad}
        elif self.mode == "float_mask":
            kw = {"attn_mask": torch.triu(torch.full((T, T), -0.7), diagonal=1)}
        elif self.mode == "causal":
            kw = {"attn_mask": torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1), "is_causal": True}
        if self.mode == "cross":
            out, _ = self.attn(seq, self.other(seq), seq, need_weights=False)
        else:
            out, _ = self.attn(seq, seq, seq, need_weights=False, **kw)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.head(out.mean(dim=1))


class Encoder(nn.Module):
    """``nn.TransformerEncoderLayer`` with a key padding mask (the usual way attention is met)."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=12, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(E, C)

    def forward(self, x: Tensor, pad: Tensor) -> Tensor:
        return self.head(self.enc(x, src_key_padding_mask=pad).mean(dim=1))


#: name -> (factory, uses the decomposition)
VARIANTS: dict[str, tuple[Callable[[], nn.Module], bool]] = {
    "plain": (lambda: Attn("plain"), True),
    "seq_first": (lambda: Attn("plain", batch_first=False), True),
    "need_weights": (lambda: Attn("need_weights"), True),
    "key_padding": (lambda: Attn("key_padding"), True),
    "float_mask": (lambda: Attn("float_mask"), True),
    "causal": (lambda: Attn("causal"), True),
    "no_bias": (lambda: Attn("plain", bias=False), True),
    "encoder": (Encoder, True),
    "cross": (lambda: Attn("cross"), False),
    "bias_kv": (lambda: Attn("plain", add_bias_kv=True), False),
}


def batches(seed: int) -> list[tuple[tuple[Tensor, Tensor], Tensor]]:
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for b in (4, 3):
        x = torch.randn(b, T, E, generator=g)
        pad = torch.zeros(b, T, dtype=torch.bool)
        pad[:, -1] = torch.rand(b, generator=g) < 0.5  # some samples ignore their last token
        out.append(((x, pad), torch.randint(0, C, (b,), generator=g)))
    return out


def attention_slots_in_fallback(model: nn.Module, data: list, kind: str) -> bool:
    """Runs ``fisher_diag`` and reports whether the attention layer's parameters ended up in the
    per-sample fallback (rather than the rules, through the decomposition)."""
    result = estimate(model, data, parse_options(kind))
    names = {n for n in result.diag if ".self_attn." in n or n.startswith("attn.")}
    assert names
    return names <= set(result.fallback)


@pytest.mark.parametrize("kind", ["exact", "empirical"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_attention_variants_match_reference(name: str, kind: str, seed: int) -> None:
    factory, decomposed = VARIANTS[name]
    torch.manual_seed(seed % 100_000)
    model = factory()
    data = batches(seed)
    got = fisher_diag(model, data, kind=kind)
    want = reference_fisher(model, data, kind=kind)
    err = relative_error(got, want)
    assert err <= TOL, f"seed={seed} {name} {kind}: relative error {err:.3g}"
    in_fallback = attention_slots_in_fallback(model, data, kind)
    assert in_fallback != decomposed, (
        f"seed={seed} {name}: attention parameters {'in' if in_fallback else 'not in'} the fallback"
    )


def test_forward_is_restored_even_on_error(seed: int) -> None:
    torch.manual_seed(seed % 100_000)
    model = Attn("plain")
    x = torch.randn(3, T, E)
    with pytest.raises(ValueError):
        fisher_diag(model, [((x, None), torch.full((3,), C + 5))], kind="empirical")  # labels out of range
    assert "forward" not in model.attn.__dict__, "the decomposed forward was left installed"
