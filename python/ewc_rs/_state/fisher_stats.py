"""Where a Fisher's mass lies: ``fisher_summary``, per-tensor statistics computed in Rust (GIL
released) and returned as numpy arrays the Rust side made (``FisherSummary``); ``equivalent_lam``
translates λ between two Fishers by their masses."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from .. import _core
from .fisher_dict import checked

#: The quantile levels reported.
LEVELS = (0.0, 0.01, 0.1, 0.5, 0.9, 0.99, 1.0)
#: Histogram edges: one decade a bin from 1e-20 to 1e6 (a Fisher spans many orders of magnitude).
EDGES = tuple(10.0**k for k in range(-20, 7))


@dataclass(frozen=True)
class FisherSummary:
    """Per-tensor statistics of a Fisher, one row per tensor (in ``names`` order).

    Made by :func:`fisher_summary`; the fields are numpy arrays with one entry (or row) per tensor.

    Attributes:
        names: the tensors' names.
        count: each tensor's number of elements.
        total: their sum, the tensor's Fisher mass.
        mean: their mean.
        max: the largest.
        share: each tensor's part of the whole Fisher's mass (sums to 1 when any is positive).
        levels: the quantile levels.
        quantiles: per tensor, the quantiles at ``levels``.
        edges: the histogram edges.
        histogram: per tensor the counts below ``edges[0]`` (zeros too), in each
            ``[edges[k], edges[k+1])`` and from ``edges[-1]`` on.

    Examples:
        ```python
        import torch
        from ewc_rs import fisher_summary

        summary = fisher_summary({"a.weight": torch.full((10,), 3.0), "b.weight": torch.ones(30)})
        assert summary.names == ["a.weight", "b.weight"] and summary.share.round(2).tolist() == [0.5, 0.5]
        assert summary.count.tolist() == [10, 30] and summary.histogram.shape == (2, len(summary.edges) + 1)
        ```
    """

    names: list[str]
    count: npt.NDArray[np.int64]
    total: npt.NDArray[np.float64]
    mean: npt.NDArray[np.float64]
    max: npt.NDArray[np.float64]
    share: npt.NDArray[np.float64]
    levels: npt.NDArray[np.float64]
    quantiles: npt.NDArray[np.float64]
    edges: npt.NDArray[np.float64]
    histogram: npt.NDArray[np.int64]

    def table(self, top: int = 10) -> str:
        """The ``top`` tensors by Fisher mass as an aligned text table (name, elements, share, mean, max).

        Args:
            top: how many tensors, largest mass first.

        Returns:
            The table, a header line and one line per tensor.

        Examples:
            ```python
            import torch
            from ewc_rs import fisher_summary

            summary = fisher_summary({"small": torch.ones(4), "large": torch.full((4,), 9.0)})
            table = summary.table(top=1)
            print(table)
            assert table.splitlines()[1].startswith("large")
            ```
        """
        order = np.argsort(-self.total)[:top]
        width = max([len("tensor")] + [len(self.names[i]) for i in order])
        rows = [f"{'tensor':<{width}}  {'elements':>10}  {'share':>7}  {'mean':>9}  {'max':>9}"]
        for i in order:
            rows.append(
                f"{self.names[i]:<{width}}  {self.count[i]:>10}  {self.share[i]:>7.2%}  "
                f"{self.mean[i]:>9.3g}  {self.max[i]:>9.3g}"
            )
        return "\n".join(rows)


def fisher_summary(
    fisher: Mapping[str, torch.Tensor],
    *,
    levels: Sequence[float] = LEVELS,
    edges: Sequence[float] = EDGES,
) -> FisherSummary:
    """Statistics of each tensor of a Fisher (e.g. which layers carry a task's Fisher mass).

    Args:
        fisher: ``{name: F}`` (e.g. :func:`ewc_rs.fisher_diag`, :func:`ewc_rs.load_fisher`).
        levels: quantile levels, each in [0, 1].
        edges: strictly increasing, finite histogram edges.

    Returns:
        The statistics (:class:`FisherSummary`).

    Raises:
        ValueError: an empty mapping, a tensor that is not a finite non-negative float tensor,
            levels outside [0, 1], edges that do not increase.

    Examples:
        ```python
        import torch
        from torch import nn
        from ewc_rs import fisher_diag, fisher_summary

        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        fisher = fisher_diag(model, [(torch.randn(16, 4), torch.randint(0, 3, (16,)))], kind="exact")
        summary = fisher_summary(fisher, levels=[0.5, 0.99])
        assert summary.names == ["0.weight", "0.bias", "2.weight", "2.bias"]
        assert abs(summary.share.sum() - 1.0) < 1e-9 and summary.quantiles.shape == (4, 2)
        print(summary.table())
        ```
    """
    tensors = checked(fisher)
    names = list(tensors)
    count, total, top, quantiles, histogram = _core.fisher_summary(
        [tensors[n].detach() for n in names], [float(q) for q in levels], [float(e) for e in edges]
    )
    mass = float(total.sum())
    return FisherSummary(
        names=names,
        count=count,
        total=total,
        mean=np.divide(total, np.maximum(count, 1)),
        max=top,
        share=total / mass if mass > 0 else np.zeros_like(total),
        levels=np.asarray(levels, dtype=np.float64),
        quantiles=quantiles,
        edges=np.asarray(edges, dtype=np.float64),
        histogram=histogram,
    )


def equivalent_lam(lam: float, source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> float:
    """The λ for a ``target`` Fisher that gives the penalty strength ``lam`` gives with ``source``.

    Two Fisher kinds estimated on the same model and data differ mostly in scale: ``batched`` is
    about 1/batch-size of ``empirical``, which itself falls far below ``exact`` when the model is
    nearly certain of its training labels. Matching their masses Σ_i F_i (the penalty of a
    perturbation of the same size in every parameter) translates λ between them:
    λ_target = λ · Σ F_source / Σ F_target, summed in float64 over the parameters both hold.
    ``docs/fisher_kinds.md`` compares this with the λ a validation search picks.

    Args:
        lam: λ ≥ 0 tuned for ``source`` (finite).
        source: ``{name: F}`` the λ was chosen for.
        target: ``{name: F}`` of the same parameters (another kind, data size or estimator).

    Returns:
        The equivalent λ for ``target``.

    Raises:
        ValueError: ``lam`` negative or not finite; a Fisher that is not a non-empty mapping of finite
            non-negative float tensors; the two name different parameters or shapes; ``target``'s
            mass is zero while ``source``'s is not.

    Examples:
        ```python
        import torch
        from torch import nn
        from ewc_rs import equivalent_lam, fisher_diag

        model = nn.Linear(4, 3)
        loader = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(2)]
        exact = fisher_diag(model, loader, kind="exact")
        batched = fisher_diag(model, loader, kind="batched")  # about 1/16 of the Fisher
        lam_batched = equivalent_lam(100.0, exact, batched)
        assert lam_batched > 100.0
        ```
    """
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam: expected a finite number >= 0, got {lam!r}")
    src, tgt = checked(source), checked(target)
    if set(src) != set(tgt):
        only = sorted(set(src) ^ set(tgt))[:5]
        raise ValueError(f"source, target: expected Fishers of the same parameters; only in one of them: {only}")
    for n, f in src.items():
        if f.shape != tgt[n].shape:
            raise ValueError(f"target: '{n}' has shape {tuple(tgt[n].shape)}, source has {tuple(f.shape)}")
    mass_src = sum(float(f.detach().double().sum()) for f in src.values())
    mass_tgt = sum(float(f.detach().double().sum()) for f in tgt.values())
    if mass_tgt == 0.0:
        if mass_src == 0.0:
            return float(lam)
        raise ValueError("target: its Fisher mass is 0, so no λ makes its penalty match the source's")
    return float(lam) * mass_src / mass_tgt
