"""``docs/llm.md`` is what ``scripts/llm_figures.py`` generates from the benchmarks' result files:
its figures cannot drift from the measurements."""

from __future__ import annotations

import subprocess
import sys

from repo_files import REPO, load_module


def test_llm_figures_are_generated_from_the_results() -> None:
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "llm_figures.py"), "--check"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    text = (REPO / "docs" / "llm.md").read_text()
    sections = ("The Fisher of a language model", "The 8-bit Fisher", "A billion parameters", "Fisher-weighted merging")
    for section in sections:
        assert f"## {section}" in text, section


def test_fixed_and_per_batch_cost_are_solved_from_two_estimations() -> None:
    # Made-up timings with a known split: 0.1 s fixed, 1.3x forward+backward per batch.
    figures = load_module("llm_figures_under_test", REPO / "scripts" / "llm_figures.py")

    def shape(sequences: int, fwd_bwd: float) -> dict:
        emp = 0.1 + 1.3 * fwd_bwd
        return {"sequences": sequences, "batch": 4, "median_s": {"fwd_bwd": fwd_bwd, "ewc_rs:empirical": emp}}

    text = " ".join(figures.fixed_and_per_batch({"gpt2_mid": shape(4, 0.05), "gpt2_mid_32": shape(32, 0.4)}))
    assert "1.30x forward+backward for each further batch" in text
    assert "a fixed 100 ms per estimation (2.0x" in text
    assert figures.fixed_and_per_batch({"gpt2_mid": shape(4, 0.05)}) == []
