"""Peak memory of a Fisher estimate on a torchvision ResNet-18, 224×224 inputs, batch 64 (CPU).

The issue's bound is 24 GiB on CPU. Per-sample work is chunked so that per-sample intermediates
stay under ``EWC_RS_CHUNK_MB`` (256 MiB by default); this script measures the process's peak
resident memory (``ru_maxrss``) around one ``fisher_diag`` call and prints it with the time.

Usage: ``python benchmarks/fisher_memory.py [--kind empirical] [--batch 64] [--size 224]``

``empirical`` runs one backward pass per batch; ``exact`` over ImageNet's 1000 classes runs 1000
(same peak memory, 1000× the time), so the default kind is ``empirical``.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ewc_rs  # noqa: E402
from common import write_results  # noqa: E402


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", default="empirical")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 1000, (args.batch,))
    before = peak_rss_gib()
    t0 = time.perf_counter()
    fisher = ewc_rs.fisher_diag(model, [(x, y)], kind=args.kind)
    seconds = time.perf_counter() - t0
    peak = peak_rss_gib()
    total = sum(f.numel() for f in fisher.values())
    print(
        f"resnet18, {args.size}x{args.size}, batch {args.batch}, kind={args.kind}: "
        f"{seconds:.1f} s, peak RSS {peak:.2f} GiB (before the call {before:.2f} GiB), "
        f"{len(fisher)} tensors, {total} Fisher entries, all finite: "
        f"{all(bool(torch.isfinite(f).all()) for f in fisher.values())}"
    )
    path = write_results(
        "fisher_memory_cpu.json",
        {
            "model": "resnet18",
            "size": args.size,
            "batch": args.batch,
            "kind": args.kind,
            "seconds": seconds,
            "peak_rss_gib": peak,
            "rss_before_gib": before,
        },
    )
    print(f"written {path}")


if __name__ == "__main__":
    main()
