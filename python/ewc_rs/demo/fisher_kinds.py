"""Which Fisher, which λ: van de Ven's (2025) comparison of Fisher kinds on split MNIST and split Fashion-MNIST.

    python -m ewc_rs.demo fisher_kinds [--data DIR] [--out DIR] [--seeds 5] [--datasets mnist,fashion-mnist] [--quick]

Protocol (van de Ven 2025, "On the computation of the Fisher information in continual learning",
arXiv 2502.11756, split MNIST): 5 tasks of 2 classes ((0, 1), (2, 3), ...), learned one after the
other by an MLP 784-400-400 (ReLU) with a 10-unit output layer; Adam (lr 0.001, β 0.9/0.999, a
fresh optimizer per task), 2000 iterations of batch 128 per task (here 500 by default, see
:class:`Config`; ``--iterations 2000`` for his number); online EWC (γ = 1), the Fisher
of each task estimated on all of its training images after it is learned.

- *Task-incremental* (the main table): one softmax head per task, i.e. only the task's two output
  units are active (its logits ``out[:, 2t:2t+2]``), labels 0/1 within the task, the task is known
  at test time.
- *Class-incremental* (an extra column for ``exact`` and ``none``): one shared head, no task labels;
  the softmax runs over every class seen so far, and the test asks for the digit among all 10.

Fisher variants (:data:`VARIANTS`): ``exact`` (expectation over the model's predictive
distribution), ``exact_500`` (the same on 500 images of the task), ``mc`` (one label drawn per
image), ``empirical`` (the data's label), ``batched`` (squares of the gradients of batches of 128,
the estimator most code uses: about 1/128 of the Fisher), and ``none`` (no EWC).

λ per variant is chosen on validation data, never on the test set: each data set's training images
are split again (fixed seed) into 80% for training and 20% for validation, and every variant runs
seed ``--seed`` (0) over a search of λ: decades around a start, extended while the best is at an
edge, then the two half-decades beside the best (:func:`_search`); the λ with the best final
average validation accuracy is kept. ``exact`` starts at 1e3; every other variant starts at
exact's chosen λ translated by the Fisher masses (:func:`ewc_rs.equivalent_lam`, rounded to a
decade) — where its search begins, not its result. Then ``--seeds`` seeds (``--seed`` + 1, + 2, …;
new weights, batch order and draws) train on the same 80% and are tested on the test split. The
model after task 1 does not depend on λ or on the variant, so it is trained once per seed and reused.

Data: MNIST here is the 10000-image t10k file split 8000 / 2000 (the official training files are
not on this machine; :func:`.datasets.load_split`), so a task has ≈ 1280 training images
(van de Ven: ≈ 12000); Fashion-MNIST is the full 60000 / 10000.

Also recorded (validation seed, task 1's training images, the model after task 1): each variant's
Fisher mass Σ_i F_i, which :func:`ewc_rs.equivalent_lam` translates λ with; the docs compare the
ratios of the chosen λ with the ratios of the masses.

Outputs in ``--out``: ``fisher_kinds.json`` (protocol, seeds, search, validation scores, chosen λ,
per-seed accuracies and times, Fisher masses, van de Ven's numbers), ``fisher_kinds.png``
(accuracy per variant; validation accuracy against λ). ``--quick``: 5 tasks of 30 iterations on
subsets, 3 λ per variant, 2 seeds: a smoke test (seconds), not a result.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ewc_rs import EWC, equivalent_lam, fisher_diag

from .train import TensorLoader, load_data, subset

__all__ = [
    "DATASETS",
    "VARIANTS",
    "VAN_DE_VEN_SPLIT_MNIST",
    "Config",
    "SplitMLP",
    "format_table",
    "run_fisher_kinds",
]

#: Fisher variants of the main table, in table order; ``none`` trains without EWC.
VARIANTS = ("exact", "exact_500", "mc", "empirical", "batched", "none")
#: Variants also run class-incrementally.
CLASS_IL_VARIANTS = ("exact", "none")
DATASETS = ("mnist", "fashion-mnist")
#: van de Ven (2025), split MNIST task-incremental, 30 seeds: (mean %, s.e. %, training time s on his GPU).
VAN_DE_VEN_SPLIT_MNIST: dict[str, tuple[float, float, float]] = {
    "exact": (99.12, 0.16, 121.0),
    "exact_500": (98.93, 0.15, 58.0),
    "mc": (99.12, 0.12, 101.0),
    "empirical": (99.12, 0.12, 100.0),
    "batched": (99.11, 0.16, 58.0),
    "none": (85.41, 0.88, 53.0),
}
_KIND = {"exact": "exact", "exact_500": "exact", "mc": "mc", "empirical": "empirical", "batched": "batched"}
_SPLITS = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))


@dataclass(frozen=True)
class Config:
    """The protocol's numbers (:data:`FULL` or :data:`QUICK`)."""

    #: Adam steps per task: van de Ven's 2000 with ``--iterations 2000``; 500 by default, sized for a
    #: 2-core CPU (≈ 40 minutes for both data sets; a split-MNIST task here has ≈ 1300 training
    #: images, so 500 steps of 128 are 50 epochs of them).
    iterations: int = 500
    batch_size: int = 128
    lr: float = 1e-3
    hidden: int = 400
    gamma: float = 1.0
    fisher_batch: int = 128
    exact_subset: int = 500
    validation_fraction: float = 0.2
    #: Training images per data set (None: all); the quick setting takes a subset.
    train_samples: Optional[int] = None
    #: Where the λ search of ``exact`` starts (the others start from it, translated by Fisher mass).
    lam_start: float = 1e3
    #: The search never leaves these bounds.
    lam_bounds: tuple[float, float] = (1e-3, 1e12)
    #: Most decades the search evaluates (before the half-decade refinement).
    max_decades: int = 8
    refine: bool = True


FULL = Config()
QUICK = Config(
    iterations=30,
    hidden=64,
    train_samples=2000,
    exact_subset=100,
    lam_start=100.0,
    max_decades=3,
    refine=False,
)


class SplitMLP(nn.Module):
    """MLP 784-400-400 (ReLU) with a 10-unit output layer whose active units are chosen per task.

    ``active`` (a slice of the 10 units) is what :meth:`forward` returns: one task's two units
    (task-incremental, a head per task) or every class seen so far (class-incremental).

    Args:
        seed: seed of the weights (the global random state is left untouched).
        hidden: width of the two hidden layers.
    """

    def __init__(self, seed: int = 0, hidden: int = 400) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.body = nn.Sequential(
                nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
            )
            self.out = nn.Linear(hidden, 10)
        self.active = slice(0, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the active units, ``[N, active units]``."""
        return self.out(self.body(x))[:, self.active]


@dataclass
class _Task:
    """One task's images and labels (labels already mapped to the active units)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_eval: torch.Tensor
    y_eval: torch.Tensor
    active: slice


def make_tasks(
    x_train: torch.Tensor, y_train: torch.Tensor, x_eval: torch.Tensor, y_eval: torch.Tensor, scenario: str
) -> list[_Task]:
    """The five tasks of classes (0, 1), …, (8, 9).

    Args:
        x_train, y_train, x_eval, y_eval: images ``[N, 28, 28]`` and digit labels.
        scenario: ``"task"`` (labels 0/1, the task's two units active) or ``"class"`` (digit labels,
            every unit of the classes seen so far active; evaluation over all 10 units at the end).

    Returns:
        The tasks in order.
    """
    tasks = []
    for t, (a, b) in enumerate(_SPLITS):
        tr = (y_train == a) | (y_train == b)
        ev = (y_eval == a) | (y_eval == b)
        if scenario == "task":
            shift = 2 * t
            tasks.append(
                _Task(x_train[tr], y_train[tr] - shift, x_eval[ev], y_eval[ev] - shift, slice(shift, shift + 2))
            )
        else:
            tasks.append(_Task(x_train[tr], y_train[tr], x_eval[ev], y_eval[ev], slice(0, 2 * t + 2)))
    return tasks


def _batches(loader: TensorLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``loader`` without end (a new shuffle each pass)."""
    while True:
        yield from loader


@torch.no_grad()
def _accuracy(model: SplitMLP, task: _Task, active: slice) -> float:
    was = model.active
    model.eval()
    model.active = active
    try:
        return float((model(task.x_eval).argmax(1) == task.y_eval).float().mean())
    finally:
        model.active = was
        model.train()


@dataclass
class _Run:
    """What one run of the five tasks gives."""

    accuracy: float
    per_task: list[float]
    fisher_s: float
    train_s: float


class _FirstTask:
    """The model after task 1, per seed: the same for every λ, variant and scenario (task 1 has no
    penalty, and its classes 0/1 are units 0/1 in both scenarios), so it is trained once."""

    def __init__(self, task: _Task, cfg: Config) -> None:
        self.task, self.cfg = task, cfg
        self._cache: dict[int, tuple[dict[str, torch.Tensor], float]] = {}

    def load(self, model: SplitMLP, seed: int) -> float:
        """Puts the model after task 1 into ``model``; returns the seconds its training took."""
        if seed not in self._cache:
            t0 = time.perf_counter()
            _train(model, self.task, self.cfg, seed * 1000)
            state = {k: v.clone() for k, v in model.state_dict().items()}
            self._cache[seed] = (state, time.perf_counter() - t0)
        state, seconds = self._cache[seed]
        model.load_state_dict(state)
        model.active = self.task.active
        return seconds


def _train(model: SplitMLP, task: _Task, cfg: Config, seed: int, penalty: Any = None) -> None:
    """``cfg.iterations`` Adam steps of ``loss = ce + penalty(model)`` on one task."""
    model.train()
    model.active = task.active
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    batches = _batches(TensorLoader(task.x_train, task.y_train, cfg.batch_size, shuffle=True, seed=seed))
    for _ in range(cfg.iterations):
        x, y = next(batches)
        loss = F.cross_entropy(model(x), y)
        if penalty is not None:
            loss = loss + penalty(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _fisher_loader(task: _Task, variant: str, cfg: Config, seed: int) -> tuple[TensorLoader, Optional[int]]:
    """The loader and ``num_samples`` of one variant's Fisher on ``task``."""
    loader = TensorLoader(task.x_train, task.y_train, cfg.fisher_batch, shuffle=True, seed=seed)
    return loader, (cfg.exact_subset if variant == "exact_500" else None)


def run_tasks(
    tasks: Sequence[_Task],
    variant: str,
    lam: float,
    cfg: Config,
    *,
    seed: int,
    scenario: str,
    first: _FirstTask,
) -> _Run:
    """Learns the five tasks in order with one variant and λ.

    Args:
        tasks: from :func:`make_tasks`.
        variant: one of :data:`VARIANTS`.
        lam: λ (ignored for ``none``).
        cfg: the protocol.
        seed: seed of the weights, the batch order and the mc draws.
        scenario: ``"task"`` or ``"class"``.
        first: cache of the model after task 1.

    Returns:
        The final average accuracy over the tasks' evaluation images (class-incremental: over all
        10 units), each task's accuracy, the seconds spent in Fisher estimation and in all.
    """
    model = SplitMLP(seed, cfg.hidden).to(tasks[0].x_train.device)
    train_s = first.load(model, seed)
    ewc = None if variant == "none" else EWC(model, lam, mode="online", gamma=cfg.gamma)
    gen = torch.Generator().manual_seed(seed * 1000 + 999)
    fisher_s = 0.0
    t_start = time.perf_counter()
    for t, task in enumerate(tasks):
        if t > 0:
            _train(model, task, cfg, seed * 1000 + t, None if ewc is None else ewc.penalty)
        if ewc is not None and t + 1 < len(tasks):
            model.active = task.active
            loader, num = _fisher_loader(task, variant, cfg, seed * 1000 + 500 + t)
            t0 = time.perf_counter()
            opts: dict[str, Any] = {"generator": gen} if variant == "mc" else {}
            ewc.consolidate(loader, kind=_KIND[variant], num_samples=num, **opts)
            fisher_s += time.perf_counter() - t0
    train_s += time.perf_counter() - t_start
    final = slice(0, 10)
    per_task = [_accuracy(model, task, task.active if scenario == "task" else final) for task in tasks]
    return _Run(sum(per_task) / len(per_task), per_task, fisher_s, train_s)


def task_one_fishers(
    tasks: Sequence[_Task], cfg: Config, *, seed: int, first: _FirstTask
) -> dict[str, dict[str, torch.Tensor]]:
    """Each variant's Fisher on task 1's training images, for the model after task 1."""
    model = SplitMLP(seed, cfg.hidden).to(tasks[0].x_train.device)
    first.load(model, seed)
    fishers = {}
    for variant in VARIANTS[:-1]:
        loader, num = _fisher_loader(tasks[0], variant, cfg, seed * 1000 + 500)
        opts: dict[str, Any] = {"generator": torch.Generator().manual_seed(seed)} if variant == "mc" else {}
        fishers[variant] = fisher_diag(model, loader, kind=_KIND[variant], num_samples=num, **opts)
    return fishers


def _decade(lam: float) -> float:
    """``lam`` rounded to the nearest power of 10."""
    return 10.0 ** round(math.log10(lam))


def _search(score: Any, start: float, cfg: Config) -> tuple[float, dict[float, float]]:
    """The λ with the best ``score(λ)``: decades around ``start``, extended while the best is at an
    edge (at most ``cfg.max_decades``, within ``cfg.lam_bounds``), then the half-decades beside it."""
    lo, hi = cfg.lam_bounds
    scores: dict[float, float] = {}

    def at(lam: float) -> None:
        lam = float(f"{lam:.3g}")
        if lam not in scores and lo <= lam <= hi:
            scores[lam] = score(lam)

    for lam in (start / 10, start, start * 10):
        at(lam)
    while len(scores) < cfg.max_decades:
        best, ordered = max(scores, key=lambda k: scores[k]), sorted(scores)
        if best == ordered[0] and best / 10 >= lo:
            at(best / 10)
        elif best == ordered[-1] and best * 10 <= hi:
            at(best * 10)
        else:
            break
    if cfg.refine:
        best = max(scores, key=lambda k: scores[k])
        at(best / math.sqrt(10.0))
        at(best * math.sqrt(10.0))
    best = max(scores, key=lambda k: scores[k])
    return best, dict(sorted(scores.items()))


def _summary(runs: Sequence[_Run]) -> dict[str, Any]:
    accs = [r.accuracy for r in runs]
    se = statistics.stdev(accs) / math.sqrt(len(accs)) if len(accs) > 1 else 0.0
    return {
        "accuracy": accs,
        "mean": statistics.fmean(accs),
        "se": se,
        "fisher_s": [r.fisher_s for r in runs],
        "train_s": [r.train_s for r in runs],
        "per_task": [r.per_task for r in runs],
    }


def run_dataset(
    name: str,
    data: Optional[Union[str, Path]],
    cfg: Config,
    seeds: int,
    *,
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
    say: Any = print,
) -> dict[str, Any]:
    """λ search on validation data (seed ``seed``), then ``seeds`` test runs (seeds ``seed + 1`` …), for one
    data set, both scenarios."""
    split = load_data(name, data, seed=0)
    say(split.note)
    x, y = subset(split.x_train, split.y_train, cfg.train_samples, seed=0)
    x_test, y_test = (split.x_test, split.y_test)
    if cfg.train_samples is not None:
        x_test, y_test = subset(x_test, y_test, max(cfg.train_samples // 4, 200), seed=0)
    x, y, x_test, y_test = (t.to(device) for t in (x, y, x_test, y_test))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(12345))
    n_val = int(round(cfg.validation_fraction * len(x)))
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    out: dict[str, Any] = {
        "note": split.note,
        "train_images": len(tr_idx),
        "validation_images": n_val,
        "test_images": len(x_test),
    }
    val_task_il = make_tasks(x[tr_idx], y[tr_idx], x[val_idx], y[val_idx], "task")
    first = _FirstTask(val_task_il[0], cfg)
    fishers = task_one_fishers(val_task_il, cfg, seed=seed, first=first)
    out["fisher_mass"] = {v: float(sum(f.double().sum() for f in fisher.values())) for v, fisher in fishers.items()}
    exact_lam = cfg.lam_start  # the task-incremental exact λ once chosen: where the others start
    for scenario, variants in (("task", VARIANTS), ("class", CLASS_IL_VARIANTS)):
        val_tasks = make_tasks(x[tr_idx], y[tr_idx], x[val_idx], y[val_idx], scenario)
        test_tasks = make_tasks(x[tr_idx], y[tr_idx], x_test, y_test, scenario)
        chosen: dict[str, Optional[float]] = {}
        starts: dict[str, float] = {}
        validation: dict[str, dict[str, float]] = {}
        results: dict[str, Any] = {}
        for variant in variants:
            t0 = time.perf_counter()
            if variant == "none":
                chosen[variant] = None
                validation[variant] = {
                    "-": run_tasks(val_tasks, variant, 0.0, cfg, seed=seed, scenario=scenario, first=first).accuracy
                }
            else:

                def score(
                    lam: float, variant: str = variant, tasks: list[_Task] = val_tasks, scenario: str = scenario
                ) -> float:
                    run = run_tasks(tasks, variant, lam, cfg, seed=seed, scenario=scenario, first=first)
                    say(f"    {name} {scenario}-IL {variant} λ={lam:g}: validation {run.accuracy:.4f}")
                    return run.accuracy

                if variant == "exact":
                    start = exact_lam
                else:  # exact's λ translated by the Fisher masses: where the search begins, not its result
                    start = _decade(equivalent_lam(exact_lam, fishers["exact"], fishers[variant]))
                starts[variant] = start
                best, scores = _search(score, start, cfg)
                if variant == "exact" and scenario == "task":
                    exact_lam = best
                chosen[variant] = best
                validation[variant] = {f"{k:g}": v for k, v in scores.items()}
            lam = chosen[variant] or 0.0
            runs = [
                run_tasks(test_tasks, variant, lam, cfg, seed=s, scenario=scenario, first=first)
                for s in range(seed + 1, seed + seeds + 1)
            ]
            results[variant] = _summary(runs)
            say(
                f"  {name} {scenario}-IL {variant}: λ={chosen[variant]} test "
                f"{100 * results[variant]['mean']:.2f} ± {100 * results[variant]['se']:.2f} "
                f"({time.perf_counter() - t0:.0f} s)"
            )
        out[f"{scenario}_il"] = {
            "chosen_lam": chosen,
            "search_start": starts,
            "validation": validation,
            "results": results,
        }
    return out


def format_table(payload: dict[str, Any]) -> str:
    """The Markdown table of one run: per data set and variant, mean ± s.e. average accuracy (%)
    task-incremental, class-incremental where run, chosen λ, Fisher and training time (s, mean
    per run), and van de Ven's split-MNIST row beside ours."""
    lines = []
    for name, ds in payload["datasets"].items():
        lines.append(f"**{name}** ({payload['seeds']} seeds; {ds['note']})")
        lines.append("")
        head = "| variant | λ (task-IL) | task-IL accuracy % | class-IL accuracy % | Fisher s | training s |"
        sep = "|---|---:|---:|---:|---:|---:|"
        if name == "mnist":
            head += " van de Ven task-IL % (30 seeds) |"
            sep += "---:|"
        lines += [head, sep]
        for variant, r in ds["task_il"]["results"].items():
            lam = ds["task_il"]["chosen_lam"][variant]
            cil = ds["class_il"]["results"].get(variant)
            cil_s = "–" if cil is None else f"{100 * cil['mean']:.2f} ± {100 * cil['se']:.2f}"
            row = (
                f"| {variant} | {'–' if lam is None else f'{lam:g}'} | {100 * r['mean']:.2f} ± {100 * r['se']:.2f} "
                f"| {cil_s} | {statistics.fmean(r['fisher_s']):.2f} | {statistics.fmean(r['train_s']):.1f} |"
            )
            if name == "mnist":
                m, se, _ = VAN_DE_VEN_SPLIT_MNIST[variant]
                row += f" {m:.2f} ± {se:.2f} |"
            lines.append(row)
        cil_lam = ds["class_il"]["chosen_lam"].get("exact")
        lines.append("")
        lines.append(f"class-IL exact: λ = {cil_lam:g}" if cil_lam is not None else "")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def run_fisher_kinds(
    data: Optional[Union[str, Path]] = None,
    out: Union[str, Path] = "demo_out",
    *,
    quick: bool = False,
    seeds: int = 5,
    datasets: Sequence[str] = DATASETS,
    seed: int = 0,
    device: str = "cpu",
    iterations: Optional[int] = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Runs the comparison, prints the table, writes ``fisher_kinds.json`` and ``fisher_kinds.png``.

    Args:
        data: folder with the IDX files (``--data``); None searches the usual places.
        out: output folder (created).
        quick: the smoke-test setting (:data:`QUICK`).
        seeds: test seeds per variant (≥ 1; quick: at most 2).
        datasets: among :data:`DATASETS`.
        seed: seed of the validation runs; the test runs use ``seed + 1`` … ``seed + seeds``.
        device: torch device.
        iterations: Adam steps per task (default :data:`FULL`'s 500; van de Ven: 2000).
        verbose: print progress and the table.

    Returns:
        The JSON payload.

    Raises:
        ValueError: ``seeds`` < 1 or an unknown data set.
        DataError: the data cannot be found or read.
    """
    from .plots import plot_fisher_kinds, plots_available

    if seeds < 1:
        raise ValueError(f"--seeds: expected a positive number, got {seeds}")
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown or not datasets:
        raise ValueError(f"--datasets: expected names among {', '.join(DATASETS)}; got {', '.join(datasets) or 'none'}")
    cfg = QUICK if quick else FULL
    if iterations is not None:
        if iterations < 1:
            raise ValueError(f"--iterations: expected a positive number, got {iterations}")
        cfg = dataclasses.replace(cfg, iterations=iterations)
    if quick:
        seeds = min(seeds, 2)
    with_plots = plots_available()
    say = print if verbose else (lambda *a, **k: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    payload: dict[str, Any] = {
        "protocol": {
            "iterations_per_task": cfg.iterations,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "hidden": cfg.hidden,
            "mode": "online",
            "gamma": cfg.gamma,
            "fisher_batch": cfg.fisher_batch,
            "exact_subset": cfg.exact_subset,
            "validation_fraction": cfg.validation_fraction,
            "lam_start": cfg.lam_start,
            "lam_bounds": list(cfg.lam_bounds),
            "max_decades": cfg.max_decades,
            "refine": cfg.refine,
            "threads": torch.get_num_threads(),
            "quick": quick,
        },
        "seeds": seeds,
        "validation_seed": seed,
        "datasets": {},
        "van_de_ven_split_mnist": {
            k: {"mean": m, "se": se, "train_s_gpu": t} for k, (m, se, t) in VAN_DE_VEN_SPLIT_MNIST.items()
        },
    }
    for name in datasets:
        payload["datasets"][name] = run_dataset(name, data, cfg, seeds, seed=seed, device=device, say=say)
    payload["seconds"] = time.perf_counter() - t_start
    (out / "fisher_kinds.json").write_text(json.dumps(payload, indent=2) + "\n")
    written = [out / "fisher_kinds.json"]
    if with_plots:
        plot_fisher_kinds(payload, out / "fisher_kinds.png")
        written.append(out / "fisher_kinds.png")
    if verbose:
        print()
        print(format_table(payload))
        print(f"wrote {', '.join(map(str, written))} ({payload['seconds']:.0f} s in all{', quick' if quick else ''})")
    return payload
