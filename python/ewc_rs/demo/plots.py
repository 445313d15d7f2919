"""Matplotlib figures of the demo, written as PNG files.

Figures are built with the object-oriented API (``matplotlib.figure.Figure``, rendered by the Agg
canvas on ``savefig``), not through ``pyplot``: no display is needed and importing this module
does not change the backend of the caller (e.g. Jupyter's inline backend).

matplotlib is optional (the ``demo`` extra): this module imports it only when a figure is made,
and the demos ask :func:`plots_available` first, so without it they run and skip the figures.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "PLOTS_SKIPPED",
    "plots_available",
    "plot_seed",
    "plot_permuted",
    "plot_matrices",
    "plot_merge",
    "plot_fisher_kinds",
]

PLOTS_SKIPPED = "plots skipped: matplotlib is not installed; pip install 'ewc_rs[demo]' to get them"
"""The one line a demo prints when it cannot draw its figures."""

_LABELS = {"mnist_after_a": "MNIST after A", "mnist_after_b": "MNIST after B", "fashion_after_b": "Fashion after B"}


def plots_available() -> bool:
    """Whether matplotlib can be imported; when not, prints :data:`PLOTS_SKIPPED` (one line).

    Returns:
        True when the ``plot_*`` functions can draw.
    """
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        print(PLOTS_SKIPPED, flush=True)
        return False
    return True


def _new_figure(figsize: tuple[float, float]) -> Figure:
    """An Agg-rendered figure with constrained layout (matplotlib imported here, on first use)."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def plot_seed(
    results: dict[str, dict[str, float]],
    path: Optional[Union[str, Path]] = None,
    *,
    title: str = "MNIST → Fashion-MNIST",
) -> Figure:
    """Grouped bars: one group per row of the seed table, one bar per accuracy."""
    rows = list(results)
    metrics = list(_LABELS)
    fig = _new_figure((8, 4))
    ax = fig.subplots()
    width = 0.8 / len(metrics)
    x = np.arange(len(rows))
    for i, m in enumerate(metrics):
        vals = [results[r][m] for r in rows]
        bars = ax.bar(x + (i - (len(metrics) - 1) / 2) * width, vals, width, label=_LABELS[m])
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(x, rows)
    ax.set_ylim(0, 1.2)
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.legend(loc="upper center", ncol=len(metrics), fontsize=8)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_permuted(
    curves: dict[str, list[float]], path: Optional[Union[str, Path]] = None, *, title: str = "Permuted MNIST"
) -> Figure:
    """Average accuracy over the tasks seen so far vs. number of tasks (Kirkpatrick et al. Fig. 2A)."""
    fig = _new_figure((6, 4))
    ax = fig.subplots()
    for method, c in curves.items():
        ax.plot(range(1, len(c) + 1), c, marker="o" if len(c) <= 20 else None, label=method)
    n = max((len(c) for c in curves.values()), default=1)
    ax.set_xticks(range(1, n + 1) if n <= 20 else [1, *range(5, n + 1, 5)])
    ax.set_xlabel("number of tasks learned")
    ax.set_ylabel("average test accuracy over tasks seen")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def matrix_array(matrix: list[list[float]]) -> np.ndarray:
    """Ragged lower-triangular accuracy lists → square array with NaN above the diagonal."""
    n = len(matrix)
    arr = np.full((n, n), np.nan)
    for i, row in enumerate(matrix):
        arr[i, : len(row)] = row
    return arr


def plot_matrices(
    matrices: dict[str, list[list[float]]],
    path: Optional[Union[str, Path]] = None,
    *,
    title: str = "Accuracy on task j after task i",
) -> Figure:
    """One heat map per method: row i = after learning task i, column j = tested on task j."""
    k = len(matrices)
    cols = min(3, k)
    rows = math.ceil(k / cols)
    fig = _new_figure((3.2 * cols + 0.8, 3.0 * rows + 0.4))
    axes = fig.subplots(rows, cols, squeeze=False)
    im = None
    for ax, (method, m) in zip(axes.flat, matrices.items()):
        arr = matrix_array(m)
        im = ax.imshow(arr, vmin=0, vmax=1, cmap="viridis")
        n = arr.shape[0]
        for i in range(n):
            for j in range(i + 1):
                ax.text(
                    j,
                    i,
                    f"{arr[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if arr[i, j] < 0.6 else "black",
                )
        ax.set_xticks(range(n), [str(j + 1) for j in range(n)])
        ax.set_yticks(range(n), [str(i + 1) for i in range(n)])
        ax.set_title(method, fontsize=9)
    for ax in axes[-1, :]:
        ax.set_xlabel("tested on task")
    for ax in axes[:, 0]:
        ax.set_ylabel("after task")
    for ax in list(axes.flat)[k:]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="test accuracy")
    fig.suptitle(title)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_merge(
    results: dict[str, dict[str, float]],
    path: Optional[Union[str, Path]] = None,
    *,
    title: str = "Merging two fine-tuned models",
) -> Figure:
    """Grouped bars: one group per model of the merge demo, its accuracy on task A, task B, their mean."""
    rows = list(results)
    metrics = ("task A", "task B", "mean")
    fig = _new_figure((8, 4))
    ax = fig.subplots()
    width = 0.8 / len(metrics)
    x = np.arange(len(rows))
    for i, m in enumerate(metrics):
        bars = ax.bar(x + (i - 1) * width, [results[r][m] for r in rows], width, label=m)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(x, rows, fontsize=8)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.legend(loc="upper center", ncol=len(metrics), fontsize=8)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_fisher_kinds(payload: dict[str, Any], path: Optional[Union[str, Path]] = None) -> Figure:
    """Per data set of ``python -m ewc_rs.demo fisher_kinds``: mean ± s.e. test accuracy per Fisher
    variant (task- and class-incremental), and the validation accuracy against λ per variant."""
    names = list(payload["datasets"])
    fig = _new_figure((11, 3.6 * len(names)))
    axes = fig.subplots(len(names), 2, squeeze=False)
    for (ax_bar, ax_lam), name in zip(axes, names):
        ds = payload["datasets"][name]
        task = ds["task_il"]["results"]
        variants = list(task)
        x = np.arange(len(variants))
        means = [100 * task[v]["mean"] for v in variants]
        errs = [100 * task[v]["se"] for v in variants]
        bars = ax_bar.bar(x - 0.2, means, 0.4, yerr=errs, capsize=3, label="task-incremental")
        ax_bar.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
        cls = ds["class_il"]["results"]
        cx = [i for i, v in enumerate(variants) if v in cls]
        bars = ax_bar.bar(
            np.array(cx) + 0.2,
            [100 * cls[variants[i]]["mean"] for i in cx],
            0.4,
            yerr=[100 * cls[variants[i]]["se"] for i in cx],
            capsize=3,
            label="class-incremental",
        )
        ax_bar.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
        ax_bar.set_xticks(x, variants, fontsize=8)
        ax_bar.set_ylim(0, 110)
        ax_bar.set_ylabel("average test accuracy (%)")
        ax_bar.set_title(f"{name}: accuracy after 5 tasks ({payload['seeds']} seeds)", fontsize=9)
        ax_bar.legend(fontsize=7, loc="lower left")
        for variant, scores in ds["task_il"]["validation"].items():
            if variant == "none":
                ax_lam.axhline(100 * scores["-"], color="grey", linestyle=":", label="none")
                continue
            lams = [float(k) for k in scores]
            ax_lam.plot(lams, [100 * v for v in scores.values()], marker="o", markersize=3, label=variant)
        ax_lam.set_xscale("log")
        ax_lam.set_xlabel("λ")
        ax_lam.set_ylabel("validation accuracy (%), seed 0")
        ax_lam.set_title(f"{name}: task-incremental, validation accuracy against λ", fontsize=9)
        ax_lam.grid(alpha=0.3)
        ax_lam.legend(fontsize=7)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
