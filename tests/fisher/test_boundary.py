"""The typed Python↔Rust boundary of the Fisher engine (``ewc_rs._core``): each type is built by
keyword and checked when built, so a malformed value never reaches a backward pass; and
``layer_rule`` covers exactly the module types and settings its rules handle."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from ewc_rs import _core

pytestmark = pytest.mark.core


class MyLinear(nn.Linear):
    """A subclass may override ``forward``: no rule for it."""


@pytest.mark.parametrize(
    "module, expected",
    [
        (nn.Linear(3, 2), "torch.nn.modules.linear.Linear"),
        (nn.Conv1d(2, 3, 3), "torch.nn.modules.conv.Conv1d"),
        (nn.Conv2d(2, 3, 3, padding="same"), "torch.nn.modules.conv.Conv2d"),
        (nn.BatchNorm1d(4), "torch.nn.modules.batchnorm.BatchNorm1d"),
        (nn.BatchNorm2d(4), "torch.nn.modules.batchnorm.BatchNorm2d"),
        (nn.LayerNorm([4, 5]), "torch.nn.modules.normalization.LayerNorm"),
        (nn.GroupNorm(2, 4), "torch.nn.modules.normalization.GroupNorm"),
        (nn.Embedding(10, 3, padding_idx=0), "torch.nn.modules.sparse.Embedding"),
    ],
)
def test_layer_rule_for_covered_modules(module: nn.Module, expected: str) -> None:
    rule = _core.layer_rule(module)
    assert rule is not None and rule.module_type == expected


@pytest.mark.parametrize(
    "module",
    [
        MyLinear(3, 2),
        nn.Conv2d(2, 3, 3, padding_mode="reflect"),
        nn.Conv1d(2, 3, 4, padding="same"),  # even kernel: PyTorch pads one side more
        nn.BatchNorm1d(4, track_running_stats=False),
        nn.Embedding(10, 3, max_norm=1.0),
        nn.Embedding(10, 3, scale_grad_by_freq=True),
        nn.LSTM(3, 4),
        nn.Conv3d(2, 3, 3),
        nn.ReLU(),
    ],
    ids=lambda m: repr(m)[:40],
)
def test_layer_rule_refuses_what_no_rule_handles(module: nn.Module) -> None:
    assert _core.layer_rule(module) is None


def _call(**overrides: Any) -> _core.LayerCall:
    rule = _core.layer_rule(nn.Linear(3, 2))
    assert rule is not None
    kwargs: dict[str, Any] = dict(rule=rule, input=torch.zeros(4, 3), output=torch.zeros(4, 2), weight_slot=0)
    kwargs.update(overrides)
    return _core.LayerCall(**kwargs)


def test_layer_call_is_keyword_only() -> None:
    rule = _core.layer_rule(nn.Linear(3, 2))
    with pytest.raises(TypeError):
        _core.LayerCall(rule, torch.zeros(4, 3), torch.zeros(4, 2), 0)  # type: ignore[misc]


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        ({"weight_slot": None}, r"weight_slot, bias_slot: expected at least one"),
        ({"bias_slot": 0}, r"two different slots"),
        ({"output": torch.zeros(5, 2)}, r"input, output: expected the same number of samples"),
        ({"input": torch.tensor(1.0)}, r"input, output"),
    ],
)
def test_layer_call_is_checked_when_built(overrides: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        _call(**overrides)


def test_layer_call_rejects_a_rule_of_another_type() -> None:
    with pytest.raises(TypeError):
        _call(rule="linear")


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"kind": "fisher", "likelihood": "categorical"}, r"kind: expected one of"),
        ({"kind": "exact", "likelihood": "poisson"}, r"likelihood: expected"),
        ({"kind": "mc", "likelihood": "categorical"}, r"mc_draws: required"),
        ({"kind": "empirical", "likelihood": "categorical"}, r"targets: required"),
        ({"kind": "batched", "likelihood": "gaussian"}, r"targets: required"),
        ({"kind": "empirical", "likelihood": "custom"}, r"loglik: required"),
        ({"kind": "exact", "likelihood": "custom", "loglik": torch.zeros(2)}, r"callable likelihood"),
    ],
)
def test_root_spec_is_checked_when_built(kwargs: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        _core.RootSpec(**kwargs)


def test_root_spec_accepts_what_each_kind_needs() -> None:
    y = torch.zeros(3, dtype=torch.long)
    for spec in (
        _core.RootSpec(kind="exact", likelihood="categorical"),
        _core.RootSpec(kind="empirical", likelihood="categorical", targets=y),
        _core.RootSpec(kind="mc", likelihood="categorical", mc_draws=y.reshape(3, 1)),
        _core.RootSpec(kind="batched", likelihood="custom", loglik=torch.zeros(3)),
    ):
        assert "RootSpec(" in repr(spec)


def test_fisher_sums_add_checks_slot_and_shape() -> None:
    params = [torch.zeros(2, 3), torch.zeros(2)]
    sums = _core.FisherSums(params=params, names=["w", "b"], budget_bytes=1 << 20)
    sums.add(1, torch.ones(2))
    assert torch.equal(sums.totals[1], torch.ones(2)) and sums.totals[0].dtype == torch.float32
    with pytest.raises(ValueError, match=r"parameter 'w'.*shape \[3\].*\[2, 3\]"):
        sums.add(0, torch.ones(3))
    with pytest.raises(ValueError, match=r"slot 2: expected an index below 2"):
        sums.add(2, torch.ones(2))
    with pytest.raises(ValueError, match=r"names: expected one name per parameter"):
        _core.FisherSums(params=params, names=["w"], budget_bytes=1)


def test_fisher_sums_add_batch_rejects_unknown_slots() -> None:
    lin = nn.Linear(3, 2)
    sums = _core.FisherSums(params=[lin.weight], names=["weight"], budget_bytes=1 << 20)
    x = torch.randn(4, 3)
    out = lin(x)
    call = _call(input=x, output=out, weight_slot=0, bias_slot=5)
    with pytest.raises(ValueError, match="slot 5"):
        sums.add_batch(out, _core.RootSpec(kind="exact", likelihood="categorical"), calls=[call])
    assert torch.equal(sums.totals[0], torch.zeros(2, 3)), "a failed batch changed the sums"
