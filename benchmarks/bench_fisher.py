"""Fisher estimation speed: ewc_rs (every kind) against the usual ways of computing it.

All in one process, side by side, on the same data, interleaved rounds in a shuffled order
(random inputs; on the CPU N=2000 in batches of 100, on CUDA N=10000 in batches of 500 so that the
GPU has work to measure; ``--samples`` and ``--batch`` set them):
- ``loop``: the per-sample loop (one forward/backward per sample, float32): the definition.
- ``vmap``: ``torch.func`` ``vmap(grad)`` per-sample gradients, squared and summed.
- ``backpack``: BackPACK's ``SumGradSquared`` (where it supports the model; "not installed" when
  ``backpack-for-pytorch`` is absent).
- ``seed_batched``: the seed article's estimator (square of each batch-mean gradient): the
  biased estimate ewc_rs's correct ``empirical`` is compared against for speed.
- ``fwd_bwd``: one plain forward+backward over the same batches (the cost floor).
- ``ewc_rs:<kind>``: ``ewc_rs.fisher_diag`` with kind empirical / exact / mc / batched.

Prints a table of median times and ratios, the target ratio ``ewc_rs:empirical / fwd_bwd`` (≤ 1.5×)
explicitly, and writes ``benchmarks/results/fisher_<device>.json``. Every method runs on
``--device`` (model and batches moved there) and is timed between ``torch.cuda.synchronize()``
calls on CUDA.

Usage: ``python benchmarks/bench_fisher.py [--device cpu|cuda] [--repeats 5] [--samples N] [--batch B] [--quick]``
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ewc_rs  # noqa: E402
from common import median_time, write_results  # noqa: E402
from ewc_rs.demo.models import seed_model  # noqa: E402  (the seed article's MLP)


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )


class SmallTransformer(nn.Module):
    """Encoder d_model 32, 4 heads, 2 layers over 16 tokens of 32 features, mean-pooled head."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(dim=1))


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "seed_mlp": (seed_model, (1, 28, 28)),
    "cnn": (cnn, (1, 28, 28)),
    "transformer": (SmallTransformer, (16, 32)),
}


def make_data(shape: tuple[int, ...], n: int, batch: int, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return [(x[i : i + batch].to(device), y[i : i + batch].to(device)) for i in range(0, n, batch)]


def loop_fisher(model: nn.Module, batches: list) -> dict[str, torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    acc = [torch.zeros_like(p) for p in params]
    count = 0
    for x, y in batches:
        for i in range(x.shape[0]):
            loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
            for a, g in zip(acc, torch.autograd.grad(loss, params)):
                a += g.square()
            count += 1
    return {str(i): a / count for i, a in enumerate(acc)}


def vmap_fisher(model: nn.Module, batches: list) -> dict[str, torch.Tensor]:
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return F.cross_entropy(out, y.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    acc = {k: torch.zeros_like(v) for k, v in params.items()}
    for x, y in batches:
        for k, g in per_sample(params, x, y).items():
            acc[k] += g.square().sum(0)
    return acc


def backpack_fisher(model: nn.Module, batches: list) -> dict[str, torch.Tensor]:
    try:
        from backpack import backpack, extend
    except ImportError as e:
        raise NotInstalled("not installed (the optional baseline backpack-for-pytorch)") from e
    from backpack.extensions import SumGradSquared

    ext_model = extend(model)
    lossfn = extend(nn.CrossEntropyLoss(reduction="sum"))
    acc = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    for x, y in batches:
        ext_model.zero_grad()
        with backpack(SumGradSquared()):
            lossfn(ext_model(x), y).backward()
        for k, p in model.named_parameters():
            acc[k] += p.sum_grad_squared  # type: ignore[attr-defined]
    return acc


class NotInstalled(Exception):
    """An optional baseline package is missing: its row says so instead of timing it."""


def seed_batched(model: nn.Module, batches: list) -> dict[str, torch.Tensor]:
    acc = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for k, p in model.named_parameters():
            acc[k] += p.grad.square()  # type: ignore[union-attr]
    return {k: v / len(batches) for k, v in acc.items()}


def fwd_bwd(model: nn.Module, batches: list) -> None:
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()


def run_model(name: str, device: str, n: int, repeats: int, batch: int = 100) -> dict[str, Any]:
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    model = factory().to(device).eval()
    batches = make_data(shape, n, batch, device)
    backpack_model = copy.deepcopy(model)
    sync = device == "cuda"
    methods: dict[str, Callable[[], Any]] = {
        "fwd_bwd": lambda: fwd_bwd(model, batches),
        "seed_batched": lambda: seed_batched(model, batches),
        "loop": lambda: loop_fisher(model, batches),
        "vmap": lambda: vmap_fisher(model, batches),
        # BackPACK's extend() hooks the model for good: it gets a copy of its own.
        "backpack": lambda: backpack_fisher(backpack_model, batches),
    }
    for kind in ("empirical", "exact", "mc", "batched"):
        methods[f"ewc_rs:{kind}"] = lambda k=kind: ewc_rs.fisher_diag(model, batches, kind=k)
    # Agreement with the definition (the per-sample loop) before any timing: relative Frobenius
    # error over all parameters, for ewc_rs's empirical Fisher and for the seed's estimator.
    definition = list(loop_fisher(model, batches).values())

    def rel_err(est: dict[str, torch.Tensor]) -> float:
        num = sum(float((e.float() - d).square().sum()) for e, d in zip(est.values(), definition))
        return (num / sum(float(d.square().sum()) for d in definition)) ** 0.5

    agreement = {
        "ewc_rs:empirical": rel_err(ewc_rs.fisher_diag(model, batches, kind="empirical")),
        "seed_batched": rel_err(seed_batched(model, batches)),
    }
    model.zero_grad(set_to_none=True)
    times: dict[str, float | None] = {}
    errors: dict[str, str] = {}
    samples: dict[str, list[float]] = {m: [] for m in methods}
    # Interleaved rounds (one call of each method per round) so that the machine's noise hits
    # every method alike; the per-sample loop, 40x slower, runs in the first two rounds only. Each
    # round runs the methods in its own shuffled order: in a fixed order a method always follows
    # the same one, and the one that follows BackPACK or vmap (whose large allocations leave cold
    # caches and memory handed back to the system) pays for it every round.
    for r in range(repeats + 1):  # round 0 warms up
        order = list(methods.items())
        random.Random(r).shuffle(order)
        for method, fn in order:
            if method in errors or (method == "loop" and r > 2):
                continue
            try:
                t = median_time(fn, repeats=1, warmup=0, sync=sync)
            except NotInstalled as e:
                errors[method] = str(e)
                continue
            except Exception as e:  # a baseline that does not support the model is reported, not fatal
                errors[method] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                continue
            finally:
                model.zero_grad(set_to_none=True)
                model.eval()
            if r > 0 or method == "loop":
                samples[method].append(t)
    for method, ts in samples.items():
        times[method] = None if method in errors else sorted(ts)[len(ts) // 2]
    emp, base = times["ewc_rs:empirical"], times["fwd_bwd"]
    ratio = emp / base if emp and base else None
    return {"times_s": times, "unsupported": errors, "rel_error_vs_loop": agreement, "empirical_over_fwd_bwd": ratio}


def print_table(name: str, res: dict[str, Any]) -> None:
    t = res["times_s"]
    base, loop, emp = t.get("seed_batched"), t.get("loop"), t.get("ewc_rs:empirical")
    print(f"\n## {name}  (median seconds; ratios: time / seed_batched, loop / time)")
    print(f"{'method':<20}{'median s':>10}{'÷ seed_batched':>16}{'loop speed-up':>15}")
    for method, v in t.items():
        if v is None:
            print(f"{method:<20}{'n/a':>10}   ({res['unsupported'][method]})")
            continue
        r1 = f"{v / base:.2f}x" if base else "-"
        r2 = f"{loop / v:.1f}x" if loop else "-"
        print(f"{method:<20}{v:>10.4f}{r1:>16}{r2:>15}")
    agree = res["rel_error_vs_loop"]
    print("relative error against the per-sample loop: " + ", ".join(f"{k} {v:.2g}" for k, v in agree.items()))
    if emp and base:
        print(
            f"targets: empirical / seed_batched = {emp / base:.2f}; exact / empirical = {t['ewc_rs:exact'] / emp:.2f}"
        )
    ratio = res["empirical_over_fwd_bwd"]
    shown = f"{ratio:.2f}x" if ratio is not None else "n/a"
    print(f"target ewc_rs:empirical / fwd_bwd <= 1.5x (one forward+backward over the same batches): {shown}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--samples", type=int, help="N (default: 2000 on the CPU, 10000 on CUDA)")
    ap.add_argument("--batch", type=int, help="batch size (default: 100 on the CPU, 500 on CUDA)")
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--quick", action="store_true", help="N=200, 3 repeats (smoke run)")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch.cuda.is_available() is False on this machine")
    samples, batch = args.samples or (10000 if cuda else 2000), args.batch or (500 if cuda else 100)
    if args.quick:
        samples, args.repeats = 200, 3
    if cuda:  # TF32 is left as torch sets it; its state goes with the figures (it moves the agreement)
        tf32 = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
        print(f"device {torch.cuda.get_device_name()}, N={samples}, batch {batch}, TF32 allowed: {tf32}")
    results = {}
    for name in args.models:
        results[name] = run_model(name, args.device, samples, args.repeats, batch)
        print_table(name, results[name])
    payload: dict[str, Any] = {"samples": samples, "batch": batch, "results": results}
    if cuda:
        payload["tf32_allowed"] = tf32
    path = write_results(f"fisher_{args.device.split(':')[0]}.json", payload)
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
