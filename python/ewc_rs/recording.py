"""Which parameters the per-layer rules cover, and the forward hooks that record their layers'
calls (input, output) while the Fisher engine runs a forward pass."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from .attention import Decomposed
from .attention import eligible as attention_eligible
from .layers import RuleSpec, rule_for


@dataclass
class Site:
    """A module with a rule, and the accumulator slots of its weight and bias."""

    module: nn.Module
    spec: RuleSpec
    slots: list[Optional[int]]


@dataclass
class Plan:
    names: list[str]
    params: list[torch.Tensor]
    sites: list[Site]
    fallback: set[int] = field(default_factory=set)
    #: Whether ``torch.func.vmap`` handles the fallback for this model (None: not tried yet).
    vmap_ok: Optional[bool] = None
    #: Attention layers whose projections run through Linear proxies while recording.
    attention: list[Decomposed] = field(default_factory=list)

    def drop_from_rules(self, slots: Iterable[int]) -> None:
        """Sends ``slots`` to the exact per-sample fallback."""
        for s in slots:
            self.fallback.add(s)
            for site in self.sites:
                site.slots = [None if x == s else x for x in site.slots]


def make_plan(model: nn.Module) -> Plan:
    """Assigns each trainable parameter a slot and decides rule or fallback for it.

    A parameter gets the rule path only if every module that owns it has a rule; otherwise (a
    custom module with raw parameters, an RNN, cross-attention, ...) it goes to the exact fallback;
    self-attention layers go through `attention.Decomposed` (two Linear proxies).
    """
    names: list[str] = []
    params: list[torch.Tensor] = []
    slot_of: dict[int, int] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            slot_of[id(p)] = len(params)
            names.append(name)
            params.append(p)
    plan = Plan(names, params, [])

    def to_fallback(ps: list[torch.Tensor]) -> None:
        plan.drop_from_rules(slot_of[id(p)] for p in ps if id(p) in slot_of)

    plan.attention = [Decomposed(m, to_fallback) for m in model.modules() if attention_eligible(m)]
    covered = {id(p) for a in plan.attention for p in a.parameters()}
    for module in model.modules():
        own = [(k, p) for k, p in module._parameters.items()
               if p is not None and id(p) in slot_of and id(p) not in covered]
        if not own:
            continue
        spec = rule_for(module)
        if spec is None or any(k not in ("weight", "bias") for k, _ in own):
            plan.fallback.update(slot_of[id(p)] for _, p in own)
            continue
        slots: list[Optional[int]] = [None, None]
        for k, p in own:
            slots[0 if k == "weight" else 1] = slot_of[id(p)]
        plan.sites.append(Site(module, spec, slots))
    for a in plan.attention:
        for proxy in (a.in_proj, a.out_proj):
            bias = proxy.bias
            pslots = [slot_of.get(id(proxy.weight)), None if bias is None else slot_of.get(id(bias))]
            plan.sites.append(Site(proxy, ("linear", [], [], []), pslots))
    plan.drop_from_rules(set(plan.fallback))
    plan.sites = [s for s in plan.sites if any(x is not None for x in s.slots)]
    return plan


class Recorder:
    """Forward hooks that record (site, input, output) for every call of a module with a rule."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.enabled = False
        self.clone_outputs = False  # set when an in-place op modified a recorded output
        self.calls: list[tuple[Site, torch.Tensor, torch.Tensor, int]] = []
        self.handles = [
            s.module.register_forward_hook(self._hook(s), with_kwargs=True) for s in plan.sites
        ]
        for a in plan.attention:
            a.install()

    def _hook(self, site: Site) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if not self.enabled:
                return None
            inp = args[0] if args else kwargs.get("input")
            if not isinstance(inp, torch.Tensor) or not isinstance(output, torch.Tensor):
                self.calls.append((site, torch.empty(0), torch.empty(0), -1))
                return None
            if not output.requires_grad:
                return None
            self.calls.append((site, inp.detach(), output, output._version))
            # Returning a copy keeps later in-place ops (ReLU(inplace=True)) off the recorded output.
            return output.clone() if self.clone_outputs else None

        return hook

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Records the layer calls of the forward pass run inside (a fresh list each time); the
        attention layers run their decomposed forward meanwhile."""
        self.calls = []
        self.enabled = True
        for a in self.plan.attention:
            a.recording = True
        try:
            yield
        finally:
            self.enabled = False
            for a in self.plan.attention:
                a.recording = False

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for a in self.plan.attention:
            a.remove()
