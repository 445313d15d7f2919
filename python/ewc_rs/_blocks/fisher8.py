"""The 8-bit diagonal Fisher of one parameter: uint8 codes with a scale pair per block of contiguous values.

The code (``src/fisher8.rs``) is logarithmic within each block of :data:`BLOCK` values: code 0 is
F = 0 (and values more than :data:`RANGE` binades below the block's maximum, flushed), code q ≥ 1
is 2^(lo + (q − 1)·step) with the block's float32 ``(lo, step)``. The fused penalty reads the codes
directly (CPU pass and CUDA kernel). :data:`BLOCK` and :data:`RANGE` were chosen by
``benchmarks/fisher8_codes.py`` on the Fishers of trained models (an MLP, ResNet-18, a small
GPT-2): the log code with the largest block whose gradient error is ≤ 1% on every model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from .. import _core

#: The bit widths ``EWC(fisher_bits=...)`` accepts (None: F in the storage dtype).
FISHER_BITS = (8,)
#: Values per scale block (a power of two): 1 + 8/BLOCK bytes a parameter (1.125).
BLOCK = 64
#: Binades a block spans at most below its maximum; smaller values are stored as 0. Each kept
#: value is within 2^(RANGE/508) − 1 (2.2%) of its float32 value.
RANGE = 16.0


def check_bits(bits: Any) -> Optional[int]:
    """``fisher_bits``: None (F in the storage dtype) or 8.

    Raises:
        ValueError: any other value.
    """
    if bits is None or (isinstance(bits, int) and not isinstance(bits, bool) and bits in FISHER_BITS):
        return bits
    raise ValueError(f"fisher_bits: expected None or one of {', '.join(map(str, FISHER_BITS))}, got {bits!r}")


@dataclass(frozen=True)
class Fisher8:
    """One parameter's F in 8 bits: ``codes`` (uint8, the parameter's shape), ``scales`` (float32
    ``[ceil(numel / block), 2]``, each block's ``(lo, step)``) and the ``block`` size."""

    codes: torch.Tensor
    scales: torch.Tensor
    block: int

    @classmethod
    def of(cls, fisher: torch.Tensor, block: int = BLOCK, range_: float = RANGE) -> Fisher8:
        """The 8-bit code of ``fisher`` (finite, ≥ 0; any float dtype), on its device.

        Raises:
            ValueError: negative or non-finite values.
        """
        codes, scales = _core.fisher8_quantize(fisher.detach(), block, range_)
        return cls(codes.view(fisher.shape), scales, block)

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        """Bytes held: one a value plus eight a block."""
        return self.codes.numel() + 4 * self.scales.numel()

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The decoded F, shaped like the parameter."""
        flat = _core.fisher8_dequantize(self.codes.reshape(-1), self.scales, self.block)
        return flat.view(self.shape).to(dtype)

    def to(self, device: torch.device) -> Fisher8:
        return Fisher8(self.codes.to(device), self.scales.to(device), self.block)

    def to_state(self) -> dict[str, Any]:
        """The state-dict form: ``{"codes", "scales", "block"}``."""
        return {"codes": self.codes, "scales": self.scales, "block": self.block}

    @classmethod
    def from_state(cls, payload: Any, where: str) -> Fisher8:
        """Checks a :meth:`to_state` dict.

        Raises:
            ValueError: missing keys, codes not uint8, scales not float32 of one pair per block or
                not finite, a block size that is not a power of two from 16 to 65536.
        """
        if not isinstance(payload, dict) or set(payload) != {"codes", "scales", "block"}:
            raise ValueError(f"state: {where}: an 8-bit F must be a dict with 'codes', 'scales' and 'block'")
        codes, scales, block = payload["codes"], payload["scales"], payload["block"]
        if isinstance(block, torch.Tensor) and block.numel() == 1:
            block = int(block)
        if not isinstance(block, int) or block < 16 or block > 65536 or block & (block - 1):
            raise ValueError(f"state: {where}: block must be a power of two from 16 to 65536, got {block!r}")
        if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
            raise ValueError(f"state: {where}: 8-bit F codes must be a uint8 tensor")
        blocks = math.ceil(codes.numel() / block)
        if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32 or tuple(scales.shape) != (blocks, 2):
            raise ValueError(
                f"state: {where}: 8-bit F scales must be float32 of shape [{blocks}, 2] "
                f"({codes.numel()} codes in blocks of {block})"
            )
        if not torch.isfinite(scales).all() or (scales[:, 1] < 0).any():
            raise ValueError(f"state: {where}: 8-bit F scales must be finite with steps ≥ 0")
        return cls(codes.detach(), scales.detach().contiguous(), block)


#: One parameter's stored F: a tensor in the storage dtype, or 8-bit.
FisherValue = Union[torch.Tensor, Fisher8]


def dense(f: FisherValue, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """F as a tensor of ``dtype`` (decoded when 8-bit)."""
    return f.dense(dtype) if isinstance(f, Fisher8) else f.to(dtype)
