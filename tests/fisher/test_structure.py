"""The rule check is left out only for plain stacks (``ewc_rs._fisher.structure``): there the Fisher
still equals the float64 per-sample reference and the checked estimate; anything the structure does
not vouch for (other modules, hooks, dtypes, user code, inputs a layer reads across samples) still
runs the check.

Inputs are drawn fresh on every run (``EWC_RS_TEST_SEED`` replays one).
"""

from __future__ import annotations

import os
import secrets
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import ewc_rs._fisher.estimation as estimation
from ewc_rs import _core, fisher_diag
from ewc_rs._fisher.estimation import Estimation
from ewc_rs._fisher.recording import Call, Site, cover_model
from ewc_rs._fisher.structure import calls_keep_samples, plain_stack
from models import MODELS
from reference import reference_fisher, relative_error

pytestmark = [pytest.mark.core, pytest.mark.usefixtures("one_thread")]

SEED: int = int(os.environ.get("EWC_RS_TEST_SEED") or secrets.randbits(31))
TOL = 1e-4
Batch = tuple[Tensor, Tensor]


def _msg(**what: Any) -> str:
    return f"EWC_RS_TEST_SEED={SEED} " + " ".join(f"{k}={v}" for k, v in what.items())


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts the rule checks that run."""
    ran: list[int] = []
    inner = Estimation._check_rules

    def counted(self: Estimation, *args: Any) -> None:
        ran.append(1)
        inner(self, *args)

    monkeypatch.setattr(Estimation, "_check_rules", counted)
    yield ran


def _every_kind_of_stack() -> nn.Module:
    """A stack with a layer of each rule type the structure vouches for, and parameter-free layers."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.GELU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1, groups=2),
        nn.BatchNorm2d(4),
        nn.SiLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(16, 12),
        nn.LayerNorm(12),
        nn.Tanh(),
        nn.Linear(12, 5),
    )


def _batches(shape: tuple[int, ...], classes: int, g: torch.Generator, sizes: tuple[int, ...] = (5, 4)) -> list[Batch]:
    return [(torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)) for n in sizes]


def _stacks() -> dict[str, tuple[nn.Module, list[Batch]]]:
    g = torch.Generator().manual_seed(SEED + 1)
    torch.manual_seed(SEED)
    out: dict[str, tuple[nn.Module, list[Batch]]] = {}
    for name in ("mlp_bn", "cnn"):
        model, sample = MODELS[name](SEED)
        out[name] = (model, [sample(n, g) for n in (5, 4)])
    stack = _every_kind_of_stack()
    with torch.no_grad():
        stack.train()
        stack(torch.randn(16, 2, 8, 8))  # BatchNorm's running statistics away from (0, 1)
    out["every_kind"] = (stack, _batches((2, 8, 8), 5, g))
    ids = torch.randint(0, 9, (5, 6), generator=g), torch.randint(0, 9, (4, 6), generator=g)
    embed = nn.Sequential(nn.Embedding(9, 4), nn.Flatten(), nn.Linear(24, 3))
    out["embedding"] = (embed, [(i, torch.randint(0, 3, (i.shape[0],), generator=g)) for i in ids])
    return out


@pytest.mark.parametrize("kind", ["empirical", "exact", "mc"])
@pytest.mark.parametrize("name", ["mlp_bn", "cnn", "every_kind", "embedding"])
def test_a_plain_stack_skips_the_check_and_matches_the_reference(
    name: str, kind: str, checks: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, batches = _stacks()[name]
    torch.manual_seed(SEED + 2)
    labels = torch.Generator().manual_seed(SEED + 3)
    got = fisher_diag(model, batches, kind=kind, generator=labels if kind == "mc" else None)
    assert checks == [], _msg(name=name, kind=kind, why="the structure shows what the check tests")
    if kind != "mc":  # mc draws its labels: compared with the checked estimate below
        wide = [(x.double() if x.is_floating_point() else x, y) for x, y in batches]
        want = reference_fisher(model.double(), wide, kind=kind)
        model.float()
        err = relative_error({k: v.double() for k, v in got.items()}, want)
        assert err <= TOL, _msg(name=name, kind=kind, err=err)
    monkeypatch.setattr(estimation, "plain_stack", lambda *args: False)
    labels = torch.Generator().manual_seed(SEED + 3)
    checked = fisher_diag(model, batches, kind=kind, generator=labels if kind == "mc" else None)
    assert checks == [1], _msg(name=name, kind=kind, why="forced through the check")
    for k in got:
        torch.testing.assert_close(got[k], checked[k], rtol=1e-6, atol=0, msg=_msg(name=name, kind=kind, param=k))


class _OwnLinear(nn.Linear):
    """A subclass: it may override forward, so the structure does not vouch for it."""


def _mlp(first: nn.Module | None = None) -> nn.Sequential:
    return nn.Sequential(first or nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _hooked(register: Callable[[nn.Module], Any]) -> nn.Module:
    model = _mlp()
    register(model[0])
    return model


def _instance_forward() -> nn.Module:
    model = _mlp()
    plain = model[2].forward
    model[2].forward = types.MethodType(lambda self, x: plain(x), model[2])
    return model


def _tensor_hook() -> nn.Module:
    model = _mlp()
    model[0].weight.register_hook(lambda g: g)
    return model


VARIANTS: dict[str, Callable[[], nn.Module]] = {
    "subclass": lambda: _mlp(_OwnLinear(6, 8)),
    "forward_hook": lambda: _hooked(lambda m: m.register_forward_hook(lambda *a: None)),
    "forward_pre_hook": lambda: _hooked(lambda m: m.register_forward_pre_hook(lambda *a: None)),
    "backward_hook": lambda: _hooked(lambda m: m.register_full_backward_hook(lambda *a: None)),
    "instance_forward": _instance_forward,
    "tensor_hook": _tensor_hook,
    "softmax_over_samples": lambda: nn.Sequential(nn.Linear(6, 8), nn.Softmax(dim=0), nn.Linear(8, 3)),
    "float64": lambda: _mlp().double(),
    # layers whose calls are not recorded (nothing to estimate), so whose inputs are not looked at
    "frozen_layer": lambda: _mlp(nn.Linear(6, 8).requires_grad_(False)),
    "norm_without_parameters": lambda: _mlp(nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8, elementwise_affine=False))),
    # no parameters of its own, yet it mixes the samples: batch statistics even in eval mode
    "batch_statistics": lambda: _mlp(
        nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, affine=False, track_running_stats=False))
    ),
    "embedding_max_norm": lambda: nn.Sequential(nn.Embedding(9, 6, max_norm=1.0), nn.Linear(6, 3)),
    "nested_custom": lambda: nn.Sequential(nn.Linear(6, 6), nn.ModuleDict({"a": nn.Linear(6, 6)}), nn.Linear(6, 3)),
}


def _inputs(name: str, g: torch.Generator) -> list[Batch]:
    if name == "embedding_max_norm":
        return [(torch.randint(0, 9, (5,), generator=g), torch.randint(0, 3, (5,), generator=g))]
    x = torch.randn(5, 6, generator=g, dtype=torch.float64 if name == "float64" else torch.float32)
    return [(x, torch.randint(0, 3, (5,), generator=g))]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_what_the_structure_does_not_vouch_for_is_checked(name: str, checks: list[int]) -> None:
    torch.manual_seed(SEED)
    model = VARIANTS[name]()
    if name == "nested_custom":  # a ModuleDict is no layer: called through a custom forward
        model = _NestedCustom(model)
    data = _inputs(name, torch.Generator().manual_seed(SEED + 1))
    if name == "batch_statistics":
        # The check sends the layers before it to the per-sample fallback, which cannot run batch
        # statistics on one sample: an error, not a wrong Fisher.
        with pytest.raises(ValueError, match="per channel"):
            fisher_diag(model, data, kind="empirical")
    else:
        fisher_diag(model, data, kind="empirical")
    assert checks == [1], _msg(variant=name)


class _NestedCustom(nn.Module):
    def __init__(self, inner: nn.Sequential) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner[2](self.inner[1]["a"](self.inner[0](x)))


def test_a_global_module_hook_leaves_the_check_in_place(checks: list[int]) -> None:
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        fisher_diag(_mlp(), _inputs("plain", torch.Generator().manual_seed(SEED)), kind="empirical")
    finally:
        handle.remove()
    assert checks == [1]


def test_user_code_in_the_likelihood_or_outputs_leaves_the_check_in_place(checks: list[int]) -> None:
    model = _mlp()
    data = _inputs("plain", torch.Generator().manual_seed(SEED))

    def loglik(out: Tensor, y: Tensor) -> Tensor:
        return torch.log_softmax(out, -1).gather(1, y[:, None])[:, 0]

    fisher_diag(model, data, kind="empirical", likelihood=loglik)
    fisher_diag(model, data, kind="empirical", outputs=lambda out: out)
    assert checks == [1, 1]


def _call(module: nn.Module, x: Tensor, **kw: Any) -> Call:
    rule = _core.layer_rule(module)
    assert rule is not None
    out = module(x)
    return Call(Site(module, rule, 0, None), x, out, out._version, **kw)


def test_calls_that_read_across_samples_are_not_vouched_for() -> None:
    # Such models cannot run on a slice of their batch, so the check itself would stop them; the
    # structure must not let them through either.
    g = torch.Generator().manual_seed(SEED)
    x2, x3 = torch.randn(4, 10, generator=g), torch.randn(4, 3, 10, generator=g)
    x4 = torch.randn(4, 3, 5, 5, generator=g)
    good = [
        _call(nn.Conv1d(3, 2, 3), x3),
        _call(nn.Conv2d(3, 2, 3), x4),
        _call(nn.Linear(10, 2), x2),
        _call(nn.LayerNorm(10), x2),
        _call(nn.BatchNorm1d(3).eval(), x3),
    ]
    assert calls_keep_samples(good, 4)
    across = {
        "unbatched conv input [C, L]": _call(nn.Conv1d(4, 2, 3), x2),
        "a norm over [N, F]": _call(nn.LayerNorm((4, 10)), x2),
        "a 1-d Linear input": _call(nn.Linear(4, 2), torch.randn(4, generator=g)),
    }
    for why, call in across.items():
        assert not calls_keep_samples([*good, call], 4), why
    assert not calls_keep_samples(good, 5), "rows are not the batch's samples"
    assert not calls_keep_samples([*good, _call(nn.Linear(10, 2), x2, broadcast=True)], 4), "a shared row"
    unreadable = Call(good[2].site, torch.empty(0), torch.empty(0), -1)
    assert not calls_keep_samples([*good, unreadable], 4), "not a tensor call"


def test_a_flatten_over_the_samples_is_not_vouched_for() -> None:
    for start, ok in ((1, True), (0, False), (-2, False)):
        model = nn.Sequential(nn.Linear(6, 4), nn.Flatten(start))
        assert plain_stack(model, cover_model(model), set()) is ok, start
