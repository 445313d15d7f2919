"""ewc_rs: Elastic Weight Consolidation for PyTorch with a Rust (libtorch) core.

``import torch`` must come before the native module is loaded (it has no rpath to libtorch), and
the torch version must be the one the extension was built against.
"""

from __future__ import annotations

import torch as _torch

from ._torch_version import TORCH_VERSION as _EXPECTED_TORCH

_found = _torch.__version__.split("+")[0]
if _found != _EXPECTED_TORCH:
    raise ImportError(
        f"ewc_rs was built against torch {_EXPECTED_TORCH} (libtorch ABI), but torch {_torch.__version__} "
        f"is installed; install torch=={_EXPECTED_TORCH}"
    )

from . import _core, checkpoint, distributed  # noqa: E402, F401  (checkpoint, distributed: README, "Many GPUs")
from .ewc import EWC  # noqa: E402
from .fisher import KINDS, fisher_diag  # noqa: E402
from .kfac import fisher_kfac  # noqa: E402

__version__: str = _core.__version__
__all__ = ["EWC", "fisher_diag", "fisher_kfac", "KINDS", "__version__"]
