"""Permuted MNIST (Kirkpatrick et al. 2017, Fig. 2A): T tasks, each MNIST with its pixels shuffled
by a fixed permutation (task 1 unpermuted), learned one after the other by one network.

Setting: MLP 784-256-256-10 (ReLU, no normalisation layers; :func:`.models.permuted_mlp`),
Adam lr 1e-3 (a fresh optimizer per task), batch 100, 3 epochs per task, T = 5 (``--tasks``).
Permutations come from ``torch.Generator().manual_seed(1000 + seed)``. MNIST: the official
60000/10000 split when its train files exist, else the t10k file split 8000 train / 2000 test
(seed 0), as here. After each task, the model is tested on the test set of every task seen so
far.

Methods (keys of ``OUT/permuted.json``'s ``"permuted"``):

``none``
    Plain fine-tuning.
``l2``
    L2 to the previous weights: (λ/2) Σ_t ‖θ − θ*_t‖², one anchor per learned task — EWC with
    F = 1 (:class:`L2Anchor`, a plain-PyTorch penalty in this module), λ = 3e-4.
``ewc_exact``, ``ewc_empirical``, ``ewc_mc``
    ``EWC(model, λ, mode="separate")``, one (F_t, θ*_t) pair per task, with
    ``consolidate(loader, kind=...)`` on 2000 training images of the task just learned
    (``mc``: one label drawn per image, seeded). λ = 100 (exact), 300 (empirical), 100 (mc).
``kfac``, ``kfac_online`` (not in the default run; ``--methods``)
    Kronecker-factored EWC (Ritter et al. 2018): ``EWC(model, λ, structure="kfac")`` with the
    ``exact`` Fisher on the same 2000 images, one (A, G) pair per layer and task (``kfac``) or
    one folded pair per layer (``kfac_online``, γ = 1). λ = 3 for both, from the same validation
    sweep (its Kronecker penalty couples the weights of a layer, and is larger than the diagonal's
    for the same λ). ``--damping d`` adds √d · I to both factors of each task (Ritter et al.'s
    prior precision; default 0), ``--kfac-lam`` sets their λ.
``ekfac``, ``ekfac_online`` (not in the default run; ``--methods``)
    Eigenvalue-corrected KFAC (George et al. 2018): ``EWC(model, λ, structure="ekfac")``, the
    eigenbases of the same (A, G) with the corrected diagonal S from a second pass over the same
    2000 images (a fixed subset: a reshuffling loader would give the second pass other images),
    per task (``ekfac``) or folded (``ekfac_online``, γ = 1). λ = 3 as for KFAC (its S has the
    scale of the Kronecker eigenvalues; not swept on its own).
``ewc_batched``
    The seed article's estimator (square of each batch-mean gradient, ≈ 1/batch_size of the
    Fisher), from up to 300 batches of 100 (all 80 batches here), λ = 3e4 (the sweep's best lies,
    as expected, about batch_size × the exact kind's λ).

How λ was chosen (never on the test set): ``python -m ewc_rs.demo.sweep`` runs this same
protocol with the training images split 6000 train / 2000 validation (fixed seed) and reports
the final average *validation* accuracy over a grid of λ (half-decade steps) per method; the
values above are each method's best on that grid (the table is in :mod:`.sweep`'s docstring).
``--lam`` overrides
λ of the three EWC kinds with an exact-scale Fisher (exact, empirical, mc); the batched row then
uses 100 × that value; ``l2`` keeps its own.

Outputs: ``OUT/permuted.json`` = ``{"permuted": {method: [average accuracy over the tasks seen
so far, after each task]}, "matrix": {method: [[accuracy on task j after task i, j ≤ i] ...]},
"config": {the setting run}}``,
``OUT/permuted.png`` (average accuracy vs. number of tasks) and ``OUT/permuted_matrix.png``
(accuracy matrices as heat maps).

``--quick``: 3 tasks, 2000 training images per task, 2 epochs, Fisher from 1000 images: a smoke
test for CI and notebooks (seconds), not a result.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ewc_rs import EWC

from .models import permuted_mlp
from .train import TensorLoader, accuracy, load_data, subset, train_task

__all__ = [
    "ALL_METHODS",
    "METHODS",
    "PERMUTED_CONFIG",
    "QUICK_CONFIG",
    "L2Anchor",
    "make_tasks",
    "run_method",
    "run_permuted",
]

METHODS = ("none", "l2", "ewc_exact", "ewc_empirical", "ewc_mc", "ewc_batched")
#: Every method ``run_method`` knows; ``METHODS`` is the default run.
ALL_METHODS = (*METHODS, "kfac", "kfac_online", "ekfac", "ekfac_online")

KFAC_LAM = 3.0
KFAC_ONLINE_LAM = 3.0
EKFAC_LAM = 3.0
PERMUTED_CONFIG: dict[str, Any] = {
    "tasks": 5,
    "train_samples": None,  # all
    "epochs": 3,
    "batch_size": 100,
    "lr": 1e-3,
    # Chosen by the validation sweep (python -m ewc_rs.demo.sweep; see the module docstring).
    "lam": {
        "l2": 3e-4,
        "ewc_exact": 100.0,
        "ewc_empirical": 300.0,
        "ewc_mc": 100.0,
        "ewc_batched": 3e4,
        "kfac": KFAC_LAM,
        "kfac_online": KFAC_ONLINE_LAM,
        "ekfac": EKFAC_LAM,
        "ekfac_online": EKFAC_LAM,
    },
    "fisher_samples": 2000,
    "fisher_samples_batched": 30000,  # 300 batches of 100, capped by the data
    # kfac, kfac_online: d of (A + √d I) ⊗ (G + √d I), Ritter et al.'s prior precision on the factors.
    "kfac_damping": 0.0,
}
QUICK_CONFIG: dict[str, Any] = {
    **PERMUTED_CONFIG,
    "tasks": 3,
    "train_samples": 2000,
    "epochs": 2,
    "fisher_samples": 1000,
    "fisher_samples_batched": 2000,
}

Task = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class L2Anchor:
    """(λ/2) Σ_t ‖θ − θ*_t‖²: EWC with F = 1, one anchor θ*_t per consolidated task.

    Plain PyTorch (autograd does the gradient); the baseline Kirkpatrick et al. compare against.
    """

    def __init__(self, model: nn.Module, lam: float) -> None:
        self.model, self.lam = model, float(lam)
        self.anchors: list[list[torch.Tensor]] = []

    def consolidate(self) -> None:
        self.anchors.append([p.detach().clone() for p in self.model.parameters()])

    def penalty(self, model: nn.Module) -> torch.Tensor:
        params = list(model.parameters())
        total = params[0].new_zeros(())
        for anchor in self.anchors:
            total = total + sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
        return 0.5 * self.lam * total


def make_tasks(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    num_tasks: int,
    seed: int = 0,
) -> list[Task]:
    """``num_tasks`` permuted copies ``(x_train, y_train, x_test, y_test)`` with flat images
    ``[N, 784]``; task 0 keeps the pixel order, task t > 0 uses the t-th permutation drawn from
    ``torch.Generator().manual_seed(1000 + seed)``."""
    gen = torch.Generator().manual_seed(1000 + seed)
    flat_tr, flat_te = x_train.reshape(len(x_train), -1), x_test.reshape(len(x_test), -1)
    tasks = []
    for t in range(num_tasks):
        if t == 0:
            tasks.append((flat_tr, y_train, flat_te, y_test))
        else:
            perm = torch.randperm(flat_tr.shape[1], generator=gen).to(flat_tr.device)
            tasks.append((flat_tr[:, perm], y_train, flat_te[:, perm], y_test))
    return tasks


def run_method(
    method: str,
    tasks: Sequence[Task],
    cfg: dict[str, Any],
    *,
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
    progress: bool = False,
) -> list[list[float]]:
    """Learns ``tasks`` in order with one method; returns the accuracy matrix
    ``acc[i][j]`` = test accuracy on task j after learning task i (j ≤ i)."""
    if method not in ALL_METHODS:
        raise ValueError(f"method: expected one of {ALL_METHODS}, got {method!r}")
    model = permuted_mlp(seed).to(device)
    lam = cfg["lam"].get(method)
    reg: Any = None
    if method == "l2":
        reg = L2Anchor(model, lam)
    elif method.startswith("ewc_"):
        reg = EWC(model, lam, mode="separate")
    elif method.startswith(("kfac", "ekfac")):
        structure = method.split("_")[0]
        reg = EWC(model, lam, mode="online" if method.endswith("_online") else "separate", structure=structure)
    gen = torch.Generator().manual_seed(seed + 7)
    matrix: list[list[float]] = []
    for t, (xtr, ytr, _, _) in enumerate(tasks):
        loader = TensorLoader(xtr, ytr, cfg["batch_size"], shuffle=True, seed=seed * 100 + t)
        train_task(
            model,
            loader,
            epochs=cfg["epochs"],
            lr=cfg["lr"],
            penalty=None if reg is None else reg.penalty,
            progress=f"{method}, task {t + 1}" if progress else False,
        )
        matrix.append([accuracy(model, xte, yte) for (_, _, xte, yte) in tasks[: t + 1]])
        if t + 1 < len(tasks):  # consolidate the task just learned (not needed after the last)
            if method == "l2":
                reg.consolidate()
            elif method.startswith(("ewc_", "kfac", "ekfac")):
                kind = method[len("ewc_") :] if method.startswith("ewc_") else "exact"
                fisher_loader = TensorLoader(xtr, ytr, cfg["batch_size"], shuffle=True, seed=seed * 100 + 50 + t)
                if method.startswith("ekfac"):  # two passes: the same images in both
                    pick = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed * 100 + 50 + t))
                    pick = pick[: cfg["fisher_samples"]].to(xtr.device)
                    fisher_loader = TensorLoader(xtr[pick], ytr[pick], cfg["batch_size"])
                if kind == "batched":
                    reg.consolidate(
                        fisher_loader, kind="batched", num_samples=min(cfg["fisher_samples_batched"], len(xtr))
                    )
                else:
                    opts: dict[str, Any] = {"generator": gen} if kind == "mc" else {}
                    if method.startswith("kfac"):
                        opts["damping"] = cfg["kfac_damping"]
                    reg.consolidate(fisher_loader, kind=kind, num_samples=min(cfg["fisher_samples"], len(xtr)), **opts)
    return matrix


def averages(matrix: list[list[float]]) -> list[float]:
    """Average accuracy over the tasks seen so far, after each task."""
    return [sum(row) / len(row) for row in matrix]


def run_permuted(
    data: Optional[Union[str, Path]] = None,
    out: Union[str, Path] = "demo_out",
    *,
    quick: bool = False,
    tasks: Optional[int] = None,
    device: str = "cpu",
    seed: int = 0,
    lam: Optional[float] = None,
    methods: Sequence[str] = METHODS,
    progress: bool = False,
    verbose: bool = True,
    epochs: Optional[int] = None,
    kfac_lam: Optional[float] = None,
    damping: Optional[float] = None,
) -> dict[str, Any]:
    """Runs every method, prints the table, writes ``permuted.json``, ``permuted.png`` and
    ``permuted_matrix.png`` into ``out``. Without matplotlib the figures are skipped, and one
    line says how to get them.

    Args:
        data: folder with the MNIST IDX files (``--data``); None searches the usual places.
        out: output folder (created).
        quick: the small smoke-test setting.
        tasks: number of tasks (default 5; 3 in the quick setting).
        device: torch device.
        seed: seed of weights, batch order, permutations and MC draws.
        lam: λ of ewc_exact/empirical/mc (batched: 100 × lam); None keeps the chosen values.
        methods: which methods to run (:data:`ALL_METHODS`; default :data:`METHODS`).
        progress: tqdm bars.
        verbose: print the table and timings.
        epochs: epochs per task (default 3; quick: 2).
        kfac_lam: λ of kfac and kfac_online (default 3).
        damping: d ≥ 0 of kfac and kfac_online's factors, (A + √d I) ⊗ (G + √d I) (default 0).

    Returns:
        ``{"permuted": {method: [avg accuracy after each task]}, "matrix": {method: matrix}}``.
    """
    from .plots import plot_matrices, plot_permuted, plots_available

    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown or not methods:
        raise ValueError(
            f"--methods: expected names among {', '.join(ALL_METHODS)}; got {', '.join(methods) or 'none'}"
        )
    with_plots = plots_available()  # said now, not after minutes of training
    cfg = dict(QUICK_CONFIG if quick else PERMUTED_CONFIG)
    cfg["lam"] = dict(cfg["lam"])
    if tasks is not None:
        if tasks < 1:
            raise ValueError(f"--tasks: expected a positive number, got {tasks}")
        cfg["tasks"] = tasks
    if epochs is not None:
        if epochs < 1:
            raise ValueError(f"--epochs: expected a positive number, got {epochs}")
        cfg["epochs"] = epochs
    if kfac_lam is not None:
        cfg["lam"]["kfac"] = cfg["lam"]["kfac_online"] = float(kfac_lam)
    if damping is not None:
        if not damping >= 0:
            raise ValueError(f"--damping: expected a number >= 0, got {damping}")
        cfg["kfac_damping"] = float(damping)
    if lam is not None:
        for k in ("ewc_exact", "ewc_empirical", "ewc_mc"):
            cfg["lam"][k] = float(lam)
        cfg["lam"]["ewc_batched"] = 100.0 * float(lam)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = print if verbose else (lambda *a, **k: None)
    t_start = time.perf_counter()

    mnist = load_data("mnist", data, seed=0)
    say(mnist.note)
    xtr, ytr = subset(mnist.x_train, mnist.y_train, cfg["train_samples"], seed=seed)
    task_list = make_tasks(
        xtr.to(device), ytr.to(device), mnist.x_test.to(device), mnist.y_test.to(device), cfg["tasks"], seed=seed
    )

    curves: dict[str, list[float]] = {}
    matrices: dict[str, list[list[float]]] = {}
    for method in methods:
        t0 = time.perf_counter()
        matrices[method] = run_method(method, task_list, cfg, seed=seed, device=device, progress=progress)
        curves[method] = averages(matrices[method])
        say(f"  {method}: {time.perf_counter() - t0:.1f} s")

    setting = {k: cfg[k] for k in ("tasks", "epochs", "batch_size", "lr", "fisher_samples", "kfac_damping")}
    payload = {
        "permuted": curves,
        "matrix": matrices,
        "config": {**setting, "lam": {m: cfg["lam"].get(m) for m in methods}},
    }
    (out / "permuted.json").write_text(json.dumps(payload, indent=2) + "\n")
    written = [out / "permuted.json"]
    if with_plots:
        suffix = " (quick setting)" if quick else ""
        plot_permuted(curves, out / "permuted.png", title=f"Permuted MNIST, {cfg['tasks']} tasks{suffix}")
        plot_matrices(matrices, out / "permuted_matrix.png", title=f"Accuracy on task j after task i{suffix}")
        written += [out / "permuted.png", out / "permuted_matrix.png"]
    if verbose:
        print()
        print(format_permuted_table(curves, cfg["lam"]))
        print(
            f"\nwrote {', '.join(map(str, written))} "
            f"({time.perf_counter() - t_start:.1f} s in all{', quick setting' if quick else ''})"
        )
    return payload


def format_permuted_table(curves: dict[str, list[float]], lams: Optional[dict[str, float]] = None) -> str:
    """A Markdown table: one row per method, the average accuracy after each task."""
    n = max((len(c) for c in curves.values()), default=0)
    head = "| method | λ | " + " | ".join(f"after {t + 1}" for t in range(n)) + " |"
    lines = [head, "|---|---:|" + "---:|" * n]
    for method, c in curves.items():
        lam = (lams or {}).get(method)
        lam_s = "–" if lam is None else f"{lam:g}"
        lines.append(f"| {method} | {lam_s} | " + " | ".join(f"{v:.4f}" for v in c) + " |")
    return "\n".join(lines)
