"""Kronecker-factored Fisher (KFAC; Martens & Grosse 2015, Ritter et al. 2018): the public
``fisher_kfac``.

For a layer with weight W and bias b, write its parameters as one matrix W̃ = [W, b] of shape
``[out, in(+1)]`` (a convolution's weight flattened to ``[out, in·kh·kw]``; transformers'
``Conv1D``, stored ``[in, out]``, transposed). Its Fisher block, for vec stacking W̃'s columns,
is approximated by A ⊗ G with

- A = E[ã ãᵀ]: ã is the layer's input row with a constant 1 appended when there is a bias
  (indexed input-then-bias);
- G = E_x[Σ_y p(y|x) g gᵀ]: g = ∂ log p(y|x) / ∂(layer output), per output unit; for ``exact``
  the sum over classes, for ``mc`` the mean over draws, for ``empirical`` the data's label.

Several positions per sample (a Linear on ``[N, T, in]``, a convolution's H_out·W_out output
positions): KFAC-expand (Grosse & Martens 2016; Eschenhagen et al. 2023): every position is a row
of A, A = (1/(N·T)) Σ_n Σ_t ã_nt ã_ntᵀ, and G = (1/N) Σ_n Σ_t g_nt g_ntᵀ, so that A ⊗ G is
Grosse & Martens' Ω ⊗ Γ; with one position per sample (T = 1) it is Martens & Grosse 2015.
A layer called several times in one forward pass adds the rows of every call.

Layers with a Kronecker form: ``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d`` (groups = 1, zero
padding), transformers' ``Conv1D``. Every other parameter gets the diagonal Fisher of
:func:`ewc_rs.fisher_diag`, computed in the same passes. The factors are computed in Rust from the
same recorded forward and per-root backward passes as the diagonal Fisher, on the model's device.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from . import _core, distributed, sharding
from .batches import LikelihoodFn
from .estimation import Estimation
from .fisher_options import FisherOptions, parse_options
from .outputs import OutputsFn
from .recording import Recorder, RuleCoverage, Site

__all__ = ["KfacSite", "fisher_kfac", "kfac_sites"]

#: ``{"kron": {module name: (A, G)}, "diag": {parameter name: F}}``.
KfacFisher = dict[str, dict[str, Any]]


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
        return self.inputs + (self.bias is not None)


def kfac_form(module: nn.Module) -> Optional[tuple[int, int, bool]]:
    """``(inputs, outputs, transposed)`` of ``module``'s weight as a KFAC matrix, or None.

    Args:
        module: any module.

    Returns:
        The form, or None when the module has no Kronecker-factored rule (or no weight).
    """
    weight = getattr(module, "weight", None)
    rule = _core.layer_rule(module)
    if rule is None or not isinstance(weight, torch.Tensor):
        return None
    return rule.kfac_form(list(weight.shape))


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


class KfacEstimation(Estimation):
    """An :class:`Estimation` whose KFAC layers add Kronecker factors instead of squared gradients."""

    def __init__(self, model: nn.Module, options: FisherOptions, chosen: Optional[set[str]] = None) -> None:
        if options.kind == "batched":
            raise ValueError("kind: 'batched' has no Kronecker-factored form; use 'exact', 'mc' or 'empirical'")
        super().__init__(model, options)
        self.chosen = chosen
        self.sites: list[tuple[KfacSite, Site]] = []
        self.kfac: Optional[_core.KfacSums] = None
        self.a_sums: list[torch.Tensor] = []
        self.g_sums: list[torch.Tensor] = []

    def _choose_sites(self) -> None:
        self.sites = kfac_sites(self.model, self.coverage, self.chosen)
        dev = self.device
        self.a_sums = [torch.zeros(k.a_dim, k.a_dim, device=dev) for k, _ in self.sites]
        self.g_sums = [torch.zeros(k.outputs, k.outputs, device=dev) for k, _ in self.sites]
        self.kfac = _core.KfacSums(a_sums=self.a_sums, g_sums=self.g_sums)

    def _calls(self, recorder: Recorder) -> list[_core.LayerCall]:
        index = {id(site): i for i, (_, site) in enumerate(self.sites)}
        calls = []
        for c in recorder.calls:
            i = index.get(id(c.site))
            if i is not None and (not c.readable or c.site.weight_slot is None):
                raise ValueError(
                    f"model: layer '{self.sites[i][0].module}' was called in a way its KFAC rule cannot read "
                    "(non-tensor input, or no sample dimension)"
                )
            if c.readable and (c.site.slots() or i is not None):
                calls.append(c.layer_call(kfac_site=i))
        return calls

    def _rules_step(self, x: Any, y: Any, n: int, recorder: Recorder) -> None:
        if not self.checked:
            self._check_rules(x, y, n, recorder)
            self.checked = True
            self._choose_sites()
        out, yp = self._recorded_forward(x, y, n, recorder)
        self._drop_uninterpretable(recorder, n)
        mc = self.options.draw_mc(out) if self.options.kind == "mc" else None
        roots = self.options.roots(out, yp, mc_draws=mc)
        self.sums.add_batch(out, roots, calls=self._calls(recorder), kfac=self.kfac)
        if self.coverage.fallback:
            self.fallback.step(x, y, n, mc)

    def kfac_result(self) -> KfacFisher:
        """``{"kron": {module: (A, G)}, "diag": {name: F}}`` (see :func:`fisher_kfac`)."""
        diag = self.result()
        kron: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        rows = self.kfac.rows if self.kfac is not None else []
        for (k, _), a, g, r in zip(self.sites, self.a_sums, self.g_sums, rows):
            factors = (a / max(r, 1), g / self.seen)
            for what, t in zip("AG", factors):
                if not torch.isfinite(t).all():
                    raise ValueError(f"KFAC factor {what} of layer '{k.module}' has non-finite values (NaN or inf)")
            kron[k.module] = factors
            for name in (k.weight, k.bias):
                if name is not None:
                    diag.pop(name, None)
        return {"kron": kron, "diag": diag}


def estimate_kfac(
    model: nn.Module, loader: Iterable[Any], options: FisherOptions, *, chosen: Optional[set[str]] = None
) -> tuple[KfacFisher, list[KfacSite]]:
    """Runs one KFAC estimation; returns its result and its sites (see :func:`fisher_kfac`).

    Args:
        model: the model.
        loader: iterable of ``(inputs, targets)``.
        options: checked Fisher options.
        chosen: parameter names whose layers may get factors (None: all).

    Returns:
        ``(result, sites)``.
    """
    group = distributed.resolve_group(None)
    if distributed.world_size(group) > 1:
        # Each rank would get its own factors (A and G are not all-reduced yet), and the ranks'
        # penalties, averaged by DDP, would not be the Kronecker penalty of the union.
        raise ValueError(
            "structure: Kronecker factors are estimated on one process only; under a process group of "
            f"{distributed.world_size(group)} ranks use structure='diag' (its Fisher is all-reduced)"
        )
    if any(sharding.is_sharded(p) for _, p in sharding.named_parameters(model)):
        raise ValueError("model: Kronecker factors need whole weights; an FSDP2-sharded model takes structure='diag'")
    est = KfacEstimation(sharding.unwrap(model), options, chosen)
    est.run(loader, progress=False)
    return est.kfac_result(), [k for k, _ in est.sites]


def fisher_kfac(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    kind: str = "exact",
    likelihood: Union[str, LikelihoodFn] = "categorical",
    mc_samples: int = 1,
    num_samples: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    class_dim: int = -1,
    ignore_index: int = -100,
    outputs: Optional[OutputsFn] = None,
) -> KfacFisher:
    """Kronecker-factored Fisher of ``model`` on ``loader`` (conventions: the module docstring).

    Args:
        model: any module whose log-likelihood is a sum of per-sample terms.
        loader: iterable of ``(inputs, targets)`` batches, as for :func:`ewc_rs.fisher_diag`.
        kind: ``"exact"`` (G = Σ_c p(c|x) g_c g_cᵀ), ``"mc"`` (labels drawn from the model,
            ``mc_samples`` per sample) or ``"empirical"`` (the data's labels).
        likelihood, mc_samples, num_samples, generator, class_dim, ignore_index, outputs: as for
            :func:`ewc_rs.fisher_diag`.

    Returns:
        ``{"kron": {module_name: (A, G)}, "diag": {parameter_name: F}}``, float32 on the model's
        device: A ``[in(+1), in(+1)]`` indexed input-then-bias, G ``[out, out]`` by output unit,
        for each layer with a Kronecker form (the layer's Fisher block ≈ A ⊗ G for W̃ = [W, b],
        vec stacking columns); the diagonal Fisher of every other parameter that requires grad.

    Raises:
        ValueError: as :func:`ewc_rs.fisher_diag`; ``kind="batched"``; non-finite factors.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    options = parse_options(
        kind,
        likelihood,
        mc_samples=mc_samples,
        num_samples=num_samples,
        generator=generator,
        class_dim=class_dim,
        ignore_index=ignore_index,
        outputs=outputs,
    )
    return estimate_kfac(model, loader, options)[0]
