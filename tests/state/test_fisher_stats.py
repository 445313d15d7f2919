"""``fisher_summary`` (Rust statistics handed over as numpy arrays) against numpy and torch on fresh
Fishers: counts, mass and shares, quantiles, the log-scale histogram; the mass recorded in a
Fisher file's metadata; bad input refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ewc_rs import fisher_diag, fisher_summary, save_fisher
from models import make_batches

pytestmark = pytest.mark.core


def test_statistics_equal_numpy_on_a_real_and_a_random_fisher(seed: int) -> None:
    model, batches = make_batches("mlp_bn", seed=seed % 1000, data_seed=seed)
    g = torch.Generator().manual_seed(seed)
    fisher = dict(fisher_diag(model, batches))
    fisher["wide"] = 10.0 ** (torch.rand(3, 1001, generator=g, dtype=torch.float64) * 26 - 22)
    fisher["half"] = torch.rand(17, generator=g).to(torch.bfloat16)
    s = fisher_summary(fisher)
    assert s.names == list(fisher)
    for i, (name, f) in enumerate(fisher.items()):
        v = f.detach().float().double().flatten().numpy()
        assert s.count[i] == v.size and s.count.dtype == np.int64
        np.testing.assert_allclose(s.total[i], v.sum(), rtol=1e-9)
        np.testing.assert_allclose(s.mean[i], v.mean(), rtol=1e-9)
        assert s.max[i] == v.max()
        np.testing.assert_allclose(s.quantiles[i], np.quantile(v.astype(np.float32), s.levels), rtol=1e-6, err_msg=name)
        edges = s.edges
        want = np.histogram(v.astype(np.float32), bins=np.concatenate([[-np.inf], edges, [np.inf]]))[0]
        np.testing.assert_array_equal(s.histogram[i], want, err_msg=name)
    np.testing.assert_allclose(s.share.sum(), 1.0)
    table = s.table(top=3)
    assert len(table.splitlines()) == 4 and s.names[int(np.argmax(s.total))] in table


def test_the_file_records_the_mass(tmp_path: Path, seed: int) -> None:
    model, batches = make_batches("mlp_bn", seed=seed % 1000, data_seed=seed)
    fisher = fisher_diag(model, batches)
    folder = save_fisher(tmp_path / "f", fisher)
    mass = json.loads((folder / "fisher.safetensors.index.json").read_text())["metadata"]["mass"]
    for name, f in fisher.items():
        assert mass["per_tensor"][name] == pytest.approx(f.double().sum().item(), rel=1e-9)
    assert mass["total"] == pytest.approx(sum(f.double().sum().item() for f in fisher.values()), rel=1e-9)


def test_bad_input_is_refused_by_name() -> None:
    ok = {"w": torch.rand(4)}
    for fisher, kwargs, match in [
        ({}, {}, "fisher"),
        ({"w": -torch.ones(2)}, {}, "negative"),
        ({"w": torch.tensor([float("inf")])}, {}, "finite"),
        ({"w": torch.ones(2, dtype=torch.int64)}, {}, "floating"),
        (ok, {"levels": [1.5]}, "levels"),
        (ok, {"edges": [1.0, 0.5]}, "edges"),
        (ok, {"edges": []}, "edges"),
    ]:
        with pytest.raises(ValueError, match=match):
            fisher_summary(fisher, **kwargs)
