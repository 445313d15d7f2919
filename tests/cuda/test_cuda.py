"""The one-pass CUDA penalty kernel (docs/how-to/cuda.md, docs/explanation/penalty.md).

Without a GPU only the first section runs: NVRTC compiles the kernel source for the architectures
we target (torch's CUDA wheels ship NVRTC; a CPU-only torch skips, saying so), and the switch. The
rest runs on a GPU (``make gpu-check``) and compares against a float64 reference computed on CPU
from the same values: every parameter/storage dtype pair, tensors of every size class and more
tensors than one launch table holds, gradients written or added into ``.grad``, torch's current
stream (a non-default one), autocast, a model spread over CPU and GPU, and the libtorch fallback.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

import ewc_rs
from ewc_helpers import consolidated_model, ewc_value_and_grads, fisher_state, naive_value_and_grads, rel
from ewc_rs import EWC, _core, cuda_kernel
from reference import relative_error

pytestmark = pytest.mark.core

# --------------------------------------------------------------------------------------------------
# 1. without a GPU: the source compiles, the switch works
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cc", [75, 80, 86, 89, 90])
def test_kernel_source_compiles_with_nvrtc(cc: int) -> None:
    if cuda_kernel.nvrtc_dir() is None:
        pytest.skip("torch ships no NVRTC here (a CPU-only torch build): nothing to compile with")
    what, size = cuda_kernel.compile_check(cc)
    assert what.startswith(f"sm_{cc} cubin (NVRTC "), what
    assert size > 10_000, (what, size)


def test_switch_returns_previous_setting_and_checks_its_type() -> None:
    before = cuda_kernel.set_enabled(False)
    try:
        with cuda_kernel.disabled():
            assert cuda_kernel.set_enabled(False) is False
        assert cuda_kernel.set_enabled(True) is False
        with cuda_kernel.disabled():
            pass
        assert cuda_kernel.set_enabled(True) is True, "disabled() restores the setting"
        with pytest.raises(TypeError, match="on: expected a bool"):
            cuda_kernel.set_enabled(1)  # type: ignore[arg-type]
    finally:
        cuda_kernel.set_enabled(before)


# --------------------------------------------------------------------------------------------------
# 2. on a GPU
# --------------------------------------------------------------------------------------------------
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU (torch.cuda.is_available() is False)")
DEV = torch.device("cuda")


@pytest.fixture
def kernel_on() -> Iterator[None]:
    before = cuda_kernel.set_enabled(True)
    yield
    cuda_kernel.set_enabled(before)


def draw(shapes: list[tuple[int, ...]], dtype: torch.dtype, storage: torch.dtype, g: torch.Generator):
    """Parameters (in ``dtype``) and flat θ*, F (in ``storage``), drawn on CPU, moved to the GPU."""
    params = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    total = sum(p.numel() for p in params)
    star = (torch.cat([p.float().reshape(-1) for p in params]) + 0.1 * torch.randn(total, generator=g)).to(storage)
    fisher = torch.rand(total, generator=g).to(storage)
    return [p.to(DEV) for p in params], star.to(DEV), fisher.to(DEV)


def reference(params: list[torch.Tensor], star: torch.Tensor, fisher: torch.Tensor, lam: float):
    """(λ/2) Σ F d² and λ F d in float64 on CPU, from the values the kernel reads."""
    theta = torch.cat([p.detach().cpu().double().reshape(-1) for p in params])
    d = theta - star.cpu().double()
    f = fisher.cpu().double()
    return float(0.5 * lam * (f * d * d).sum()), lam * f * d


def grad_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.cpu().double() - want).abs().max() / want.abs().max().clamp_min(1e-30))


TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}  # one rounding of the gradient
SHAPES = [(3, 5), (0,), (7,), (2048,), (2049,), (70_001,), (64, 3, 3, 3), (1,)]


@needs_gpu
@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
def test_kernel_matches_reference(dtype: torch.dtype, storage: torch.dtype, seed: int, kernel_on: None) -> None:
    g = torch.Generator().manual_seed(seed)
    params, star, fisher = draw(SHAPES, dtype, storage, g)
    lam = float(torch.empty(()).uniform_(0.5, 50.0, generator=g))
    value, flat, views = _core.penalty(params, star, fisher, lam)
    assert cuda_kernel.status().startswith("kernel "), cuda_kernel.status()
    want, grad = reference(params, star, fisher, lam)
    assert value.device == DEV and value.dtype == torch.float32 and value.dim() == 0
    assert rel(float(value), want) <= 1e-5, (seed, float(value), want)
    assert flat.dtype == dtype and grad_error(flat, grad) <= TOL[dtype], (seed, grad_error(flat, grad))
    assert [tuple(v.shape) for v in views] == SHAPES


@needs_gpu
def test_more_tensors_than_one_launch_table(seed: int, kernel_on: None) -> None:
    g = torch.Generator().manual_seed(seed)
    shapes = [(int(torch.randint(1, 300, (), generator=g)),) for _ in range(2000)]  # 3 launches of 680
    params, star, fisher = draw(shapes, torch.float32, torch.float32, g)
    value, flat, _ = _core.penalty(params, star, fisher, 3.0)
    want, grad = reference(params, star, fisher, 3.0)
    assert rel(float(value), want) <= 1e-5 and grad_error(flat, grad) <= 1e-6, seed


@needs_gpu
def test_gradients_added_into_grad_in_the_same_pass(seed: int, kernel_on: None) -> None:
    g = torch.Generator().manual_seed(seed)
    params, star, fisher = draw([(40, 30), (30,), (17,), (5, 5)], torch.float32, torch.float32, g)
    for p in params[:3]:
        p.requires_grad_(True)
    before = torch.randn(40, 30, generator=g).to(DEV)
    params[0].grad = before.clone()  # added to in place
    params[2].grad = torch.zeros(34, device=DEV)[::2]  # not contiguous: handed back
    # params[1] has no .grad (handed back); params[3] does not require grad (gets nothing)
    value, pending = _core.penalty_add_to_grads(params, star, fisher, 2.0, 0.5)
    want, grad = reference(params, star, fisher, 2.0)
    parts = torch.split(grad * 0.5, [p.numel() for p in params])
    assert rel(float(value), want) <= 1e-5, seed
    assert grad_error(params[0].grad - before, parts[0].reshape(40, 30)) <= 1e-5, seed
    assert [i for i, _ in pending] == [1, 2]
    for i, t in pending:
        assert grad_error(t, parts[i].reshape(params[i].shape)) <= 1e-6, (seed, i)
    assert params[3].grad is None


def coded(
    shapes: list[tuple[int, ...]], g: torch.Generator, block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8-bit F of each shape (values over 30 binades) coded on CPU, moved to the GPU: codes,
    scales and the decoded F the kernel must read."""
    codes, scales, decoded = [], [], []
    for s in shapes:
        f = torch.exp2(torch.rand(s, generator=g) * 30 - 28)
        c, sc = _core.fisher8_quantize(f, block, 24.0)
        codes.append(c)
        scales.append(sc)
        decoded.append(_core.fisher8_dequantize(c, sc, block))
    return torch.cat(codes).to(DEV), torch.cat(scales).to(DEV), torch.cat(decoded)


@needs_gpu
@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
def test_kernel_reads_eight_bit_fisher_as_its_decoded_values(
    dtype: torch.dtype, storage: torch.dtype, seed: int, kernel_on: None
) -> None:
    g = torch.Generator().manual_seed(seed)
    params, star, _ = draw(SHAPES, dtype, storage, g)
    codes, scales, decoded = coded(SHAPES, g, 64)
    value, flat, _ = _core.penalty(params, star, codes, 2.0, fisher_code=(scales, 64))
    assert cuda_kernel.status().startswith("kernel "), cuda_kernel.status()
    want, grad = reference(params, star, decoded, 2.0)
    assert rel(float(value), want) <= 1e-5, (seed, float(value), want)
    assert grad_error(flat, grad) <= TOL[dtype], (seed, grad_error(flat, grad))
    params[0].requires_grad_(True)
    params[0].grad = torch.zeros_like(params[0])
    value, pending = _core.penalty_add_to_grads(params, star, codes, 2.0, 1.0, fisher_code=(scales, 64))
    assert rel(float(value), want) <= 1e-5, seed
    first = grad[: params[0].numel()].reshape(params[0].shape)
    assert grad_error(params[0].grad, first) <= TOL[dtype], seed


@needs_gpu
def test_ewc_with_eight_bit_fisher_on_gpu_matches_the_cpu(seed: int, kernel_on: None) -> None:
    model, ewc, pairs, _ = consolidated_model("mlp_bn", seed, fisher_bits=8)
    value, grads = ewc_value_and_grads(model, ewc)
    model.cuda()
    ewc.to("cuda")
    on_gpu, gpu_grads = ewc_value_and_grads(model, ewc)
    assert cuda_kernel.status().startswith("kernel "), cuda_kernel.status()
    assert rel(float(on_gpu), float(value)) <= 1e-5, seed
    assert relative_error({n: t.cpu() for n, t in gpu_grads.items()}, grads) <= 1e-5, seed


def model_on_gpu(seed: int) -> tuple[nn.Module, EWC, float, dict[str, torch.Tensor]]:
    """A consolidated, perturbed model moved to the GPU with its EWC, and the naive penalty's value
    and gradients computed on CPU before the move."""
    model, ewc, pairs, _ = consolidated_model("mlp_bn", seed)
    want, want_grads = naive_value_and_grads(model, pairs, 100.0)
    model.cuda()
    ewc.to("cuda")
    return model, ewc, want, want_grads


@needs_gpu
def test_ewc_penalty_and_backward_match_the_naive_formula_on_gpu(seed: int, kernel_on: None) -> None:
    model, ewc, want, want_grads = model_on_gpu(seed)
    value, grads = ewc_value_and_grads(model, ewc)
    assert cuda_kernel.status().startswith("kernel "), cuda_kernel.status()
    assert rel(float(value), want) <= 1e-5, seed
    assert relative_error({n: t.cpu() for n, t in grads.items()}, want_grads) <= 1e-5, seed
    model.zero_grad(set_to_none=False)  # .grad exists: the kernel adds into it
    direct = ewc.backward(model)
    got = {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}
    assert rel(float(direct), want) <= 1e-5
    assert relative_error(got, {n: want_grads[n] for n in got}) <= 1e-5, seed


@needs_gpu
def test_runs_on_torchs_current_stream(seed: int, kernel_on: None) -> None:
    """On a side stream, θ is overwritten after a long sleep and the penalty queued behind it: the
    kernel sees the new θ only if it runs on that stream (the default stream would not wait)."""
    g = torch.Generator().manual_seed(seed)
    params, star, fisher = draw([(1000, 100)], torch.float32, torch.float32, g)
    new = torch.randn(1000, 100, generator=g).to(DEV)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # about 0.1 s
        params[0].copy_(new)
        value, flat, _ = _core.penalty(params, star, fisher, 1.0)
    side.synchronize()
    want, grad = reference([new], star, fisher, 1.0)
    assert rel(float(value), want) <= 1e-5 and grad_error(flat, grad) <= 1e-6, seed


@needs_gpu
def test_under_autocast_bf16(seed: int, kernel_on: None) -> None:
    model, ewc, want, want_grads = model_on_gpu(seed)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        value = ewc.penalty(model)
    assert value.dtype == torch.float32 and rel(float(value), want) <= 1e-5, seed
    value.backward()
    got = {n: p.grad.cpu() for n, p in model.named_parameters()}
    assert relative_error(got, want_grads) <= 1e-5, seed


class Spread(nn.Module):
    """Two layers on CPU, one on the GPU (e.g. an offloaded embedding)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3).to(DEV)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)).to(DEV))


@needs_gpu
def test_model_spread_over_cpu_and_gpu(seed: int, kernel_on: None) -> None:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Spread()
    named = dict(model.named_parameters())
    star = {n: p.detach().cpu() + 0.1 * torch.randn(p.shape, generator=g) for n, p in named.items()}
    fisher = {n: torch.rand(p.shape, generator=g) for n, p in named.items()}
    ewc = EWC(model, lam=10.0)
    ewc.load_state_dict(fisher_state(model, star, fisher, 10.0))
    value, grads = ewc_value_and_grads(model, ewc)
    want = 0.0
    for n, p in named.items():
        d = p.detach().cpu().double() - star[n].double()
        want += float(5.0 * (fisher[n].double() * d * d).sum())
        assert grads[n].device == p.device, n
        assert grad_error(grads[n], 10.0 * fisher[n].double() * d) <= 1e-5, (seed, n)
    assert rel(float(value), want) <= 1e-5, seed
    model.zero_grad(set_to_none=True)
    assert rel(float(ewc.backward(model)), want) <= 1e-5, seed
    for n, p in named.items():
        d = p.detach().cpu().double() - star[n].double()
        assert p.grad is not None and grad_error(p.grad, 10.0 * fisher[n].double() * d) <= 1e-5, (seed, n)


@needs_gpu
def test_fallback_gives_the_same_figures_and_says_why(seed: int, kernel_on: None) -> None:
    g = torch.Generator().manual_seed(seed)
    params, star, fisher = draw(SHAPES, torch.float32, torch.float32, g)
    value, flat, _ = _core.penalty(params, star, fisher, 4.0)
    with cuda_kernel.disabled():
        v2, f2, _ = _core.penalty(params, star, fisher, 4.0)
        assert "switched off" in cuda_kernel.status(), cuda_kernel.status()
    assert rel(float(v2), float(value)) <= 1e-5 and grad_error(f2, flat.double().cpu()) <= 1e-6, seed
    for p in params[:3]:
        p.requires_grad_(True)
    params[0].grad = torch.ones_like(params[0])
    with cuda_kernel.disabled():  # EWC.backward's path: everything handed back, added by the caller
        v3, pending = _core.penalty_add_to_grads(params, star, fisher, 4.0, 2.0)
    assert rel(float(v3), float(value)) <= 1e-5, seed
    assert [i for i, _ in pending] == [0, 1, 2], "the fallback hands back every gradient"
    parts = torch.split(flat, [p.numel() for p in params])
    for i, t in pending:
        assert grad_error(t, 2.0 * parts[i].reshape(params[i].shape).double().cpu()) <= 1e-6, (seed, i)
    assert torch.equal(params[0].grad, torch.ones_like(params[0])), "the fallback writes no .grad itself"


@needs_gpu
def test_bad_input_is_refused_before_anything_runs() -> None:
    p = [torch.zeros(4, device=DEV)]
    with pytest.raises(ValueError, match="star: expected a tensor on"):
        _core.penalty(p, torch.zeros(4), torch.zeros(4, device=DEV), 1.0)
    with pytest.raises(ValueError, match="fisher: expected a flat buffer of 4"):
        _core.penalty(p, torch.zeros(4, device=DEV), torch.zeros(5, device=DEV), 1.0)
    with pytest.raises(TypeError, match="star/fisher"):
        _core.penalty(p, torch.zeros(4, device=DEV), torch.zeros(4, device=DEV, dtype=torch.bfloat16), 1.0)


def test_version_is_exported() -> None:
    """The module imports with the kernel's bindings on any machine (no CUDA needed to load)."""
    assert {"cuda_kernel_status", "cuda_kernel_set_enabled", "cuda_compile_check"} <= set(dir(_core))
    assert ewc_rs.cuda_kernel.status() in ("unused",) or " on cuda:" in ewc_rs.cuda_kernel.status()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("kind", ["empirical", "exact"])
def test_fisher_under_autocast_bf16(device: str, kind: str, seed: int) -> None:
    """Estimated inside ``torch.autocast(bfloat16)`` (as a training loop under AMP would call
    ``consolidate``): float32 results within bf16's rounding of the float32 estimate."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU (torch.cuda.is_available() is False)")
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).to(device)
    x, y = torch.randn(32, 1, 8, 8, device=device), torch.randint(0, 5, (32,), device=device)
    data = [(x[:16], y[:16]), (x[16:], y[16:])]
    want = ewc_rs.fisher_diag(model, data, kind=kind)
    with torch.autocast(device, dtype=torch.bfloat16):
        got = ewc_rs.fisher_diag(model, data, kind=kind)
    for n, f in got.items():
        assert f.dtype == torch.float32 and f.device == want[n].device, n
        err = float((f - want[n]).norm() / want[n].norm())
        # bfloat16 activations (8 significant bits): on CPU, 400 draws gave median 0.009, largest 0.046.
        assert err <= 0.1, (seed, n, err)


@needs_gpu
def test_captured_in_a_cuda_graph_and_replayed(seed: int, kernel_on: None) -> None:
    """The launches go to the capturing stream with their tables as parameters: a replay computes
    the penalty of the parameters' current values into the same buffers (last: a failed capture
    must not disturb the other tests)."""
    g = torch.Generator().manual_seed(seed)
    params, star, fisher = draw([(300, 7), (1000,), (5,)], torch.float32, torch.float32, g)
    out = torch.empty(star.numel(), device=DEV)
    side = torch.cuda.Stream()  # warm-up (compilation, allocations) off the default stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _core.penalty(params, star, fisher, 2.0, out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        value, flat, _ = _core.penalty(params, star, fisher, 2.0, out)
    for _ in range(2):
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g).to(DEV))
        graph.replay()
        torch.cuda.synchronize()
        want, grad = reference(params, star, fisher, 2.0)
        assert rel(float(value), want) <= 1e-5 and grad_error(flat, grad) <= 1e-6, seed
