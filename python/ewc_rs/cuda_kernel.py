"""The one-pass CUDA penalty kernel: which path ran, switching it off, and where NVRTC is.

On CUDA parameters, ``EWC.penalty`` and ``EWC.backward`` run one kernel over all parameter tensors
(read θ, θ*, F; write or add the gradient), compiled at first use by NVRTC, which torch's CUDA
wheels ship: no CUDA toolkit is needed to build or install ewc_rs. Where it cannot run (no NVRTC,
a GPU below compute capability 7.0), the penalty uses a handful of libtorch kernels instead, and
says so once with a ``RuntimeWarning``. NVRTC is found by its soname, else in the folder
``EWC_RS_NVRTC_DIR`` names, else next to torch (:func:`nvrtc_dir`). Docs: How-to, "CUDA".
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import torch

from . import _core

__all__ = ["compile_check", "disabled", "nvrtc_dir", "set_enabled", "status"]


def status() -> str:
    """What the last CUDA penalty ran.

    Returns:
        ``"unused"``, ``"kernel sm_90 cubin (NVRTC 13.0) on cuda:0"``, or
        ``"fallback on cuda:0: <reason>"``.

    Examples:
        ```python
        import torch
        from ewc_rs import cuda_kernel

        what = cuda_kernel.status()
        if not torch.cuda.is_available():
            assert what == "unused"  # penalties on the CPU never use the kernel
        print(what)
        ```
    """
    return _core.cuda_kernel_status()


def set_enabled(on: bool) -> bool:
    """Switches the one-pass kernel on or off for the whole process (off: the libtorch path).

    The environment variable ``EWC_RS_CUDA_KERNEL=0`` switches it off from the start.

    Args:
        on: whether CUDA penalties use the kernel.

    Returns:
        The previous setting.

    Raises:
        TypeError: ``on`` is not a bool.

    Examples:
        ```python
        from ewc_rs import cuda_kernel

        before = cuda_kernel.set_enabled(False)  # CUDA penalties now take the libtorch path
        try:
            assert cuda_kernel.set_enabled(False) is False
        finally:
            cuda_kernel.set_enabled(before)
        ```
    """
    if not isinstance(on, bool):
        raise TypeError(f"on: expected a bool, got {type(on).__name__}")
    return _core.cuda_kernel_set_enabled(on)


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """A block in which CUDA penalties use the libtorch path (for comparisons and benchmarks).

    The previous setting (:func:`set_enabled`) comes back when the block ends, also on an exception.

    Yields:
        Nothing; the kernel is off inside the ``with`` block.

    Examples:
        ```python
        import torch
        from torch import nn
        from ewc_rs import EWC, cuda_kernel

        model = nn.Linear(4, 3)
        ewc = EWC(model, lam=10.0)
        ewc.consolidate([(torch.randn(8, 4), torch.randint(0, 3, (8,)))])
        with cuda_kernel.disabled():
            value = ewc.penalty(model)  # on a GPU: the libtorch kernels, for comparison
        assert value.item() == 0.0  # the weights are still θ*
        ```
    """
    before = set_enabled(False)
    try:
        yield
    finally:
        set_enabled(before)


def nvrtc_dir() -> Optional[Path]:
    """The folder of the libnvrtc that torch's CUDA wheels install, or None (CPU-only torch, or
    NVRTC installed elsewhere, e.g. on the loader path, where the kernel finds it by itself).

    Returns:
        e.g. ``.../site-packages/nvidia/cu13/lib``.

    Examples:
        ```python
        from ewc_rs import cuda_kernel

        folder = cuda_kernel.nvrtc_dir()
        assert folder is None or any(folder.glob("libnvrtc.so.*"))
        ```
    """
    nvidia = Path(torch.__file__).resolve().parent.parent / "nvidia"
    if not nvidia.is_dir():
        return None
    for lib in sorted(nvidia.glob("*/lib")):
        if any(lib.glob("libnvrtc.so.*")):
            return lib
    return None


def compile_check(compute_capability: int) -> tuple[str, int]:
    """Compiles the kernel for a GPU architecture with NVRTC (no GPU needed): a check of the source.

    Args:
        compute_capability: e.g. 90 for an H100/H200, 80 for an A100.

    Returns:
        ``(what, size)``: e.g. ``("sm_90 cubin (NVRTC 13.0)", 31744)``.

    Raises:
        RuntimeError: NVRTC is not found, it knows no architecture up to ``compute_capability``, or the
            source does not compile (the log is in the message).
        TypeError: ``compute_capability`` is not an int.

    Examples:
        <!-- skip: next "compiles the kernel with NVRTC: about 2 s, and needs torch's CUDA wheels" -->
        ```python
        from ewc_rs import cuda_kernel

        what, size = cuda_kernel.compile_check(90)  # an H100's architecture, on any machine
        assert what.startswith("sm_90") and size > 0
        ```
    """
    return _core.cuda_compile_check(compute_capability)


def _register_nvrtc() -> None:
    """Tells the kernel where NVRTC is: ``EWC_RS_NVRTC_DIR`` when set, else torch's own copy."""
    chosen = os.environ.get("EWC_RS_NVRTC_DIR") or nvrtc_dir()
    if chosen:
        _core.cuda_set_nvrtc_dir(str(chosen))


_register_nvrtc()
