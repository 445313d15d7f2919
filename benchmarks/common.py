"""Shared helpers for the benchmarks: timing (median of repeats) and result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def median_time(
    fn: Callable[[], Any],
    *,
    repeats: int = 5,
    warmup: int = 1,
    sync: bool = False,
    setup: Optional[Callable[[], Any]] = None,
) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs, after ``warmup`` runs.

    ``setup()``, when given, runs before each call, outside the timed region.
    """
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """Writes ``payload`` (plus machine facts) as JSON under ``benchmarks/results/``, or under
    ``$EWC_RS_BENCH_RESULTS`` when set (the smoke tests use it to leave the quoted files alone)."""
    folder = Path(os.environ.get("EWC_RS_BENCH_RESULTS", RESULTS))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    return path
