"""The language-model fast paths of the Fisher engine on real vocabulary sizes, against the float64
per-sample reference (``tests/helpers/reference_sequences.py``).

Covered:
- GPT-2's tied 50257-row embedding and LM head (the shared-parameter path: the head's per-sequence
  GEMM, the embedding's lookups added into it in place) and its learned position embedding, whose
  ``position_ids`` ``[1, T]`` serve the whole batch (recorded as one copy per sample);
- Llama's untied 32000-row embedding and head, grouped-query attention and RMSNorm (a rule);
- ``nn.RMSNorm``; and models where one copy per sample would change the function or mix the
  samples, which must leave the parameter to the exact fallback.

Every random input is drawn fresh; the seed is part of every assertion message.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from ewc_rs import fisher_diag
from ewc_rs._fisher.api import estimate
from ewc_rs._fisher.options import draw_categorical, parse_options
from reference import relative_error
from reference_sequences import logits_of, sequence_fisher

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny widths: see conftest.py

TOL = 1e-4
T = 6
SIZES = (3, 2)  # two batches, the second one smaller


def _lm_batches(vocab: int, g: torch.Generator) -> list[tuple[dict[str, Tensor], Tensor]]:
    out = []
    for n in SIZES:
        ids = torch.randint(0, vocab, (n, T), generator=g)
        out.append(({"input_ids": ids}, ids))
    return out


def _same_draws(model: nn.Module, batches: list, seed: int) -> list[Tensor]:
    """The labels ``fisher_diag(kind="mc", generator=...)`` draws for ``causal_lm`` (one per
    shifted position), from the float32 logits in eval mode."""
    g = torch.Generator().manual_seed(seed)
    model.eval()
    draws = []
    for x, _ in batches:
        logits = logits_of(model(**x))[:, :-1].detach().float()
        draws.append(draw_categorical(logits, 1, g))
    return draws


def _check(model: nn.Module, batches: list, seed: int, what: str) -> None:
    """Empirical and Monte-Carlo Fisher equal the reference, and no parameter took the fallback."""
    fallback = estimate(model, batches, parse_options("empirical", likelihood="causal_lm")).fallback
    assert fallback == [], f"seed={seed} {what}: parameters in the fallback: {fallback}"
    for kind in ("empirical", "mc"):
        options: dict[str, Any] = {}
        mc_labels = None
        if kind == "mc":
            mc_labels = _same_draws(model, batches, seed)
            options = {"generator": torch.Generator().manual_seed(seed)}
        got = fisher_diag(model, batches, kind=kind, likelihood="causal_lm", **options)
        want = sequence_fisher(model, batches, kind=kind, layout="causal_lm", mc_labels=mc_labels)
        err = relative_error(got, want)
        assert err <= TOL, f"seed={seed} {what} {kind}: relative error {err:.3e}"


def test_gpt2_with_its_real_tied_vocabulary_matches_the_reference(seed: int) -> None:
    transformers = pytest.importorskip("transformers", reason="transformers is installed by the test command")
    torch.manual_seed(seed % 2**31)
    config = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=8, vocab_size=50257, n_positions=T, attn_implementation="eager"
    )
    model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight, "tied embeddings expected"
    _check(model, _lm_batches(50257, torch.Generator().manual_seed(seed)), seed, "gpt2")


def test_llama_with_its_real_untied_vocabulary_matches_the_reference(seed: int) -> None:
    transformers = pytest.importorskip("transformers", reason="transformers is installed by the test command")
    torch.manual_seed(seed % 2**31)
    config = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=32000,
        max_position_embeddings=T,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(config)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    _check(model, _lm_batches(32000, torch.Generator().manual_seed(seed)), seed, "llama")


class TinyLM(nn.Module):
    """Token and learned position embeddings, ``nn.RMSNorm``, an untied head. ``use`` says how the
    position embedding of ``position_ids`` ``[1, T]`` reaches the tokens: ``"broadcast"`` (as
    GPT-2: the copy-per-sample recording applies), ``"first_row"`` (every sample reads row 0 of
    the position embedding's output: a copy per sample would hand all samples' gradients to
    sample 0) or ``"repeat"`` (tiled to the batch by ``repeat``, which one copy per sample breaks)."""

    def __init__(self, use: str, vocab: int = 11, width: int = 6) -> None:
        super().__init__()
        self.use = use
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(T, width)
        self.norm = nn.RMSNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, input_ids: Tensor) -> dict[str, Tensor]:
        n = input_ids.shape[0]
        p = self.pos(torch.arange(input_ids.shape[1]).unsqueeze(0))
        if self.use == "first_row":
            p = p[0]
        elif self.use == "repeat":
            p = p.repeat(n, 1, 1)
        return {"logits": self.head(torch.tanh(self.norm(self.tok(input_ids) + p)))}


@pytest.mark.core
def test_position_embedding_and_rms_norm_are_covered_by_rules(seed: int) -> None:
    torch.manual_seed(seed % 2**31)
    model = TinyLM("broadcast")
    _check(model, _lm_batches(11, torch.Generator().manual_seed(seed)), seed, "broadcast")


@pytest.mark.core
@pytest.mark.parametrize("use", ["first_row", "repeat"])
def test_a_shared_row_used_otherwise_takes_the_exact_fallback(use: str, seed: int) -> None:
    """Where one copy per sample would change the model's outputs (``repeat``: the batch would be
    tiled n times over) or attribute one sample's gradient to another (``first_row``), the rule
    check refuses the copies: the position embedding takes the fallback and the Fisher is exact."""
    torch.manual_seed(seed % 2**31)
    model = TinyLM(use)
    batches = _lm_batches(11, torch.Generator().manual_seed(seed))
    fallback = estimate(model, batches, parse_options("empirical", likelihood="causal_lm")).fallback
    assert fallback == ["pos.weight"], f"seed={seed} {use}: fallback {fallback}"
    got = fisher_diag(model, batches, kind="empirical", likelihood="causal_lm")
    want = sequence_fisher(model, batches, kind="empirical", layout="causal_lm")
    err = relative_error(got, want)
    assert err <= TOL, f"seed={seed} {use}: relative error {err:.3e}"
