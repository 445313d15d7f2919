"""EWC penalty + gradient speed: ewc_rs's fused pass against the seed's loop and the memory floor.

All in one process, side by side, on the same parameters:
- ``seed_loop``: the seed article's penalty, a Python loop of tensor ops per parameter
  (``(lam/2) * (F * (p - star) ** 2).sum()`` summed), then ``backward()``.
- ``ewc_rs``: ``ewc.penalty(model)`` then ``backward()`` (one fused pass, through autograd).
- ``ewc_rs_direct``: ``ewc.backward(model)``, the same gradient added straight into existing
  ``.grad`` tensors (as after the task loss's ``backward()``), no autograd.
- ``kernel``: the raw pass alone, ``_core.penalty(params, θ*, F, λ, out)`` per group of the
  EWC object's cached plan, into a reused output buffer: no autograd, no ``.grad`` handling.
  On CUDA this is the one-pass kernel's own cost, the row to hold against the floor.
- ``libtorch_ops`` (CUDA only, when ``ewc_rs.cuda_kernel`` exists): ``ewc_rs`` under
  ``ewc_rs.cuda_kernel.disabled()``, the previous path (concatenation + elementwise libtorch ops).
- ``engine``: autograd alone: a custom ``Function`` whose backward only hands ready-made
  gradients to the parameters (PyTorch's per-tensor bookkeeping, the bound of any
  autograd-connected penalty).
- ``floor``: ``torch.addcmul(a, b, c, out=d)`` over float32 buffers holding the bytes the
  one-pass penalty must move: Σ params × (param bytes [read θ] + 4 [θ*] + 4 [F] + param bytes
  [write the gradient]), i.e. 16 bytes a parameter in float32, 12 in bfloat16 (θ*, F stay float32,
  EWC's default storage). Each method's time is also given as a ratio to it and as GB/s (floor
  bytes / time).

Before each timed call, untimed, the gradients are reset as a training step's
``optimizer.zero_grad()`` would: to None for the autograd methods, zeroed in place for
``ewc_rs_direct`` (which adds to the task loss's gradients; reading them is one more stream).

Parameter shapes: the seed's MLP, transformer encoders (d_model 64 and 256, 12 layers), ResNet-18
and ResNet-50 (torchvision, untrained), and ``llm_1b``, a 1.0e9-parameter decoder stack (d_model
2048; CUDA default, never in the CPU list). ``--dtype`` sets the parameters' dtype. Prints medians
and ratios; writes ``benchmarks/results/penalty_<device>.json`` (``penalty_<device>_<dtype>.json``
for a dtype other than float32). On CUDA it prints and stores ``ewc_rs.cuda_kernel.status()``.

Usage: ``python benchmarks/bench_penalty.py [--device cpu|cuda] [--dtype float32|bfloat16] [--repeats 30]``
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ewc_rs  # noqa: E402
from common import device_kernel_time, median_time, pipelined_time, write_results  # noqa: E402
from ewc_rs import _core  # noqa: E402
from ewc_rs.demo.models import seed_model  # noqa: E402  (the seed article's MLP)

try:  # the one-pass CUDA kernel's switch and report (absent from older builds)
    from ewc_rs import cuda_kernel  # type: ignore[attr-defined]
except ImportError:
    cuda_kernel = None

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
STORAGE_BYTES = 4 + 4  # θ* and F per parameter, float32
METHODS = ("seed_loop", "ewc_rs", "ewc_rs_direct", "kernel", "libtorch_ops", "engine", "floor")


def transformer(d_model: int) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        layer = nn.TransformerEncoderLayer(d_model, 4, dim_feedforward=4 * d_model, batch_first=True)
        return nn.TransformerEncoder(layer, 12, enable_nested_tensor=False)

    return make


def resnet(depth: int) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, f"resnet{depth}")(weights=None)

    return make


def gpt2(tiny: bool) -> Callable[[], nn.Module]:
    """GPT-2 small's shapes (124M parameters, tied embeddings) from its config, or a tiny one."""

    def make() -> nn.Module:
        import transformers

        kw: dict[str, Any] = dict(n_layer=2, n_head=2, n_embd=64, vocab_size=500, n_positions=32) if tiny else {}
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(**kw))

    return make


class DecoderBlock(nn.Module):
    """The parameters of a pre-norm decoder block: q/k/v/o projections, a 4× MLP, two LayerNorms.

    Only the shapes matter here (the penalty never runs the model), so there is no forward.
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.q, self.k, self.v, self.o = (nn.Linear(d_model, d_model) for _ in range(4))
        self.norm2 = nn.LayerNorm(d_model)
        self.up = nn.Linear(d_model, 4 * d_model)
        self.down = nn.Linear(4 * d_model, d_model)


def llm_1b() -> nn.Module:
    """A 1.02e9-parameter decoder's parameters: 32000×2048 embedding, 19 blocks of d_model 2048
    (12·d² each), final LayerNorm; 307 tensors. Built on the current default device (the caller
    wraps it in ``with torch.device(device):``), so on a GPU its init runs there."""
    d_model = 2048
    return nn.ModuleDict(
        {
            "embed": nn.Embedding(32000, d_model),
            "blocks": nn.ModuleList(DecoderBlock(d_model) for _ in range(19)),
            "norm": nn.LayerNorm(d_model),
        }
    )


MODELS: dict[str, Callable[[], nn.Module]] = {
    "seed_mlp": seed_model,
    "transformer_d64x12": transformer(64),
    "transformer_d256x12": transformer(256),
    "resnet18": resnet(18),
    "resnet50": resnet(50),
    # Run by benchmarks/bench_llm.py (needs transformers), not by default here.
    "gpt2_small": gpt2(tiny=False),
    "gpt2_tiny": gpt2(tiny=True),
    # 1e9 parameters: the CUDA default, never the CPU one (16 GB of θ, θ*, F, gradient in float32).
    "llm_1b": llm_1b,
}
DEFAULT_MODELS = {
    "cpu": ["seed_mlp", "transformer_d64x12", "transformer_d256x12", "resnet18", "resnet50"],
    "cuda": ["resnet50", "llm_1b"],
}


class HandOver(torch.autograd.Function):
    """Autograd bookkeeping alone: backward returns gradients made beforehand."""

    @staticmethod
    def forward(ctx: Any, box: list, *params: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.box = box
        return torch.zeros((), device=params[0].device)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:  # type: ignore[override]
        grads = ctx.box.pop()
        return (None, *grads)


def random_state(model: nn.Module, lam: float) -> dict[str, Any]:
    """An EWC state dict of one task with random F ≥ 0 and θ* near the weights, float32.

    Made on the parameters' device when that is a GPU (a 1e9-parameter model's 8 GB of F and θ*
    would be slow to make on the CPU and to copy over), on the CPU otherwise (same numbers as before).
    """
    named = dict(model.named_parameters())
    first = next(iter(named.values()))
    device = first.device if first.device.type == "cuda" else torch.device("cpu")
    g = torch.Generator(device=device).manual_seed(0)
    fisher = {n: torch.rand(p.shape, generator=g, device=device) for n, p in named.items()}
    star = {
        n: p.detach().to(device, torch.float32) + 0.01 * torch.randn(p.shape, generator=g, device=device)
        for n, p in named.items()
    }
    return {
        "version": 1,
        "lam": lam,
        "mode": "separate",
        "gamma": 1.0,
        "norm_stats": "update",
        "storage_dtype": "float32",
        "pairs": [{"fisher": fisher, "star": star}],
    }


def floor_bytes(params: list[torch.Tensor]) -> int:
    """Bytes the one-pass penalty must move: read θ, θ*, F; write the gradient (θ's dtype)."""
    return sum(p.numel() * (2 * p.element_size() + STORAGE_BYTES) for p in params)


def kernel_status() -> Optional[str]:
    """``ewc_rs.cuda_kernel.status()`` when this build has it, else None."""
    status = getattr(cuda_kernel, "status", None)
    return status() if callable(status) else None


def print_header() -> None:
    print(
        "Per model: median time of each method, its ratio to the floor (the bytes the one-pass penalty\n"
        "must move, timed as torch.addcmul over float32 buffers of that size), the GB/s it reaches over\n"
        "those bytes, and the seed loop's time over it. Kernel against floor: the `kernel` row (the raw\n"
        "_core.penalty call, reused output); `ewc_rs_direct` (EWC.backward) is the closest public path;\n"
        "`ewc_rs` also pays autograd's per-tensor bookkeeping (its own cost: the `engine` row)."
    )


def print_row(name: str, r: dict[str, Any]) -> None:
    """The block of one model (the name keeps bench_llm.py's import)."""
    t, fl = r["times_s"], r["times_s"]["floor"]
    print(
        f"\n## {name} ({r['dtype']}): {r['tensors']} tensors, {r['parameters'] / 1e6:.2f}M parameters, "
        f"floor {r['floor_bytes'] / 1e6:.1f} MB"
    )
    print(f"{'method':<16}{'median ms':>11}{'÷ floor':>10}{'GB/s':>9}{'seed ÷':>9}")
    for method, v in t.items():
        print(
            f"{method:<16}{v * 1e3:>11.3f}{v / fl:>9.2f}x{r['floor_bytes'] / v / 1e9:>9.1f}{t['seed_loop'] / v:>8.1f}x"
        )
    if "pipelined_s" in r:
        pl, pf = r["pipelined_s"], r["pipelined_s"]["floor"]
        print("queued back to back (20 calls, one sync; host overhead hidden where the GPU is slower):")
        for method, v in pl.items():
            print(f"  {method:<22}{v * 1e3:>9.3f} ms{v / pf:>8.2f}x floor{r['floor_bytes'] / v / 1e9:>9.1f} GB/s")
    dev = r.get("device_kernel_s") or {}
    if dev.get("kernel") and dev.get("floor"):
        print(
            f"GPU time of the kernels alone (profiler): ewc_penalty_* {dev['kernel'] * 1e3:.3f} ms, "
            f"addcmul {dev['floor'] * 1e3:.3f} ms: {dev['kernel'] / dev['floor']:.2f}x floor, "
            f"{r['floor_bytes'] / dev['kernel'] / 1e9:.0f} GB/s"
        )
    elif dev:
        print(f"GPU time of the kernels alone: not measured ({dev})")
    grads = ", ".join(f"{k} {v:.2g}" for k, v in r["grad_rel_err"].items())
    print(f"agreement with the seed's formula: value {r['value_rel_err']:.2g}; gradient (max rel.) {grads}")
    if r.get("cuda_kernel") is not None:
        print(f"cuda_kernel.status(): {r['cuda_kernel']}  (under disabled(): {r.get('cuda_kernel_disabled')})")


def run_penalty(name: str, device: str, repeats: int, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Times every method on model ``name`` and prints its block; returns the figures."""
    result = run_model(name, device, repeats, dtype)
    print_row(name, result)
    gc.collect()  # the model, its F/θ* and the seed loop's buffers go before the next model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def grad_error(grads: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """Largest over the tensors of max |g − ref| / max |ref|, in float32."""
    return max(float((g.float() - r.float()).abs().max() / r.float().abs().max()) for g, r in zip(grads, ref))


def run_model(name: str, device: str, repeats: int, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    torch.manual_seed(0)
    with torch.device(device):  # a GPU model is initialised on the GPU
        model = MODELS[name]().to(dtype)
    params = [p for p in model.parameters()]
    lam = 100.0
    state = random_state(model, lam)
    ewc = ewc_rs.EWC(model, lam, norm_stats="update")
    ewc.load_state_dict(state)
    ewc.to(device)
    seed_f = {n: f.to(device) for n, f in state["pairs"][0]["fisher"].items()}
    seed_s = {n: s.to(device) for n, s in state["pairs"][0]["star"].items()}
    del state
    named = list(model.named_parameters())
    on_cuda = params[0].device.type == "cuda"
    toggle = getattr(cuda_kernel, "disabled", None) if on_cuda else None

    def seed_loop() -> None:
        loss = 0.0
        for n, p in named:
            loss = loss + (lam / 2) * (seed_f[n] * (p - seed_s[n]) ** 2).sum()
        loss.backward()  # type: ignore[union-attr]

    def fused() -> None:
        ewc.penalty(model).backward()

    def direct() -> None:
        ewc.backward(model)

    def libtorch_ops() -> None:
        assert toggle is not None
        with toggle():
            ewc.penalty(model).backward()

    (term,) = ewc._plan(model).terms  # a diagonal plan: one DiagonalTerm
    groups = term.buckets  # type: ignore[attr-defined]
    outs = [torch.empty(g.star.numel(), dtype=g.dtype, device=g.device) for g in groups]

    def kernel() -> list[torch.Tensor]:
        views: list[torch.Tensor] = []
        for g, out in zip(groups, outs):
            views += _core.penalty(g.params, g.star, g.fisher, lam, out)[2]
        return views

    def zero_grad() -> None:  # untimed, before each call: as `optimizer.zero_grad()` in training
        model.zero_grad(set_to_none=True)

    def zero_grad_in_place() -> None:
        model.zero_grad(set_to_none=False)

    box: list = []

    def engine_setup() -> None:  # untimed: the gradients exist before the backward
        model.zero_grad(set_to_none=True)
        box[:] = [[torch.empty_like(p) for p in params]]

    def engine() -> None:
        HandOver.apply(box, *params).backward()

    total = sum(p.numel() for p in params)
    moved = floor_bytes(params)
    a, b, c, d = (torch.rand(moved // 16, device=device) for _ in range(4))  # 4 float32 streams

    def floor() -> None:
        torch.addcmul(a, b, c, out=d)

    # Agreement check before timing: same value and gradient as the seed's formula, for every path.
    ref = sum((lam / 2) * (seed_f[n] * (p - seed_s[n]) ** 2).sum() for n, p in named)
    ref.backward()  # type: ignore[union-attr]
    ref_grads = [p.grad.clone() for p in params]  # type: ignore[union-attr]
    ref_value = ref.detach().item()
    del ref
    model.zero_grad(set_to_none=True)
    value = ewc.penalty(model)
    value.backward()
    ours = float(value)
    grad_errs = {"ewc_rs": grad_error([p.grad for p in params], ref_grads)}  # type: ignore[misc]
    model.zero_grad(set_to_none=True)
    ewc.backward(model)
    grad_errs["ewc_rs_direct"] = grad_error([p.grad for p in params], ref_grads)  # type: ignore[misc]
    model.zero_grad(set_to_none=True)
    by_id = {id(p): r for p, r in zip(params, ref_grads)}  # the plan orders parameters by name
    grad_errs["kernel"] = grad_error(kernel(), [by_id[id(p)] for g in groups for p in g.params])
    status_disabled = None
    if toggle is not None:
        libtorch_ops()
        status_disabled = kernel_status()
        grad_errs["libtorch_ops"] = grad_error([p.grad for p in params], ref_grads)  # type: ignore[misc]
        model.zero_grad(set_to_none=True)
    del ref_grads, by_id

    sync = on_cuda
    # Interleave the methods so that machine noise hits them alike; keep each one's median.
    rounds = 3
    methods = [
        ("seed_loop", seed_loop, zero_grad),
        ("ewc_rs", fused, zero_grad),
        ("ewc_rs_direct", direct, zero_grad_in_place),
        ("kernel", kernel, None),
        ("libtorch_ops", libtorch_ops, zero_grad),
        ("engine", engine, engine_setup),
        ("floor", floor, None),
    ]
    if toggle is None:
        methods = [m for m in methods if m[0] != "libtorch_ops"]
    samples: dict[str, list[float]] = {m[0]: [] for m in methods}
    for _ in range(rounds):
        for label, fn, setup in methods:
            samples[label].append(median_time(fn, repeats=repeats, warmup=2, sync=sync, setup=setup))
    times = {k: sorted(v)[len(v) // 2] for k, v in samples.items()}
    result: dict[str, Any] = {
        "dtype": str(dtype).replace("torch.", ""),
        "tensors": len(params),
        "parameters": total,
        "floor_bytes": moved,
        "times_s": times,
        "ratio_to_floor": {k: v / times["floor"] for k, v in times.items()},
        "gb_per_s": {k: moved / v / 1e9 for k, v in times.items()},
        "value_rel_err": abs(ours - ref_value) / abs(ref_value),
        "grad_max_rel_err": max(grad_errs.values()),
        "grad_rel_err": grad_errs,
    }
    if on_cuda:
        # In a training loop the host queues steps ahead of the GPU: per-step cost of 20 queued calls.
        pipelined = {"kernel": kernel, "ewc_rs_direct": direct, "floor": floor}
        if toggle is not None:

            def kernel_libtorch() -> None:
                with toggle():
                    kernel()

            pipelined["kernel_libtorch_ops"] = kernel_libtorch
        model.zero_grad(set_to_none=False)
        piped = {k: pipelined_time(fn, repeats=max(3, repeats // 4)) for k, fn in pipelined.items()}
        result["pipelined_s"] = piped
        try:  # the kernels' own GPU time (profiler): HBM efficiency without any host overhead
            dev = {
                "kernel": device_kernel_time(kernel, ("ewc_penalty",)),
                "floor": device_kernel_time(floor, ("void at::native", "at::native", "addcmul")),
            }
        except Exception as e:  # noqa: BLE001  (a profiler problem must not lose the other figures)
            dev = {"error": repr(e)}
        result["device_kernel_s"] = dev
        result["pipelined_ratio_to_floor"] = {k: v / piped["floor"] for k, v in piped.items()}
    if on_cuda and cuda_kernel is not None:
        model.zero_grad(set_to_none=True)
        ewc.penalty(model).backward()  # the last call takes the default path: its status is reported
        torch.cuda.synchronize()
        result["cuda_kernel"] = kernel_status()
        result["cuda_kernel_disabled"] = status_disabled
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES), help="the model parameters' dtype")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument(
        "--models",
        nargs="*",
        choices=list(MODELS),
        help="default: " + "; ".join(f"{k}: {v}" for k, v in DEFAULT_MODELS.items()),
    )
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch.cuda.is_available() is False on this machine")
    models = args.models or DEFAULT_MODELS["cuda" if args.device.startswith("cuda") else "cpu"]
    results = {}
    print_header()
    for name in models:
        results[name] = run_penalty(name, args.device, args.repeats, DTYPES[args.dtype])
    payload: dict[str, Any] = {"repeats": args.repeats, "dtype": args.dtype, "results": results}
    if args.device.startswith("cuda"):
        payload["cuda_kernel_status"] = kernel_status() if cuda_kernel is not None else "ewc_rs.cuda_kernel absent"
        print(f"\newc_rs.cuda_kernel.status() after the run: {payload['cuda_kernel_status']}")
    suffix = "" if args.dtype == "float32" else f"_{args.dtype}"
    path = write_results(f"penalty_{args.device.split(':')[0]}{suffix}.json", payload)
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
