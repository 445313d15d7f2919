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

from ._parallel.collectives import Group, comm_stats, reset_counter

__all__ = ["Group", "comm_stats", "reset_counter"]
