"""``structure=``: the policy that assigns the protected layers to block kinds, and the
consolidation that estimates their curvature and makes the task to store.

``"diag"``: every parameter diagonal. ``"kfac"``: Kronecker factors where the layer has a
Kronecker form (Linear, Conv1d/Conv2d with groups=1, transformers' Conv1D), diagonal elsewhere.
``"ekfac"``: eigenvalue-corrected Kronecker factors on the same layers, diagonal elsewhere. The
table lives beside the block kinds (``_blocks.registry.STRUCTURES``); a block kind for layers
builds itself from the estimation's factors (``from_factors``), with a second estimation pass
when it needs one (``rerun``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional

import torch
from torch import nn

from ._blocks.base import LayerBlock, check_factor
from ._blocks.diagonal import Diagonal
from ._blocks.kronecker import Kronecker
from ._blocks.layers import kfac_form, param_name
from ._blocks.registry import STRUCTURES, block_kind
from ._fisher.api import estimate
from ._fisher.options import FisherOptions
from ._options import check_choice, check_damping
from ._parallel import sharding
from ._state.fisher_dict import checked as _checked
from ._state.task import Task


def check_structure(structure: Any, model: nn.Module, selector: Callable[[str, nn.Parameter], bool]) -> str:
    """``structure`` checked; for one with layer blocks, says once which protected layers stay diagonal.

    Args:
        structure: a name of :data:`STRUCTURES`.
        model: the model to protect.
        selector: the ``params=`` predicate.

    Returns:
        The structure.

    Raises:
        ValueError: another value.
    """
    structure = check_choice("structure", structure, tuple(STRUCTURES))
    if STRUCTURES[structure] != Diagonal.kind:
        _warn_diagonal_layers(structure, model, selector)
    return structure


def _warn_diagonal_layers(structure: str, model: nn.Module, selector: Callable[[str, nn.Parameter], bool]) -> None:
    """Says once (``warnings.warn``) which layers with protected parameters have no Kronecker form
    and get the diagonal Fisher."""
    plain = []
    for name, module in model.named_modules():
        own = [(k, p) for k, p in module.named_parameters(recurse=False) if p.requires_grad]
        if any(selector(param_name(name, k), p) for k, p in own) and kfac_form(module) is None:
            plain.append(f"{type(module).__name__} '{name}'")
    if plain:
        warnings.warn(
            f"structure={structure!r}: these layers have no Kronecker-factored form (Linear, Conv1d/Conv2d with "
            f"groups=1, transformers' Conv1D) and get the diagonal Fisher: {', '.join(plain)}",
            stacklevel=4,  # the caller of EWC(...)
        )


def consolidate(
    model: nn.Module,
    chosen: Mapping[str, nn.Parameter],
    loader: Iterable[Any],
    structure: str,
    storage_dtype: torch.dtype,
    options: FisherOptions,
    *,
    damping: float = 0.0,
) -> tuple[Task, dict[str, Any]]:
    """Estimates the task's curvature in the given structure and copies θ* (both detached).

    Args:
        model: the model just trained.
        chosen: the protected parameters by name.
        loader: the task's ``(inputs, targets)`` batches (iterated twice by a kind that needs a
            second pass: a re-iterable loader, not an iterator).
        structure: a name of :data:`STRUCTURES`.
        storage_dtype: dtype of the stored curvature and θ*.
        options: checked Fisher options.
        damping: d ≥ 0 added as √d · I to each Kronecker factor of the stored task (``"kfac"``; the
            returned estimate is undamped).

    Returns:
        ``(task, estimate)``: the task to store, and the estimate as returned by
        ``EWC.consolidate`` (protected parameters only): ``{name: F}`` for ``"diag"``, else
        ``{"diag": {name: F}, <layer kind's key>: {layer: factors}}``.

    Raises:
        ValueError: ``damping`` negative, not finite, or non-zero for a structure other than ``"kfac"``
            (checked before the estimation); as the estimation.
    """
    damping = check_damping(damping, structure)
    layer_kind = block_kind(STRUCTURES[structure])
    if not issubclass(layer_kind, LayerBlock):
        full = estimate(model, loader, options).diag
        fisher = {n: full[n].detach() for n in chosen}
        task = Task(_star(chosen, storage_dtype), (Diagonal(fisher).cast(storage_dtype),))
        return task, fisher
    if layer_kind.second_pass and iter(loader) is loader:  # type: ignore[call-overload]
        raise ValueError(
            f"loader: structure={structure!r} estimates in two passes over the data, so the loader must be "
            "re-iterable (a DataLoader or a list of batches), not an iterator or generator"
        )
    result = estimate(model, loader, options, kronecker=True, chosen=set(chosen))

    def rerun(shadow: nn.Module) -> dict[str, torch.Tensor]:
        return estimate(shadow, loader, options).diag

    factors = {m: (a.detach(), g.detach()) for m, (a, g) in result.kron.items()}
    with_bias = frozenset(s.module for s in result.sites if s.bias is not None)
    layers = layer_kind.from_factors(sharding.unwrap(model), factors, with_bias, rerun)  # DDP: the inner names
    diag = {n: f.detach() for n, f in result.diag.items() if n in chosen}
    estimate_ = {"diag": diag, **layers.estimate()}
    if damping and isinstance(layers, Kronecker):
        layers = layers.damped(damping)
    blocks = tuple(b.cast(storage_dtype) for b in (Diagonal(diag), layers) if b.params)
    return Task(_star(chosen, storage_dtype), blocks), estimate_


def _star(chosen: Mapping[str, nn.Parameter], storage_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {n: p.detach().to(storage_dtype, copy=True) for n, p in chosen.items()}


def task_from_fisher(
    model: nn.Module,
    chosen: Mapping[str, nn.Parameter],
    fisher: Mapping[str, Any],
    theta_star: Optional[Mapping[str, torch.Tensor]],
    structure: str,
    storage_dtype: torch.dtype,
    *,
    damping: float = 0.0,
) -> Task:
    """The task of a precomputed Fisher: diagonal blocks from ``{name: F}`` (any structure), or, for
    ``structure="kfac"``, ``fisher_kfac``'s ``{"kron": {layer: (A, G)}, "diag": {name: F}}``.

    Args:
        model: the model (its parameters give the shapes and devices).
        chosen: the protected parameters by name (a Fisher for others is ignored).
        fisher: the Fisher, as above.
        theta_star: θ* by name (default: the current weights).
        structure: the ``EWC``'s structure.
        storage_dtype: dtype of the stored F and θ*.
        damping: d ≥ 0 added as √d · I to each given Kronecker factor.

    Returns:
        The task to store.

    Raises:
        ValueError: bad ``damping``; a protected parameter without a Fisher or θ*, or with one of another shape;
            a Fisher that is negative or not finite; Kronecker factors for another structure, or
            that do not fit their layer.
    """
    damping = check_damping(damping, structure)
    model = sharding.unwrap(model)
    if not isinstance(fisher, Mapping):
        raise ValueError(f"fisher: expected a mapping of parameter names to F, got {type(fisher).__name__}")
    layered = set(fisher) == {"kron", "diag"} and all(isinstance(v, Mapping) for v in fisher.values())
    if layered and STRUCTURES[structure] != Kronecker.kind:
        raise ValueError(f"fisher: Kronecker factors need structure='kfac', this EWC has structure={structure!r}")
    plain = fisher["diag"] if layered else fisher
    diag = _checked(plain) if plain or not layered else {}  # every layer may be Kronecker
    blocks: list[Any] = []
    covered: set[str] = set()
    if layered:
        factors, with_bias = {}, set()
        for m, pair in fisher["kron"].items():
            if param_name(m, "weight") not in chosen:
                continue
            a, g = (check_factor(f"layer '{m}'", f"factor {w}", t).float() for w, t in zip("AG", pair))
            form = kfac_form(model.get_submodule(m)) if m in dict(model.named_modules()) else None
            if form is not None and a.shape[0] == form[0] + 1 and param_name(m, "bias") in chosen:
                with_bias.add(m)
            factors[m] = (a, g)
        block = Kronecker(factors, frozenset(with_bias))
        why = block.misfit(model, dict(model.named_parameters()))
        if why is not None:
            raise ValueError(f"fisher: {why}")
        blocks.append(block.damped(damping))
        covered = block.params
    rest = {n: p for n, p in chosen.items() if n not in covered}
    missing = sorted(set(rest) - set(diag))
    if missing:
        raise ValueError(f"fisher: no Fisher for the protected parameter '{missing[0]}' (select it out with params=)")
    star = {n: p.detach() for n, p in chosen.items()} if theta_star is None else dict(theta_star)
    for what, values in (("fisher", {n: diag[n] for n in rest}), ("theta_star", star)):
        for n, p in chosen.items():
            if what == "fisher" and n not in rest:
                continue
            t = values.get(n)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(p.shape):
                got = (
                    "none"
                    if t is None
                    else f"shape {tuple(t.shape)}"
                    if isinstance(t, torch.Tensor)
                    else type(t).__name__
                )
                raise ValueError(f"{what}: '{n}' must be a tensor of the parameter's shape {tuple(p.shape)}, got {got}")
            if not torch.isfinite(t).all():
                raise ValueError(f"{what}: '{n}' has non-finite values")
    if rest:
        blocks.insert(0, Diagonal({n: diag[n].detach().to(p.device, torch.float32) for n, p in rest.items()}))
    stored = {n: star[n].detach().to(chosen[n].device, storage_dtype, copy=True) for n in chosen}
    return Task(stored, tuple(b.cast(storage_dtype) for b in blocks))
