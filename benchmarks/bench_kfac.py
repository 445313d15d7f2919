"""Kronecker-factored EWC: penalty step and estimation time against the diagonal, and the factors
against nngeometry's ``PMatKFAC`` and curvlinops' ``KFACLinearOperator``.

All in one process, side by side, on the same model and data (medians over interleaved rounds):

- penalty step (value + gradient into ``.grad``): ``diag`` = ``EWC(model, λ)``,
  ``kfac`` = ``EWC(model, λ, structure="kfac")`` (through autograd, ``penalty(model).backward()``,
  and ``direct`` = ``ewc.backward(model)``), ``nngeometry_vTMv`` = ½λ·``PMatKFAC.vTMv(θ − θ*)``
  with ``backward()`` (the same quadratic form, per layer in Python); one and five stored tasks.
- estimation: ``fisher_kfac(kind="exact")`` against ``fisher_diag(kind="exact")`` on the same
  batches (and curvlinops' factor computation, type-2 = exact Fisher, when installed).
- agreement: per layer, the relative difference of A and G to curvlinops' (``KFACType.EXPAND``,
  loss reduction ``"sum"``, whose G is N times ours) and of the normalised factors
  A/‖A‖, G/‖G‖ and the product's scale ‖A‖‖G‖ to nngeometry's (which splits the scale between
  its factors differently).

Models: the permuted demo's MLP (784-256-256-10) and a small CNN (two Conv2d + Linear) on random
inputs. nngeometry and curvlinops are optional (``pip install 'ewc_rs[kfac-compare]'``); without
them their columns say so. Writes ``benchmarks/results/kfac_<device>.json``.

Usage: ``python benchmarks/bench_kfac.py [--device cpu] [--samples 1000] [--repeats 20] [--models mlp cnn]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_time, write_results  # noqa: E402
from ewc_rs import EWC, fisher_diag, fisher_kfac  # noqa: E402

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {"mlp": (mlp, (784,)), "cnn": (cnn, (3, 16, 16))}


def batches(shape: tuple[int, ...], n: int, device: str, batch: int = 100) -> Batches:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)
    return [(x[i : i + batch].to(device), y[i : i + batch].to(device)) for i in range(0, n, batch)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def nudge(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g).to(p.device))


def curvlinops_factors(model: nn.Module, data: Batches) -> Optional[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    try:
        from curvlinops import KFACLinearOperator
        from curvlinops.kfac import FisherType, KFACType
    except ImportError:
        return None
    op = KFACLinearOperator(
        model,
        nn.CrossEntropyLoss(reduction="sum"),
        [p for p in model.parameters()],
        data,
        fisher_type=FisherType.TYPE2,
        kfac_approx=KFACType.EXPAND,
        separate_weight_and_bias=False,
        check_deterministic=False,
    )
    op.compute_kronecker_factors()
    n = sum(len(x) for x, _ in data)
    return {m: (op._input_covariances[m], op._gradient_covariances[m] / n) for m in op._gradient_covariances}


def nngeometry_kfac(model: nn.Module, data: Batches) -> Any:
    try:
        from nngeometry.metrics import FIM
        from nngeometry.object import PMatKFAC
    except ImportError:
        return None
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])),
        batch_size=len(data[0][0]),
    )
    return FIM(model, loader, PMatKFAC, variant="classif_logits", device=str(data[0][0].device))


def agreement(model: nn.Module, data: Batches, ours: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    theirs = curvlinops_factors(model, data)
    if theirs is None:
        out["curvlinops"] = "not installed (pip install 'ewc_rs[kfac-compare]')"
    else:
        out["curvlinops"] = {
            m: {"A": rel(ours["kron"][m][0], a), "G": rel(ours["kron"][m][1], g)} for m, (a, g) in theirs.items()
        }
    fim = nngeometry_kfac(model, data)
    if fim is None:
        out["nngeometry"] = "not installed (pip install 'ewc_rs[kfac-compare]')"
        return out
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    rows = {}
    for name, (layer_id, (a, g)) in zip(names, fim.data.items()):
        oa, og = ours["kron"][name]
        rows[name] = {
            "layer": layer_id,
            "A_normalised": rel(oa / oa.norm(), a / a.norm()),
            "G_normalised": rel(og / og.norm(), g / g.norm()),
            "scale_ratio": float(oa.norm() * og.norm() / (a.norm() * g.norm())),
        }
    out["nngeometry"] = rows
    return out


def penalty_times(model: nn.Module, data: Batches, tasks: int, repeats: int) -> dict[str, Any]:
    diag, kfac = EWC(model, 1.0), EWC(model, 1.0, structure="kfac")
    for t in range(tasks):
        diag.consolidate(data[:2], kind="exact")
        kfac.consolidate(data[:2], kind="exact")
        nudge(model, t)

    def autograd(ewc: EWC) -> Callable[[], None]:
        return lambda: ewc.penalty(model).backward()

    def direct(ewc: EWC) -> Callable[[], None]:
        return lambda: ewc.backward(model)

    def zero() -> None:
        model.zero_grad(set_to_none=True)

    methods: dict[str, Callable[[], None]] = {
        "diag": autograd(diag),
        "diag_direct": direct(diag),
        "kfac": autograd(kfac),
        "kfac_direct": direct(kfac),
    }
    fim = nngeometry_kfac(model, data[:2]) if tasks == 1 else None
    if fim is not None:
        from nngeometry.object import PVector

        star = PVector.from_model(model).clone().detach()
        nudge(model, 99)

        def vtmv() -> None:
            (0.5 * fim.vTMv(PVector.from_model(model) - star)).backward()

        methods["nngeometry_vTMv"] = vtmv
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(3):  # interleaved rounds
        for m, fn in methods.items():
            times[m].append(median_time(fn, repeats=repeats, setup=zero))
    return {m: sorted(t)[1] for m, t in times.items()}


def estimation_times(model: nn.Module, data: Batches) -> dict[str, float]:
    """Medians of 3 interleaved rounds: fisher_diag, fisher_kfac (exact), curvlinops' type-2 factors."""
    fns: dict[str, Callable[[], Any]] = {
        "fisher_diag_exact": lambda: fisher_diag(model, data, kind="exact"),
        "fisher_kfac_exact": lambda: fisher_kfac(model, data, kind="exact"),
    }
    if curvlinops_factors(model, data[:1]) is not None:
        fns["curvlinops_type2"] = lambda: curvlinops_factors(model, data)
    times: dict[str, list[float]] = {m: [] for m in fns}
    for _ in range(3):
        for m, fn in fns.items():
            times[m].append(median_time(fn, repeats=1, warmup=0))
    return {m: sorted(t)[1] for m, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    args = p.parse_args()
    results: dict[str, Any] = {}
    for name in args.models:
        make, shape = MODELS[name]
        torch.manual_seed(0)
        model = make().to(args.device)
        data = batches(shape, args.samples, args.device)
        ours = fisher_kfac(model, data, kind="exact")
        estimation = estimation_times(model, data)
        row = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "estimation_s": estimation,
            "agreement": agreement(model, data, ours),
            "penalty_s": {f"{t}_tasks": penalty_times(model, data, t, args.repeats) for t in (1, 5)},
        }
        results[name] = row
        print(f"\n{name} ({row['parameters']:,} parameters, N={args.samples}, {args.device})")
        base = estimation["fisher_diag_exact"]
        for m, s in estimation.items():
            print(f"  estimation {m:22s} {s:8.3f} s  ({s / base:.2f}× fisher_diag exact)")
        for t, times in row["penalty_s"].items():
            d = times["diag"]
            print(
                f"  penalty step, {t}: " + ", ".join(f"{m} {v * 1e3:.3f} ms ({v / d:.2f}×)" for m, v in times.items())
            )
        for lib, rows in row["agreement"].items():
            print(f"  agreement with {lib}: {rows}")
    path = write_results(f"kfac_{args.device}.json", {"samples": args.samples, "results": results})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
