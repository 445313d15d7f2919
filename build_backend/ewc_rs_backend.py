"""In-tree PEP 517 build backend: maturin, with the manifest of the installed torch's line.

``pip install --no-build-isolation .`` builds ewc_rs for the torch already installed in the
environment: this backend reads torch's version (package metadata: torch is not imported), picks
``build-torch-X.Y/Cargo.toml`` for its line (``python/ewc_rs/_torch_version.py`` lists them) and
hands over to maturin's own backend with ``--manifest-path`` added to ``MATURIN_PEP517_ARGS``. With
no torch, or a torch no line supports, it fails at once and lists the supported versions. The
metadata and the wheel it makes require exactly the torch release they were built for
(``torch==2.13.0`` instead of pyproject's range of supported versions).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.metadata
import os
import re
import runpy
import shlex
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, TypeVar

import maturin  # type: ignore[import-untyped]
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


_TORCH_REQUIREMENT = re.compile(r"^Requires-Dist: torch(?![\w.-]).*$", re.MULTILINE)


def pin_torch(metadata: str, version: str) -> str:
    """Core metadata requiring exactly the torch release the build is for.

    Args:
        metadata: the text of a ``METADATA`` file (pyproject's torch range in a ``Requires-Dist``).
        version: the installed torch's version (its local tag is dropped).

    Returns:
        The text with that line replaced by ``Requires-Dist: torch==X.Y.Z``; other requirements,
        such as ``torchvision``, are left alone.
    """
    return _TORCH_REQUIREMENT.sub(f"Requires-Dist: torch=={VERSIONS['torch_release'](version)}", metadata)


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode("ascii")
    return f"{name},sha256={digest},{len(data)}"


def pin_torch_in_wheel(wheel: Path, version: str) -> None:
    """Rewrites a wheel's ``METADATA`` with :func:`pin_torch`, and its ``RECORD`` entry to match."""
    with zipfile.ZipFile(wheel) as source:
        entries = [(info, source.read(info)) for info in source.infolist()]
    metadata_name = next(i.filename for i, _ in entries if i.filename.endswith(".dist-info/METADATA"))
    record_name = metadata_name[: -len("METADATA")] + "RECORD"
    files = {info.filename: data for info, data in entries}
    metadata = pin_torch(files[metadata_name].decode("utf-8"), version).encode("utf-8")
    record = "\n".join(
        _record_line(metadata_name, metadata) if line.startswith(metadata_name + ",") else line
        for line in files[record_name].decode("utf-8").splitlines()
    )
    files.update({metadata_name: metadata, record_name: (record + "\n").encode("utf-8")})
    rewritten = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(rewritten, "w", zipfile.ZIP_DEFLATED) as target:
        for info, _ in entries:
            target.writestr(info, files[info.filename])
    rewritten.replace(wheel)


def prepare_sources(version: str) -> None:
    """Makes the patched torch-sys a line's manifest points at, for the lines that use one.

    Args:
        version: the installed torch's version; for a release in ``PATCHED_TORCH_SYS`` this runs
            ``scripts/patch_torch_sys.py`` (a no-op when ``.patched/`` is up to date), else nothing.
    """
    if VERSIONS["torch_release"](version) in VERSIONS["PATCHED_TORCH_SYS"]:
        runpy.run_path(str(ROOT / "scripts" / "patch_torch_sys.py"))["patched_torch_sys"]()


def _for_installed_torch(hook: F) -> F:
    """Runs a maturin hook with :func:`build_environment` of the installed torch."""

    @functools.wraps(hook)
    def run(*args: Any, **kwargs: Any) -> Any:
        version = installed_torch()
        os.environ.update(build_environment(version))
        prepare_sources(version)
        return hook(*args, **kwargs)

    return run  # type: ignore[return-value]


# Every hook pip calls for a wheel checks the torch first, so an unsupported one fails at once.
get_requires_for_build_wheel = _for_installed_torch(maturin.get_requires_for_build_wheel)
get_requires_for_build_editable = _for_installed_torch(maturin.get_requires_for_build_editable)


@_for_installed_torch
def prepare_metadata_for_build_wheel(metadata_directory: str, config_settings: Any = None) -> str:
    """maturin's metadata, with :func:`pin_torch` applied."""
    dist_info = maturin.prepare_metadata_for_build_wheel(metadata_directory, config_settings)
    path = Path(metadata_directory) / dist_info / "METADATA"
    path.write_text(pin_torch(path.read_text(encoding="utf-8"), installed_torch()), encoding="utf-8")
    return dist_info


def _pinned_wheel(hook: Callable[..., str]) -> Callable[..., str]:
    @functools.wraps(hook)
    def build(wheel_directory: str, *args: Any, **kwargs: Any) -> str:
        name = hook(wheel_directory, *args, **kwargs)
        pin_torch_in_wheel(Path(wheel_directory) / name, installed_torch())
        return name

    return build


build_wheel = _for_installed_torch(_pinned_wheel(maturin.build_wheel))
build_editable = _for_installed_torch(_pinned_wheel(maturin.build_editable))
