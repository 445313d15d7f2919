"""``EWC(fisher_bits=8)``: the option's checks, online folding in float, KFAC's diagonal rest,
persistence (state dict, file, ``to``), ``consolidate_from``, and corrupt 8-bit states refused
without changing anything."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch

from ewc_helpers import (
    TOL,
    ewc_value_and_grads,
    fisher_of,
    gen,
    naive_value_and_grads,
    perturb,
    rel,
    snapshot,
    task_model,
)
from ewc_rs import EWC, load_fisher, save_fisher
from ewc_rs._blocks.diagonal import Diagonal
from ewc_rs._blocks.fisher8 import Fisher8
from reference import relative_error

pytestmark = pytest.mark.core


@pytest.mark.parametrize("bits", [4, 16, 32, "8", True, 8.0])
def test_unsupported_fisher_bits_are_refused_by_name(bits: object) -> None:
    model, _ = task_model("mlp_bn", 0)
    with pytest.raises(ValueError, match="fisher_bits"):
        EWC(model, lam=1.0, fisher_bits=bits)  # type: ignore[arg-type]


def _diagonal(ewc: EWC) -> Diagonal:
    block = ewc._tasks[-1].block("diagonal")
    assert isinstance(block, Diagonal)
    return block


def test_online_folding_runs_in_float_and_stores_eight_bits(seed: int) -> None:
    g = gen(seed)
    model, batches = task_model("mlp_bn", seed)
    ewc = EWC(model, lam=30.0, mode="online", gamma=0.7, fisher_bits=8)
    first, second = batches(), batches()
    ewc.consolidate(first)
    old = {n: f.dense(torch.float64) for n, f in _diagonal(ewc).fisher.items()}  # type: ignore[union-attr]
    perturb(model, g)
    f_new = fisher_of(model, second)
    ewc.consolidate(second)
    stored = _diagonal(ewc).fisher
    assert all(isinstance(f, Fisher8) for f in stored.values())
    want = {n: 0.7 * old[n] + f_new[n].double() for n in old}
    got = {n: f.dense(torch.float64) for n, f in stored.items()}  # type: ignore[union-attr]
    assert relative_error(got, want) < 0.02
    perturb(model, g)
    value, grads = ewc_value_and_grads(model, ewc)
    ref, ref_grads = naive_value_and_grads(model, [(dict(ewc._tasks[0].star), got)], 30.0)
    assert rel(float(value), ref) < TOL
    assert relative_error(grads, ref_grads) < TOL


@pytest.mark.parametrize("structure", ["kfac", "ekfac"])
def test_the_diagonal_rest_of_kronecker_structures_is_stored_in_eight_bits(seed: int, structure: str) -> None:
    g = gen(seed)
    model, batches = task_model("layernorm_mlp", seed)
    data = batches()
    dense = EWC(model, lam=10.0, structure=structure)
    eight = EWC(model, lam=10.0, structure=structure, fisher_bits=8)
    dense.consolidate(data)
    eight.consolidate(data)
    rest = _diagonal(eight).fisher
    assert rest and all(isinstance(f, Fisher8) for f in rest.values())
    perturb(model, g, 0.05)
    v8, g8 = ewc_value_and_grads(model, eight)
    v32, g32 = ewc_value_and_grads(model, dense)
    assert rel(float(v8), float(v32)) < 0.01
    assert relative_error(g8, g32) < 0.02


def test_state_dict_file_and_device_moves_keep_the_codes(seed: int, tmp_path: Path) -> None:
    g = gen(seed)
    model, batches = task_model("mlp_bn", seed)
    ewc = EWC(model, lam=10.0, fisher_bits=8, storage_dtype=torch.bfloat16)
    ewc.consolidate(batches())
    ewc.consolidate(batches())
    perturb(model, g)
    value, grads = ewc_value_and_grads(model, ewc)
    state = ewc.state_dict()
    assert state["version"] == 3 and state["fisher_bits"] == 8
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    again = EWC(model, lam=1.0)
    again.load_state_dict(torch.load(buffer, weights_only=True))
    ewc.save(str(tmp_path / "ewc.safetensors"))
    loaded = EWC.load(str(tmp_path / "ewc.safetensors"), model)
    for other in (again, loaded, copy.deepcopy(ewc).to("cpu")):
        assert other.fisher_bits == 8 and other.storage_dtype == torch.bfloat16 and other.num_tasks == 2
        v, gr = ewc_value_and_grads(model, other)
        assert float(v) == float(value)
        assert relative_error(gr, grads) == 0.0
    codes = {n: f.codes for n, f in _diagonal(loaded).fisher.items()}  # type: ignore[union-attr]
    assert all(torch.equal(codes[n], f.codes) for n, f in _diagonal(ewc).fisher.items())  # type: ignore[union-attr]


def test_a_dense_state_loaded_with_fisher_bits_is_coded_and_the_reverse_decoded(seed: int) -> None:
    model, batches = task_model("mlp_bn", seed)
    dense = EWC(model, lam=10.0)
    dense.consolidate(batches())
    state = dense.state_dict()
    coded = EWC(model, lam=1.0)
    coded.load_state_dict({**state, "fisher_bits": 8})
    assert all(isinstance(f, Fisher8) for f in _diagonal(coded).fisher.values())
    back = EWC(model, lam=1.0)
    back.load_state_dict({**coded.state_dict(), "fisher_bits": None})
    assert all(isinstance(f, torch.Tensor) for f in _diagonal(back).fisher.values())


def test_consolidate_from_a_fisher_file_codes_it(seed: int, tmp_path: Path) -> None:
    g = gen(seed)
    model, batches = task_model("mlp_bn", seed)
    data = batches()
    fisher, star = fisher_of(model, data), snapshot(model)
    save_fisher(tmp_path / "fisher", fisher, max_shard_bytes=4096)
    a = EWC(model, lam=10.0, fisher_bits=8)
    a.consolidate_from(load_fisher(tmp_path / "fisher"))
    b = EWC(model, lam=10.0, fisher_bits=8)
    b.consolidate(data)
    perturb(model, g)
    va, ga = ewc_value_and_grads(model, a)
    vb, gb = ewc_value_and_grads(model, b)
    ref, ref_grads = naive_value_and_grads(model, [(star, fisher)], 10.0)
    assert rel(float(va), float(vb)) < 1e-5 and relative_error(ga, gb) < 1e-5
    assert rel(float(va), ref) < 0.01 and relative_error(ga, ref_grads) < 0.02


def _corrupt(state: dict, what: str) -> dict:
    s = copy.deepcopy(state)
    diag = s["tasks"][0]["diagonal"]
    first = sorted(diag)[0]
    f = diag[first]
    if what == "codes float":
        f["codes"] = f["codes"].float()
    elif what == "scales short":
        f["scales"] = f["scales"][:-1]
    elif what == "scales nan":
        f["scales"][0, 0] = float("nan")
    elif what == "block 48":
        f["block"] = 48
    elif what == "missing scales":
        del f["scales"]
    elif what == "codes shape":
        f["codes"] = f["codes"].reshape(-1)[:-1]
    return s


@pytest.mark.parametrize(
    "what", ["codes float", "scales short", "scales nan", "block 48", "missing scales", "codes shape"]
)
def test_a_corrupt_eight_bit_state_is_refused_and_changes_nothing(seed: int, what: str) -> None:
    g = gen(seed)
    model, batches = task_model("mlp_bn", seed)
    ewc = EWC(model, lam=10.0, fisher_bits=8)
    ewc.consolidate(batches())
    perturb(model, g)
    before, grads = ewc_value_and_grads(model, ewc)
    with pytest.raises(ValueError, match="state"):
        ewc.load_state_dict(_corrupt(ewc.state_dict(), what))
    after, grads_after = ewc_value_and_grads(model, ewc)
    assert float(after) == float(before) and relative_error(grads_after, grads) == 0.0
