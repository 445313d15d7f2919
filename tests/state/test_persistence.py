"""Tests of the ``EWC`` state: ``state_dict``/``load_state_dict`` through ``torch.save``, the
safetensors file (``save``/``EWC.load``), and loads that fail without changing anything.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from ewc_helpers import consolidated_model, ewc_value_and_grads, gen, perturb, task_model
from ewc_rs import EWC

pytestmark = pytest.mark.core


def same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if {k: v for k, v in a.items() if k != "tasks"} != {k: v for k, v in b.items() if k != "tasks"}:
        return False
    if len(a["tasks"]) != len(b["tasks"]):
        return False
    for pa, pb in zip(a["tasks"], b["tasks"]):
        for key in ("diagonal", "star"):
            if set(pa[key]) != set(pb[key]):
                return False
            if not all(pa[key][n].dtype == pb[key][n].dtype and torch.equal(pa[key][n], pb[key][n]) for n in pa[key]):
                return False
    return True


# --------------------------------------------------------------------------------------------------
# 1. state round-trips
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, storage", [("separate", None), ("online", None), ("separate", torch.bfloat16)])
def test_state_dict_round_trip(mode: str, storage: Any, tmp_path: Any, seed: int) -> None:
    g = gen(seed)
    model, batches = task_model("mlp_bn", seed)
    ewc = EWC(model, lam=42.0, mode=mode, gamma=0.7, storage_dtype=storage)
    for _ in range(2):
        ewc.consolidate(batches())
        perturb(model, g)
    v0, g0 = ewc_value_and_grads(model, ewc)

    torch.save(ewc.state_dict(), tmp_path / "ewc.pt")
    fresh = EWC(model, lam=1.0)
    fresh.load_state_dict(torch.load(tmp_path / "ewc.pt"))
    assert same_state(fresh.state_dict(), ewc.state_dict()), f"seed={seed}"
    v1, g1 = ewc_value_and_grads(model, fresh)
    assert torch.equal(v1, v0) and all(torch.equal(g1[n], g0[n]) for n in g0), f"seed={seed}"

    ewc.save(str(tmp_path / "ewc.safetensors"))
    loaded = EWC.load(str(tmp_path / "ewc.safetensors"), model)
    assert (loaded.lam, loaded.mode, loaded.gamma, loaded.storage_dtype, loaded.num_tasks) == (
        ewc.lam,
        ewc.mode,
        ewc.gamma,
        ewc.storage_dtype,
        ewc.num_tasks,
    )
    assert same_state(loaded.state_dict(), ewc.state_dict()), f"seed={seed}"
    v2, g2 = ewc_value_and_grads(model, loaded)
    assert torch.equal(v2, v0) and all(torch.equal(g2[n], g0[n]) for n in g0), f"seed={seed}"


def test_load_rejects_non_ewc_file(tmp_path: Any) -> None:
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="ewc_rs"):
        EWC.load(str(tmp_path / "x.safetensors"), nn.Linear(2, 2))


def test_stored_state_is_constant(seed: int) -> None:
    """F and θ* in the state never require grad nor hold a graph (raw_params uses the fallback)."""
    model, ewc, _, batches = consolidated_model("raw_params", seed)
    returned = ewc.consolidate(batches())
    assert not any(f.requires_grad for f in returned.values())
    for task in ewc.state_dict()["tasks"]:
        for d in task.values():
            assert not any(t.requires_grad or t.grad_fn is not None for t in d.values())
    sd = ewc.state_dict()
    sd["tasks"][0]["diagonal"] = {n: t.clone().requires_grad_() for n, t in sd["tasks"][0]["diagonal"].items()}
    fresh = EWC(model, lam=1.0)
    fresh.load_state_dict(sd)
    assert not any(t.requires_grad for t in fresh.state_dict()["tasks"][0]["diagonal"].values())


# --------------------------------------------------------------------------------------------------
# 2. failed loads
# --------------------------------------------------------------------------------------------------
def _bad_states(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Corrupted copies of a valid state with one pair (names 'a', 'b', ...)."""

    def variant(fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        s = copy.deepcopy(state)
        fn(s)
        return s

    first = sorted(state["tasks"][0]["diagonal"])[0]

    def set_f(value: float) -> Callable[[dict[str, Any]], None]:
        def fn(s: dict[str, Any]) -> None:
            s["tasks"][0]["diagonal"][first].view(-1)[0] = value

        return fn

    def set_star(value: float) -> Callable[[dict[str, Any]], None]:
        def fn(s: dict[str, Any]) -> None:
            s["tasks"][0]["star"][first].view(-1)[0] = value

        return fn

    return {
        "a future version": variant(lambda s: s.update(version=99)),
        "fisher_bits 4": variant(lambda s: s.update(fisher_bits=4)),
        "no version": variant(lambda s: s.pop("version")),
        "not a dict": [state],  # type: ignore[dict-item]
        "star misses a key": variant(lambda s: s["tasks"][0]["star"].pop(first)),
        "fisher has an extra key": variant(lambda s: s["tasks"][0]["diagonal"].update(extra=torch.ones(3))),
        "F and star shapes differ": variant(lambda s: s["tasks"][0]["star"].update({first: torch.zeros(99)})),
        "F nan": variant(set_f(math.nan)),
        "F inf": variant(set_f(math.inf)),
        "F negative": variant(set_f(-1e-3)),
        "star nan": variant(set_star(math.nan)),
        "star -inf": variant(set_star(-math.inf)),
        "lam negative": variant(lambda s: s.update(lam=-1.0)),
        "lam nan": variant(lambda s: s.update(lam=math.nan)),
        "lam bool": variant(lambda s: s.update(lam=True)),
        "lam str": variant(lambda s: s.update(lam="1")),
        "mode": variant(lambda s: s.update(mode="sum")),
        "gamma": variant(lambda s: s.update(gamma=1.5)),
        "norm_stats": variant(lambda s: s.update(norm_stats="keep")),
        "storage float16": variant(lambda s: s.update(storage_dtype="float16")),
        "tasks not a list": variant(lambda s: s.update(tasks={"0": s["tasks"][0]})),
        "online with two tasks": variant(lambda s: s.update(mode="online", tasks=s["tasks"] * 2)),
        "task with extra key": variant(lambda s: s["tasks"][0].update(extra={})),
        "F not a tensor": variant(lambda s: s["tasks"][0]["diagonal"].update({first: [1.0, 2.0]})),
        "parameter unknown to the model": _misfit(state, "unknown name")[0],
        "shape other than the model's": _misfit(state, "wrong shape")[0],
    }


def _misfit(state: dict[str, Any], case: str) -> tuple[dict[str, Any], str]:
    """A copy of a valid state whose first stored parameter (F and θ* alike) does not fit the model,
    and the message expected: ``case`` is "unknown name" or "wrong shape"."""
    s = copy.deepcopy(state)
    task = s["tasks"][0]
    first = sorted(task["diagonal"])[0]
    shape = tuple(task["diagonal"][first].shape)
    if case == "unknown name":
        for key in ("diagonal", "star"):
            task[key]["ghost.weight"] = task[key].pop(first)
        return s, f"state: parameter 'ghost.weight' is stored with shape {shape}, but the model has no such parameter"
    for key in ("diagonal", "star"):
        task[key][first] = torch.ones(2, 3)
    return s, f"state: parameter '{first}' is stored with shape (2, 3), but the model's parameter has shape {shape}"


def test_failed_load_changes_nothing(seed: int) -> None:
    model, ewc, _, batches = consolidated_model("mlp_bn", seed)
    good = ewc.state_dict()
    before_state = copy.deepcopy(good)
    v0, g0 = ewc_value_and_grads(model, ewc)
    cases = _bad_states(copy.deepcopy(good))
    bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    for what, bad in cases.items():
        with pytest.raises(ValueError):
            ewc.load_state_dict(bad)
        assert same_state(ewc.state_dict(), before_state), f"seed={seed}: failed load '{what}' changed the state"
        v1, g1 = ewc_value_and_grads(model, ewc)
        assert torch.equal(v1, v0) and all(torch.equal(g1[n], g0[n]) for n in g0), (
            f"seed={seed}: failed load '{what}' changed the penalty"
        )
        # the norm-statistics freeze is still in place
        model.train()
        stats = [m.running_mean.clone() for m in bn]
        model(batches(1)[0][0])
        assert all(torch.equal(s, m.running_mean) for s, m in zip(stats, bn)), f"failed load '{what}'"
    # a good state still loads afterwards
    ewc.load_state_dict(good)
    assert torch.equal(ewc_value_and_grads(model, ewc)[0], v0)


# --------------------------------------------------------------------------------------------------
# 3. states that do not fit the model: rejected when loaded, not at the first penalty
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["unknown name", "wrong shape"])
def test_load_state_dict_rejects_a_state_the_model_does_not_fit(case: str, seed: int) -> None:
    model, ewc, _, _ = consolidated_model("mlp_bn", seed)
    before = copy.deepcopy(ewc.state_dict())
    v0, g0 = ewc_value_and_grads(model, ewc)
    bad, message = _misfit(before, case)
    with pytest.raises(ValueError, match=re.escape(message)):
        ewc.load_state_dict(bad)
    assert same_state(ewc.state_dict(), before), f"seed={seed}: failed load ({case}) changed the state"
    v1, g1 = ewc_value_and_grads(model, ewc)
    assert torch.equal(v1, v0) and all(torch.equal(g1[n], g0[n]) for n in g0), (
        f"seed={seed}: failed load ({case}) changed the penalty"
    )


@pytest.mark.parametrize("case", ["unknown name", "wrong shape"])
def test_load_file_rejects_a_model_it_does_not_fit(case: str, tmp_path: Any, seed: int) -> None:
    """``EWC.load`` checks the file against the model it binds to: a model without one of the stored
    parameters, or with it in another shape, fails there, and no normalisation hook is left behind."""
    model, ewc, _, _ = consolidated_model("mlp_bn", seed)
    path = str(tmp_path / "ewc.safetensors")
    ewc.save(path)
    name = sorted(ewc.state_dict()["tasks"][0]["diagonal"])[0]
    stored = tuple(dict(model.named_parameters())[name].shape)
    other = copy.deepcopy(model)
    owner, _, attr = name.rpartition(".")
    if case == "unknown name":
        delattr(other.get_submodule(owner), attr)
        message = f"state: parameter '{name}' is stored with shape {stored}, but the model has no such parameter"
    else:
        setattr(other.get_submodule(owner), attr, nn.Parameter(torch.zeros(2, 3)))
        message = f"state: parameter '{name}' is stored with shape {stored}, but the model's parameter has shape (2, 3)"
    hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in other.modules()]
    with pytest.raises(ValueError, match=re.escape(message)):
        EWC.load(path, other)
    assert hooks == [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in other.modules()]
    assert EWC.load(path, model).num_tasks == 1  # the model it was saved from still loads it
