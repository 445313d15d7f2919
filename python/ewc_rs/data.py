"""Loading MNIST and Fashion-MNIST from IDX files, without any download.

This module needs only numpy, torch and the standard library (it does not import
the compiled ``ewc_rs._core``), so it can be used and tested on its own.

Three layers:

* :func:`read_idx` / :func:`write_idx` read and write single IDX files (raw or
  gzip-compressed), validating the header and the exact data length.
* :func:`find_dataset` looks for the four standard files of a data set in the
  usual places (see :func:`candidate_dirs` for the exact search order).
* :func:`load_split` returns train and test tensors ready for training. When the
  official training files are missing (this project ships only the MNIST *test*
  set), it splits the 10000 ``t10k`` examples into 8000 train / 2000 test with a
  seeded permutation, and says so in :attr:`Split.source` and :attr:`Split.note`.

Every problem with the data (a missing, truncated or corrupt file, an
unexpected shape) raises :class:`DataError`, a :class:`ValueError` subclass whose
message names the file and what was wrong.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Literal, Optional, Tuple, Union

import numpy as np
import numpy.typing as npt
import torch

__all__ = [
    "DataError",
    "DatasetFiles",
    "DatasetName",
    "Split",
    "ENV_VAR",
    "IDX_DTYPES",
    "T10K_TRAIN_FIFTHS",
    "candidate_dirs",
    "find_dataset",
    "load_split",
    "read_idx",
    "write_idx",
]

DatasetName = Literal["mnist", "fashion-mnist"]
"""The data sets this module knows about."""

PathLike = Union[str, "os.PathLike[str]"]

ENV_VAR = "EWC_RS_DATA"
"""Environment variable naming a data root (several may be joined with ``os.pathsep``)."""

T10K_TRAIN_FIFTHS = 4
"""Fifths of the ``t10k`` examples used for training when the train files are missing (8000 of 10000)."""

DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's package ``dataset-fashion-mnist`` installs its files."""

# IDX type code -> big-endian numpy dtype.
IDX_DTYPES: Dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_DTYPE_CODES: Dict[Tuple[str, int], int] = {
    (dt.kind, dt.itemsize): code for code, dt in IDX_DTYPES.items()
}

_GZIP_MAGIC = b"\x1f\x8b"

# Standard file names (without the optional ".gz"); the second spelling is the
# one some mirrors (e.g. Kaggle) use.
_FILE_STEMS: Dict[str, Tuple[str, ...]] = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}

# Sub-folders of a data root that may hold each data set, in the order tried.
_SUBDIRS: Dict[str, Tuple[str, ...]] = {
    "mnist": ("mnist", "MNIST/raw", "MNIST"),
    "fashion-mnist": ("fashion-mnist", "FashionMNIST/raw", "fashion_mnist", "FashionMNIST"),
}

# Normalised folder names that identify a data set when a root *is* the data set's folder.
_DIR_ALIASES: Dict[str, Tuple[str, ...]] = {
    "mnist": ("mnist",),
    "fashion-mnist": ("fashionmnist",),
}

_HOW_TO_GET = (
    "How to get the files: pass a directory with data_dir= (the demo's --data DIR) or set "
    f"${ENV_VAR}; the directory may hold 'mnist/' and 'fashion-mnist/' sub-folders, or "
    "torchvision's layout '<root>/MNIST/raw' and '<root>/FashionMNIST/raw' (as written by "
    "torchvision.datasets.MNIST(root, download=True) and FashionMNIST(root, download=True)); "
    "on Debian/Ubuntu, 'apt install dataset-fashion-mnist' installs Fashion-MNIST in "
    f"{DEBIAN_FASHION_DIR}. Expected file names: train-images-idx3-ubyte, "
    "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (each optionally "
    ".gz); the t10k pair is required, the train pair is optional."
)


class DataError(ValueError):
    """A data file is missing, truncated or corrupt, or a data set cannot be found."""


# --------------------------------------------------------------------------- IDX files


def _read_bytes(path: Path) -> bytes:
    """Return the (decompressed) content of ``path``.

    Args:
        path: an IDX file, gzip-compressed when its name ends in ``.gz`` or its
            content starts with the gzip magic number.

    Returns:
        The uncompressed bytes.

    Raises:
        DataError: the file cannot be read or is not a valid gzip stream.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc})") from exc
    if path.suffix == ".gz" or raw[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except EOFError as exc:
            raise DataError(f"{path}: truncated gzip data ({exc})") from exc
        except (OSError, zlib.error) as exc:
            raise DataError(f"{path}: not a valid gzip file ({exc})") from exc
    return raw


def read_idx(path: PathLike) -> npt.NDArray[np.generic]:
    """Read an IDX file (the format of MNIST and Fashion-MNIST).

    The header is two zero bytes, one type code byte (0x08 uint8, 0x09 int8,
    0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64), one byte with the number
    of dimensions, then one big-endian uint32 per dimension; the values follow,
    big-endian, row-major. The file may be gzip-compressed (detected by the
    ``.gz`` suffix or by the gzip magic number).

    Args:
        path: the file to read.

    Returns:
        A writable array in native byte order with the dtype and shape the
        header gives.

    Raises:
        DataError: the file is missing, is not valid gzip, has a bad magic
            number or type code, has zero dimensions, or holds fewer or more
            bytes than its header promises. The message names the file.
    """
    p = Path(path)
    data = _read_bytes(p)
    if len(data) < 4:
        raise DataError(f"{p}: file too short for an IDX header ({len(data)} bytes, need at least 4)")
    if data[0] != 0 or data[1] != 0:
        raise DataError(
            f"{p}: bad IDX magic number 0x{data[:4].hex()} (the first two bytes must be zero)"
        )
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise DataError(f"{p}: unknown IDX type code 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise DataError(f"{p}: IDX header gives 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(
            f"{p}: truncated IDX header ({len(data)} bytes, the {ndim} dimension sizes need {header_len})"
        )
    shape = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = IDX_DTYPES[code]
    count = 1
    for d in shape:
        count *= d
    expected = count * dtype.itemsize
    actual = len(data) - header_len
    if actual < expected:
        raise DataError(
            f"{p}: truncated data: header promises shape {tuple(shape)} of {dtype.name} "
            f"({expected} bytes) but only {actual} bytes follow the header"
        )
    if actual > expected:
        raise DataError(
            f"{p}: {actual - expected} bytes of trailing data after the {expected} bytes "
            f"promised by the header (shape {tuple(shape)}, {dtype.name})"
        )
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=header_len)
    return arr.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def write_idx(path: PathLike, array: npt.ArrayLike, *, compress: Optional[bool] = None) -> Path:
    """Write an array as an IDX file (the inverse of :func:`read_idx`).

    Args:
        path: the file to write.
        array: values of dtype uint8, int8, int16, int32, float32 or float64,
            with 1 to 255 dimensions, each smaller than 2**32.
        compress: gzip the output; by default, when ``path`` ends in ``.gz``.

    Returns:
        The path written.

    Raises:
        ValueError: the dtype or shape cannot be stored in IDX.
    """
    p = Path(path)
    a = np.asarray(array)
    code = _DTYPE_CODES.get((a.dtype.kind, a.dtype.itemsize))
    if code is None:
        raise ValueError(f"IDX cannot store dtype {a.dtype}")
    if not 1 <= a.ndim <= 255 or any(d >= 2**32 for d in a.shape):
        raise ValueError(f"IDX cannot store shape {a.shape}")
    header = bytes([0, 0, code, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    body = np.ascontiguousarray(a, dtype=IDX_DTYPES[code]).tobytes()
    content = header + body
    if compress if compress is not None else p.suffix == ".gz":
        content = gzip.compress(content)
    p.write_bytes(content)
    return p


# --------------------------------------------------------------------------- discovery


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


def _repo_data_root() -> Optional[Path]:
    """``<repo>/../shared/data`` for a source checkout (``<repo>/python/ewc_rs/data.py``)."""
    try:
        repo = Path(__file__).resolve().parents[2]
    except IndexError:
        return None
    return repo / ".." / "shared" / "data"


def candidate_dirs(name: DatasetName, data_dir: Optional[PathLike] = None) -> List[Path]:
    """The folders :func:`find_dataset` searches, in order, existing or not.

    Roots, in order: ``data_dir``; each entry of ``$EWC_RS_DATA``
    (``os.pathsep``-separated); ``../shared/data`` relative to the current
    directory; ``../shared/data`` relative to the repository root (source
    checkouts only); ``./data``; ``~/.torch``. In each root the sub-folders
    ``mnist/``, ``MNIST/raw/``, ``MNIST/`` (for MNIST) or ``fashion-mnist/``,
    ``FashionMNIST/raw/``, ``fashion_mnist/``, ``FashionMNIST/`` (for
    Fashion-MNIST) are tried, then the root itself when its own name is the data
    set's (e.g. ``--data path/to/mnist``). Last, for Fashion-MNIST only,
    ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``).

    Args:
        name: ``"mnist"`` or ``"fashion-mnist"``.
        data_dir: a folder named by the user, searched first.

    Returns:
        Absolute folder paths without duplicates, in search order.
    """
    _check_name(name)
    roots: List[Path] = []
    if data_dir is not None:
        roots.append(Path(data_dir).expanduser())
    env = os.environ.get(ENV_VAR, "")
    roots.extend(Path(e).expanduser() for e in env.split(os.pathsep) if e.strip())
    cwd = Path.cwd()
    roots.append(cwd / ".." / "shared" / "data")
    repo_root = _repo_data_root()
    if repo_root is not None:
        roots.append(repo_root)
    roots.append(cwd / "data")
    roots.append(Path.home() / ".torch")

    out: List[Path] = []
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
    are present. Files are found, not read: see :func:`read_idx` for validation.

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
    looked: List[str] = []
    for d in candidate_dirs(name, data_dir):
        if not d.is_dir():
            looked.append(f"  {d}  (no such folder)")
            continue
        found = {key: _find_file(d, key) for key in _FILE_STEMS}
        test_images, test_labels = found["test_images"], found["test_labels"]
        if test_images is None or test_labels is None:
            missing = [
                _FILE_STEMS[k][0] + "[.gz]"
                for k in ("test_images", "test_labels")
                if found[k] is None
            ]
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
    raise DataError(
        f"{name}: data set not found. Places looked at, in order:\n"
        + "\n".join(looked)
        + "\n"
        + _HOW_TO_GET
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


def _load_pair(images_path: Path, labels_path: Path) -> Tuple[torch.Tensor, torch.Tensor]:
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
            f"{images_path}: expected uint8 images of shape [N, 28, 28], "
            f"got {images.dtype} {tuple(images.shape)}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(
            f"{labels_path}: expected uint8 labels of shape [N], got {labels.dtype} {tuple(labels.shape)}"
        )
    if labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{labels_path}: {labels.shape[0]} labels for {images.shape[0]} images in {images_path}"
        )
    if labels.size and int(labels.max()) > 9:
        raise DataError(f"{labels_path}: label {int(labels.max())} outside 0..9")
    x = torch.from_numpy(images).to(torch.float32).div_(255.0)
    y = torch.from_numpy(labels).to(torch.int64)
    return x, y


def load_split(
    name: DatasetName, data_dir: Optional[PathLike] = None, *, seed: int = 0
) -> Split:
    """Load a data set as train and test tensors.

    With the official training files present, train and test are the published
    ones (60000 / 10000 for both data sets). With only the ``t10k`` files (this
    project's MNIST), the 10000 test examples are split into 8000 train and
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
            note=(
                f"{name}: official split from {files.directory} "
                f"({len(y_train)} train / {len(y_test)} test)"
            ),
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
