"""Prints one Markdown table of the average accuracy after each task from several ``permuted.json``
files of ``python -m ewc_rs.demo permuted`` (same protocol, other methods), side by side.

    python scripts/permuted_table.py docs/permuted_kfac_20.json docs/permuted_ekfac_20.json

``scripts/docs_results.py`` builds the documentation's result tables with the same functions.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Optional


def load_curves(paths: Sequence[str | Path], labels: Optional[Sequence[str]] = None) -> dict[str, list[float]]:
    """Column label → average accuracy after each task, from every file's ``"permuted"`` curves in
    order. Without ``labels`` a method is labelled `method`, or `method (file stem)` when an earlier
    file holds it too; with ``labels``, one label per curve in file order."""
    curves: dict[str, list[float]] = {}
    seen: set[str] = set()
    given = iter(labels) if labels is not None else None
    for path in paths:
        for method, curve in json.loads(Path(path).read_text())["permuted"].items():
            if given is not None:
                label = next(given)
            else:
                label = f"`{method}`" if method not in seen else f"`{method} ({Path(path).stem})`"
            seen.add(method)
            curves[label] = [float(v) for v in curve]
    return curves


def markdown_table(curves: dict[str, list[float]], rows: Optional[Iterable[int]] = None) -> str:
    """The table, one row per task count (1-based ``rows``; default every task), one column per
    curve, accuracies to 4 decimals (blank where a curve is shorter)."""
    tasks = max(len(c) for c in curves.values())
    lines = ["| after task | " + " | ".join(curves) + " |", "|---:" * (len(curves) + 1) + "|"]
    for t in rows if rows is not None else range(1, tasks + 1):
        row = [f"{c[t - 1]:.4f}" if t <= len(c) else "" for c in curves.values()]
        lines.append(f"| {t} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def table(paths: Sequence[str | Path]) -> str:
    """The table; a method that two files both hold is named with its file's stem the second time."""
    return markdown_table(load_curves(paths))


if __name__ == "__main__":
    print(table(sys.argv[1:]))
