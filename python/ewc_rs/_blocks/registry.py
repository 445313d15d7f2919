"""The block kinds by name, and the structures: which kind the layers with a Kronecker form get
(every other protected parameter gets the diagonal kind)."""

from __future__ import annotations

from .base import Block
from .diagonal import Diagonal
from .ekfac import Ekfac
from .kronecker import Kronecker

#: Every block kind, by its name (registry order is the order of a plan's terms).
BLOCK_KINDS: dict[str, type[Block]] = {kind.kind: kind for kind in (Diagonal, Kronecker, Ekfac)}

#: ``structure=`` → the block kind of the layers that have a Kronecker form.
STRUCTURES: dict[str, str] = {"diag": Diagonal.kind, "kfac": Kronecker.kind, "ekfac": Ekfac.kind}


def block_kind(name: str) -> type[Block]:
    """The block kind called ``name``.

    Raises:
        ValueError: no kind has that name.
    """
    try:
        return BLOCK_KINDS[name]
    except KeyError:
        raise ValueError(f"block kind: expected one of {', '.join(map(repr, BLOCK_KINDS))}; got {name!r}") from None
