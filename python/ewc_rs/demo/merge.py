"""Fisher-weighted merging (Matena & Raffel 2022) of two fine-tuned models: ``demo merge``.

Setting: the permuted-MNIST MLP (784-256-256-10, :func:`.models.permuted_mlp`) and data
(:func:`.permuted.make_tasks`). A base model learns task 0 (MNIST, pixels in order); two copies of
it are fine-tuned, one on task A (the first permutation), one on task B (the second), each with a
fresh Adam (lr 1e-3, batch 100; 3 epochs for the base and for each fine-tuning). Each fine-tuned
model's exact diagonal Fisher (:func:`ewc_rs.fisher_diag`) is estimated on ``fisher_samples``
training images of its own task. The two are then merged by plain averaging (θ = (θ_A + θ_B)/2) and
by Fisher averaging (:func:`ewc_rs.fisher_merge`, equal weights), and every model is tested on the
test sets of task A and task B.

Outputs: ``OUT/merge.json`` = ``{"accuracy": {model: {"task A": acc, "task B": acc, "mean": acc}},
"config": {...}}`` and ``OUT/merge.png`` (grouped bars). ``--quick``: 2000 training images a task,
one epoch each, Fisher from 500 images: a smoke test, not a result.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ewc_rs import fisher_diag, fisher_merge

from .models import permuted_mlp
from .permuted import make_tasks
from .train import TensorLoader, accuracy, load_data, subset, train_task

__all__ = ["MERGE_CONFIG", "QUICK_MERGE_CONFIG", "MODELS", "format_merge_table", "run_merge"]

MERGE_CONFIG: dict[str, Any] = {
    "train_samples": None,  # all
    "base_epochs": 3,
    "epochs": 3,
    "batch_size": 100,
    "lr": 1e-3,
    "finetune_lr": 1e-3,
    "fisher_samples": 2000,
}
QUICK_MERGE_CONFIG: dict[str, Any] = {
    **MERGE_CONFIG,
    "train_samples": 2000,
    "base_epochs": 1,
    "epochs": 1,
    "fisher_samples": 500,
}
#: The rows of the table, in order.
MODELS = ("fine-tuned on A", "fine-tuned on B", "plain average", "Fisher merge")


def run_merge(
    data: Optional[Union[str, Path]] = None,
    out: Union[str, Path] = "demo_out",
    *,
    quick: bool = False,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = False,
    verbose: bool = True,
) -> dict[str, Any]:
    """Trains the base and the two fine-tuned models, merges them two ways, prints the table and
    writes ``merge.json`` (and ``merge.png`` when matplotlib is there) into ``out``.

    Args:
        data: folder with the MNIST IDX files (``--data``); None searches the usual places.
        out: output folder (created).
        quick: the small smoke-test setting.
        device: torch device.
        seed: seed of weights, batch order and permutations.
        progress: tqdm bars.
        verbose: print the table and timings.

    Returns:
        ``{"accuracy": {model: {"task A", "task B", "mean"}}, "config": cfg}``.
    """
    from .plots import plot_merge, plots_available

    with_plots = plots_available()
    cfg = dict(QUICK_MERGE_CONFIG if quick else MERGE_CONFIG)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = print if verbose else (lambda *a, **k: None)
    t_start = time.perf_counter()
    mnist = load_data("mnist", data, seed=0)
    say(mnist.note)
    xtr, ytr = subset(mnist.x_train, mnist.y_train, cfg["train_samples"], seed=seed)
    tasks = make_tasks(xtr.to(device), ytr.to(device), mnist.x_test.to(device), mnist.y_test.to(device), 3, seed=seed)

    def loader(t: int, n: Optional[int] = None, shuffle: bool = True) -> TensorLoader:
        x, y = subset(tasks[t][0], tasks[t][1], n, seed=seed + t)
        return TensorLoader(x, y, batch_size=cfg["batch_size"], shuffle=shuffle, seed=seed + t)

    base = permuted_mlp(seed).to(device)
    train_task(base, loader(0), epochs=cfg["base_epochs"], lr=cfg["lr"], progress=progress and "base")
    tuned, fishers = [], []
    for t in (1, 2):
        model = copy.deepcopy(base)
        train_task(model, loader(t), epochs=cfg["epochs"], lr=cfg["finetune_lr"], progress=progress and f"task {t}")
        tuned.append(model)
        fishers.append(fisher_diag(model, loader(t, cfg["fisher_samples"], shuffle=False), kind="exact"))
    average = fisher_merge(tuned, None)
    merged = fisher_merge(tuned, fishers)
    models = dict(zip(MODELS, (*tuned, _loaded(base, average), _loaded(base, merged))))
    results: dict[str, dict[str, float]] = {}
    for name, net in models.items():
        acc = {f"task {k}": accuracy(net, tasks[t][2], tasks[t][3]) for k, t in (("A", 1), ("B", 2))}
        results[name] = {**acc, "mean": sum(acc.values()) / 2}
    results["base"] = {f"task {k}": accuracy(base, tasks[t][2], tasks[t][3]) for k, t in (("A", 1), ("B", 2))}
    results["base"]["mean"] = (results["base"]["task A"] + results["base"]["task B"]) / 2
    payload = {"accuracy": results, "config": cfg}
    (out / "merge.json").write_text(json.dumps(payload, indent=2) + "\n")
    written = [out / "merge.json"]
    if with_plots:
        plot_merge(results, out / "merge.png", title="Merging two fine-tuned models" + (" (quick)" if quick else ""))
        written.append(out / "merge.png")
    if verbose:
        print()
        print(format_merge_table(results))
        print(f"\nwrote {', '.join(map(str, written))} ({time.perf_counter() - t_start:.1f} s in all)")
    return payload


def _loaded(base: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = copy.deepcopy(base)
    model.load_state_dict(state)
    return model


def format_merge_table(results: dict[str, dict[str, float]]) -> str:
    """A Markdown table: one row per model, its test accuracy on task A, task B and their mean."""
    lines = ["| model | task A | task B | mean |", "|---|---:|---:|---:|"]
    for name in ("base", *MODELS):
        r = results[name]
        lines.append(f"| {name} | {r['task A']:.4f} | {r['task B']:.4f} | {r['mean']:.4f} |")
    return "\n".join(lines)
