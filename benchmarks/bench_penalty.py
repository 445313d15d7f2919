"""EWC penalty + gradient speed: ewc_rs's fused pass against the seed's loop and the memory floor.

All in one process, side by side, on the same parameters:
- ``seed_loop``: the seed article's penalty, a Python loop of tensor ops per parameter
  (``(lam/2) * (F * (p - star) ** 2).sum()`` summed), then ``backward()``.
- ``ewc_rs``: ``ewc.penalty(model)`` then ``backward()`` (one fused Rust pass, through autograd).
- ``ewc_rs_direct``: ``ewc.backward(model)``, the same gradient added straight into existing
  ``.grad`` tensors (as after the task loss's ``backward()``), no autograd.
- ``floor``: ``torch.addcmul(a, b, c, out=d)`` over flat buffers of the model's total size:
  three reads and one write per parameter, the least any penalty+gradient can move.

- ``engine``: autograd alone: a custom ``Function`` whose backward only hands ready-made
  gradients to the parameters (PyTorch's per-tensor bookkeeping, the bound of any
  autograd-connected penalty).

Before each timed call, untimed, the gradients are reset as a training step's
``optimizer.zero_grad()`` would: to None for the autograd methods, zeroed in place for
``ewc_rs_direct`` (which adds to the task loss's gradients; reading them is one more stream).

Parameter shapes: the seed's MLP, transformer encoders (d_model 64 and 256, 12 layers), ResNet-18
and ResNet-50 (torchvision, untrained). Prints medians and ratios; writes
``benchmarks/results/penalty_<device>.json``.

Usage: ``python benchmarks/bench_penalty.py [--device cpu|cuda] [--repeats 30]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ewc_rs  # noqa: E402
from common import median_time, write_results  # noqa: E402
from ewc_rs.demo.models import seed_model  # noqa: E402  (the seed article's MLP)


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


MODELS: dict[str, Callable[[], nn.Module]] = {
    "seed_mlp": seed_model,
    "transformer_d64x12": transformer(64),
    "transformer_d256x12": transformer(256),
    "resnet18": resnet(18),
    "resnet50": resnet(50),
    # Run by benchmarks/bench_llm.py (needs transformers), not by default here.
    "gpt2_small": gpt2(tiny=False),
    "gpt2_tiny": gpt2(tiny=True),
}
DEFAULT_MODELS = ["seed_mlp", "transformer_d64x12", "transformer_d256x12", "resnet18", "resnet50"]


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
    g = torch.Generator().manual_seed(0)
    named = dict(model.named_parameters())
    fisher = {n: torch.rand(p.shape, generator=g) for n, p in named.items()}
    star = {n: p.detach().cpu() + 0.01 * torch.randn(p.shape, generator=g) for n, p in named.items()}
    return {
        "version": 1,
        "lam": lam,
        "mode": "separate",
        "gamma": 1.0,
        "norm_stats": "update",
        "storage_dtype": "float32",
        "pairs": [{"fisher": fisher, "star": star}],
    }


def print_header() -> None:
    print(
        f"{'model':<20}{'tensors':>8}{'params':>10}{'seed loop':>11}{'ewc_rs':>10}{'direct':>10}"
        f"{'engine':>10}{'floor':>10}"
        f"{'seed/ewc_rs':>12}{'seed/direct':>12}{'ewc_rs/floor':>13}{'direct/floor':>13}"
    )


def print_row(name: str, r: dict[str, Any]) -> None:
    t = r["times_s"]
    print(
        f"{name:<20}{r['tensors']:>8}{r['parameters']:>10}{t['seed_loop'] * 1e3:>9.3f}ms"
        f"{t['ewc_rs'] * 1e3:>8.3f}ms{t['ewc_rs_direct'] * 1e3:>8.3f}ms{t['engine'] * 1e3:>8.3f}ms"
        f"{t['floor'] * 1e3:>8.3f}ms"
        f"{t['seed_loop'] / t['ewc_rs']:>11.1f}x{t['seed_loop'] / t['ewc_rs_direct']:>11.1f}x"
        f"{t['ewc_rs'] / t['floor']:>12.2f}x{t['ewc_rs_direct'] / t['floor']:>12.2f}x"
    )


def run_penalty(name: str, device: str, repeats: int) -> dict[str, Any]:
    """Times every method on model ``name`` and prints its row; returns the figures."""
    result = run_model(name, device, repeats)
    print_row(name, result)
    return result


def run_model(name: str, device: str, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = MODELS[name]().to(device)
    params = [p for p in model.parameters()]
    lam = 100.0
    state = random_state(model, lam)
    ewc = ewc_rs.EWC(model, lam, norm_stats="update")
    ewc.load_state_dict(state)
    ewc.to(device)
    seed_f = {n: f.to(device) for n, f in state["pairs"][0]["fisher"].items()}
    seed_s = {n: s.to(device) for n, s in state["pairs"][0]["star"].items()}
    named = list(model.named_parameters())

    def seed_loop() -> None:
        loss = 0.0
        for n, p in named:
            loss = loss + (lam / 2) * (seed_f[n] * (p - seed_s[n]) ** 2).sum()
        loss.backward()  # type: ignore[union-attr]

    def fused() -> None:
        ewc.penalty(model).backward()

    def direct() -> None:
        ewc.backward(model)

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
    a, b, c, d = (torch.rand(total, device=device) for _ in range(4))

    def floor() -> None:
        torch.addcmul(a, b, c, out=d)

    # Agreement check before timing: same value and gradient as the seed's formula.
    ref = sum((lam / 2) * (seed_f[n] * (p - seed_s[n]) ** 2).sum() for n, p in named)
    ref.backward()  # type: ignore[union-attr]
    ref_grads = [p.grad.clone() for p in params]  # type: ignore[union-attr]
    model.zero_grad(set_to_none=True)
    ours = ewc.penalty(model)
    ours.backward()
    grad_err = max(float((p.grad - g).abs().max() / g.abs().max()) for p, g in zip(params, ref_grads))  # type: ignore[operator]
    model.zero_grad(set_to_none=True)
    ewc.backward(model)
    grad_err = max(grad_err, max(float((p.grad - g).abs().max() / g.abs().max()) for p, g in zip(params, ref_grads)))  # type: ignore[operator]
    model.zero_grad(set_to_none=True)

    sync = device == "cuda"
    times = {}
    # Interleave the methods so that machine noise hits them alike; keep each one's median.
    rounds = 3
    methods = (
        ("seed_loop", seed_loop, zero_grad),
        ("ewc_rs", fused, zero_grad),
        ("ewc_rs_direct", direct, zero_grad_in_place),
        ("engine", engine, engine_setup),
        ("floor", floor, None),
    )
    samples: dict[str, list[float]] = {m[0]: [] for m in methods}
    for _ in range(rounds):
        for label, fn, setup in methods:
            samples[label].append(median_time(fn, repeats=repeats, warmup=2, sync=sync, setup=setup))
    times = {k: sorted(v)[len(v) // 2] for k, v in samples.items()}
    return {
        "tensors": len(params),
        "parameters": total,
        "times_s": times,
        "value_rel_err": float(abs(ours.item() - ref.item()) / abs(ref.item())),
        "grad_max_rel_err": grad_err,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--models", nargs="*", default=DEFAULT_MODELS, choices=list(MODELS))
    args = ap.parse_args()
    results = {}
    print_header()
    for name in args.models:
        results[name] = run_penalty(name, args.device, args.repeats)
    path = write_results(f"penalty_{args.device}.json", {"repeats": args.repeats, "results": results})
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
