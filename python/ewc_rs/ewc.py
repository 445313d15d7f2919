"""The ``EWC`` class: a facade over the consolidation (``_structures``: estimation, block kinds),
the stored tasks (``_state``), the penalty plan (``_penalty``), the normalisation-statistics
policy and the options; the maths lives in Rust.

Example::

    ewc = EWC(model, lam=100.0)
    train(model, task_a)
    ewc.consolidate(loader_a)                 # F and θ* of task A
    for x, y in loader_b:
        loss = F.cross_entropy(model(x), y) + ewc.penalty(model)
        loss.backward(); opt.step(); opt.zero_grad()

Penalty P(θ) = (λ/2) Σ_i F_i (θ_i − θ*_i)², gradient λ F_i (θ_i − θ*_i), value and gradient from
one fused pass in Rust; ``loss.backward()`` adds λF(θ−θ*) to each parameter's ``.grad``. A second
derivative of the penalty raises an error.

- ``mode="separate"`` (Kirkpatrick et al. 2017): one task (θ*_t and its curvature) per
  ``consolidate``, penalties summed over tasks.
- ``mode="online"`` (Schwarz et al. 2018): F ← γ F_old + F_new, θ* ← the latest weights.
- ``structure="kfac"`` (Ritter et al. 2018): Kronecker factors A ⊗ G per Linear/Conv layer instead of
  the diagonal; ``structure="ekfac"`` (George et al. 2018): their eigenbases with a corrected
  diagonal. ``structure=`` only assigns layers to block kinds (``_blocks``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any, Optional

import torch
from torch import nn

from . import _options as options
from ._blocks.fisher8 import check_bits
from ._fisher.options import DEFAULTS, parse_options
from ._norm_stats import NormStatsFreezer
from ._options import ParamSelector, check_choice, check_lam
from ._penalty.autograd import FusedPenalty
from ._penalty.plan import Plan, run_on_plan, zero_penalty
from ._state import persistence
from ._state.task import Task, add_task
from ._structures import check_structure, consolidate, task_from_fisher

__all__ = ["EWC", "ParamSelector", "check_choice", "check_lam"]


class EWC:
    """Elastic Weight Consolidation for an ordinary PyTorch training loop (example: the module's doc).

    Args:
        model: the model to protect; its parameter names identify the state.
        lam: λ ≥ 0, the penalty's strength.
        mode: ``"separate"`` or ``"online"``.
        gamma: decay γ in [0, 1] of the old Fisher in online mode.
        params: what to protect: None (all that require grad), a list of names, a regex (``re.search``
            on the name) or a predicate ``(name, parameter) -> bool``; e.g. all but a task head.
        norm_stats: ``"freeze"`` (default; after a consolidation, normalisation layers with running
            statistics run in eval mode) or ``"update"`` (they follow ``model.train()``).
        storage_dtype: ``torch.float32`` (default) or ``torch.bfloat16`` for the curvature and θ*: half the memory,
            each value off by up to 2⁻⁸ (≈0.4%) of its magnitude (``tests/facade/test_ewc.py``).
        structure: ``"diag"`` (default), ``"kfac"`` (Kronecker factors) or ``"ekfac"`` (eigenvalue-corrected).
        fisher_bits: None (default: the diagonal F in ``storage_dtype``) or 8: the diagonal F (also KFAC's diagonal
            rest) in 8 bits, a log code with a scale pair per 64 values (1.125 bytes a parameter) read by the fused
            penalty; θ* in ``storage_dtype``; online folding in float32 (errors: ``benchmarks/fisher8_codes.py``).
            Not for FSDP2-sharded parameters.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``; ``params`` is none of the forms above.
        ValueError: ``lam`` negative or not finite, ``gamma`` outside [0, 1], an unknown ``mode``,
            ``norm_stats``, ``structure``, ``storage_dtype`` or ``fisher_bits``, a ``params`` selection that
            matches no parameter requiring grad.

    Examples:
        ```python
        import torch
        import torch.nn.functional as F
        from torch import nn
        from ewc_rs import EWC

        model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        task_a = [(torch.randn(32, 4), torch.randint(0, 3, (32,)))]
        task_b = [(torch.randn(32, 4), torch.randint(0, 3, (32,)))]

        ewc = EWC(model, lam=100.0)
        ewc.consolidate(task_a)  # after training on task A: F and θ* of task A
        for x, y in task_b * 5:  # task B, penalised for moving what mattered to A
            loss = F.cross_entropy(model(x), y) + ewc.penalty(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert ewc.num_tasks == 1 and ewc.penalty(model).item() > 0
        ```
    """

    def __init__(
        self,
        model: nn.Module,
        lam: float,
        *,
        mode: str = "separate",
        gamma: float = 1.0,
        params: ParamSelector = None,
        norm_stats: str = "freeze",
        storage_dtype: Optional[torch.dtype] = None,
        structure: str = "diag",
        fisher_bits: Optional[int] = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self.lam = options.check_lam(lam)
        self.mode = options.check_choice("mode", mode, options.MODES)
        self.gamma = options.check_gamma(gamma)
        policy = options.check_choice("norm_stats", norm_stats, options.NORM_STATS)
        self.storage_dtype = options.check_storage(storage_dtype)
        self.fisher_bits = check_bits(fisher_bits)
        self._selector = options.make_selector(params)
        self.structure = check_structure(structure, model, self._selector)  # "kfac": says which layers stay diagonal
        self._model = model
        self._tasks: list[Task] = []  # oldest first; at most one in online mode
        self._cached_plan: Optional[Plan] = None
        self._norm_stats = NormStatsFreezer(model, policy, stacklevel=2)  # warns at our caller

    @property
    def norm_stats(self) -> str:
        """The normalisation-statistics policy, ``"freeze"`` or ``"update"``."""
        return self._norm_stats.policy

    @property
    def model(self) -> nn.Module:
        """The model given at construction (the one ``penalty()`` reads by default)."""
        return self._model

    def consolidate(
        self, loader: Iterable[Any], *, kind: str = DEFAULTS.kind, damping: float = 0.0, **fisher_options: Any
    ) -> dict[str, Any]:
        """Estimates the curvature on ``loader`` for the current weights and stores it with θ*.

        Args:
            loader: iterable of ``(inputs, targets)`` batches of the task just learned.
            kind: Fisher kind (``"exact"``, ``"mc"``, ``"empirical"``, ``"batched"``).
            damping: ``structure="kfac"``: d ≥ 0, this task's factors stored as (A + √d I) ⊗ (G + √d I)
                (Ritter et al. 2018's prior precision); the returned estimate is undamped.
            **fisher_options: for :func:`ewc_rs.fisher_diag` (likelihood, progress, group, ...), every structure.

        Returns:
            The estimate: ``{name: F}``; kfac ``{"kron": {layer: (A, G)}, "diag": ...}``, ekfac ``{"ekfac": ...}``.

        Raises:
            TypeError: an unknown option.
            ValueError: a bad ``damping`` (negative, or a structure other than ``"kfac"``); as
                :func:`ewc_rs.fisher_diag` (nothing is stored then).

        Examples:
            ```python
            import torch
            from torch import nn
            from ewc_rs import EWC

            model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
            loader = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
            fisher = EWC(model, lam=100.0).consolidate(loader, kind="exact")
            assert set(fisher) == {"0.weight", "0.bias", "2.weight", "2.bias"}

            kfac = EWC(model, lam=100.0, structure="kfac").consolidate(loader, damping=1e-3)
            A, G = kfac["kron"]["2"]  # the last layer: 8 inputs and a bias, 3 outputs
            assert A.shape == (9, 9) and G.shape == (3, 3)
            ```
        """
        opts = parse_options(kind, **fisher_options, where="consolidate")
        keep = options.selected_parameters(self._model, self._selector)
        new, est = consolidate(self._model, keep, loader, self.structure, self.storage_dtype, opts, damping=damping)
        self._add(new)
        return est

    def consolidate_from(
        self, fisher: Mapping[str, Any], *, theta_star: Optional[Mapping[str, Any]] = None, damping: float = 0.0
    ) -> None:
        """Adds a task from a precomputed Fisher (e.g. :func:`ewc_rs.load_fisher`) as ``consolidate`` would.

        Args:
            fisher: ``{name: F}`` for every protected parameter (``params=``; others are ignored), or with
                ``structure="kfac"`` :func:`ewc_rs.fisher_kfac`'s ``{"kron": ..., "diag": ...}``.
            theta_star: θ* by name (default: the model's current weights).
            damping: as for :meth:`consolidate` (``structure="kfac"``), added to the given factors.

        Raises:
            ValueError: a protected parameter without F or θ*, of another shape, negative or non-finite F, bad damping.

        Examples:
            ```python
            import torch
            from torch import nn
            from ewc_rs import EWC, fisher_diag

            model = nn.Linear(4, 3)
            fisher = fisher_diag(model, [(torch.randn(16, 4), torch.randint(0, 3, (16,)))], kind="exact")
            theta_star = {name: p.detach().clone() for name, p in model.named_parameters()}
            with torch.no_grad():
                model.weight.add_(0.1)  # the weights moved on since F and θ* were taken
            ewc = EWC(model, lam=100.0)
            ewc.consolidate_from(fisher, theta_star=theta_star)
            assert ewc.num_tasks == 1 and ewc.penalty(model).item() > 0
            ```
        """
        keep = options.selected_parameters(self._model, self._selector)
        task = task_from_fisher(
            self._model, keep, fisher, theta_star, self.structure, self.storage_dtype, damping=damping
        )
        self._add(task)

    def _add(self, new: Task) -> None:
        online = self.mode == "online"
        self._tasks = add_task(self._tasks, new, online=online, gamma=self.gamma, fisher_bits=self.fisher_bits)
        self._cached_plan = None
        self._norm_stats.install()

    @property
    def num_tasks(self) -> int:
        """Number of stored tasks (always ≤ 1 in online mode)."""
        return len(self._tasks)

    def penalty(self, model: Optional[nn.Module] = None) -> torch.Tensor:
        """The EWC penalty (λ/2) Σ_t Σ_i F_t,i (θ_i − θ*_t,i)² as a scalar tensor.

        Connected to autograd: ``loss.backward()`` adds λ Σ_t F_t (θ − θ*_t) to ``.grad``. Zero
        before any ``consolidate``. Parameters added after the last consolidation carry no penalty.

        Args:
            model: the model being trained (defaults to the one given at construction).

        Returns:
            A 0-d float32 tensor on the parameters' device.

        Raises:
            ValueError: a consolidated parameter is missing from ``model`` or changed shape.

        Examples:
            ```python
            import torch
            from torch import nn
            from ewc_rs import EWC

            model = nn.Linear(4, 3)
            ewc = EWC(model, lam=100.0)
            fisher = ewc.consolidate([(torch.randn(16, 4), torch.randint(0, 3, (16,)))], kind="exact")
            assert ewc.penalty(model).item() == 0.0  # θ = θ*
            with torch.no_grad():
                model.weight.add_(0.1)
            expected = 0.5 * 100.0 * (fisher["weight"] * 0.1**2).sum()
            assert torch.allclose(ewc.penalty(model), expected, rtol=1e-4)
            ```
        """
        model = self._model if model is None else model
        if not self._tasks:
            return zero_penalty(model)
        plan, evaluation = run_on_plan(functools.partial(self._plan, model), lambda p: p.evaluate(self.lam))
        return FusedPenalty.run(evaluation, plan, self.lam, *plan.params)

    __call__ = penalty

    def backward(self, model: Optional[nn.Module] = None, *, grad_scale: float = 1.0) -> torch.Tensor:
        """Adds the penalty's gradient λ Σ_t F_t (θ − θ*_t) to ``.grad`` directly, without autograd.

        After ``loss.backward()``: ``ewc.penalty(model).backward()``'s gradient minus autograd's µs per tensor
        (``benchmarks/bench_penalty.py``). Creates absent ``.grad``; skips ``requires_grad=False``.

        Args:
            model: the model being trained (defaults to the one given at construction).
            grad_scale: multiplies the added gradient (not the returned value), e.g.
                ``scaler.get_scale()`` when the loss was scaled by a ``torch.amp.GradScaler``.

        Returns:
            The penalty's value, a detached 0-d float32 tensor (for logging).

        Raises:
            ValueError: a consolidated parameter is missing from ``model`` or changed shape; bad ``grad_scale``.

        Examples:
            ```python
            import torch
            from torch import nn
            from ewc_rs import EWC

            model = nn.Linear(4, 3)
            ewc = EWC(model, lam=100.0)
            fisher = ewc.consolidate([(torch.randn(16, 4), torch.randint(0, 3, (16,)))], kind="exact")
            with torch.no_grad():
                model.weight.add_(0.1)
            model.zero_grad()  # in training: after loss.backward(), before opt.step()
            value = ewc.backward(model)
            assert torch.allclose(model.weight.grad, 100.0 * fisher["weight"] * 0.1, rtol=1e-4)
            assert torch.allclose(value, ewc.penalty(model))
            ```
        """
        scale = options.check_grad_scale(grad_scale)
        model = self._model if model is None else model
        if not self._tasks:
            return zero_penalty(model)
        with torch.no_grad():
            return run_on_plan(functools.partial(self._plan, model), lambda p: p.add_to_grads(self.lam, scale))[1]

    def _plan(self, model: nn.Module, fresh: bool = False) -> Plan:
        """The cached plan, rebuilt when asked, or when the state, the parameter objects or their placement change."""
        self._cached_plan = Plan.current(self._cached_plan, model, self._tasks, self.storage_dtype, fresh=fresh)
        return self._cached_plan

    def release_norm_stats(self) -> None:
        """Removes the ``norm_stats="freeze"`` hooks: normalisation layers follow ``train()`` again.

        Until the next consolidation, which installs them again.

        Examples:
            ```python
            import torch
            from torch import nn
            from ewc_rs import EWC

            model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
            ewc = EWC(model, lam=100.0)
            ewc.consolidate([(torch.randn(16, 4), torch.randint(0, 3, (16,)))])
            statistics = model[1].running_mean.clone()
            model.train()(torch.randn(16, 4))
            assert torch.equal(model[1].running_mean, statistics)  # frozen after a consolidation
            ewc.release_norm_stats()
            model(torch.randn(16, 4))
            assert not torch.equal(model[1].running_mean, statistics)  # updated again in train mode
            ```
        """
        self._norm_stats.release()

    def to(self, *args: Any, **kwargs: Any) -> EWC:
        """Moves the stored curvature and θ* ahead of time to a device given as for ``Tensor.to``.

        ``penalty`` moves them to the parameters' device anyway, on first use; this does it now.

        Args:
            *args: a device, as ``Tensor.to`` takes it (a dtype given too is ignored).
            **kwargs: ``device=``, as ``Tensor.to`` takes it.

        Returns:
            This ``EWC``.

        Raises:
            RuntimeError: an unknown device, or one this machine lacks (as ``Tensor.to``).

        Examples:
            ```python
            import torch
            from torch import nn
            from ewc_rs import EWC

            model = nn.Linear(4, 3)
            ewc = EWC(model, lam=100.0)
            ewc.consolidate([(torch.randn(16, 4), torch.randint(0, 3, (16,)))])
            device = "cuda" if torch.cuda.is_available() else "cpu"
            assert ewc.to(device) is ewc and ewc.penalty(model.to(device)).item() == 0.0
            ```
        """
        device = torch.empty(0).to(*args, **kwargs).device
        self._tasks, self._cached_plan = [task.to(device) for task in self._tasks], None
        return self

    def state_dict(self) -> dict[str, Any]:
        """Config and stored tasks (``torch.save``-able; format: ``ewc_rs._state.persistence``).

        Returns:
            A dict of plain values and tensors, for :meth:`load_state_dict` (FSDP2: DTensors, for
            ``ewc_rs.checkpoint``).

        Examples:
            ```python
            import io

            import torch
            from torch import nn
            from ewc_rs import EWC

            model = nn.Linear(4, 3)
            ewc = EWC(model, lam=100.0)
            ewc.consolidate([(torch.randn(16, 4), torch.randint(0, 3, (16,)))])
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "ewc": ewc.state_dict()}, buffer)
            assert ewc.state_dict()["lam"] == 100.0
            ```
        """
        return persistence.to_state_dict(self._state())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a ``state_dict()``. Validates everything first: on error nothing changes.

        Args:
            state: a dict from :meth:`state_dict` (possibly through ``torch.save``/``torch.load``).

        Raises:
            ValueError: a malformed state (``ewc_rs._state.persistence.from_state_dict``), or a stored
                parameter that the model lacks or holds with another shape.

        Examples:
            ```python
            import io

            import torch
            from torch import nn
            from ewc_rs import EWC

            model = nn.Linear(4, 3)
            ewc = EWC(model, lam=100.0, mode="online", gamma=0.9)
            ewc.consolidate([(torch.randn(16, 4), torch.randint(0, 3, (16,)))])
            buffer = io.BytesIO()
            torch.save(ewc.state_dict(), buffer)
            buffer.seek(0)
            restored = EWC(model, lam=1.0)
            restored.load_state_dict(torch.load(buffer))
            assert (restored.lam, restored.mode, restored.gamma, restored.num_tasks) == (100.0, "online", 0.9, 1)
            ```
        """
        loaded = persistence.from_state_dict(state, self._model)
        self.lam, self.mode, self.gamma, self.fisher_bits = loaded.lam, loaded.mode, loaded.gamma, loaded.fisher_bits
        self.storage_dtype, self.structure = loaded.storage_dtype, loaded.structure
        self._norm_stats.set_policy(loaded.norm_stats)
        self._tasks, self._cached_plan = loaded.tasks, None
        if self._tasks:
            self._norm_stats.install()

    def save(self, path: str) -> None:
        """Writes the state to a safetensors file ``path`` (FSDP2: every rank calls this; rank 0 writes).

        Args:
            path: the file to write (its folder must exist).

        Raises:
            safetensors.SafetensorError: ``path`` cannot be written (a folder, or in a missing folder).

        Examples:
            ```python
            import os
            import tempfile

            import torch
            from torch import nn
            from ewc_rs import EWC

            model = nn.Linear(4, 3)
            ewc = EWC(model, lam=100.0)
            ewc.consolidate([(torch.randn(16, 4), torch.randint(0, 3, (16,)))])
            with tempfile.TemporaryDirectory() as folder:
                ewc.save(os.path.join(folder, "ewc.safetensors"))
                assert os.listdir(folder) == ["ewc.safetensors"]
            ```
        """
        persistence.write_file(self._state(), path)

    @classmethod
    def load(cls, path: str, model: nn.Module, *, params: ParamSelector = None) -> EWC:
        """Reads a file from :meth:`save`, binds it to ``model`` and checks it as :meth:`load_state_dict` does.

        Args:
            path: a safetensors file from :meth:`save`.
            model: the model to protect (stored tensors move to its device).
            params: parameter selection for later consolidations.

        Returns:
            A new ``EWC``.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: not a file from :meth:`save`, or a stored parameter that ``model`` lacks or holds
                with another shape.

        Examples:
            ```python
            import os
            import tempfile

            import torch
            from torch import nn
            from ewc_rs import EWC

            model = nn.Linear(4, 3)
            ewc = EWC(model, lam=100.0, storage_dtype=torch.bfloat16)
            ewc.consolidate([(torch.randn(16, 4), torch.randint(0, 3, (16,)))])
            with tempfile.TemporaryDirectory() as folder:
                ewc.save(os.path.join(folder, "ewc.safetensors"))
                loaded = EWC.load(os.path.join(folder, "ewc.safetensors"), model)
            assert loaded.num_tasks == 1 and loaded.lam == 100.0 and loaded.storage_dtype == torch.bfloat16
            ```
        """
        state = persistence.read_file(path)
        ewc = cls(model, state["lam"], mode=state["mode"], gamma=state["gamma"], params=params)
        ewc.load_state_dict(state)
        return ewc.to(next(model.parameters()).device) if list(model.parameters()) else ewc

    def _state(self) -> persistence.EWCState:
        config = (self.lam, self.mode, self.gamma, self.norm_stats, self.storage_dtype, list(self._tasks))
        return persistence.EWCState(*config, structure=self.structure, fisher_bits=self.fisher_bits)

    def __repr__(self) -> str:
        config = f"lam={self.lam}, mode={self.mode!r}, gamma={self.gamma}, tasks={self.num_tasks}, norm_stats="
        return f"EWC({config}{self.norm_stats!r}, storage_dtype={self.storage_dtype}, fisher_bits={self.fisher_bits})"
