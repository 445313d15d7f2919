"""Hugging Face transformers models through ``fisher_diag``, against the float64 per-sample
reference (tests/helpers/reference.py).

The models are tiny and built from configs with random weights (nothing is downloaded): GPT-2
(``Conv1D`` layers, the rule of ``src/fisher/rules/hf_conv1d.rs``), BERT (``nn.Linear`` attention)
and GPT-2 with its language-model head, whose ``lm_head`` shares its weight with the token
embedding ``wte``. They run with ``attn_implementation="eager"`` (no SDPA kernel choice between
float32 and the reference's float64). Until ``fisher_diag`` takes ``ModelOutput``s, thin wrappers
return ``.logits`` as ``[N, C]``: a sequence-classification head, or the LM head's logits at the
last position (a categorical over the vocabulary per sample).

Inputs are drawn fresh on every run (the ``seed`` fixture; ``EWC_RS_TEST_SEED`` pins it) and
every assertion message names the seed.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Callable

import pytest
import torch
from torch import Tensor, nn

from ewc_rs import _core, fisher_diag
from ewc_rs._fisher.api import estimate
from ewc_rs._fisher.options import draw_categorical, parse_options
from reference import reference_fisher, relative_error

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed: the Hugging Face model tests need it"
)
from transformers.pytorch_utils import Conv1D  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py

TOL = 1e-4
VOCAB, T, CLASSES = 40, 6, 3
SIZES = (4, 3)  # two batches, the second one smaller
PAD = 0

Batch = tuple[dict[str, Tensor], Tensor]


# --------------------------------------------------------------------------------------------------
# models: thin wrappers that return [N, C] logits
# --------------------------------------------------------------------------------------------------
class Logits(nn.Module):
    """A Hugging Face model that returns a ``ModelOutput``, reduced to its ``.logits``."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.hf(input_ids=input_ids, attention_mask=attention_mask).logits


class LastTokenLogits(nn.Module):
    """A causal LM's logits at the last position, ``[N, V]``: a per-sample categorical."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.hf(input_ids=input_ids, attention_mask=attention_mask).logits[:, -1, :]


def _gpt2_config() -> Any:
    return transformers.GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=16,
        vocab_size=VOCAB,
        n_positions=16,
        num_labels=CLASSES,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=1,
        attn_implementation="eager",
    )


def _bert_config() -> Any:
    return transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        num_labels=CLASSES,
        pad_token_id=PAD,
        attn_implementation="eager",
    )


#: name -> (builder, number of classes, the parameters that may go to the exact fallback). The
#: position embeddings are looked up with ids of shape [1, T], broadcast over the batch: their calls
#: have no sample dim, so they go to the fallback. BERT's key biases have a gradient that is zero in
#: exact arithmetic (softmax ignores a shift of a query's scores), so the once-per-estimation rule
#: check compares rounding noise and may send them there too. Every other parameter has a rule.
MODELS: dict[str, tuple[Callable[[], nn.Module], int, str]] = {
    "gpt2_classifier": (
        lambda: Logits(transformers.GPT2ForSequenceClassification(_gpt2_config())),
        CLASSES,
        r"hf\.transformer\.wpe\.weight",
    ),
    "bert_classifier": (
        lambda: Logits(transformers.BertForSequenceClassification(_bert_config())),
        CLASSES,
        r"hf\.bert\.(embeddings\.position_embeddings\.weight|encoder\.layer\.\d+\.attention\.self\.key\.bias)",
    ),
    "gpt2_lm_tied": (
        lambda: LastTokenLogits(transformers.GPT2LMHeadModel(_gpt2_config())),
        VOCAB,
        r"hf\.transformer\.wpe\.weight",
    ),
}


def _make(name: str, seed: int) -> tuple[nn.Module, list[Batch]]:
    """Model ``name`` with weights from ``seed`` and batches of ``SIZES`` from ``seed + 1``: token
    ids with trailing padding (lengths 3..T, masked out), labels in the model's classes."""
    build, classes, _ = MODELS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    attn = model.hf.config._attn_implementation
    assert attn == "eager", f"{name}: attention implementation {attn!r}, expected 'eager'"
    g = torch.Generator().manual_seed(seed + 1)
    batches = []
    for b in SIZES:
        ids = torch.randint(1, VOCAB, (b, T), generator=g)
        lengths = torch.randint(3, T + 1, (b,), generator=g)
        mask = (torch.arange(T) < lengths[:, None]).long()
        ids = ids * mask + PAD * (1 - mask)
        batches.append(({"input_ids": ids, "attention_mask": mask}, torch.randint(0, classes, (b,), generator=g)))
    return model, batches


def _check(got: dict[str, Tensor], want: dict[str, Tensor], context: str) -> None:
    err = relative_error(got, want)
    worst = max(want, key=lambda k: relative_error({k: got[k]}, {k: want[k]}))
    assert err <= TOL, (
        f"{context}: relative error {err:.3e} > {TOL:.0e}; worst parameter {worst!r}: "
        f"{relative_error({worst: got[worst]}, {worst: want[worst]}):.3e}"
    )


def _draws_like_fisher(model: nn.Module, batches: list[Batch], mc_samples: int, seed: int) -> list[Tensor]:
    """The labels ``fisher_diag(kind="mc", generator=Generator().manual_seed(seed))`` draws: per
    batch, from the softmax of the float32 model's outputs in eval mode (``draw_categorical``, as ``draw_mc`` does)."""
    g = torch.Generator().manual_seed(seed)
    mode = model.training
    model.eval()
    try:
        with torch.enable_grad():  # as in fisher_diag
            outs = [model(**x).detach().float() for x, _ in batches]
    finally:
        model.train(mode)
    return [draw_categorical(o, mc_samples, g) for o in outs]


# --------------------------------------------------------------------------------------------------
# Fisher against the reference
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["exact", "empirical", "batched"])
@pytest.mark.parametrize("name", list(MODELS))
def test_matches_reference(name: str, kind: str, seed: int) -> None:
    model, batches = _make(name, seed)
    got = fisher_diag(model, batches, kind=kind)
    want = reference_fisher(model, batches, kind=kind)
    _check(got, want, f"seed={seed} model={name} kind={kind}")


@pytest.mark.parametrize("name", list(MODELS))
def test_mc_matches_reference_with_same_draws(name: str, seed: int) -> None:
    """Given the draws fisher_diag makes (same generator seed), mc equals the reference's mc."""
    model, batches = _make(name, seed)
    samples, draw_seed = 2, seed + 7
    got = fisher_diag(model, batches, kind="mc", mc_samples=samples, generator=torch.Generator().manual_seed(draw_seed))
    labels = _draws_like_fisher(model, batches, samples, draw_seed)
    want = reference_fisher(model, batches, kind="mc", mc_samples=samples, mc_labels=labels)
    _check(got, want, f"seed={seed} model={name} kind=mc")


# --------------------------------------------------------------------------------------------------
# which path each parameter takes
# --------------------------------------------------------------------------------------------------
def _fallback_of_run(model: nn.Module, batches: list[Batch]) -> list[str]:
    """Runs the exact estimation and returns the parameters that took the per-sample fallback."""
    return estimate(model, batches, parse_options("exact")).fallback


@pytest.mark.parametrize("name", list(MODELS))
def test_conv1d_and_the_tied_weight_use_the_rules(name: str, seed: int) -> None:
    """Every GPT-2 ``Conv1D``, every ``nn.Linear`` / ``LayerNorm`` / token ``Embedding`` (the tied
    wte/lm_head weight included) goes through the rules; only the parameters of ``MODELS``' pattern
    (the broadcast position table, BERT's key biases) may go to the fallback."""
    model, batches = _make(name, seed)
    fallback = _fallback_of_run(model, batches)
    allowed = re.compile(MODELS[name][2])
    unexpected = [n for n in fallback if not allowed.fullmatch(n)]
    ctx = f"seed={seed} model={name}"
    assert not unexpected, f"{ctx}: parameters in the fallback: {unexpected}"
    conv1d = [m for m in model.modules() if type(m) is Conv1D]
    assert bool(conv1d) == name.startswith("gpt2"), f"{ctx}: {len(conv1d)} Conv1D layers"
    owners = {id(m): n for n, m in model.named_modules()}
    in_fallback = {n.rpartition(".")[0] for n in fallback}
    assert all(owners[id(m)] not in in_fallback for m in conv1d), f"{ctx}: a Conv1D without its rule"


def test_conv1d_has_a_rule_and_a_subclass_does_not() -> None:
    """The registry matches the exact type: a subclass may override ``forward``."""
    rule = _core.layer_rule(Conv1D(5, 4))
    assert rule is not None and rule.module_type == "transformers.pytorch_utils.Conv1D", repr(rule)

    class Scaled(Conv1D):
        def forward(self, x: Tensor) -> Tensor:
            return 2 * super().forward(x)

    assert _core.layer_rule(Scaled(5, 4)) is None


def test_tied_lm_head_sums_both_uses_before_squaring(seed: int) -> None:
    """GPT2LMHeadModel ties lm_head to wte: one Fisher entry, equal to the reference (which
    differentiates the one shared tensor), so both uses' per-sample gradients are summed before
    squaring. Squaring each use alone (the untied model's two entries, added) would differ."""
    model, batches = _make("gpt2_lm_tied", seed)
    hf: Any = model.hf
    assert hf.lm_head.weight is hf.transformer.wte.weight, "transformers no longer ties the weights"
    key = "hf.transformer.wte.weight"
    got = fisher_diag(model, batches, kind="exact")
    ctx = f"seed={seed}"
    assert key in got and "hf.lm_head.weight" not in got, f"{ctx}: keys {list(got)}"
    _check(got, reference_fisher(model, batches, kind="exact"), ctx)
    untied = copy.deepcopy(model)
    head: Any = untied.hf.lm_head
    head.weight = nn.Parameter(head.weight.detach().clone())
    apart = reference_fisher(untied, batches, kind="exact")
    squares_apart = {key: apart[key] + apart["hf.lm_head.weight"]}
    err = relative_error({key: got[key]}, squares_apart)
    assert err > 100 * TOL, f"{ctx}: tied and untied squares agree ({err:.2e}): the case tests nothing"


# --------------------------------------------------------------------------------------------------
# Conv1D on 2-d inputs: the one-GEMM path (several roots summed before it), square and not
# --------------------------------------------------------------------------------------------------
class Conv1dMlp(nn.Module):
    """Conv1D layers on [N, F] inputs: 6 -> 6 (square: a transposed Fisher would keep its shape)
    -> 8 -> 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.square = Conv1D(6, 6)
        self.wide = Conv1D(8, 6)
        self.head = Conv1D(CLASSES, 8)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.wide(torch.tanh(self.square(x)))))


@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_conv1d_fast_path_matches_reference(kind: str, seed: int) -> None:
    """Every Conv1D call here is 2-d, so the driver takes the rule's one-GEMM form (for exact, after
    summing the squared output gradients of the C roots); all parameters stay on the rules."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Conv1dMlp()
        for m in model.modules():
            if isinstance(m, Conv1D):
                nn.init.normal_(m.weight, std=0.5)
                nn.init.normal_(m.bias, std=0.5)
    g = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(b, 6, generator=g), torch.randint(0, CLASSES, (b,), generator=g)) for b in (5, 3)]
    fallback = _fallback_of_run(model, batches)
    ctx = f"seed={seed} kind={kind}"
    assert not fallback, f"{ctx}: fallback {fallback}"
    got = fisher_diag(model, batches, kind=kind)
    _check(got, reference_fisher(model, batches, kind=kind), ctx)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_fisher_with_activation_checkpointing_equals_the_fisher_without(family: str, seed: int) -> None:
    """``gradient_checkpointing_enable()`` stays on during the estimation (each checkpointed layer
    runs its forward again in the backward) and changes no number of the empirical token-level Fisher."""
    torch.manual_seed(seed % 100_000)
    if family == "llama":
        config = transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=16,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
        layers = model.model.layers
    else:
        config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=VOCAB, n_positions=16)
        model = transformers.GPT2LMHeadModel(config)
        layers = model.transformer.h
    g = torch.Generator().manual_seed(seed)
    data = [({"input_ids": ids}, ids) for ids in (torch.randint(0, VOCAB, (n, T), generator=g) for n in SIZES)]
    calls: list[int] = []
    # A submodule inside the checkpointed forward (the layer's own hooks stay outside the checkpoint).
    hook = layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    plain = fisher_diag(model, data, kind="empirical", likelihood="causal_lm")
    forwards = len(calls)
    model.gradient_checkpointing_enable()
    checkpointed = fisher_diag(model, data, kind="empirical", likelihood="causal_lm")
    hook.remove()
    again = len(calls) - forwards
    # Every backward pass (the rule checks' and one per batch) runs the layer's forward again.
    assert again >= forwards + len(SIZES), f"seed={seed}: {again} forwards with checkpointing, {forwards} without"
    err = relative_error(checkpointed, plain)
    assert err <= 1e-6, f"seed={seed}: relative error {err:.2e}"
