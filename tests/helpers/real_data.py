"""Where the tests find the real MNIST / Fashion-MNIST files: the roots in ``$EWC_RS_DATA``.

conftest.py defaults that variable to ``<repo>/../shared/data`` when the folder exists; tests that
need the files skip, with :func:`missing_reason`, when no root holds them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

__all__ = ["ENV_VAR", "missing_reason", "real_data_root"]

ENV_VAR = "EWC_RS_DATA"


def real_data_root() -> Optional[Path]:
    """The first root in ``$EWC_RS_DATA`` (``os.pathsep``-separated) holding ``mnist/`` and
    ``fashion-mnist/``, resolved; None when there is none."""
    for entry in os.environ.get(ENV_VAR, "").split(os.pathsep):
        if entry.strip():
            root = Path(entry).expanduser().resolve()
            if (root / "mnist").is_dir() and (root / "fashion-mnist").is_dir():
                return root
    return None


def missing_reason() -> str:
    """Why the data tests skip, naming what was looked for where."""
    value = os.environ.get(ENV_VAR)
    where = f"{ENV_VAR}={value}" if value else f"{ENV_VAR} unset, no ../shared/data next to the repository"
    return f"data missing: no root with mnist/ and fashion-mnist/ IDX folders ({where}); set {ENV_VAR}=DIR to run"
