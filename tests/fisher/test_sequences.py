"""``fisher_diag`` with several positions per sample (sequence tagging, segmentation maps, causal
language models) and with model outputs that are not a plain tensor, against the float64
per-sample reference of ``tests/helpers/reference_sequences.py``; numpy batches; bad input.

Every random input is drawn fresh; the seed is printed and is part of every assertion message
(re-run a failure with ``EWC_RS_TEST_SEED=<seed>``).
"""

from __future__ import annotations

import re
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from ewc_rs import fisher_diag
from ewc_rs._fisher.options import draw_categorical
from reference import relative_error
from reference_sequences import logits_of, sequence_fisher

pytestmark = [pytest.mark.core, pytest.mark.usefixtures("one_thread")]  # tiny models: see conftest.py

TOL = 1e-4
V, T, N = 7, 5, 4  # vocabulary / classes, positions, samples per batch


# ------------------------------------------------------------------------------------------------
# models: each returns per-position logits in one layout
# ------------------------------------------------------------------------------------------------
class Tagger(nn.Module):
    """Embedding → Linear per position: logits [N, T, C] (the rules' path)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 6)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, V)

    def forward(self, ids: Tensor) -> Tensor:
        return self.out(torch.tanh(self.norm(self.emb(ids))))


class GRUTagger(nn.Module):
    """A GRU between embedding and output (run unrolled, its projections through the Linear rule)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 4)
        self.gru = nn.GRU(4, 5, batch_first=True)
        self.out = nn.Linear(5, V)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        h, _ = self.gru(self.emb(ids))
        return self.out(h), h  # a tuple: the logits come first


class Segmenter(nn.Module):
    """Conv2d → logits [N, C, H, W] (``class_dim=1``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.head = nn.Conv2d(3, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.conv(x)))


class CausalLM(nn.Module):
    """Token embedding + causal self-attention + LM head, returning a dict like Hugging Face."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 8)
        self.pos = nn.Parameter(torch.randn(T, 8) * 0.1)
        self.block = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, V)

    def forward(self, input_ids: Tensor) -> dict[str, Tensor]:
        t = input_ids.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t)
        h = self.block(self.emb(input_ids) + self.pos[:t], src_mask=mask, is_causal=True)
        return {"logits": self.head(h), "hidden": h}


def _ids(g: torch.Generator, *shape: int) -> Tensor:
    return torch.randint(0, V, shape, generator=g)


def _with_ignored(y: Tensor, g: torch.Generator, first_kept: int = 0) -> Tensor:
    """Some positions set to -100 (never a whole sample: position ``first_kept`` is kept)."""
    y = y.clone()
    drop = torch.rand(y.shape, generator=g) < 0.3
    drop.reshape(y.shape[0], -1)[:, first_kept] = False
    y[drop] = -100
    return y


Case = tuple[Callable[[], nn.Module], Callable[[torch.Generator], list], dict[str, Any], str]


def _tagger_data(g: torch.Generator) -> list:
    return [(_ids(g, N, T), _with_ignored(_ids(g, N, T), g)) for _ in range(2)]


def _seg_data(g: torch.Generator) -> list:
    return [
        (torch.randn(N, 2, 3, 3, generator=g), _with_ignored(torch.randint(0, 4, (N, 3, 3), generator=g), g))
        for _ in range(2)
    ]


def _lm_data(g: torch.Generator) -> list:
    out = []
    for _ in range(2):
        ids = _ids(g, N, T)
        labels = _with_ignored(ids, g, first_kept=1)  # position 0 is shifted away: keep 1
        out.append(({"input_ids": ids}, labels))
    return out


CASES: dict[str, Case] = {
    "tagger": (Tagger, _tagger_data, {}, "last"),
    "gru_tuple": (GRUTagger, _tagger_data, {}, "last"),
    "segmenter": (Segmenter, _seg_data, {"class_dim": 1}, "class_dim1"),
    "causal_lm_dict": (CausalLM, _lm_data, {"likelihood": "causal_lm"}, "causal_lm"),
}


def _layout_logits(raw: Any, layout: str) -> Tensor:
    """Logits ``[N, P, C]`` as ``fisher_diag`` lays them out (to replicate its mc draws)."""
    out = logits_of(raw)
    if layout == "causal_lm":
        out = out[:, :-1]
    elif layout == "class_dim1":
        out = out.movedim(1, -1)
    return out.reshape(out.shape[0], -1, out.shape[-1])


def _same_draws(model: nn.Module, batches: list, layout: str, samples: int, seed: int) -> list[Tensor]:
    """The labels ``fisher_diag(kind="mc", generator=...)`` draws: per batch, from the float32
    outputs in eval mode, one per position and draw."""
    g = torch.Generator().manual_seed(seed)
    model = model.eval()
    draws = []
    with torch.enable_grad():
        for x, _ in batches:
            raw = model(**x) if isinstance(x, dict) else model(x)
            draws.append(draw_categorical(_layout_logits(raw, layout).detach().float(), samples, g))
    return draws


@pytest.mark.parametrize("kind", ["exact", "empirical", "batched", "mc"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name: str, kind: str, seed: int) -> None:
    factory, data, options, layout = CASES[name]
    torch.manual_seed(seed % 2**31)
    g = torch.Generator().manual_seed(seed)
    model, batches = factory(), data(g)
    mc_labels = None
    if kind == "mc":
        mc_labels = _same_draws(model, batches, layout, 3, seed)
        options = {**options, "mc_samples": 3, "generator": torch.Generator().manual_seed(seed)}
    got = fisher_diag(model, batches, kind=kind, **options)
    want = sequence_fisher(model, batches, kind=kind, layout=layout, mc_labels=mc_labels)
    err = relative_error(got, want)
    assert err <= TOL, f"seed={seed} {name} {kind}: relative error {err:.3e}"


def test_hugging_face_gpt2_causal_lm_matches_reference(seed: int) -> None:
    """A tiny GPT-2 from a config (random weights, nothing downloaded): ``ModelOutput`` logits,
    tied input/output embeddings, ``causal_lm`` labels with ignored positions."""
    transformers = pytest.importorskip("transformers", reason="transformers is installed by the test command")
    torch.manual_seed(seed % 2**31)
    config = transformers.GPT2Config(
        n_layer=1,
        n_head=2,
        n_embd=8,
        vocab_size=V,
        n_positions=T,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",  # the reference runs in float64: no fused-kernel differences
    )
    model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight, "tied embeddings expected"
    g = torch.Generator().manual_seed(seed)
    batches = _lm_data(g)
    for kind in ("exact", "empirical", "batched", "mc"):
        options: dict[str, Any] = {}
        mc_labels = None
        if kind == "mc":
            mc_labels = _same_draws(model, batches, "causal_lm", 2, seed)
            options = {"mc_samples": 2, "generator": torch.Generator().manual_seed(seed)}
        got = fisher_diag(model, batches, kind=kind, likelihood="causal_lm", **options)
        want = sequence_fisher(model, batches, kind=kind, layout="causal_lm", mc_labels=mc_labels)
        err = relative_error(got, want)
        assert err <= TOL, f"seed={seed} gpt2 {kind}: relative error {err:.3e}"


def test_outputs_callable_picks_the_logits(seed: int) -> None:
    """``outputs=`` picks the logits from anything; the result equals the plain-tensor model's."""
    torch.manual_seed(seed % 2**31)
    g = torch.Generator().manual_seed(seed)
    model, batches = Tagger(), _tagger_data(g)

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, ids: Tensor) -> list[Any]:
            return [None, {"per_token": self.inner(ids)}]

    want = fisher_diag(model, batches, kind="empirical")
    got = fisher_diag(Wrapped(), batches, kind="empirical", outputs=lambda o: o[1]["per_token"])
    assert relative_error({k.removeprefix("inner."): v for k, v in got.items()}, want) <= 1e-6, f"seed={seed}"


def test_callable_likelihood_receives_the_model_output_as_it_is(seed: int) -> None:
    torch.manual_seed(seed % 2**31)
    g = torch.Generator().manual_seed(seed)
    model, batches = CausalLM(), _lm_data(g)
    seen: list[type] = []

    def loglik(raw: Any, labels: Tensor) -> Tensor:
        seen.append(type(raw))
        logp = torch.log_softmax(raw["logits"][:, :-1].float(), dim=-1)
        y = labels[:, 1:]
        keep = y != -100
        return (logp.gather(2, y.clamp_min(0).unsqueeze(2)).squeeze(2) * keep).sum(1)

    got = fisher_diag(model, batches, kind="empirical", likelihood=loglik)
    want = fisher_diag(model, batches, kind="empirical", likelihood="causal_lm")
    assert seen and all(t is dict for t in seen), f"seed={seed}: the callable got {seen}"
    assert relative_error(got, want) <= 1e-5, f"seed={seed}"


def test_numpy_batches_equal_tensor_batches(seed: int) -> None:
    """Loaders may yield numpy arrays (e.g. ``datasets`` in numpy format), also inside dicts."""
    torch.manual_seed(seed % 2**31)
    g = torch.Generator().manual_seed(seed)
    model, batches = CausalLM(), _lm_data(g)
    as_numpy = [({"input_ids": x["input_ids"].numpy()}, y.numpy()) for x, y in batches]
    read_only = []
    for x, y in as_numpy:
        ids = x["input_ids"].copy()
        ids.flags.writeable = False  # taken by copy, without torch's warning
        read_only.append(({"input_ids": ids}, y))
    want = fisher_diag(model, batches, kind="empirical", likelihood="causal_lm")
    for data in (as_numpy, read_only):
        got = fisher_diag(model, data, kind="empirical", likelihood="causal_lm")
        assert relative_error(got, want) == 0.0, f"seed={seed}"


def test_exact_is_refused_beyond_its_budget_naming_mc() -> None:
    model = nn.Sequential(nn.Embedding(300, 4), nn.Linear(4, 300))  # 300 classes × 5 positions
    ids = torch.randint(0, 300, (2, 5))
    with pytest.raises(ValueError, match=r"kind: 'exact' needs one backward pass per \(position, class\).*kind='mc'"):
        fisher_diag(model, [(ids, ids)], kind="exact")
    fisher_diag(model, [(ids, ids)], kind="mc")  # the suggested alternative runs


BadCall = Callable[[], Any]


def _lm_batch() -> tuple[dict[str, Tensor], Tensor]:
    ids = torch.randint(0, V, (N, T))
    return {"input_ids": ids}, ids.clone()


BAD: list[tuple[str, BadCall, str]] = [
    (
        "labels_shape_differs_from_logits",
        lambda: fisher_diag(Tagger(), [(torch.randint(0, V, (N, T)), torch.zeros(N, T + 1, dtype=torch.long))]),
        r"targets: expected shape \[4, 5\] .*\[4, 5, 7\].*got \[4, 6\]",
    ),
    (
        "causal_lm_labels_shape",
        lambda: fisher_diag(
            CausalLM(), [(_lm_batch()[0], torch.zeros(N, T - 1, dtype=torch.long))], likelihood="causal_lm"
        ),
        r"targets: likelihood 'causal_lm' expects labels of shape \[4, 5\], got \[4, 4\]",
    ),
    (
        "causal_lm_2d_logits",
        lambda: fisher_diag(
            nn.Linear(3, V), [(torch.randn(N, 3), torch.zeros(N, dtype=torch.long))], likelihood="causal_lm"
        ),
        r"model outputs: likelihood 'causal_lm' expects logits \[N, T, V\]",
    ),
    (
        "all_positions_ignored",
        lambda: fisher_diag(Tagger(), [(torch.randint(0, V, (N, T)), torch.full((N, T), -100))], kind="empirical"),
        r"targets: sample 0 has every position equal to ignore_index=-100",
    ),
    (
        "all_positions_ignored_causal_lm",  # only position 0 labelled: shifted away
        lambda: fisher_diag(
            CausalLM(),
            [(_lm_batch()[0], torch.cat([torch.zeros(N, 1, dtype=torch.long), torch.full((N, T - 1), -100)], 1))],
            likelihood="causal_lm",
            kind="exact",
        ),
        r"every position equal to ignore_index",
    ),
    (
        "label_out_of_range",
        lambda: fisher_diag(Tagger(), [(torch.randint(0, V, (N, T)), torch.full((N, T), V))], kind="empirical"),
        r"targets: labels must lie in \[0, 7\)",
    ),
    (
        "class_dim_zero",
        lambda: fisher_diag(
            Segmenter(), [(torch.randn(N, 2, 3, 3), torch.zeros(N, 3, 3, dtype=torch.long))], class_dim=0
        ),
        r"class_dim: expected a dimension of the logits",
    ),
    (
        "class_dim_not_int",
        lambda: fisher_diag(
            Tagger(), [(torch.randint(0, V, (N, T)), torch.zeros(N, T, dtype=torch.long))], class_dim=1.0
        ),  # type: ignore[arg-type]
        r"class_dim: expected an integer",
    ),
    (
        "ignore_index_not_int",
        lambda: fisher_diag(
            Tagger(), [(torch.randint(0, V, (N, T)), torch.zeros(N, T, dtype=torch.long))], ignore_index=None
        ),  # type: ignore[arg-type]
        r"ignore_index: expected an integer",
    ),
]


@pytest.mark.parametrize("call, pattern", [(c, p) for _, c, p in BAD], ids=[n for n, *_ in BAD])
def test_bad_input_raises_clear_error(call: BadCall, pattern: str) -> None:
    with pytest.raises(ValueError) as info:
        call()
    assert re.search(pattern, str(info.value), re.S), f"message {str(info.value)!r} does not match {pattern!r}"


def test_numpy_array_of_strings_is_refused() -> None:
    with pytest.raises(TypeError, match=r"numpy array of dtype <U1"):
        fisher_diag(nn.Linear(2, 3), [(np.array(["a", "b"]), torch.zeros(2, dtype=torch.long))])
