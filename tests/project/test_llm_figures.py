"""``docs/llm.md`` is what ``scripts/llm_figures.py`` generates from the benchmarks' result files:
its figures cannot drift from the measurements."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_llm_figures_are_generated_from_the_results() -> None:
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "llm_figures.py"), "--check"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    text = (REPO / "docs" / "llm.md").read_text()
    sections = ("The Fisher of a language model", "The 8-bit Fisher", "A billion parameters", "Fisher-weighted merging")
    for section in sections:
        assert f"## {section}" in text, section
