"""EWC in a Hugging Face ``transformers.Trainer``: :class:`EWCTrainer`.

Example::

    from ewc_rs import EWC
    from ewc_rs.integrations.transformers import EWCTrainer

    ewc = EWC(model, lam=100.0)
    trainer = EWCTrainer(model=model, args=args, train_dataset=task_a, ewc=ewc)
    trainer.train()
    trainer.consolidate(kind="exact")          # F and θ* of task A, from the trainer's train dataloader
    trainer = EWCTrainer(model=model, args=args, train_dataset=task_b, ewc=ewc)
    trainer.train()                            # loss + (λ/2) Σ F (θ − θ*)², once per optimizer step

Gradient accumulation (transformers 5.x, ``Trainer.training_step``): the loss returned by
``compute_loss`` is divided by the number of micro-batches of the optimizer step
(``current_gradient_accumulation_steps``) unless it counts as already scaled for accumulation
(``loss_is_scaled_for_ga``; by default: the model accepts loss kwargs and ``num_items_in_batch`` was
given, or a ``compute_loss_func`` is set). :meth:`EWCTrainer.compute_loss` adds the penalty divided
by that number in the second case and undivided in the first, so that each micro-batch contributes
1/k of it and the optimizer step sees the penalty's gradient λF(θ−θ*) exactly once. Under
evaluation (``model.training`` false) the loss is the data loss alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Optional, Union

from torch import Tensor, nn
from transformers import Trainer

from ewc_rs.ewc import EWC

__all__ = ["EWCTrainer", "LabelSplit"]


class EWCTrainer(Trainer):
    """A ``transformers.Trainer`` whose training loss includes the EWC penalty of ``ewc``.

    Args:
        *args: as for ``transformers.Trainer``.
        ewc: the :class:`ewc_rs.EWC` object, bound to the trainer's model (``model=``).
        **kwargs: as for ``transformers.Trainer``.

    The penalty's mean over the logged steps is added to the training logs as ``ewc_penalty``.

    Raises:
        TypeError: ``ewc`` is not an :class:`ewc_rs.EWC`.

    Examples:
        ```python
        import tempfile

        import torch
        from transformers import BertConfig, BertForSequenceClassification, TrainingArguments
        from ewc_rs import EWC
        from ewc_rs.integrations.transformers import EWCTrainer

        config = BertConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
        )
        model = BertForSequenceClassification(config)
        task_a = [{"input_ids": torch.randint(0, 50, (6,)), "labels": torch.tensor(i % 2)} for i in range(8)]
        task_b = [{"input_ids": torch.randint(0, 50, (6,)), "labels": torch.tensor(1)} for i in range(8)]
        ewc = EWC(model, lam=100.0)
        with tempfile.TemporaryDirectory() as out:
            args = TrainingArguments(
                output_dir=out, per_device_train_batch_size=4, max_steps=2, logging_steps=1,
                save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
            )
            EWCTrainer(model=model, args=args, train_dataset=task_a, ewc=ewc).consolidate(kind="exact")
            trainer = EWCTrainer(model=model, args=args, train_dataset=task_b, ewc=ewc)
            trainer.train()  # loss + (λ/2) Σ F (θ − θ*)²
        assert "ewc_penalty" in trainer.state.log_history[0]
        ```
    """

    def __init__(self, *args: Any, ewc: EWC, **kwargs: Any) -> None:
        if not isinstance(ewc, EWC):
            raise TypeError(f"ewc: expected an ewc_rs.EWC, got {type(ewc).__name__}")
        super().__init__(*args, **kwargs)
        self.ewc = ewc
        self._penalty_sum: Optional[Tensor] = None  # since the last training log, on the device (no sync)
        self._penalty_count = 0

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Optional[Union[Tensor, int]] = None,
    ) -> Union[Tensor, tuple[Tensor, Any]]:
        """The Trainer's loss plus, in training, the EWC penalty scaled to count once per optimizer step.

        Args:
            model: the (possibly wrapped) model, as ``Trainer.compute_loss`` receives it.
            inputs: the batch.
            return_outputs: also return the model's outputs.
            num_items_in_batch: as ``Trainer.compute_loss`` receives it.

        Returns:
            The loss, or ``(loss, outputs)`` when ``return_outputs``.
        """
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if not model.training:
            return result
        loss, outputs = (result[0], result[1]) if isinstance(result, tuple) else (result, None)
        penalty = self.ewc.penalty(self.model)
        detached = penalty.detach()
        self._penalty_sum = detached if self._penalty_sum is None else self._penalty_sum + detached
        self._penalty_count += 1
        loss = loss + penalty / self.penalty_divisor(num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def penalty_divisor(self, num_items_in_batch: Optional[Union[Tensor, int]]) -> int:
        """What the penalty is divided by in one micro-batch's loss: the number of micro-batches of
        the optimizer step when ``training_step`` will not divide the loss by it, else 1.

        Args:
            num_items_in_batch: as ``compute_loss`` received it.

        Returns:
            A positive int.

        Examples:
            ```python
            import tempfile

            from transformers import BertConfig, BertForSequenceClassification, TrainingArguments
            from ewc_rs import EWC
            from ewc_rs.integrations.transformers import EWCTrainer

            config = BertConfig(
                vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
            )
            model = BertForSequenceClassification(config)
            with tempfile.TemporaryDirectory() as out:
                args = TrainingArguments(output_dir=out, gradient_accumulation_steps=4, report_to="none", use_cpu=True)
                trainer = EWCTrainer(model=model, args=args, ewc=EWC(model, lam=100.0))
                assert trainer.penalty_divisor(None) == 1  # training_step divides the loss, penalty included
                assert trainer.penalty_divisor(24) == 4  # the model's loss is per item: divide the penalty here
            ```
        """
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            accepts = bool(self.model_accepts_loss_kwargs) and num_items_in_batch is not None
            scaled = accepts or self.compute_loss_func is not None
        if not scaled:
            return 1  # training_step divides the whole loss, penalty included
        steps = getattr(self, "current_gradient_accumulation_steps", None)
        return int(steps) if steps else int(self.args.gradient_accumulation_steps)

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        """The Trainer's logging, with ``ewc_penalty`` (mean since the last training log) beside ``loss``.

        Args:
            logs: the values to log.
            start_time: as for ``Trainer.log``.
        """
        if "loss" in logs and self._penalty_sum is not None:
            logs = {**logs, "ewc_penalty": float(self._penalty_sum) / self._penalty_count}
            self._penalty_sum, self._penalty_count = None, 0
        super().log(logs, start_time)

    def consolidate(
        self, *, kind: str = "exact", dataloader: Optional[Iterable[Any]] = None, **fisher_options: Any
    ) -> dict[str, Tensor]:
        """Estimates F on the trainer's train dataloader (or ``dataloader``) and stores (F, θ*) in ``ewc``.

        Each batch (a dict) is split into the model's inputs and its targets, the entry named by
        ``self.label_names`` (``"labels"`` by default); :func:`ewc_rs.fisher_diag` reads the
        ``"logits"`` of the model's ``ModelOutput`` (for a causal LM pass ``likelihood="causal_lm"``).

        Args:
            kind: Fisher kind (``"exact"``, ``"mc"``, ``"empirical"``, ``"batched"``).
            dataloader: batches (dicts) of the task just learned; default ``self.get_train_dataloader()``.
            **fisher_options: for :func:`ewc_rs.fisher_diag` (likelihood, mc_samples, num_samples, progress, ...).

        Returns:
            The new task's Fisher ``{name: F}``, as :meth:`ewc_rs.EWC.consolidate` returns it.

        Raises:
            ValueError: the trainer has no model, a batch without the label key; as :meth:`ewc_rs.EWC.consolidate`.
            TypeError: a batch that is not a dict; an unknown Fisher option.

        Examples:
            ```python
            import tempfile

            import torch
            from transformers import BertConfig, BertForSequenceClassification, TrainingArguments
            from ewc_rs import EWC
            from ewc_rs.integrations.transformers import EWCTrainer

            config = BertConfig(
                vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
            )
            model = BertForSequenceClassification(config)
            batches = [{"input_ids": torch.randint(0, 50, (4, 6)), "labels": torch.tensor([0, 1, 1, 0])}]
            ewc = EWC(model, lam=100.0)
            with tempfile.TemporaryDirectory() as out:
                trainer = EWCTrainer(model=model, args=TrainingArguments(output_dir=out, report_to="none"), ewc=ewc)
                fisher = trainer.consolidate(kind="exact", dataloader=batches)
            assert ewc.num_tasks == 1 and fisher["classifier.weight"].shape == (2, 16)
            ```
        """
        if self.model is None:
            raise ValueError("model: the trainer has no model")
        loader = self.get_train_dataloader() if dataloader is None else dataloader
        return self.ewc.consolidate(LabelSplit(loader, self.label_names), kind=kind, **fisher_options)


class LabelSplit:
    """Hugging Face batches (dicts holding the labels) as ``(inputs, targets)`` pairs for :mod:`ewc_rs`.

    Args:
        loader: iterable of dict batches.
        label_names: the keys of the targets; exactly one (EWC's likelihoods take one target tensor).

    Raises:
        ValueError: ``label_names`` names more than one key; while iterating, a batch without the label key.
        TypeError: while iterating, a batch that is not a dict.

    Examples:
        ```python
        import torch
        from ewc_rs.integrations.transformers import LabelSplit

        batches = [{"input_ids": torch.zeros(2, 5, dtype=torch.long), "label": torch.tensor([0, 1])}]
        (inputs, targets), = LabelSplit(batches, label_names=["label"])
        assert list(inputs) == ["input_ids"] and targets.tolist() == [0, 1]
        ```
    """

    def __init__(self, loader: Iterable[Any], label_names: Optional[Sequence[str]] = None) -> None:
        names = ["labels"] if not label_names else list(label_names)
        if len(names) != 1:
            raise ValueError(f"label_names: expected one label key for the Fisher's targets, got {names}")
        self.loader = loader
        self.label_name = names[0]

    def __iter__(self) -> Iterator[tuple[dict[str, Any], Any]]:
        for index, batch in enumerate(self.loader):
            if not isinstance(batch, Mapping):
                raise TypeError(f"dataloader: batch {index} is a {type(batch).__name__}, expected a dict")
            if self.label_name not in batch:
                raise ValueError(f"dataloader: batch {index} has no {self.label_name!r} (keys: {sorted(batch)})")
            inputs = {k: v for k, v in batch.items() if k != self.label_name}
            yield inputs, batch[self.label_name]
