"""``fisher_merge`` against the naive float64 formula Σ w (F + ε) θ / Σ w (F + ε) on fresh models
and Fishers (real ones from ``fisher_diag`` and random ones spanning many decades): every dtype,
weights, Fisher files as input, buffers and integer buffers, tied weights, and bad input refused by
name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ewc_rs import fisher_diag, fisher_merge, save_fisher
from models import make_batches

pytestmark = pytest.mark.core


def naive(states: list[dict], fishers: list[dict], w: list[float], eps: float) -> dict[str, torch.Tensor]:
    """The formula in float64, tensor by tensor (the weighted average without a Fisher or where all are 0)."""
    out = {}
    total = sum(w)
    for key, ref in states[0].items():
        if not ref.is_floating_point():
            out[key] = ref.clone()
            continue
        thetas = [s[key].double() for s in states]
        plain = sum(wi * t for wi, t in zip(w, thetas)) / total
        if key not in fishers[0]:
            out[key] = plain.to(ref.dtype)
            continue
        fs = [f[key].double() + eps for f in fishers]
        den = sum(wi * f for wi, f in zip(w, fs))
        num = sum(wi * f * t for wi, f, t in zip(w, fs, thetas))
        out[key] = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), plain).to(ref.dtype)
    return out


def _models(seed: int, n: int) -> tuple[list[nn.Module], list[dict[str, torch.Tensor]]]:
    models, fishers = [], []
    for i in range(n):
        model, batches = make_batches("mlp_bn", seed=seed % 1000, data_seed=seed + i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        model.train()
        model(batches[0][0])  # moves the BatchNorm running statistics
        model.eval()
        models.append(model)
        fishers.append(fisher_diag(model, batches))
    return models, fishers


@pytest.mark.parametrize("n", [2, 3])
def test_equals_the_float64_formula_on_real_fishers(n: int, seed: int) -> None:
    models, fishers = _models(seed, n)
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(n, generator=g) + 0.1).tolist()
    for weights, eps in ((None, 1e-8), (w, 0.0), (w, 1e-3)):
        got = fisher_merge(models, fishers, weights=weights, eps=eps)
        want = naive([m.state_dict() for m in models], fishers, weights or [1.0 / n] * n, eps)
        assert list(got) == list(models[0].state_dict())
        for key in want:
            assert got[key].dtype == want[key].dtype
            torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7, msg=key)
    # the merge of one model with itself is the model
    same = fisher_merge([models[0], models[0]], [fishers[0], fishers[1]])
    for key, t in models[0].state_dict().items():
        torch.testing.assert_close(same[key], t, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_every_dtype_and_fishers_spanning_many_decades(dtype: torch.dtype, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    shape = (37, 129)
    states = [{"w": torch.randn(shape, generator=g).to(dtype), "step": torch.tensor(7)} for _ in range(3)]
    fishers = [{"w": 10.0 ** (torch.rand(shape, generator=g) * 24 - 20)} for _ in range(3)]
    fishers[0]["w"][:3] = 0.0
    for f in fishers[1:]:
        f["w"][:2] = 0.0  # rows where every Fisher is 0: the weighted average
    got = fisher_merge(states, fishers, weights=[1, 2, 3], eps=0.0)
    want = naive(states, fishers, [1, 2, 3], 0.0)
    tol = 1e-6 if dtype in (torch.float32, torch.float64) else 1e-2
    torch.testing.assert_close(got["w"], want["w"], rtol=tol, atol=tol)
    assert got["step"].item() == 7 and got["w"].dtype == dtype


def test_fisher_files_buffers_and_tied_weights(tmp_path: Path, seed: int) -> None:
    torch.manual_seed(seed)

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(11, 6)
            self.head = nn.Linear(6, 11, bias=False)
            self.head.weight = self.emb.weight
            self.norm = nn.BatchNorm1d(6)

    models = [Tied() for _ in range(2)]
    for m in models:
        m.norm.running_mean.normal_()
    fishers = [
        {"emb.weight": torch.rand(11, 6), "norm.weight": torch.rand(6), "norm.bias": torch.rand(6)} for _ in models
    ]
    folders = [save_fisher(tmp_path / f"f{i}", f) for i, f in enumerate(fishers)]
    got = fisher_merge(models, folders, weights=[0.25, 0.75])
    assert got["head.weight"] is got["emb.weight"]
    want = naive([m.state_dict() for m in models], fishers, [0.25, 0.75], 1e-8)
    for key in ("emb.weight", "norm.weight", "norm.running_mean", "norm.running_var"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7, msg=key)
    merged = Tied()
    merged.load_state_dict(got)
    assert merged.norm.num_batches_tracked.item() == models[0].norm.num_batches_tracked.item()


def test_bad_input_is_refused_by_name(tmp_path: Path) -> None:
    a = {"w": torch.zeros(3), "b": torch.zeros(2)}
    b = {"w": torch.ones(3), "b": torch.ones(2)}
    f = {"w": torch.ones(3)}
    cases = [
        (([], []), {}, "models_or_state_dicts"),
        (([a, {"w": torch.zeros(3)}], [f, f]), {}, r"models_or_state_dicts\[1\]"),
        (([a, {"w": torch.zeros(4), "b": torch.zeros(2)}], [f, f]), {}, r"models_or_state_dicts\[1\]: 'w'"),
        (
            ([a, {"w": torch.zeros(3, dtype=torch.float64), "b": torch.zeros(2)}], [f, f]),
            {},
            r"models_or_state_dicts\[1\]",
        ),
        (([a, b], [f]), {}, "fishers: expected a sequence of one Fisher per model"),
        (([a, b], f), {}, "fishers"),
        (([a, b], [f, {"w": -torch.ones(3)}]), {}, r"fishers\[1\].*negative"),
        (([a, b], [f, {"w": torch.tensor([1.0, float("nan"), 1.0])}]), {}, r"fishers\[1\].*finite"),
        (([a, b], [f, {"b": torch.ones(2)}]), {}, r"fishers\[1\]: names other"),
        (([a, b], [{"w": torch.ones(4)}] * 2), {}, r"fishers\[0\]: 'w' has shape"),
        (([a, b], [{"x": torch.ones(3)}] * 2), {}, "no such entry"),
        (([a, b], [f, tmp_path / "nothing"]), {}, r"fishers\[1\]: path"),
        (([a, b], [f, f]), {"weights": [1.0]}, "weights"),
        (([a, b], [f, f]), {"weights": [1.0, -1.0]}, r"weights\[1\]"),
        (([a, b], [f, f]), {"weights": [0.0, 0.0]}, "positive sum"),
        (([a, b], [f, f]), {"weights": [1.0, float("inf")]}, r"weights\[1\]"),
        (([a, b], [f, f]), {"eps": -1.0}, "eps"),
        (([a, b], [f, f]), {"eps": float("nan")}, "eps"),
    ]
    before = {k: v.clone() for k, v in a.items()}
    for (models, fishers), kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            fisher_merge(models, fishers, **kwargs)  # type: ignore[arg-type]
    assert all(torch.equal(a[k], before[k]) for k in a)


def test_without_fishers_every_tensor_is_the_weighted_average(seed: int) -> None:
    models, _ = _models(seed, 2)
    got = fisher_merge(models, None, weights=[1.0, 3.0])
    want = naive([m.state_dict() for m in models], [{}, {}], [1.0, 3.0], 0.0)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7, msg=key)
