"""Which parameters the per-layer rules cover (:class:`RuleCoverage`), and the forward hooks that
record their layers' calls while the Fisher engine runs a forward pass (:class:`Recorder`).

The rules themselves, and the registry that maps a module's exact type to its rule, live in Rust
(``src/fisher/rules/``); ``_core.layer_rule(module)`` asks it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from .. import _core
from .attention import Decomposed
from .attention import eligible as attention_eligible
from .recurrent import Unrolled
from .recurrent import eligible as recurrent_eligible


@dataclass
class Site:
    """A module with a rule, and the slots of its weight and bias in the estimation."""

    module: nn.Module
    rule: _core.LayerRule
    weight_slot: Optional[int]
    bias_slot: Optional[int]

    def slots(self) -> list[int]:
        return [s for s in (self.weight_slot, self.bias_slot) if s is not None]


@dataclass
class Call:
    """One recorded call of a site. ``version`` is the output's version counter when recorded
    (-1: the call's input or output was not a tensor, so no rule can read it)."""

    site: Site
    input: torch.Tensor
    output: torch.Tensor
    version: int
    #: The call's input had one row shared by the whole batch (positions ``[1, T]``); it was
    #: recorded expanded to one row per sample (see :meth:`Recorder.expand_shared_rows`).
    broadcast: bool = False

    @property
    def readable(self) -> bool:
        return self.version >= 0

    def layer_call(self, kfac_site: Optional[int] = None) -> _core.LayerCall:
        """This call as the native engine takes it (``kfac_site``: its index among the KFAC sites)."""
        return _core.LayerCall(
            rule=self.site.rule,
            input=self.input,
            output=self.output,
            weight_slot=self.site.weight_slot,
            bias_slot=self.site.bias_slot,
            kfac_site=kfac_site,
        )


@dataclass
class RuleCoverage:
    """The trainable parameters in slot order, the sites whose rules cover them, and the slots
    that need the exact per-sample fallback instead."""

    names: list[str]
    params: list[torch.Tensor]
    sites: list[Site] = field(default_factory=list)
    fallback: set[int] = field(default_factory=set)
    #: Whether ``torch.func.vmap`` handles the fallback for this model (None: not tried yet).
    vmap_ok: Optional[bool] = None
    #: Attention layers whose projections run through Linear proxies while recording.
    attention: list[Decomposed] = field(default_factory=list)
    #: Recurrent layers (RNN, LSTM, GRU) that run unrolled, their projections through Linear proxies.
    recurrent: list[Unrolled] = field(default_factory=list)

    def decomposed(self) -> list[Union[Decomposed, Unrolled]]:
        """The layers that run an equivalent forward of Linear proxies while recording."""
        return [*self.attention, *self.recurrent]

    def to_fallback(self, slots: Iterable[int]) -> None:
        """Sends ``slots`` to the exact per-sample fallback."""
        for s in set(slots):
            self.fallback.add(s)
            for site in self.sites:
                if site.weight_slot == s:
                    site.weight_slot = None
                if site.bias_slot == s:
                    site.bias_slot = None


def cover_model(model: nn.Module) -> RuleCoverage:
    """Assigns each trainable parameter a slot and decides rule or fallback for it.

    A parameter gets the rule path only if every module that owns it has a rule; otherwise (a
    custom module with raw parameters, cross-attention, ...) it goes to the exact fallback;
    self-attention layers go through `attention.Decomposed` (two Linear proxies), RNN, LSTM and
    GRU layers through `recurrent.Unrolled` (Linear proxies of their projections).
    """
    names: list[str] = []
    params: list[torch.Tensor] = []
    slot_of: dict[int, int] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            slot_of[id(p)] = len(params)
            names.append(name)
            params.append(p)
    cov = RuleCoverage(names, params)

    def params_to_fallback(ps: list[torch.Tensor]) -> None:
        cov.to_fallback(slot_of[id(p)] for p in ps if id(p) in slot_of)

    cov.attention = [Decomposed(m, params_to_fallback) for m in model.modules() if attention_eligible(m)]
    cov.recurrent = [
        Unrolled(m, params_to_fallback)
        for m in model.modules()
        if recurrent_eligible(m) and any(id(p) in slot_of for p in m.parameters(recurse=False))
    ]
    covered = {id(p) for a in cov.decomposed() for p in a.parameters()}
    for module in model.modules():
        own = [
            (k, p) for k, p in module._parameters.items() if p is not None and id(p) in slot_of and id(p) not in covered
        ]
        if not own:
            continue
        rule = _core.layer_rule(module)
        if rule is None or any(k not in ("weight", "bias") for k, _ in own):
            cov.fallback.update(slot_of[id(p)] for _, p in own)
            continue
        slot = {k: slot_of[id(p)] for k, p in own}
        cov.sites.append(Site(module, rule, slot.get("weight"), slot.get("bias")))
    for a in cov.decomposed():
        for proxy in a.proxies():
            rule = _core.layer_rule(proxy)
            assert rule is not None, "the proxies are nn.Linear"
            bias = proxy.bias
            bias_slot = None if bias is None else slot_of.get(id(bias))
            cov.sites.append(Site(proxy, rule, slot_of.get(id(proxy.weight)), bias_slot))
    cov.to_fallback(set(cov.fallback))
    cov.sites = [s for s in cov.sites if s.slots()]
    return cov


class Recorder:
    """Forward hooks that record a :class:`Call` for every call of a module with a rule."""

    def __init__(self, coverage: RuleCoverage) -> None:
        self.coverage = coverage
        self.enabled = False
        self.clone_outputs = False  # set when an in-place op modified a recorded output
        #: The batch's sample count during a recorded forward pass (None: unknown).
        self.batch: Optional[int] = None
        #: Whether calls with one input row shared by the batch are expanded (see `_expand`).
        self.expand_shared_rows = True
        self.calls: list[Call] = []
        self.handles = [s.module.register_forward_hook(self._hook(s), with_kwargs=True) for s in coverage.sites]
        self._site_of = {id(s.module): s for s in coverage.sites}
        for a in coverage.attention:
            a.install()
        for r in coverage.recurrent:
            r.install(self.record)

    def _hook(self, site: Site) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if not self.enabled:
                return None
            inp = args[0] if args else kwargs.get("input")
            if not isinstance(inp, torch.Tensor) or not isinstance(output, torch.Tensor):
                self.calls.append(Call(site, torch.empty(0), torch.empty(0), -1))
                return None
            if not output.requires_grad:
                return None
            n = self.batch
            if self.expand_shared_rows and n is not None and n > 1 and inp.shape[:1] == output.shape[:1] == (1,):
                return self._expand(site, inp, output, n)
            self.calls.append(Call(site, inp.detach(), output, output._version))
            # Returning a copy keeps later in-place ops (ReLU(inplace=True)) off the recorded output.
            return output.clone() if self.clone_outputs else None

        return hook

    def _expand(self, site: Site, inp: torch.Tensor, output: torch.Tensor, n: int) -> torch.Tensor:
        """A call whose single input row serves every sample (GPT-2's position embedding of
        ``position_ids`` ``[1, T]``, added to ``[N, T, D]`` by broadcasting): its output is handed
        on as ``n`` copies, one per sample, which the model's broadcast uses the same way, so the
        gradient of copy ``i`` is sample ``i``'s and the rule reads per-sample gradients as for any
        batched call. The estimation's rule check verifies that the model's outputs are unchanged
        and that each sample's output depends only on its own copy; otherwise the expansion is
        switched off and the parameters take the fallback."""
        rows = output.expand(n, *output.shape[1:]).clone()
        self.calls.append(Call(site, inp.detach().expand(n, *inp.shape[1:]), rows, rows._version, broadcast=True))
        return rows

    def record(self, module: nn.Module, inp: torch.Tensor, output: torch.Tensor) -> None:
        """Records ``output`` as a call of ``module``'s site on ``inp`` without calling it: the
        steps of a recurrent layer's hidden projection, stacked (see :mod:`.recurrent`)."""
        site = self._site_of.get(id(module))
        if self.enabled and site is not None and output.requires_grad:
            self.calls.append(Call(site, inp.detach(), output, output._version))

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Records the layer calls of the forward pass run inside (a fresh list each time); the
        attention and recurrent layers run their decomposed forward meanwhile."""
        self.calls = []
        self.enabled = True
        for a in self.coverage.decomposed():
            a.recording = True
        try:
            yield
        finally:
            self.enabled = False
            for a in self.coverage.decomposed():
                a.recording = False

    def modified_outputs(self) -> bool:
        """Whether an in-place op changed a recorded output after it was recorded."""
        return any(c.readable and c.output._version != c.version for c in self.calls)

    def layer_calls(self) -> list[_core.LayerCall]:
        """The recorded calls the rules handle, as the native engine takes them."""
        return [c.layer_call() for c in self.calls if c.readable and c.site.slots()]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for a in self.coverage.decomposed():
            a.remove()
