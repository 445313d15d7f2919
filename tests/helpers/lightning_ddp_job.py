"""The spawned side of ``test_integrations_lightning.py::test_ddp_consolidates_over_every_rank``:
a Lightning ``ddp_spawn`` fit on 2 CPU processes (gloo) with ``EWCCallback`` consolidating on the
trainer's train dataloader, which Lightning shards with a ``DistributedSampler``. Every rank saves
the Fisher it got to ``<out>/fisher.<rank>.pt``; the parent compares each with the reference over the
whole data set. ``lr=0`` keeps θ at its initial value, so the parent can rebuild it from the seed.

Usage: ``python lightning_ddp_job.py SEED OUT_DIR``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ewc_rs import EWC
from ewc_rs.integrations.lightning import EWCCallback

DIM, CLASSES, SAMPLES = 6, 3, 16  # 16: even over 2 ranks, so the sampler pads nothing


def make_net(seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(DIM, 8), nn.Tanh(), nn.Linear(8, CLASSES))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return net


def make_data(seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed + 1)
    return TensorDataset(torch.randn(SAMPLES, DIM, generator=g), torch.randint(0, CLASSES, (SAMPLES,), generator=g))


class Module(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.0)


class SavingCallback(EWCCallback):
    """Saves each rank's consolidated Fisher."""

    def __init__(self, ewc: EWC, out: Path) -> None:
        super().__init__(ewc, kind="exact")
        self.out = out

    def consolidate(self, trainer: pl.Trainer, loader: Optional[Any] = None) -> dict[str, Tensor]:
        fisher = super().consolidate(trainer, loader)
        torch.save({n: f.detach().cpu() for n, f in fisher.items()}, self.out / f"fisher.{trainer.global_rank}.pt")
        return fisher


def main(seed: int, out: Path) -> None:
    torch.set_num_threads(1)
    net = make_net(seed)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SavingCallback(EWC(net, lam=1.0), out)],
    )
    trainer.fit(Module(net), DataLoader(make_data(seed), batch_size=3, shuffle=False))


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]))
