"""Diagonal Fisher information of any ``torch.nn.Module``: the public ``fisher_diag``.

Definitions (van de Ven 2025 names): per-sample log-likelihood ℓ_n(θ) = log p(y_n | x_n, θ);
diagonal Fisher F = (1/N) Σ_n (∇θ ℓ_n)², the mean of squared **per-sample** gradients.

This module checks the options; ``estimation`` runs the estimation (the batch loop, ``mc`` draws,
rule checks), with ``recording`` (which parameters the rules cover; forward hooks), ``attention``
(self-attention as Linear proxies), ``fallback`` (exact per-sample path for the rest) and
``batches`` (batch handling) beside it. The maths (likelihood roots, backward passes, per-layer
rules, sums of squares) runs in Rust, ``ewc_rs._core``, with the GIL released.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional, Union

import torch
from torch import nn

from . import distributed, sharding
from .batches import LikelihoodFn
from .estimation import Estimation
from .fisher_options import KINDS, parse_options
from .outputs import OutputsFn

__all__ = ["KINDS", "fisher_diag"]


def fisher_diag(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    kind: str = "exact",
    likelihood: Union[str, LikelihoodFn] = "categorical",
    mc_samples: int = 1,
    num_samples: Optional[int] = None,
    progress: bool = False,
    generator: Optional[torch.Generator] = None,
    class_dim: int = -1,
    ignore_index: int = -100,
    outputs: Optional[OutputsFn] = None,
    group: distributed.Group = None,
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
    Embedding, and the projections of ``nn.MultiheadAttention`` self-attention) are computed in
    one backward pass per root; any other parameter (custom modules, RNNs, cross-attention,
    parameters used outside their module) by an exact per-sample pass.

    Data-parallel (README, "Many GPUs"): inside an initialised process group (or with ``group=``)
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
        shape and device; DTensors sharded like the parameters for an FSDP2 model.

    Raises:
        ValueError: unknown kind or likelihood, empty loader, malformed batch, outputs or targets
            that do not fit the likelihood, labels out of range, a sample whose positions are all
            ignored, ``exact`` beyond 1024 (position, class) pairs, non-finite results; under a
            group (on every rank): the ranks hold different models, all loaders are empty; a
            sharded model without a process group.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    model = sharding.unwrap(model)
    group = distributed.resolve_group(group)
    if group is None and any(sharding.is_sharded(p) for _, p in sharding.named_parameters(model)):
        raise ValueError("group: the model has sharded (DTensor) parameters but no process group is initialised")
    if kind == "mc" and generator is None and group is not None:
        generator = distributed.rank_generator(group, next(model.parameters(), torch.empty(0)).device)
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
    with sharding.full_weights(model) as sharded:
        fisher = Estimation(model, options, group).run(loader, progress=progress)
    return {n: sharding.shard_like(f, sharded[n]) if n in sharded else f for n, f in fisher.items()}
