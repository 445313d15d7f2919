"""Prints one Markdown table of the average accuracy after each task from several ``permuted.json``
files of ``python -m ewc_rs.demo permuted`` (same protocol, other methods), side by side.

    python scripts/permuted_table.py docs/permuted_kfac_20.json docs/permuted_ekfac_20.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(paths: list[str]) -> str:
    """The table; a method that two files both hold is named with its file's stem the second time."""
    curves: dict[str, list[float]] = {}
    for path in paths:
        for method, curve in json.loads(Path(path).read_text())["permuted"].items():
            curves[method if method not in curves else f"{method} ({Path(path).stem})"] = curve
    tasks = max(len(c) for c in curves.values())
    lines = ["| after task | " + " | ".join(f"`{m}`" for m in curves) + " |", "|---:" * (len(curves) + 1) + "|"]
    for t in range(tasks):
        row = [f"{c[t]:.4f}" if t < len(c) else "" for c in curves.values()]
        lines.append(f"| {t + 1} | " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1:]))
