"""In-tree PEP 517 build backend: maturin, with the manifest of the installed torch's line.

``pip install --no-build-isolation .`` builds ewc_rs for the torch already installed in the
environment: this backend reads torch's version (package metadata: torch is not imported), picks
``build-torch-X.Y/Cargo.toml`` for its line (``python/ewc_rs/_torch_version.py`` lists them) and
hands over to maturin's own backend with ``--manifest-path`` added to ``MATURIN_PEP517_ARGS``. With
no torch, or a torch no line supports, it fails at once and lists the supported versions.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import runpy
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

import maturin
from maturin import build_sdist, get_requires_for_build_sdist  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
VERSIONS = runpy.run_path(str(ROOT / "python" / "ewc_rs" / "_torch_version.py"))
F = TypeVar("F", bound=Callable[..., Any])


class UnsupportedTorch(RuntimeError):
    """The build environment has no torch, or one that no build line supports."""


def installed_torch() -> str:
    """The version of the torch package in this environment (``"2.13.0+cu130"``).

    Raises:
        UnsupportedTorch: torch is not installed here (e.g. pip's isolated build environment).
    """
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        raise UnsupportedTorch(
            "ewc_rs builds against the torch installed in the build environment, and there is none: install "
            f"one of torch {VERSIONS['supported_text']()} first, then pip install --no-build-isolation ."
        ) from None


def manifest_for(version: str) -> str:
    """The Cargo manifest of a torch version's build line, relative to the repository root.

    Args:
        version: a torch version, e.g. ``"2.13.0+cu130"`` (the local tag is ignored).

    Returns:
        e.g. ``"build-torch-2.13/Cargo.toml"``.

    Raises:
        UnsupportedTorch: no line supports this torch release.
    """
    release = VERSIONS["torch_release"](version)
    if release not in VERSIONS["SUPPORTED_TORCH_VERSIONS"]:
        raise UnsupportedTorch(
            f"ewc_rs cannot be built for torch {version}: the supported versions are "
            f"{VERSIONS['supported_text']()}; install one of them first"
        )
    return f"{VERSIONS['build_dir'](release)}/Cargo.toml"


def build_environment(version: str) -> dict[str, str]:
    """The variables maturin (and torch-sys's build script, which asks ``python`` for torch) need.

    Args:
        version: the installed torch's version.

    Returns:
        ``MATURIN_PEP517_ARGS`` with the line's ``--manifest-path`` added, this interpreter's folder
        first on ``PATH`` (so ``python`` is the one with this torch even in a venv that is not
        activated), ``LIBTORCH_USE_PYTORCH``, and ``LIBTORCH_BYPASS_VERSION_CHECK`` for lines built
        with an older torch's tch.
    """
    args = shlex.split(os.environ.get("MATURIN_PEP517_ARGS", ""))
    if "--manifest-path" not in args and not any(a.startswith("--manifest-path=") for a in args):
        args += ["--manifest-path", manifest_for(version)]
    env = {
        "MATURIN_PEP517_ARGS": shlex.join(args),
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
        "VIRTUAL_ENV": sys.prefix,
        "LIBTORCH_USE_PYTORCH": "1",
    }
    if VERSIONS["torch_release"](version) in VERSIONS["BYPASS_VERSION_CHECK"]:
        env["LIBTORCH_BYPASS_VERSION_CHECK"] = "1"
    return env


def _for_installed_torch(hook: F) -> F:
    """Runs a maturin hook with :func:`build_environment` of the installed torch."""

    @functools.wraps(hook)
    def run(*args: Any, **kwargs: Any) -> Any:
        os.environ.update(build_environment(installed_torch()))
        return hook(*args, **kwargs)

    return run  # type: ignore[return-value]


# Every hook pip calls for a wheel checks the torch first, so an unsupported one fails at once.
get_requires_for_build_wheel = _for_installed_torch(maturin.get_requires_for_build_wheel)
get_requires_for_build_editable = _for_installed_torch(maturin.get_requires_for_build_editable)
build_wheel = _for_installed_torch(maturin.build_wheel)
build_editable = _for_installed_torch(maturin.build_editable)
prepare_metadata_for_build_wheel = _for_installed_torch(maturin.prepare_metadata_for_build_wheel)
