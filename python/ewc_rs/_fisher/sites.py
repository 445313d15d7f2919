"""Which layers of an estimation get Kronecker factors (the *sites*): a layer whose rule has a
Kronecker form, whose weight the rules cover, that owns its weight alone, and that is protected."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from .recording import RuleCoverage, Site


@dataclass(frozen=True)
class KfacSite:
    """A layer whose weight gets Kronecker factors: its names and its weight's matrix form."""

    module: str
    weight: str
    bias: Optional[str]  # the bias's name when it is part of W̃ (A's last row and column)
    inputs: int  # columns of W̃ without the bias
    outputs: int
    transposed: bool  # the weight is stored [in, out] (transformers' Conv1D)

    @property
    def a_dim(self) -> int:
        """Rows (and columns) of A: the inputs, plus one for the bias."""
        return self.inputs + (self.bias is not None)


def kfac_sites(
    model: nn.Module, coverage: RuleCoverage, chosen: Optional[set[str]] = None
) -> list[tuple[KfacSite, Site]]:
    """The layers of ``coverage`` that get Kronecker factors.

    A layer qualifies when its rule has a Kronecker form, its weight is covered by the rules (not
    the fallback), belongs to no other layer, and is in ``chosen`` (None: every parameter).

    Args:
        model: the model ``coverage`` was made for.
        coverage: the estimation's rule coverage, after its rule checks.
        chosen: names of the parameters to protect.

    Returns:
        ``(KfacSite, Site)`` pairs in the model's module order.
    """
    names = {id(m): n for n, m in model.named_modules()}
    owners: dict[int, int] = {}
    for site in coverage.sites:
        for s in site.slots():
            owners[s] = owners.get(s, 0) + 1
    out = []
    for site in coverage.sites:
        w = site.weight_slot
        name = names.get(id(site.module))
        if w is None or name is None or owners[w] > 1:
            continue
        form = site.rule.kfac_form(list(coverage.params[w].shape))
        if form is None or (chosen is not None and coverage.names[w] not in chosen):
            continue
        b = site.bias_slot
        bias = coverage.names[b] if b is not None and (chosen is None or coverage.names[b] in chosen) else None
        if b is not None and owners[b] > 1:
            bias = None
        inputs, outputs, transposed = form
        out.append((KfacSite(name, coverage.names[w], bias, inputs, outputs, transposed), site))
    return out
