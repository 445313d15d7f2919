"""The torch versions ewc_rs builds for: the one place that lists them (standard library only).

The extension links libtorch through the ``tch`` crate, and each ``tch`` release supports exactly one
libtorch, so there is one build per torch line: the root ``Cargo.toml`` is the default line
(``TORCH_VERSION``: ``make test``, ``maturin develop``, the GPU machines), and
``build-torch-X.Y/Cargo.toml`` (with its own ``Cargo.lock``) picks the ``tch`` release of line X.Y
for the same ``src/``. The in-tree build backend (``build_backend/ewc_rs_backend.py``), the Makefile,
``ewc_rs/__init__.py``'s import check and ``tests/project/test_packaging.py`` read this file; it imports
nothing, so the build backend can load it without torch or ewc_rs.
"""

from __future__ import annotations

TORCH_VERSION = "2.11.0"
"""The default torch line: what the Makefile installs into ``.venv`` and ``make test`` runs in full."""

SUPPORTED_TORCH_VERSIONS = ("2.9.0", "2.10.0", "2.11.0", "2.12.0", "2.13.0", "2.14.0", "2.15.0")
"""Every torch release ewc_rs builds for, oldest first; each has a ``build-torch-X.Y/`` manifest."""

BYPASS_VERSION_CHECK: tuple[str, ...] = ("2.12.0", "2.14.0", "2.15.0")
"""Supported releases that no tch release is made for: their manifest uses the tch of a neighbouring
line (2.12: tch 0.24, made for 2.11), and the build bypasses torch-sys's version check
(``LIBTORCH_BYPASS_VERSION_CHECK``). torch-sys still compiles its C++ wrapper against this torch's
own headers, so the build is for this torch; it is supported because it compiles and passes the
core tests (``scripts/try_torch_line.sh`` tries a release so)."""

PATCHED_TORCH_SYS: tuple[str, ...] = ("2.14.0", "2.15.0")
"""Supported releases whose manifest builds with a patched torch-sys 0.26.0 (``[patch.crates-io]`` to
``.patched/torch-sys-0.26.0``): torch >= 2.14's headers need C++20 and torch removed four operators
tch 0.26's wrapper calls. ``scripts/patch_torch_sys.py`` makes the copy from cargo's registry; the
build backend and the Makefile run it before building these lines. They are in
``BYPASS_VERSION_CHECK`` too (tch 0.26 is made for 2.13)."""


def torch_release(version: str) -> str:
    """The release part of a torch version string.

    Args:
        version: ``torch.__version__`` or a package version, e.g. ``"2.13.0+cu130"``.

    Returns:
        The version without its local tag, e.g. ``"2.13.0"``.
    """
    return version.split("+", 1)[0].strip()


def line_of(version: str) -> str:
    """The torch line (major.minor) of a version string: ``"2.13.0+cu130"`` -> ``"2.13"``."""
    return ".".join(torch_release(version).split(".")[:2])


def build_dir(version: str) -> str:
    """The manifest folder of a torch version's line, relative to the repository root.

    Args:
        version: a torch version, e.g. ``"2.13.0"``.

    Returns:
        ``"build-torch-2.13"``.
    """
    return f"build-torch-{line_of(version)}"


def local_tag(version: str) -> str:
    """The local version tag of the wheels built for a torch version: ``"2.13.0"`` -> ``"torch213"``."""
    return "torch" + line_of(version).replace(".", "")


def supported_text() -> str:
    """The supported torch versions, for error messages: ``"2.9.0, 2.10.0, 2.11.0, 2.13.0"``."""
    return ", ".join(SUPPORTED_TORCH_VERSIONS)
