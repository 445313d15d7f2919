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


def pipelined_time(fn: Callable[[], Any], *, calls: int = 20, repeats: int = 5) -> float:
    """Seconds per call of ``calls`` back-to-back calls followed by one CUDA synchronisation (median
    over ``repeats``): the cost of a step in a training loop, where the host queues work ahead of
    the GPU, so host overhead is hidden behind device time when it is the smaller of the two."""
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


def device_kernel_time(fn: Callable[[], Any], prefixes: tuple[str, ...], *, calls: int = 10) -> Optional[float]:
    """GPU seconds per call spent in the CUDA kernels whose names start with one of ``prefixes``,
    as the profiler (CUPTI) records them over ``calls`` calls: the device's own time, without the
    host's. None when the profiler records no such kernel."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total_us = 0.0
    for event in prof.key_averages():
        if event.key.startswith(prefixes):
            total_us += getattr(event, "device_time_total", 0.0) or getattr(event, "cuda_time_total", 0.0)
    return total_us * 1e-6 / calls if total_us > 0 else None


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
