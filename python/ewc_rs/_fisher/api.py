"""The public estimation entries, two faces of one: ``fisher_diag`` (the diagonal Fisher of every
parameter) and ``fisher_kfac`` (Kronecker factors where a layer has that form, the diagonal
elsewhere), both through :func:`estimate`.

Definitions (van de Ven 2025 names): per-sample log-likelihood ℓ_n(θ) = log p(y_n | x_n, θ);
diagonal Fisher F = (1/N) Σ_n (∇θ ℓ_n)², the mean of squared **per-sample** gradients.

Kronecker factors (KFAC; Martens & Grosse 2015, Ritter et al. 2018), ``fisher_kfac``: for a
layer with weight W and bias b, write its parameters as one matrix W̃ = [W, b] of shape
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

import dataclasses
from collections.abc import Iterable
from typing import Any, Optional, Union

import torch
from torch import nn

from .._parallel import collectives, sharding
from .._state.fisher_dict import FisherDict
from .batches import LikelihoodFn
from .estimation import Estimation, Result
from .options import DEFAULTS, KINDS, OPTION_NAMES, FisherOptions, parse_options
from .outputs import OutputsFn

__all__ = ["KINDS", "KfacFisher", "estimate", "fisher_diag", "fisher_kfac"]

#: ``{"kron": {module name: (A, G)}, "diag": {parameter name: F}}``.
KfacFisher = dict[str, dict[str, Any]]


def estimate(
    model: nn.Module,
    loader: Iterable[Any],
    options: FisherOptions,
    *,
    kronecker: bool = False,
    chosen: Optional[set[str]] = None,
) -> Result:
    """Runs one estimation: the diagonal Fisher, and with ``kronecker`` the factors of the layers
    that have a Kronecker form (and are in ``chosen``).

    Args:
        model: any module (DDP: its inner module; FSDP2: the full weights, gathered once).
        loader: iterable of ``(inputs, targets)``.
        options: checked options (their ``group`` resolved here).
        kronecker: whether layers get Kronecker factors.
        chosen: parameter names whose layers may get factors (None: all).

    Returns:
        The diagonal Fisher (FSDP2: DTensors sharded like the parameters), factors and sites.

    Raises:
        TypeError: ``model`` is not a module.
        ValueError: the options do not fit the model or data (see :func:`fisher_diag`); a sharded
            model without a process group, or with ``kronecker``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    model = sharding.unwrap(model)
    group = collectives.resolve_group(options.group)
    sharded_model = any(sharding.is_sharded(p) for _, p in sharding.named_parameters(model))
    if sharded_model and group is None:
        raise ValueError("group: the model has sharded (DTensor) parameters but no process group is initialised")
    if sharded_model and kronecker:
        raise ValueError("model: Kronecker factors need whole weights; an FSDP2-sharded model takes structure='diag'")
    generator = options.generator
    if options.kind == "mc" and generator is None and group is not None:
        generator = collectives.rank_generator(group, next(model.parameters(), torch.empty(0)).device)
    options = dataclasses.replace(options, generator=generator, group=group)
    with sharding.full_weights(model) as sharded:
        result = Estimation(model, options, group, kronecker=kronecker, chosen=chosen).run(loader)
    result.diag = {n: sharding.shard_like(f, sharded[n]) if n in sharded else f for n, f in result.diag.items()}
    return result


def _parsed(where: str, given: dict[str, Any]) -> FisherOptions:
    """The options among a public entry's arguments (``locals()``), checked."""
    return parse_options(given["kind"], where=where, **{k: given[k] for k in OPTION_NAMES})


def fisher_diag(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    kind: str = DEFAULTS.kind,
    likelihood: Union[str, LikelihoodFn] = DEFAULTS.likelihood,
    mc_samples: int = DEFAULTS.mc_samples,
    num_samples: Optional[int] = DEFAULTS.num_samples,
    progress: bool = DEFAULTS.progress,
    generator: Optional[torch.Generator] = DEFAULTS.generator,
    class_dim: int = DEFAULTS.class_dim,
    ignore_index: int = DEFAULTS.ignore_index,
    outputs: Optional[OutputsFn] = DEFAULTS.pick,
    group: collectives.Group = DEFAULTS.group,
) -> dict[str, torch.Tensor]:
    """Estimates the diagonal Fisher information of ``model`` on the data in ``loader``.

    F = (1/N) Σ_n (∇θ log p(y_n | x_n, θ))², the mean of squared per-sample gradients, with
    y_n chosen by ``kind``:

    - ``"exact"``: the expectation over the model's predictive distribution,
      F = (1/N) Σ_n Σ_c p(c|x_n) (∇ log p(c|x_n))² (one backward pass per class; with several
      positions per sample, per (position, class) pair, refused beyond 1024 pairs).
    - ``"mc"``: y_n sampled from p(·|x_n), averaged over ``mc_samples`` draws.
    - ``"empirical"``: y_n = the data's label.
    - ``"batched"``: the seed article's estimator: the square of each batch-mean gradient,
      averaged over batches. Biased: it is about 1/batch_size of the Fisher, and gradients of
      opposite sign cancel inside a batch. Kept only to reproduce the article.

    The model runs in eval mode (BatchNorm uses its running statistics, dropout is off) and every
    submodule's mode is restored afterwards; ``.grad`` of the parameters is not touched.
    With several positions per sample (sequences, segmentation maps), a sample's log-likelihood
    is the sum over its positions whose target is not ``ignore_index``; the Fisher stays per
    sample, F = (1/N) Σ_n (∇ Σ_t log p(y_nt | x_n))², and the positions' labels are independent
    given the input (teacher forcing), so ``exact`` is Σ_t Σ_c p(c|t) (∇ log p(c|t))² and ``mc``
    draws each position's label from p(·|x, t).

    Parameters of layers with a rule (Linear, Conv1d/2d, BatchNorm1d/2d, LayerNorm, GroupNorm,
    Embedding, the projections of ``nn.MultiheadAttention`` self-attention, and those of
    ``nn.RNN``/``nn.LSTM``/``nn.GRU``, run unrolled) are computed in one backward pass per root;
    any other parameter (custom modules, cross-attention, parameters used outside their module)
    by an exact per-sample pass.

    Data-parallel (docs: How-to, "Many GPUs"): inside an initialised process group (or with ``group=``)
    each rank estimates over its own loader (e.g. with a ``DistributedSampler``); the sums of
    squared per-sample gradients and the sample counts are all-reduced once at the end, so every
    rank returns the Fisher over the union of the ranks' samples (a rank with an empty loader
    takes part). ``DistributedDataParallel`` models are keyed by the inner module's names. With
    FSDP2 (``fully_shard``) the estimation runs on the full weights (gathered once) and each rank
    gets its shard of F, a DTensor laid out like its parameter shard.

    Args:
        model: any module whose log-likelihood is a sum of per-sample terms.
        loader: iterable of ``(inputs, targets)``; inputs a tensor (``model(x)``), a tuple/list
            (``model(*x)``) or a dict (``model(**x)``); numpy arrays are taken as tensors
            (zero-copy when writable). Moved to the model's device.
        kind: ``"exact"``, ``"mc"``, ``"empirical"`` or ``"batched"``.
        likelihood: ``"categorical"`` (logits ``[N, C]`` with class indices ``[N]``, or per
            position: ``[N, ..., C]`` with targets ``[N, ...]``, see ``class_dim``),
            ``"causal_lm"`` (logits ``[N, T, V]`` and labels ``[N, T]`` as a causal language model
            takes them: shifted by one inside, like its loss), ``"gaussian"`` (outputs ``[N, D]``,
            unit variance) or a callable ``(model_output, targets) -> [N]`` per-sample
            log-likelihood that receives the model's output as it is (``empirical``/``batched``).
        mc_samples: draws per sample for ``kind="mc"``.
        num_samples: use at most this many samples (the last batch is cut); per rank under a group.
        progress: show a tqdm bar with samples/s.
        generator: random generator for ``kind="mc"`` (reproducible draws). Without one, under a
            group, each rank draws from its own generator (seeded from the global RNG and the rank).
        class_dim: the class dimension of categorical logits: -1 (the last, as Hugging Face) or 1
            (``[N, C, d1, ...]``, as ``torch.nn.functional.cross_entropy``).
        ignore_index: positions whose target equals it do not count (default -100).
        outputs: a callable that picks the logits from what the model returns; by default a
            tensor is taken as it is, a tuple or list gives its first element, a dict or Hugging
            Face ``ModelOutput`` its ``"logits"``.
        group: the ``torch.distributed`` process group to estimate over; default: the default
            group when one is initialised, else none (this process's data only).

    Returns:
        ``{name: F}`` for every parameter that requires grad (names of
        ``model.named_parameters()``, of the inner module for DDP), float32, with the parameter's
        shape and device; DTensors sharded like the parameters for an FSDP2 model. A dict whose
        ``.metadata`` says ``kind``, ``likelihood``, ``samples``, ``tokens`` (counted target
        positions) and ``mc_samples``, over every rank (what :func:`ewc_rs.save_fisher` records).

    Raises:
        ValueError: unknown kind or likelihood, empty loader, malformed batch, outputs or targets
            that do not fit the likelihood, labels out of range, a sample whose positions are all
            ignored, ``exact`` beyond 1024 (position, class) pairs, non-finite results; under a
            group (on every rank): the ranks hold different models, all loaders are empty; a
            sharded model without a process group.
        TypeError: ``model`` is not a ``torch.nn.Module`` (an option of the wrong type is a ValueError).

    Examples:
        ```python
        import torch
        from torch import nn
        from ewc_rs import fisher_diag

        model = nn.Linear(4, 3)
        loader = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(2)]
        fisher = fisher_diag(model, loader, kind="empirical")
        assert set(fisher) == {"weight", "bias"} and fisher["weight"].shape == (3, 4)
        assert fisher.metadata["samples"] == 16 and bool((fisher["weight"] >= 0).all())
        ```
    """
    options = _parsed("fisher_diag", locals())
    result = estimate(model, loader, options)
    counted = {"samples": result.samples, "tokens": result.tokens, "mc_samples": options.mc_samples}
    return FisherDict(result.diag, {"kind": options.kind, "likelihood": options.likelihood, **counted})


def fisher_kfac(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    kind: str = DEFAULTS.kind,
    likelihood: Union[str, LikelihoodFn] = DEFAULTS.likelihood,
    mc_samples: int = DEFAULTS.mc_samples,
    num_samples: Optional[int] = DEFAULTS.num_samples,
    progress: bool = DEFAULTS.progress,
    generator: Optional[torch.Generator] = DEFAULTS.generator,
    class_dim: int = DEFAULTS.class_dim,
    ignore_index: int = DEFAULTS.ignore_index,
    outputs: Optional[OutputsFn] = DEFAULTS.pick,
    group: collectives.Group = DEFAULTS.group,
) -> KfacFisher:
    """Kronecker-factored Fisher of ``model`` on ``loader`` (conventions: the module docstring).

    Args:
        model: any module whose log-likelihood is a sum of per-sample terms.
        loader: iterable of ``(inputs, targets)`` batches, as for :func:`ewc_rs.fisher_diag`.
        kind: ``"exact"`` (G = Σ_c p(c|x) g_c g_cᵀ), ``"mc"`` (labels drawn from the model,
            ``mc_samples`` per sample) or ``"empirical"`` (the data's labels).
        likelihood: as for :func:`ewc_rs.fisher_diag`.
        mc_samples: as for :func:`ewc_rs.fisher_diag`.
        num_samples: as for :func:`ewc_rs.fisher_diag`.
        progress: as for :func:`ewc_rs.fisher_diag`.
        generator: as for :func:`ewc_rs.fisher_diag`.
        class_dim: as for :func:`ewc_rs.fisher_diag`.
        ignore_index: as for :func:`ewc_rs.fisher_diag`.
        outputs: as for :func:`ewc_rs.fisher_diag`.
        group: as for :func:`ewc_rs.fisher_diag`. Under a process group (DDP, or ``group=``) A, G
            and the diagonal rest are summed over the ranks' samples in the one all-reduce of the
            diagonal Fisher: every rank gets the factors of the union of the ranks' data.

    Returns:
        ``{"kron": {module_name: (A, G)}, "diag": {parameter_name: F}}``, float32 on the model's
        device: A ``[in(+1), in(+1)]`` indexed input-then-bias, G ``[out, out]`` by output unit,
        for each layer with a Kronecker form (the layer's Fisher block ≈ A ⊗ G for W̃ = [W, b],
        vec stacking columns); the diagonal Fisher of every other parameter that requires grad.

    Raises:
        ValueError: as :func:`ewc_rs.fisher_diag`; ``kind="batched"``; non-finite factors; an
            FSDP2-sharded model (its layers' factors need whole weights: use ``fisher_diag``).
        TypeError: ``model`` is not a ``torch.nn.Module``.

    Examples:
        ```python
        import torch
        from torch import nn
        from ewc_rs import fisher_kfac

        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.LayerNorm(3))
        loader = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
        kfac = fisher_kfac(model, loader, kind="exact")
        A, G = kfac["kron"]["0"]  # the first Linear: inputs and a bias column, 8 output units
        assert A.shape == (5, 5) and G.shape == (8, 8)
        assert set(kfac["diag"]) == {"3.weight", "3.bias"}  # LayerNorm has no Kronecker form
        ```
    """
    options = _parsed("fisher_kfac", locals())
    result = estimate(model, loader, options, kronecker=True)
    return {"kron": result.kron, "diag": result.diag}
