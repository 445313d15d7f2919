"""Writing IDX files for the tests (the library only reads them: ``ewc_rs.demo.idx.read_idx``).

Its own type-code table, so a wrong table in the reader is not hidden by sharing it.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Optional, Union

import numpy as np
import numpy.typing as npt

__all__ = ["IDX_TYPE_CODES", "write_idx"]

# (numpy kind, item size) -> IDX type code.
IDX_TYPE_CODES = {
    ("u", 1): 0x08,
    ("i", 1): 0x09,
    ("i", 2): 0x0B,
    ("i", 4): 0x0C,
    ("f", 4): 0x0D,
    ("f", 8): 0x0E,
}


def write_idx(path: Union[str, os.PathLike[str]], array: npt.ArrayLike, *, compress: Optional[bool] = None) -> Path:
    """Write an array as an IDX file (the inverse of ``read_idx``).

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
    code = IDX_TYPE_CODES.get((a.dtype.kind, a.dtype.itemsize))
    if code is None:
        raise ValueError(f"IDX cannot store dtype {a.dtype}")
    if not 1 <= a.ndim <= 255 or any(d >= 2**32 for d in a.shape):
        raise ValueError(f"IDX cannot store shape {a.shape}")
    header = bytes([0, 0, code, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    body = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder(">")).tobytes()
    content = header + body
    if compress if compress is not None else p.suffix == ".gz":
        content = gzip.compress(content)
    p.write_bytes(content)
    return p
