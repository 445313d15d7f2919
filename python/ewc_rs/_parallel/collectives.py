"""Every collective the library makes, in one place: the process group a call runs under, the
all-reduces of a Fisher estimation and of a sharded penalty, the check that all ranks hold the
same model, and a counter of calls and bytes (public through ``ewc_rs.distributed``)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.distributed as dist

#: What ``group=`` accepts: a process group, or None for the default group when one is initialised.
Group = Optional[Any]

#: The count is sent as two float32 parts (high and low 20 bits) so that it stays exact.
_COUNT_SPLIT = 2**20


@dataclass
class CommCounter:
    """Calls and bytes of the collectives the library made, per operation name."""

    calls: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)

    def add(self, op: str, nbytes: int) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1
        self.bytes[op] = self.bytes.get(op, 0) + int(nbytes)

    def reset(self) -> None:
        """Forgets every call counted so far."""
        self.calls.clear()
        self.bytes.clear()

    def counts(self) -> dict[str, Any]:
        """``{"calls": {op: n}, "bytes": {op: n}, "total_calls": n, "total_bytes": n}``."""
        return {
            "calls": dict(self.calls),
            "bytes": dict(self.bytes),
            "total_calls": sum(self.calls.values()),
            "total_bytes": sum(self.bytes.values()),
        }


COUNTER = CommCounter()


def resolve_group(group: Group) -> Group:
    """The group a call runs under: ``group`` itself, else the default group when one is initialised.

    Args:
        group: a ``torch.distributed`` process group, or None.

    Returns:
        A process group, or None for a single-process call.

    Raises:
        ValueError: ``group`` is given but ``torch.distributed`` is not initialised.
    """
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise ValueError("group: given, but torch.distributed has no initialised process group")
        return None
    return group if group is not None else dist.group.WORLD


def rank(group: Group) -> int:
    """This process's rank in ``group`` (0 without a group)."""
    return 0 if group is None else dist.get_rank(group)


def world_size(group: Group) -> int:
    """The number of ranks of ``group`` (1 without a group)."""
    return 1 if group is None else dist.get_world_size(group)


def rank_generator(group: Group, device: torch.device) -> torch.Generator:
    """A generator for ``mc`` draws that differ per rank: seeded from the global RNG (one draw) and
    the rank, so runs seeded alike repeat."""
    seed = int(torch.randint(0, 2**62, (1,)).item()) + rank(group) * 0x9E3779B97F4A7C15
    return torch.Generator(device=device).manual_seed(seed % 2**63)


def all_reduce_(tensor: torch.Tensor, group: Group, *, op: str = "all_reduce") -> torch.Tensor:
    """Sums ``tensor`` over the ranks of ``group`` in place (counted under ``op``); returns it."""
    COUNTER.add(op, tensor.numel() * tensor.element_size())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def count_gather(nbytes: int) -> None:
    """Counts an all-gather made elsewhere (``DTensor.full_tensor``) of ``nbytes`` on this rank."""
    COUNTER.add("all_gather", nbytes)


def all_reduce_sums(
    totals: Sequence[torch.Tensor], counts: Sequence[int], group: Group, *, failed: bool = False
) -> tuple[list[torch.Tensor], list[int], int]:
    """Sums per-parameter (and per-factor) totals and integer counts over the ranks: one all-reduce
    of one flat buffer.

    A rank whose estimation raised still joins (``failed=True``), so that the others learn of it
    from the same all-reduce instead of waiting for it.

    Args:
        totals: this rank's sums (sums of squared per-sample gradients per parameter, Kronecker
            factor sums per layer), float32 on one device; the same shapes on every rank.
        counts: this rank's counts (samples or batches; input rows per Kronecker layer, ...),
            each exact below 2⁴⁴; the same length on every rank.
        group: the process group.
        failed: whether this rank's estimation failed.

    Returns:
        The summed totals (new tensors, shaped like ``totals``), the summed counts, and the number
        of ranks that failed.
    """
    device = totals[0].device if totals else torch.device("cpu")
    head = [float(failed)]
    for c in counts:
        head += [c // _COUNT_SPLIT, c % _COUNT_SPLIT]
    flat = torch.cat([torch.tensor(head, dtype=torch.float32, device=device), *(t.reshape(-1).float() for t in totals)])
    all_reduce_(flat, group, op="fisher_all_reduce")
    values = flat[: len(head)].tolist()
    summed = [int(values[1 + 2 * i]) * _COUNT_SPLIT + int(values[2 + 2 * i]) for i in range(len(counts))]
    out, offset = [], len(head)
    for t in totals:
        out.append(flat[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()
    return out, summed, int(values[0])


def _digest(names: Sequence[str], shapes: Sequence[Sequence[int]]) -> int:
    """A 20-bit checksum of the parameter names and shapes (small enough that its square sums
    exactly in float64)."""
    text = ";".join(f"{n}:{tuple(int(d) for d in s)}" for n, s in zip(names, shapes))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") % _COUNT_SPLIT


def check_same_model(names: Sequence[str], shapes: Sequence[Sequence[int]], group: Group, device: torch.device) -> None:
    """Raises on every rank when the ranks' models differ in parameter names or shapes.

    One 24-byte all-reduce of (c, c², 1), c the rank's checksum: Σc² · world = (Σc)² holds only
    when every rank has the same c. On a mismatch the ranks gather their names and shapes to say
    which parameter differs.

    Args:
        names: the parameters' names, in order.
        shapes: their (full) shapes.
        group: the process group.
        device: where the collective's buffer lives (the parameters' device: CUDA under NCCL).

    Raises:
        ValueError: on every rank, naming the first parameter that differs and the ranks involved.
    """
    c = float(_digest(names, shapes))
    buf = torch.tensor([c, c * c, 1.0], dtype=torch.float64, device=device)
    all_reduce_(buf, group, op="model_check")
    if buf[0].item() ** 2 == buf[1].item() * buf[2].item():
        return
    mine = [(n, tuple(int(d) for d in s)) for n, s in zip(names, shapes)]
    everyone: list[Any] = [None] * world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    raise ValueError(f"model: the ranks of the process group hold different models: {_first_difference(everyone)}")


def _first_difference(per_rank: list[list[tuple[str, tuple[int, ...]]]]) -> str:
    """Names the first parameter (or count of parameters) where a rank differs from rank 0."""
    base = per_rank[0]
    for r, other in enumerate(per_rank[1:], start=1):
        for i, (a, b) in enumerate(zip(base, other)):
            if a != b:
                return f"parameter {i} is '{a[0]}' {list(a[1])} on rank 0 but '{b[0]}' {list(b[1])} on rank {r}"
        if len(base) != len(other):
            return f"rank 0 has {len(base)} parameters that require grad, rank {r} has {len(other)}"
    return "the checksums of parameter names and shapes differ"


def any_rank(flag: bool, group: Group, device: torch.device) -> bool:
    """Whether ``flag`` holds on any rank (one 4-byte all-reduce on ``device``; the local flag
    without a group)."""
    if group is None:
        return flag
    buf = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_(buf, group, op="agree").item() > 0)


def mesh_group(tensors: Sequence[Union[torch.Tensor, Any]]) -> Group:
    """The process group of the first DTensor among ``tensors`` (its 1-D mesh), or None."""
    for t in tensors:
        mesh = getattr(t, "device_mesh", None)
        if mesh is not None:
            return mesh.get_group()
    return None
