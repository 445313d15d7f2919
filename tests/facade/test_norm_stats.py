"""Tests of ``norm_stats``: with ``"freeze"`` the running statistics of normalisation layers stay
those of the consolidated tasks while ``module.training`` reads as set; ``"update"`` warns once
and lets them follow ``model.train()``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from ewc_helpers import task_model
from ewc_rs import EWC

pytestmark = pytest.mark.core


def _bn_stats(model: nn.Module) -> list[Tensor]:
    return [
        t.clone()
        for m in model.modules()
        if isinstance(m, nn.BatchNorm1d)
        for t in (m.running_mean, m.running_var, m.num_batches_tracked)
    ]


def _stats_equal(a: list[Tensor], b: list[Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_norm_stats_freeze(seed: int) -> None:
    model, batches = task_model("mlp_bn", seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default ("freeze") does not warn
        ewc = EWC(model, lam=1.0)
    model.train()
    s0 = _bn_stats(model)
    model(batches(1)[0][0])
    assert not _stats_equal(s0, _bn_stats(model)), "before consolidation the statistics must update"

    ewc.consolidate(batches())
    model.train()
    s1 = _bn_stats(model)
    x = batches(1)[0][0]
    for _ in range(3):
        out = model(x)
    assert _stats_equal(s1, _bn_stats(model)), f"seed={seed}: frozen statistics changed"
    assert all(m.training for m in model.modules()), "module.training must read True outside forward"
    model.eval()
    torch.testing.assert_close(out, model(x))  # the layers ran in eval mode inside the forward
    model.train()

    ewc.release_norm_stats()
    model(x)
    assert not _stats_equal(s1, _bn_stats(model)), "after release_norm_stats() the statistics update"


def test_norm_stats_update_warns_once_and_updates(seed: int) -> None:
    model, batches = task_model("mlp_bn", seed)
    with pytest.warns(UserWarning, match="norm_stats") as record:
        ewc = EWC(model, lam=1.0, norm_stats="update")
    assert len([w for w in record if issubclass(w.category, UserWarning)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ewc.consolidate(batches())
        model.train()
        s = _bn_stats(model)
        model(batches(1)[0][0])
    assert not _stats_equal(s, _bn_stats(model)), "norm_stats='update' must let the statistics update"

    plain, _ = task_model("cnn", seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EWC(plain, lam=1.0, norm_stats="update")  # no normalisation layer: no warning


def test_norm_stats_two_ewc_objects_on_one_model(seed: int) -> None:
    """Two freezing EWC objects on one model (e.g. a fresh one given the other's state) nest their
    hooks; ``module.training`` must still read as set outside the forward."""
    model, batches = task_model("mlp_bn", seed)
    a = EWC(model, lam=1.0)
    a.consolidate(batches())
    b = EWC(model, lam=1.0)
    b.load_state_dict(a.state_dict())
    model.train()
    s = _bn_stats(model)
    model(batches(1)[0][0])
    assert all(m.training for m in model.modules()), "training flag lost with two EWC objects"
    assert _stats_equal(s, _bn_stats(model))
    model.eval()
    model(batches(1)[0][0])
    assert not any(m.training for m in model.modules())


def test_norm_stats_restored_when_forward_raises(seed: int) -> None:
    model, batches = task_model("mlp_bn", seed)
    ewc = EWC(model, lam=1.0)
    ewc.consolidate(batches())
    model.train()
    with pytest.raises(RuntimeError):
        model[3](torch.randn(3, 5))  # wrong width for BatchNorm1d(12)
    assert all(m.training for m in model.modules()), "a failed forward left a layer in eval mode"
