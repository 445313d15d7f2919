"""Kronecker-factored EWC: the factors against the float64 per-sample reference, the penalty and its
gradient against ½ΔᵀFΔ with A ⊗ G materialised, online folding's guarantees, persistence, bad input."""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
from torch import nn

from ewc_rs import EWC, fisher_diag, fisher_kfac
from ewc_rs._blocks.kronecker import nearest_kronecker_sum
from models import make_batches
from reference import naive_penalty
from reference_kfac import kron_penalty, nearest_kronecker, reference_kfac, weight_matrix

pytestmark = [pytest.mark.core, pytest.mark.usefixtures("one_thread")]

TOL = 2e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def kron_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


@pytest.mark.parametrize("name", ["mlp_bn", "cnn", "linear_seq"])
@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_factors_equal_the_float64_reference(name: str, kind: str, seed: int) -> None:
    model, batches = make_batches(name, seed=seed % 1000, data_seed=seed)
    got = fisher_kfac(model, batches, kind=kind)
    ref = reference_kfac(model, batches, kind)
    assert set(got["kron"]) == set(ref["kron"]), f"seed={seed}"
    assert set(got["diag"]) == set(ref["diag"]), f"seed={seed}"
    for m, (a, g) in ref["kron"].items():
        ga, gg = got["kron"][m]
        assert ga.dtype == torch.float32 and ga.shape == a.shape and gg.shape == g.shape, f"seed={seed} {m}"
        assert rel(ga, a) < TOL and rel(gg, g) < TOL, f"seed={seed} layer {m}: {rel(ga, a)}, {rel(gg, g)}"
    for n, f in ref["diag"].items():
        assert rel(got["diag"][n], f) < TOL, f"seed={seed} parameter {n}"


def test_mc_factors_approach_the_exact_ones(seed: int) -> None:
    model, batches = make_batches("mlp_bn", seed=seed % 1000, data_seed=seed, num_batches=2)
    gen = torch.Generator().manual_seed(seed)
    mc = fisher_kfac(model, batches, kind="mc", mc_samples=4000, generator=gen)
    exact = fisher_kfac(model, batches, kind="exact")
    for m, (a, g) in exact["kron"].items():
        assert rel(mc["kron"][m][0], a) < 1e-6, f"seed={seed}: A does not depend on the labels"
        assert rel(mc["kron"][m][1], g) < 0.1, f"seed={seed} layer {m}: {rel(mc['kron'][m][1], g)}"


def test_transformers_conv1d_has_the_factors_of_the_equivalent_linear(seed: int) -> None:
    transformers = pytest.importorskip("transformers", reason="transformers' Conv1D needs the transformers package")
    torch.manual_seed(seed)
    conv = nn.Sequential(transformers.pytorch_utils.Conv1D(6, 4), nn.Tanh(), nn.Linear(6, 3))
    lin = copy.deepcopy(conv)
    lin[0] = nn.Linear(4, 6)
    with torch.no_grad():
        lin[0].weight.copy_(conv[0].weight.T)
        lin[0].bias.copy_(conv[0].bias)
    x, y = torch.randn(7, 4), torch.randint(0, 3, (7,))
    got, want = fisher_kfac(conv, [(x, y)]), reference_kfac(lin, [(x, y)])
    for m, (a, g) in want["kron"].items():
        assert rel(got["kron"][m][0], a) < TOL and rel(got["kron"][m][1], g) < TOL, f"seed={seed} {m}"


def _reference_penalty(model: nn.Module, records: list[dict], lam: float) -> torch.Tensor:
    """Σ_tasks ½λ vec(ΔW̃)ᵀ (A ⊗ G) vec(ΔW̃) + the diagonal part, float64, differentiable in ``model``."""
    total = torch.zeros((), dtype=torch.float64)
    layers = kron_layers(model)
    for rec in records:
        for m, (a, g) in rec["kron"].items():
            mod = layers[m]
            w = mod.weight.double().reshape(mod.weight.shape[0], -1)
            if mod.bias is not None:
                w = torch.cat([w, mod.bias.double()[:, None]], 1)
            total = total + kron_penalty(w - rec["star"][m], a, g, lam)
        total = total + naive_penalty(model, rec["theta"], rec["diag"], lam).double()
    return total


def _train_a_little(model: nn.Module, batches: list, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("name", ["mlp_bn", "cnn"])
def test_penalty_and_gradient_equal_the_materialised_kronecker_quadratic(name: str, seed: int) -> None:
    model, batches = make_batches(name, seed=seed % 1000, data_seed=seed)
    lam = 3.0
    ewc = EWC(model, lam, structure="kfac", norm_stats="update") if name == "cnn" else None
    if ewc is None:
        with pytest.warns(UserWarning, match="BatchNorm1d"):
            ewc = EWC(model, lam, structure="kfac")
    records = []
    for t in range(2):  # separate mode: two tasks
        fisher = ewc.consolidate(batches)
        stars = {m: weight_matrix(mod) for m, mod in kron_layers(model).items()}
        theta = {n: p.detach().clone() for n, p in model.named_parameters() if n in fisher["diag"]}
        records.append({**fisher, "star": stars, "theta": theta})
        _train_a_little(model, batches, seed + t)
    want = _reference_penalty(model, records, lam)
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    got = ewc.penalty(model)
    grads = torch.autograd.grad(got, list(model.parameters()))
    assert rel(got, want) < 1e-5, f"seed={seed}: {float(got)} vs {float(want)}"
    for (n, _), g, w in zip(model.named_parameters(), grads, want_grads):
        assert rel(g, w) < 1e-4, f"seed={seed} parameter {n}: {rel(g, w)}"
    model.zero_grad(set_to_none=True)
    value = ewc.backward(model)
    assert rel(value, want) < 1e-5, f"seed={seed}"
    for (n, p), w in zip(model.named_parameters(), want_grads):
        assert p.grad is not None and rel(p.grad, w) < 1e-4, f"seed={seed} backward(), parameter {n}"


def _spd(n: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, n + 3, generator=gen, dtype=torch.float64)
    return x @ x.T / n


def test_online_fold_is_the_frobenius_nearest_kronecker_product(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    a1, a2, g1, g2 = _spd(4, gen), _spd(4, gen), _spd(3, gen), _spd(3, gen)
    gamma = 0.7
    x, y = nearest_kronecker_sum([(gamma, a1, g1), (1.0, a2, g2)])
    rx, ry = nearest_kronecker([(gamma * a1, g1), (a2, g2)])
    target = gamma * torch.kron(a1, g1) + torch.kron(a2, g2)
    best = torch.kron(rx, ry)
    got = torch.kron(x.double(), y.double())
    assert rel(got, best) < 1e-5, f"seed={seed}: not the SVD's best rank-1 term"
    err = float((got - target).norm())
    for other in (torch.kron(gamma * a1 + a2, gamma * g1 + g2), torch.kron(a2, g2)):  # no better alternative
        assert err <= float((other - target).norm()) + 1e-9, f"seed={seed}"
    for f in (x, y):  # symmetric positive semi-definite, as the factors
        assert torch.allclose(f, f.T, atol=1e-5) and float(torch.linalg.eigvalsh(f.double()).min()) > -1e-5, (
            f"seed={seed}"
        )


def test_online_fold_is_exact_when_one_term_is_zero_or_factors_are_proportional(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    a1, a2, g1, g2 = _spd(4, gen), _spd(4, gen), _spd(3, gen), _spd(3, gen)
    cases = {
        "gamma=0": ([(0.0, a1, g1), (1.0, a2, g2)], torch.kron(a2, g2)),
        "zero old A": ([(0.5, torch.zeros_like(a1), g1), (1.0, a2, g2)], torch.kron(a2, g2)),
        "zero new G": ([(0.5, a1, g1), (1.0, a2, torch.zeros_like(g2))], 0.5 * torch.kron(a1, g1)),
        "proportional A": ([(0.5, 2 * a2, g1), (1.0, a2, g2)], torch.kron(a2, g1 + g2)),
        "proportional G": ([(0.5, a1, 3 * g2), (1.0, a2, g2)], torch.kron(1.5 * a1 + a2, g2)),
    }
    for what, (terms, exact) in cases.items():
        x, y = nearest_kronecker_sum(terms)
        assert rel(torch.kron(x.double(), y.double()), exact) < 1e-5, f"seed={seed}: {what}"


def test_online_mode_keeps_one_folded_pair_per_layer(seed: int) -> None:
    model, batches = make_batches("cnn", seed=seed % 1000, data_seed=seed)
    ewc = EWC(model, 1.0, mode="online", gamma=0.5, structure="kfac")
    first = ewc.consolidate(batches)
    _train_a_little(model, batches, seed)
    second = ewc.consolidate(batches)
    (task,) = ewc.state_dict()["tasks"]
    kron = {m: (f["A"], f["G"]) for m, f in task["kronecker"].items()}
    for m, (a, g) in kron.items():
        x, y = nearest_kronecker_sum([(0.5, *first["kron"][m]), (1.0, *second["kron"][m])])
        assert rel(torch.kron(a.double(), g.double()), torch.kron(x.double(), y.double())) < 1e-5, f"seed={seed} {m}"
    star = {m: weight_matrix(mod) for m, mod in kron_layers(model).items()}
    _train_a_little(model, batches, seed + 1)
    moved = {m: weight_matrix(mod) for m, mod in kron_layers(model).items()}
    want = sum(kron_penalty(moved[m] - star[m], a, g, 1.0) for m, (a, g) in kron.items())
    got = float(ewc.penalty(model).detach())
    assert got == pytest.approx(float(want), rel=1e-4), f"seed={seed}: θ* is the latest weights"


def test_state_dict_file_and_bfloat16_round_trips(tmp_path, seed: int) -> None:
    model, batches = make_batches("cnn", seed=seed % 1000, data_seed=seed)
    ewc = EWC(model, 2.0, structure="kfac")
    half = EWC(model, 2.0, structure="kfac", storage_dtype=torch.bfloat16)
    for e in (ewc, ewc, half, half):
        e.consolidate(batches)
    _train_a_little(model, batches, seed)
    want = float(ewc.penalty(model).detach())
    again = EWC(model, 0.0)
    again.load_state_dict(ewc.state_dict())
    assert again.structure == "kfac" and float(again.penalty(model).detach()) == pytest.approx(want, rel=1e-6), (
        f"seed={seed}"
    )
    path = str(tmp_path / "kfac.safetensors")
    ewc.save(path)
    loaded = EWC.load(path, model)
    assert float(loaded.penalty(model).detach()) == pytest.approx(want, rel=1e-6), f"seed={seed}"
    assert all(
        f.dtype == torch.bfloat16 for pair in half.state_dict()["tasks"][0]["kronecker"].values() for f in pair.values()
    )
    assert float(half.penalty(model).detach()) == pytest.approx(want, rel=0.05), f"seed={seed}"


def test_loading_factors_that_do_not_fit_the_weights_fails_clearly(seed: int) -> None:
    model, batches = make_batches("cnn", seed=seed % 1000, data_seed=seed)
    ewc = EWC(model, 1.0, structure="kfac")
    ewc.consolidate(batches)
    state = ewc.state_dict()
    a, g = state["tasks"][0]["kronecker"]["5"]["A"], state["tasks"][0]["kronecker"]["5"]["G"]
    state["tasks"][0]["kronecker"]["5"]["A"] = torch.eye(a.shape[0] + 1)
    with pytest.raises(ValueError, match=r"layer '5': factors A \(56, 56\)"):
        EWC(model, 1.0).load_state_dict(state)
    state["tasks"][0]["kronecker"]["5"] = {"A": a, "G": g[:2]}
    with pytest.raises(ValueError, match="factor G must be a square matrix"):
        EWC(model, 1.0).load_state_dict(state)
    assert ewc.num_tasks == 1


def test_bias_left_out_of_the_selection_leaves_a_without_its_row(seed: int) -> None:
    model, batches = make_batches("cnn", seed=seed % 1000, data_seed=seed)
    ewc = EWC(model, 1.0, structure="kfac", params=lambda n, p: n != "5.bias")
    fisher = ewc.consolidate(batches)
    full = fisher_kfac(model, batches)
    assert fisher["kron"]["5"][0].shape == (54, 54), f"seed={seed}"
    assert rel(fisher["kron"]["5"][0], full["kron"]["5"][0][:54, :54]) < 1e-6, f"seed={seed}"
    assert "5.bias" not in ewc.state_dict()["tasks"][0]["star"]


def test_bad_input_is_refused(seed: int) -> None:
    model, batches = make_batches("cnn", seed=seed % 1000, data_seed=seed)
    with pytest.raises(ValueError, match="structure: expected one of 'diag', 'kfac'"):
        EWC(model, 1.0, structure="full")
    with pytest.raises(ValueError, match="kind: 'batched' has no Kronecker-factored form"):
        fisher_kfac(model, batches, kind="batched")
    with pytest.raises(TypeError, match="unexpected Fisher option"):
        EWC(model, 1.0, structure="kfac").consolidate(batches, mc_sample=3)


def test_unsupported_layers_are_said_once_and_get_the_diagonal(seed: int) -> None:
    model, batches = make_batches("conv_variety", seed=seed % 1000, data_seed=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ewc = EWC(model, 1.0, structure="kfac")
        fisher = ewc.consolidate(batches)
        ewc.consolidate(batches)
    said = [w for w in caught if "no Kronecker-factored form" in str(w.message)]
    assert len(said) == 1 and "GroupNorm" in str(said[0].message), [str(w.message) for w in caught]
    diag_names = {n for n in fisher["diag"]}
    assert any(n.endswith("weight") for n in diag_names), f"seed={seed}: grouped convs stay diagonal"


def test_fisher_kfac_takes_every_option_fisher_diag_takes() -> None:
    """One options type: the two entries take the same keywords with the same defaults."""
    diag, kfac = (inspect.signature(f).parameters for f in (fisher_diag, fisher_kfac))
    assert [(p.name, p.default) for p in diag.values()] == [(p.name, p.default) for p in kfac.values()]


def test_progress_bar_and_unknown_options(seed: int) -> None:
    model, batches = make_batches("cnn", seed=seed % 1000, data_seed=seed)
    with_bar = fisher_kfac(model, batches, progress=True)
    plain = fisher_kfac(model, batches)
    assert all(torch.equal(with_bar["kron"][m][0], plain["kron"][m][0]) for m in plain["kron"])
    ewc = EWC(model, lam=1.0, structure="kfac")
    with pytest.raises(TypeError, match="consolidate: unexpected Fisher option.*warp"):
        ewc.consolidate(batches, warp=3)
    assert ewc.num_tasks == 0


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_damping_adds_root_d_identity_to_each_factor_of_the_stored_task(mode: str, seed: int) -> None:
    """``consolidate(damping=d)``: the penalty and gradient are those of (A + √d I) ⊗ (G + √d I) per
    layer (materialised), the returned estimate stays undamped; ``consolidate_from`` damps the same."""
    model, batches = make_batches("cnn", seed=seed % 1000, data_seed=seed)
    d = float(10.0 ** torch.empty(1).uniform_(-3, 0, generator=torch.Generator().manual_seed(seed)).item())
    lam = 2.0
    ewc = EWC(model, lam, structure="kfac", norm_stats="update", mode=mode)
    fisher = ewc.consolidate(batches, damping=d)
    plain = fisher_kfac(model, batches)
    for m, (a, g) in plain["kron"].items():
        assert rel(fisher["kron"][m][0], a) < 1e-6 and rel(fisher["kron"][m][1], g) < 1e-6, f"seed={seed} {m}"
    stars = {m: weight_matrix(mod) for m, mod in kron_layers(model).items()}
    theta = {n: p.detach().clone() for n, p in model.named_parameters() if n in fisher["diag"]}
    damped = {
        m: (a.double() + d**0.5 * torch.eye(a.shape[0]), g.double() + d**0.5 * torch.eye(g.shape[0]))
        for m, (a, g) in fisher["kron"].items()
    }
    from_given = EWC(model, lam, structure="kfac", norm_stats="update", mode=mode)
    from_given.consolidate_from(plain, damping=d)
    _train_a_little(model, batches, seed)
    want = _reference_penalty(model, [{"kron": damped, "diag": fisher["diag"], "star": stars, "theta": theta}], lam)
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    for what, e in (("consolidate", ewc), ("consolidate_from", from_given)):
        got = e.penalty(model)
        grads = torch.autograd.grad(got, list(model.parameters()))
        assert rel(got, want) < 1e-5, f"seed={seed} {what}: {float(got)} vs {float(want)}"
        for (n, _), g, w in zip(model.named_parameters(), grads, want_grads):
            assert rel(g, w) < 1e-4, f"seed={seed} {what} parameter {n}: {rel(g, w)}"
    undamped = EWC(model, lam, structure="kfac", norm_stats="update")
    undamped.consolidate_from(plain)
    assert float(undamped.penalty(model)) < float(want)  # the damping adds a positive definite part


def test_damping_is_refused_where_it_means_nothing(seed: int) -> None:
    model, batches = make_batches("cnn", seed=seed % 1000, data_seed=seed)
    for bad in (-1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="damping: expected a finite number >= 0"):
            EWC(model, 1.0, structure="kfac", norm_stats="update").consolidate(batches, damping=bad)
    for structure in ("diag", "ekfac"):
        ewc = EWC(model, 1.0, structure=structure, norm_stats="update")
        with pytest.raises(ValueError, match="damping: only structure='kfac'"):
            ewc.consolidate(batches, damping=0.1)
        assert ewc.num_tasks == 0
