"""Runs the documentation's Python code blocks as tests (Sybil): the README, every page under docs/,
and the examples in the public modules' docstrings.

Each Markdown file is one namespace: its blocks run top to bottom, later blocks seeing earlier
names. A block that cannot run here (several GPUs, a GPU, a long training run) is preceded by
``<!-- skip: next "why" -->``, which pytest reports as a skip with that reason. The blocks of the
README and docs/ need no data and no GPU; each runs in seconds on a CPU.
"""

from __future__ import annotations

try:
    from sybil import Sybil
    from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser
except ImportError:  # a torch line's core venv (requirements-core.txt) runs no documentation
    Sybil = None  # type: ignore[assignment,misc]

# The modules whose docstrings hold the public API's examples (tests/project/test_docstrings.py
# checks that every public function and class has one).
PUBLIC_MODULES = [
    "python/ewc_rs/ewc.py",
    "python/ewc_rs/_fisher/api.py",
    "python/ewc_rs/_state/*.py",
    "python/ewc_rs/merging.py",
    "python/ewc_rs/checkpoint.py",
    "python/ewc_rs/cuda_kernel.py",
    "python/ewc_rs/distributed.py",
    "python/ewc_rs/integrations/*.py",
]

if Sybil is not None:
    pytest_collect_file = Sybil(
        parsers=[PythonCodeBlockParser(), SkipParser()],
        patterns=["README.md", "docs/*.md", "docs/**/*.md", *PUBLIC_MODULES],
        name="docs",
    ).pytest()
