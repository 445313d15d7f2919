"""What the library communicates under data parallelism, counted: ``comm_stats`` and
``reset_counter`` (read by ``benchmarks/bench_distributed.py`` and the tests).

What a data-parallel estimation communicates (``fisher_diag`` or ``fisher_kfac`` with
``group=...``, or inside an initialised process group): one 24-byte all-reduce that compares the
ranks' models (names and shapes), then one all-reduce of one flat float32 buffer holding every
parameter's sum of squared per-sample gradients, the Kronecker factor sums and their row counts
(``fisher_kfac``), the counts (samples, tokens) and a failure flag. A sharded (FSDP2) penalty step: one scalar
all-reduce. Under FSDP2 the estimation also gathers the full weights once (``all_gather``).
The collectives themselves live in ``ewc_rs._parallel.collectives``.
"""

from __future__ import annotations

from typing import Any

from ._parallel import collectives
from ._parallel.collectives import Group

__all__ = ["Group", "comm_stats", "reset_counter"]


def comm_stats() -> dict[str, Any]:
    """This process's collectives since the last :func:`reset_counter`, per operation.

    Returns:
        ``{"calls": {op: n}, "bytes": {op: n}, "total_calls": n, "total_bytes": n}``, bytes being
        the size of the tensor each call reduced or gathered on this rank.

    Examples:
        ```python
        import tempfile

        import torch
        import torch.distributed as dist
        from torch import nn
        from ewc_rs import distributed, fisher_diag

        model = nn.Linear(4, 3)
        loader = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
        with tempfile.TemporaryDirectory() as folder:  # a process group of one, as torchrun would set up
            dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=0, world_size=1)
            try:
                distributed.reset_counter()
                fisher_diag(model, loader)  # estimates over every rank's data: all-reduces
                stats = distributed.comm_stats()
            finally:
                dist.destroy_process_group()
        assert stats["total_calls"] == 2  # the models' check and the Fisher's one buffer
        print(stats["bytes"])
        ```
    """
    return collectives.COUNTER.counts()


def reset_counter() -> None:
    """Zeroes this process's count of collectives (what :func:`comm_stats` reports).

    Examples:
        ```python
        import torch
        from torch import nn
        from ewc_rs import distributed, fisher_diag

        distributed.reset_counter()
        fisher_diag(nn.Linear(4, 3), [(torch.randn(8, 4), torch.randint(0, 3, (8,)))])
        assert distributed.comm_stats()["total_calls"] == 0  # no process group: nothing communicated
        ```
    """
    collectives.COUNTER.reset()
