"""Models wrapped for data parallelism, as the library sees them.

- ``DistributedDataParallel``: the inner module (``model.module``) and its parameter names.
- FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters are DTensors sharded on dim 0 of a
  1-D device mesh. :func:`named_parameters` always returns the sharded parameters (FSDP2 swaps in
  unsharded ones between a forward and its backward); :func:`full_weights` lets a Fisher
  estimation run on the full weights with FSDP2's hooks set aside; :func:`shard_like` keeps the
  rank's shard of a full tensor, laid out like a parameter's shard.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from . import collectives


def is_sharded(t: Any) -> bool:
    """Whether ``t`` is a DTensor (a sharded parameter or a shard of F or θ*)."""
    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank's local tensor of a DTensor (outside autograd), ``t`` itself otherwise."""
    # What ``to_local()`` returns outside autograd, without its grad-mode switch (µs per call).
    return t._local_tensor if is_sharded(t) else t  # type: ignore[attr-defined, no-any-return]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` wrappers (``model`` itself if unwrapped)."""
    while isinstance(model, DistributedDataParallel):
        model = model.module
    return model


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _fsdp_params(model: nn.Module) -> list[Any]:
    """FSDP2's records of the sharded parameters (``FSDPParam``: ``sharded_param``, ``_module_info``)."""
    out = []
    for m in _fsdp_modules(model):
        group = m._get_fsdp_state()._fsdp_param_group  # type: ignore[operator]
        if group is not None:
            out.extend(group.fsdp_params)
    return out


def _owners(fsdp_param: Any) -> list[tuple[nn.Module, str]]:
    info = fsdp_param._module_info
    return [(info.module, info.param_name), *zip(info.shared_modules, info.shared_param_names)]


def named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``model.named_parameters()`` of the unwrapped model, with every FSDP2 parameter as its
    sharded DTensor (whether or not FSDP2 has unsharded it at the moment).

    Args:
        model: a module, possibly DDP-wrapped or ``fully_shard``-ed.

    Returns:
        ``[(name, parameter)]`` in ``named_parameters`` order, shared parameters once.
    """
    model = unwrap(model)
    sharded = {(id(mod), k): fp.sharded_param for fp in _fsdp_params(model) for mod, k in _owners(fp)}
    if not sharded:
        return list(model.named_parameters())
    out, seen = [], set()
    for prefix, mod in model.named_modules():
        for k, p in mod._parameters.items():
            q = sharded.get((id(mod), k), p)
            if q is None or id(q) in seen:
                continue
            seen.add(id(q))
            out.append((f"{prefix}.{k}" if prefix else k, q))
    return out


class ParameterLinks:
    """(dict, key, object) for every submodule and parameter of a model: while each
    ``dict[key] is object`` holds, :func:`named_parameters` returns the same objects under the same
    names (checked on every training step: kept as three columns for a fast :meth:`hold`)."""

    def __init__(self, links: list[tuple[dict, str, Any]]) -> None:
        self.dicts: tuple[dict, ...] = tuple(d for d, _, _ in links)
        self.keys: tuple[str, ...] = tuple(k for _, k, _ in links)
        self.objects: tuple[Any, ...] = tuple(o for _, _, o in links)

    def hold(self) -> bool:
        """Whether every link still holds."""
        return all(map(operator.is_, map(dict.get, self.dicts, self.keys), self.objects))


def parameter_links(model: nn.Module) -> ParameterLinks:
    """The links of every submodule and parameter of the unwrapped ``model``. An FSDP2 parameter
    links to its ``FSDPParam``'s sharded parameter, not to the module's slot (which FSDP2 swaps at
    every forward).

    Args:
        model: a module, possibly DDP-wrapped or ``fully_shard``-ed.

    Returns:
        The links.
    """
    model = unwrap(model)
    fsdp = {(id(mod), k): fp for fp in _fsdp_params(model) for mod, k in _owners(fp)}
    links: list[tuple[dict, str, Any]] = []
    for module in model.modules():
        links.extend((module._modules, k, v) for k, v in module._modules.items())
        for k, v in module._parameters.items():
            fp = fsdp.get((id(module), k))
            links.append((module._parameters, k, v) if fp is None else (fp.__dict__, "sharded_param", fp.sharded_param))
    return ParameterLinks(links)


@contextmanager
def full_weights(model: nn.Module) -> Iterator[dict[str, nn.Parameter]]:
    """Inside: every FSDP2 parameter of ``model`` replaced by a plain parameter holding the full
    weight (one all-gather per parameter, on every rank), FSDP2's forward hooks set aside and each
    module back in its own class, so that forward and backward passes run as in an unsharded
    model, with the layer rules and without collectives. Restored on exit. Nothing happens for a
    model without FSDP2 parameters.

    Args:
        model: the unwrapped model.

    Yields:
        ``{name: sharded parameter}`` of the FSDP2 parameters (empty for other models).
    """
    sharded = {n: p for n, p in named_parameters(model) if is_sharded(p)}
    fsdp_params = _fsdp_params(model)
    if not fsdp_params:
        yield sharded
        return
    slots: list[tuple[dict, str, Any]] = []
    hooks: list[tuple[dict, dict]] = []
    classes: list[tuple[nn.Module, type]] = []
    try:
        for fp in fsdp_params:
            sp = fp.sharded_param
            plain = nn.Parameter(gather(sp).detach(), requires_grad=sp.requires_grad)
            for mod, k in _owners(fp):
                slots.append((mod._parameters, k, mod._parameters[k]))
                mod._parameters[k] = plain
        for m in _fsdp_modules(model):
            state = m._get_fsdp_state()  # type: ignore[operator]
            for d in (m._forward_pre_hooks, m._forward_hooks):
                hooks.append((d, dict(d)))
                for key in [k for k, h in d.items() if getattr(h, "__self__", None) is state]:
                    del d[key]
            # FSDP2 gives each module a subclass (`FSDPLinear`); the layer rules key on the exact type.
            classes.append((m, type(m)))
            m.__class__ = _original_class(type(m))
        yield sharded
    finally:
        for m, cls in classes:
            m.__class__ = cls
        for d, saved in hooks:
            d.clear()
            d.update(saved)
        for d, k, original in reversed(slots):
            d[k] = original


def _original_class(cls: type) -> type:
    """The module class that FSDP2's dynamic subclass ``FSDP<cls>`` was made from."""
    return next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))


def shard_like(full: torch.Tensor, param: Any) -> torch.Tensor:
    """The rank's shard of ``full`` as a DTensor laid out like the DTensor ``param`` (same mesh,
    placements and local shape, uneven shards included); no communication.

    Args:
        full: a tensor of ``param``'s full shape, the same on every rank.
        param: a sharded parameter.

    Returns:
        A DTensor whose ``to_local()`` has the shape of ``param.to_local()``.
    """
    out = distribute_tensor(full.detach(), param.device_mesh, param.placements, src_data_rank=None)
    if out.to_local().shape != local(param).shape:
        raise ValueError(
            f"sharding: the shard of a tensor of shape {list(full.shape)} has local shape "
            f"{list(out.to_local().shape)}, but the parameter's is {list(local(param).shape)}"
        )
    return out


def grad_like(local_grad: torch.Tensor, param: Any) -> torch.Tensor:
    """``local_grad`` (this rank's shard) as a DTensor gradient of the sharded ``param``; shares memory.

    Built on the parameter's own spec (mesh, placements, shape, stride, dtype): ``from_local``
    re-derives it, which cost ~30 µs per tensor, most of a sharded penalty step (torch is pinned,
    so the private constructor is stable).
    """
    if local_grad.dtype == param.dtype:
        return DTensor(local_grad, param._spec, requires_grad=False)  # type: ignore[call-arg, no-any-return]
    return DTensor.from_local(
        local_grad, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )


def add_local_grads(params: list[Any], local_grads: list[torch.Tensor]) -> None:
    """Adds each local gradient into its sharded parameter's ``.grad`` (created when absent);
    parameters that do not require grad are skipped.

    Args:
        params: sharded parameters (DTensors).
        local_grads: this rank's shards of their gradients.
    """
    for p, g in zip(params, local_grads):
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = grad_like(g.clone(), p)
        else:
            local(p.grad).add_(g)


def gather(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of a DTensor (an all-gather: every rank calls it), ``t`` itself otherwise."""
    if not is_sharded(t):
        return t
    full = t.full_tensor()  # type: ignore[attr-defined]
    collectives.count_gather(full.numel() * full.element_size())
    return full  # type: ignore[no-any-return]
