"""Data-parallel and sharded EWC (issue #11): spawned processes, one per rank, with gloo on CPU
(NCCL on GPUs when there are enough), world sizes 2 and 3, DDP and FSDP2.

Every rank's Fisher, penalty value and gradient is compared with the float64 single-process
reference (``tests/helpers/reference.py``) over the union of the ranks' samples; the collectives are
counted (``ewc_rs.distributed``); checkpoints are re-sharded 2 → 1 → 3. Every process and join has
a timeout (and the process group one of 60 s): a hang fails the test instead of blocking it.
The worker side is ``tests/helpers/distributed_workers.py``.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import distributed_workers as w
import ewc_rs
from ewc_rs import EWC
from reference import naive_penalty, reference_fisher, relative_error
from reference_kfac import kron_penalty, reference_kfac, weight_matrix

pytestmark = [
    pytest.mark.core,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed"),
]

#: Seconds a spawn may take (start-up of up to 3 processes on 2 busy cores included).
JOIN_TIMEOUT_S = 150
TOL = 1e-4
BACKENDS = [
    "gloo",
    pytest.param(
        "nccl",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available() or torch.cuda.device_count() < 2,
            reason="NCCL needs one CUDA device per rank (at least 2); this machine has "
            f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}",
        ),
    ),
]


def _rendezvous(out: Path, job: str, world: int) -> str:
    """A file rendezvous new to this spawn: no TCP port to race for with other processes."""
    return f"file://{out / f'rendezvous-{job}-{world}-{uuid.uuid4().hex}'}"


def spawn(job: str, world: int, out: Path, seed: int, backend: str = "gloo") -> list[dict[str, Any]]:
    """Runs ``job`` on ``world`` spawned ranks; returns each rank's result. Fails (never hangs)
    when a rank does not finish in time or raised."""
    if backend == "nccl" and torch.cuda.device_count() < world:
        pytest.skip(f"NCCL at world size {world} needs {world} CUDA devices, found {torch.cuda.device_count()}")
    ctx = mp.start_processes(
        w.run,
        args=(world, _rendezvous(out, job, world), backend, job, seed, str(out)),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"{job} at world size {world} did not finish in {JOIN_TIMEOUT_S} s (seed={seed})")
    except mp.ProcessExitedException:
        # gloo's teardown (destroy_process_group, interpreter exit) now and then aborts a process
        # with "terminate called without an active exception" after its work is done. A crash
        # before every rank saved its result still fails the test (the files are missing).
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


# ------------------------------------------------------------------------------ references
def ref_fisher(seed: int) -> dict[str, torch.Tensor]:
    x, y = w.make_data(seed)
    return reference_fisher(w.make_model(seed), [(x, y)], kind="exact")


def ref_penalty(seed: int, fisher: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor], Any]:
    """Value and gradient of the penalty at the perturbed weights, and the perturbed model."""
    model = w.make_model(seed).double()
    star = {n: p.detach().clone() for n, p in model.named_parameters()}
    noise = w.perturbation(seed, model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(noise[n].double())
    value = naive_penalty(model, star, fisher, w.LAM)
    value.backward()
    return float(value.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}, model


def ref_step_grads(seed: int, world: int, fisher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cross-entropy gradients averaged over the ranks' batches, plus the penalty's gradient."""
    _, pen_grads, model = ref_penalty(seed, fisher)
    grads = {n: g.clone() for n, g in pen_grads.items()}
    for r in range(world):
        model.zero_grad()
        x, y = w.train_batch(seed, r)
        F.cross_entropy(model(x.double()), y).backward()
        for n, p in model.named_parameters():
            grads[n] += p.grad / world
    return grads


def fisher_bytes(fisher: dict[str, torch.Tensor]) -> int:
    """One float32 all-reduce of every F, the counts (the divisor, samples and tokens: 2 floats
    each) and the failure flag."""
    return 4 * (sum(f.numel() for f in fisher.values()) + 7)


def ref_kfac(seed: int, kind: str) -> dict[str, Any]:
    """The single-process ``fisher_kfac`` on the union of the ranks' samples (one batch)."""
    x, y = w.make_data(seed)
    return ewc_rs.fisher_kfac(w.make_model(seed), [(x, y)], kind=kind)


def ref_kfac_penalty(seed: int, structure: str = "kfac") -> tuple[float, dict[str, torch.Tensor]]:
    """A single-process ``EWC(structure=...)`` ("kfac" or "ekfac") consolidated on the union:
    penalty value and gradient at the perturbed weights."""
    x, y = w.make_data(seed)
    model = w.make_model(seed)
    with pytest.warns(UserWarning, match="LayerNorm"):  # the LayerNorm stays diagonal
        ewc = EWC(model, lam=w.LAM, structure=structure)
    ewc.consolidate([(x, y)])
    noise = w.perturbation(seed, model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(noise[n])
    value = ewc.penalty(model)
    value.backward()
    return float(value.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


def ref_kfac_penalty_float64(seed: int, factors: dict[str, Any]) -> tuple[float, dict[str, torch.Tensor]]:
    """½λ Σ_layers vec(ΔW̃)ᵀ (A ⊗ G) vec(ΔW̃) (materialised) + the diagonal rest, in float64 with
    ``reference_kfac``'s factors, and its gradient, at the perturbed weights."""
    model = w.make_model(seed).double()
    layers = {m: model.get_submodule(m) for m in factors["kron"]}
    star_w = {m: weight_matrix(mod) for m, mod in layers.items()}
    star = {n: p.detach().clone() for n, p in model.named_parameters()}
    noise = w.perturbation(seed, model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(noise[n].double())
    value = naive_penalty(model, {n: star[n] for n in factors["diag"]}, factors["diag"], w.LAM).double()
    for m, (a, g) in factors["kron"].items():
        mod = layers[m]
        cur = torch.cat([mod.weight.reshape(mod.weight.shape[0], -1), mod.bias[:, None]], 1)
        value = value + kron_penalty(cur - star_w[m], a, g, w.LAM)
    value.backward()
    return float(value.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


def kfac_fisher_bytes(model: torch.nn.Module, factors: dict[str, Any]) -> int:
    """One float32 all-reduce: the diagonal sums of every parameter, A and G of every layer, and the
    counts (2 floats each: the divisor, samples, tokens, whether the rank saw data, input rows and
    the site vote per layer) with the failure flag."""
    n_params = sum(p.numel() for p in model.parameters())
    n_factors = sum(a.numel() + g.numel() for a, g in factors["kron"].values())
    return 4 * (n_params + n_factors + 1 + 2 * (4 + 2 * len(factors["kron"])))


def check_kfac(got: dict[str, Any], want: dict[str, Any], what: str) -> None:
    """Every factor (each on its own) and the diagonal rest within ``TOL`` relative error."""
    assert set(got["kron"]) == set(want["kron"]), f"{what}: layers {sorted(got['kron'])} vs {sorted(want['kron'])}"
    assert set(got["diag"]) == set(want["diag"]), f"{what}: diagonal {sorted(got['diag'])} vs {sorted(want['diag'])}"
    for m, (a, g) in want["kron"].items():
        for factor, x, ref in (("A", got["kron"][m][0], a), ("G", got["kron"][m][1], g)):
            assert x.dtype == torch.float32 and x.shape == ref.shape, f"{what}: {factor} of '{m}' {x.dtype} {x.shape}"
            err = relative_error({factor: x}, {factor: ref})
            assert err < TOL, f"{what}: {factor} of layer '{m}' off by {err:.2e}"
    err = relative_error(got["diag"], want["diag"])
    assert err < TOL, f"{what}: diagonal part off by {err:.2e}"


def check_penalty(res: dict[str, Any], rank: int, pen: float, grads: dict[str, torch.Tensor], what: str) -> None:
    assert abs(res["penalty"] - pen) <= TOL * abs(pen), f"{what}: rank {rank} penalty {res['penalty']} vs {pen}"
    assert abs(res["backward_value"] - pen) <= TOL * abs(pen), f"{what}: rank {rank} EWC.backward value"
    err = relative_error(res["grads"], grads)
    assert err < TOL, f"{what}: rank {rank} penalty gradient off by {err:.2e}"
    err = relative_error(res["backward_grads"], grads)
    assert err < TOL, f"{what}: rank {rank} EWC.backward gradient off by {err:.2e}"


# ------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [2, 3])
def test_ddp_fisher_penalty_and_step_match_the_reference(tmp_path: Path, seed: int, world: int, backend: str) -> None:
    results = spawn("ddp", world, tmp_path, seed, backend)
    fisher = ref_fisher(seed)
    pen, grads, _ = ref_penalty(seed, fisher)
    step = ref_step_grads(seed, world, fisher)
    for r, res in enumerate(results):
        what = f"DDP world {world} (seed={seed}{', last rank empty' if world == 3 else ''})"
        assert set(res["fisher"]) == set(fisher), f"{what}: keys are the inner module's names"
        err = relative_error(res["fisher"], fisher)
        assert err < TOL, f"{what}: rank {r} Fisher off by {err:.2e}"
        comm = res["fisher_comm"]
        assert comm["calls"] == {"model_check": 1, "fisher_all_reduce": 1}, f"{what}: {comm}"
        assert comm["bytes"]["fisher_all_reduce"] == fisher_bytes(fisher), f"{what}: {comm}"
        check_penalty(res, r, pen, grads, what)
        assert res["penalty_comm"]["total_calls"] == 0, f"{what}: replicated penalty needs no collective"
        assert res["backward_comm"]["total_calls"] == 0, f"{what}: replicated penalty needs no collective"
        err = relative_error(res["step_grads"], step)
        assert err < TOL, f"{what}: rank {r} training-step gradient (DDP average + penalty) off by {err:.2e}"
        if world == 3 and r < 2:
            err = relative_error(res["subgroup_fisher"], fisher)
            assert err < TOL, f"{what}: rank {r} Fisher over group=new_group([0, 1]) off by {err:.2e}"
        assert "loaders of all ranks produced no batches" in res["all_empty_error"], (
            f"{what}: {res['all_empty_error']!r}"
        )
    bare = w.make_model(seed)
    noise = w.perturbation(seed, bare)
    with torch.no_grad():
        for n, p in bare.named_parameters():
            p.add_(noise[n])
    loaded = float(EWC.load(str(tmp_path / "ddp.safetensors"), bare).penalty(bare).detach())
    assert abs(loaded - pen) <= TOL * pen, f"DDP state loaded into the bare model: {loaded} vs {pen} (seed={seed})"
    draws = [res["mc_draw"] for res in results]
    assert all(not torch.equal(draws[0], d) for d in draws[1:]), f"mc draws repeat across ranks (seed={seed})"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp2_sharded_fisher_penalty_and_resharded_checkpoints(tmp_path: Path, seed: int, backend: str) -> None:
    fisher = ref_fisher(seed)
    pen, grads, _ = ref_penalty(seed, fisher)
    n_params = sum(f.numel() for f in fisher.values())
    for world, job, source in ((2, "fsdp", None), (1, "load", 2), (3, "load", 1), (3, "fsdp", None)):
        (tmp_path / "source").write_text(str(source))  # the world size whose checkpoint a load reads
        results = spawn(job, world, tmp_path, seed, backend)
        what = f"FSDP2 {job} world {world}" + (f" from world {source}" if source else "") + f" (seed={seed})"
        for r, res in enumerate(results):
            check_penalty(res, r, pen, grads, what)
            assert res["penalty_comm"]["calls"] == {"penalty_all_reduce": 1}, f"{what}: {res['penalty_comm']}"
            assert res["penalty_comm"]["bytes"] == {"penalty_all_reduce": 4}, f"{what}: {res['penalty_comm']}"
            assert res["backward_comm"]["calls"] == {"penalty_all_reduce": 1}, f"{what}: {res['backward_comm']}"
            if job == "load":
                assert abs(res["file_penalty"] - pen) <= TOL * pen, f"{what}: EWC.load of the gathered file"
                shape_err, mesh_err, model_err = res["errors"]
                assert "stored with shape" in model_err, f"{what}: rank {r}: checkpoint of another model: {model_err!r}"
                assert "shape" in shape_err, f"{what}: rank {r}: a misfit state must raise: {shape_err!r}"
                assert "mesh" in mesh_err and "checkpoint" in mesh_err, f"{what}: rank {r}: {mesh_err!r}"
                assert abs(res["penalty_after_errors"] - pen) <= TOL * pen, f"{what}: a failed load changed the state"
                continue
            err = relative_error(res["fisher"], fisher)
            assert err < TOL, f"{what}: rank {r} Fisher off by {err:.2e}"
            assert res["fallback"] == [], f"{what}: rank {r}: FSDP2 layers lost their rules: {res['fallback']}"
            for n, (kind, f_local, p_local) in res["layout"].items():
                assert kind == "DTensor" and f_local == p_local, f"{what}: rank {r} F of '{n}' is {kind} {f_local}"
            comm = res["fisher_comm"]
            assert comm["calls"]["fisher_all_reduce"] == 1 and comm["calls"]["model_check"] == 1, f"{what}: {comm}"
            assert comm["bytes"]["fisher_all_reduce"] == fisher_bytes(fisher), f"{what}: {comm}"
            assert comm["bytes"]["all_gather"] == 4 * n_params, f"{what}: the weights are gathered once: {comm}"
            assert res["stored_full_numel"] == 2 * n_params
            largest_shard = sum(
                -(-f.shape[0] // world) * f[0].numel() for f in fisher.values()
            )  # ceil(rows/world) rows
            assert res["stored_local_numel"] <= 2 * largest_shard, f"{what}: rank {r} stores more than its shards"
            step = ref_step_grads(seed, world, fisher)
            err = relative_error(res["step_grads"], step)
            assert err < TOL, f"{what}: rank {r} training-step gradient off by {err:.2e}"


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_and_group_kfac_equal_the_single_process_factors_on_the_union(
    tmp_path: Path, seed: int, world: int
) -> None:
    """Under DDP, ``group=`` (also a subgroup) and the default group, every rank's A, G and diagonal
    rest are the single process's on the union (uneven shards, last rank empty at world 3), in one
    all-reduce; so are the penalty and gradients of ``EWC(structure="kfac")`` consolidated under
    DDP, and of ``EWC(structure="ekfac")`` (both of its passes over the shards). A rank whose labels
    are out of range mid-estimation makes every rank raise, no hang."""
    results = spawn("kfac", world, tmp_path, seed)
    what = f"KFAC world {world} (seed={seed}{', last rank empty' if world == 3 else ''})"
    single = {kind: ref_kfac(seed, kind) for kind in w.KFAC_KINDS}
    x, y = w.make_data(seed)
    for kind in w.KFAC_KINDS:  # the single-process factors themselves: against the float64 reference
        check_kfac(single[kind], reference_kfac(w.make_model(seed), [(x, y)], kind), f"single process {kind}")
    pen, grads = ref_kfac_penalty(seed)
    pen64, grads64 = ref_kfac_penalty_float64(seed, reference_kfac(w.make_model(seed), [(x, y)], "exact"))
    assert abs(pen - pen64) <= TOL * abs(pen64), f"single-process kfac penalty {pen} vs float64 {pen64} (seed={seed})"
    err = relative_error(grads, grads64)
    assert err < TOL, f"single-process kfac penalty gradient off the float64 one by {err:.2e} (seed={seed})"
    want_bytes = kfac_fisher_bytes(w.make_model(seed), single["exact"])
    ek_pen, ek_grads = ref_kfac_penalty(seed, "ekfac")
    for r, res in enumerate(results):
        at = f"{what}, rank {r}"
        for kind in w.KFAC_KINDS:
            for how in ("ddp", "group"):
                check_kfac(res[f"{how}_{kind}"], single[kind], f"{at}, {how} {kind}")
                comm = res[f"{how}_{kind}_comm"]
                assert comm["calls"] == {"model_check": 1, "fisher_all_reduce": 1}, f"{at}, {how} {kind}: {comm}"
                assert comm["bytes"]["fisher_all_reduce"] == want_bytes, f"{at}, {how} {kind}: {comm}"
        check_kfac(res["bare_exact"], single["exact"], f"{at}, bare model under the default group")
        if world == 3 and r < 2:
            check_kfac(res["subgroup_exact"], single["exact"], f"{at}, group=new_group([0, 1])")
        check_kfac(res["consolidated"], single["exact"], f"{at}, EWC(structure='kfac').consolidate under DDP")
        comm = res["consolidate_comm"]
        assert comm["calls"] == {"model_check": 1, "fisher_all_reduce": 1}, f"{at}, consolidate: {comm}"
        check_penalty(res, r, pen, grads, f"{what}, EWC(structure='kfac') under DDP")
        assert res["penalty_comm"]["total_calls"] == 0, f"{at}: replicated penalty needs no collective"
        assert res["backward_comm"]["total_calls"] == 0, f"{at}: replicated penalty needs no collective"
        msg = res["failure"]
        if r == 1:
            assert "labels must lie in" in msg, f"{at}: rank 1 raises its own error: {msg!r}"
        else:
            assert "failed on 1 other rank" in msg, f"{at}: learns of rank 1's failure: {msg!r}"
        check_kfac(res["after_failure"], single["empirical"], f"{at}, the estimation after the failed one")
        got = res["ekfac_penalty"]
        assert abs(got - ek_pen) <= TOL * abs(ek_pen), f"{at}: EKFAC penalty {got} vs single process {ek_pen}"
        err = relative_error(res["ekfac_grads"], ek_grads)
        assert err < 1e-3, f"{at}: EKFAC penalty gradient off the single process's by {err:.2e}"


def test_different_models_or_a_failing_rank_raise_on_every_rank(tmp_path: Path, seed: int) -> None:
    results = spawn("mismatch", 2, tmp_path, seed)
    for r, res in enumerate(results):
        msg = res["error"]
        assert "different models" in msg and "rank 1" in msg and "0.weight" in msg, f"rank {r} (seed={seed}): {msg!r}"
    own, other = results[1]["batch_error"], results[0]["batch_error"]
    assert "batch 1 must be a pair" in own, f"rank 1 raises its own error (seed={seed}): {own!r}"
    assert "failed on 1 other rank" in other, f"rank 0 learns of rank 1's failure (seed={seed}): {other!r}"


def test_group_without_an_initialised_process_group_is_refused(seed: int) -> None:
    assert not torch.distributed.is_initialized(), "the test process itself never joins a group"
    model = w.make_model(seed)
    with pytest.raises(ValueError, match="group: given, but torch.distributed has no initialised process group"):
        ewc_rs.fisher_diag(model, w.rank_batches(seed, 0, 1, empty_last=False), group=object())
