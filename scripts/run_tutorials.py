"""Executes the notebooks in full and writes them, with their outputs, as the docs' tutorial pages.

    python scripts/run_tutorials.py [NAME ...]     # notebooks/NAME.ipynb -> docs/tutorials/NAME.ipynb

The notebooks are stored without outputs (tests/project/test_notebooks.py runs them in their quick
setting); the site shows one full run of each (``EWC_RS_QUICK=0``, the demo data from
``EWC_RS_DATA``). ``tests/project/test_docs_pages.py`` fails when a tutorial's code differs from its
notebook's, so a changed notebook needs this script run again.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "notebooks"
PAGES = ROOT / "docs" / "tutorials"


def run(name: str, timeout: int) -> float:
    """Executes ``notebooks/<name>.ipynb`` in full into ``docs/tutorials/<name>.ipynb``; returns seconds."""
    nb = nbformat.read(SOURCE / f"{name}.ipynb", as_version=4)
    os.environ["EWC_RS_QUICK"] = "0"
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(SOURCE)}}).execute()
    seconds = time.perf_counter() - start
    nb.metadata["ewc_rs"] = {"executed_seconds": round(seconds, 1)}
    out = PAGES / f"{name}.ipynb"
    if out.is_symlink():
        out.unlink()
    nbformat.write(nb, out)
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="notebook names (default: every notebook)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = ap.parse_args()
    names = args.names or sorted(p.stem for p in SOURCE.glob("*.ipynb"))
    for name in names:
        print(f"{name}: {run(name, args.timeout):.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
