"""Fisher estimation speed on recurrent layers: the unrolled RNN/LSTM/GRU against the fallback.

One-layer ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` (input 32, hidden 64, ``batch_first``), a Linear
head on the last step's output, 10 classes; sequences of 20 steps in batches of 64 (``--samples``
sequences in all, default 512). All in one process, side by side, on the same batches:
- ``fwd_bwd``: the module's own forward+backward over the batches (its fused kernel; the floor);
- ``ewc_rs:empirical`` (and ``ewc_rs:exact``): ``fisher_diag`` as it is, the recurrent layer
  unrolled while recording, its projections through the Linear rule (``_fisher/recurrent.py``);
- ``fallback:empirical``: the same estimate with the recurrent layer's parameters in the exact
  ``torch.func`` fallback, as before the unrolling (the "before" figure);
- ``backpack``: BackPACK's ``SumGradSquared`` (its RNN and LSTM extensions; "not installed" or the
  error where ``backpack-for-pytorch`` is absent or does not support the layer).

Prints per layer the median times and the ratio of each to ``fwd_bwd`` (goal for
``ewc_rs:empirical``: ≤ 3×), the relative differences between the estimates, and writes
``benchmarks/results/recurrent_cpu.json``.

Usage: ``python benchmarks/bench_recurrent.py [--repeats 5] [--samples 512] [--threads K] [--quick]``
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ewc_rs  # noqa: E402
from common import median_time, write_results  # noqa: E402
from ewc_rs._fisher import recording  # noqa: E402  (to switch the unrolling off for the "before" figure)
from ewc_rs._fisher.api import estimate  # noqa: E402  (which parameters took the fallback)
from ewc_rs._fisher.options import parse_options  # noqa: E402

IN, HIDDEN, STEPS, BATCH, CLASSES = 32, 64, 20, 64, 10
CELLS: dict[str, type[nn.RNNBase]] = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


class LastStep(nn.Module):
    """A recurrent layer and a Linear head on its last step's output."""

    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = cell(IN, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def make_data(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, STEPS, IN, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, n, BATCH)]


def fwd_bwd(model: nn.Module, batches: list) -> None:
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()


def fallback_fisher(model: nn.Module, batches: list) -> dict[str, torch.Tensor]:
    """``fisher_diag`` with the recurrent layer's parameters in the exact fallback (before)."""
    saved = recording.recurrent_eligible
    recording.recurrent_eligible = lambda m: False
    try:
        return ewc_rs.fisher_diag(model, batches, kind="empirical")
    finally:
        recording.recurrent_eligible = saved


class NotSupported(Exception):
    """BackPACK is missing or does not support the layer: its row says so instead of timing it."""


def backpack_model(cell: type[nn.RNNBase], model: nn.Module) -> nn.Module:
    """The model as a Sequential BackPACK can extend (its own copy of the weights)."""
    try:
        from backpack import extend
        from backpack.custom_module.reduce_tuple import ReduceTuple
    except ImportError as e:
        raise NotSupported("not installed (the optional baseline backpack-for-pytorch)") from e

    class Last(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, -1]

    seq = nn.Sequential(copy.deepcopy(model.rnn), ReduceTuple(index=0), Last(), copy.deepcopy(model.head))
    try:
        return extend(seq, use_converter=True)
    except Exception as e:
        raise NotSupported(f"{type(e).__name__}: {str(e).splitlines()[0][:120]}") from e


def backpack_fisher(model: nn.Module, batches: list) -> dict[str, torch.Tensor]:
    from backpack import backpack, extend
    from backpack.extensions import SumGradSquared

    lossfn = extend(nn.CrossEntropyLoss(reduction="sum"))
    acc = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    n = 0
    for x, y in batches:
        model.zero_grad()
        with backpack(SumGradSquared()):
            lossfn(model(x), y).backward()
        for k, p in model.named_parameters():
            if not hasattr(p, "sum_grad_squared"):  # BackPACK skips a module it has no extension for
                raise NotSupported(f"not supported: BackPACK computed no SumGradSquared for {k} (no extension)")
            acc[k] += p.sum_grad_squared
        n += x.shape[0]
    return {k: v / n for k, v in acc.items()}


def rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Relative Frobenius difference of the recurrent layer's Fisher (``b`` the reference)."""
    keys = [k for k in b if "weight_" in k or "bias_" in k]
    num = sum(float((a[k].float() - b[k].float()).square().sum()) for k in keys)
    den = sum(float(b[k].float().square().sum()) for k in keys)
    return (num / den) ** 0.5 if den else float("nan")


def run_cell(name: str, n: int, repeats: int) -> dict[str, Any]:
    cell = CELLS[name]
    torch.manual_seed(0)
    model = LastStep(cell).eval()
    batches = make_data(n)
    methods: dict[str, Callable[[], Any]] = {
        "fwd_bwd": lambda: fwd_bwd(model, batches),
        "ewc_rs:empirical": lambda: ewc_rs.fisher_diag(model, batches, kind="empirical"),
        "ewc_rs:exact": lambda: ewc_rs.fisher_diag(model, batches, kind="exact"),
        "fallback:empirical": lambda: fallback_fisher(model, batches),
    }
    errors: dict[str, str] = {}
    # Agreement before any timing: the unrolled estimate against the exact fallback and BackPACK;
    # and which parameters took the fallback (none should).
    ours = ewc_rs.fisher_diag(model, batches, kind="empirical")
    agreement: dict[str, Optional[float]] = {"fallback:empirical": rel_err(ours, fallback_fisher(model, batches))}
    bp: Optional[nn.Module] = None
    try:
        bp = backpack_model(cell, model)
        theirs = backpack_fisher(bp, batches)
        names = dict(zip(theirs, model.state_dict()))  # Sequential's names -> the model's, in order
        agreement["backpack"] = rel_err(ours, {names[k]: v for k, v in theirs.items()})
        methods["backpack"] = lambda: backpack_fisher(bp, batches)  # type: ignore[arg-type]
    except NotSupported as e:
        errors["backpack"] = str(e)
    except Exception as e:  # BackPACK's extension does not support this layer (or this use of it)
        errors["backpack"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    in_fallback = estimate(model, batches, parse_options("empirical")).fallback
    samples: dict[str, list[float]] = {m: [] for m in methods}
    # Interleaved rounds (one call of each method per round) so that the machine's noise (another
    # job shares these cores) hits every method alike.
    for r in range(repeats + 1):  # round 0 warms up
        for method, fn in methods.items():
            t = median_time(fn, repeats=1, warmup=0)
            model.zero_grad(set_to_none=True)
            if r > 0:
                samples[method].append(t)
    times: dict[str, Optional[float]] = {m: sorted(ts)[len(ts) // 2] for m, ts in samples.items()}
    times.setdefault("backpack", None)
    base = times["fwd_bwd"]
    assert base is not None
    ratios = {m: (t / base if t is not None else None) for m, t in times.items()}
    return {
        "times_s": times,
        "over_fwd_bwd": ratios,
        "unsupported": errors,
        "rel_error_vs": agreement,
        "parameters_in_fallback": in_fallback,
    }


def print_table(name: str, res: dict[str, Any]) -> None:
    print(f"\n## {name}  (median seconds over the batches; ratio: time / fwd_bwd)")
    print(f"{'method':<22}{'median s':>10}{'÷ fwd_bwd':>12}")
    for method, t in res["times_s"].items():
        if t is None:
            print(f"{method:<22}{'n/a':>10}   ({res['unsupported'].get(method, '')})")
            continue
        print(f"{method:<22}{t:>10.4f}{res['over_fwd_bwd'][method]:>11.2f}x")
    agree = res["rel_error_vs"]
    print(
        "recurrent Fisher of ewc_rs:empirical, relative difference to: "
        + ", ".join(f"{k} {v:.2g}" for k, v in agree.items() if v is not None)
    )
    print(f"parameters in the fallback: {res['parameters_in_fallback'] or 'none'}")
    r = res["over_fwd_bwd"]
    print(
        f"target ewc_rs:empirical / fwd_bwd <= 3x: {r['ewc_rs:empirical']:.2f}x "
        f"(before, the fallback: {r['fallback:empirical']:.2f}x)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--samples", type=int, default=512, help="sequences in all (batches of 64)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--cells", nargs="*", default=list(CELLS))
    ap.add_argument("--quick", action="store_true", help="128 sequences, 2 repeats (smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.samples, args.repeats = 128, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {name: run_cell(name, args.samples, args.repeats) for name in args.cells}
    for name, res in results.items():
        print_table(name, res)
    payload = {
        "samples": args.samples,
        "batch": BATCH,
        "steps": STEPS,
        "input": IN,
        "hidden": HIDDEN,
        "classes": CLASSES,
        "results": results,
    }
    path = write_results("recurrent_cpu.json", payload)
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
