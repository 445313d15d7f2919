"""EWC in Avalanche 0.6 strategies: :class:`EWCPlugin`.

Example::

    from avalanche.training.supervised import Naive
    from ewc_rs.integrations.avalanche import EWCPlugin

    strategy = Naive(model=model, optimizer=opt, criterion=nn.CrossEntropyLoss(), plugins=[EWCPlugin(100.0)])
    for experience in benchmark.train_stream:
        strategy.train(experience)             # penalised; consolidates at the end of each experience

Differences from Avalanche's own ``avalanche.training.plugins.EWCPlugin``: its importance is the
square of each minibatch's mean gradient (the ``batched`` estimator here, about 1/batch size of the
Fisher); this plugin uses the per-sample Fisher of :func:`ewc_rs.fisher_diag` (``kind="exact"`` by
default). Its penalty is λ_avalanche Σ F (θ − θ*)²; this one is (λ/2) Σ F (θ − θ*)², as in the
articles. The model is called as ``model(x)``: task-aware models (``MultiTaskModule``) are refused.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any, Optional

import torch
from avalanche.models import MultiTaskModule  # type: ignore[import-untyped]
from avalanche.training.plugins import SupervisedPlugin  # type: ignore[import-untyped]
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ewc_rs import KINDS
from ewc_rs.ewc import EWC, ParamSelector, check_choice, check_lam

__all__ = ["EWCPlugin", "ExperienceBatches"]


class EWCPlugin(SupervisedPlugin):  # type: ignore[misc]
    """Adds (λ/2) Σ F (θ − θ*)² to ``strategy.loss`` before each backward pass; consolidates on each
    experience's dataset after training on it.

    Args:
        lam: λ ≥ 0.
        kind: Fisher kind (``"exact"``, ``"mc"``, ``"empirical"``, ``"batched"``).
        mode: ``"separate"`` or ``"online"`` (:class:`ewc_rs.EWC`).
        gamma: decay of the old Fisher in online mode.
        params: what to protect, as for :class:`ewc_rs.EWC` (e.g. leave out a growing classifier head,
            whose change of shape would otherwise raise an error).
        batch_size: batch size of the consolidation pass; default the strategy's ``train_mb_size``.
        **ewc_options: further keywords: ``norm_stats``, ``storage_dtype`` for :class:`ewc_rs.EWC`,
            the rest for :func:`ewc_rs.fisher_diag` (likelihood, mc_samples, num_samples, progress, ...).

    The :class:`ewc_rs.EWC` object is ``self.ewc``, bound to the strategy's model on first use.

    Raises:
        ValueError: ``lam`` negative or not finite, an unknown ``kind``, a ``batch_size`` that is not a positive
            int; on first use, the options :class:`ewc_rs.EWC` refuses.

    Examples:
        ```python
        import torch
        from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
        from avalanche.benchmarks.utils import as_classification_dataset
        from avalanche.training.plugins import EvaluationPlugin
        from avalanche.training.supervised import Naive
        from torch import nn
        from torch.utils.data import TensorDataset
        from ewc_rs.integrations.avalanche import EWCPlugin

        def experience_data():
            x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
            data = TensorDataset(x, y)
            data.targets = y
            return as_classification_dataset(data)

        benchmark = benchmark_from_datasets(train=[experience_data(), experience_data()])
        model = nn.Linear(4, 3)
        plugin = EWCPlugin(100.0, kind="exact")
        strategy = Naive(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), criterion=nn.CrossEntropyLoss(),
            train_mb_size=8, train_epochs=1, plugins=[plugin], evaluator=EvaluationPlugin(loggers=[]),
        )
        for experience in benchmark.train_stream:
            strategy.train(experience)  # penalised from the second on; consolidates at the end of each
        assert plugin.ewc is not None and plugin.ewc.num_tasks == 2
        ```
    """

    def __init__(
        self,
        lam: float,
        *,
        kind: str = "exact",
        mode: str = "separate",
        gamma: float = 1.0,
        params: ParamSelector = None,
        batch_size: Optional[int] = None,
        **ewc_options: Any,
    ) -> None:
        super().__init__()
        self.lam = check_lam(lam)
        self.kind = check_choice("kind", kind, KINDS)
        for_ewc: dict[str, Any] = {
            key: ewc_options.pop(key) for key in ("norm_stats", "storage_dtype") if key in ewc_options
        }
        self._ewc_kwargs: dict[str, Any] = dict(mode=mode, gamma=gamma, params=params, **for_ewc)
        self.fisher_options = ewc_options
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size: expected a positive int or None, got {batch_size!r}")
        self.batch_size = batch_size
        self.ewc: Optional[EWC] = None
        self._model: Optional[nn.Module] = None

    def bind(self, model: nn.Module) -> EWC:
        """The plugin's :class:`ewc_rs.EWC`, created for ``model`` on first call.

        Args:
            model: the strategy's model.

        Returns:
            ``self.ewc``.

        Raises:
            TypeError: a task-aware ``MultiTaskModule`` (called as ``model(x, task_labels)``).
            ValueError: a different model than the one bound first; the options :class:`ewc_rs.EWC` refuses.

        Examples:
            ```python
            from torch import nn
            from ewc_rs.integrations.avalanche import EWCPlugin

            plugin = EWCPlugin(100.0, mode="online", gamma=0.9)
            model = nn.Linear(4, 3)
            ewc = plugin.bind(model)
            assert plugin.bind(model) is ewc is plugin.ewc and ewc.mode == "online"
            ```
        """
        if isinstance(model, MultiTaskModule):
            raise TypeError("model: EWCPlugin calls model(x); task-aware MultiTaskModule models are not supported")
        if self.ewc is None:
            self.ewc, self._model = EWC(model, self.lam, **self._ewc_kwargs), model
        elif model is not self._model:
            raise ValueError("model: the strategy's model is not the one EWCPlugin was bound to")
        return self.ewc

    def before_training(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Binds the plugin's :class:`ewc_rs.EWC` to the strategy's model (Avalanche calls this)."""
        self.bind(strategy.model)

    def before_backward(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Adds the penalty to ``strategy.loss`` once a task is consolidated (Avalanche calls this)."""
        ewc = self.bind(strategy.model)
        if ewc.num_tasks:
            strategy.loss = strategy.loss + ewc.penalty(strategy.model)

    def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        """Consolidates on the experience just trained on (Avalanche calls this)."""
        self.consolidate(strategy)

    def consolidate(self, strategy: Any) -> dict[str, Tensor]:
        """Estimates F on the current experience's dataset and stores (F, θ*).

        Args:
            strategy: the strategy, on its current ``experience``.

        Returns:
            The new task's Fisher, as :meth:`ewc_rs.EWC.consolidate` returns it.

        Raises:
            TypeError: a task-aware model (as :meth:`bind`); an unknown Fisher option.
            ValueError: an empty dataset, a batch that is not ``(x, y[, task_label])``; as
                :meth:`ewc_rs.EWC.consolidate`.

        Examples:
            ```python
            from types import SimpleNamespace

            import torch
            from torch import nn
            from torch.utils.data import TensorDataset
            from ewc_rs.integrations.avalanche import EWCPlugin

            # What the plugin reads of a strategy: its model, current experience and minibatch size.
            experience = SimpleNamespace(dataset=TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,))))
            strategy = SimpleNamespace(model=nn.Linear(4, 3), experience=experience, train_mb_size=8)
            plugin = EWCPlugin(100.0, kind="exact")
            fisher = plugin.consolidate(strategy)
            assert set(fisher) == {"weight", "bias"} and plugin.ewc.num_tasks == 1
            ```
        """
        ewc = self.bind(strategy.model)
        batches = ExperienceBatches(strategy.experience.dataset, self.batch_size or strategy.train_mb_size)
        with torch.enable_grad():
            return ewc.consolidate(batches, kind=self.kind, **self.fisher_options)


class ExperienceBatches:
    """An Avalanche dataset (items ``(x, y, task_label)`` or ``(x, y)``) as ``(x, y)`` batches, in order,
    with its eval transforms (``dataset.eval()``) and its own ``collate_fn``.

    Args:
        dataset: the experience's dataset.
        batch_size: samples per batch.

    Raises:
        ValueError: an empty dataset, or one without a length; while iterating, a batch that is not
            ``(x, y[, task_label])``.

    Examples:
        ```python
        import torch
        from torch.utils.data import TensorDataset
        from ewc_rs.integrations.avalanche import ExperienceBatches

        x, y, task = torch.randn(10, 4), torch.randint(0, 3, (10,)), torch.zeros(10, dtype=torch.long)
        batches = list(ExperienceBatches(TensorDataset(x, y, task), batch_size=4))
        assert [len(bx) for bx, by in batches] == [4, 4, 2]  # (x, y) pairs: the task labels dropped
        ```
    """

    def __init__(self, dataset: Any, batch_size: int) -> None:
        if not isinstance(dataset, Sized) or len(dataset) == 0:
            raise ValueError("dataset: the experience's dataset is empty or has no length")
        self.dataset: Any = dataset.eval() if hasattr(dataset, "eval") else dataset
        self.batch_size = int(batch_size)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        collate = getattr(self.dataset, "collate_fn", None)
        loader = DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False, collate_fn=collate)
        for index, batch in enumerate(loader):
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError(f"dataset: batch {index} is not (x, y[, task_label]); got {type(batch).__name__}")
            yield batch[0], batch[1]
