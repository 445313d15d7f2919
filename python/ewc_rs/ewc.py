"""The ``EWC`` class: state (Fisher and anchor weights per task) lives here, maths lives in Rust.

Penalty P(θ) = (λ/2) Σ_i F_i (θ_i − θ*_i)², gradient λ F_i (θ_i − θ*_i).

- ``mode="separate"`` (Kirkpatrick et al. 2017): one (F_t, θ*_t) pair per ``consolidate``,
  penalties summed over tasks.
- ``mode="online"`` (Schwarz et al. 2018): F ← γ F_old + F_new, θ* ← the latest weights.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from typing import Any, Callable, Iterable, Optional, Pattern, Sequence, Union

import torch
from torch import nn

from .fisher import fisher_diag
from .penalty import FlatGroup, FusedPenalty, PenaltyPlan

#: What ``params=`` accepts: names, a regex (matched with ``re.search``), or a predicate.
ParamSelector = Union[None, Sequence[str], str, Pattern[str], Callable[[str, nn.Parameter], bool]]

MODES = ("separate", "online")
NORM_STATS = ("freeze", "update")
_STATE_VERSION = 1


def _check_lam(lam: Any) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam: expected a finite number >= 0, got {lam!r}")
    return float(lam)


def _check_gamma(gamma: Any) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (0.0 <= gamma <= 1.0):
        raise ValueError(f"gamma: expected a number in [0, 1], got {gamma!r}")
    return float(gamma)


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}; got {value!r}")
    return str(value)


def _check_storage(dtype: Any) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"storage_dtype: expected None, torch.float32 or torch.bfloat16, got {dtype!r}")
    return dtype


def _norm_layers(model: nn.Module) -> list[nn.Module]:
    """Normalisation layers that track running statistics (BatchNorm*, InstanceNorm with stats)."""
    from torch.nn.modules.batchnorm import _NormBase

    return [m for m in model.modules() if isinstance(m, _NormBase) and m.track_running_stats]


class EWC:
    """Elastic Weight Consolidation for an ordinary PyTorch training loop.

    Example::

        ewc = EWC(model, lam=100.0)
        train(model, task_a)
        ewc.consolidate(loader_a)                 # F and θ* of task A
        for x, y in loader_b:
            loss = F.cross_entropy(model(x), y) + ewc.penalty(model)
            loss.backward(); opt.step(); opt.zero_grad()

    The penalty is computed by one fused pass in Rust; ``loss.backward()`` adds λF(θ−θ*) to each
    parameter's ``.grad``. A second derivative of the penalty raises an error.

    BatchNorm statistics (``norm_stats``): EWC protects parameters, not buffers. With the default
    ``"freeze"``, after the first ``consolidate`` every normalisation layer that tracks running
    statistics runs in eval mode during its forward pass, whatever ``model.train()`` says: a
    forward pre-hook switches the layer to eval and a forward hook switches it back, so
    ``module.training`` reads as you set it outside the call. Running statistics therefore stay
    those of the consolidated tasks. ``"update"`` leaves them to ``model.train()`` (and warns once
    when the model has such layers: measured on the seed's model, MNIST accuracy after the second
    task falls from ≈0.92 to ≈0.58 when they keep updating).

    Args:
        model: the model to protect; its parameter names identify the state.
        lam: λ ≥ 0, the penalty's strength.
        mode: ``"separate"`` or ``"online"``.
        gamma: decay γ in [0, 1] of the old Fisher in online mode.
        params: which parameters to protect: None (all that require grad), a list of names, a regex
            (``re.search`` on the name) or a predicate ``(name, parameter) -> bool``. Use it to
            leave out a task head.
        norm_stats: ``"freeze"`` (default) or ``"update"``.
        storage_dtype: ``torch.float32`` (default) or ``torch.bfloat16`` for F and θ*, halving
            their memory. Cost: bfloat16 keeps 8 significant bits, so each stored θ*_i and F_i
            is off by up to 2⁻⁸ of its magnitude (≈0.4%, round to nearest); the penalty then
            measures θ − θ* against a rounded anchor, an error of up to 2⁻⁸|θ*| per weight, which
            matters when the weights have moved less than that. Measured in ``tests/test_ewc.py``.
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
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self.lam = _check_lam(lam)
        self.mode = _check_choice("mode", mode, MODES)
        self.gamma = _check_gamma(gamma)
        self.norm_stats = _check_choice("norm_stats", norm_stats, NORM_STATS)
        self.storage_dtype = _check_storage(storage_dtype)
        self._selector = self._make_selector(params)
        self._model = model
        #: One dict per stored task: {"fisher": {name: F}, "star": {name: θ*}}.
        self._pairs: list[dict[str, dict[str, torch.Tensor]]] = []
        self._compiled: Optional[PenaltyPlan] = None
        self._frozen_layers: list[nn.Module] = []
        self._hooks: list[Any] = []
        if self.norm_stats == "update" and _norm_layers(model):
            warnings.warn(
                "EWC(norm_stats='update'): the model has normalisation layers with running "
                "statistics; EWC protects parameters, not these buffers, so they will drift to the "
                "new task's statistics and old tasks can be forgotten anyway. Use "
                "norm_stats='freeze' (the default) unless this is what you want.",
                UserWarning,
                stacklevel=2,
            )

    # ----------------------------------------------------------------- selection
    @staticmethod
    def _make_selector(params: ParamSelector) -> Callable[[str, nn.Parameter], bool]:
        if params is None:
            return lambda name, p: True
        if isinstance(params, (str, re.Pattern)):
            pattern = re.compile(params)
            return lambda name, p: pattern.search(name) is not None
        if callable(params):
            return params  # type: ignore[return-value]
        if isinstance(params, Iterable):
            names = set(params)
            if not all(isinstance(n, str) for n in names):
                raise TypeError("params: a list of parameter names must hold strings only")
            return lambda name, p: name in names
        raise TypeError(f"params: expected None, names, a regex or a predicate, got {type(params).__name__}")

    def _selected(self, model: nn.Module) -> dict[str, nn.Parameter]:
        chosen = {n: p for n, p in model.named_parameters() if p.requires_grad and self._selector(n, p)}
        if not chosen:
            raise ValueError("params: the selection matches no parameter of the model that requires grad")
        return chosen

    # ----------------------------------------------------------------- consolidation
    def consolidate(self, loader: Iterable[Any], *, kind: str = "exact", **fisher_options: Any) -> dict[str, torch.Tensor]:
        """Estimates F on ``loader`` for the current weights and stores (F, θ*).

        Args:
            loader: iterable of ``(inputs, targets)`` batches of the task just learned.
            kind: Fisher kind (``"exact"``, ``"mc"``, ``"empirical"``, ``"batched"``).
            **fisher_options: forwarded to :func:`ewc_rs.fisher_diag` (``likelihood``,
                ``mc_samples``, ``num_samples``, ``progress``, ``generator``).

        Returns:
            The new task's Fisher ``{name: F}`` (float32), as estimated.
        """
        chosen = self._selected(self._model)
        # detach: F is a constant of the penalty (and must not keep an autograd graph alive)
        full = {n: f.detach() for n, f in fisher_diag(self._model, loader, kind=kind, **fisher_options).items()}
        fisher = {n: full[n].to(self.storage_dtype) for n in chosen}
        star = {n: p.detach().to(self.storage_dtype, copy=True) for n, p in chosen.items()}
        if self.mode == "online" and self._pairs:
            old = self._pairs[0]
            for n, f in fisher.items():
                if n in old["fisher"] and old["fisher"][n].shape == f.shape:
                    fisher[n] = (self.gamma * old["fisher"][n].to(f.device, torch.float32) + f.float()).to(self.storage_dtype)
            self._pairs = [{"fisher": fisher, "star": star}]
        else:
            self._pairs.append({"fisher": fisher, "star": star})
        self._compiled = None
        self._freeze_norm_stats()
        return {n: full[n] for n in chosen}

    @property
    def num_tasks(self) -> int:
        """Number of stored (F, θ*) pairs (always ≤ 1 in online mode)."""
        return len(self._pairs)

    # ----------------------------------------------------------------- penalty
    def penalty(self, model: Optional[nn.Module] = None) -> torch.Tensor:
        """The EWC penalty (λ/2) Σ_t Σ_i F_t,i (θ_i − θ*_t,i)² as a scalar tensor.

        Connected to autograd: ``loss.backward()`` adds λ Σ_t F_t (θ − θ*_t) to ``.grad``.
        Before any ``consolidate`` it returns a zero scalar. Parameters added after the last
        consolidation (a new head) carry no penalty.

        Args:
            model: the model being trained (defaults to the one given at construction).

        Returns:
            A 0-d float32 tensor on the parameters' device.

        Raises:
            ValueError: a consolidated parameter is missing from ``model`` or changed shape.
        """
        model = self._model if model is None else model
        if not self._pairs:
            return _zero_like_parameters(model)
        plan = self._compile(model)
        return FusedPenalty.run(plan.evaluate(self.lam), plan, self.lam, *plan.params)

    __call__ = penalty

    def backward(self, model: Optional[nn.Module] = None, *, grad_scale: float = 1.0) -> torch.Tensor:
        """Adds the penalty's gradient λ Σ_t F_t (θ − θ*_t) to ``.grad`` directly, without autograd.

        The same gradient as ``ewc.penalty(model).backward()``, computed and added in one fused
        pass (on CPU straight into the ``.grad`` memory). Use it after ``loss.backward()`` when
        the penalty's own autograd bookkeeping costs more than its arithmetic: PyTorch's engine
        spends a few µs per parameter tensor, which dominates for models with hundreds of small
        tensors (see ``benchmarks/bench_penalty.py``)::

            loss = F.cross_entropy(model(x), y)
            loss.backward()
            ewc.backward(model)        # instead of adding ewc.penalty(model) to the loss
            opt.step()

        ``.grad`` is created where absent; parameters with ``requires_grad=False`` are left
        alone. Before any ``consolidate`` nothing is added.

        Args:
            model: the model being trained (defaults to the one given at construction).
            grad_scale: multiplies the added gradient (not the returned value), e.g.
                ``scaler.get_scale()`` when the loss was scaled by a ``torch.amp.GradScaler``.

        Returns:
            The penalty's value, a detached 0-d float32 tensor (for logging).

        Raises:
            ValueError: a consolidated parameter is missing from ``model`` or changed shape, or
                ``grad_scale`` is not a finite number.
        """
        if isinstance(grad_scale, bool) or not isinstance(grad_scale, (int, float)) or not math.isfinite(grad_scale):
            raise ValueError(f"grad_scale: expected a finite number, got {grad_scale!r}")
        model = self._model if model is None else model
        if not self._pairs:
            return _zero_like_parameters(model)
        with torch.no_grad():
            return self._compile(model).accumulate(self.lam, float(grad_scale))

    def _compile(self, model: nn.Module) -> PenaltyPlan:
        """The penalty plan for ``model``: cached, rebuilt when the state, the model's parameter
        objects or their placement change.

        All stored tasks are folded into one quadratic per weight:
        Σ_t F_t (θ − θ*_t)² = F (θ − m)² + c with F = Σ_t F_t, m = Σ_t F_t θ*_t / F and
        c = Σ_t F_t θ*_t² − F m² (≥ 0, summed in float64), so the penalty is one pass whatever the
        number of tasks.
        """
        plan = self._compiled
        if plan is not None and plan.matches(model):
            return plan
        named = dict(model.named_parameters())
        names = sorted({n for pair in self._pairs for n in pair["fisher"]})
        for n in names:
            if n not in named:
                raise ValueError(f"model: parameter '{n}' was consolidated but the model has no such parameter")
            for pair in self._pairs:
                if n in pair["fisher"] and pair["fisher"][n].shape != named[n].shape:
                    raise ValueError(
                        f"model: parameter '{n}' has shape {tuple(named[n].shape)} but was consolidated "
                        f"with shape {tuple(pair['fisher'][n].shape)}"
                    )
        params: list[torch.Tensor] = [named[n] for n in names]
        by_group: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(params):
            by_group.setdefault((p.device, p.dtype), []).append(i)
        groups, const = [], 0.0
        for (device, dtype), index in by_group.items():
            stars, fishers = [], []
            for i in index:
                n = names[i]
                terms = [(pair["fisher"][n].to(device, torch.float64), pair["star"][n].to(device, torch.float64))
                         for pair in self._pairs if n in pair["fisher"]]
                f_tot = torch.stack([f for f, _ in terms]).sum(0)
                fs_tot = torch.stack([f * s for f, s in terms]).sum(0)
                m = torch.where(f_tot > 0, fs_tot / f_tot.clamp_min(1e-300), terms[-1][1])
                const += float(sum(float((f * s * s).sum()) for f, s in terms) - float((f_tot * m * m).sum()))
                stars.append(m.reshape(-1))
                fishers.append(f_tot.reshape(-1))
            groups.append(FlatGroup(
                index=index,
                params=[params[i] for i in index],
                device=device,
                dtype=dtype,
                star=torch.cat(stars).to(self.storage_dtype),
                fisher=torch.cat(fishers).to(self.storage_dtype),
            ))
        plan = PenaltyPlan(model, names, params, groups, max(const, 0.0))
        self._compiled = plan
        return plan

    # ----------------------------------------------------------------- norm statistics
    def _freeze_norm_stats(self) -> None:
        if self.norm_stats != "freeze" or self._hooks:
            return
        for layer in _norm_layers(self._model):
            self._hooks.append(layer.register_forward_pre_hook(_enter_eval))
            self._hooks.append(layer.register_forward_hook(_leave_eval, always_call=True))
            self._frozen_layers.append(layer)

    def release_norm_stats(self) -> None:
        """Removes the ``norm_stats="freeze"`` hooks: normalisation layers follow ``train()`` again."""
        for h in self._hooks:
            h.remove()
        self._hooks, self._frozen_layers = [], []

    # ----------------------------------------------------------------- placement
    def to(self, *args: Any, **kwargs: Any) -> "EWC":
        """Moves the stored F and θ* (like ``Tensor.to``; the storage dtype is kept). Returns self.

        Not required after ``model.to(...)``: the penalty follows the parameters' device on its
        own; this only moves the stored copies ahead of time.

        Args:
            *args, **kwargs: a device, as for ``Tensor.to`` (a dtype is ignored: F and θ* keep
                ``storage_dtype``).

        Returns:
            This ``EWC`` object.
        """
        device = torch.empty(0).to(*args, **kwargs).device
        self._pairs = [{k: {n: t.to(device) for n, t in d.items()} for k, d in pair.items()} for pair in self._pairs]
        self._compiled = None
        return self

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to restore this object: config and the stored (F, θ*) pairs.

        Returns:
            A dict of plain Python values and tensors (``torch.save``-able).
        """
        return {
            "version": _STATE_VERSION,
            "lam": self.lam,
            "mode": self.mode,
            "gamma": self.gamma,
            "norm_stats": self.norm_stats,
            "storage_dtype": str(self.storage_dtype).replace("torch.", ""),
            "pairs": [{k: dict(d) for k, d in pair.items()} for pair in self._pairs],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a ``state_dict()``. Validates everything first: on error nothing changes.

        Args:
            state: a dict from :meth:`state_dict` (possibly through ``torch.save``/``torch.load``).

        Raises:
            ValueError: wrong version, bad config values, a pair without matching F/θ* tensors,
                non-finite F or θ*, negative F.
        """
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError(f"state: expected an EWC state dict of version {_STATE_VERSION}")
        lam = _check_lam(state.get("lam"))
        mode = _check_choice("mode", state.get("mode"), MODES)
        gamma = _check_gamma(state.get("gamma"))
        norm_stats = _check_choice("norm_stats", state.get("norm_stats"), NORM_STATS)
        dtype_name = state.get("storage_dtype")
        if dtype_name not in ("float32", "bfloat16"):
            raise ValueError(f"state: storage_dtype must be 'float32' or 'bfloat16', got {dtype_name!r}")
        storage = getattr(torch, dtype_name)
        pairs = state.get("pairs")
        if not isinstance(pairs, list) or (mode == "online" and len(pairs) > 1):
            raise ValueError("state: 'pairs' must be a list (at most one pair in online mode)")
        clean = []
        for t, pair in enumerate(pairs):
            if not isinstance(pair, dict) or set(pair) != {"fisher", "star"}:
                raise ValueError(f"state: pair {t} must have exactly the keys 'fisher' and 'star'")
            fisher, star = pair["fisher"], pair["star"]
            if set(fisher) != set(star):
                raise ValueError(f"state: pair {t}: 'fisher' and 'star' name different parameters")
            for n in fisher:
                f, s = fisher[n], star[n]
                if not isinstance(f, torch.Tensor) or not isinstance(s, torch.Tensor) or f.shape != s.shape:
                    raise ValueError(f"state: pair {t}, parameter '{n}': F and θ* must be tensors of one shape")
                if not (torch.isfinite(f.float()).all() and torch.isfinite(s.float()).all()):
                    raise ValueError(f"state: pair {t}, parameter '{n}': F or θ* has non-finite values")
                if (f < 0).any():
                    raise ValueError(f"state: pair {t}, parameter '{n}': F has negative values")
            clean.append({"fisher": {n: v.detach().to(storage) for n, v in fisher.items()},
                          "star": {n: v.detach().to(storage) for n, v in star.items()}})
        self.lam, self.mode, self.gamma, self.storage_dtype = lam, mode, gamma, storage
        if norm_stats != self.norm_stats:
            self.release_norm_stats()
        self.norm_stats = norm_stats
        self._pairs = clean
        self._compiled = None
        if clean:
            self._freeze_norm_stats()

    def save(self, path: str) -> None:
        """Writes the state to a safetensors file.

        Args:
            path: file to write.
        """
        from safetensors.torch import save_file

        tensors, layout = {}, []
        for t, pair in enumerate(self._pairs):
            names = sorted(pair["fisher"])
            layout.append(names)
            for i, n in enumerate(names):
                tensors[f"{t}.fisher.{i}"] = pair["fisher"][n].detach().cpu().contiguous()
                tensors[f"{t}.star.{i}"] = pair["star"][n].detach().cpu().contiguous()
        state = self.state_dict()
        meta = {k: state[k] for k in ("version", "lam", "mode", "gamma", "norm_stats", "storage_dtype")}
        save_file(tensors, path, metadata={"ewc_rs": json.dumps({**meta, "layout": layout})})

    @classmethod
    def load(cls, path: str, model: nn.Module, *, params: ParamSelector = None) -> "EWC":
        """Reads a file written by :meth:`save` and binds it to ``model``.

        Args:
            path: a safetensors file from :meth:`save`.
            model: the model to protect (stored tensors move to its device).
            params: parameter selection for later consolidations.

        Returns:
            A new ``EWC``.
        """
        from safetensors import safe_open

        with safe_open(path, framework="pt") as fh:
            raw = (fh.metadata() or {}).get("ewc_rs")
            if raw is None:
                raise ValueError(f"path: {path} is not an ewc_rs file (no 'ewc_rs' metadata)")
            meta = json.loads(raw)
            pairs = []
            for t, names in enumerate(meta.pop("layout")):
                pairs.append({
                    "fisher": {n: fh.get_tensor(f"{t}.fisher.{i}") for i, n in enumerate(names)},
                    "star": {n: fh.get_tensor(f"{t}.star.{i}") for i, n in enumerate(names)},
                })
        ewc = cls(model, meta["lam"], mode=meta["mode"], gamma=meta["gamma"], params=params,
                  norm_stats="freeze", storage_dtype=None)
        ewc.load_state_dict({**meta, "pairs": pairs})
        first = next(model.parameters(), None)
        if first is not None:
            ewc.to(first.device)
        return ewc

    def __repr__(self) -> str:
        return (f"EWC(lam={self.lam}, mode={self.mode!r}, gamma={self.gamma}, tasks={self.num_tasks}, "
                f"norm_stats={self.norm_stats!r}, storage_dtype={self.storage_dtype})")


def _zero_like_parameters(model: nn.Module) -> torch.Tensor:
    """The penalty before any consolidation: a 0-d zero on the parameters' device."""
    first = next(model.parameters(), None)
    return torch.zeros((), device=first.device if first is not None else None)


def _enter_eval(module: nn.Module, args: Any) -> None:
    # A stack, not one saved flag: several EWC objects may freeze the same layer (e.g. a fresh EWC
    # given another's state), and their hooks nest; hooks run in order, so pops restore in LIFO.
    stack = module.__dict__.setdefault("_ewc_rs_training", [])
    stack.append(module.training)
    module.training = False


def _leave_eval(module: nn.Module, args: Any, output: Any) -> None:
    # Registered with always_call=True: runs even when the forward raises.
    stack = module.__dict__.get("_ewc_rs_training")
    if stack:
        module.training = stack.pop()
