"""Data-parallel EWC on one machine: bytes communicated and time at world size 1 vs 2.

Spawns ``world`` CPU processes with gloo (one intra-op thread each: world size 2 uses two cores
where world size 1 uses one; on a small shared machine more threads per process only spin) and,
for DDP and FSDP2 (``fully_shard`` on a CPU device mesh), per rank: a Fisher estimation over its
share of ``--samples`` samples (the union is the same at every world size), then penalty steps
(``zero_grad``, ``ewc.penalty(model).backward()``). The library's collectives
are read from ``ewc_rs.distributed``'s counter (calls and bytes per operation on one rank):

- target per estimation: one all-reduce of the Fisher's size (+ the count and a failure flag,
  12 bytes) and a 24-byte check
  that the ranks hold the same model; FSDP2 also gathers the full weights once;
- target per penalty step: nothing for DDP (replicated parameters), one 4-byte scalar for FSDP2.

Times: wall-clock medians over interleaved rounds, and the CPU time of rank 0's process (the
work split over the ranks, which a machine busy with other jobs does not blur as it blurs the
wall time: a rank waiting in a collective for a rank without a core is idle, not busy).

Model: the seed article's MLP (79.5k parameters) or ``permuted_mlp`` (269k). Writes
``benchmarks/results/distributed_cpu.json``.

Usage: ``python benchmarks/bench_distributed.py [--worlds 1 2] [--samples 8192] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

MODELS = ("seed_mlp", "permuted_mlp")


def _model(name: str) -> torch.nn.Module:
    from ewc_rs.demo.models import permuted_mlp, seed_model

    return seed_model(0) if name == "seed_mlp" else permuted_mlp(0)


def _batches(rank: int, world: int, samples: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(samples, 1, 28, 28, generator=g), torch.randint(0, 10, (samples,), generator=g)
    idx = list(range(rank, samples, world))
    return [(x[idx[i : i + batch]], y[idx[i : i + batch]]) for i in range(0, len(idx), batch)]


def _timed(fn: Any, repeats: int) -> tuple[float, float]:
    """Median wall time and median CPU time of this process (seconds) of ``fn()``."""
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def _wrap(mode: str, world: int, model: torch.nn.Module) -> torch.nn.Module:
    """DDP, or FSDP2 with each Linear layer and the root as units on a CPU mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    if mode == "ddp":
        return DistributedDataParallel(model)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _measure(model: torch.nn.Module, loader: list, args: argparse.Namespace) -> dict[str, Any]:
    """One rank's Fisher and penalty-step times and collectives."""
    import torch.distributed as dist

    from ewc_rs import EWC, distributed, fisher_diag

    def estimate() -> None:
        fisher_diag(model, loader, kind=args.kind)

    fisher_diag(model, loader[:1], kind=args.kind)  # warm-up
    distributed.reset_counter()
    estimate()
    fisher_comm = distributed.comm_stats()
    dist.barrier()
    fisher_s, fisher_cpu_s = _timed(estimate, args.repeats)
    ewc = EWC(model, lam=1.0)
    ewc.consolidate(loader[:1], kind=args.kind)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        ewc.penalty(model).backward()

    step()  # warm-up (builds the plan)
    distributed.reset_counter()
    step()
    penalty_comm = distributed.comm_stats()
    dist.barrier()
    penalty_s, _ = _timed(step, 20 * args.repeats)
    numel = sum(p.numel() for p in model.parameters())
    return {
        "fisher_s": fisher_s,
        "fisher_cpu_s": fisher_cpu_s,
        "penalty_step_s": penalty_s,
        "fisher_comm": fisher_comm,
        "penalty_comm": penalty_comm,
        "fisher_bytes_target": 4 * (numel + 7),  # F, 3 counts of 2 floats, the failure flag
    }


def _worker(rank: int, world: int, init_method: str, args: argparse.Namespace, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=init_method,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        loader = _batches(rank, world, args.samples, args.batch)
        result = {mode: _measure(_wrap(mode, world, _model(args.model)), loader, args) for mode in args.modes}
        if rank == 0:
            Path(out, f"world{world}.json").write_text(json.dumps(result))
        dist.barrier()  # leave together: a rank tearing gloo down while a peer still talks can abort it
    finally:
        dist.destroy_process_group()


def _rendezvous(out: str, world: int) -> str:
    """A file rendezvous new to this spawn: no TCP port to race for with other processes."""
    return f"file://{Path(out, f'rendezvous-{world}-{uuid.uuid4().hex}')}"


def _spawn(world: int, args: argparse.Namespace, out: str) -> dict[str, Any]:
    """One run at ``world`` ranks; rank 0's measurements."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        _worker, args=(world, _rendezvous(out, world), args, out), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + args.timeout
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise SystemExit(f"world size {world} did not finish in {args.timeout} s")
    except mp.ProcessExitedException:
        # gloo's teardown now and then aborts a process after its work is done (see
        # tests/parallel/test_distributed.py); without rank 0's result the run still fails.
        if not Path(out, f"world{world}.json").exists():
            raise
    return json.loads(Path(out, f"world{world}.json").read_text())  # type: ignore[no-any-return]


def _median_of_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per mode: the median times over the rounds (the collectives are the same in every round)."""
    out = {}
    for mode, first in rounds[0].items():
        out[mode] = {**first, "rounds": len(rounds)}
        for key in ("fisher_s", "fisher_cpu_s", "penalty_step_s"):
            out[mode][key] = statistics.median(r[mode][key] for r in rounds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--modes", nargs="+", default=["ddp", "fsdp2"], choices=["ddp", "fsdp2"])
    parser.add_argument("--model", default="seed_mlp", choices=MODELS)
    parser.add_argument("--kind", default="exact")
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the world sizes (median)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per world size")
    args = parser.parse_args()

    rounds: dict[str, list[dict[str, Any]]] = {str(w): [] for w in args.worlds}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as out:
        for _ in range(args.rounds):  # interleaved: a burst of load elsewhere hits every world size alike
            for world in args.worlds:
                rounds[str(world)].append(_spawn(world, args, out))
    per_world = {w: _median_of_rounds(rs) for w, rs in rounds.items()}
    for world, modes in per_world.items():
        for mode, r in modes.items():
            fc, pc = r["fisher_comm"], r["penalty_comm"]
            print(
                f"world {world} {mode:6s} Fisher {r['fisher_s'] * 1e3:8.1f} ms "
                f"(CPU {r['fisher_cpu_s'] * 1e3:.0f} ms/rank), "
                f"{fc['total_calls']} collectives "
                f"{fc['bytes']} (target {r['fisher_bytes_target']} B) | "
                f"penalty step {r['penalty_step_s'] * 1e6:7.1f} µs, {pc['bytes']}"
            )
    config = {k: getattr(args, k) for k in ("model", "kind", "samples", "batch", "repeats", "rounds")}
    payload = {"config": config, "load_avg_before": load_before, "results": per_world}
    path = write_results("distributed_cpu.json", payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
