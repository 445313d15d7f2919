"""Fisher files (``save_fisher``/``load_fisher``: safetensors shards and an index) and
``EWC.consolidate_from``: round trips over several shards with the metadata a user needs to trust a
file (kind, likelihood, samples and tokens counted, fingerprint, versions, user fields), the
loader's options, bad files and bad input (refused, nothing written or changed), and a task added
from a file giving the penalty of one consolidated from the data."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import ewc_rs
from ewc_helpers import ewc_value_and_grads, perturb
from ewc_rs import EWC, fisher_diag, fisher_kfac, load_fisher, save_fisher
from models import make_batches

pytestmark = pytest.mark.core


def _estimate(seed: int) -> tuple[nn.Module, list, dict[str, torch.Tensor]]:
    model, batches = make_batches("mlp_bn", seed=seed % 1000, data_seed=seed)
    return model, batches, fisher_diag(model, batches)


def test_round_trip_over_several_shards_with_its_metadata(tmp_path: Path, seed: int) -> None:
    model, batches, fisher = _estimate(seed)
    assert fisher.metadata == {
        "kind": "exact",
        "likelihood": "categorical",
        "samples": sum(len(y) for _, y in batches),
        "tokens": sum(len(y) for _, y in batches),
        "mc_samples": 1,
    }
    biggest = max(f.numel() * 4 for f in fisher.values())
    folder = save_fisher(tmp_path / "f", fisher, metadata={"dataset": "task A", "revision": 3}, max_shard_bytes=biggest)
    index = json.loads((folder / "fisher.safetensors.index.json").read_text())
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    loaded = load_fisher(folder)
    assert set(loaded) == set(fisher) and all(torch.equal(loaded[n], fisher[n]) for n in fisher)
    meta = loaded.metadata
    assert meta["kind"] == "exact" and meta["samples"] == fisher.metadata["samples"] and meta["dtype"] == "float32"
    assert meta["user"] == {"dataset": "task A", "revision": 3}
    assert meta["ewc_rs"] == ewc_rs.__version__ and meta["torch"] == torch.__version__
    names = sorted(fisher)
    assert meta["fingerprint"]["names"] == names
    assert meta["fingerprint"]["shapes"] == [list(fisher[n].shape) for n in names]
    some = names[:2]
    part = load_fisher(folder, names=some, dtype=torch.bfloat16, model=model)
    assert list(part) == some and all(part[n].dtype == torch.bfloat16 for n in some)


def test_tokens_count_the_positions_that_are_not_ignored(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Embedding(11, 6), nn.Linear(6, 11))
    batches = []
    for _ in range(3):
        x = torch.randint(0, 11, (4, 7), generator=g)
        y = torch.randint(0, 11, (4, 7), generator=g)
        y[torch.rand(4, 7, generator=g) < 0.3] = -100
        y[:, 0] = 3  # every sample keeps a position
        batches.append((x, y))
    fisher = fisher_diag(model, batches, kind="empirical")
    assert fisher.metadata["tokens"] == sum(int((y != -100).sum()) for _, y in batches)
    causal = fisher_diag(model, batches, kind="empirical", likelihood="causal_lm")
    assert causal.metadata["tokens"] == sum(int((y[:, 1:] != -100).sum()) for _, y in batches)


def test_bad_files_and_bad_input_are_refused(tmp_path: Path, seed: int) -> None:
    model, _, fisher = _estimate(seed)
    folder = save_fisher(tmp_path / "good", fisher, max_shard_bytes=1)  # a shard per tensor
    index_file = folder / "fisher.safetensors.index.json"
    index = json.loads(index_file.read_text())
    first = sorted(fisher)[0]
    with pytest.raises(ValueError, match="is not a Fisher folder"):
        load_fisher(tmp_path)
    other = tmp_path / "weights"
    other.mkdir()
    save_file({"w": torch.zeros(2)}, str(other / "model.safetensors"))
    (other / "fisher.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"w": "model.safetensors"}})
    )
    with pytest.raises(ValueError, match="not an ewc_rs Fisher folder"):
        load_fisher(other)
    with pytest.raises(ValueError, match="names: the file has no Fisher for 'nope'"):
        load_fisher(folder, names=["nope"])
    with pytest.raises(ValueError, match=f"model: the Fisher of '{first}' has shape"):
        load_fisher(folder, model=nn.Linear(2, 2))
    moved = dict(index, weight_map={**index["weight_map"], first: index["weight_map"][sorted(fisher)[1]]})
    index_file.write_text(json.dumps(moved))
    with pytest.raises(ValueError, match=f"puts '{first}' in"):
        load_fisher(folder)
    index_file.write_text(json.dumps(index))
    (folder / index["weight_map"][first]).unlink()
    with pytest.raises(ValueError, match="is missing from"):
        load_fisher(folder)
    for bad, message in (
        ({first: -fisher[first]}, "negative values"),
        ({first: fisher[first] * float("nan")}, "finite"),
        ({}, "non-empty mapping"),
        ({first: [1.0]}, "mapped to tensors"),
    ):
        with pytest.raises(ValueError, match=message):
            save_fisher(tmp_path / "bad", bad)  # type: ignore[arg-type]
        assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="not an empty folder"):
        save_fisher(folder, fisher)
    with pytest.raises(ValueError, match="metadata: expected JSON"):
        save_fisher(tmp_path / "bad", fisher, metadata={"x": object()})
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("mode", ["separate", "online"])
@pytest.mark.parametrize("storage", [None, torch.bfloat16])
def test_consolidate_from_a_file_equals_consolidate(tmp_path: Path, mode: str, storage: torch.dtype, seed: int) -> None:
    model, batches, _ = _estimate(seed)
    g = torch.Generator().manual_seed(seed)
    head = {"7.weight", "7.bias"}  # the task head stays out of the selection
    chosen = [n for n, _ in model.named_parameters() if n not in head]
    direct = EWC(model, lam=5.0, mode=mode, gamma=0.5, params=chosen, storage_dtype=storage)
    from_files = EWC(model, lam=5.0, mode=mode, gamma=0.5, params=chosen, storage_dtype=storage)
    for t in range(2):
        direct.consolidate(batches)
        path = save_fisher(tmp_path / f"task{t}", fisher_diag(model, batches))
        from_files.consolidate_from(load_fisher(path, model=model))
        perturb(model, g)
    assert from_files.num_tasks == direct.num_tasks
    v0, g0 = ewc_value_and_grads(model, direct)
    v1, g1 = ewc_value_and_grads(model, from_files)
    assert torch.equal(v0, v1) and all(torch.equal(g0[n], g1[n]) for n in g0), f"seed={seed}"


def test_consolidate_from_with_theta_star_and_kronecker_factors(seed: int) -> None:
    model, batches = make_batches("cnn", seed=seed % 1000, data_seed=seed)
    star = {n: p.detach() + 0.01 for n, p in model.named_parameters()}
    fisher = fisher_diag(model, batches)
    ewc = EWC(model, lam=2.0)
    ewc.consolidate_from(fisher, theta_star=star)
    want = 1.0 * sum(float((fisher[n] * (p.detach() - star[n]).square()).sum()) for n, p in model.named_parameters())
    assert float(ewc.penalty(model).detach()) == pytest.approx(want, rel=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kfac = EWC(model, lam=2.0, structure="kfac")
        direct = EWC(model, lam=2.0, structure="kfac")
    kfac.consolidate_from(fisher_kfac(model, batches))
    direct.consolidate(batches)
    perturb(model, torch.Generator().manual_seed(seed))
    assert float(kfac.penalty(model).detach()) == pytest.approx(float(direct.penalty(model).detach()), rel=1e-6)


def test_consolidate_from_refuses_what_does_not_fit_and_changes_nothing(seed: int) -> None:
    model, batches, fisher = _estimate(seed)
    ewc = EWC(model, lam=1.0)
    first = sorted(fisher)[0]
    cases = {
        "missing": (
            {n: f for n, f in fisher.items() if n != first},
            None,
            f"no Fisher for the protected parameter '{first}'",
        ),
        "shape": (
            {**fisher, first: torch.ones(3)},
            None,
            f"fisher: '{first}' must be a tensor of the parameter's shape",
        ),
        "negative": ({**fisher, first: -fisher[first] - 1}, None, "negative values"),
        "theta_star": (fisher, {first: torch.zeros(1)}, "theta_star: '"),
        "kfac for diag": ({"kron": {}, "diag": dict(fisher)}, None, "need structure='kfac'"),
    }
    for what, (f, star, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            ewc.consolidate_from(f, theta_star=star)
        assert ewc.num_tasks == 0, what
