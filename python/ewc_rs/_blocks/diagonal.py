"""The diagonal block kind: F per element of each covered parameter, and its penalty term.

Penalty (λ/2) Σ_t Σ_i F_t,i (θ_i − θ*_t,i)², gradient λ Σ_t F_t (θ − θ*_t). The term folds the
stored tasks into one quadratic per weight, θ* and F as flat buffers per *bucket* (the parameters
that share a device, dtype and sharding), so that a step costs one Rust pass per bucket whatever
the number of tasks (``_core.penalty``; ``_core.penalty_add_to_grads`` writes into ``.grad``).
Online folding: F ← γ F_old + F_new (summed in float32). F may be stored in 8 bits
(:mod:`.fisher8`, ``EWC(fisher_bits=8)``): the pass then reads the codes and their block scales.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from .. import _core
from .._parallel import collectives, sharding
from . import fisher8
from .base import Block, Entry, Evaluation, add_grad
from .fisher8 import Fisher8, FisherValue

# Count of owners of a tensor's storage (torch is pinned, so the private helper is stable).
_storage_use_count: Optional[Callable[[int], int]] = getattr(torch._C, "_storage_Use_Count", None)


def _sole_owner(buffer: torch.Tensor) -> bool:
    """True when no tensor but ``buffer`` itself uses its memory (e.g. no ``.grad`` views it).

    Asking creates one temporary storage reference, hence the 2.
    """
    if _storage_use_count is None:
        return False
    return _storage_use_count(buffer.untyped_storage()._cdata) <= 2


@dataclass(frozen=True)
class Diagonal(Block):
    """F per element of each covered parameter, by name (F of θ*'s shape, in the storage dtype or
    8-bit; FSDP2: DTensors)."""

    fisher: Mapping[str, FisherValue]

    kind: ClassVar[str] = "diagonal"

    @property
    def params(self) -> set[str]:
        return set(self.fisher)

    def to(self, device: torch.device) -> Diagonal:
        return Diagonal({n: f.to(device) for n, f in self.fisher.items()})

    def cast(self, dtype: torch.dtype) -> Diagonal:
        """The dense F in ``dtype``; 8-bit F stays as it is."""
        return Diagonal({n: f if isinstance(f, Fisher8) else f.to(dtype) for n, f in self.fisher.items()})

    def with_fisher_bits(self, bits: Optional[int]) -> Diagonal:
        """F in 8 bits (``bits=8``) or decoded into float32 (None), per parameter.

        Raises:
            ValueError: 8 bits for an FSDP2-sharded F (not supported).
        """
        if bits is None:
            return Diagonal({n: fisher8.dense(f) if isinstance(f, Fisher8) else f for n, f in self.fisher.items()})
        out: dict[str, FisherValue] = {}
        for n, f in self.fisher.items():
            if isinstance(f, Fisher8):
                out[n] = f
            elif sharding.is_sharded(f):
                raise ValueError(
                    f"fisher_bits: an 8-bit F is not supported for FSDP2-sharded parameters ('{n}'); "
                    "use fisher_bits=None"
                )
            else:
                out[n] = Fisher8.of(f)
        return Diagonal(out)

    def fold(self, old: Optional[Block], gamma: float) -> Diagonal:
        """F ← γ F_old + F_new per parameter of this block, in float32 (an 8-bit F decoded first;
        the result is dense, stored again as the EWC's ``fisher_bits`` say); a parameter whose
        shape changed since ``old`` (or that ``old`` lacks) starts afresh from its new F."""
        if not isinstance(old, Diagonal):
            return self
        fisher = dict(self.fisher)
        for n, f in self.fisher.items():
            prev = old.fisher.get(n)
            if prev is not None and prev.shape == f.shape:
                dtype = torch.float32 if isinstance(f, Fisher8) else f.dtype
                new = fisher8.dense(f) if isinstance(f, Fisher8) else f.float()
                fisher[n] = (gamma * fisher8.dense(prev).to(new.device) + new).to(dtype)
        return Diagonal(fisher)

    def misfit(self, model: nn.Module, named: Mapping[str, nn.Parameter]) -> Optional[str]:
        return None  # F has θ*'s shape, which the task checks against the model

    def to_state(self) -> dict[str, Any]:
        return {n: f.to_state() if isinstance(f, Fisher8) else f for n, f in self.fisher.items()}

    @classmethod
    def from_state(cls, payload: Any, where: str, storage: torch.dtype, star: Mapping[str, Any]) -> Diagonal:
        if not isinstance(payload, dict):
            raise ValueError(f"state: {where}: '{cls.kind}' must map parameter names to F")
        out: dict[str, FisherValue] = {}
        for n, f in payload.items():
            if isinstance(f, dict):
                out[n] = Fisher8.from_state(f, f"{where}, parameter '{n}'")
                continue
            if not isinstance(f, torch.Tensor):
                raise ValueError(f"state: {where}, parameter '{n}': F must be a tensor (or an 8-bit F's dict)")
            local = sharding.local(f)  # this rank's part (the other ranks check theirs)
            if not torch.isfinite(local.float()).all():
                raise ValueError(f"state: {where}, parameter '{n}': F has non-finite values")
            if (local < 0).any():
                raise ValueError(f"state: {where}, parameter '{n}': F has negative values")
            out[n] = f.detach().to(storage)
        return Diagonal(out)

    def to_tensors(self) -> tuple[list[str], dict[str, torch.Tensor]]:
        """Dense F as ``"{i}"``; 8-bit F as ``"{i}.codes"``, ``"{i}.scales"`` and ``"{i}.block"`` (0-d int64)."""
        names = sorted(self.fisher)
        tensors = {}
        for i, n in enumerate(names):
            f = self.fisher[n]
            if isinstance(f, Fisher8):
                tensors[f"{i}.codes"] = f.codes.detach().cpu().contiguous()
                tensors[f"{i}.scales"] = f.scales.detach().cpu().contiguous()
                tensors[f"{i}.block"] = torch.tensor(f.block, dtype=torch.int64)
            else:
                tensors[str(i)] = sharding.gather(f).detach().cpu().contiguous()
        return names, tensors

    @classmethod
    def from_tensors(cls, layout: Sequence[str], get: Callable[[str], torch.Tensor]) -> Any:
        def one(i: int) -> Any:
            try:
                return get(str(i))
            except ValueError:  # not dense: the 8-bit form (its keys' absence is reported by name)
                return {"codes": get(f"{i}.codes"), "scales": get(f"{i}.scales"), "block": get(f"{i}.block")}

        return {n: one(i) for i, n in enumerate(layout)}

    @classmethod
    def term(
        cls, model: nn.Module, named: Mapping[str, nn.Parameter], entries: Sequence[Entry], storage: torch.dtype
    ) -> DiagonalTerm:
        return DiagonalTerm.build(model, named, entries, storage)

    def placed(self, named: Mapping[str, nn.Parameter]) -> Diagonal:
        dense = {n: f for n, f in self.fisher.items() if isinstance(f, torch.Tensor)}
        coded = {n: f.to(named[n].device) for n, f in self.fisher.items() if isinstance(f, Fisher8)}
        if coded and any(sharding.is_sharded(named[n]) for n in coded):
            raise ValueError("state: an 8-bit F cannot be placed on FSDP2-sharded parameters (not supported)")
        return Diagonal({**place(dense, named), **coded})


def place(tensors: Mapping[str, torch.Tensor], named: Mapping[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Each tensor laid out like its parameter: a full tensor for a sharded parameter becomes this
    rank's shard; a DTensor must already be laid out like its parameter.

    Raises:
        ValueError: a stored DTensor laid out otherwise than its parameter, or for a plain one.
    """
    out = {}
    for n, t in tensors.items():
        p = named[n]
        if not sharding.is_sharded(t):
            out[n] = sharding.shard_like(t.to(p.device), p) if sharding.is_sharded(p) else t
            continue
        if not sharding.is_sharded(p):
            raise ValueError(f"state: parameter '{n}' is stored sharded (a DTensor) but the model's parameter is not")
        if t.device_mesh != p.device_mesh or tuple(t.placements) != tuple(p.placements):  # type: ignore[attr-defined]
            raise ValueError(
                f"state: parameter '{n}' is stored on mesh {t.device_mesh} as {tuple(t.placements)}, but the "  # type: ignore[attr-defined]
                f"model's parameter is on mesh {p.device_mesh} as {tuple(p.placements)}: load a checkpoint of "  # type: ignore[attr-defined]
                "another layout with ewc_rs.checkpoint.load, which re-shards it"
            )
        out[n] = t
    return out


@dataclass
class Bucket:
    """Parameters that share a device, dtype and sharding, with θ* and F as flat buffers in their order.

    ``star`` and ``fisher`` are the combined quadratic of every stored task (see :meth:`DiagonalTerm.build`):
    Σ_t F_t (θ − θ*_t)² = F (θ − θ*)² + const, with F = Σ_t F_t and θ* the F-weighted mean.
    """

    index: list[int]  # positions of this bucket's parameters in the term's parameter list
    params: list[torch.Tensor]
    device: torch.device
    dtype: torch.dtype
    star: torch.Tensor
    #: The flat F in the storage dtype, or (``scales`` given) the flat 8-bit codes.
    fisher: torch.Tensor
    #: FSDP2 parameters (DTensors): ``star`` and ``fisher`` hold this rank's shards only.
    sharded: bool = False
    #: 8-bit F: each parameter's blocks' ``(lo, step)`` in order (``[blocks, 2]`` float32), and the block size.
    scales: Optional[torch.Tensor] = None
    block: int = 0
    # The last gradient buffer. Reused when nothing else holds it any more (the usual case once
    # `zero_grad()` dropped the `.grad` views): a fresh allocation of a large buffer costs page
    # faults that take longer than the pass itself.
    buffer: Optional[torch.Tensor] = None

    def evaluate(self, lam: float, *, reuse: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        out = self.buffer if reuse and self.buffer is not None and _sole_owner(self.buffer) else None
        value, flat, views = _core.penalty(self.locals(), self.star, self.fisher, lam, out, **self.coded())
        if reuse:
            self.buffer = flat
        return value, flat, views

    def coded(self) -> dict[str, Any]:
        """The native pass's keyword arguments for an 8-bit F (none for a dense one)."""
        return {} if self.scales is None else {"fisher_code": (self.scales, self.block)}

    def locals(self) -> list[torch.Tensor]:
        """The parameters as the Rust pass reads them: this rank's shards of DTensors."""
        return [sharding.local(p) for p in self.params] if self.sharded else self.params


@dataclass
class DiagonalTerm:
    """The diagonal blocks of every task as one quadratic: parameters in order, their buckets, and
    the constant."""

    names: list[str]
    params: list[torch.Tensor]
    buckets: list[Bucket]
    const: float
    #: FSDP2: the constant of this rank's shards, and the process group the sharded part is summed over.
    sharded_const: float = 0.0
    group: collectives.Group = None

    @classmethod
    def build(
        cls, model: nn.Module, named: Mapping[str, nn.Parameter], entries: Sequence[Entry], storage: torch.dtype
    ) -> DiagonalTerm:
        """Folds the stored diagonal blocks into one quadratic per weight, laid out for ``model``'s
        parameters.

        Σ_t F_t (θ − θ*_t)² = F (θ − m)² + c with F = Σ_t F_t, m = Σ_t F_t θ*_t / F and
        c = Σ_t F_t θ*_t² − F m² (≥ 0, summed in float64), so the penalty is one pass whatever the
        number of tasks. Where F = 0, m is the latest θ*.

        Args:
            model: the model being trained (unwrapped).
            named: its parameters by name.
            entries: ``(Diagonal, θ*)`` per task storing a diagonal block, oldest first.
            storage: dtype of the flat θ* and F buffers.

        Returns:
            The term, one :class:`Bucket` per (device, dtype, sharded) of the parameters (FSDP2
            parameters: their local shards, the value summed over the mesh's process group).

        Raises:
            ValueError: a parameter holds a shard of another shape than its stored F and θ*.
        """
        pairs = [(b.fisher, star) for b, star in entries if isinstance(b, Diagonal)]
        names = sorted({n for fisher, _ in pairs for n in fisher})
        params: list[torch.Tensor] = [named[n] for n in names]
        by_bucket: dict[tuple[torch.device, torch.dtype, bool], list[int]] = {}
        for i, p in enumerate(params):
            by_bucket.setdefault((p.device, p.dtype, sharding.is_sharded(p)), []).append(i)
        buckets, consts = [], [0.0, 0.0]  # plain, sharded
        for (device, dtype, sharded), index in by_bucket.items():
            stored = [fisher[names[i]] for fisher, _ in pairs for i in index if names[i] in fisher]
            block = next((f.block for f in stored if isinstance(f, Fisher8)), 0)
            # One flat buffer each, written in place: no float64 or per-parameter copy of the
            # whole state (for a 1e9-parameter model those would need several times its size).
            total = sum(sharding.local(params[i]).numel() for i in index)
            star_flat = torch.empty(total, dtype=storage, device=device)
            fisher_flat = torch.empty(total, dtype=torch.uint8 if block else storage, device=device)
            scales: list[torch.Tensor] = []
            at = 0
            for i in index:
                local = sharding.local(params[i])
                one = [(f[names[i]], st[names[i]]) for f, st in pairs if names[i] in f]
                if len(one) == 1:  # one task: its θ* and F as they are (m = θ*, c = 0)
                    f, m = _local(one[0][0]), sharding.local(one[0][1])
                else:  # several tasks: folded in float64
                    m, f, c = _fold_parameter(pairs, names[i], device)
                    consts[sharded] += c
                if m.shape != local.shape:
                    raise ValueError(
                        f"model: parameter '{names[i]}' holds a shard of shape {list(local.shape)} "
                        f"but its stored F and θ* a shard of shape {list(m.shape)}: load the state for this mesh"
                    )
                span = slice(at, at + local.numel())
                star_flat[span].copy_(m.reshape(-1))
                if block:  # 8-bit: the codes as they are, or (folded, other block size) coded again
                    coded = f if isinstance(f, Fisher8) and f.block == block else Fisher8.of(fisher8.dense(f), block)
                    fisher_flat[span].copy_(coded.codes.reshape(-1))
                    scales.append(coded.scales.to(device))
                else:
                    fisher_flat[span].copy_(fisher8.dense(f, storage).reshape(-1))
                at += local.numel()
            buckets.append(
                Bucket(
                    index=index,
                    params=[params[i] for i in index],
                    device=device,
                    dtype=dtype,
                    star=star_flat,
                    fisher=fisher_flat,
                    sharded=sharded,
                    scales=torch.cat(scales) if block else None,
                    block=block,
                )
            )
        group = collectives.mesh_group(params)
        return cls(names, params, buckets, max(consts[0], 0.0), max(consts[1], 0.0), group)

    @property
    def needs_placement_check(self) -> bool:
        """With one bucket the per-step check (≈0.15 µs a parameter) is left to the Rust pass,
        which refuses a moved or retyped parameter before writing anything; the caller then
        rebuilds (:func:`ewc_rs._penalty.plan.run_on_plan`)."""
        return len(self.buckets) != 1

    def placement_holds(self) -> bool:
        """Each parameter still on its bucket's device and dtype."""
        return all(p.device == b.device and p.dtype == b.dtype for b in self.buckets for p in b.params)

    def evaluate(self, lam: float, *, reuse: bool = True) -> Evaluation:
        flats: list[torch.Tensor] = []
        grads: list[Optional[torch.Tensor]] = [None] * len(self.params)
        values = []
        for b in self.buckets:
            value, flat, views = b.evaluate(lam, reuse=reuse)
            values.append(value)
            flats.append(flat)
            for i, v in zip(b.index, views):
                grads[i] = sharding.grad_like(v, self.params[i]) if b.sharded else v
        return Evaluation(self._value(values, lam), flats, grads)

    def _value(self, bucket_values: list[torch.Tensor], lam: float) -> torch.Tensor:
        """The penalty from its per-bucket parts, plus the constant of the folded tasks; the
        sharded buckets' part summed over the ranks (one scalar all-reduce)."""
        sharded = [v for b, v in zip(self.buckets, bucket_values) if b.sharded]
        plain = [v for b, v in zip(self.buckets, bucket_values) if not b.sharded]
        total = None
        if sharded:
            local = _sum(sharded) + 0.5 * lam * self.sharded_const
            total = collectives.all_reduce_(local.float().clone(), self.group, op="penalty_all_reduce")
        if plain:
            part = _sum(plain)
            total = part if total is None else total.to(part.device) + part
        assert total is not None, "a term has at least one bucket"
        return total + 0.5 * lam * self.const if self.const else total

    def add_to_grads(self, lam: float, scale: float) -> torch.Tensor:
        """Adds ``scale``·λF(θ−θ*) to each parameter's ``.grad`` as ``backward()`` would (only
        parameters that require grad; ``.grad`` created when absent); returns the penalty."""
        values = []
        for b in self.buckets:
            params = b.params
            if b.sharded:  # this rank's shards: flat gradient, added to the DTensor .grad's local part
                value, flat, views = _core.penalty(b.locals(), b.star, b.fisher, lam, **b.coded())
                if scale != 1.0:
                    flat.mul_(scale)
                sharding.add_local_grads(params, views)
                values.append(value)
                continue
            if b.device.type in ("cpu", "cuda"):  # one fused pass straight into the .grad memory
                value, pending = _core.penalty_add_to_grads(params, b.star, b.fisher, lam, scale, **b.coded())
            else:  # flat gradient, then one multi-tensor add
                value, flat, views = _core.penalty(params, b.star, b.fisher, lam, **b.coded())
                if scale != 1.0:
                    flat.mul_(scale)
                wants = [i for i, p in enumerate(params) if p.requires_grad]
                have = [i for i in wants if params[i].grad is not None]
                if have:
                    torch._foreach_add_([params[i].grad for i in have], [views[i] for i in have])  # type: ignore[misc]
                pending = [(i, views[i]) for i in wants if params[i].grad is None]
            for i, t in pending:
                add_grad(params[i], t)
            values.append(value)
        return self._value(values, lam)


def _local(f: FisherValue) -> FisherValue:
    """This rank's part of a dense F (an 8-bit F is never sharded)."""
    return f if isinstance(f, Fisher8) else sharding.local(f)


def _sum(values: list[torch.Tensor]) -> torch.Tensor:
    total = values[0]
    for v in values[1:]:
        total = total + v.to(total.device)
    return total


def _fold_parameter(
    pairs: Sequence[tuple[Mapping[str, FisherValue], Mapping[str, torch.Tensor]]], name: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(m, F, c) of one parameter over the tasks whose ``(F, θ*)`` store it, in float64 on ``device``."""
    terms = [
        (
            fisher8.dense(_local(fisher[name]), torch.float64).to(device),
            sharding.local(star[name]).to(device, torch.float64),
        )
        for fisher, star in pairs
        if name in fisher
    ]
    f_tot = torch.stack([f for f, _ in terms]).sum(0)
    fs_tot = torch.stack([f * s for f, s in terms]).sum(0)
    m = torch.where(f_tot > 0, fs_tot / f_tot.clamp_min(1e-300), terms[-1][1])
    const = float(sum(float((f * s * s).sum()) for f, s in terms) - float((f_tot * m * m).sum()))
    return m, f_tot, const
