"""Model zoo for the tests: tiny models (< 5k parameters) covering every layer rule and edge case.

API
---
Every factory is ``make_<name>(seed: int) -> (model, sample)`` where

* ``model`` is a float32 CPU ``nn.Module`` whose weights depend only on ``seed`` (the global RNG is
  left untouched), and
* ``sample(batch_size: int, generator: torch.Generator) -> (inputs, targets)`` draws a fresh batch:
  ``inputs`` is a tensor (call ``model(x)``), a tuple (``model(*x)``, only ``conv_variety``) or a
  dict (``model(**x)``, only ``dict_input``); ``targets`` is a LongTensor ``[B]`` of class indices
  for the categorical models (outputs are logits ``[B, C]``) or a float tensor ``[B, D]`` for the
  gaussian models (outputs are means ``[B, D]``).

``MODELS`` maps name -> factory; ``CATEGORICAL`` / ``GAUSSIAN`` list the names by likelihood;
``LIKELIHOOD[name]`` gives ``"categorical"`` or ``"gaussian"``. ``make_batches`` builds a ready list
of ``(x, y)`` batches. Models with train/eval differences (``mlp_bn``: BatchNorm with non-trivial
running stats; ``transformer``: dropout 0.1) are returned in *train* mode: the code under test
must switch to eval mode itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Sampler = Callable[[int, torch.Generator], tuple[Any, Tensor]]
Factory = Callable[[int], tuple[nn.Module, Sampler]]

__all__ = [
    "CATEGORICAL",
    "GAUSSIAN",
    "LIKELIHOOD",
    "MODELS",
    "make_batches",
]


def _build(seed: int, fn: Callable[[], nn.Module]) -> nn.Module:
    """Run ``fn`` under ``torch.manual_seed(seed)`` without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def _randn(g: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=g)


def _labels(g: torch.Generator, batch_size: int, num_classes: int) -> Tensor:
    return torch.randint(0, num_classes, (batch_size,), generator=g)


def _classifier_sampler(shape: tuple[int, ...], num_classes: int) -> Sampler:
    def sample(batch_size: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        return _randn(g, batch_size, *shape), _labels(g, batch_size, num_classes)

    return sample


# --------------------------------------------------------------------------------------------------
# categorical models
# --------------------------------------------------------------------------------------------------
def make_mlp_bn(seed: int) -> tuple[nn.Module, Sampler]:
    """The seed architecture shrunk; inputs [B, 4, 4], 5 classes; BN stats set; train mode."""

    def build() -> nn.Module:
        model = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16, 12),
            nn.ReLU(),
            nn.BatchNorm1d(12),
            nn.Linear(12, 12),
            nn.ReLU(),
            nn.BatchNorm1d(12),
            nn.Linear(12, 5),
        )
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm1d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.3, 0.3)
            model.train()
            for _ in range(5):  # running stats away from (0, 1)
                model(torch.randn(32, 4, 4) * 2.0 + 0.5)
        return model

    return _build(seed, build), _classifier_sampler((4, 4), 5)


class LinearSeq(nn.Module):
    """Linear on a [B, T, F] sequence (extra dim), mean over T, Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 10)
        self.head = nn.Linear(10, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.proj(x)).mean(dim=1))


def make_linear_seq(seed: int) -> tuple[nn.Module, Sampler]:
    """Inputs [B, 3, 6], 4 classes."""
    return _build(seed, LinearSeq), _classifier_sampler((3, 6), 4)


def make_cnn(seed: int) -> tuple[nn.Module, Sampler]:
    """Inputs [B, 1, 8, 8], 5 classes."""

    def build() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 6, 3, stride=2, dilation=1),  # -> [6, 3, 3]
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(54, 5),
        )

    return _build(seed, build), _classifier_sampler((1, 8, 8), 5)


class ConvVariety(nn.Module):
    """Grouped/dilated/strided Conv2d, depthwise Conv2d (no bias), GroupNorm, Conv1d branch."""

    def __init__(self) -> None:
        super().__init__()
        self.grouped = nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2, groups=2)  # 8x8 -> 4x4
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)  # 4x4 -> 4x4
        self.norm = nn.GroupNorm(2, 4)
        self.conv1d = nn.Conv1d(3, 4, 3, stride=2, padding=1)  # L 10 -> 5
        self.head = nn.Linear(4 * 4 * 4 + 4 * 5, 5)

    def forward(self, img: Tensor, seq: Tensor) -> Tensor:
        h = F.relu(self.grouped(img))
        h = F.relu(self.norm(self.depthwise(h)))
        s = torch.tanh(self.conv1d(seq))
        return self.head(torch.cat([h.flatten(1), s.flatten(1)], dim=1))


def make_conv_variety(seed: int) -> tuple[nn.Module, Sampler]:
    """Tuple inputs ``(img [B, 4, 8, 8], seq [B, 3, 10])`` (``model(*x)``), 5 classes."""

    def sample(batch_size: int, g: torch.Generator) -> tuple[tuple[Tensor, Tensor], Tensor]:
        img = _randn(g, batch_size, 4, 8, 8)
        seq = _randn(g, batch_size, 3, 10)
        return (img, seq), _labels(g, batch_size, 5)

    return _build(seed, ConvVariety), sample


def make_layernorm_mlp(seed: int) -> tuple[nn.Module, Sampler]:
    """Linear -> LayerNorm -> GELU -> Linear; inputs [B, 10], 5 classes."""

    def build() -> nn.Module:
        model = nn.Sequential(nn.Linear(10, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 5))
        norm = model[1]
        assert isinstance(norm, nn.LayerNorm)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.3, 0.3)
        return model

    return _build(seed, build), _classifier_sampler((10,), 5)


class EmbeddingMean(nn.Module):
    """Embedding(20, 6, padding_idx=0) on [B, T] ids, mean over T, Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6, padding_idx=0)
        self.head = nn.Linear(6, 5)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.emb(ids).mean(dim=1))


def _token_sampler(vocab: int, length: int, num_classes: int) -> Sampler:
    """[B, T] LongTensor ids with repeated ids within each sample and some padding zeros."""

    def sample(batch_size: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        ids = torch.randint(1, vocab, (batch_size, length), generator=g)
        ids[:, 1] = ids[:, 0]  # a repeated index in every sample
        ids[:, -1] = 0  # padding
        ids[::2, -2] = 0
        return ids, _labels(g, batch_size, num_classes)

    return sample


def make_embedding_bag(seed: int) -> tuple[nn.Module, Sampler]:
    """Inputs LongTensor [B, 7] in [0, 20) (0 = padding), 5 classes."""
    return _build(seed, EmbeddingMean), _token_sampler(20, 7, 5)


class CalledTwice(nn.Module):
    """The same Linear(8, 8) applied twice: h = l(relu(l(x))), then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.l(F.relu(self.l(x)))))


def make_called_twice(seed: int) -> tuple[nn.Module, Sampler]:
    """Inputs [B, 8], 5 classes."""
    return _build(seed, CalledTwice), _classifier_sampler((8,), 5)


class TiedEmbedding(nn.Module):
    """Embedding(12, 6); logits = F.linear(tanh(mean embedding), emb.weight) (weight used twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.out_bias = nn.Parameter(torch.zeros(12))

    def forward(self, ids: Tensor) -> Tensor:
        h = torch.tanh(self.emb(ids).mean(dim=1))
        return F.linear(h, self.emb.weight, self.out_bias)


class TiedModules(nn.Module):
    """A separate nn.Linear whose ``.weight`` IS the embedding's Parameter (shared)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.lin = nn.Linear(6, 12)
        self.lin.weight = self.emb.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.lin(torch.tanh(self.emb(ids).mean(dim=1)))


def _tied_sampler() -> Sampler:
    def sample(batch_size: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        ids = torch.randint(0, 12, (batch_size, 5), generator=g)
        ids[:, 1] = ids[:, 0]
        return ids, _labels(g, batch_size, 12)

    return sample


def make_tied_embedding(seed: int) -> tuple[nn.Module, Sampler]:
    """Inputs LongTensor [B, 5] in [0, 12), 12 classes (the vocabulary)."""
    return _build(seed, TiedEmbedding), _tied_sampler()


def make_tied_modules(seed: int) -> tuple[nn.Module, Sampler]:
    """Inputs LongTensor [B, 5] in [0, 12), 12 classes; parameters emb.weight (shared), lin.bias."""
    return _build(seed, TiedModules), _tied_sampler()


class RecurrentClassifier(nn.Module):
    """batch_first recurrent layer + Linear head on the last time step."""

    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = cell(4, 8, batch_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def make_rnn(seed: int) -> tuple[nn.Module, Sampler]:
    """nn.GRU(4, 8); inputs [B, 5, 4], 5 classes."""
    return _build(seed, lambda: RecurrentClassifier(nn.GRU)), _classifier_sampler((5, 4), 5)


def make_elman_rnn(seed: int) -> tuple[nn.Module, Sampler]:
    """nn.RNN(4, 8) (tanh); inputs [B, 5, 4], 5 classes."""
    return _build(seed, lambda: RecurrentClassifier(nn.RNN)), _classifier_sampler((5, 4), 5)


def make_lstm(seed: int) -> tuple[nn.Module, Sampler]:
    """nn.LSTM(4, 8); inputs [B, 5, 4], 5 classes."""
    return _build(seed, lambda: RecurrentClassifier(nn.LSTM)), _classifier_sampler((5, 4), 5)


class SelfAttention(nn.Module):
    """nn.MultiheadAttention(8, 2, batch_first=True) self-attention, mean over T, Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dim=8, num_heads=2, batch_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.attn(x, x, x, need_weights=False)
        return self.head(h.mean(dim=1))


def make_attention(seed: int) -> tuple[nn.Module, Sampler]:
    """Inputs [B, 4, 8], 5 classes."""
    return _build(seed, SelfAttention), _classifier_sampler((4, 8), 5)


class RawParams(nn.Module):
    """Raw nn.Parameter weight/bias (x @ W.T + b), an elementwise scale, and a child nn.Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 10) * 0.3)
        self.bias = nn.Parameter(torch.randn(6) * 0.1)
        self.scale = nn.Parameter(torch.rand(6) + 0.5)
        self.child = nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh((x @ self.weight.T + self.bias) * self.scale)
        return self.child(h)


def make_raw_params(seed: int) -> tuple[nn.Module, Sampler]:
    """Inputs [B, 10], 5 classes."""
    return _build(seed, RawParams), _classifier_sampler((10,), 5)


def make_frozen_part(seed: int) -> tuple[nn.Module, Sampler]:
    """First Linear frozen (requires_grad=False): Fisher keys are only '2.weight', '2.bias'."""

    def build() -> nn.Module:
        model = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 5))
        for p in model[0].parameters():
            p.requires_grad_(False)
        return model

    return _build(seed, build), _classifier_sampler((10,), 5)


class DictInput(nn.Module):
    """forward(a [B, 6], b [B, 4]); called as model(**x) with x = {"a": ..., "b": ...}."""

    def __init__(self) -> None:
        super().__init__()
        self.la = nn.Linear(6, 8)
        self.lb = nn.Linear(4, 8, bias=False)
        self.head = nn.Linear(8, 5)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.head(F.relu(self.la(a) + self.lb(b)))


def make_dict_input(seed: int) -> tuple[nn.Module, Sampler]:
    """Dict inputs ``{"a": [B, 6], "b": [B, 4]}``, 5 classes."""

    def sample(batch_size: int, g: torch.Generator) -> tuple[dict[str, Tensor], Tensor]:
        x = {"a": _randn(g, batch_size, 6), "b": _randn(g, batch_size, 4)}
        return x, _labels(g, batch_size, 5)

    return _build(seed, DictInput), sample


class TinyTransformer(nn.Module):
    """1-layer nn.TransformerEncoder (d_model 8, 2 heads, ff 16, dropout 0.1), mean over T, head."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x).mean(dim=1))


def make_transformer(seed: int) -> tuple[nn.Module, Sampler]:
    """Inputs [B, 4, 8], 5 classes; returned in train mode (dropout active until eval())."""
    return _build(seed, TinyTransformer), _classifier_sampler((4, 8), 5)


# --------------------------------------------------------------------------------------------------
# gaussian models
# --------------------------------------------------------------------------------------------------
def make_regression(seed: int) -> tuple[nn.Module, Sampler]:
    """MLP with outputs [B, 3] (likelihood="gaussian"); inputs [B, 6], targets float [B, 3]."""

    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    def sample(batch_size: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        x = _randn(g, batch_size, 6)
        y = torch.stack([x[:, 0] * x[:, 1], torch.sin(x[:, 2]), x[:, 3:].sum(1)], dim=1)
        return x, y + 0.1 * _randn(g, batch_size, 3)

    return _build(seed, build), sample


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------
MODELS: dict[str, Factory] = {
    "mlp_bn": make_mlp_bn,
    "linear_seq": make_linear_seq,
    "cnn": make_cnn,
    "conv_variety": make_conv_variety,
    "layernorm_mlp": make_layernorm_mlp,
    "embedding_bag": make_embedding_bag,
    "called_twice": make_called_twice,
    "tied_embedding": make_tied_embedding,
    "tied_modules": make_tied_modules,
    "rnn": make_rnn,
    "elman_rnn": make_elman_rnn,
    "lstm": make_lstm,
    "attention": make_attention,
    "raw_params": make_raw_params,
    "frozen_part": make_frozen_part,
    "dict_input": make_dict_input,
    "transformer": make_transformer,
    "regression": make_regression,
}

GAUSSIAN: list[str] = ["regression"]
CATEGORICAL: list[str] = [name for name in MODELS if name not in GAUSSIAN]
LIKELIHOOD: dict[str, str] = {name: ("gaussian" if name in GAUSSIAN else "categorical") for name in MODELS}


def make_batches(
    name: str,
    *,
    seed: int = 0,
    num_batches: int = 3,
    batch_size: int = 4,
    data_seed: int = 1234,
) -> tuple[nn.Module, list[tuple[Any, Tensor]]]:
    """``(model, [(x, y), ...])`` for ``MODELS[name]``; weights from ``seed``, data from
    ``data_seed``."""
    model, sample = MODELS[name](seed)
    g = torch.Generator().manual_seed(data_seed)
    return model, [sample(batch_size, g) for _ in range(num_batches)]
