"""Shared pytest fixtures."""

from __future__ import annotations

import os
import secrets

import pytest


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (``EWC_TEST_SEED`` pins it); printed, shown by pytest on failure."""
    env = os.environ.get("EWC_TEST_SEED")
    s = int(env) if env else secrets.randbits(31)
    print(f"seed={s} (re-run with EWC_TEST_SEED={s})")
    return s
