"""Validation sweep that chose λ for the permuted demo (never looks at a test set).

    python -m ewc_rs.demo.sweep [--data DIR] [--out DIR] [--tasks 5] [--quick] [--methods ...]
                                [--lams 1 3 10] [--dampings 0 1e-3] [--epochs 3]

The MNIST training images (8000 here: the t10k file's training part, see
:func:`.datasets.load_split`) are split again, with a fixed seed, into 6000 for training and
2000 for validation; the 2000 test images are not loaded by this script. The permuted protocol
of :mod:`.permuted` (same model, optimizer, epochs, permutations, Fisher sizes) then runs for each
method over a grid of λ, and the λ with the best final average *validation* accuracy (over all
tasks, after the last one) is reported. Writes ``OUT/sweep_permuted.json``.

Result of ``python -m ewc_rs.demo.sweep`` (5 tasks, seed 0, CPU), final average validation
accuracy per λ — the chosen values are in :data:`.permuted.PERMUTED_CONFIG`:

    method         λ: final average validation accuracy (best marked *)
    l2             1e-4: 0.7731  3e-4: 0.7817*  1e-3: 0.7762  3e-3: 0.7368  1e-2: 0.6450  3e-2: 0.5847  0.1: 0.5194
    ewc_exact      30: 0.8515  100: 0.8689*  300: 0.8648  1e3: 0.8409  3e3: 0.7980  1e4: 0.7407  3e4: 0.6841
    ewc_empirical  30: 0.8422  100: 0.8606  300: 0.8621*  1e3: 0.8486  3e3: 0.8148  1e4: 0.7682  3e4: 0.7089
    ewc_mc         30: 0.8505  100: 0.8683*  300: 0.8668  1e3: 0.8462  3e3: 0.8070  1e4: 0.7424  3e4: 0.6936
    ewc_batched    3e3: 0.8395  1e4: 0.8644  3e4: 0.8710*  1e5: 0.8518  3e5: 0.8186  1e6: 0.7450  3e6: 0.7020
    none           0.7802

Kronecker-factored EWC (``python -m ewc_rs.demo.sweep --methods kfac kfac_online``, same protocol;
an earlier grid from 30 up fell from there on: 30: 0.9096, 100: 0.8922, 300: 0.8611, 1e3: 0.7966):

    kfac           1: 0.9214  3: 0.9223*  10: 0.9210  30: 0.9096  100: 0.8922
    kfac_online    1: 0.9153  3: 0.9194*  10: 0.9189  30: 0.9122  100: 0.8918

Online KFAC for 50 tasks, chosen on 10 tasks (``--methods kfac_online --tasks 10``) with a damping
d of each task's factors, (A + √d I) ⊗ (G + √d I), and longer training (``--epochs``):

    3 epochs   λ=1: 0.8980  3: 0.9143  10: 0.9116
               d=1e-4: λ=1: 0.9195*  3: 0.9127  10: 0.8916    d=1e-3: 1: 0.9064  3: 0.8890  10: 0.8373
               d=1e-2: λ=1: 0.8706  3: 0.8027  10: 0.6116     λ=0.3: d=3e-5: 0.8997  1e-4: 0.8944  3e-4: 0.9040
               λ=1: d=3e-5: 0.9188  3e-4: 0.9133
    6 epochs   λ=1: 0.9205  λ=1, d=1e-4: 0.9342
    10 epochs  λ=1, d=1e-4: 0.9419  λ=1, d=3e-5: 0.9389  λ=3, d=3e-5: 0.9444*  λ=1, d=3e-4: 0.9390
               λ=3, d=3e-4: 0.9341
    20 epochs  λ=1, d=1e-4: 0.9447 (twice the time for +0.0003: 10 epochs kept)

(≈ 5 minutes on the 2-core development machine, shared with other jobs.) The curve is flat
near its top (100 vs 300 differ by < 0.01), so the choice is not sensitive.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch

from .permuted import PERMUTED_CONFIG, QUICK_CONFIG, averages, make_tasks, run_method
from .train import load_data, set_threads, subset

GRID = {
    "l2": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
    "ewc_exact": [30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e4],
    "ewc_empirical": [30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e4],
    "ewc_mc": [30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e4],
    "ewc_batched": [3e3, 1e4, 3e4, 1e5, 3e5, 1e6, 3e6],
    "kfac": [1.0, 3.0, 10.0, 30.0, 100.0],
    "kfac_online": [1.0, 3.0, 10.0, 30.0, 100.0],
}
VALIDATION = 2000


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ewc_rs.demo.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None)
    p.add_argument("--out", default="demo_out")
    p.add_argument("--tasks", type=int, default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="*", default=list(GRID))
    p.add_argument("--lams", type=float, nargs="*", default=None, help="λ grid for every method (default: GRID)")
    p.add_argument(
        "--dampings", type=float, nargs="*", default=[0.0], help="kfac, kfac_online: damping d values, crossed with λ"
    )
    p.add_argument("--epochs", type=int, default=None, help="epochs per task (default: the demo's)")
    args = p.parse_args(argv)
    set_threads(None)

    cfg = dict(QUICK_CONFIG if args.quick else PERMUTED_CONFIG)
    if args.tasks is not None:
        cfg["tasks"] = args.tasks
    if args.epochs is not None:
        cfg["epochs"] = args.epochs
    mnist = load_data("mnist", args.data, seed=0)
    x, y = mnist.x_train, mnist.y_train
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(4321))
    val, tr = order[:VALIDATION], order[VALIDATION:]
    xtr, ytr = subset(x[tr], y[tr], cfg["train_samples"], seed=args.seed)
    tasks = make_tasks(xtr, ytr, x[val], y[val], cfg["tasks"], seed=args.seed)
    print(
        f"sweep: {len(xtr)} train / {len(val)} validation images of the training split, "
        f"{cfg['tasks']} tasks; test set not used"
    )

    results: dict[str, dict[str, list[float]]] = {}
    best: dict[str, str] = {}
    for method in args.methods:
        results[method] = {}
        dampings = args.dampings if method.startswith("kfac") else [0.0]
        for damping in dampings:
            for lam in args.lams or GRID[method]:
                t0 = time.perf_counter()
                run_cfg = {**cfg, "lam": {**cfg["lam"], method: lam}, "kfac_damping": damping}
                curve = averages(run_method(method, tasks, run_cfg, seed=args.seed))
                key = f"{lam:g}" if damping == 0.0 else f"{lam:g}, d={damping:g}"
                results[method][key] = curve
                print(
                    f"  {method:14s} λ={key:<14s} final val avg {curve[-1]:.4f}  ({time.perf_counter() - t0:.1f} s)",
                    flush=True,
                )
        best[method] = max(results[method], key=lambda k: results[method][k][-1])
    none_curve = averages(run_method("none", tasks, cfg, seed=args.seed))
    print(f"  none           final val avg {none_curve[-1]:.4f}")
    print("\nbest λ (final average validation accuracy):")
    for method, key in best.items():
        print(f"  {method:14s} λ={key}: {results[method][key][-1]:.4f}")
    print()
    print(format_grid(results))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_permuted.json").write_text(
        json.dumps(
            {
                "final_validation_average": {m: {k: v[-1] for k, v in r.items()} for m, r in results.items()},
                "curves": results,
                "none": none_curve,
                "best": best,
            },
            indent=2,
        )
        + "\n"
    )
    return 0


def format_grid(results: dict[str, dict[str, list[float]]]) -> str:
    lines = []
    for method, r in results.items():
        lines.append(f"    {method:14s} " + "  ".join(f"{k}: {v[-1]:.4f}" for k, v in r.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
