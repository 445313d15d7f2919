"""Which torch the compiled extension (``ewc_rs._core``) was built for, read before loading it.

An extension linked against another libtorch may fail to load with an unhelpful "undefined symbol"
or load and crash, so ``ewc_rs/__init__.py`` reads the version from the extension's file first:
the Rust side (``src/compat.rs``) keeps the marker ``ewc_rs built for torch X.Y.Z;`` in the binary.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Optional

from ._torch_version import supported_text, torch_release

_MARKER = re.compile(rb"ewc_rs built for torch (\d+\.\d+\.\d+);")


def core_path(package: str) -> Optional[Path]:
    """The file of ``<package>._core`` without importing it, or None when there is none."""
    spec = importlib.util.find_spec(f"{package}._core")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin)


def built_for(path: Path) -> Optional[str]:
    """The torch release the extension at ``path`` was built for, or None when it has no marker.

    Args:
        path: the compiled extension (``_core.abi3.so``).

    Returns:
        e.g. ``"2.13.0"``.
    """
    found = _MARKER.findall(path.read_bytes())
    return found[0].decode("ascii") if len(set(found)) == 1 else None


def mismatch_message(built: str, installed: str) -> Optional[str]:
    """Why an extension built for torch ``built`` cannot load with torch ``installed``, or None if it can.

    Args:
        built: the torch release the extension was compiled against.
        installed: ``torch.__version__`` (a local tag such as ``+cu130`` is ignored).

    Returns:
        An error message naming both versions and the fixes, or None when the releases match.
    """
    if torch_release(built) == torch_release(installed):
        return None
    how = (
        f"install torch=={built}, or rebuild ewc_rs in this environment "
        f"(pip install --no-build-isolation . with torch one of: {supported_text()})"
    )
    return f"ewc_rs was built against torch {built} (libtorch ABI), but torch {installed} is installed; {how}"
