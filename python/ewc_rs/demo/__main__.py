"""Command line of the demo::

    python -m ewc_rs.demo seed     [--data DIR] [--out DIR] [--quick] [--device cpu] [--seed 0] [--lam 100]
    python -m ewc_rs.demo permuted [--data DIR] [--out DIR] [--quick] [--device cpu] [--seed 0] [--lam 1000]
                                   [--tasks 5] [--methods none,ewc_exact,kfac] [--epochs 3]
                                   [--kfac-lam 3] [--damping 0]
    python -m ewc_rs.demo merge    [--data DIR] [--out DIR] [--quick] [--device cpu] [--seed 0]
    python -m ewc_rs.demo fisher_kinds [--data DIR] [--out DIR] [--quick] [--seeds 5]
                                   [--datasets mnist,fashion-mnist] [--iterations 500]

Each prints a table and writes JSON plus PNG figures into ``--out`` (default ``demo_out``); without
matplotlib the figures are skipped, with one line saying how to get them.
Data problems (files missing, truncated, corrupt) are reported as one clear message, exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Optional


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ewc_rs.demo",
        description="Elastic Weight Consolidation demos: the seed article's MNIST → Fashion-MNIST table "
        "Kirkpatrick et al.'s permuted MNIST, Fisher-weighted merging (Matena & Raffel), and van de Ven's "
        "comparison of Fisher kinds on split MNIST / Fashion-MNIST.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data",
        metavar="DIR",
        default=None,
        help="folder holding the IDX files (mnist/, fashion-mnist/ or torchvision's "
        "MNIST/raw, FashionMNIST/raw); default: $EWC_RS_DATA, ~/.torch, "
        "Debian's /usr/share/datasets/fashion-mnist",
    )
    common.add_argument("--out", metavar="DIR", default="demo_out", help="output folder (default: demo_out)")
    common.add_argument("--quick", action="store_true", help="small subsets and 1 epoch: a smoke test, not a result")
    common.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    common.add_argument("--seed", type=int, default=0, help="seed of weights, batch order, permutations")
    common.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: $EWC_RS_THREADS or 1; see ewc_rs.demo.train.set_threads)",
    )
    common.add_argument("--progress", action="store_true", help="show tqdm progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{seed,permuted,merge,fisher_kinds}")
    p_seed = sub.add_parser("seed", parents=[common], help="MNIST → Fashion-MNIST, the seed article's table")
    p_seed.add_argument(
        "--lam", type=float, default=None, help="λ of the exact-Fisher rows (default 100; the batched row keeps 1e5)"
    )
    p_perm = sub.add_parser("permuted", parents=[common], help="permuted MNIST, six methods")
    p_perm.add_argument(
        "--lam",
        type=float,
        default=None,
        help="λ of ewc_exact, ewc_empirical, ewc_mc (batched: 100 × λ); default: the validation sweep's choice",
    )
    p_perm.add_argument("--tasks", type=int, default=None, help="number of tasks (default 5; quick: 3)")
    p_perm.add_argument(
        "--methods",
        default=None,
        help="comma-separated methods, e.g. none,ewc_exact,kfac (default: none, l2, ewc_exact, ewc_empirical, "
        "ewc_mc, ewc_batched; also kfac, kfac_online, ekfac, ekfac_online)",
    )
    p_perm.add_argument("--epochs", type=int, default=None, help="epochs per task (default 3; quick: 2)")
    p_perm.add_argument("--kfac-lam", type=float, default=None, help="λ of kfac and kfac_online (default 3)")
    p_perm.add_argument(
        "--damping",
        type=float,
        default=None,
        help="d of kfac, kfac_online: each task's factors (A + √d I) ⊗ (G + √d I), Ritter et al.'s prior (default 0)",
    )
    sub.add_parser("merge", parents=[common], help="two fine-tuned models merged by plain and by Fisher averaging")
    p_kinds = sub.add_parser(
        "fisher_kinds", parents=[common], help="which Fisher, which λ: van de Ven's split-MNIST comparison"
    )
    p_kinds.add_argument("--seeds", type=int, default=5, help="test seeds per variant (default 5; quick: 2)")
    p_kinds.add_argument(
        "--iterations", type=int, default=None, help="Adam steps per task (default 500; van de Ven: 2000)"
    )
    p_kinds.add_argument(
        "--datasets", default="mnist,fashion-mnist", help="comma-separated: mnist, fashion-mnist (default both)"
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .idx import DataError
    from .train import set_threads

    set_threads(args.threads)
    try:
        if args.command == "seed":
            from .seed import run_seed

            run_seed(
                args.data,
                args.out,
                quick=args.quick,
                device=args.device,
                seed=args.seed,
                lam=args.lam,
                progress=args.progress,
            )
        elif args.command == "fisher_kinds":
            from .fisher_kinds import run_fisher_kinds

            run_fisher_kinds(
                args.data,
                args.out,
                quick=args.quick,
                seeds=args.seeds,
                seed=args.seed,
                device=args.device,
                iterations=args.iterations,
                datasets=[d.strip() for d in args.datasets.split(",") if d.strip()],
            )
        elif args.command == "merge":
            from .merge import run_merge

            run_merge(args.data, args.out, quick=args.quick, device=args.device, seed=args.seed, progress=args.progress)
        else:
            from .permuted import METHODS, run_permuted

            methods = METHODS if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
            run_permuted(
                args.data,
                args.out,
                quick=args.quick,
                tasks=args.tasks,
                device=args.device,
                seed=args.seed,
                lam=args.lam,
                methods=methods,
                progress=args.progress,
                epochs=args.epochs,
                kfac_lam=args.kfac_lam,
                damping=args.damping,
            )
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
