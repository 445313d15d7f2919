"""Tests of ``ewc_rs.fisher_diag`` against the pure-PyTorch float64 reference (tests/helpers/reference.py).

Inputs are drawn fresh on every run: model weights from ``SEED``, data from ``SEED + 1``. Every
assertion message starts with ``EWC_RS_TEST_SEED=<SEED>``; set that variable to replay a failure::

    EWC_RS_TEST_SEED=123 python -m pytest tests/fisher/test_fisher.py

Agreement is the relative Frobenius error over all parameters jointly (``relative_error``):
float32 result vs float64 reference ≤ ``TOL``. CUDA cases run when a GPU is present and skip
otherwise; TF32 is switched off for them, so that float32 on the GPU means float32.
"""

from __future__ import annotations

import copy
import os
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional, TypeVar, Union

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ewc_rs import fisher_diag
from ewc_rs._fisher.options import draw_categorical
from models import GAUSSIAN, LIKELIHOOD, MODELS
from reference import reference_fisher, relative_error, seed_batched_fisher

#: same_conv's even-kernel 'same' padding makes torch warn about a padded copy: expected.
pytestmark = [
    pytest.mark.core,
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning"),
    pytest.mark.usefixtures("one_thread"),
]

SEED: int = int(os.environ.get("EWC_RS_TEST_SEED") or secrets.randbits(31))
TOL = 1e-4
#: Low-precision models vs the float32 model's reference. bfloat16 keeps 8 significant bits; on
#: mlp_bn (BatchNorm in eval) its error has a heavy tail: median 0.005, 0.10 once in 150 draws.
#: float16 too (mlp_bn, empirical, 300 draws: median 4e-4, 99th percentile 0.011, largest 0.106; a
#: float64 reference on the rounded weights and inputs still gave 0.07: the activations' rounding).
HALF_TOL: dict[torch.dtype, float] = {torch.float16: 0.15, torch.bfloat16: 0.25}
#: Batch sizes of the standard loader: several batches, the last one uneven.
SIZES = (4, 4, 3)
#: Cuts the second batch of ``SIZES`` in the middle.
CUT = 6

Batch = tuple[Any, Tensor]
Sampler = Callable[[int, torch.Generator], Batch]
Factory = Callable[[int], tuple[nn.Module, Sampler]]
Fisher = dict[str, Tensor]


def _msg(**what: Any) -> str:
    """Context for an assertion message, the seed first (to replay the run)."""
    return f"EWC_RS_TEST_SEED={SEED} " + " ".join(f"{k}={v}" for k, v in what.items())


# --------------------------------------------------------------------------------------------------
# extra models (same protocol as models.py: factory(seed) -> (model, sampler))
# --------------------------------------------------------------------------------------------------
M = TypeVar("M", bound=nn.Module)


def _seeded(seed: int, fn: Callable[[], M]) -> M:
    """``fn()`` under ``torch.manual_seed(seed)`` without touching the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def _plain_sampler(shape: tuple[int, ...], num_classes: int) -> Sampler:
    def sample(batch_size: int, g: torch.Generator) -> Batch:
        x = torch.randn(batch_size, *shape, generator=g)
        return x, torch.randint(0, num_classes, (batch_size,), generator=g)

    return sample


class SameConv(nn.Module):
    """Conv2d padding='same' with an odd kernel (a rule) and an even one (asymmetric: fallback)."""

    def __init__(self) -> None:
        super().__init__()
        self.odd = nn.Conv2d(2, 4, 3, padding="same")
        self.even = nn.Conv2d(4, 3, 4, padding="same", dilation=1)
        self.head = nn.Linear(3 * 6 * 6, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.even(F.relu(self.odd(x)))).flatten(1))


def _inplace_relu() -> nn.Module:
    """Linear -> ReLU(inplace=True) twice: the in-place op modifies the recorded layer outputs."""
    return nn.Sequential(
        nn.Linear(6, 10), nn.ReLU(inplace=True), nn.Linear(10, 10), nn.ReLU(inplace=True), nn.Linear(10, 5)
    )


class FunctionalReuse(nn.Module):
    """``l.weight`` is used by ``l`` and again outside it via ``F.linear`` (must be detected)."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(6, 6)
        self.head = nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.l(x))
        return self.head(h + 0.5 * F.linear(h, self.l.weight))


class SeqFirst(nn.Module):
    """A Linear on a sequence-first tensor [T, B, F]; with T == batch size dim 0 is not the sample."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(6, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.l(x.transpose(0, 1))).mean(dim=0))


class SeqFirstTransformer(nn.Module):
    """nn.TransformerEncoderLayer(batch_first=False) on [T, B, E]: its Linear/LayerNorm see [T, B, ·]."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=12, batch_first=False)
        self.head = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(x.transpose(0, 1)).mean(dim=0))


class FlatTime(nn.Module):
    """A Linear on the flattened [B*T, F] batch (dim 0 is not the sample: fallback)."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(6, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        b, t, f = x.shape
        return self.head(torch.tanh(self.l(x.reshape(b * t, f))).reshape(b, t, -1).mean(dim=1))


EXTRA: dict[str, Factory] = {
    "same_conv": lambda s: (_seeded(s, SameConv), _plain_sampler((2, 6, 6), 5)),
    "inplace_relu": lambda s: (_seeded(s, _inplace_relu), _plain_sampler((6,), 5)),
    "functional_reuse": lambda s: (_seeded(s, FunctionalReuse), _plain_sampler((6,), 5)),
    # T = 4 = SIZES[0]: the first batches have dim 0 == T, the shape test alone cannot tell.
    "seq_first": lambda s: (_seeded(s, SeqFirst), _plain_sampler((4, 6), 5)),
    "seq_first_transformer": lambda s: (_seeded(s, SeqFirstTransformer), _plain_sampler((4, 8), 5)),
    "flat_time": lambda s: (_seeded(s, FlatTime), _plain_sampler((3, 6), 5)),
}
ALL_NAMES: list[str] = list(MODELS) + list(EXTRA)


def _likelihood(name: str) -> str:
    return LIKELIHOOD.get(name, "categorical")


def _make(name: str, sizes: Sequence[int] = SIZES, seed: int = SEED) -> tuple[nn.Module, list[Batch]]:
    """Model ``name`` (weights from ``seed``) and batches of the given sizes (data from ``seed + 1``)."""
    factory = MODELS[name] if name in MODELS else EXTRA[name]
    model, sample = factory(seed)
    g = torch.Generator().manual_seed(seed + 1)
    return model, [sample(bs, g) for bs in sizes]


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _map(x: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to every tensor of a (nested tuple/list/dict) batch element."""
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, dict):
        return {k: _map(v, fn) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_map(v, fn) for v in x)
    return x


def _rows(x: Any) -> int:
    """Batch size of a batch element."""
    if isinstance(x, Tensor):
        return int(x.shape[0])
    values = list(x.values()) if isinstance(x, dict) else list(x)
    return next(_rows(v) for v in values if isinstance(v, (Tensor, tuple, list, dict)))


def _call(model: nn.Module, x: Any) -> Tensor:
    """``model(x)``, ``model(*x)`` or ``model(**x)``."""
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def _to(batches: Sequence[Batch], device: torch.device, dtype: Optional[torch.dtype] = None) -> list[Batch]:
    """Batches moved to ``device``; floating tensors cast to ``dtype`` when given."""

    def fn(t: Tensor) -> Tensor:
        t = t.to(device)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    return [(_map(x, fn), _map(y, fn)) for x, y in batches]


def _clone(batches: Sequence[Batch]) -> list[Batch]:
    return [(_map(x, Tensor.clone), _map(y, Tensor.clone)) for x, y in batches]


def _same_tree(a: Any, b: Any) -> bool:
    """Structural equality of two batch elements, tensors compared exactly (NaN equal to NaN)."""
    if isinstance(a, Tensor):
        return (
            isinstance(b, Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a, b) or torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_tree(u, v) for u, v in zip(a, b))
    return a == b


def _check_close(got: Fisher, want: Fisher, tol: float, context: str) -> None:
    """Relative Frobenius error of ``got`` vs the reference ``want`` at most ``tol``."""
    err = relative_error(got, want)
    worst = max(want, key=lambda k: relative_error({k: got[k]}, {k: want[k]}))
    assert err <= tol, (
        f"{context}: relative error {err:.3e} > {tol:.0e}; worst parameter {worst!r}: "
        f"{relative_error({worst: got[worst]}, {worst: want[worst]}):.3e}"
    )


def _trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


class Snapshot:
    """Everything ``fisher_diag`` must leave as it found it: parameters, buffers, modes of every
    submodule, ``.grad`` fields (values, or None) and hooks of every submodule."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
        self.modes = {name: m.training for name, m in model.named_modules()}
        self.grads = {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}
        self.hooks = self._hooks()

    def _hooks(self) -> dict[str, tuple[list[int], ...]]:
        return {
            name: (
                list(m._forward_hooks),
                list(m._forward_pre_hooks),
                list(m._backward_hooks),
                list(getattr(m, "_backward_pre_hooks", {})),
            )
            for name, m in self.model.named_modules()
        }

    def check(self, context: str) -> None:
        """Assert that nothing changed since the snapshot."""
        state = self.model.state_dict(keep_vars=True)
        for k, v in self.state.items():
            assert torch.equal(state[k].detach(), v), f"{context}: {k} changed"
        modes = {name: m.training for name, m in self.model.named_modules()}
        assert modes == self.modes, f"{context}: modes changed: {self.modes} -> {modes}"
        for n, p in self.model.named_parameters():
            before = self.grads[n]
            if before is None:
                assert p.grad is None, f"{context}: {n}.grad was None, now a tensor"
            else:
                assert p.grad is not None and torch.equal(p.grad, before), f"{context}: {n}.grad changed"
        assert self._hooks() == self.hooks, f"{context}: hooks left behind: {self.hooks} -> {self._hooks()}"


def _draws_like_fisher(
    model: nn.Module,
    batches: Sequence[Batch],
    *,
    likelihood: str,
    mc_samples: int,
    generator: torch.Generator,
    num_samples: Optional[int] = None,
) -> list[Tensor]:
    """The labels (categorical, ``[B, S]``) or noise (gaussian, ``[B, S, D]``) that
    ``fisher_diag(kind="mc", generator=generator)`` draws, replicated as ``_draw_mc`` does:
    per batch (cut to ``num_samples``), from the float32 outputs of the model in eval mode.

    ``reference.draw_mc_labels`` cannot be used for this: it draws from float64 outputs and
    float64 noise, and ``torch.randn`` gives other numbers in float64 than in float32."""
    m = copy.deepcopy(model).eval()
    device = next(m.parameters()).device
    draws: list[Tensor] = []
    seen = 0
    with torch.enable_grad():  # as in fisher_diag (no inference fast paths)
        for x, _ in batches:
            if num_samples is not None and seen >= num_samples:
                break
            n = _rows(x) if num_samples is None else min(_rows(x), num_samples - seen)
            out = _call(m, _map(x, lambda t, n=n: t[:n].to(device))).detach().float()
            if likelihood == "categorical":
                d = draw_categorical(out, mc_samples, generator)
            else:
                d = torch.randn(n, mc_samples, out.shape[1], generator=generator, device=generator.device)
            draws.append(d.cpu())
            seen += n
    return draws


# --------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------
@pytest.fixture(params=["cpu", "cuda"])
def device(request: pytest.FixtureRequest) -> Iterator[torch.device]:
    """CPU always; CUDA when available (skipped otherwise), with TF32 off during the test."""
    if request.param == "cpu":
        yield torch.device("cpu")
        return
    if not torch.cuda.is_available():
        pytest.skip("CUDA not available: torch.cuda.is_available() is False")
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield torch.device("cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# --------------------------------------------------------------------------------------------------
# 1. every model x exact / empirical / batched
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cut", [False, True], ids=["all", "cut"])
@pytest.mark.parametrize("kind", ["exact", "empirical", "batched"])
@pytest.mark.parametrize("name", ALL_NAMES)
def test_matches_reference(name: str, kind: str, cut: bool, device: torch.device) -> None:
    """Batches of sizes 4, 4, 3; ``cut``: num_samples=6 stops in the middle of the second batch."""
    model, batches = _make(name)
    model = model.to(device)
    lik = _likelihood(name)
    num_samples = CUT if cut else None
    got = fisher_diag(model, batches, kind=kind, likelihood=lik, num_samples=num_samples)
    want = reference_fisher(model, batches, kind=kind, likelihood=lik, num_samples=num_samples)
    _check_close(got, want, TOL, _msg(model=name, kind=kind, num_samples=num_samples, device=device))


def test_dataloader_input() -> None:
    """A torch DataLoader (batches as lists, uneven last batch) works like a list of tuples."""
    model, batches = _make("mlp_bn", sizes=(11,))
    x, y = batches[0]
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    for kind in ("exact", "empirical", "batched"):
        got = fisher_diag(model, loader, kind=kind)
        want = reference_fisher(model, [(xb, yb) for xb, yb in loader], kind=kind)
        _check_close(got, want, TOL, _msg(kind=kind, loader="DataLoader"))


# --------------------------------------------------------------------------------------------------
# 2. mc
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("samples", [3, 12], ids=["S<C", "S>C"])
@pytest.mark.parametrize("name", ALL_NAMES)
def test_mc_matches_reference_with_same_draws(name: str, samples: int, device: torch.device) -> None:
    """Given the draws fisher_diag makes (same generator seed), mc equals the reference's mc;
    num_samples=10 cuts the last batch. With more draws S than classes C, the draws are grouped
    by class (at most C backward passes): the result must not change."""
    model, batches = _make(name)
    model = model.to(device)
    lik, seed, num = _likelihood(name), SEED + 7, 10
    got = fisher_diag(
        model,
        batches,
        kind="mc",
        likelihood=lik,
        mc_samples=samples,
        num_samples=num,
        generator=torch.Generator().manual_seed(seed),
    )
    labels = _draws_like_fisher(
        model,
        batches,
        likelihood=lik,
        mc_samples=samples,
        generator=torch.Generator().manual_seed(seed),
        num_samples=num,
    )
    want = reference_fisher(
        model, batches, kind="mc", likelihood=lik, mc_samples=samples, num_samples=num, mc_labels=labels
    )
    _check_close(got, want, TOL, _msg(model=name, kind="mc", device=device))


@pytest.mark.parametrize("name", ["frozen_part", "regression"])
def test_mc_many_draws_approaches_exact(name: str) -> None:
    """With 2000 draws per sample, mc is within a few percent of the exact Fisher."""
    model, batches = _make(name, sizes=(4, 4))
    lik = _likelihood(name)
    got = fisher_diag(
        model, batches, kind="mc", likelihood=lik, mc_samples=2000, generator=torch.Generator().manual_seed(SEED)
    )
    want = reference_fisher(model, batches, kind="exact", likelihood=lik)
    _check_close(got, want, 0.1, _msg(model=name, kind="mc vs exact", mc_samples=2000))


@pytest.mark.parametrize("name", ["tied_modules", "rnn", "regression"])
def test_mc_reproducible(name: str) -> None:
    """Same generator seed: identical results; another seed: different; no generator: follows
    the global RNG (torch.manual_seed)."""
    model, batches = _make(name)
    lik = _likelihood(name)

    def run(generator: Optional[torch.Generator]) -> Fisher:
        return fisher_diag(model, batches, kind="mc", likelihood=lik, mc_samples=2, generator=generator)

    a = run(torch.Generator().manual_seed(SEED))
    b = run(torch.Generator().manual_seed(SEED))
    c = run(torch.Generator().manual_seed(SEED + 1))
    ctx = _msg(model=name)
    assert all(torch.equal(a[k], b[k]) for k in a), f"{ctx}: same seed, different results"
    assert relative_error(c, a) > 1e-3, f"{ctx}: another seed gave the same result"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        d = run(None)
        torch.manual_seed(SEED)
        e = run(None)
    assert all(torch.equal(d[k], e[k]) for k in d), f"{ctx}: global seed, different results"


# --------------------------------------------------------------------------------------------------
# 3. batched: the seed article's estimator
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in ALL_NAMES if n not in GAUSSIAN])
def test_batched_equals_seed_procedure(name: str) -> None:
    """kind='batched' is the article's loop: zero_grad, cross_entropy(...).backward(), grad²."""
    model, batches = _make(name)
    got = fisher_diag(model, batches, kind="batched")
    _check_close(got, seed_batched_fisher(model, batches), TOL, _msg(model=name, kind="batched"))


def test_batched_is_biased_low() -> None:
    """Documents the bias: batched ≈ 1/batch_size of the (empirical) Fisher, as per-sample gradients
    of a random-init model nearly cancel in a batch mean. Bounds loose: [1/(8B), 4/B]."""
    bs = 8
    model, batches = _make("layernorm_mlp", sizes=(bs, bs, bs))
    batched = fisher_diag(model, batches, kind="batched")
    empirical = fisher_diag(model, batches, kind="empirical")
    ratio = sum(float(v.sum()) for v in batched.values()) / sum(float(v.sum()) for v in empirical.values())
    ctx = _msg(batch_size=bs, ratio=f"{ratio:.3f}")
    assert 1 / (8 * bs) < ratio < 4 / bs, f"{ctx}: total(batched)/total(empirical) not ≈ 1/batch_size"
    assert relative_error(batched, empirical) > 0.5, f"{ctx}: batched is not clearly unlike empirical"


# --------------------------------------------------------------------------------------------------
# 4. specific structures
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "keys"),
    [
        ("frozen_part", ["2.weight", "2.bias"]),
        ("tied_modules", ["emb.weight", "lin.bias"]),
        ("tied_embedding", ["out_bias", "emb.weight"]),
        ("raw_params", ["weight", "bias", "scale", "child.weight", "child.bias"]),
    ],
)
def test_keys_of_frozen_tied_and_raw(name: str, keys: list[str]) -> None:
    """Frozen parameters are left out; a tied parameter appears once, under its first name."""
    model, batches = _make(name)
    got = fisher_diag(model, batches)
    assert sorted(got) == sorted(keys), _msg(model=name, keys=list(got))


def test_inplace_relu_modifies_recorded_output() -> None:
    """ReLU(inplace=True) after a Linear: the engine records a copy and stays exact, and the model's
    own forward (outputs) is unchanged by the estimation."""
    model, batches = _make("inplace_relu")
    x = batches[0][0]
    before = model(x).detach()
    got = fisher_diag(model, batches, kind="exact")
    want = reference_fisher(model, batches, kind="exact")
    _check_close(got, want, TOL, _msg(model="inplace_relu"))
    assert torch.equal(model(x).detach(), before), _msg(model="inplace_relu", what="forward changed")


# --------------------------------------------------------------------------------------------------
# 5. side effects
# --------------------------------------------------------------------------------------------------
def _prepare_side_effects(model: nn.Module) -> None:
    """Train mode, one submodule deliberately in eval, a user hook, half the grads set."""
    model.train()
    children = [m for m in model.modules() if m is not model]
    children[len(children) // 2].eval()
    model.register_forward_hook(lambda m, i, o: None)
    g = torch.Generator().manual_seed(SEED + 3)
    for i, p in enumerate(model.parameters()):
        p.grad = torch.randn(p.shape, generator=g).to(p) if i % 2 == 0 else None


@pytest.mark.parametrize("kind", ["exact", "mc", "empirical", "batched"])
@pytest.mark.parametrize("name", ["mlp_bn", "transformer", "inplace_relu", "rnn"])
def test_no_side_effects(name: str, kind: str, device: torch.device) -> None:
    """Parameters, buffers (BN running stats), modes, .grad, hooks and the loader's tensors are
    all as before."""
    model, batches = _make(name)
    model = model.to(device)
    _prepare_side_effects(model)
    snap = Snapshot(model)
    data = _clone(batches)
    fisher_diag(model, batches, kind=kind, generator=torch.Generator().manual_seed(SEED))
    ctx = _msg(model=name, kind=kind, device=device)
    snap.check(ctx)
    assert all(_same_tree(a, b) for a, b in zip(batches, data)), f"{ctx}: loader tensors modified"


def _failing_loader(batches: Sequence[Batch], how: str) -> Iterator[Any]:
    """Yields the first batch, then fails: a malformed batch, a model error, a loader error."""
    yield batches[0]
    x, y = batches[1]
    if how == "not_pair":
        yield (x,)
    elif how == "bad_shape":
        yield x[:, :-1], y
    else:
        raise RuntimeError("loader broke")


@pytest.mark.parametrize("how", ["not_pair", "bad_shape", "loader_raises"])
@pytest.mark.parametrize("kind", ["exact", "mc", "empirical", "batched"])
def test_state_restored_after_error_mid_loader(kind: str, how: str) -> None:
    """An exception on the second batch leaves no hooks behind and restores modes and grads."""
    model, batches = _make("layernorm_mlp")
    _prepare_side_effects(model)
    snap = Snapshot(model)
    with pytest.raises((ValueError, RuntimeError)) as info:
        fisher_diag(model, _failing_loader(batches, how), kind=kind)
    ctx = _msg(kind=kind, how=how, error=repr(info.value))
    if how == "not_pair":
        assert info.type is ValueError and "batch 1" in str(info.value), ctx
    if how == "loader_raises":
        assert "loader broke" in str(info.value), ctx
    snap.check(ctx)
    assert all(not m._forward_hooks or m is model for m in model.modules()), ctx


# --------------------------------------------------------------------------------------------------
# 6. output contract
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["exact", "mc", "empirical", "batched"])
@pytest.mark.parametrize(
    "name",
    [
        "frozen_part",
        "tied_modules",
        "conv_variety",
        "dict_input",
        "raw_params",
        "functional_reuse",
        "rnn",
        "regression",
    ],
)
def test_output_contract(name: str, kind: str, device: torch.device) -> None:
    """Keys: trainable parameter names in order; float32; the parameter's shape and device.
    Model and batches both on ``device``."""
    model, batches = _make(name)
    model = model.to(device)
    got = fisher_diag(model, _to(batches, device), kind=kind, likelihood=_likelihood(name))
    ctx = _msg(model=name, kind=kind, device=device)
    assert list(got) == _trainable_names(model), f"{ctx}: keys {list(got)}"
    params = dict(model.named_parameters())
    for k, f in got.items():
        assert f.dtype == torch.float32, f"{ctx}: {k} dtype {f.dtype}"
        assert f.shape == params[k].shape, f"{ctx}: {k} shape {tuple(f.shape)}"
        assert f.device == params[k].device, f"{ctx}: {k} device {f.device}"
        assert not f.requires_grad, f"{ctx}: {k} requires grad"
        assert bool((f >= 0).all()), f"{ctx}: {k} has negative entries"


@pytest.mark.parametrize("kind", ["exact", "empirical"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["layernorm_mlp", "mlp_bn", "cnn", "rnn", "tied_modules", "regression"])
def test_half_precision_models(name: str, dtype: torch.dtype, kind: str, device: torch.device) -> None:
    """A model cast to float16/bfloat16 gives a float32 Fisher close to the float32 model's."""
    model, batches = _make(name)
    low = copy.deepcopy(model).to(device=device, dtype=dtype)
    lik = _likelihood(name)
    got = fisher_diag(low, _to(batches, device, dtype), kind=kind, likelihood=lik)
    ctx = _msg(model=name, dtype=dtype, kind=kind, device=device)
    assert all(f.dtype == torch.float32 for f in got.values()), ctx
    assert all(p.dtype == dtype for p in low.parameters()), f"{ctx}: model dtype changed"
    want = reference_fisher(model, batches, kind=kind, likelihood=lik)
    _check_close(got, want, HALF_TOL[dtype], ctx)


@pytest.mark.parametrize("kind", ["exact", "empirical", "batched"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_model_fisher_beyond_float16_range(dtype: torch.dtype, kind: str, device: torch.device) -> None:
    """Inputs ~3000 make squared gradients ~1e6-1e7, past float16's maximum (65504): only a
    float32 accumulation gives finite, correct values. Reference: the low-precision model's
    rounded weights and inputs, in float64."""
    g = torch.Generator().manual_seed(SEED + 5)
    lin = _seeded(SEED, lambda: nn.Linear(4, 3))
    model = nn.Sequential(lin)
    with torch.no_grad():
        lin.weight.normal_(0.0, 3e-4, generator=g)
        lin.bias.zero_()
    batches = [(torch.randn(6, 4, generator=g) * 3000, torch.randint(0, 3, (6,), generator=g))]
    low = model.to(device=device, dtype=dtype)
    low_batches = _to(batches, device, dtype)
    got = fisher_diag(low, low_batches, kind=kind)
    ctx = _msg(dtype=dtype, kind=kind, device=device)
    assert all(bool(torch.isfinite(f).all()) for f in got.values()), f"{ctx}: non-finite Fisher"
    assert float(got["0.weight"].max()) > 65504, f"{ctx}: the case does not leave float16's range"
    _check_close(got, reference_fisher(low, low_batches, kind=kind), 2e-2, ctx)


# --------------------------------------------------------------------------------------------------
# 7. bad input
# --------------------------------------------------------------------------------------------------
class ThreeDLogits(nn.Module):
    """Outputs [B, 2, 3]: fits neither likelihood."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(10, 6)

    def forward(self, x: Tensor) -> Tensor:
        return self.l(x).reshape(x.shape[0], 2, 3)


class DictOut(nn.Module):
    """Returns a dict without a "logits" entry."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(10, 5)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"scores": self.l(x)}


def _with_nan(batches: Sequence[Batch]) -> list[Batch]:
    out = _clone(batches)
    out[1][0][1, 2] = float("nan")
    return out


def _relabel(batches: Sequence[Batch], labels: Sequence[Union[int, float]]) -> list[Batch]:
    x, _ = batches[0]
    return [(x, torch.tensor(labels))]


Call = Callable[[nn.Module, list[Batch]], Any]
BAD: list[tuple[str, Call, type, str]] = [
    ("empty_loader", lambda m, b: fisher_diag(m, []), ValueError, r"loader"),
    ("empty_iterator", lambda m, b: fisher_diag(m, iter([])), ValueError, r"loader"),
    ("batch_is_tensor", lambda m, b: fisher_diag(m, [b[0][0]]), ValueError, r"pair"),
    ("batch_of_one", lambda m, b: fisher_diag(m, [(b[0][0],)]), ValueError, r"pair"),
    ("batch_of_three", lambda m, b: fisher_diag(m, [(*b[0], b[0][1])]), ValueError, r"pair"),
    *[
        (  # per-position logits [4, 2, 3] need per-position targets [4, 2]
            f"3d_logits_{k}",
            lambda m, b, k=k: fisher_diag(ThreeDLogits(), b, kind=k),
            ValueError,
            r"targets: expected shape \[4, 2\].*\[4, 2, 3\].*got \[4\]",
        )
        for k in ("exact", "mc", "empirical", "batched")
    ],
    (
        "3d_outputs_gaussian",
        lambda m, b: fisher_diag(ThreeDLogits(), [(b[0][0], torch.zeros(4, 2, 3))], likelihood="gaussian"),
        ValueError,
        r"gaussian.*\[N, D\]",
    ),
    ("dict_outputs_without_logits", lambda m, b: fisher_diag(DictOut(), b), ValueError, r"model outputs.*'logits'"),
    ("outputs_not_callable", lambda m, b: fisher_diag(m, b, outputs="logits"), ValueError, r"outputs: expected"),
    (
        "outputs_callable_returns_dict",
        lambda m, b: fisher_diag(DictOut(), b, outputs=lambda o: o),
        ValueError,
        r"outputs= callable returned dict",
    ),
    *[
        (
            f"label_{what}_{k}",
            lambda m, b, k=k, lab=lab: fisher_diag(m, _relabel(b, lab), kind=k),
            ValueError,
            r"\[0, 5\)",
        )
        for k in ("empirical", "batched")
        for what, lab in (("too_large", [0, 1, 5, 2]), ("negative", [0, -1, 3, 2]))
    ],
    *[
        (
            f"float_labels_{k}",
            lambda m, b, k=k: fisher_diag(m, _relabel(b, [0.0, 1.0, 2.0, 3.0]), kind=k),
            ValueError,
            r"integer class labels",
        )
        for k in ("empirical", "batched")
    ],
    (
        "too_few_labels",
        lambda m, b: fisher_diag(m, [(b[0][0], b[0][1][:3])], kind="empirical"),
        ValueError,
        r"targets.*4 labels",
    ),
    (
        "gaussian_target_shape",
        lambda m, b: fisher_diag(m, [(b[0][0], torch.zeros(4, 3))], kind="empirical", likelihood="gaussian"),
        ValueError,
        r"targets",
    ),
    ("unknown_kind", lambda m, b: fisher_diag(m, b, kind="fisher"), ValueError, r"kind.*'fisher'"),
    ("unknown_likelihood", lambda m, b: fisher_diag(m, b, likelihood="poisson"), ValueError, r"likelihood.*'poisson'"),
    *[
        (
            f"callable_{k}",
            lambda m, b, k=k: fisher_diag(m, b, kind=k, likelihood=lambda o, y: o.sum(1)),
            ValueError,
            rf"kind='{k}'.*callable",
        )
        for k in ("exact", "mc")
    ],
    (
        "callable_bad_shape",
        lambda m, b: fisher_diag(m, b, kind="empirical", likelihood=lambda o, y: o.sum()),
        ValueError,
        r"likelihood.*\[4\]",
    ),
    ("mc_samples_0", lambda m, b: fisher_diag(m, b, kind="mc", mc_samples=0), ValueError, r"mc_samples"),
    (
        "mc_samples_float",
        lambda m, b: fisher_diag(m, b, kind="mc", mc_samples=2.0),  # type: ignore[arg-type]
        ValueError,
        r"mc_samples",
    ),
    ("num_samples_0", lambda m, b: fisher_diag(m, b, num_samples=0), ValueError, r"num_samples"),
    ("num_samples_negative", lambda m, b: fisher_diag(m, b, num_samples=-3), ValueError, r"num_samples"),
    *[
        (
            f"nan_input_{k}",
            lambda m, b, k=k: fisher_diag(m, _with_nan(b), kind=k),
            ValueError,
            r"parameter '0\.weight'.*non-finite",
        )
        for k in ("exact", "empirical", "batched")
    ],
    ("nan_input_mc", lambda m, b: fisher_diag(m, _with_nan(b), kind="mc"), ValueError, r"non-finite"),
    (
        "not_a_module",
        lambda m, b: fisher_diag(lambda x: x, b),  # type: ignore[arg-type]
        TypeError,
        r"model.*nn\.Module",
    ),
    ("nothing_trainable", lambda m, b: fisher_diag(m.requires_grad_(False), b), ValueError, r"model"),
]


@pytest.mark.parametrize(("case", "exc", "pattern"), [(c, e, p) for _, c, e, p in BAD], ids=[name for name, *_ in BAD])
def test_bad_input_raises_clear_error(case: Call, exc: type, pattern: str) -> None:
    """The error type and a message that names the culprit; the model is left as it was."""
    model, batches = _make("layernorm_mlp", sizes=(4, 4))
    _prepare_side_effects(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    snap = Snapshot(model)
    with pytest.raises(exc) as info:
        case(model, batches)
    ctx = _msg(error=repr(info.value))
    assert re.search(pattern, str(info.value), re.S), f"{ctx}: message does not match {pattern!r}"
    for p in trainable:
        p.requires_grad_(True)  # the 'nothing_trainable' case froze them itself
    snap.check(ctx)


# --------------------------------------------------------------------------------------------------
# 8. callable likelihood
# --------------------------------------------------------------------------------------------------
def _categorical_ll(out: Tensor, y: Tensor) -> Tensor:
    return -F.cross_entropy(out, y, reduction="none")


def _gaussian_ll(out: Tensor, y: Tensor) -> Tensor:
    return -0.5 * (y - out).pow(2).sum(dim=1) - 0.5 * out.shape[1] * 1.8378770664093453  # + log 2π


@pytest.mark.parametrize("kind", ["empirical", "batched"])
@pytest.mark.parametrize("name", ["mlp_bn", "tied_modules", "rnn", "called_twice", "inplace_relu", "regression"])
def test_callable_likelihood_matches_builtin(name: str, kind: str) -> None:
    """A hand-written log-likelihood gives the built-in one's result (and the reference's)."""
    model, batches = _make(name)
    lik = _likelihood(name)
    fn = _gaussian_ll if lik == "gaussian" else _categorical_ll
    got = fisher_diag(model, batches, kind=kind, likelihood=fn, num_samples=CUT)
    builtin = fisher_diag(model, batches, kind=kind, likelihood=lik, num_samples=CUT)
    ctx = _msg(model=name, kind=kind)
    _check_close(got, builtin, 1e-5, f"{ctx} callable vs built-in")
    want = reference_fisher(model, batches, kind=kind, likelihood=lik, num_samples=CUT)
    _check_close(got, want, TOL, f"{ctx} callable vs reference")


# --------------------------------------------------------------------------------------------------
# 9. progress bar
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_samples", [None, CUT])
def test_progress_bar(num_samples: Optional[int], capsys: pytest.CaptureFixture[str]) -> None:
    """progress=True draws a tqdm bar and changes nothing in the result."""
    model, batches = _make("mlp_bn")
    plain = fisher_diag(model, batches, num_samples=num_samples)
    shown = fisher_diag(model, batches, num_samples=num_samples, progress=True)
    err = capsys.readouterr().err
    ctx = _msg(num_samples=num_samples)
    assert "Fisher (exact)" in err, f"{ctx}: no progress bar in stderr: {err!r}"
    _check_close(shown, plain, 1e-6, f"{ctx} progress vs none")


# --------------------------------------------------------------------------------------------------
# the one-sample-at-a-time fallback (taken when a model cannot be vmapped)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["exact", "empirical", "mc"])
@pytest.mark.parametrize("name", ["raw_params", "lstm", "tied_modules", "regression"])
def test_per_sample_loop_fallback_matches_reference(name: str, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EWC_RS_VMAP_FALLBACK", "0")
    model, batches = _make(name)
    lik = _likelihood(name)
    if kind == "mc":  # same draws on both sides: many of them, against exact
        got = fisher_diag(
            model, batches, kind="mc", likelihood=lik, mc_samples=1000, generator=torch.Generator().manual_seed(SEED)
        )
        want = reference_fisher(model, batches, kind="exact", likelihood=lik)
        _check_close(got, want, 0.2, _msg(model=name, kind="mc vs exact, per-sample loop"))
        return
    got = fisher_diag(model, batches, kind=kind, likelihood=lik)
    want = reference_fisher(model, batches, kind=kind, likelihood=lik)
    _check_close(got, want, TOL, _msg(model=name, kind=kind, fallback="per-sample loop"))


class ReadsFirstSample(nn.Module):
    """Every sample's hidden state gets sample 0's added (``h + h[:1]``): sample 0's outputs depend
    on its own rows only, the others' on sample 0's rows too, so the first layer's rows are not
    the samples' gradients (the rules' summed gradients still agree with autograd's)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(5, 6)
        self.second = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.first(x))
        return self.second(h + h[:1])


@pytest.mark.parametrize("kind", ["empirical", "mc", "exact"])
def test_rows_read_by_another_sample_take_the_fallback(kind: str, seed: int) -> None:
    """The rule check probes the last checked sample too: a layer whose rows reach another
    sample's outputs (here only samples after the first) is handed to the fallback; the layer
    above the mixing keeps its rule."""
    from ewc_rs._fisher.api import estimate
    from ewc_rs._fisher.options import parse_options

    torch.manual_seed(seed % 2**31)
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(4, 5, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(2)]
    options = {"generator": torch.Generator().manual_seed(seed)} if kind == "mc" else {}
    fallback = estimate(ReadsFirstSample(), batches, parse_options(kind, **options)).fallback
    assert fallback == ["first.bias", "first.weight"], f"seed={seed} kind={kind}: fallback {fallback}"
