"""Tests of the demo's data modules: ``ewc_rs/demo/idx.py`` (IDX reading) and
``ewc_rs/demo/datasets.py`` (data set discovery, train/test split).

The modules are imported by path, as submodules of a stand-in package, so these tests run
without the compiled extension (``ewc_rs/__init__`` imports the native core).
"""

from __future__ import annotations

import gzip
import importlib
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Optional

import numpy as np
import pytest
import torch

from idx_files import write_idx
from real_data import missing_reason, real_data_root

REPO = Path(__file__).resolve().parents[2]
DEMO_DIR = REPO / "python" / "ewc_rs" / "demo"
REAL_DATA: Optional[Path] = real_data_root()  # $EWC_RS_DATA (conftest's default: ../shared/data)


def _load_demo_module(name: str) -> ModuleType:
    """``ewc_rs/demo/<name>.py`` as a submodule of a stand-in package whose ``__path__`` is the demo
    folder: its relative imports (``from .idx import ...``) work, ``ewc_rs/__init__`` never runs."""
    package = "ewc_rs_demo_under_test"
    if package not in sys.modules:
        stand_in = ModuleType(package)
        stand_in.__path__ = [str(DEMO_DIR)]
        sys.modules[package] = stand_in
    return importlib.import_module(f"{package}.{name}")


idx = _load_demo_module("idx")
data = _load_demo_module("datasets")

STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


# --------------------------------------------------------------------------- helpers


def idx_bytes(code: int, shape: tuple[int, ...], body: bytes) -> bytes:
    """An IDX file written by hand (independent of ``write_idx``)."""
    return bytes([0, 0, code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + body


def make_dataset(folder: Path, n_test: int = 50, n_train: int = 0, gz: bool = True, tag: int = 0) -> Path:
    """Write a small synthetic data set; pixel [0, 0] holds ``tag`` to tell folders apart."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    rng = np.random.default_rng(tag)
    parts = [("test", n_test)] + ([("train", n_train)] if n_train else [])
    for split, n in parts:
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = tag
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(folder / (STEMS[f"{split}_images"] + suffix), images)
        write_idx(folder / (STEMS[f"{split}_labels"] + suffix), labels)
    return folder


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """No default place holds data: fresh cwd and home, no env var, no Debian folder."""
    cwd = tmp_path / "work" / "cwd"
    cwd.mkdir(parents=True)
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setattr(data, "DEBIAN_FASHION_DIR", tmp_path / "debian" / "fashion-mnist")
    yield tmp_path


# --------------------------------------------------------------------------- real files


def _real(sub: str, fname: str) -> Path:
    if REAL_DATA is None:
        pytest.skip(missing_reason())
    p = REAL_DATA / sub / fname
    if not p.is_file():
        pytest.skip(f"real data file {p} not present")
    return p


def test_real_mnist_t10k() -> None:
    images = idx.read_idx(_real("mnist", "t10k-images-idx3-ubyte.gz"))
    labels = idx.read_idx(_real("mnist", "t10k-labels-idx1-ubyte.gz"))
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.uint8
    assert labels.min() == 0 and labels.max() == 9
    assert set(np.unique(labels)) == set(range(10))


def test_real_fashion_train() -> None:
    images = idx.read_idx(_real("fashion-mnist", "train-images-idx3-ubyte.gz"))
    labels = idx.read_idx(_real("fashion-mnist", "train-labels-idx1-ubyte.gz"))
    assert images.shape == (60000, 28, 28) and labels.shape == (60000,)
    assert labels.min() == 0 and labels.max() == 9


def test_real_load_split() -> None:
    _real("mnist", "t10k-images-idx3-ubyte.gz")
    _real("fashion-mnist", "train-images-idx3-ubyte.gz")
    m = data.load_split("mnist", REAL_DATA)
    assert m.source == "t10k-split" and "8000" in m.note
    assert m.x_train.shape == (8000, 28, 28) and m.x_test.shape == (2000, 28, 28)
    assert m.x_train.dtype == torch.float32 and m.y_train.dtype == torch.int64
    assert 0.0 <= float(m.x_train.min()) and float(m.x_train.max()) <= 1.0
    f = data.load_split("fashion-mnist", REAL_DATA)
    assert f.source == "official"
    assert f.x_train.shape == (60000, 28, 28) and f.x_test.shape == (10000, 28, 28)
    assert int(f.y_test.min()) == 0 and int(f.y_test.max()) == 9


def test_env_var_finds_real_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without arguments, ``$EWC_RS_DATA`` is searched (cwd and home elsewhere)."""
    _real("mnist", "t10k-images-idx3-ubyte.gz")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(data.ENV_VAR, str(REAL_DATA))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert REAL_DATA is not None and REAL_DATA / "mnist" in data.candidate_dirs("mnist")
    assert data.find_dataset("mnist").directory == REAL_DATA / "mnist"


def test_never_searches_cwd_or_checkout(isolated: Path) -> None:
    """Data next to the current directory or to the source checkout is not found by default."""
    cwd = isolated / "work" / "cwd"
    planted = [
        make_dataset(isolated / "work" / "shared" / "data" / "mnist"),  # cwd/../shared/data
        make_dataset(cwd / "data" / "mnist"),  # ./data
        make_dataset(cwd / "data" / "MNIST" / "raw"),  # ./data in torchvision's layout
        make_dataset(cwd / "mnist"),  # ./mnist
    ]
    dirs = data.candidate_dirs("mnist")
    for d in planted + [(REPO / ".." / "shared" / "data" / "mnist").resolve()]:
        assert d not in dirs
    with pytest.raises(data.DataError, match=r"\$EWC_RS_DATA is unset"):
        data.find_dataset("mnist")


# --------------------------------------------------------------------------- IDX round trips


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("gz", [False, True])
def test_round_trip(tmp_path: Path, dtype: str, gz: bool) -> None:
    rng = np.random.default_rng(1)
    a = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    path = write_idx(tmp_path / ("a.idx" + (".gz" if gz else "")), a)
    b = idx.read_idx(path)
    assert b.dtype == np.dtype(dtype) and b.dtype.isnative
    assert b.shape == (3, 4, 5)
    np.testing.assert_array_equal(a, b)
    assert b.flags.writeable


@pytest.mark.parametrize(
    "code,dtype", [(0x08, ">u1"), (0x09, ">i1"), (0x0B, ">i2"), (0x0C, ">i4"), (0x0D, ">f4"), (0x0E, ">f8")]
)
def test_read_handwritten(tmp_path: Path, code: int, dtype: str) -> None:
    values = np.array([[1, 2, 3], [4, 5, 6]], dtype=dtype)
    raw = idx_bytes(code, (2, 3), values.tobytes())
    (tmp_path / "x").write_bytes(raw)
    (tmp_path / "x.gz").write_bytes(gzip.compress(raw))
    for p in (tmp_path / "x", tmp_path / "x.gz"):
        got = idx.read_idx(p)
        assert got.shape == (2, 3)
        np.testing.assert_array_equal(got, [[1, 2, 3], [4, 5, 6]])


def test_gzip_detected_by_content(tmp_path: Path) -> None:
    p = tmp_path / "no-suffix"
    p.write_bytes(gzip.compress(idx_bytes(0x08, (4,), bytes([9, 8, 7, 6]))))
    assert idx.read_idx(p).tolist() == [9, 8, 7, 6]


def test_empty_dimension(tmp_path: Path) -> None:
    p = tmp_path / "empty"
    p.write_bytes(idx_bytes(0x08, (0, 28, 28), b""))
    assert idx.read_idx(p).shape == (0, 28, 28)


# --------------------------------------------------------------------------- corrupt files

GOOD = idx_bytes(0x08, (2, 3), bytes(range(6)))


def _expect_error(path: Path, *fragments: str) -> str:
    with pytest.raises(idx.DataError) as info:
        idx.read_idx(path)
    msg = str(info.value)
    assert str(path) in msg
    for frag in fragments:
        assert frag in msg.lower(), msg
    assert isinstance(info.value, ValueError)
    return msg


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_data(tmp_path: Path, gz: bool) -> None:
    p = tmp_path / ("t.gz" if gz else "t")
    content = GOOD[:-1]
    p.write_bytes(gzip.compress(content) if gz else content)
    _expect_error(p, "truncated", "6 bytes", "only 5")


def test_truncated_header(tmp_path: Path) -> None:
    p = tmp_path / "h"
    p.write_bytes(GOOD[:6])
    _expect_error(p, "header")
    p.write_bytes(b"\x00\x00")
    _expect_error(p, "too short")


def test_wrong_magic(tmp_path: Path) -> None:
    p = tmp_path / "m"
    p.write_bytes(b"\x01" + GOOD[1:])
    _expect_error(p, "magic")
    p.write_bytes(b"\x00\x00\x07" + GOOD[3:])
    _expect_error(p, "type code 0x07")
    p.write_bytes(b"\x00\x00\x08\x00")
    _expect_error(p, "0 dimensions")


@pytest.mark.parametrize("gz", [False, True])
def test_trailing_bytes(tmp_path: Path, gz: bool) -> None:
    p = tmp_path / ("tr.gz" if gz else "tr")
    content = GOOD + b"\x00\x01"
    p.write_bytes(gzip.compress(content) if gz else content)
    _expect_error(p, "trailing", "2 bytes")


def test_corrupt_gzip(tmp_path: Path) -> None:
    p = tmp_path / "bad.gz"
    p.write_bytes(GOOD)  # raw IDX content under a .gz name
    _expect_error(p, "gzip")
    full = gzip.compress(GOOD)
    p.write_bytes(full[: len(full) // 2])  # stream cut short
    _expect_error(p, "gzip")
    broken = bytearray(full)
    broken[12] ^= 0xFF  # damaged deflate data / CRC
    p.write_bytes(bytes(broken))
    _expect_error(p, "gzip")


def test_missing_file(tmp_path: Path) -> None:
    _expect_error(tmp_path / "nope.gz", "not found")


def test_write_idx_rejects_unsupported() -> None:
    with pytest.raises(ValueError):
        write_idx("unused", np.zeros(3, dtype=np.uint32))
    with pytest.raises(ValueError):
        write_idx("unused", np.float32(1.0))


# --------------------------------------------------------------------------- discovery


def test_data_dir_beats_env_beats_defaults(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default = make_dataset(isolated / "home" / ".torch" / "mnist", tag=1)  # ~/.torch
    env_root = isolated / "env"
    make_dataset(env_root / "mnist", tag=2)
    arg_root = isolated / "arg"
    make_dataset(arg_root / "mnist", tag=3)

    assert data.find_dataset("mnist").directory == default
    monkeypatch.setenv(data.ENV_VAR, str(env_root))
    assert data.find_dataset("mnist").directory == env_root / "mnist"
    assert data.find_dataset("mnist", arg_root).directory == arg_root / "mnist"
    assert data.find_dataset("mnist", str(arg_root)).directory == arg_root / "mnist"
    assert int(data.load_split("mnist", arg_root).x_test[0, 0, 0] * 255) == 3
    # a data_dir without the data set falls through to the next places
    assert data.find_dataset("mnist", isolated / "empty").directory == env_root / "mnist"


def test_env_var_several_roots(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    second = make_dataset(isolated / "b" / "fashion-mnist")
    monkeypatch.setenv(data.ENV_VAR, os.pathsep.join([str(isolated / "a"), str(isolated / "b")]))
    assert data.find_dataset("fashion-mnist").directory == second


@pytest.mark.parametrize("name,sub", [("mnist", "MNIST/raw"), ("fashion-mnist", "FashionMNIST/raw")])
def test_torchvision_layout(isolated: Path, name: str, sub: str) -> None:
    folder = make_dataset(isolated / "tv" / sub, n_train=20, gz=False)
    found = data.find_dataset(name, isolated / "tv")
    assert found.directory == folder and found.has_train
    assert found.test_images.name == "t10k-images-idx3-ubyte"
    # ~/.torch is a default root, in torchvision's layout too (./data is not: see above)
    make_dataset(isolated / "home" / ".torch" / sub)
    assert data.find_dataset(name).directory == isolated / "home" / ".torch" / sub


def test_named_folder_as_data_dir(isolated: Path) -> None:
    folder = make_dataset(isolated / "x" / "fashion-mnist")
    assert data.find_dataset("fashion-mnist", folder).directory == folder
    with pytest.raises(data.DataError):  # a fashion folder is never taken for MNIST
        data.find_dataset("mnist", folder)


def test_debian_folder_fashion_only(isolated: Path) -> None:
    folder = make_dataset(data.DEBIAN_FASHION_DIR, n_train=10)
    assert data.find_dataset("fashion-mnist").directory == folder
    assert folder not in data.candidate_dirs("mnist")
    with pytest.raises(data.DataError):
        data.find_dataset("mnist")


def test_raw_preferred_over_gz_and_train_optional(isolated: Path) -> None:
    folder = make_dataset(isolated / "r" / "mnist", gz=True)
    make_dataset(folder, gz=False)
    write_idx(folder / (STEMS["train_images"] + ".gz"), np.zeros((1, 28, 28), np.uint8))
    found = data.find_dataset("mnist", isolated / "r")
    assert found.test_images.suffix == "" and found.test_labels.suffix == ""
    assert not found.has_train and found.train_images is None  # labels missing: no train pair


def test_missing_lists_places(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(data.ENV_VAR, str(isolated / "envroot"))
    half = isolated / "arg" / "fashion-mnist"
    half.mkdir(parents=True)
    write_idx(half / (STEMS["test_images"] + ".gz"), np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(data.DataError) as info:
        data.find_dataset("fashion-mnist", isolated / "arg")
    msg = str(info.value)
    for d in data.candidate_dirs("fashion-mnist", isolated / "arg"):
        assert str(d) in msg
    assert str(isolated / "envroot" / "FashionMNIST" / "raw") in msg
    assert str(data.DEBIAN_FASHION_DIR) in msg
    assert "missing t10k-labels-idx1-ubyte[.gz]" in msg
    assert msg.index(str(isolated / "arg")) < msg.index(str(isolated / "envroot"))
    for hint in (data.ENV_VAR, "download=True", "dataset-fashion-mnist", "--data"):
        assert hint in msg
    assert f"set {data.ENV_VAR}=DIR or pass --data DIR" in msg
    with pytest.raises(data.DataError):
        data.load_split("fashion-mnist", isolated / "arg")


def test_unknown_name() -> None:
    with pytest.raises(ValueError):
        data.find_dataset("cifar10")


# --------------------------------------------------------------------------- load_split


def _indexed_t10k(folder: Path, n: int = 10000) -> Path:
    """t10k files whose pixels [0, 0] and [0, 1] encode the example's index."""
    folder.mkdir(parents=True, exist_ok=True)
    images = np.zeros((n, 28, 28), np.uint8)
    idx = np.arange(n)
    images[:, 0, 0] = idx % 256
    images[:, 0, 1] = idx // 256
    write_idx(folder / STEMS["test_images"], images)
    write_idx(folder / STEMS["test_labels"], (idx % 10).astype(np.uint8))
    return folder


def _ids(x: torch.Tensor) -> torch.Tensor:
    px = (x[:, 0, :2] * 255).round().to(torch.int64)
    return px[:, 0] + 256 * px[:, 1]


def test_t10k_split_deterministic_and_disjoint(isolated: Path) -> None:
    root = isolated / "d"
    _indexed_t10k(root / "mnist")
    a = data.load_split("mnist", root, seed=7)
    b = data.load_split("mnist", root, seed=7)
    c = data.load_split("mnist", root, seed=8)
    assert a.source == "t10k-split"
    assert a.x_train.shape == (8000, 28, 28) and a.x_test.shape == (2000, 28, 28)
    assert a.y_train.shape == (8000,) and a.y_test.shape == (2000,)
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    tr, te = _ids(a.x_train), _ids(a.x_test)
    assert torch.equal(a.y_train, tr % 10) and torch.equal(a.y_test, te % 10)  # pairs kept together
    assert set(tr.tolist()).isdisjoint(te.tolist())
    assert sorted(tr.tolist() + te.tolist()) == list(range(10000))
    assert torch.equal(tr, _ids(b.x_train)) and torch.equal(te, _ids(b.x_test))
    assert not torch.equal(tr, _ids(c.x_train))
    expected = torch.randperm(10000, generator=torch.Generator().manual_seed(7))
    assert torch.equal(tr, expected[:8000])


def test_official_split_used_when_train_present(isolated: Path) -> None:
    folder = make_dataset(isolated / "o" / "fashion-mnist", n_test=30, n_train=70, tag=5)
    s = data.load_split("fashion-mnist", isolated / "o", seed=123)
    assert s.source == "official" and str(folder) in s.note
    assert s.x_train.shape == (70, 28, 28) and s.x_test.shape == (30, 28, 28)
    expected = torch.from_numpy(idx.read_idx(folder / (STEMS["train_images"] + ".gz"))).float() / 255
    assert torch.equal(s.x_train, expected)
    assert s.files is not None and s.files.has_train


def test_bad_content_rejected(isolated: Path) -> None:
    folder = isolated / "bad" / "mnist"
    folder.mkdir(parents=True)
    write_idx(folder / STEMS["test_images"], np.zeros((3, 28, 28), np.uint8))
    write_idx(folder / STEMS["test_labels"], np.array([1, 2, 10], np.uint8))
    with pytest.raises(data.DataError, match="outside 0..9"):
        data.load_split("mnist", folder.parent)
    write_idx(folder / STEMS["test_labels"], np.array([1, 2], np.uint8))
    with pytest.raises(data.DataError, match="2 labels for 3 images"):
        data.load_split("mnist", folder.parent)
    write_idx(folder / STEMS["test_images"], np.zeros((2, 14, 14), np.uint8))
    with pytest.raises(data.DataError, match=r"\[N, 28, 28\]"):
        data.load_split("mnist", folder.parent)
