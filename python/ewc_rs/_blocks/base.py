"""The interface every curvature block kind implements (:class:`Block`), the penalty term a kind
contributes (:class:`Term`), and what a term's evaluation returns (:class:`Evaluation`).

A stored task is θ* plus a list of blocks, at most one of each kind; a block covers some of the
task's parameters with one kind of curvature: the diagonal Fisher (:mod:`.diagonal`), Kronecker
factors (:mod:`.kronecker`), eigenvalue-corrected Kronecker factors (:mod:`.ekfac`). The penalty
plan is one term per kind, over the blocks of that kind of every task.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Protocol

import torch
from torch import nn

#: A block and the θ* of its task, as a term is built from them (oldest task first).
Entry = tuple["Block", Mapping[str, torch.Tensor]]


@dataclass
class Evaluation:
    """One penalty evaluation (a plain object, not a tensor, so that autograd does not treat it as
    an input of ``FusedPenalty``)."""

    value: torch.Tensor
    #: Buffers that hold the gradients (each scaled once when the incoming gradient is not 1).
    flats: list[torch.Tensor]
    #: Per parameter of the term (or plan), views into ``flats``.
    grads: list[Optional[torch.Tensor]]


class Term(Protocol):
    """One block kind's part of the penalty, over the blocks of that kind of every stored task."""

    #: The parameters the term reads, in the order of ``Evaluation.grads``.
    params: list[torch.Tensor]

    @property
    def needs_placement_check(self) -> bool:
        """Whether every step must check :meth:`placement_holds` (False: the native pass refuses a
        moved or retyped parameter itself before writing anything)."""
        ...

    def placement_holds(self) -> bool:
        """Each parameter still on the device and dtype the term was built for."""
        ...

    def evaluate(self, lam: float, *, reuse: bool = True) -> Evaluation:
        """The term's value and gradient (``reuse``: the last gradient buffer may be written again)."""
        ...

    def add_to_grads(self, lam: float, scale: float) -> torch.Tensor:
        """Adds ``scale`` × the gradient to ``.grad`` (created when absent; only parameters that
        require grad); returns the term's value."""
        ...


class Block(ABC):
    """One kind of curvature over some parameters of one task (immutable: operations return new
    blocks)."""

    #: The kind's name: its key in the registry and in a task of the state format.
    kind: ClassVar[str]

    @property
    @abstractmethod
    def params(self) -> set[str]:
        """The names of the parameters the block covers."""

    @abstractmethod
    def to(self, device: torch.device) -> Block:
        """The same block with every tensor on ``device`` (dtypes kept)."""

    @abstractmethod
    def cast(self, dtype: torch.dtype) -> Block:
        """The same block stored in ``dtype`` (the ``storage_dtype``)."""

    def with_fisher_bits(self, bits: Optional[int]) -> Block:
        """The block with its F stored in ``bits`` bits (None: in the storage dtype); kinds
        without an 8-bit form return themselves."""
        return self

    @abstractmethod
    def fold(self, old: Optional[Block], gamma: float) -> Block:
        """Online EWC: the block standing for γ·``old`` + this one (``old``: the same kind's block
        of the folded task so far, or None), in this block's dtype."""

    @abstractmethod
    def misfit(self, model: nn.Module, named: Mapping[str, nn.Parameter]) -> Optional[str]:
        """Why the block does not fit ``model`` (whose parameters by name are ``named``), or None."""

    @abstractmethod
    def to_state(self) -> dict[str, Any]:
        """The block in the state-dict format (tensors shared)."""

    @classmethod
    @abstractmethod
    def from_state(cls, payload: Any, where: str, storage: torch.dtype, star: Mapping[str, Any]) -> Block:
        """A block from :meth:`to_state`'s format, checked.

        Args:
            payload: the value under the kind's key of a task.
            where: how errors name the task (``"task 0"``).
            storage: the storage dtype.
            star: the task's θ* by name (as stored, not yet checked).

        Raises:
            ValueError: a malformed payload (named by ``where``, the kind and the entry).
        """

    @abstractmethod
    def to_tensors(self) -> tuple[list[str], dict[str, torch.Tensor]]:
        """The file form: a layout (names, in order) and tensors keyed by suffixes (gathered, on CPU)."""

    @classmethod
    @abstractmethod
    def from_tensors(cls, layout: Sequence[str], get: Callable[[str], torch.Tensor]) -> Any:
        """The state-dict payload of a block from :meth:`to_tensors`'s layout and a reader of its
        tensors by suffix (checked afterwards by :meth:`from_state`)."""

    @classmethod
    @abstractmethod
    def term(
        cls, model: nn.Module, named: Mapping[str, nn.Parameter], entries: Sequence[Entry], storage: torch.dtype
    ) -> Term:
        """The kind's penalty term over ``entries`` (this kind's block and θ* of each task storing one).

        Args:
            model: the model being trained (unwrapped from DDP).
            named: its parameters by name (FSDP2: the sharded ones).
            entries: ``(block, θ*)`` per task, oldest first.
            storage: the storage dtype.

        Raises:
            ValueError: a block does not fit the model's parameters as they are now.
        """

    def placed(self, named: Mapping[str, nn.Parameter]) -> Block:
        """The block laid out like the model's parameters (FSDP2: this rank's shards); by default
        the block itself.

        Raises:
            ValueError: a stored tensor laid out otherwise than its parameter.
        """
        return self


class LayerTerm(ABC):
    """What the penalty terms of the layer kinds share: the layers' weights and biases as their
    parameters, the placement check, and ``evaluate``/``add_to_grads`` around one ``_run`` that
    returns the value and fresh gradient tensors (weights, then the biases that are in W̃)."""

    weights: list[torch.Tensor]
    biases: list[Optional[torch.Tensor]]

    def __post_init__(self) -> None:
        self.params: list[torch.Tensor] = [*self.weights, *(b for b in self.biases if b is not None)]
        self.placement = [(p.device, p.dtype) for p in self.params]

    @property
    def needs_placement_check(self) -> bool:
        return True

    def placement_holds(self) -> bool:
        return all((p.device, p.dtype) == pl for p, pl in zip(self.params, self.placement))

    @abstractmethod
    def _run(self, lam: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The term's value and its gradient per parameter (new tensors, in ``params`` order)."""

    def evaluate(self, lam: float, *, reuse: bool = True) -> Evaluation:
        value, grads = self._run(lam)
        return Evaluation(value, list(grads), list(grads))

    def add_to_grads(self, lam: float, scale: float) -> torch.Tensor:
        value, grads = self._run(lam)
        for p, g in zip(self.params, grads):
            if not p.requires_grad:
                continue
            if scale != 1.0:
                g.mul_(scale)
            add_grad(p, g)
        return value


def add_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    """``param.grad`` becomes ``grad`` when absent, else ``grad`` is added to it (the one place the
    library writes ``.grad``; FSDP2 shards: :func:`ewc_rs._parallel.sharding.add_local_grads`)."""
    if param.grad is None:
        param.grad = grad
    else:  # also a .grad of another dtype or layout
        param.grad.add_(grad)


def check_factor(where: str, what: str, f: Any) -> torch.Tensor:
    """``f`` if it is a finite square matrix; else a ValueError naming ``where`` and ``what``."""
    if not isinstance(f, torch.Tensor) or f.dim() != 2 or f.shape[0] != f.shape[1]:
        raise ValueError(f"state: {where}: {what} must be a square matrix")
    if not torch.isfinite(f.float()).all():
        raise ValueError(f"state: {where}: {what} has non-finite values")
    return f


#: A second estimation pass: the diagonal Fisher of a stand-in model on the same data.
Rerun = Callable[[nn.Module], dict[str, torch.Tensor]]


class LayerBlock(Block):
    """A block kind for the layers that have a Kronecker form: what ``structure=`` gives them."""

    #: Whether :meth:`from_factors` runs a second pass over the data (the loader must be re-iterable).
    second_pass: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def from_factors(
        cls,
        model: nn.Module,
        factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        with_bias: frozenset[str],
        rerun: Rerun,
    ) -> LayerBlock:
        """The block of one task from the estimation's Kronecker factors.

        Args:
            model: the model just trained.
            factors: ``(A, G)`` per layer (float32, detached).
            with_bias: the layers whose bias is part of W̃.
            rerun: a second estimation pass, for kinds with :attr:`second_pass`.
        """

    @abstractmethod
    def estimate(self) -> dict[str, dict[str, tuple[torch.Tensor, ...]]]:
        """The block as ``EWC.consolidate`` returns it: ``{key: {layer: factors}}``."""
