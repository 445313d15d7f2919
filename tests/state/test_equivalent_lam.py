"""``equivalent_lam``: λ translated between two Fishers by their masses, checked against the penalty it
promises (a perturbation of one size in every parameter costs the same under both), against a float64
sum, and bad input refused by name with nothing computed."""

from __future__ import annotations

import math

import pytest
import torch

from ewc_rs import EWC, equivalent_lam, fisher_diag
from models import make_batches

pytestmark = pytest.mark.core


def _mass(fisher: dict[str, torch.Tensor]) -> float:
    return math.fsum(float(v) for f in fisher.values() for v in f.double().flatten())


def test_exact_to_batched_matches_the_penalty_of_a_uniform_shift(seed: int) -> None:
    model, batches = make_batches("mlp_bn", seed=seed % 1000, data_seed=seed, num_batches=4, batch_size=8)
    exact = fisher_diag(model, batches, kind="exact")
    batched = fisher_diag(model, batches, kind="batched")
    lam = 10.0 ** (torch.rand(1, generator=torch.Generator().manual_seed(seed)).item() * 4)
    lam_b = equivalent_lam(lam, exact, batched)
    assert lam_b == pytest.approx(lam * _mass(exact) / _mass(batched), rel=1e-9)
    # Squares of batch means are smaller than means of squares (Jensen), so λ must grow.
    assert lam_b > lam
    assert equivalent_lam(lam_b, batched, exact) == pytest.approx(lam, rel=1e-9)

    penalties = []
    for lam_k, fisher in ((lam, exact), (lam_b, batched)):
        ewc = EWC(model, lam_k)
        ewc.consolidate_from(fisher)
        shift = 0.01
        with torch.no_grad():
            saved = [p.clone() for p in model.parameters()]
            for p in model.parameters():
                p.add_(shift)
        penalties.append(float(ewc.penalty(model).detach()))
        with torch.no_grad():
            for p, s in zip(model.parameters(), saved):
                p.copy_(s)
    assert penalties[0] == pytest.approx(penalties[1], rel=1e-4)
    assert penalties[0] > 0


def test_proportional_fishers_and_zero_fishers(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    f = {"a": torch.rand(5, 3, generator=g), "b": torch.rand(7, generator=g)}
    scale = 1.0 + 99.0 * torch.rand(1, generator=g).item()
    scaled = {k: v * scale for k, v in f.items()}
    assert equivalent_lam(3.0, f, scaled) == pytest.approx(3.0 / scale, rel=1e-6)
    zero = {k: torch.zeros_like(v) for k, v in f.items()}
    assert equivalent_lam(3.0, zero, zero) == 3.0
    assert equivalent_lam(0.0, f, scaled) == 0.0


@pytest.mark.parametrize(
    "lam, source, target, match",
    [
        (-1.0, {"a": torch.ones(2)}, {"a": torch.ones(2)}, "lam"),
        (float("nan"), {"a": torch.ones(2)}, {"a": torch.ones(2)}, "lam"),
        (True, {"a": torch.ones(2)}, {"a": torch.ones(2)}, "lam"),
        (1.0, {"a": torch.ones(2)}, {"b": torch.ones(2)}, "same parameters"),
        (1.0, {"a": torch.ones(2)}, {"a": torch.ones(3)}, "shape"),
        (1.0, {"a": torch.ones(2)}, {"a": torch.zeros(2)}, "mass is 0"),
        (1.0, {"a": -torch.ones(2)}, {"a": torch.ones(2)}, "negative"),
        (1.0, {}, {"a": torch.ones(2)}, "non-empty"),
        (1.0, {"a": torch.ones(2)}, {"a": torch.tensor([1.0, float("inf")])}, "finite"),
    ],
)
def test_bad_input_is_refused_by_name(lam: float, source: dict, target: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        equivalent_lam(lam, source, target)
