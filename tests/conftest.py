"""Shared pytest fixtures, the helpers' folder on ``sys.path``, and the tests' default data folder.

The folders mirror the package (``fisher/``, ``blocks/``, ``penalty/``, ``state/``, ``parallel/``,
``facade/`` for ``ewc_rs.ewc``, ``merging/``, ``cuda/``, ``integrations/``, ``demo/``) plus ``project/`` (packaging,
torch lines, notebooks, benchmarks, the code's shape); helpers live in ``helpers/``. Tests that need
only torch and the core requirements are marked ``core`` (``make test-core`` runs them per torch line).

The library never looks for data next to a source checkout; the tests may: when ``EWC_RS_DATA``
is unset and ``<repo>/../shared/data`` exists, it becomes the default for this test session
(``make test`` exports the same folder). See :mod:`real_data`.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# The tests' helpers (models, float64 references, workers) are imported by name from every folder.
HELPERS = Path(__file__).resolve().parent / "helpers"
sys.path.insert(0, str(HELPERS))

from real_data import ENV_VAR  # noqa: E402

CHECKOUT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if not os.environ.get(ENV_VAR) and CHECKOUT_DATA.is_dir():
    os.environ[ENV_VAR] = str(CHECKOUT_DATA)

SEED_VAR = "EWC_RS_TEST_SEED"


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (``EWC_RS_TEST_SEED`` pins it); printed, shown by pytest on failure."""
    env = os.environ.get(SEED_VAR)
    s = int(env) if env else secrets.randbits(31)
    print(f"seed={s} (re-run with {SEED_VAR}={s})")
    return s


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a test module with tiny models: on 2 busy cores OpenMP's thread
    hand-offs made test_fisher.py ~5x slower (70 s vs 13 s). Restored after the module. Modules
    ask for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
