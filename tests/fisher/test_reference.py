"""Tests of the pure-PyTorch reference itself (no ewc_rs needed)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import CATEGORICAL, LIKELIHOOD, MODELS, make_batches
from reference import (
    draw_mc_labels,
    naive_penalty,
    reference_fisher,
    relative_error,
    seed_batched_fisher,
)

pytestmark = pytest.mark.core


def _linear_batches(
    out_features: int, gaussian: bool = False
) -> tuple[nn.Linear, list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lin = nn.Linear(5, out_features)
    batches = []
    for _ in range(3):
        x = torch.randn(4, 5, generator=g)
        y = torch.randn(4, out_features, generator=g) if gaussian else torch.randint(0, out_features, (4,), generator=g)
        batches.append((x, y))
    return lin, batches


@pytest.mark.parametrize("name", ["mlp_bn", "cnn", "conv_variety", "dict_input", "tied_modules"])
def test_batched_equals_seed_procedure(name: str) -> None:
    model, batches = make_batches(name)
    got = reference_fisher(model, batches, kind="batched")
    want = seed_batched_fisher(model, batches)
    assert relative_error(got, want) < 1e-12


@pytest.mark.parametrize("kind", ["empirical", "exact", "batched"])
def test_linear_closed_form(kind: str) -> None:
    """Single Linear layer, categorical: per-sample gradient is g_n a_nᵀ with g_n = e_y − p."""
    lin, batches = _linear_batches(3)
    w, b = lin.weight.detach().double(), lin.bias.detach().double()
    if kind == "batched":
        fw, fb = torch.zeros_like(w), torch.zeros_like(b)
        for x, y in batches:
            xd = x.double()
            gb = (F.one_hot(y, 3).double() - F.softmax(xd @ w.T + b, -1)) / len(y)
            fw += (gb.T @ xd) ** 2
            fb += gb.sum(0) ** 2
        want = {"weight": fw / len(batches), "bias": fb / len(batches)}
    else:
        x = torch.cat([xb for xb, _ in batches]).double()
        y = torch.cat([yb for _, yb in batches])
        p = F.softmax(x @ w.T + b, -1)
        labels = y[:, None] if kind == "empirical" else torch.arange(3).expand(len(y), 3)
        weights = torch.ones(len(y), 1, dtype=torch.float64) if kind == "empirical" else p
        fw, fb = torch.zeros_like(w), torch.zeros_like(b)
        for c in range(labels.shape[1]):
            g = F.one_hot(labels[:, c], 3).double() - p  # [N, C]
            wc = weights[:, c]
            fw += (wc[:, None, None] * (g[:, :, None] * x[:, None, :]) ** 2).sum(0)
            fb += (wc[:, None] * g**2).sum(0)
        want = {"weight": fw / len(y), "bias": fb / len(y)}
    got = reference_fisher(lin, batches, kind=kind)
    assert relative_error(got, want) < 1e-12


def test_linear_gaussian_closed_form() -> None:
    lin, batches = _linear_batches(3, gaussian=True)
    x = torch.cat([xb for xb, _ in batches]).double()
    y = torch.cat([yb for _, yb in batches]).double()
    r = y - (x @ lin.weight.detach().double().T + lin.bias.detach().double())
    emp = {"weight": ((r[:, :, None] * x[:, None, :]) ** 2).mean(0), "bias": (r**2).mean(0)}
    exact = {"weight": (x**2).mean(0).expand(3, 5), "bias": torch.ones(3, dtype=torch.float64)}
    got_emp = reference_fisher(lin, batches, kind="empirical", likelihood="gaussian")
    got_exact = reference_fisher(lin, batches, kind="exact", likelihood="gaussian")
    assert relative_error(got_emp, emp) < 1e-12
    assert relative_error(got_exact, exact) < 1e-12


@pytest.mark.parametrize("name", ["mlp_bn", "tied_modules", "regression"])
def test_mc_converges_to_exact(name: str) -> None:
    model, batches = make_batches(name, num_batches=2, batch_size=3)
    lik = LIKELIHOOD[name]
    s = 3000
    labels = draw_mc_labels(model, batches, likelihood=lik, mc_samples=s, generator=torch.Generator().manual_seed(7))
    mc = reference_fisher(model, batches, kind="mc", likelihood=lik, mc_samples=s, mc_labels=labels)
    exact = reference_fisher(model, batches, kind="exact", likelihood=lik)
    assert relative_error(mc, exact) < 0.05


def test_callable_likelihood() -> None:
    def loglik(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(out, -1).gather(1, y[:, None]).squeeze(1)

    model, batches = make_batches("dict_input")
    for kind in ("empirical", "batched"):
        got = reference_fisher(model, batches, kind=kind, likelihood=loglik)
        assert relative_error(got, reference_fisher(model, batches, kind=kind)) < 1e-12
    for kind in ("exact", "mc"):
        with pytest.raises(ValueError):
            reference_fisher(model, batches, kind=kind, likelihood=loglik)


def test_num_samples_cuts_a_batch() -> None:
    model, batches = make_batches("conv_variety", num_batches=3, batch_size=4)
    (img, seq), y = batches[1]
    cut = [batches[0], ((img[:2], seq[:2]), y[:2])]
    for kind in ("empirical", "exact", "batched"):
        got = reference_fisher(model, batches, kind=kind, num_samples=6)
        assert relative_error(got, reference_fisher(model, cut, kind=kind)) == 0.0


@pytest.mark.parametrize("name", list(MODELS))
def test_zoo_runs_and_leaves_model_untouched(name: str) -> None:
    model, batches = make_batches(name, num_batches=2, batch_size=3)
    training = model.training
    state = copy.deepcopy(model.state_dict())
    kind = "exact"
    fisher = reference_fisher(model, batches, kind=kind, likelihood=LIKELIHOOD[name])
    assert model.training == training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    assert all(p.grad is None for p in model.parameters())
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert list(fisher) == names
    for n, p in model.named_parameters():
        if n in fisher:
            assert fisher[n].dtype == torch.float64 and fisher[n].shape == p.shape
            assert torch.isfinite(fisher[n]).all()
    if name in CATEGORICAL:
        assert sum(float(f.sum()) for f in fisher.values()) > 0


def test_naive_penalty_gradient() -> None:
    model, batches = make_batches("mlp_bn")
    fisher = reference_fisher(model, batches, kind="empirical")
    g = torch.Generator().manual_seed(1)
    star = {n: p.detach() + 0.1 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    model64 = copy.deepcopy(model).double()
    pen = naive_penalty(model64, star, fisher, 3.0)
    pen.backward()
    for n, p in model64.named_parameters():
        want = 3.0 * fisher[n] * (p.detach() - star[n].double())
        torch.testing.assert_close(p.grad, want, rtol=1e-12, atol=1e-15)
    want_value = 1.5 * sum(
        float((fisher[n] * (p.detach() - star[n].double()) ** 2).sum()) for n, p in model64.named_parameters()
    )
    assert abs(pen.item() - want_value) <= 1e-12 * abs(want_value)


def test_relative_error_checks_keys() -> None:
    a = {"w": torch.ones(2)}
    assert relative_error(a, a) == 0.0
    assert relative_error({"w": torch.zeros(2)}, a) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        relative_error(a, {"v": torch.ones(2)})
