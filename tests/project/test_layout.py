"""The layout section of the docs' architecture page (``docs/explanation/architecture.md``) is what
``scripts/layout.py`` generates from the code (layers from the import contract, each file's own
docstring): it cannot drift from the package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_layout_section_is_generated_from_the_code() -> None:
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "layout.py"), "--check"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
