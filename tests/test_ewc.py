"""Tests of the ``EWC`` class and the fused penalty against the pure-PyTorch reference.

Every random input is drawn fresh on each run; the seed is printed and is part of every assertion
message. Re-run a failure with ``EWC_TEST_SEED=<seed>``. The reference is ``naive_penalty`` from
``tests/reference.py``: (λ/2) Σ_i F_i (θ_i − θ*_i)² with ordinary torch ops in float64.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import ewc_rs
from ewc_rs import EWC, _core, fisher_diag
from models import MODELS
from reference import naive_penalty, relative_error

TOL = 1e-5  # float32: value and gradient against the float64 reference
BF16_U = 2.0**-8  # unit roundoff of bfloat16: 8 significant bits (7 stored), round to nearest

Pair = tuple[dict[str, Tensor], dict[str, Tensor]]  # (θ*, F) of one task


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def task_model(name: str, seed: int) -> tuple[nn.Module, Callable[[int], list]]:
    """A zoo model (weights from ``seed``) and a function returning fresh batches of its data."""
    model, sample = MODELS[name](seed % 100_000)
    g = gen(seed + 1)
    return model, lambda n=3: [sample(8, g) for _ in range(n)]


def perturb(model: nn.Module, g: torch.Generator, scale: float = 0.1) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_((scale * torch.randn(p.shape, generator=g)).to(p.dtype))


def fisher_of(model: nn.Module, data: Any) -> dict[str, Tensor]:
    """``ewc_rs.fisher_diag`` (detached: some fallback paths return graph-attached tensors)."""
    return {n: f.detach() for n, f in fisher_diag(model, data).items()}


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def grads_of(model: nn.Module, names: Any = None) -> dict[str, Tensor]:
    """``.grad`` of every (or the named) parameters, zeros where None."""
    out = {}
    for n, p in model.named_parameters():
        if names is None or n in names:
            out[n] = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
    return out


def ewc_value_and_grads(model: nn.Module, ewc: EWC, scale: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    model.zero_grad(set_to_none=True)
    value = ewc.penalty(model)
    (scale * value).backward()
    return value.detach(), grads_of(model)


def naive_value_and_grads(
    model: nn.Module, pairs: list[Pair], lam: float
) -> tuple[float, dict[str, Tensor]]:
    """Σ_t naive_penalty(model, θ*_t, F_t, λ) and its autograd gradient (on a copy of ``model``)."""
    ref = copy.deepcopy(model)
    ref.zero_grad(set_to_none=True)
    total = sum(naive_penalty(ref, star, fisher, lam) for star, fisher in pairs)
    assert isinstance(total, Tensor)
    if total.requires_grad:
        total.backward()
    return float(total.detach()), grads_of(ref)


def rel(a: float, b: float) -> float:
    if b == 0.0:
        return 0.0 if a == 0.0 else math.inf
    return abs(a - b) / abs(b)


def check_against_naive(model: nn.Module, ewc: EWC, pairs: list[Pair], lam: float, msg: str) -> None:
    """Value and gradient of ``ewc.penalty`` (plain, scaled, with another loss, accumulating)."""
    ref_value, ref_grads = naive_value_and_grads(model, pairs, lam)
    consolidated = {n for _, fisher in pairs for n in fisher}
    assert ref_value > 0, msg

    value, grads = ewc_value_and_grads(model, ewc)
    assert value.dim() == 0 and value.dtype == torch.float32, msg
    assert rel(float(value), ref_value) <= TOL, f"{msg}: value {float(value)} vs {ref_value}"
    err = relative_error(grads, ref_grads)
    assert err <= TOL, f"{msg}: gradient relative error {err:.3g}"
    for n, p in model.named_parameters():  # parameters outside the state get no gradient
        if n not in consolidated:
            assert p.grad is None, f"{msg}: '{n}' was not consolidated but got a gradient"

    # (2.5 * penalty).backward() scales the gradient
    value, grads = ewc_value_and_grads(model, ewc, scale=2.5)
    scaled = {n: 2.5 * g for n, g in ref_grads.items()}
    err = relative_error(grads, scaled)
    assert err <= TOL, f"{msg}: 2.5 * penalty: gradient relative error {err:.3g}"

    # an existing .grad accumulates
    g = gen(int(1e6 * ref_value) % 2**31)
    before = {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = before[n].clone()
    ewc.penalty(model).backward()
    err = relative_error(grads_of(model), {n: before[n] + ref_grads[n] for n in before})
    assert err <= TOL, f"{msg}: accumulation into existing .grad: relative error {err:.3g}"
    model.zero_grad(set_to_none=True)
    check_direct_backward(model, ewc, ref_value, ref_grads, consolidated, before, msg)


def check_direct_backward(model: nn.Module, ewc: EWC, ref_value: float, ref_grads: dict[str, Tensor],
                          consolidated: set[str], before: dict[str, Tensor], msg: str) -> None:
    """``ewc.backward(model)`` (no autograd) = ``ewc.penalty(model).backward()``: from no
    ``.grad``, scaled, and added to existing ``.grad`` (contiguous or not)."""
    msg = f"{msg}, ewc.backward"
    model.zero_grad(set_to_none=True)
    value = ewc.backward(model)
    assert value.dim() == 0 and not value.requires_grad, msg
    assert rel(float(value), ref_value) <= TOL, f"{msg}: value {float(value)} vs {ref_value}"
    err = relative_error(grads_of(model), ref_grads)
    assert err <= TOL, f"{msg}: gradient relative error {err:.3g}"
    for n, p in model.named_parameters():
        if n not in consolidated or not p.requires_grad:
            assert p.grad is None, f"{msg}: '{n}' got a gradient it should not have"

    ewc.backward(model, grad_scale=1.5)  # adds 1.5x on top of the 1x above
    err = relative_error(grads_of(model), {n: 2.5 * g for n, g in ref_grads.items()})
    assert err <= TOL, f"{msg}: grad_scale=1.5 on existing .grad: relative error {err:.3g}"

    for i, (n, p) in enumerate(model.named_parameters()):
        # every other .grad non-contiguous (a transposed copy): must be added to, not overwritten
        b = before[n].clone()
        if i % 2 and b.dim() == 2:
            b = b.t().contiguous().t()
            assert not b.is_contiguous()
        p.grad = b
    ewc.backward(model)
    err = relative_error(grads_of(model), {n: before[n] + ref_grads[n] for n in before})
    assert err <= TOL, f"{msg}: accumulation into existing .grad: relative error {err:.3g}"
    model.zero_grad(set_to_none=True)


def check_with_other_loss(model: nn.Module, ewc: EWC, batch: Any, pairs: list[Pair], lam: float, msg: str) -> None:
    """``(ce + ewc.penalty(model)).backward()`` = ce's gradient + the penalty's."""
    x, y = batch

    def ce() -> Tensor:
        out = model(*x) if isinstance(x, (tuple, list)) else model(**x) if isinstance(x, dict) else model(x)
        return F.cross_entropy(out, y)

    model.zero_grad(set_to_none=True)
    ce().backward()
    ce_grads = grads_of(model)
    _, ref_grads = naive_value_and_grads(model, pairs, lam)
    model.zero_grad(set_to_none=True)
    (ce() + ewc.penalty(model)).backward()
    expected = {n: ce_grads[n] + ref_grads[n] for n in ce_grads}
    err = relative_error(grads_of(model), expected)
    assert err <= TOL, f"{msg}: (ce + penalty).backward(): relative error {err:.3g}"
    model.zero_grad(set_to_none=True)
    ce().backward()
    ewc.backward(model)
    err = relative_error(grads_of(model), expected)
    assert err <= TOL, f"{msg}: ce.backward(); ewc.backward(): relative error {err:.3g}"
    model.zero_grad(set_to_none=True)


def fisher_state(model: nn.Module, star: Mapping[str, Tensor], fisher: Mapping[str, Tensor], lam: float,
                 **extra: Any) -> dict[str, Any]:
    """A hand-made EWC state dict with one (F, θ*) pair."""
    state = {"version": 1, "lam": lam, "mode": "separate", "gamma": 1.0, "norm_stats": "freeze",
             "storage_dtype": "float32", "pairs": [{"fisher": dict(fisher), "star": dict(star)}]}
    state.update(extra)
    return state


def same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if {k: v for k, v in a.items() if k != "pairs"} != {k: v for k, v in b.items() if k != "pairs"}:
        return False
    if len(a["pairs"]) != len(b["pairs"]):
        return False
    for pa, pb in zip(a["pairs"], b["pairs"]):
        for key in ("fisher", "star"):
            if set(pa[key]) != set(pb[key]):
                return False
            if not all(pa[key][n].dtype == pb[key][n].dtype and torch.equal(pa[key][n], pb[key][n])
                       for n in pa[key]):
                return False
    return True


MODEL_NAMES = ["mlp_bn", "cnn", "raw_params", "tied_modules", "frozen_part"]


# --------------------------------------------------------------------------------------------------
# 1. value and gradient against the naive reference
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("tasks", [1, 2, 3])
def test_separate_matches_naive(name: str, tasks: int, seed: int) -> None:
    g = gen(seed)
    model, batches = task_model(name, seed)
    lam = float(torch.empty(()).uniform_(1.0, 1000.0, generator=g))
    ewc = EWC(model, lam=lam)
    pairs: list[Pair] = []
    for t in range(tasks):
        if t:
            perturb(model, g)  # so the θ*_t differ
        data = batches()
        fisher = fisher_of(model, data)
        star = snapshot(model)
        returned = ewc.consolidate(data)
        assert set(returned) == set(fisher), f"seed={seed}"
        for n in fisher:
            assert returned[n].dtype == torch.float32
            torch.testing.assert_close(returned[n], fisher[n], rtol=1e-6, atol=0.0,
                                       msg=lambda m: f"seed={seed}: consolidate() return value: {m}")
        pairs.append((star, fisher))
        assert ewc.num_tasks == t + 1
    perturb(model, g)
    msg = f"seed={seed}, model={name}, separate, {tasks} task(s), lam={lam:.4g}"
    check_against_naive(model, ewc, pairs, lam, msg)
    check_with_other_loss(model, ewc, batches(1)[0], pairs, lam, msg)


@pytest.mark.parametrize("name", ["mlp_bn", "raw_params", "tied_modules"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_online_matches_naive(name: str, gamma: float, seed: int) -> None:
    g = gen(seed)
    model, batches = task_model(name, seed)
    lam = float(torch.empty(()).uniform_(1.0, 1000.0, generator=g))
    ewc = EWC(model, lam=lam, mode="online", gamma=gamma)
    f_online: dict[str, Tensor] = {}
    star: dict[str, Tensor] = {}
    for t in range(4):
        if t:
            perturb(model, g)
        data = batches()
        f_new = fisher_of(model, data)
        star = snapshot(model)
        ewc.consolidate(data)
        f_online = {n: (gamma * f_online[n].double() if n in f_online else 0.0) + f_new[n].double()
                    for n in f_new}
        assert ewc.num_tasks == 1
        perturb(model, g)
        msg = f"seed={seed}, model={name}, online γ={gamma}, after {t + 1} consolidation(s)"
        check_against_naive(model, ewc, [(star, f_online)], lam, msg)
    check_with_other_loss(model, ewc, batches(1)[0], [(star, f_online)], lam, msg)


# --------------------------------------------------------------------------------------------------
# 2. before any consolidation
# --------------------------------------------------------------------------------------------------
def test_penalty_before_consolidate_is_zero(seed: int) -> None:
    model, batches = task_model("mlp_bn", seed)
    ewc = EWC(model, lam=10.0)
    p = ewc.penalty(model)
    assert isinstance(p, Tensor) and p.dim() == 0 and float(p) == 0.0
    assert ewc.penalty() .dim() == 0 and ewc.num_tasks == 0
    x, y = batches(1)[0]
    loss = F.cross_entropy(model(x), y) + ewc.penalty(model)
    loss.backward()
    assert all(q.grad is not None for q in model.parameters())


# --------------------------------------------------------------------------------------------------
# 3. params= selection
# --------------------------------------------------------------------------------------------------
HEAD = ("7.weight", "7.bias")  # the last Linear of mlp_bn
BODY = ["1.weight", "1.bias", "3.weight", "3.bias", "4.weight", "4.bias", "6.weight", "6.bias"]


@pytest.mark.parametrize("kind", ["names", "regex", "compiled", "predicate"])
def test_params_selection_leaves_out_head(kind: str, seed: int) -> None:
    selector: Any = {
        "names": list(BODY),
        "regex": r"^[1-6]\.",
        "compiled": re.compile(r"^[1-6]\."),
        "predicate": lambda n, p: not n.startswith("7."),
    }[kind]
    g = gen(seed)
    model, batches = task_model("mlp_bn", seed)
    ewc = EWC(model, lam=50.0, params=selector)
    data = batches()
    fisher = fisher_of(model, data)
    star = snapshot(model)
    returned = ewc.consolidate(data)
    assert set(returned) == set(BODY), f"seed={seed}"
    perturb(model, g)
    pairs = [({n: star[n] for n in BODY}, {n: fisher[n] for n in BODY})]
    check_against_naive(model, ewc, pairs, 50.0, f"seed={seed}, params={kind}")
    model.zero_grad(set_to_none=True)
    ewc.penalty(model).backward()
    for n, p in model.named_parameters():
        if n in HEAD:
            assert p.grad is None or not p.grad.any(), f"seed={seed}: head '{n}' got a penalty gradient"


@pytest.mark.parametrize("selector", ["^nothing$", re.compile("^zzz"), [], ["not.a.param"],
                                      lambda n, p: False])
def test_params_selection_matching_nothing(selector: Any) -> None:
    model, batches = task_model("cnn", 0)
    ewc = EWC(model, lam=1.0, params=selector)
    with pytest.raises(ValueError, match="params"):
        ewc.consolidate(batches())
    assert ewc.num_tasks == 0


def test_params_selection_bad_type() -> None:
    with pytest.raises(TypeError, match="params"):
        EWC(nn.Linear(2, 2), lam=1.0, params=42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="params"):
        EWC(nn.Linear(2, 2), lam=1.0, params=["weight", 3])  # type: ignore[list-item]


# --------------------------------------------------------------------------------------------------
# 4. the model changes after consolidation
# --------------------------------------------------------------------------------------------------
class MultiHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.heads = nn.ModuleDict({"a": nn.Linear(8, 3)})

    def forward(self, x: Tensor, head: str = "a") -> Tensor:
        return self.heads[head](torch.tanh(self.body(x)))


def _multihead(seed: int) -> tuple[MultiHead, list]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MultiHead()
    g = gen(seed + 7)
    return model, [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(2)]


def test_new_head_has_no_penalty(seed: int) -> None:
    g = gen(seed)
    model, data = _multihead(seed)
    ewc = EWC(model, lam=20.0)
    fisher = fisher_of(model, data)
    star = snapshot(model)
    ewc.consolidate(data)
    perturb(model, g)
    before = ewc.penalty(model).item()
    model.heads["b"] = nn.Linear(8, 4)
    assert ewc.penalty(model).item() == before, f"seed={seed}"
    check_against_naive(model, ewc, [(star, fisher)], 20.0, f"seed={seed}, new head")
    model.zero_grad(set_to_none=True)
    x = torch.randn(5, 6, generator=g)
    (model(x, "b").pow(2).mean() + ewc.penalty(model)).backward()
    lone = copy.deepcopy(model)
    lone.zero_grad(set_to_none=True)
    lone(x, "b").pow(2).mean().backward()
    for n in ("heads.b.weight", "heads.b.bias"):
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, dict(lone.named_parameters())[n].grad)


def test_changed_shape_raises_naming_parameter(seed: int) -> None:
    model, data = _multihead(seed)
    ewc = EWC(model, lam=1.0)
    ewc.consolidate(data)
    model.heads["a"] = nn.Linear(8, 5)  # same names, bigger
    with pytest.raises(ValueError, match=r"heads\.a\.(weight|bias)"):
        ewc.penalty(model)


def test_other_model_missing_parameter_raises_naming_it(seed: int) -> None:
    model, data = _multihead(seed)
    ewc = EWC(model, lam=1.0)
    ewc.consolidate(data)
    other = MultiHead()
    del other.heads["a"]
    with pytest.raises(ValueError, match=r"heads\.a\.(weight|bias)"):
        ewc.penalty(other)
    other2 = MultiHead()
    other2.body = nn.Identity()  # type: ignore[assignment]
    with pytest.raises(ValueError, match=r"body\.(weight|bias)"):
        ewc.penalty(other2)


# --------------------------------------------------------------------------------------------------
# 5. dtype and device moves
# --------------------------------------------------------------------------------------------------
def _consolidated(name: str, seed: int, lam: float = 100.0, **kw: Any) -> tuple[nn.Module, EWC, list[Pair], Callable]:
    g = gen(seed)
    model, batches = task_model(name, seed)
    ewc = EWC(model, lam=lam, **kw)
    data = batches()
    fisher = fisher_of(model, data)
    star = snapshot(model)
    ewc.consolidate(data)
    perturb(model, g)
    return model, ewc, [(star, fisher)], batches


def test_double_model_is_rejected_clearly(seed: int) -> None:
    """The core supports float32/float16/bfloat16 parameters only: float64 raises (no wrong number)."""
    model, ewc, _, _ = _consolidated("cnn", seed)
    model.double()
    with pytest.raises(TypeError, match="params.*float32"):
        ewc.penalty(model)
    model.float()
    assert ewc.penalty(model).item() > 0


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
def test_half_precision_model_after_consolidation(dtype: torch.dtype, tol: float, seed: int) -> None:
    model, ewc, _, _ = _consolidated("mlp_bn", seed)
    v32, g32 = ewc_value_and_grads(model, ewc)
    model.to(dtype)
    v16, g16 = ewc_value_and_grads(model, ewc)
    assert v16.dtype == torch.float32 and all(g.dtype == dtype for g in g16.values())
    err_v, err_g = rel(float(v16), float(v32)), relative_error(g16, g32)
    print(f"seed={seed}: {dtype} model vs float32: value {err_v:.2e}, gradient {err_g:.2e}")
    assert err_v <= tol and err_g <= tol, f"seed={seed}: {dtype}: value {err_v:.3g}, grad {err_g:.3g}"


def test_ewc_to_cpu(seed: int) -> None:
    model, ewc, pairs, _ = _consolidated("cnn", seed)
    before = ewc.penalty(model).item()
    assert ewc.to("cpu") is ewc
    assert ewc.to(torch.device("cpu")) is ewc
    assert ewc.penalty(model).item() == before
    check_against_naive(model, ewc, pairs, 100.0, f"seed={seed}, after ewc.to('cpu')")


def _need_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available (torch.cuda.is_available() is False)")


def test_cuda_model_after_consolidation(seed: int) -> None:
    _need_cuda()
    model, ewc, pairs, _ = _consolidated("mlp_bn", seed)
    v_cpu, g_cpu = ewc_value_and_grads(model, ewc)
    model.cuda()
    value = ewc.penalty(model)
    assert value.device.type == "cuda" and value.dtype == torch.float32
    check_against_naive(model, ewc, pairs, 100.0, f"seed={seed}, model.cuda()")
    v, g = ewc_value_and_grads(model, ewc)
    assert rel(float(v), float(v_cpu)) <= TOL and relative_error(g, g_cpu) <= TOL
    ewc.to("cuda")
    assert rel(ewc.penalty(model).item(), float(v_cpu)) <= TOL
    model.to(torch.bfloat16)
    assert rel(ewc.penalty(model).item(), float(v_cpu)) <= 5e-2
    model.float().cpu()
    assert rel(ewc.penalty(model).item(), float(v_cpu)) <= TOL


def test_cuda_consolidate_on_gpu(seed: int) -> None:
    _need_cuda()
    g = gen(seed)
    model, batches = task_model("cnn", seed)
    model.cuda()
    ewc = EWC(model, lam=30.0)
    data = batches()
    fisher = fisher_of(model, data)
    star = snapshot(model)
    ewc.consolidate(data)
    perturb(model, g)
    check_against_naive(model, ewc, [(star, fisher)], 30.0, f"seed={seed}, CUDA consolidate")


# --------------------------------------------------------------------------------------------------
# 6. state round-trips and failed loads
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, storage", [("separate", None), ("online", None), ("separate", torch.bfloat16)])
def test_state_dict_round_trip(mode: str, storage: Any, tmp_path: Any, seed: int) -> None:
    g = gen(seed)
    model, batches = task_model("mlp_bn", seed)
    ewc = EWC(model, lam=42.0, mode=mode, gamma=0.7, storage_dtype=storage)
    for _ in range(2):
        ewc.consolidate(batches())
        perturb(model, g)
    v0, g0 = ewc_value_and_grads(model, ewc)

    torch.save(ewc.state_dict(), tmp_path / "ewc.pt")
    fresh = EWC(model, lam=1.0)
    fresh.load_state_dict(torch.load(tmp_path / "ewc.pt"))
    assert same_state(fresh.state_dict(), ewc.state_dict()), f"seed={seed}"
    v1, g1 = ewc_value_and_grads(model, fresh)
    assert torch.equal(v1, v0) and all(torch.equal(g1[n], g0[n]) for n in g0), f"seed={seed}"

    ewc.save(str(tmp_path / "ewc.safetensors"))
    loaded = EWC.load(str(tmp_path / "ewc.safetensors"), model)
    assert (loaded.lam, loaded.mode, loaded.gamma, loaded.storage_dtype, loaded.num_tasks) == (
        ewc.lam, ewc.mode, ewc.gamma, ewc.storage_dtype, ewc.num_tasks)
    assert same_state(loaded.state_dict(), ewc.state_dict()), f"seed={seed}"
    v2, g2 = ewc_value_and_grads(model, loaded)
    assert torch.equal(v2, v0) and all(torch.equal(g2[n], g0[n]) for n in g0), f"seed={seed}"


def test_load_rejects_non_ewc_file(tmp_path: Any) -> None:
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="ewc_rs"):
        EWC.load(str(tmp_path / "x.safetensors"), nn.Linear(2, 2))


def _bad_states(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Corrupted copies of a valid state with one pair (names 'a', 'b', ...)."""
    def variant(fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        s = copy.deepcopy(state)
        fn(s)
        return s

    first = sorted(state["pairs"][0]["fisher"])[0]

    def set_f(value: float) -> Callable[[dict[str, Any]], None]:
        def fn(s: dict[str, Any]) -> None:
            s["pairs"][0]["fisher"][first].view(-1)[0] = value
        return fn

    def set_star(value: float) -> Callable[[dict[str, Any]], None]:
        def fn(s: dict[str, Any]) -> None:
            s["pairs"][0]["star"][first].view(-1)[0] = value
        return fn

    return {
        "version 2": variant(lambda s: s.update(version=2)),
        "no version": variant(lambda s: s.pop("version")),
        "not a dict": [state],  # type: ignore[dict-item]
        "star misses a key": variant(lambda s: s["pairs"][0]["star"].pop(first)),
        "fisher has an extra key": variant(lambda s: s["pairs"][0]["fisher"].update(extra=torch.ones(3))),
        "F and star shapes differ": variant(lambda s: s["pairs"][0]["star"].update({first: torch.zeros(99)})),
        "F nan": variant(set_f(math.nan)),
        "F inf": variant(set_f(math.inf)),
        "F negative": variant(set_f(-1e-3)),
        "star nan": variant(set_star(math.nan)),
        "star -inf": variant(set_star(-math.inf)),
        "lam negative": variant(lambda s: s.update(lam=-1.0)),
        "lam nan": variant(lambda s: s.update(lam=math.nan)),
        "lam bool": variant(lambda s: s.update(lam=True)),
        "lam str": variant(lambda s: s.update(lam="1")),
        "mode": variant(lambda s: s.update(mode="sum")),
        "gamma": variant(lambda s: s.update(gamma=1.5)),
        "norm_stats": variant(lambda s: s.update(norm_stats="keep")),
        "storage float16": variant(lambda s: s.update(storage_dtype="float16")),
        "pairs not a list": variant(lambda s: s.update(pairs={"0": s["pairs"][0]})),
        "online with two pairs": variant(lambda s: s.update(mode="online", pairs=s["pairs"] * 2)),
        "pair with extra key": variant(lambda s: s["pairs"][0].update(extra={})),
        "F not a tensor": variant(lambda s: s["pairs"][0]["fisher"].update({first: [1.0, 2.0]})),
    }


def test_failed_load_changes_nothing(seed: int) -> None:
    model, ewc, _, batches = _consolidated("mlp_bn", seed)
    good = ewc.state_dict()
    before_state = copy.deepcopy(good)
    v0, g0 = ewc_value_and_grads(model, ewc)
    cases = _bad_states(copy.deepcopy(good))
    bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    for what, bad in cases.items():
        with pytest.raises(ValueError):
            ewc.load_state_dict(bad)
        assert same_state(ewc.state_dict(), before_state), f"seed={seed}: failed load '{what}' changed the state"
        v1, g1 = ewc_value_and_grads(model, ewc)
        assert torch.equal(v1, v0) and all(torch.equal(g1[n], g0[n]) for n in g0), (
            f"seed={seed}: failed load '{what}' changed the penalty")
        # the norm-statistics freeze is still in place
        model.train()
        stats = [m.running_mean.clone() for m in bn]
        model(batches(1)[0][0])
        assert all(torch.equal(s, m.running_mean) for s, m in zip(stats, bn)), f"failed load '{what}'"
    # a good state still loads afterwards
    ewc.load_state_dict(good)
    assert torch.equal(ewc_value_and_grads(model, ewc)[0], v0)


# --------------------------------------------------------------------------------------------------
# 7. bad constructor arguments
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, arg", [
    ({"lam": -1.0}, "lam"), ({"lam": math.nan}, "lam"), ({"lam": math.inf}, "lam"), ({"lam": True}, "lam"),
    ({"lam": "1"}, "lam"), ({"lam": None}, "lam"),
    ({"lam": 1.0, "gamma": -0.1}, "gamma"), ({"lam": 1.0, "gamma": 1.01}, "gamma"),
    ({"lam": 1.0, "gamma": math.nan}, "gamma"), ({"lam": 1.0, "gamma": False}, "gamma"),
    ({"lam": 1.0, "mode": "sum"}, "mode"), ({"lam": 1.0, "mode": None}, "mode"),
    ({"lam": 1.0, "norm_stats": "keep"}, "norm_stats"),
    ({"lam": 1.0, "storage_dtype": torch.float16}, "storage_dtype"),
    ({"lam": 1.0, "storage_dtype": torch.float64}, "storage_dtype"),
    ({"lam": 1.0, "storage_dtype": "bfloat16"}, "storage_dtype"),
])
def test_bad_arguments(kwargs: dict[str, Any], arg: str) -> None:
    with pytest.raises(ValueError, match=arg):
        EWC(nn.Linear(3, 2), **kwargs)


def test_good_edge_arguments() -> None:
    for lam in (0, 0.0, 5, 1e6):
        assert EWC(nn.Linear(3, 2), lam=lam).lam == float(lam)
    for gamma in (0, 0.0, 1, 1.0):
        assert EWC(nn.Linear(3, 2), lam=1.0, mode="online", gamma=gamma).gamma == float(gamma)


@pytest.mark.parametrize("model", [None, "model", [nn.Linear(2, 2)], {"w": torch.zeros(2)}])
def test_model_not_a_module(model: Any) -> None:
    with pytest.raises(TypeError, match="model"):
        EWC(model, lam=1.0)


# --------------------------------------------------------------------------------------------------
# 8. second derivative, retained graph, autocast
# --------------------------------------------------------------------------------------------------
def test_second_derivative_raises(seed: int) -> None:
    model, ewc, pairs, batches = _consolidated("cnn", seed)
    params = list(model.parameters())
    grads = torch.autograd.grad(ewc.penalty(model), params, create_graph=True)
    _, ref = naive_value_and_grads(model, pairs, 100.0)
    assert relative_error(dict(zip(ref, grads)), ref) <= TOL  # the first derivative is right
    with pytest.raises(RuntimeError):
        torch.autograd.grad(sum((gr * gr).sum() for gr in grads), params)
    grads = torch.autograd.grad(ewc.penalty(model), params, create_graph=True)
    with pytest.raises(RuntimeError):
        sum((gr * gr).sum() for gr in grads).backward()


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_second_derivative_of_sum_with_other_loss_raises(seed: int) -> None:
    """A gradient penalty on ce + penalty must not silently drop the penalty's Hessian λF."""
    model, ewc, _, batches = _consolidated("cnn", seed)
    params = list(model.parameters())
    x, y = batches(1)[0]
    loss = F.cross_entropy(model(x), y) + ewc.penalty(model)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(sum((gr * gr).sum() for gr in grads), params)
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y) + ewc.penalty(model)
    loss.backward(create_graph=True)
    with pytest.raises(RuntimeError):
        sum((p.grad * p.grad).sum() for p in params).backward()
    model.zero_grad(set_to_none=True)  # break the parameter <-> .grad reference cycle


def test_backward_twice_with_retained_graph(seed: int) -> None:
    model, ewc, pairs, _ = _consolidated("cnn", seed)
    _, ref = naive_value_and_grads(model, pairs, 100.0)
    model.zero_grad(set_to_none=True)
    loss = ewc.penalty(model)
    loss.backward(retain_graph=True)
    loss.backward()
    err = relative_error(grads_of(model, ref), {n: 2 * r for n, r in ref.items()})
    assert err <= TOL, f"seed={seed}: two backward passes: relative error {err:.3g}"
    loss = 3.0 * ewc.penalty(model)
    loss.backward(retain_graph=True)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # in-place change between the two passes
    with pytest.raises(RuntimeError, match="in place"):
        loss.backward()


def test_autocast_bf16_penalty_is_float32(seed: int) -> None:
    model, ewc, _, batches = _consolidated("mlp_bn", seed)
    v0, g0 = ewc_value_and_grads(model, ewc)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = ewc.penalty(model)
    assert value.dtype == torch.float32
    assert rel(value.item(), float(v0)) <= 1e-7, f"seed={seed}: {value.item()} vs {float(v0)}"
    value.backward()
    assert relative_error(grads_of(model), g0) <= 1e-7
    x, y = batches(1)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y) + ewc.penalty(model)
    assert loss.dtype == torch.float32
    loss.backward()


# --------------------------------------------------------------------------------------------------
# 9. bfloat16 storage
# --------------------------------------------------------------------------------------------------
def test_bf16_storage_cost(seed: int) -> None:
    """bfloat16 F and θ* against float32 storage after a realistic drift θ = θ* + 0.05·randn.

    Bounds (u = 2⁻⁸, stored F' = F(1+δ), θ*' = θ* + e with |δ| ≤ u, |e| ≤ u|θ*|, d = θ − θ*):
    value  |P' − P| / P ≤ u + (1+u)(2√(E·P₀) + E)/P₀ with P₀ = Σ F d², E = Σ F (u θ*)²;
    gradient ||g' − g|| / ||g|| ≤ u + (1+u) ||F u θ*|| / ||F d||.
    """
    g = gen(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    data = [(torch.randn(16, 32, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(4)]
    ewc32 = EWC(model, lam=100.0)
    ewc16 = EWC(model, lam=100.0, storage_dtype=torch.bfloat16)
    f32 = ewc32.consolidate(data)
    f16 = ewc16.consolidate(data)
    assert all(f16[n].dtype == torch.float32 for n in f16)  # the return value is the estimate
    state = ewc16.state_dict()
    assert state["storage_dtype"] == "bfloat16"
    for key in ("fisher", "star"):
        assert all(t.dtype == torch.bfloat16 for t in state["pairs"][0][key].values())
    # each stored θ*_i and F_i is off by at most u = 2⁻⁸ of its magnitude (ewc.py says 2⁻⁹)
    star = snapshot(model)
    for n in star:
        for exact, stored in ((star[n], state["pairs"][0]["star"][n]), (f32[n], state["pairs"][0]["fisher"][n])):
            normal = exact.abs() >= torch.finfo(torch.bfloat16).tiny
            err = ((stored.double() - exact.double()).abs() / exact.double().abs())[normal]
            assert err.numel() == 0 or float(err.max()) <= BF16_U, f"seed={seed}: '{n}' rounding {float(err.max())}"

    perturb(model, g, scale=0.05)
    v32, g32 = ewc_value_and_grads(model, ewc32)
    v16, g16 = ewc_value_and_grads(model, ewc16)
    err_v, err_g = rel(float(v16), float(v32)), relative_error(g16, g32)

    p0 = sum(float((f32[n].double() * (p.detach().double() - star[n].double()) ** 2).sum())
             for n, p in model.named_parameters())
    e = sum(float((f32[n].double() * (BF16_U * star[n].double()) ** 2).sum()) for n in star)
    bound_v = BF16_U + (1 + BF16_U) * (2 * math.sqrt(e * p0) + e) / p0 + 1e-6
    num = math.sqrt(sum(float((f32[n].double() * BF16_U * star[n].double()).pow(2).sum()) for n in star))
    den = math.sqrt(sum(float((f32[n].double() * (p.detach().double() - star[n].double())).pow(2).sum())
                        for n, p in model.named_parameters()))
    bound_g = BF16_U + (1 + BF16_U) * num / den + 1e-6
    print(f"seed={seed}: bfloat16 storage vs float32 after drift 0.05: value rel. error {err_v:.2e} "
          f"(bound {bound_v:.2e}), gradient rel. error {err_g:.2e} (bound {bound_g:.2e})")
    assert err_v <= bound_v and err_v <= 2e-2, f"seed={seed}: value error {err_v:.3g} > bound {bound_v:.3g}"
    assert err_g <= bound_g and err_g <= 2e-2, f"seed={seed}: gradient error {err_g:.3g} > bound {bound_g:.3g}"
    assert all(g16[n].dtype == torch.float32 for n in g16)  # gradients follow the parameters


# --------------------------------------------------------------------------------------------------
# 10. normalisation statistics
# --------------------------------------------------------------------------------------------------
def _bn_stats(model: nn.Module) -> list[Tensor]:
    return [t.clone() for m in model.modules() if isinstance(m, nn.BatchNorm1d)
            for t in (m.running_mean, m.running_var, m.num_batches_tracked)]


def _stats_equal(a: list[Tensor], b: list[Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_norm_stats_freeze(seed: int) -> None:
    model, batches = task_model("mlp_bn", seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default ("freeze") does not warn
        ewc = EWC(model, lam=1.0)
    model.train()
    s0 = _bn_stats(model)
    model(batches(1)[0][0])
    assert not _stats_equal(s0, _bn_stats(model)), "before consolidation the statistics must update"

    ewc.consolidate(batches())
    model.train()
    s1 = _bn_stats(model)
    x = batches(1)[0][0]
    for _ in range(3):
        out = model(x)
    assert _stats_equal(s1, _bn_stats(model)), f"seed={seed}: frozen statistics changed"
    assert all(m.training for m in model.modules()), "module.training must read True outside forward"
    model.eval()
    torch.testing.assert_close(out, model(x))  # the layers ran in eval mode inside the forward
    model.train()

    ewc.release_norm_stats()
    model(x)
    assert not _stats_equal(s1, _bn_stats(model)), "after release_norm_stats() the statistics update"


def test_norm_stats_update_warns_once_and_updates(seed: int) -> None:
    model, batches = task_model("mlp_bn", seed)
    with pytest.warns(UserWarning, match="norm_stats") as record:
        ewc = EWC(model, lam=1.0, norm_stats="update")
    assert len([w for w in record if issubclass(w.category, UserWarning)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ewc.consolidate(batches())
        model.train()
        s = _bn_stats(model)
        model(batches(1)[0][0])
    assert not _stats_equal(s, _bn_stats(model)), "norm_stats='update' must let the statistics update"

    plain, _ = task_model("cnn", seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EWC(plain, lam=1.0, norm_stats="update")  # no normalisation layer: no warning


# --------------------------------------------------------------------------------------------------
# 11. property tests: random shapes, dtypes, λ
# --------------------------------------------------------------------------------------------------
class Bag(nn.Module):
    def __init__(self, tensors: list[Tensor]) -> None:
        super().__init__()
        self.ps = nn.ParameterList([nn.Parameter(t) for t in tensors])


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GRAD_TOL = {torch.float32: TOL, torch.float16: 1e-3, torch.bfloat16: 5e-3}  # ≥ 2u of the dtype


@st.composite
def shapes(draw: Any) -> tuple[int, ...]:
    size = draw(st.integers(1, 3000))
    if size > 1 and draw(st.booleans()):
        divisors = [k for k in range(2, min(size, 60) + 1) if size % k == 0]
        if divisors:
            k = draw(st.sampled_from(divisors))
            return (k, size // k)
    return (size,)


@settings(max_examples=30, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    specs=st.lists(st.tuples(shapes(), st.sampled_from(DTYPES)), min_size=1, max_size=40),
    lam=st.one_of(st.just(0.0), st.floats(1e-2, 1e3)),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_random_parameters(specs: list, lam: float, seed: int) -> None:
    g = gen(seed)
    params = [torch.randn(shape, generator=g).to(dtype) for shape, dtype in specs]
    model = Bag(params)
    names = [n for n, _ in model.named_parameters()]
    star = {n: p.detach().float() + 0.1 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    fisher = {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}
    ewc = EWC(model, lam=1.0)
    ewc.load_state_dict(fisher_state(model, star, fisher, lam))

    value = ewc.penalty(model)
    value.backward()
    msg = f"seed={seed}, lam={lam}, {len(specs)} tensors"
    assert value.dtype == torch.float32 and value.dim() == 0, msg
    ref_value = 0.0
    ref_grads = {}
    for n, p in model.named_parameters():
        d = p.detach().double() - star[n].double()
        ref_value += 0.5 * lam * float((fisher[n].double() * d * d).sum())
        ref_grads[n] = lam * fisher[n].double() * d
    assert rel(value.item(), ref_value) <= TOL, f"{msg}: value {value.item()} vs {ref_value}"
    for dtype in DTYPES:
        sel = [n for n, p in zip(names, model.parameters()) if p.dtype == dtype]
        if not sel:
            continue
        got = {}
        for n, p in model.named_parameters():
            if n in sel:
                assert p.grad is not None and p.grad.dtype == dtype, msg
                got[n] = p.grad
        err = relative_error(got, {n: ref_grads[n] for n in sel})
        assert err <= GRAD_TOL[dtype], f"{msg}: {dtype} gradient relative error {err:.3g}"

    # the direct path (no autograd) on top: value again, gradient doubled in place
    direct = ewc.backward(model)
    assert rel(direct.item(), ref_value) <= TOL, f"{msg}: ewc.backward value {direct.item()} vs {ref_value}"
    for dtype in DTYPES:
        sel = [n for n, p in zip(names, model.parameters()) if p.dtype == dtype]
        if not sel:
            continue
        got = {n: p.grad for n, p in model.named_parameters() if n in sel}
        assert all(g is not None and g.dtype == dtype for g in got.values()), msg
        err = relative_error(got, {n: 2.0 * ref_grads[n] for n in sel})  # type: ignore[misc]
        assert err <= 2 * GRAD_TOL[dtype], f"{msg}: {dtype} ewc.backward gradient relative error {err:.3g}"


# --------------------------------------------------------------------------------------------------
# 12. the native function directly
# --------------------------------------------------------------------------------------------------
def test_core_penalty_matches_formula(seed: int) -> None:
    g = gen(seed)
    params = [torch.randn(3, 5, generator=g), torch.randn(7, generator=g), torch.randn(4, 6, generator=g).t()]
    assert not params[2].is_contiguous()
    total = sum(p.numel() for p in params)
    star = torch.randn(total, generator=g)
    fisher = torch.rand(total, generator=g)
    value, grad, views = _core.penalty(params, star, fisher, 3.5)
    assert value.dim() == 0 and value.dtype == torch.float32
    assert grad.shape == (total,) and grad.dtype == torch.float32
    assert [v.shape for v in views] == [p.shape for p in params]
    torch.testing.assert_close(torch.cat([v.reshape(-1) for v in views]), grad, rtol=0, atol=0)
    out = torch.full((total,), float("nan"))
    _, grad2, _ = _core.penalty(params, star, fisher, 3.5, out)
    assert grad2.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, grad, rtol=0, atol=0)
    theta = torch.cat([p.reshape(-1) for p in params]).double()
    d = theta - star.double()
    ref = 0.5 * 3.5 * float((fisher.double() * d * d).sum())
    assert rel(float(value), ref) <= TOL, f"seed={seed}"
    torch.testing.assert_close(grad.double(), 3.5 * fisher.double() * d, rtol=1e-6, atol=1e-6)
    for dtype in (torch.float16, torch.bfloat16):
        _, gr, _ = _core.penalty([p.to(dtype) for p in params], star, fisher, 3.5)
        assert gr.dtype == dtype
    _, gr, _ = _core.penalty(params, star.bfloat16(), fisher.bfloat16(), 3.5)
    assert gr.dtype == torch.float32


@pytest.mark.parametrize("case", ["too short", "wrong dtype", "slice of another tensor"])
def test_core_penalty_rejects_bad_out(case: str) -> None:
    p = [torch.zeros(3), torch.zeros(2, 2)]
    s, f = torch.zeros(7), torch.ones(7)
    out = {"too short": torch.zeros(6), "wrong dtype": torch.zeros(7, dtype=torch.float16),
           "slice of another tensor": torch.zeros(8)[1:]}[case]
    with pytest.raises(ValueError, match="out"):
        _core.penalty(p, s, f, 1.0, out)


@pytest.mark.parametrize("case, exc, word", [
    ("star too long", ValueError, "star"),
    ("fisher too short", ValueError, "fisher"),
    ("star 2-d", ValueError, "star"),
    ("star on another device", ValueError, "star"),
    ("fisher on another device", ValueError, "fisher"),
    ("params on two devices", ValueError, "params"),
    ("params of two dtypes", ValueError, "params"),
    ("int params", TypeError, "params"),
    ("float64 params", TypeError, "params"),
    ("int star", TypeError, "star"),
    ("int fisher", TypeError, "fisher"),
    ("float16 star", TypeError, "star"),
    ("star float32, fisher bfloat16", TypeError, "fisher"),
    ("no params", ValueError, "params"),
])
def test_core_penalty_rejects_bad_buffers(case: str, exc: type, word: str) -> None:
    p = [torch.zeros(3), torch.zeros(2, 2)]
    s, f = torch.zeros(7), torch.ones(7)
    meta = torch.device("meta")
    args: dict[str, tuple] = {
        "star too long": (p, torch.zeros(8), f),
        "fisher too short": (p, s, torch.ones(6)),
        "star 2-d": (p, torch.zeros(7, 1), f),
        "star on another device": (p, torch.zeros(7, device=meta), f),
        "fisher on another device": (p, s, torch.ones(7, device=meta)),
        "params on two devices": ([p[0], torch.zeros(2, 2, device=meta)], s, f),
        "params of two dtypes": ([p[0], p[1].half()], s, f),
        "int params": ([q.int() for q in p], s, f),
        "float64 params": ([q.double() for q in p], s, f),
        "int star": (p, s.long(), f),
        "int fisher": (p, s, f.int()),
        "float16 star": (p, s.half(), f.half()),
        "star float32, fisher bfloat16": (p, s, f.bfloat16()),
        "no params": ([], torch.zeros(0), torch.zeros(0)),
    }
    with pytest.raises(exc, match=word):
        _core.penalty(*args[case], 1.0)


def test_public_api() -> None:
    assert {"EWC", "fisher_diag"} <= set(ewc_rs.__all__)


def test_norm_stats_two_ewc_objects_on_one_model(seed: int) -> None:
    """Two freezing EWC objects on one model (e.g. a fresh one given the other's state) nest their
    hooks; ``module.training`` must still read as set outside the forward."""
    model, batches = task_model("mlp_bn", seed)
    a = EWC(model, lam=1.0)
    a.consolidate(batches())
    b = EWC(model, lam=1.0)
    b.load_state_dict(a.state_dict())
    model.train()
    s = _bn_stats(model)
    model(batches(1)[0][0])
    assert all(m.training for m in model.modules()), "training flag lost with two EWC objects"
    assert _stats_equal(s, _bn_stats(model))
    model.eval()
    model(batches(1)[0][0])
    assert not any(m.training for m in model.modules())


def test_norm_stats_restored_when_forward_raises(seed: int) -> None:
    model, batches = task_model("mlp_bn", seed)
    ewc = EWC(model, lam=1.0)
    ewc.consolidate(batches())
    model.train()
    with pytest.raises(RuntimeError):
        model[3](torch.randn(3, 5))  # wrong width for BatchNorm1d(12)
    assert all(m.training for m in model.modules()), "a failed forward left a layer in eval mode"


def test_stored_state_is_constant(seed: int) -> None:
    """F and θ* in the state never require grad nor hold a graph (raw_params uses the fallback)."""
    model, ewc, _, batches = _consolidated("raw_params", seed)
    returned = ewc.consolidate(batches())
    assert not any(f.requires_grad for f in returned.values())
    for pair in ewc.state_dict()["pairs"]:
        for d in pair.values():
            assert not any(t.requires_grad or t.grad_fn is not None for t in d.values())
    sd = ewc.state_dict()
    sd["pairs"][0]["fisher"] = {n: t.clone().requires_grad_() for n, t in sd["pairs"][0]["fisher"].items()}
    fresh = EWC(model, lam=1.0)
    fresh.load_state_dict(sd)
    assert not any(t.requires_grad for t in fresh.state_dict()["pairs"][0]["fisher"].values())


def test_large_parameters_value_precision(seed: int) -> None:
    """Realistic layer sizes (two 512x512 weights, 2.6e5 elements each): the float32 value still
    within 1e-5 of the float64 formula (a single float32 accumulator over 65536-element chunks
    is not: about 1e-5 there)."""
    g = gen(seed)
    model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 512))
    star = {n: p.detach() + 0.05 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    fisher = {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}
    ewc = EWC(model, lam=1.0)
    ewc.load_state_dict(fisher_state(model, star, fisher, 7.0))
    value, grads = ewc_value_and_grads(model, ewc)
    ref_value, ref_grads = naive_value_and_grads(model, [(star, fisher)], 7.0)
    err_v, err_g = rel(float(value), ref_value), relative_error(grads, ref_grads)
    print(f"seed={seed}: 2 x 262144 elements: value rel. error {err_v:.2e}, gradient {err_g:.2e}")
    assert err_g <= TOL, f"seed={seed}: gradient relative error {err_g:.3g}"
    assert err_v <= TOL, f"seed={seed}: value relative error {err_v:.3g}"


# --------------------------------------------------------------------------------------------------
# 13. gradient buffer reuse and the direct (no-autograd) path
# --------------------------------------------------------------------------------------------------
def _consolidated_mlp(seed: int) -> tuple[nn.Module, EWC, torch.Generator, list[Pair]]:
    """``_consolidated("mlp_bn")`` with a random λ, and a generator for further perturbations."""
    lam = float(torch.empty(()).uniform_(1.0, 100.0, generator=gen(seed + 2)))
    model, ewc, pairs, _ = _consolidated("mlp_bn", seed, lam=lam)
    return model, ewc, gen(seed + 3), pairs


def test_reused_buffer_never_overwrites_a_gradient_still_held(seed: int) -> None:
    """The flat gradient buffer is reused across steps only when nothing holds its views: a
    ``.grad`` kept by the caller after ``zero_grad()`` must keep its values."""
    model, ewc, g, pairs = _consolidated_mlp(seed)
    for step in range(4):
        perturb(model, g)
        model.zero_grad(set_to_none=True)
        ewc.penalty(model).backward()
        held = {n: p.grad for n, p in model.named_parameters()}  # the views themselves
        copies = {n: t.clone() for n, t in held.items()}
        _, ref = naive_value_and_grads(model, pairs, ewc.lam)
        assert relative_error(copies, ref) <= TOL, f"seed={seed}, step {step}"
        model.zero_grad(set_to_none=True)
        perturb(model, g)
        ewc.penalty(model).backward()  # must not write into the held tensors
        for n in held:
            assert torch.equal(held[n], copies[n]), f"seed={seed}, step {step}: held .grad of '{n}' changed"


def test_zero_grad_in_place_loop_stays_correct(seed: int) -> None:
    """``zero_grad(set_to_none=False)`` keeps the first step's views as ``.grad`` for good: every
    later step must still add the right gradient to them."""
    model, ewc, g, pairs = _consolidated_mlp(seed)
    for step in range(4):
        perturb(model, g)
        model.zero_grad(set_to_none=False)
        ewc.penalty(model).backward()
        _, ref = naive_value_and_grads(model, pairs, ewc.lam)
        err = relative_error(grads_of(model), ref)
        assert err <= TOL, f"seed={seed}, step {step}: relative error {err:.3g}"


def test_two_penalties_alive_at_once(seed: int) -> None:
    """Two penalty graphs built before either backward (e.g. two losses) own distinct buffers."""
    model, ewc, g, pairs = _consolidated_mlp(seed)
    perturb(model, g)
    model.zero_grad(set_to_none=True)
    a = ewc.penalty(model)
    b = ewc.penalty(model)
    (a + 2.0 * b).backward()
    _, ref = naive_value_and_grads(model, pairs, ewc.lam)
    err = relative_error(grads_of(model), {n: 3.0 * t for n, t in ref.items()})
    assert err <= TOL, f"seed={seed}: relative error {err:.3g}"


def test_penalty_under_no_grad_is_a_value(seed: int) -> None:
    model, ewc, g, pairs = _consolidated_mlp(seed)
    perturb(model, g)
    with torch.no_grad():
        value = ewc.penalty(model)
    assert not value.requires_grad
    ref, _ = naive_value_and_grads(model, pairs, ewc.lam)
    assert rel(float(value), ref) <= TOL, f"seed={seed}"
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "2", True, None])
def test_backward_rejects_bad_grad_scale(bad: Any, seed: int) -> None:
    model, ewc, _, _ = _consolidated_mlp(seed)
    with pytest.raises(ValueError, match="grad_scale"):
        ewc.backward(model, grad_scale=bad)
    assert all(p.grad is None for p in model.parameters())


def test_backward_before_consolidate_adds_nothing(seed: int) -> None:
    model, _ = task_model("mlp_bn", seed)
    ewc = EWC(model, lam=3.0)
    value = ewc.backward(model)
    assert float(value) == 0.0 and all(p.grad is None for p in model.parameters())


def test_backward_leaves_other_models_parameters_alone(seed: int) -> None:
    """A mismatching model raises before any ``.grad`` is touched."""
    model, ewc, _, _ = _consolidated_mlp(seed)
    other = nn.Sequential(nn.Linear(16, 3))
    with pytest.raises(ValueError, match="parameter"):
        ewc.backward(other)
    assert all(p.grad is None for p in other.parameters())


def test_buffer_is_reused_once_released(seed: int) -> None:
    """The performance contract behind the CPU penalty: after ``zero_grad()`` released the
    views, the next step writes into the same memory (no fresh, page-faulting allocation)."""
    model, ewc, g, _ = _consolidated_mlp(seed)
    addresses = []
    for _ in range(3):
        perturb(model, g)
        model.zero_grad(set_to_none=True)
        ewc.penalty(model).backward()
        addresses.append(next(model.parameters()).grad.data_ptr())  # type: ignore[union-attr]
    model.zero_grad(set_to_none=True)
    assert addresses[1] == addresses[2], f"seed={seed}: gradient buffer not reused"


def test_backward_flat_buffer_branch_matches(seed: int) -> None:
    """``ewc.backward`` on devices other than CPU takes the flat-buffer branch (penalty, then one
    multi-tensor add). No GPU here: the branch is forced on CPU tensors to check its logic."""
    model, ewc, g, pairs = _consolidated_mlp(seed)
    perturb(model, g)
    ref_value, ref = naive_value_and_grads(model, pairs, ewc.lam)
    plan = ewc._plan(model)
    for group in plan.groups:
        group.device = torch.device("meta")  # any non-CPU device type selects the branch
    before = {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    names = list(before)
    for i, (n, p) in enumerate(model.named_parameters()):
        p.grad = None if i % 2 else before[n].clone()  # half the .grad absent, half present
    value = plan.add_to_grads(ewc.lam, 2.0)
    assert rel(float(value), ref_value) <= TOL, f"seed={seed}"
    expected = {n: 2.0 * ref[n] + (0 if i % 2 else before[n]) for i, n in enumerate(names)}
    err = relative_error(grads_of(model), expected)
    assert err <= TOL, f"seed={seed}: relative error {err:.3g}"
    model.zero_grad(set_to_none=True)
