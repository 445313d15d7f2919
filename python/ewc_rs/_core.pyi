"""Typed signatures of the native module ``ewc_rs._core`` (Rust: tch, pyo3). Checked against the
module by ``python -m mypy.stubtest``."""

import os
from collections.abc import Sequence
from typing import Optional, final

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

__all__ = [
    "__version__",
    "TORCH_VERSION",
    "LayerRule",
    "LayerCall",
    "RootSpec",
    "FisherSums",
    "KfacSums",
    "KronPlan",
    "layer_rule",
    "registered_layers",
    "penalty",
    "penalty_add_to_grads",
    "fisher8_quantize",
    "fisher8_dequantize",
    "merge",
    "fisher_summary",
    "cuda_kernel_status",
    "cuda_kernel_set_enabled",
    "cuda_set_nvrtc_dir",
    "cuda_compile_check",
]
__version__: str
TORCH_VERSION: str

@final
class LayerRule:
    """The per-sample rule of one module, read from its settings (see ``layer_rule``)."""

    @property
    def module_type(self) -> str: ...
    def kfac_form(self, weight_shape: Sequence[int]) -> Optional[tuple[int, int, bool]]:
        """``(inputs, outputs, transposed)`` of the weight as a KFAC matrix, or None (no Kronecker form)."""

def layer_rule(module: nn.Module) -> Optional[LayerRule]:
    """The rule for ``module``'s exact type with its current settings, or None (no rule covers it:
    its parameters need the exact fallback)."""

def registered_layers() -> list[str]:
    """The module types the rule registry covers (``__module__.__qualname__``), in its order."""

@final
class LayerCall:
    """One recorded call of a layer with a rule; checked when built."""

    def __new__(
        cls,
        *,
        rule: LayerRule,
        input: torch.Tensor,
        output: torch.Tensor,
        weight_slot: Optional[int] = None,
        bias_slot: Optional[int] = None,
        kfac_site: Optional[int] = None,
    ) -> LayerCall: ...

@final
class RootSpec:
    """Kind, likelihood and the tensors the Fisher's roots are built from; checked when built."""

    def __new__(
        cls,
        *,
        kind: str,
        likelihood: str,
        targets: Optional[torch.Tensor] = None,
        mc_draws: Optional[torch.Tensor] = None,
        loglik: Optional[torch.Tensor] = None,
        ignore_index: int = -100,
    ) -> RootSpec: ...

@final
class FisherSums:
    """Σ_n (per-sample gradient)² per parameter (float32) over the batches of one estimation."""

    def __new__(cls, *, params: Sequence[torch.Tensor], names: Sequence[str], budget_bytes: int) -> FisherSums: ...
    @property
    def totals(self) -> list[torch.Tensor]: ...
    def add_batch(
        self,
        outputs: torch.Tensor,
        roots: RootSpec,
        *,
        calls: Sequence[LayerCall] = ...,
        whole_slots: Sequence[int] = ...,
        kfac: Optional[KfacSums] = None,
    ) -> None:
        """Adds one batch: a backward pass per root, then each layer call's rule."""
    def add(self, slot: int, sum_sq: torch.Tensor) -> None:
        """Adds Σ over samples of squared gradients of parameter ``slot`` computed elsewhere."""
    def rule_mismatch(
        self,
        outputs: torch.Tensor,
        roots: RootSpec,
        calls: Sequence[LayerCall],
        slots: Sequence[int],
        row: Optional[int] = None,
    ) -> tuple[list[tuple[int, float]], list[int]]:
        """Relative difference per slot between the rules' summed gradients and autograd's, and
        (with ``row``, the one sample the root depends on) the calls whose output gradient is
        non-zero in another row."""

@final
class KfacSums:
    """Σ ã ãᵀ and Σ g gᵀ per KFAC site, added in place into the given float32 matrices."""

    def __new__(cls, *, a_sums: Sequence[torch.Tensor], g_sums: Sequence[torch.Tensor]) -> KfacSums: ...
    @property
    def rows(self) -> list[int]: ...

@final
class KronPlan:
    """The Kronecker-factored penalty's (layer, task) pairs, stacked by shape."""

    def __new__(
        cls,
        *,
        transposed: Sequence[bool],
        has_bias: Sequence[bool],
        stacks: Sequence[tuple[Sequence[int], torch.Tensor, torch.Tensor, torch.Tensor]],
    ) -> KronPlan: ...
    def evaluate(
        self, weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]], lam: float
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[Optional[torch.Tensor]]]:
        """½λ Σ tr(ΔW̃ᵀ G ΔW̃ A), and λ G ΔW̃ A per layer in the weight's and the bias's shapes."""

def penalty(
    params: Sequence[torch.Tensor],
    star: torch.Tensor,
    fisher: torch.Tensor,
    lam: float,
    out: Optional[torch.Tensor] = None,
    *,
    fisher_code: Optional[tuple[torch.Tensor, int]] = None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(λ/2) Σ F (θ−θ*)² as a 0-d tensor, λF(θ−θ*) as one flat tensor (``out`` if given), and
    that tensor's views shaped like each parameter. With ``fisher_code=(scales, block)``,
    ``fisher`` is 8-bit codes (``fisher8_quantize`` of each parameter's F, concatenated)."""

def penalty_add_to_grads(
    params: Sequence[torch.Tensor],
    star: torch.Tensor,
    fisher: torch.Tensor,
    lam: float,
    scale: float,
    *,
    fisher_code: Optional[tuple[torch.Tensor, int]] = None,
) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
    """Adds ``scale``·λF(θ−θ*) into the parameters' ``.grad`` in place (CPU, CUDA); returns the penalty
    and ``(index, gradient)`` for each parameter whose ``.grad`` was absent or not writable in
    place, for the caller to install or add."""

def fisher8_quantize(fisher: torch.Tensor, block: int, range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8-bit log code of ``fisher`` (flattened): flat uint8 codes and float32 ``(lo, step)``
    scales shaped ``[ceil(numel / block), 2]``; values more than ``range`` binades below their
    block's maximum flush to code 0."""

def fisher8_dequantize(codes: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """The flat float32 values of 8-bit codes."""

def merge(
    thetas: Sequence[torch.Tensor],
    fishers: Optional[Sequence[torch.Tensor]],
    weights: Sequence[float],
    eps: float,
) -> torch.Tensor:
    """Σ w (F + eps) θ / Σ w (F + eps) over the tensors (the weighted average without Fishers, or
    where every w (F + eps) is 0), shaped, typed and placed like ``thetas[0]``."""

def fisher_summary(
    tensors: Sequence[torch.Tensor], levels: Sequence[float], edges: Sequence[float]
) -> tuple[
    npt.NDArray[np.int64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.int64],
]:
    """Per tensor: count, sum, max, quantiles at ``levels`` (T × L) and the histogram over ``edges``
    (T × (len(edges) + 1)), as numpy arrays owned by Python."""

def cuda_kernel_status() -> str:
    """What the last CUDA penalty ran ("unused", "kernel ...", "fallback ...: reason")."""

def cuda_kernel_set_enabled(on: bool) -> bool:
    """Switches the one-pass CUDA kernel on or off; returns the previous setting."""

def cuda_set_nvrtc_dir(path: str | os.PathLike[str]) -> None:
    """Where torch's libnvrtc lives (used when it is not found by its soname)."""

def cuda_compile_check(cc: int, max_items: int = 680) -> tuple[str, int]:
    """Compiles the kernel with NVRTC for compute capability ``cc``; returns (what, size in bytes)."""
