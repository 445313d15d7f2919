"""EKFAC EWC (``structure="ekfac"``): the eigenbases are those of the KFAC factors, the corrected
diagonal S equals the float64 per-sample reference (rotate, square, average) for every kind, the
penalty and its gradient equal ½λ Σ S ⊙ (Q_Gᵀ ΔW̃ Q_A)², online folding keeps the projection of the
old curvature onto the new eigenbasis, persistence (also bfloat16), bad input."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from ewc_rs import EWC, fisher_kfac
from models import make_batches
from reference_kfac import ekfac_penalty, reference_ekfac

pytestmark = [pytest.mark.core, pytest.mark.usefixtures("one_thread")]

TOL = 2e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _ewc(model: nn.Module, **kwargs: object) -> EWC:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "these layers ... get the diagonal Fisher"
        return EWC(model, **kwargs)  # type: ignore[arg-type]


def _perturb(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("name", ["mlp_bn", "cnn", "linear_seq"])
@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_corrected_diagonal_equals_the_float64_reference(name: str, kind: str, seed: int) -> None:
    model, batches = make_batches(name, seed=seed % 1000, data_seed=seed)
    before = copy.deepcopy(model.state_dict())
    requires = [p.requires_grad for p in model.parameters()]
    est = _ewc(model, lam=1.0, structure="ekfac").consolidate(batches, kind=kind)
    kron = fisher_kfac(model, batches, kind=kind)["kron"]
    assert set(est["ekfac"]) == set(kron) == set(layers(model)), f"seed={seed}"
    for m, (qa, qg, _) in est["ekfac"].items():
        a, g = kron[m]
        for q, f in ((qa, a), (qg, g)):  # orthonormal eigenvectors of the KFAC factor
            eye = torch.eye(q.shape[0], dtype=torch.float64)
            assert rel(q.double().T @ q.double(), eye) < 1e-5, f"seed={seed} {m}"
            rotated = q.double().T @ f.double() @ q.double()
            off = rotated - torch.diag(torch.diagonal(rotated))
            assert float(off.norm() / rotated.norm()) < 1e-5, f"seed={seed} {m}"
    want = reference_ekfac(model, batches, {m: (qa, qg) for m, (qa, qg, _) in est["ekfac"].items()}, kind)
    for m, (_, _, s) in est["ekfac"].items():
        assert s.dtype == torch.float32 and s.shape == want[m].shape, f"seed={seed} {m}"
        assert rel(s, want[m]) < TOL, f"seed={seed} layer {m}: {rel(s, want[m])}"
    # the second pass left the model as it was
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert requires == [p.requires_grad for p in model.parameters()]
    assert set(dict(model.named_modules())) == {n for n, _ in copy.deepcopy(model).named_modules()}


def test_mc_diagonal_approaches_the_exact_one(seed: int) -> None:
    model, batches = make_batches("mlp_bn", seed=seed % 1000, data_seed=seed, num_batches=2)
    gen = torch.Generator().manual_seed(seed)
    mc = _ewc(model, lam=1.0, structure="ekfac").consolidate(batches, kind="mc", mc_samples=3000, generator=gen)
    exact = _ewc(model, lam=1.0, structure="ekfac").consolidate(batches)
    for m, (_, _, s) in exact["ekfac"].items():
        # the bases come from G, which mc estimates too: compare in the exact bases
        qa, qg, _ = exact["ekfac"][m]
        want = reference_ekfac(model, batches, {m: (qa, qg)})[m]
        assert rel(s, want) < TOL
        assert rel(mc["ekfac"][m][2].sum(), s.sum()) < 0.1, f"seed={seed} layer {m}: traces"


@pytest.mark.parametrize("mode", ["separate", "online"])
@pytest.mark.parametrize("name", ["cnn", "mlp_bn"])
def test_penalty_and_gradient_equal_the_rotated_quadratic(name: str, mode: str, seed: int) -> None:
    """Two tasks: Σ_t [Σ_layers ½λ Σ S ⊙ (Q_Gᵀ ΔW̃ Q_A)² + Σ_rest ½λ F (θ − θ*)²] in float64; online
    mode folds them into one (the test reads the folded block from the state)."""
    model, batches = make_batches(name, seed=seed % 1000, data_seed=seed)
    ewc = _ewc(model, lam=3.0, structure="ekfac", mode=mode, gamma=0.7)
    for t in range(2):
        ewc.consolidate(batches)
        _perturb(model, seed + t)
    ref = copy.deepcopy(model).double()
    named = dict(ref.named_parameters())
    want = torch.zeros((), dtype=torch.float64)
    for task in ewc.state_dict()["tasks"]:
        star = task["star"]
        for m, e in task["ekfac"].items():
            mod = layers(ref)[m]
            w = mod.weight.reshape(mod.weight.shape[0], -1)
            mat = torch.cat([w, mod.bias[:, None]], 1) if mod.bias is not None else w
            ws = star[f"{m}.weight"].double().reshape(w.shape[0], -1)
            target = torch.cat([ws, star[f"{m}.bias"].double()[:, None]], 1) if mod.bias is not None else ws
            want = want + ekfac_penalty(mat - target, e["QA"], e["QG"], e["S"], 3.0)
        for n, f in task.get("diagonal", {}).items():
            want = want + 1.5 * (f.double() * (named[n] - star[n].double()).square()).sum()
    want.backward()
    for p in model.parameters():
        p.grad = None
    got = ewc.penalty(model)
    got.backward()
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5), f"seed={seed}"
    for (n, p), r in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is not None and rel(p.grad, r.grad) < 1e-5, f"seed={seed} {n}"
    # EWC.backward adds the same gradient without autograd
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    value = ewc.backward(model, grad_scale=2.0)
    assert float(value) == pytest.approx(float(want.detach()), rel=1e-5)
    for n, p in model.named_parameters():
        assert rel(p.grad - before[n], 2 * before[n]) < 1e-5, f"seed={seed} {n}"


def test_online_fold_is_the_projection_onto_the_new_eigenbasis(seed: int) -> None:
    """S_folded = S_new + γ diag_new(C_old): the diagonal, in the new basis, of the old curvature
    C_old = Σ S_old[k, l] vec(q_Gk q_Alᵀ) vec(q_Gk q_Alᵀ)ᵀ, built here as a full matrix."""
    model, batches = make_batches("mlp_bn", seed=seed % 1000, data_seed=seed)
    ewc = _ewc(model, lam=1.0, structure="ekfac", mode="online", gamma=0.4)
    first = ewc.consolidate(batches)
    _perturb(model, seed)
    second = ewc.consolidate(batches)
    folded = ewc.state_dict()["tasks"][0]["ekfac"]
    for m, (qa, qg, s) in second["ekfac"].items():
        qa0, qg0, s0 = (t.double() for t in first["ekfac"][m])
        basis0 = torch.kron(qa0, qg0)  # columns vec(q_G q_Aᵀ) for vec stacking columns
        c_old = basis0 @ torch.diag(s0.T.reshape(-1)) @ basis0.T
        basis = torch.kron(qa.double(), qg.double())
        diag_old = torch.diagonal(basis.T @ c_old @ basis).reshape(s.shape[1], s.shape[0]).T
        want = s.double() + 0.4 * diag_old
        assert rel(folded[m]["S"], want) < 1e-5, f"seed={seed} {m}"
        assert torch.equal(folded[m]["QA"], qa) and torch.equal(folded[m]["QG"], qg)


def test_state_dict_file_and_bfloat16_round_trips(tmp_path: object, seed: int) -> None:
    model, batches = make_batches("cnn", seed=seed % 1000, data_seed=seed)
    ewc = _ewc(model, lam=2.0, structure="ekfac")
    half = _ewc(model, lam=2.0, structure="ekfac", storage_dtype=torch.bfloat16)
    for e in (ewc, ewc, half, half):
        e.consolidate(batches)
    _perturb(model, seed)
    want = float(ewc.penalty(model).detach())
    again = _ewc(model, lam=0.0)
    again.load_state_dict(ewc.state_dict())
    assert again.structure == "ekfac" and float(again.penalty(model).detach()) == pytest.approx(want, rel=1e-6)
    path = str(tmp_path / "ekfac.safetensors")  # type: ignore[operator]
    ewc.save(path)
    loaded = EWC.load(path, model)
    assert float(loaded.penalty(model).detach()) == pytest.approx(want, rel=1e-6), f"seed={seed}"
    stored = half.state_dict()["tasks"][0]["ekfac"]
    assert all(t.dtype == torch.bfloat16 for e in stored.values() for t in e.values())
    assert float(half.penalty(model).detach()) == pytest.approx(want, rel=0.05), f"seed={seed}"


def test_bad_states_and_inputs_are_refused_and_change_nothing(seed: int) -> None:
    model, batches = make_batches("cnn", seed=seed % 1000, data_seed=seed)
    ewc = _ewc(model, lam=1.0, structure="ekfac")
    ewc.consolidate(batches)
    good = ewc.state_dict()
    value = float(ewc.penalty(model).detach())
    layer = sorted(good["tasks"][0]["ekfac"])[0]
    cases = {
        "S negative": ("S", lambda e: -e["S"], "finite and non-negative"),
        "S of another shape": ("S", lambda e: e["S"][:, :-1], "S must be a tensor of shape"),
        "QA not square": ("QA", lambda e: e["QA"][:-1], "QA must be a square matrix"),
        "QG nan": ("QG", lambda e: e["QG"] * float("nan"), "QG has non-finite values"),
    }
    for what, (key, change, message) in cases.items():
        bad = copy.deepcopy(good)
        entry = bad["tasks"][0]["ekfac"][layer]
        entry[key] = change(entry)
        with pytest.raises(ValueError, match=message):
            ewc.load_state_dict(bad)
        assert float(ewc.penalty(model).detach()) == value, what
    wrong = copy.deepcopy(good)
    wrong["structure"] = "kfac"
    with pytest.raises(ValueError, match="'ekfac' blocks, which structure 'kfac' does not use"):
        ewc.load_state_dict(wrong)
    with pytest.raises(ValueError, match="re-iterable"):
        ewc.consolidate(iter(batches))
    with pytest.raises(ValueError, match="'batched' has no Kronecker-factored form"):
        ewc.consolidate(batches, kind="batched")
    assert ewc.num_tasks == 1 and float(ewc.penalty(model).detach()) == value


def test_a_model_that_is_one_layer_and_a_bias_left_out(seed: int) -> None:
    torch.manual_seed(seed)
    layer = nn.Linear(6, 4)
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(5, 6, generator=g), torch.randint(0, 4, (5,), generator=g)) for _ in range(2)]
    est = _ewc(layer, lam=1.0, structure="ekfac").consolidate(batches)
    qa, qg, s = est["ekfac"][""]
    assert rel(s, reference_ekfac(layer, batches, {"": (qa, qg)})[""]) < TOL
    model, batches = make_batches("mlp_bn", seed=seed % 1000, data_seed=seed)
    est = _ewc(model, lam=1.0, structure="ekfac", params=lambda n, p: n != "1.bias").consolidate(batches)
    qa, qg, s = est["ekfac"]["1"]
    assert qa.shape == (16, 16) and s.shape == (12, 16)
    assert rel(s, reference_ekfac(model, batches, {"1": (qa, qg)}, without_bias=frozenset({"1"}))["1"]) < TOL
