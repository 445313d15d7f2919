"""``EWC``'s options: the checks of its arguments (also applied to loaded states) and ``params=``."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from re import Pattern
from typing import Any, Callable, Union

import torch
from torch import nn

from ._parallel.sharding import named_parameters

#: What ``params=`` accepts: names, a regex (matched with ``re.search``), or a predicate.
ParamSelector = Union[None, Sequence[str], str, Pattern[str], Callable[[str, nn.Parameter], bool]]

MODES = ("separate", "online")
NORM_STATS = ("freeze", "update")


def check_lam(lam: Any) -> float:
    """λ as a float. Raises ValueError unless it is a finite number ≥ 0 (a bool is not a number)."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam: expected a finite number >= 0, got {lam!r}")
    return float(lam)


def check_gamma(gamma: Any) -> float:
    """γ as a float. Raises ValueError unless it is a number in [0, 1]."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (0.0 <= gamma <= 1.0):
        raise ValueError(f"gamma: expected a number in [0, 1], got {gamma!r}")
    return float(gamma)


def check_grad_scale(scale: Any) -> float:
    """``backward``'s ``grad_scale`` as a float. Raises ValueError unless it is a finite number."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"grad_scale: expected a finite number, got {scale!r}")
    return float(scale)


def check_damping(damping: Any, structure: str) -> float:
    """The Kronecker factors' damping as a float. Raises ValueError unless it is a finite number ≥ 0,
    and 0 for a structure other than ``"kfac"``."""
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping) or damping < 0:
        raise ValueError(f"damping: expected a finite number >= 0, got {damping!r}")
    if damping and structure != "kfac":
        raise ValueError(f"damping: only structure='kfac' has factors to damp; this EWC has structure={structure!r}")
    return float(damping)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``; else a ValueError naming the argument ``name``."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}; got {value!r}")
    return str(value)


def check_storage(dtype: Any) -> torch.dtype:
    """The storage dtype of F and θ*: float32 (for None) or bfloat16; anything else raises ValueError."""
    if dtype is None:
        return torch.float32
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"storage_dtype: expected None, torch.float32 or torch.bfloat16, got {dtype!r}")
    return dtype


# Selectors are small classes, not lambdas, so that an EWC object pickles (Lightning's ddp_spawn,
# torch.multiprocessing, copy.deepcopy).
@dataclass(frozen=True)
class _Everything:
    def __call__(self, name: str, p: nn.Parameter) -> bool:
        return True


@dataclass(frozen=True)
class _Matching:
    pattern: re.Pattern

    def __call__(self, name: str, p: nn.Parameter) -> bool:
        return self.pattern.search(name) is not None


@dataclass(frozen=True)
class _Named:
    names: frozenset

    def __call__(self, name: str, p: nn.Parameter) -> bool:
        return name in self.names


def make_selector(params: ParamSelector) -> Callable[[str, nn.Parameter], bool]:
    """The predicate ``(name, parameter) -> bool`` behind ``params=``.

    Args:
        params: None (everything), a list of names, a regex (``re.search`` on the name) or a predicate.

    Returns:
        The predicate.

    Raises:
        TypeError: ``params`` is none of these, or a list holds something other than strings.
    """
    if params is None:
        return _Everything()
    if isinstance(params, (str, re.Pattern)):
        return _Matching(re.compile(params))
    if callable(params):
        return params  # type: ignore[return-value]
    if isinstance(params, Iterable):
        names = set(params)
        if not all(isinstance(n, str) for n in names):
            raise TypeError("params: a list of parameter names must hold strings only")
        return _Named(frozenset(names))
    raise TypeError(f"params: expected None, names, a regex or a predicate, got {type(params).__name__}")


def selected_parameters(model: nn.Module, selector: Callable[[str, nn.Parameter], bool]) -> dict[str, nn.Parameter]:
    """The parameters of ``model`` that require grad and that ``selector`` accepts, by name.

    Args:
        model: the model.
        selector: from :func:`make_selector`.

    Returns:
        ``{name: parameter}``, never empty.

    Raises:
        ValueError: nothing is selected.
    """
    # DDP: the inner module's names; FSDP2: the sharded parameters.
    chosen = {n: p for n, p in named_parameters(model) if p.requires_grad and selector(n, p)}
    if not chosen:
        raise ValueError("params: the selection matches no parameter of the model that requires grad")
    return chosen
