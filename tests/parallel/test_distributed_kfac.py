"""Kronecker-factored and EKFAC EWC under data parallelism: spawned gloo ranks (world 2, and 3 with
the last rank's shard empty), uneven shards. Every rank's factors (DDP, and ``group=``), and the
penalty and gradient of ``EWC(structure="kfac"|"ekfac")`` consolidated under DDP, equal the
single-process result on the union of the ranks' data; the estimation is one all-reduce; a rank
that fails makes every rank raise. The worker side is ``tests/helpers/kfac_workers.py``."""

from __future__ import annotations

import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

import distributed_workers as dw
import kfac_workers as kw
from ewc_rs import EWC, fisher_kfac
from reference import relative_error
from reference_kfac import reference_kfac

pytestmark = [
    pytest.mark.core,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed"),
]

JOIN_TIMEOUT_S = 200
TOL = 1e-4


def spawn(job: str, world: int, out: Path, seed: int) -> list[dict[str, Any]]:
    """Runs ``job`` on ``world`` spawned gloo ranks (file rendezvous); fails, never hangs."""
    init = f"file://{out / f'rendezvous-{job}-{world}-{uuid.uuid4().hex}'}"
    ctx = mp.start_processes(
        kw.run, args=(world, init, job, seed, str(out)), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"{job} at world size {world} did not finish in {JOIN_TIMEOUT_S} s (seed={seed})")
    except mp.ProcessExitedException:  # gloo's teardown abort after the results are saved (see test_distributed)
        if not all((out / f"{job}.{r}.pt").exists() for r in range(world)):
            raise
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    results = [torch.load(out / f"{job}.{r}.pt", weights_only=False) for r in range(world)]
    for r, res in enumerate(results):
        assert "exception" not in res, f"rank {r} of {job} (world {world}, seed={seed}) raised:\n{res['exception']}"
    return results


def _union(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = dw.make_data(seed)
    return [(x[i : i + dw.BATCH], y[i : i + dw.BATCH]) for i in range(0, len(x), dw.BATCH)]


def _close(got: dict[str, Any], want: dict[str, Any], what: str) -> None:
    assert set(got["kron"]) == set(want["kron"]) and set(got["diag"]) == set(want["diag"]), what
    for m, (a, g) in want["kron"].items():
        ga, gg = got["kron"][m]
        assert relative_error({"A": ga, "G": gg}, {"A": a, "G": g}) < TOL, f"{what}: layer {m}"
    assert relative_error(got["diag"], want["diag"]) < TOL, f"{what}: diagonal part"


def _single(seed: int, structure: str) -> tuple[dict[str, Any], float, dict[str, torch.Tensor]]:
    """One process, the union of the data: the estimate, and the penalty and gradient after the
    same perturbation as the ranks'."""
    net = dw.make_model(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ewc = EWC(net, lam=dw.LAM, structure=structure)
    est = ewc.consolidate(_union(seed))
    noise = dw.perturbation(seed, net)
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.add_(noise[n])
    value = ewc.penalty(net)
    value.backward()
    return est, float(value.detach()), {n: p.grad.clone() for n, p in net.named_parameters()}


@pytest.mark.parametrize("world", [2, 3])
def test_factors_and_penalties_equal_the_single_process_result_on_the_union(
    tmp_path: Path, seed: int, world: int
) -> None:
    results = spawn("kfac", world, tmp_path, seed)
    union = _union(seed)
    what = f"world {world} (seed={seed}{', last rank empty' if world == 3 else ''})"
    for kind in kw.KINDS:
        single = fisher_kfac(dw.make_model(seed), union, kind=kind)
        ref = reference_kfac(dw.make_model(seed), union, kind)
        _close(single, ref, f"single process vs float64 reference, {kind}")
        for r, res in enumerate(results):
            _close(res[f"ddp_{kind}"], single, f"{what}, rank {r}, DDP, {kind}")
            _close(res[f"group_{kind}"], single, f"{what}, rank {r}, group=, {kind}")
            calls = res[f"comm_{kind}"]["calls"]
            assert calls == {"model_check": 1, "fisher_all_reduce": 1}, f"{what}: {calls}"
    for structure in ("kfac", "ekfac"):
        est, pen, grads = _single(seed, structure)
        for r, res in enumerate(results):
            got = res[f"{structure}_estimate"]
            key = "kron" if structure == "kfac" else "ekfac"
            for m, factors in est[key].items():  # S (ekfac) is basis-invariant per entry up to signs: compare all
                for i, (a, b) in enumerate(zip(got[key][m], factors)):
                    if structure == "ekfac" and i < 2:  # eigenvectors: up to sign
                        a, b = a.abs(), b.abs()
                    assert relative_error({"t": a}, {"t": b}) < 1e-3, f"{what}, rank {r}, {structure} {m}[{i}]"
            assert abs(res[f"{structure}_penalty"] - pen) <= TOL * abs(pen), f"{what}, rank {r}, {structure} penalty"
            err = relative_error(res[f"{structure}_grads"], grads)
            assert err < 1e-3, f"{what}, rank {r}, {structure} gradient off by {err:.2e}"
    for r, res in enumerate(results):  # rank 0's labels are out of range: it says so, the others name it
        want = "other rank(s) of the process group" if r else "target"
        assert want in res["failure"], f"{what}, rank {r}: {res['failure']!r}"
