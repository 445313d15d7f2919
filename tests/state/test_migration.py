"""Saved states of earlier format versions load into this version and give the penalty and gradient
the writing version computed; a migrated state saves as the current version.

``tests/state/data_v1``: version 1, written before the block model; ``tests/state/data_v2``:
version 2, written before the 8-bit Fisher. Each holds every mode, structure and storage dtype."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from ewc_rs import EWC
from ewc_rs._state.persistence import STATE_VERSION

pytestmark = pytest.mark.core

HERE = Path(__file__).parent
VERSIONS = {1: HERE / "data_v1", 2: HERE / "data_v2"}
CASES = [
    (v, name) for v, d in VERSIONS.items() for name in sorted(json.loads((d / "expected.json").read_text())["cases"])
]


def _case(version: int, name: str) -> dict[str, Any]:
    return json.loads((VERSIONS[version] / "expected.json").read_text())["cases"][name]


def _model(version: int) -> torch.nn.Module:
    spec = VERSIONS[version] / "make_files.py"
    namespace: dict[str, Any] = {}
    exec(compile(spec.read_text(), str(spec), "exec"), namespace)  # the generator's model() (no run: __name__)
    return namespace["model"]()


def _bound(version: int, name: str) -> torch.nn.Module:
    model = _model(version)
    model.load_state_dict(load_file(str(VERSIONS[version] / f"{name}.model.safetensors")))
    return model


def _check(ewc: EWC, model: torch.nn.Module, version: int, name: str) -> None:
    case = _case(version, name)
    assert (ewc.mode, ewc.structure, str(ewc.storage_dtype), ewc.num_tasks) == (
        case["mode"],
        case["structure"],
        f"torch.{case['storage_dtype']}",
        case["tasks"],
    )
    assert ewc.fisher_bits is None
    for p in model.parameters():
        p.grad = None
    value = ewc.penalty(model)
    value.backward()
    want = load_file(str(VERSIONS[version] / f"{name}.grad.safetensors"))
    assert float(value.detach()) == pytest.approx(case["penalty"], rel=1e-6, abs=1e-9), name
    for n, p in model.named_parameters():
        assert p.grad is not None
        torch.testing.assert_close(p.grad, want[n], rtol=1e-5, atol=1e-7, msg=f"{name}: gradient of {n}")


@pytest.mark.parametrize(("version", "name"), CASES)
def test_old_file_loads_with_the_same_penalty(version: int, name: str) -> None:
    model = _bound(version, name)
    ewc = EWC.load(str(VERSIONS[version] / f"{name}.safetensors"), model)
    _check(ewc, model, version, name)


@pytest.mark.parametrize(("version", "name"), CASES)
def test_old_state_dict_loads_with_the_same_penalty(version: int, name: str, tmp_path: Path) -> None:
    model = _bound(version, name)
    ewc = EWC(model, lam=1.0)
    ewc.load_state_dict(torch.load(VERSIONS[version] / f"{name}.pt", weights_only=True))
    assert ewc.lam == 3.5 and ewc.gamma == 0.6
    _check(ewc, model, version, name)
    # Saved again, it is a current-version state that loads the same.
    state = ewc.state_dict()
    assert state["version"] == STATE_VERSION and "pairs" not in state
    ewc.save(str(tmp_path / "again.safetensors"))
    _check(EWC.load(str(tmp_path / "again.safetensors"), model), model, version, name)


def test_version_1_state_with_a_bad_tensor_is_refused_and_changes_nothing() -> None:
    name = "separate_kfac_float32"
    model = _bound(1, name)
    ewc = EWC.load(str(VERSIONS[1] / f"{name}.safetensors"), model)
    bad = torch.load(VERSIONS[1] / f"{name}.pt", weights_only=True)
    layer = sorted(bad["pairs"][0]["kron"])[0]
    bad["pairs"][0]["kron"][layer]["A"] = torch.ones(2, 3)
    with pytest.raises(ValueError, match=f"layer '{layer}'.*square matrix"):
        ewc.load_state_dict(bad)
    _check(ewc, model, 1, name)
