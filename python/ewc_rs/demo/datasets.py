"""Finding MNIST and Fashion-MNIST on disk and loading them as train/test tensors, without any download.

This module needs only numpy, torch and the standard library (it does not import the compiled
``ewc_rs._core``), so it can be used and tested on its own.

* :func:`find_dataset` looks for the four standard IDX files of a data set in the folders
  :func:`candidate_dirs` lists: the folder the user names (``--data DIR``), the roots in
  ``$EWC_RS_DATA``, ``~/.torch``, and Debian's system folder. Never a folder relative to the
  current directory or to a source checkout.
* :func:`load_split` returns train and test tensors ready for training. When the official
  training files are missing (e.g. only MNIST's *test* set is at hand), it splits the 10000
  ``t10k`` examples into 8000 train / 2000 test with a seeded permutation, and says so in
  :attr:`Split.source` and :attr:`Split.note`.

Every problem with the data (a missing, truncated or corrupt file, an unexpected shape) raises
:class:`~.idx.DataError`, a :class:`ValueError` subclass whose message names the file and what
was wrong.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

from .idx import DataError, PathLike, read_idx

__all__ = [
    "DataError",
    "DatasetFiles",
    "DatasetName",
    "Split",
    "ENV_VAR",
    "DEBIAN_FASHION_DIR",
    "T10K_TRAIN_FIFTHS",
    "candidate_dirs",
    "find_dataset",
    "load_split",
]

DatasetName = Literal["mnist", "fashion-mnist"]
"""The data sets this module knows about."""

ENV_VAR = "EWC_RS_DATA"
"""Environment variable naming a data root (several may be joined with ``os.pathsep``)."""

T10K_TRAIN_FIFTHS = 4
"""Fifths of the ``t10k`` examples used for training when the train files are missing (8000 of 10000)."""

DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's package ``dataset-fashion-mnist`` installs its files."""

# Standard file names (without the optional ".gz"); the second spelling is the
# one some mirrors (e.g. Kaggle) use.
_FILE_STEMS: dict[str, tuple[str, ...]] = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}

# Sub-folders of a data root that may hold each data set, in the order tried.
_SUBDIRS: dict[str, tuple[str, ...]] = {
    "mnist": ("mnist", "MNIST/raw", "MNIST"),
    "fashion-mnist": ("fashion-mnist", "FashionMNIST/raw", "fashion_mnist", "FashionMNIST"),
}

# Normalised folder names that identify a data set when a root *is* the data set's folder.
_DIR_ALIASES: dict[str, tuple[str, ...]] = {
    "mnist": ("mnist",),
    "fashion-mnist": ("fashionmnist",),
}

_HOW_TO_GET = (
    f"How to get the data: set {ENV_VAR}=DIR or pass --data DIR (data_dir= in Python), DIR holding "
    "'mnist/' and 'fashion-mnist/' sub-folders, or torchvision's layout '<DIR>/MNIST/raw' and "
    "'<DIR>/FashionMNIST/raw' (as written by torchvision.datasets.MNIST(DIR, download=True) and "
    "FashionMNIST(DIR, download=True)); on Debian/Ubuntu, 'apt install dataset-fashion-mnist' installs "
    f"Fashion-MNIST in {DEBIAN_FASHION_DIR}. Expected file names: train-images-idx3-ubyte, "
    "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (each optionally "
    ".gz); the t10k pair is required, the train pair is optional."
)


@dataclass(frozen=True)
class DatasetFiles:
    """The files of one data set, as found by :func:`find_dataset`.

    Attributes:
        name: ``"mnist"`` or ``"fashion-mnist"``.
        directory: the folder holding the files.
        test_images: the ``t10k-images-idx3-ubyte[.gz]`` file.
        test_labels: the ``t10k-labels-idx1-ubyte[.gz]`` file.
        train_images: the ``train-images-idx3-ubyte[.gz]`` file, or None when absent.
        train_labels: the ``train-labels-idx1-ubyte[.gz]`` file, or None when absent.
    """

    name: str
    directory: Path
    test_images: Path
    test_labels: Path
    train_images: Optional[Path] = None
    train_labels: Optional[Path] = None

    @property
    def has_train(self) -> bool:
        """True when both official training files are present."""
        return self.train_images is not None and self.train_labels is not None


def _check_name(name: str) -> str:
    if name not in _SUBDIRS:
        raise ValueError(f"unknown data set {name!r}; expected one of {sorted(_SUBDIRS)}")
    return name


def _norm(s: str) -> str:
    return s.lower().replace("-", "").replace("_", "")


def _dir_is_dataset(d: Path, name: str) -> bool:
    """Whether folder ``d`` is, by its own name, the folder of data set ``name``."""
    folder = d.parent.name if d.name.lower() == "raw" else d.name
    return _norm(folder) in _DIR_ALIASES[name]


def candidate_dirs(name: DatasetName, data_dir: Optional[PathLike] = None) -> list[Path]:
    """The folders :func:`find_dataset` searches, in order, existing or not.

    Roots, in order: ``data_dir``; each entry of ``$EWC_RS_DATA``
    (``os.pathsep``-separated); ``~/.torch``. Nothing relative to the current
    directory or to a source checkout is searched: where the data lives is
    the user's to say. In each root the sub-folders ``mnist/``, ``MNIST/raw/``,
    ``MNIST/`` (for MNIST) or ``fashion-mnist/``, ``FashionMNIST/raw/``,
    ``fashion_mnist/``, ``FashionMNIST/`` (for Fashion-MNIST; ``*/raw`` is
    torchvision's layout) are tried, then the root itself when its own name is
    the data set's (e.g. ``--data path/to/mnist``). Last, for Fashion-MNIST
    only, ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``).

    Args:
        name: ``"mnist"`` or ``"fashion-mnist"``.
        data_dir: a folder named by the user, searched first.

    Returns:
        Absolute folder paths without duplicates, in search order.
    """
    _check_name(name)
    roots: list[Path] = []
    if data_dir is not None:
        roots.append(Path(data_dir).expanduser())
    env = os.environ.get(ENV_VAR, "")
    roots.extend(Path(e).expanduser() for e in env.split(os.pathsep) if e.strip())
    roots.append(Path.home() / ".torch")

    out: list[Path] = []
    seen = set()

    def add(d: Path) -> None:
        d = Path(os.path.abspath(d))
        key = os.path.normcase(str(d))
        if key not in seen:
            seen.add(key)
            out.append(d)

    for root in roots:
        root = Path(os.path.abspath(root))
        for sub in _SUBDIRS[name]:
            add(root / sub)
        if _dir_is_dataset(root, name):
            add(root)
    if name == "fashion-mnist":
        add(DEBIAN_FASHION_DIR)
    return out


def _find_file(d: Path, key: str) -> Optional[Path]:
    """The first existing spelling of file ``key`` in ``d`` (uncompressed preferred)."""
    for stem in _FILE_STEMS[key]:
        for fname in (stem, stem + ".gz"):
            f = d / fname
            if f.is_file():
                return f
    return None


def find_dataset(name: DatasetName, data_dir: Optional[PathLike] = None) -> DatasetFiles:
    """Find the IDX files of a data set; the first folder holding the t10k pair wins.

    See :func:`candidate_dirs` for the search order. A folder qualifies when it
    holds both ``t10k`` files (raw or ``.gz``; raw is preferred when both
    exist); the training pair is optional and reported only when both files
    are present. Files are found, not read: see :func:`.idx.read_idx` for validation.

    Args:
        name: ``"mnist"`` or ``"fashion-mnist"``.
        data_dir: a folder named by the user, searched first. When it does not
            hold the data set, the search goes on with the other places.

    Returns:
        The files found.

    Raises:
        ValueError: ``name`` is not a known data set.
        DataError: no folder qualifies; the message lists every folder looked
            at, why each was rejected, and how to get the files.
    """
    looked: list[str] = []
    for d in candidate_dirs(name, data_dir):
        if not d.is_dir():
            looked.append(f"  {d}  (no such folder)")
            continue
        found = {key: _find_file(d, key) for key in _FILE_STEMS}
        test_images, test_labels = found["test_images"], found["test_labels"]
        if test_images is None or test_labels is None:
            missing = [_FILE_STEMS[k][0] + "[.gz]" for k in ("test_images", "test_labels") if found[k] is None]
            looked.append(f"  {d}  (missing {', '.join(missing)})")
            continue
        train_images, train_labels = found["train_images"], found["train_labels"]
        if train_images is None or train_labels is None:
            train_images = train_labels = None
        return DatasetFiles(
            name=name,
            directory=d,
            test_images=test_images,
            test_labels=test_labels,
            train_images=train_images,
            train_labels=train_labels,
        )
    if not os.environ.get(ENV_VAR, "").strip():
        looked.append(f"  (${ENV_VAR} is unset)")
    raise DataError(
        f"{name}: data set not found. Places looked at, in order:\n" + "\n".join(looked) + "\n" + _HOW_TO_GET
    )


# --------------------------------------------------------------------------- loading


@dataclass
class Split:
    """Train and test tensors of one data set.

    Attributes:
        x_train: float32 images in [0, 1], shape ``[N_train, 28, 28]`` (no channel dim).
        y_train: int64 labels in 0..9, shape ``[N_train]``.
        x_test: float32 images in [0, 1], shape ``[N_test, 28, 28]``.
        y_test: int64 labels in 0..9, shape ``[N_test]``.
        source: ``"official"`` (the train and t10k files as published:
            60000 / 10000) or ``"t10k-split"`` (the train files were missing; the
            10000 t10k examples were split 8000 / 2000 with a seeded permutation).
        note: a human-readable sentence saying where the data came from.
        name: ``"mnist"`` or ``"fashion-mnist"``.
        files: the files read.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    source: str
    note: str
    name: str = ""
    files: Optional[DatasetFiles] = None


def _load_pair(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read and check one images/labels pair.

    Args:
        images_path: an IDX uint8 file of shape ``[N, 28, 28]``.
        labels_path: an IDX uint8 file of shape ``[N]`` with values 0..9.

    Returns:
        ``(x, y)``: float32 images in [0, 1] and int64 labels.

    Raises:
        DataError: a file is unreadable or has an unexpected dtype, shape or label value.
    """
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(
            f"{images_path}: expected uint8 images of shape [N, 28, 28], got {images.dtype} {tuple(images.shape)}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(f"{labels_path}: expected uint8 labels of shape [N], got {labels.dtype} {tuple(labels.shape)}")
    if labels.shape[0] != images.shape[0]:
        raise DataError(f"{labels_path}: {labels.shape[0]} labels for {images.shape[0]} images in {images_path}")
    if labels.size and int(labels.max()) > 9:
        raise DataError(f"{labels_path}: label {int(labels.max())} outside 0..9")
    x = torch.from_numpy(images).to(torch.float32).div_(255.0)
    y = torch.from_numpy(labels).to(torch.int64)
    return x, y


def load_split(name: DatasetName, data_dir: Optional[PathLike] = None, *, seed: int = 0) -> Split:
    """Load a data set as train and test tensors.

    With the official training files present, train and test are the published
    ones (60000 / 10000 for both data sets). With only the ``t10k`` files (e.g.
    an MNIST folder without the train pair), the 10000 test examples are split into 8000 train and
    2000 test (four fifths / one fifth for other sizes) with
    ``torch.randperm(10000, generator=torch.Generator().manual_seed(seed))``:
    the same seed always gives the same, disjoint split.

    Args:
        name: ``"mnist"`` or ``"fashion-mnist"``.
        data_dir: a folder searched first (see :func:`find_dataset`).
        seed: seed of the t10k split; unused with the official split.

    Returns:
        A :class:`Split` with images of shape ``[N, 28, 28]``, float32 in [0, 1],
        and int64 labels; ``source`` and ``note`` say which split was used.

    Raises:
        ValueError: ``name`` is not a known data set.
        DataError: the files cannot be found, or one is truncated or corrupt.
    """
    files = find_dataset(name, data_dir)
    x_test, y_test = _load_pair(files.test_images, files.test_labels)
    if files.train_images is not None and files.train_labels is not None:
        x_train, y_train = _load_pair(files.train_images, files.train_labels)
        return Split(
            x_train=x_train,
            y_train=y_train,
            x_test=x_test,
            y_test=y_test,
            source="official",
            note=(f"{name}: official split from {files.directory} ({len(y_train)} train / {len(y_test)} test)"),
            name=name,
            files=files,
        )
    n = len(y_test)
    n_train = n * T10K_TRAIN_FIFTHS // 5
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:n_train], perm[n_train:]
    return Split(
        x_train=x_test[tr],
        y_train=y_test[tr],
        x_test=x_test[te],
        y_test=y_test[te],
        source="t10k-split",
        note=(
            f"{name}: training files not found in {files.directory}; the {n} t10k examples "
            f"were split {len(tr)} train / {len(te)} test (seed {seed})"
        ),
        name=name,
        files=files,
    )
