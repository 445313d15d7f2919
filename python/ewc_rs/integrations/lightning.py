"""EWC in Lightning (``lightning.pytorch``): :class:`EWCCallback`.

Example::

    from ewc_rs import EWC
    from ewc_rs.integrations.lightning import EWCCallback

    ewc = EWC(module, lam=100.0)               # module: the LightningModule (or the network inside it)
    callback = EWCCallback(ewc, kind="exact")
    L.Trainer(callbacks=[callback], max_epochs=5).fit(module, loader_a)   # consolidates at the end
    L.Trainer(callbacks=[callback], max_epochs=5).fit(module, loader_b)   # penalised, then consolidates

Where the gradient goes in (Lightning 2.6, ``Precision._after_closure``): after the closure has run
``training_step`` and ``backward`` (all micro-batches of an accumulation), after AMP's
``scaler.unscale_``, Lightning calls ``on_before_optimizer_step``, then clips the gradients, then steps.
The callback adds λF(θ−θ*) to ``.grad`` there with :meth:`ewc_rs.EWC.backward`: once per optimizer step
whatever ``accumulate_grad_batches`` is (the hook runs once per step), on unscaled gradients (for an
optimizer that unscales inside its own ``step``, scaled by the scaler's current scale), and clipped
together with the data gradient.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from ewc_rs import KINDS
from ewc_rs.ewc import EWC, check_choice

__all__ = ["EWCCallback"]


class EWCCallback(Callback):
    """Adds the EWC penalty's gradient before each optimizer step and consolidates when ``fit`` ends.

    Args:
        ewc: the :class:`ewc_rs.EWC` object, bound to the LightningModule or a submodule of it.
        kind: Fisher kind for the consolidation (``"exact"``, ``"mc"``, ``"empirical"``, ``"batched"``).
        consolidate_on_train_end: consolidate at ``on_train_end`` (default True).
        loader: batches ``(x, y)`` to consolidate on; default: the trainer's train dataloader, its batches as
            they are. With several processes (DDP) each rank estimates on its own shard and the sums are
            all-reduced (see :func:`ewc_rs.fisher_diag`'s ``group``), so every rank holds the same F, as the
            penalty's gradient (added after DDP's all-reduce) needs.
        log_name: the penalty's value is logged with ``pl_module.log`` under this name each step; None: not logged.
        **fisher_options: for :func:`ewc_rs.fisher_diag` (likelihood, mc_samples, num_samples, progress, ...).

    Raises:
        TypeError: ``ewc`` is not an :class:`ewc_rs.EWC`.
        ValueError: an unknown ``kind``; at the start of ``fit``, a trainer with several optimizers.

    Examples:
        ```python
        import tempfile

        import lightning.pytorch as pl
        import torch
        import torch.nn.functional as F
        from torch import nn
        from torch.utils.data import DataLoader, TensorDataset
        from ewc_rs import EWC
        from ewc_rs.integrations.lightning import EWCCallback

        class Classifier(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = nn.Linear(4, 3)

            def forward(self, x):  # what the consolidation calls
                return self.net(x)

            def training_step(self, batch, batch_idx):
                x, y = batch
                return F.cross_entropy(self(x), y)

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        module = Classifier()
        ewc = EWC(module, lam=100.0)
        callback = EWCCallback(ewc, kind="exact")
        tasks = [DataLoader(TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,))), batch_size=8) for _ in "ab"]
        with tempfile.TemporaryDirectory() as folder:
            for loader in tasks:  # task A: consolidates at the end; task B: penalised, then consolidates
                trainer = pl.Trainer(
                    max_epochs=1, callbacks=[callback], default_root_dir=folder, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                )
                trainer.fit(module, loader)
        assert ewc.num_tasks == 2 and "ewc_penalty" in trainer.callback_metrics
        ```
    """

    def __init__(
        self,
        ewc: EWC,
        *,
        kind: str = "exact",
        consolidate_on_train_end: bool = True,
        loader: Optional[Iterable[Any]] = None,
        log_name: Optional[str] = "ewc_penalty",
        **fisher_options: Any,
    ) -> None:
        if not isinstance(ewc, EWC):
            raise TypeError(f"ewc: expected an ewc_rs.EWC, got {type(ewc).__name__}")
        self.ewc = ewc
        self.kind = check_choice("kind", kind, KINDS)
        self.consolidate_on_train_end = consolidate_on_train_end
        self.loader = loader
        self.log_name = log_name
        self.fisher_options = fisher_options

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Checks the set-up: one optimizer."""
        if len(trainer.optimizers) > 1:
            raise ValueError(
                f"EWCCallback: the trainer has {len(trainer.optimizers)} optimizers; the penalty's gradient is added "
                "to every protected parameter before each optimizer step, so use one optimizer"
            )

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Adds λF(θ−θ*) to ``.grad`` (unscaled gradients; see the module's doc) and logs the value."""
        value = self.ewc.backward(grad_scale=_grad_scale(trainer, optimizer))
        if self.log_name is not None:
            pl_module.log(self.log_name, value, on_step=True, on_epoch=False, prog_bar=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Consolidates on ``loader`` or the trainer's train dataloader (if ``consolidate_on_train_end``)."""
        if self.consolidate_on_train_end:
            self.consolidate(trainer)

    def consolidate(self, trainer: pl.Trainer, loader: Optional[Iterable[Any]] = None) -> dict[str, Tensor]:
        """Estimates F and stores (F, θ*) in ``ewc``.

        Args:
            trainer: the trainer whose train dataloader to use when neither ``loader`` nor ``self.loader`` is given.
            loader: batches ``(x, y)``; overrides ``self.loader``.

        Returns:
            The new task's Fisher, as :meth:`ewc_rs.EWC.consolidate` returns it.

        Raises:
            ValueError: no loader given and the trainer has no train dataloader; as :meth:`ewc_rs.EWC.consolidate`.
            TypeError: an unknown Fisher option.

        Examples:
            ```python
            import lightning.pytorch as pl
            import torch
            from torch import nn
            from ewc_rs import EWC
            from ewc_rs.integrations.lightning import EWCCallback

            model = nn.Linear(4, 3)  # or a LightningModule
            ewc = EWC(model, lam=100.0)
            callback = EWCCallback(ewc, kind="exact", consolidate_on_train_end=False)
            trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
            fisher = callback.consolidate(trainer, loader=[(torch.randn(16, 4), torch.randint(0, 3, (16,)))])
            assert ewc.num_tasks == 1 and set(fisher) == {"weight", "bias"}
            ```
        """
        batches = loader if loader is not None else self.loader if self.loader is not None else trainer.train_dataloader
        if batches is None:
            raise ValueError("loader: the trainer has no train dataloader; pass loader=")
        with torch.inference_mode(False), torch.enable_grad():
            return self.ewc.consolidate(batches, kind=self.kind, **self.fisher_options)


def _grad_scale(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> float:
    """1, unless AMP's gradients are still scaled at the hook: an optimizer that unscales in its own ``step``."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        return float(scaler.get_scale())
    return 1.0
