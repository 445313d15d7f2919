"""Makes the patched torch-sys 0.26.0 that the torch 2.14 and 2.15 lines build with.

torch-sys 0.26.0 (made for torch 2.13) does not compile against torch >= 2.14: its build script
compiles the C++ wrapper as C++17 while torch's headers need C++20, and tch's generated wrapper
calls four operators torch removed (``cholesky``, ``cholesky_out``, ``qr``, ``qr_out``). This script
copies torch-sys 0.26.0's source out of cargo's registry (``cargo fetch`` puts it there) into
``.patched/torch-sys-0.26.0`` (git-ignored) and patches the copy:

- ``build.rs`` compiles the wrapper as C++20;
- the four wrappers call their replacements, with the same arguments and results:
  ``torch::linalg_cholesky(self, upper)`` (``upper`` means the same in both: return ``U`` with
  ``A = U^H U`` instead of ``L``) and ``torch::linalg_qr(self, some ? "reduced" : "complete")``,
  and their ``_out`` forms.

``build-torch-2.14/Cargo.toml`` and ``build-torch-2.15/Cargo.toml`` point at the copy with
``[patch.crates-io]``; the build backend and the Makefile run this script before building those
lines (``PATCHED_TORCH_SYS`` in ``python/ewc_rs/_torch_version.py``). Running it again is a no-op
when the copy is up to date; a patch site that is not found stops it with an error.

    python scripts/patch_torch_sys.py          # prints the patched copy's path
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VERSION = "0.26.0"
TARGET = ROOT / ".patched" / f"torch-sys-{VERSION}"
STAMP_NAME = ".ewc_rs-patched"
FETCH_MANIFEST = ROOT / "build-torch-2.13" / "Cargo.toml"

# (file, original text, replacement): each original must occur exactly once in the pristine source.
PATCHES: tuple[tuple[str, str, str], ...] = (
    ("build.rs", '.flag("-std=c++17")', '.flag("-std=c++20")'),
    ("build.rs", '.flag("/std:c++17")', '.flag("/std:c++20")'),
    (
        "libtch/torch_api_generated.cpp",
        "auto outputs__ = torch::cholesky(*self, (bool)upper);",
        "auto outputs__ = torch::linalg_cholesky(*self, (bool)upper);",
    ),
    (
        "libtch/torch_api_generated.cpp",
        "auto outputs__ = torch::cholesky_out(*out, *self, (bool)upper);",
        "auto outputs__ = torch::linalg_cholesky_out(*out, *self, (bool)upper);",
    ),
    (
        "libtch/torch_api_generated.cpp",
        "auto outputs__ = torch::qr(*self, (bool)some);",
        'auto outputs__ = torch::linalg_qr(*self, (bool)some ? "reduced" : "complete");',
    ),
    (
        "libtch/torch_api_generated.cpp",
        "auto outputs__ = torch::qr_out(*Q, *R, *self, (bool)some);",
        'auto outputs__ = torch::linalg_qr_out(*Q, *R, *self, (bool)some ? "reduced" : "complete");',
    ),
)


class PatchError(RuntimeError):
    """torch-sys's source is missing, or a patch site was not found in it."""


def _patch_stamp() -> str:
    """What the copy's stamp file holds: changes whenever the patches do."""
    return repr(PATCHES)


def registry_source(fetch: bool = True) -> Path:
    """torch-sys 0.26.0's source in cargo's registry (``$CARGO_HOME/registry/src/*/``).

    Args:
        fetch: run ``cargo fetch`` on the 2.13 line's manifest when the source is not there yet.

    Returns:
        The folder holding the crate's ``build.rs`` and ``libtch/``.

    Raises:
        PatchError: the source is not in the registry (and fetching did not bring it).
    """
    cargo_home = Path(os.environ.get("CARGO_HOME", Path.home() / ".cargo"))
    pattern = str(cargo_home / "registry" / "src" / "*" / f"torch-sys-{VERSION}")
    found = sorted(glob.glob(pattern))
    if not found and fetch:
        subprocess.run(["cargo", "fetch", "--manifest-path", str(FETCH_MANIFEST)], check=True)
        found = sorted(glob.glob(pattern))
    if not found:
        raise PatchError(f"torch-sys {VERSION}'s source is not in cargo's registry ({pattern})")
    return Path(found[0])


def apply_patches(folder: Path) -> None:
    """Applies :data:`PATCHES` to a pristine copy of torch-sys, in place.

    Args:
        folder: the copy's root folder.

    Raises:
        PatchError: a patch's original text does not occur exactly once in its file.
    """
    for name, original, replacement in PATCHES:
        path = folder / name
        text = path.read_text(encoding="utf-8")
        count = text.count(original)
        if count != 1:
            raise PatchError(f"{name}: expected the patch site {original!r} once, found it {count} times")
        path.write_text(text.replace(original, replacement), encoding="utf-8")


def patched_torch_sys(target: Path = TARGET, fetch: bool = True) -> Path:
    """Makes (or keeps, when up to date) the patched copy of torch-sys 0.26.0.

    Args:
        target: where the copy goes (default ``.patched/torch-sys-0.26.0`` in the repository).
        fetch: let :func:`registry_source` run ``cargo fetch`` when the source is missing.

    Returns:
        The patched copy's folder.

    Raises:
        PatchError: see :func:`registry_source` and :func:`apply_patches`.
    """
    stamp = target / STAMP_NAME
    if stamp.is_file() and stamp.read_text(encoding="utf-8") == _patch_stamp():
        return target
    source = registry_source(fetch)
    scratch = target.with_name(target.name + ".tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(source, scratch)
    apply_patches(scratch)
    (scratch / STAMP_NAME).write_text(_patch_stamp(), encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)
    scratch.rename(target)
    return target


def main() -> int:
    """Command line: makes the patched copy and prints its path."""
    try:
        print(patched_torch_sys())
    except (PatchError, subprocess.CalledProcessError) as error:
        print(f"patch_torch_sys: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
