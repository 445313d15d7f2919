"""The spawned side of ``tests/parallel/test_distributed_kfac.py``: each rank estimates Kronecker
(and EKFAC) factors over its own shard of ``distributed_workers``' data, under DDP, with ``group=``
and through ``EWC.consolidate``, and saves what it got to ``<out>/<job>.<rank>.pt``."""

from __future__ import annotations

import datetime
import os
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from distributed_workers import LAM, PG_TIMEOUT_S, make_model, perturbation, rank_batches
from ewc_rs import EWC, distributed, fisher_kfac

KINDS = ("exact", "empirical")


def _cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {k: _cpu(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_cpu(v) for v in x)
    return x


def kfac_job(rank: int, world: int, seed: int) -> dict[str, Any]:
    """Factors of each kind under DDP (default group) and with ``group=``; EWC(structure=kfac/ekfac)
    consolidated under DDP, its penalty and gradient at the perturbed weights (same on every rank)."""
    loader = rank_batches(seed, rank, world, empty_last=world == 3)
    model = make_model(seed)
    ddp = DistributedDataParallel(model)
    result: dict[str, Any] = {}
    for kind in KINDS:
        distributed.reset_counter()
        result[f"ddp_{kind}"] = _cpu(fisher_kfac(ddp, loader, kind=kind))
        result[f"comm_{kind}"] = distributed.comm_stats()
        result[f"group_{kind}"] = _cpu(fisher_kfac(model, loader, kind=kind, group=dist.group.WORLD))
    noise = perturbation(seed, model)
    for structure in ("kfac", "ekfac"):
        net = make_model(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the LayerNorm stays diagonal
            ewc = EWC(DistributedDataParallel(net), lam=LAM, structure=structure)
        result[f"{structure}_estimate"] = _cpu(ewc.consolidate(loader))
        with torch.no_grad():
            for n, p in net.named_parameters():
                p.add_(noise[n])
        value = ewc.penalty(net)
        value.backward()
        result[f"{structure}_penalty"] = float(value.detach())
        result[f"{structure}_grads"] = {n: p.grad.detach().clone() for n, p in net.named_parameters()}
    try:  # a rank whose batch is malformed: every rank raises, none hangs
        bad = loader if rank != 0 else [(loader[0][0], loader[0][1] + 100)]
        fisher_kfac(model, bad, kind="empirical")  # exact reads no labels
        result["failure"] = ""
    except ValueError as e:
        result["failure"] = str(e)
    return result


def run(rank: int, world: int, init_method: str, job: str, seed: int, out: str) -> None:
    """One rank on gloo: joins the group, runs the job and saves its result (or its exception)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=PG_TIMEOUT_S)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world, timeout=timeout)
    try:
        try:
            result = {"kfac": kfac_job}[job](rank, world, seed)
        except Exception as e:  # reported by the parent with the traceback
            result = {"exception": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
        torch.save(result, Path(out) / f"{job}.{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
