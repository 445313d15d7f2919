"""The README's headline figures are those of the committed benchmark results: re-measuring and
committing new results without updating the README fails here."""

from __future__ import annotations

import json
from typing import Any

from repo_files import REPO

RESULTS = REPO / "benchmarks" / "results"


def _result(name: str) -> Any:
    return json.loads((RESULTS / name).read_text())


def _readme() -> str:
    return (REPO / "README.md").read_text()


def test_fisher_against_the_seed_estimator() -> None:
    runs = _result("fisher_cpu.json")["results"]
    ratios = [runs[m]["times_s"]["ewc_rs:empirical"] / runs[m]["times_s"]["seed_batched"] for m in runs]
    want = f"{min(ratios):.2f}–{max(ratios):.2f}× its time ({', '.join(n.removeprefix('seed_') for n in runs)})"
    assert want in _readme(), want


def test_language_model_fisher() -> None:
    shapes = _result("llm_cpu.json")["shapes"]
    small, llama = shapes["gpt2_small"], shapes["llama"]
    want = (
        f"{small['time_ratio']['empirical']:.2f}× / {llama['time_ratio']['empirical']:.2f}× (peak memory "
        f"{small['memory_ratio']['empirical']:.2f}× / {llama['memory_ratio']['empirical']:.2f}×)"
    )
    assert want in _readme(), want


def test_penalty_against_the_memory_floor() -> None:
    ratio = _result("penalty_cpu.json")["results"]["resnet50"]["ratio_to_floor"]["ewc_rs"]
    want = f"| penalty step against the memory floor (ResNet-50, 25.6M parameters) | {ratio:.2f}× |"
    assert want in _readme(), want
