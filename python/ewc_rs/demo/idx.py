"""Reading IDX files, the format of MNIST and Fashion-MNIST (raw or gzip-compressed).

This module needs only numpy and the standard library (it does not import the compiled
``ewc_rs._core``), so it can be used and tested on its own.

Every problem with a file (missing, truncated, corrupt) raises :class:`DataError`, a
:class:`ValueError` subclass whose message names the file and what was wrong.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Union

import numpy as np
import numpy.typing as npt

__all__ = ["DataError", "IDX_DTYPES", "PathLike", "read_idx"]

PathLike = Union[str, "os.PathLike[str]"]

# IDX type code -> big-endian numpy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


class DataError(ValueError):
    """A data file is missing, truncated or corrupt, or a data set cannot be found."""


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
        raise DataError(f"{p}: bad IDX magic number 0x{data[:4].hex()} (the first two bytes must be zero)")
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise DataError(f"{p}: unknown IDX type code 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise DataError(f"{p}: IDX header gives 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"{p}: truncated IDX header ({len(data)} bytes, the {ndim} dimension sizes need {header_len})")
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
