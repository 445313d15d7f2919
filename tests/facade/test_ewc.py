"""Tests of the ``EWC`` class's API against the pure-PyTorch reference: value and gradient in both
modes, ``params=`` selection, model changes, dtype and device moves, bad arguments, second
derivatives, bfloat16 storage and the direct path's arguments.

Every random input is drawn fresh on each run; the seed is printed and is part of every assertion
message. Re-run a failure with ``EWC_RS_TEST_SEED=<seed>``. The reference is ``naive_penalty`` from
``tests/helpers/reference.py``: (λ/2) Σ_i F_i (θ_i − θ*_i)² with ordinary torch ops in float64. Shared
helpers are in ``tests/helpers/ewc_helpers.py``.
"""

from __future__ import annotations

import copy
import math
import pickle
import re
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ewc_rs
from ewc_helpers import (
    TOL,
    Pair,
    consolidated_mlp,
    consolidated_model,
    ewc_value_and_grads,
    fisher_of,
    gen,
    grads_of,
    naive_value_and_grads,
    perturb,
    rel,
    snapshot,
    task_model,
)
from ewc_rs import EWC
from reference import relative_error

pytestmark = pytest.mark.core

BF16_U = 2.0**-8  # unit roundoff of bfloat16: 8 significant bits (7 stored), round to nearest


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


def check_direct_backward(
    model: nn.Module,
    ewc: EWC,
    ref_value: float,
    ref_grads: dict[str, Tensor],
    consolidated: set[str],
    before: dict[str, Tensor],
    msg: str,
) -> None:
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
            torch.testing.assert_close(
                returned[n],
                fisher[n],
                rtol=1e-6,
                atol=0.0,
                msg=lambda m: f"seed={seed}: consolidate() return value: {m}",
            )
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
        f_online = {n: (gamma * f_online[n].double() if n in f_online else 0.0) + f_new[n].double() for n in f_new}
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
    assert ewc.penalty().dim() == 0 and ewc.num_tasks == 0
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


@pytest.mark.parametrize("selector", ["^nothing$", re.compile("^zzz"), [], ["not.a.param"], lambda n, p: False])
def test_params_selection_matching_nothing(selector: Any) -> None:
    model, batches = task_model("cnn", 0)
    ewc = EWC(model, lam=1.0, params=selector)
    with pytest.raises(ValueError, match="params"):
        ewc.consolidate(batches())
    assert ewc.num_tasks == 0


@pytest.mark.parametrize("selector", [None, r"^[1-6]\.", re.compile(r"^[1-6]\."), list(BODY)])
def test_ewc_pickles_with_its_selection(selector: Any, seed: int) -> None:
    """An EWC object crosses process boundaries (Lightning's ddp_spawn, torch.multiprocessing pickle
    it): the copy keeps the selection and gives the same penalty."""
    model, batches = task_model("mlp_bn", seed)
    ewc = EWC(model, lam=5.0, params=selector)
    ewc.consolidate(batches())
    perturb(model, gen(seed))
    want = float(ewc.penalty(model).detach())  # with its penalty plan built
    copied_model, copied = pickle.loads(pickle.dumps((model, ewc)))
    got = float(copied.penalty(copied_model).detach())
    assert math.isclose(got, want, rel_tol=1e-6), f"seed={seed}: penalty {got} after pickling, {want} before"
    assert want > 0, f"seed={seed}: the perturbed model has no penalty"


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
def test_double_model_is_rejected_clearly(seed: int) -> None:
    """The core supports float32/float16/bfloat16 parameters only: float64 raises (no wrong number)."""
    model, ewc, _, _ = consolidated_model("cnn", seed)
    model.double()
    with pytest.raises(TypeError, match="params.*float32"):
        ewc.penalty(model)
    model.float()
    assert ewc.penalty(model).item() > 0


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
def test_half_precision_model_after_consolidation(dtype: torch.dtype, tol: float, seed: int) -> None:
    model, ewc, _, _ = consolidated_model("mlp_bn", seed)
    v32, g32 = ewc_value_and_grads(model, ewc)
    model.to(dtype)
    v16, g16 = ewc_value_and_grads(model, ewc)
    assert v16.dtype == torch.float32 and all(g.dtype == dtype for g in g16.values())
    err_v, err_g = rel(float(v16), float(v32)), relative_error(g16, g32)
    print(f"seed={seed}: {dtype} model vs float32: value {err_v:.2e}, gradient {err_g:.2e}")
    assert err_v <= tol and err_g <= tol, f"seed={seed}: {dtype}: value {err_v:.3g}, grad {err_g:.3g}"


def test_parameters_retyped_after_a_step_are_followed(seed: int) -> None:
    """After steps on the cached plan, one layer (then the whole model) changes dtype: the plan
    sees it (a one-group plan through the Rust pass's refusal) and both paths match the naive
    penalty of the retyped model; a genuine error still raises."""
    model, ewc, pairs, _ = consolidated_model("mlp_bn", seed)
    ewc_value_and_grads(model, ewc)
    model.zero_grad(set_to_none=False)
    ewc.backward(model)  # the plan and its buffer exist
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    # The naive penalty of the retyped model rounds as ours does: 150 draws differed by ≤ 2.5e-5.
    for change in (lambda: first.to(torch.bfloat16), lambda: model.to(torch.float16)):
        change()
        want, want_grads = naive_value_and_grads(model, pairs, 100.0)
        value, grads = ewc_value_and_grads(model, ewc)
        assert rel(float(value), want) <= 5e-3, f"seed={seed}"
        assert relative_error(grads, want_grads) <= 5e-3, f"seed={seed}"
        model.zero_grad(set_to_none=True)
        assert rel(float(ewc.backward(model)), want) <= 5e-3, f"seed={seed}"
        assert relative_error(grads_of(model), want_grads) <= 5e-3, f"seed={seed}"
    model.float()
    first.weight.data = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="model: parameter"):
        ewc.penalty(model)


def test_ewc_to_cpu(seed: int) -> None:
    model, ewc, pairs, _ = consolidated_model("cnn", seed)
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
    model, ewc, pairs, _ = consolidated_model("mlp_bn", seed)
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
# 6. bad constructor arguments
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, arg",
    [
        ({"lam": -1.0}, "lam"),
        ({"lam": math.nan}, "lam"),
        ({"lam": math.inf}, "lam"),
        ({"lam": True}, "lam"),
        ({"lam": "1"}, "lam"),
        ({"lam": None}, "lam"),
        ({"lam": 1.0, "gamma": -0.1}, "gamma"),
        ({"lam": 1.0, "gamma": 1.01}, "gamma"),
        ({"lam": 1.0, "gamma": math.nan}, "gamma"),
        ({"lam": 1.0, "gamma": False}, "gamma"),
        ({"lam": 1.0, "mode": "sum"}, "mode"),
        ({"lam": 1.0, "mode": None}, "mode"),
        ({"lam": 1.0, "norm_stats": "keep"}, "norm_stats"),
        ({"lam": 1.0, "storage_dtype": torch.float16}, "storage_dtype"),
        ({"lam": 1.0, "storage_dtype": torch.float64}, "storage_dtype"),
        ({"lam": 1.0, "storage_dtype": "bfloat16"}, "storage_dtype"),
    ],
)
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


def test_public_api() -> None:
    assert {"EWC", "fisher_diag"} <= set(ewc_rs.__all__)


# --------------------------------------------------------------------------------------------------
# 7. second derivative, retained graph, autocast
# --------------------------------------------------------------------------------------------------
def test_second_derivative_raises(seed: int) -> None:
    model, ewc, pairs, batches = consolidated_model("cnn", seed)
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
    model, ewc, _, batches = consolidated_model("cnn", seed)
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
    model, ewc, pairs, _ = consolidated_model("cnn", seed)
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
    model, ewc, _, batches = consolidated_model("mlp_bn", seed)
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
# 8. bfloat16 storage
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
    for key in ("diagonal", "star"):
        assert all(t.dtype == torch.bfloat16 for t in state["tasks"][0][key].values())
    # each stored θ*_i and F_i is off by at most u = 2⁻⁸ of its magnitude (as the EWC docstring says)
    star = snapshot(model)
    for n in star:
        for exact, stored in ((star[n], state["tasks"][0]["star"][n]), (f32[n], state["tasks"][0]["diagonal"][n])):
            normal = exact.abs() >= torch.finfo(torch.bfloat16).tiny
            err = ((stored.double() - exact.double()).abs() / exact.double().abs())[normal]
            assert err.numel() == 0 or float(err.max()) <= BF16_U, f"seed={seed}: '{n}' rounding {float(err.max())}"

    perturb(model, g, scale=0.05)
    v32, g32 = ewc_value_and_grads(model, ewc32)
    v16, g16 = ewc_value_and_grads(model, ewc16)
    err_v, err_g = rel(float(v16), float(v32)), relative_error(g16, g32)

    p0 = sum(
        float((f32[n].double() * (p.detach().double() - star[n].double()) ** 2).sum())
        for n, p in model.named_parameters()
    )
    e = sum(float((f32[n].double() * (BF16_U * star[n].double()) ** 2).sum()) for n in star)
    bound_v = BF16_U + (1 + BF16_U) * (2 * math.sqrt(e * p0) + e) / p0 + 1e-6
    num = math.sqrt(sum(float((f32[n].double() * BF16_U * star[n].double()).pow(2).sum()) for n in star))
    den = math.sqrt(
        sum(
            float((f32[n].double() * (p.detach().double() - star[n].double())).pow(2).sum())
            for n, p in model.named_parameters()
        )
    )
    bound_g = BF16_U + (1 + BF16_U) * num / den + 1e-6
    print(
        f"seed={seed}: bfloat16 storage vs float32 after drift 0.05: value rel. error {err_v:.2e} "
        f"(bound {bound_v:.2e}), gradient rel. error {err_g:.2e} (bound {bound_g:.2e})"
    )
    assert err_v <= bound_v and err_v <= 2e-2, f"seed={seed}: value error {err_v:.3g} > bound {bound_v:.3g}"
    assert err_g <= bound_g and err_g <= 2e-2, f"seed={seed}: gradient error {err_g:.3g} > bound {bound_g:.3g}"
    assert all(g16[n].dtype == torch.float32 for n in g16)  # gradients follow the parameters


# --------------------------------------------------------------------------------------------------
# 9. the direct (no-autograd) path: arguments and edge cases
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "2", True, None])
def test_backward_rejects_bad_grad_scale(bad: Any, seed: int) -> None:
    model, ewc, _, _ = consolidated_mlp(seed)
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
    model, ewc, _, _ = consolidated_mlp(seed)
    other = nn.Sequential(nn.Linear(16, 3))
    with pytest.raises(ValueError, match="parameter"):
        ewc.backward(other)
    assert all(p.grad is None for p in other.parameters())
