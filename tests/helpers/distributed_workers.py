"""The spawned side of ``tests/parallel/test_distributed.py``: one process per rank runs a job and saves
what it computed (Fisher, penalty, gradients, bytes communicated, errors) to ``<out>/<job>.<rank>.pt``;
the parent compares every rank's result with the float64 reference of ``tests/helpers/reference.py``.

The model, the data and their split over the ranks depend only on the seed, so the parent can
build the same model and the union of the ranks' data.
"""

from __future__ import annotations

import datetime
import os
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LAM = 3.0
N_SAMPLES = 11
BATCH = 3
IN, OUT = 4, 3
#: 5 rows: uneven FSDP2 shards at world sizes 2 (3 + 2) and 3 (2 + 2 + 1).
HIDDEN = 5
PG_TIMEOUT_S = 60
#: The Fisher kinds of ``kfac_job`` (``mc`` draws per rank, so its factors are not the union's).
KFAC_KINDS = ("exact", "empirical")


def make_model(seed: int, hidden: int = HIDDEN) -> nn.Sequential:
    """Linear → LayerNorm → Tanh → Linear, weights from ``seed`` (the global RNG is untouched)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(IN, hidden), nn.LayerNorm(hidden), nn.Tanh(), nn.Linear(hidden, OUT))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.7)
    return model


def make_data(seed: int) -> tuple[Tensor, Tensor]:
    """The union of the ranks' samples: ``N_SAMPLES`` inputs and labels."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(N_SAMPLES, IN, generator=g), torch.randint(0, OUT, (N_SAMPLES,), generator=g)


def rank_indices(rank: int, world: int, *, empty_last: bool) -> list[int]:
    """This rank's samples, strided as a ``DistributedSampler`` without shuffling; with
    ``empty_last`` the last rank (of at least 2) gets none and the others share all."""
    active = world - 1 if empty_last and world > 1 else world
    return list(range(rank, N_SAMPLES, active)) if rank < active else []


def rank_batches(seed: int, rank: int, world: int, *, empty_last: bool) -> list[tuple[Tensor, Tensor]]:
    x, y = make_data(seed)
    idx = rank_indices(rank, world, empty_last=empty_last)
    return [(x[idx[i : i + BATCH]], y[idx[i : i + BATCH]]) for i in range(0, len(idx), BATCH)]


def perturbation(seed: int, model: nn.Module) -> dict[str, Tensor]:
    """The weight change after consolidation, by parameter name (same on every rank)."""
    g = torch.Generator().manual_seed(seed + 2)
    return {n: torch.randn(p.shape, generator=g) * 0.3 for n, p in model.named_parameters()}


def train_batch(seed: int, rank: int) -> tuple[Tensor, Tensor]:
    """Rank ``rank``'s batch of the training step (2 samples)."""
    g = torch.Generator().manual_seed(seed + 100 + rank)
    return torch.randn(2, IN, generator=g), torch.randint(0, OUT, (2,), generator=g)


# ---------------------------------------------------------------------------------------- helpers
def _full(t: Tensor) -> Tensor:
    """A DTensor gathered (a collective: call on every rank), a plain tensor as it is; on CPU."""
    from ewc_rs._parallel import sharding

    return (t.full_tensor() if sharding.is_sharded(t) else t).detach().cpu()  # type: ignore[attr-defined]


def _grads(model: nn.Module) -> dict[str, Tensor]:
    from ewc_rs._parallel import sharding

    return {n: _full(p.grad) for n, p in sharding.named_parameters(model) if p.grad is not None}


def _zero_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def _perturb(model: nn.Module, seed: int) -> None:
    from ewc_rs._parallel import sharding

    noise = perturbation(seed, sharding.unwrap(model))
    with torch.no_grad():
        for n, p in sharding.named_parameters(model):
            d = noise[n].to(p.device)
            p.add_(sharding.shard_like(d, p) if sharding.is_sharded(p) else d)


def _fsdp_model(seed: int, world: int, device: torch.device, hidden: int = HIDDEN) -> nn.Module:
    """The model with its first Linear as one FSDP2 unit and the root (LayerNorm, last Linear) as another."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_model(seed, hidden).to(device)
    mesh = init_device_mesh(device.type, (world,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _training_step(model: nn.Module, ewc: Any, seed: int, rank: int, device: torch.device) -> dict[str, Tensor]:
    """One step's gradients: cross-entropy of this rank's batch (averaged over the ranks by DDP or
    FSDP2) plus the penalty through autograd."""
    _zero_grads(model)
    xb, yb = train_batch(seed, rank)
    loss = F.cross_entropy(model(xb.to(device)), yb.to(device)) + ewc.penalty(model)
    loss.backward()
    return _grads(model)


def _kfac_cpu(estimate: dict[str, Any]) -> dict[str, Any]:
    """A ``fisher_kfac`` (or kfac ``consolidate``) result on CPU: ``{"kron": {layer: (A, G)}, "diag": {name: F}}``."""
    return {
        "kron": {m: (a.detach().cpu(), g.detach().cpu()) for m, (a, g) in estimate["kron"].items()},
        "diag": {n: _full(f) for n, f in estimate["diag"].items()},
    }


def _penalty_checks(model: nn.Module, ewc: Any) -> dict[str, Any]:
    """Penalty value, autograd gradients and ``EWC.backward`` gradients, with their collectives."""
    from ewc_rs import distributed

    _zero_grads(model)
    distributed.reset_counter()
    value = ewc.penalty(model)
    value.backward()
    comm = distributed.comm_stats()
    grads = _grads(model)
    _zero_grads(model)
    distributed.reset_counter()
    value_b = ewc.backward(model)
    comm_b = distributed.comm_stats()
    return {
        "penalty": float(value.detach()),
        "grads": grads,
        "penalty_comm": comm,
        "backward_value": float(value_b),
        "backward_grads": _grads(model),
        "backward_comm": comm_b,
    }


# ------------------------------------------------------------------------------------------- jobs
def ddp_job(rank: int, world: int, seed: int, out: Path, device: torch.device) -> dict[str, Any]:
    """DDP: Fisher (last rank empty at world 3), consolidation, penalty, a training step, mc draws."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from ewc_rs import EWC, distributed, fisher_diag
    from ewc_rs._parallel import collectives

    model = make_model(seed).to(device)
    ddp = DistributedDataParallel(model)
    loader = rank_batches(seed, rank, world, empty_last=world == 3)
    distributed.reset_counter()
    fisher = fisher_diag(ddp, loader)
    result: dict[str, Any] = {
        "fisher": {n: _full(f) for n, f in fisher.items()},
        "fisher_comm": distributed.comm_stats(),
    }
    if world == 3:  # group=: ranks 0 and 1 hold every sample (rank 2 is empty), so their F is the same
        sub = dist.new_group([0, 1])
        if rank < 2:
            result["subgroup_fisher"] = fisher_diag(model, loader, group=sub)
    ewc = EWC(ddp, lam=LAM)
    ewc.consolidate(loader)
    _perturb(model, seed)
    result.update(_penalty_checks(ddp, ewc))
    result["step_grads"] = _training_step(ddp, ewc, seed, rank, device)
    if rank == 0:  # a replicated state: one rank writes; the parent loads it into the bare model
        ewc.save(str(out / "ddp.safetensors"))
    try:  # every rank's loader empty: the same error on every rank, no hang
        fisher_diag(ddp, [])
        result["all_empty_error"] = ""
    except ValueError as e:
        result["all_empty_error"] = str(e)
    torch.manual_seed(seed)
    result["mc_draw"] = torch.rand(4, generator=collectives.rank_generator(dist.group.WORLD, device)).cpu()
    return result


def fsdp_job(rank: int, world: int, seed: int, out: Path, device: torch.device) -> dict[str, Any]:
    """FSDP2: sharded Fisher (last rank empty at world 3), penalty, a training step, checkpoints."""
    from ewc_rs import EWC, checkpoint, distributed
    from ewc_rs._fisher.api import estimate
    from ewc_rs._fisher.options import parse_options
    from ewc_rs._parallel import sharding

    model = _fsdp_model(seed, world, device)
    loader = rank_batches(seed, rank, world, empty_last=world == 3)
    distributed.reset_counter()
    # The estimation behind fisher_diag, whose result says which parameters took the exact fallback
    # (under FSDP2 the layers must still get their rules).
    estimated = estimate(model, loader, parse_options("exact"))
    fisher = estimated.diag
    result: dict[str, Any] = {"fisher_comm": distributed.comm_stats(), "fallback": estimated.fallback}
    params = dict(sharding.named_parameters(model))
    result["layout"] = {
        n: (type(f).__name__, list(f.to_local().shape), list(params[n].to_local().shape))  # type: ignore[attr-defined]
        for n, f in fisher.items()
    }
    result["fisher"] = {n: _full(f) for n, f in fisher.items()}
    ewc = EWC(model, lam=LAM)
    ewc.consolidate(loader)
    stored = [t for task in ewc.state_dict()["tasks"] for d in (task["diagonal"], task["star"]) for t in d.values()]
    result["stored_local_numel"] = sum(sharding.local(t).numel() for t in stored)
    result["stored_full_numel"] = sum(t.numel() for t in stored)
    _perturb(model, seed)
    result.update(_penalty_checks(model, ewc))
    result["step_grads"] = _training_step(model, ewc, seed, rank, device)
    checkpoint.save(ewc, str(out / f"ckpt{world}"))
    ewc.save(str(out / f"ewc{world}.safetensors"))
    return result


def load_job(rank: int, world: int, seed: int, out: Path, device: torch.device) -> dict[str, Any]:
    """Loads the checkpoint of another world size (``<out>/source``: its world size) into an FSDP2
    model of this world size; checks misfitting states; saves its own checkpoint."""
    from torch.distributed.tensor import Replicate, distribute_tensor

    from ewc_rs import EWC, checkpoint

    source = int((out / "source").read_text())
    model = _fsdp_model(seed, world, device)
    _perturb(model, seed)
    ewc = EWC(model, lam=LAM)
    checkpoint.load(ewc, str(out / f"ckpt{source}"))
    result = _penalty_checks(model, ewc)
    result["file_penalty"] = float(EWC.load(str(out / f"ewc{source}.safetensors"), model).penalty(model))
    errors = []
    state = ewc.state_dict()
    name = next(iter(state["tasks"][0]["diagonal"]))
    f = state["tasks"][0]["diagonal"][name]
    bad_shape = {**state, "tasks": [{"diagonal": {name: torch.ones(7)}, "star": {name: torch.ones(7)}}]}
    replicated = distribute_tensor(f.full_tensor(), f.device_mesh, [Replicate()])
    bad_mesh = {**state, "tasks": [{"diagonal": {name: replicated}, "star": {name: replicated}}]}
    for bad in (bad_shape, bad_mesh):
        try:
            ewc.load_state_dict(bad)
            errors.append("")
        except ValueError as e:
            errors.append(str(e))
    try:  # a checkpoint of another model: the error comes before any tensor is read
        checkpoint.load(EWC(_fsdp_model(seed, world, device, hidden=HIDDEN + 1), lam=LAM), str(out / f"ckpt{source}"))
        errors.append("")
    except ValueError as e:
        errors.append(str(e))
    result["errors"] = errors
    result["penalty_after_errors"] = float(ewc.penalty(model))
    checkpoint.save(ewc, str(out / f"ckpt{world}"))
    ewc.save(str(out / f"ewc{world}.safetensors"))
    return result


def kfac_job(rank: int, world: int, seed: int, out: Path, device: torch.device) -> dict[str, Any]:
    """Kronecker-factored Fisher under data parallelism (uneven shards, last rank empty at world 3):
    ``fisher_kfac`` of each kind under DDP (default group), with ``group=`` and on the bare model
    (default group), over a subgroup; a rank failing mid-estimation, then a good estimation; ``EWC(structure="kfac")``
    consolidated under DDP, its penalty and gradients at the perturbed weights; the same for
    ``structure="ekfac"`` (two passes over the shards)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from ewc_rs import EWC, distributed, fisher_kfac

    model = make_model(seed).to(device)
    ddp = DistributedDataParallel(model)
    loader = rank_batches(seed, rank, world, empty_last=world == 3)
    result: dict[str, Any] = {}
    for kind in KFAC_KINDS:
        distributed.reset_counter()
        result[f"ddp_{kind}"] = _kfac_cpu(fisher_kfac(ddp, loader, kind=kind))
        result[f"ddp_{kind}_comm"] = distributed.comm_stats()
        distributed.reset_counter()
        result[f"group_{kind}"] = _kfac_cpu(fisher_kfac(model, loader, kind=kind, group=dist.group.WORLD))
        result[f"group_{kind}_comm"] = distributed.comm_stats()
    result["bare_exact"] = _kfac_cpu(fisher_kfac(model, loader))  # no DDP, no group=: the default group
    if world == 3:  # ranks 0 and 1 hold every sample (rank 2 is empty): their factors are the union's
        sub = dist.new_group([0, 1])
        if rank < 2:
            result["subgroup_exact"] = _kfac_cpu(fisher_kfac(model, loader, group=sub))
    # Rank 1's second batch has labels out of range: it raises its own error after a good batch,
    # the others learn of it from the final all-reduce instead of waiting; then all estimate again.
    bad: list[Any] = list(loader)
    if rank == 1:
        bad[1] = (bad[1][0], bad[1][1] + OUT)
    try:
        fisher_kfac(model, bad, kind="empirical")  # exact reads no labels
        result["failure"] = ""
    except ValueError as e:
        result["failure"] = str(e)
    result["after_failure"] = _kfac_cpu(fisher_kfac(model, loader, kind="empirical"))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="structure='kfac'", category=UserWarning)  # LayerNorm: diagonal
        ewc = EWC(ddp, lam=LAM, structure="kfac")
    distributed.reset_counter()
    result["consolidated"] = _kfac_cpu(ewc.consolidate(loader))
    result["consolidate_comm"] = distributed.comm_stats()
    _perturb(model, seed)
    result.update(_penalty_checks(ddp, ewc))
    # EKFAC under DDP: both passes (factors, then the corrected diagonal) over the ranks' shards.
    ek_model = make_model(seed).to(device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="structure='ekfac'", category=UserWarning)
        ekfac = EWC(DistributedDataParallel(ek_model), lam=LAM, structure="ekfac")
    ekfac.consolidate(loader)
    _perturb(ek_model, seed)
    value = ekfac.penalty(ek_model)
    value.backward()
    result["ekfac_penalty"] = float(value.detach())
    result["ekfac_grads"] = _grads(ek_model)
    return result


def mismatch_job(rank: int, world: int, seed: int, out: Path, device: torch.device) -> dict[str, Any]:
    """Rank 1 holds a wider model: ``fisher_diag`` must raise on every rank."""
    from ewc_rs import fisher_diag

    model = make_model(seed, hidden=HIDDEN + (rank == 1)).to(device)
    result = {"error": "", "batch_error": ""}
    try:
        fisher_diag(model, rank_batches(seed, rank, world, empty_last=False))
    except ValueError as e:
        result["error"] = str(e)
    # Then the same model, but rank 1's second batch is malformed: it raises its own error, and
    # rank 0 learns of it from the final all-reduce instead of waiting for rank 1 until the timeout.
    batches: list[Any] = rank_batches(seed, rank, world, empty_last=False)
    if rank == 1:
        batches[1] = (batches[1][0],)
    try:
        fisher_diag(make_model(seed).to(device), batches)
    except ValueError as e:
        result["batch_error"] = str(e)
    return result


JOBS: dict[str, Callable[[int, int, int, Path, torch.device], dict[str, Any]]] = {
    "ddp": ddp_job,
    "fsdp": fsdp_job,
    "load": load_job,
    "kfac": kfac_job,
    "mismatch": mismatch_job,
}


def run(rank: int, world: int, init_method: str, backend: str, job: str, seed: int, out: str) -> None:
    """One rank: joins the group, runs ``job`` and saves its result (or its exception) for the parent."""
    import torch.distributed as dist

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
    )
    try:
        try:
            result = JOBS[job](rank, world, seed, Path(out), device)
        except Exception as e:  # reported by the parent with the traceback
            result = {"exception": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
        torch.save(result, Path(out) / f"{job}.{rank}.pt")
        dist.barrier()  # leave together: a rank tearing gloo down while a peer still talks can abort it
    finally:
        dist.destroy_process_group()
