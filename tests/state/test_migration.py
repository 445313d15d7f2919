"""Saved states of format version 1, written by the version before the block model
(``tests/state/data_v1``: every mode, structure and storage dtype), load into this version and give
the penalty and gradient that version computed; a migrated state saves as the current version."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from ewc_rs import EWC

pytestmark = pytest.mark.core

DATA = Path(__file__).parent / "data_v1"
CASES = json.loads((DATA / "expected.json").read_text())["cases"]


def _model() -> torch.nn.Module:
    spec = DATA / "make_files.py"
    namespace: dict[str, Any] = {}
    exec(compile(spec.read_text(), str(spec), "exec"), namespace)  # the generator's model() (no run: __name__)
    return namespace["model"]()


def _bound(name: str) -> torch.nn.Module:
    model = _model()
    model.load_state_dict(load_file(str(DATA / f"{name}.model.safetensors")))
    return model


def _check(ewc: EWC, model: torch.nn.Module, name: str) -> None:
    case = CASES[name]
    assert (ewc.mode, ewc.structure, str(ewc.storage_dtype), ewc.num_tasks) == (
        case["mode"],
        case["structure"],
        f"torch.{case['storage_dtype']}",
        case["tasks"],
    )
    for p in model.parameters():
        p.grad = None
    value = ewc.penalty(model)
    value.backward()
    want = load_file(str(DATA / f"{name}.grad.safetensors"))
    assert float(value.detach()) == pytest.approx(case["penalty"], rel=1e-6, abs=1e-9), name
    for n, p in model.named_parameters():
        assert p.grad is not None
        torch.testing.assert_close(p.grad, want[n], rtol=1e-5, atol=1e-7, msg=f"{name}: gradient of {n}")


@pytest.mark.parametrize("name", sorted(CASES))
def test_version_1_file_loads_with_the_same_penalty(name: str) -> None:
    model = _bound(name)
    ewc = EWC.load(str(DATA / f"{name}.safetensors"), model)
    _check(ewc, model, name)


@pytest.mark.parametrize("name", sorted(CASES))
def test_version_1_state_dict_loads_with_the_same_penalty(name: str, tmp_path: Path) -> None:
    model = _bound(name)
    ewc = EWC(model, lam=1.0)
    ewc.load_state_dict(torch.load(DATA / f"{name}.pt", weights_only=True))
    assert ewc.lam == 3.5 and ewc.gamma == 0.6
    _check(ewc, model, name)
    # Saved again, it is a current-version state that loads the same.
    state = ewc.state_dict()
    assert state["version"] == 2 and "pairs" not in state
    ewc.save(str(tmp_path / "again.safetensors"))
    _check(EWC.load(str(tmp_path / "again.safetensors"), model), model, name)


def test_version_1_state_with_a_bad_tensor_is_refused_and_changes_nothing() -> None:
    name = "separate_kfac_float32"
    model = _bound(name)
    ewc = EWC.load(str(DATA / f"{name}.safetensors"), model)
    bad = torch.load(DATA / f"{name}.pt", weights_only=True)
    layer = sorted(bad["pairs"][0]["kron"])[0]
    bad["pairs"][0]["kron"][layer]["A"] = torch.ones(2, 3)
    with pytest.raises(ValueError, match=f"layer '{layer}'.*square matrix"):
        ewc.load_state_dict(bad)
    _check(ewc, model, name)
