"""ewc_rs: Elastic Weight Consolidation for PyTorch with a Rust (libtorch) core.

The public API: `EWC` (consolidate tasks, add the penalty to the loss), `fisher_diag` and
`fisher_kfac` (estimate the Fisher), `save_fisher` and `load_fisher` (Fisher files),
`fisher_summary` and `equivalent_lam` (what a Fisher holds, λ between two Fishers) and
`fisher_merge` (Fisher-weighted model merging); the submodules `ewc_rs.checkpoint`,
`ewc_rs.cuda_kernel`, `ewc_rs.distributed` and `ewc_rs.integrations`.

`import ewc_rs` checks that the installed torch is the one the extension was built against: read
from the extension's file before loading it (``_native.py``; the native module has no rpath to
libtorch, so torch is imported first), and again from what the loaded module says. Another torch
raises `ImportError` naming both versions.
"""

from __future__ import annotations

import torch as _torch

from . import _native

_core_file = _native.core_path(__name__)
_built = _native.built_for(_core_file) if _core_file is not None else None
_problem = _native.mismatch_message(_built, _torch.__version__) if _built is not None else None
if _problem is not None:
    raise ImportError(_problem)

from . import _core  # noqa: E402

_problem = _native.mismatch_message(_core.TORCH_VERSION, _torch.__version__)
if _problem is not None:
    raise ImportError(_problem)

from . import checkpoint, cuda_kernel, distributed  # noqa: E402, F401  (docs: "Many GPUs", "CUDA")
from ._fisher.api import fisher_diag, fisher_kfac  # noqa: E402
from ._fisher.options import KINDS  # noqa: E402
from ._state.fisher_dict import FisherDict  # noqa: E402
from ._state.fisher_file import load_fisher, save_fisher  # noqa: E402
from ._state.fisher_stats import FisherSummary, equivalent_lam, fisher_summary  # noqa: E402
from .ewc import EWC  # noqa: E402
from .merging import fisher_merge  # noqa: E402

__version__: str = _core.__version__
__all__ = [
    "EWC",
    "FisherDict",
    "FisherSummary",
    "KINDS",
    "equivalent_lam",
    "fisher_diag",
    "fisher_kfac",
    "fisher_merge",
    "fisher_summary",
    "load_fisher",
    "save_fisher",
    "__version__",
]
