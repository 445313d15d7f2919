"""``ewc_rs.integrations.lightning.EWCCallback`` with plain ``nn.Module`` networks and synthetic data.

* The gradient the optimizer steps with is the data gradient plus λF(θ0−θ*) of the float64
  reference, once per optimizer step under ``accumulate_grad_batches`` (including the last, shorter
  step), and it is clipped together with the data gradient (the penalty goes in before clipping).
* The callback consolidates when ``fit`` ends, on the trainer's train dataloader (against the
  reference), and logs the penalty.
* EWC does its job: after task B, task A's loss is lower with the callback than without.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch", reason="the Lightning integration needs lightning (extra [lightning])")

from ewc_helpers import naive_value_and_grads, perturb, snapshot  # noqa: E402
from ewc_rs import EWC  # noqa: E402
from ewc_rs.integrations.lightning import EWCCallback, _grad_scale  # noqa: E402
from reference import reference_fisher, relative_error  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py

DIM, CLASSES = 10, 3
HELPERS = Path(__file__).resolve().parents[1] / "helpers"


class RecordingSGD(torch.optim.SGD):
    """SGD that records every ``.grad`` as it steps: after Lightning's closure, hooks and clipping."""

    def __init__(self, params: Any, lr: float) -> None:
        super().__init__(params, lr=lr)
        self.seen: list[list[Tensor]] = []

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = closure() if closure is not None else None
        self.seen.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        super().step()
        return loss


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module, *, lr: float, optimizer: str = "adam") -> None:
        super().__init__()
        self.net, self.lr, self.optimizer_name = net, lr, optimizer
        self.recording: Optional[RecordingSGD] = None

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "recording":
            self.recording = RecordingSGD(self.parameters(), lr=self.lr)
            return self.recording
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, 32), nn.Tanh(), nn.Linear(32, CLASSES))


def teacher_task(n: int, g: torch.Generator, teacher: Tensor) -> TensorDataset:
    x = torch.randn(n, DIM, generator=g)
    return TensorDataset(x, (x @ teacher).argmax(1))


def fit(module: pl.LightningModule, data: TensorDataset, callbacks: list, **trainer_kw: Any) -> Any:
    trainer_kw = {"max_epochs": 1, **trainer_kw}
    batch_size = trainer_kw.pop("batch_size", 1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **trainer_kw,
    )
    trainer.fit(module, DataLoader(data, batch_size=batch_size, shuffle=False))
    return trainer


def consolidated(seed: int, lam: float) -> tuple[nn.Module, EWC, dict[str, Tensor], dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    net = mlp(seed % 100_000)
    ewc = EWC(net, lam=lam)
    data = teacher_task(12, g, torch.randn(DIM, CLASSES, generator=g))
    fisher = ewc.consolidate(DataLoader(data, batch_size=4), kind="exact")
    star = snapshot(net)
    perturb(net, g, scale=0.2)
    return net, ewc, fisher, star


@pytest.mark.parametrize("clip", [None, 0.05])
def test_penalty_gradient_once_per_optimizer_step_before_clipping(clip: Optional[float], seed: int) -> None:
    lam = 30.0
    net, ewc, fisher, star = consolidated(seed, lam)
    _, penalty = naive_value_and_grads(net, [(star, fisher)], lam)
    g = torch.Generator().manual_seed(seed + 1)
    data = teacher_task(3, g, torch.randn(DIM, CLASSES, generator=g))  # batch 1, accumulation 2: steps of 2 and 1

    def gradients(callbacks: list, clip_val: Optional[float]) -> list[list[Tensor]]:
        module = Classifier(net, lr=0.0, optimizer="recording")  # lr 0: every step at θ0
        fit(module, data, callbacks, accumulate_grad_batches=2, gradient_clip_val=clip_val)
        assert module.recording is not None
        return module.recording.seen

    callback = EWCCallback(ewc, consolidate_on_train_end=False)
    with_ewc = gradients([callback], clip)
    plain = gradients([], None)
    assert len(with_ewc) == len(plain) == 2, f"seed={seed}: expected 2 optimizer steps"
    names = [n for n, _ in net.named_parameters()]
    for step, (got, data_grads) in enumerate(zip(with_ewc, plain)):
        expected = [d + penalty[n] for n, d in zip(names, data_grads)]
        if clip is not None:
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(e) for e in expected])))
            assert norm > 2 * clip, f"seed={seed}: gradient norm {norm} would not be clipped"
            expected = [e * clip / (norm + 1e-6) for e in expected]
        err = relative_error(dict(zip(names, got)), dict(zip(names, expected)))
        assert err < 1e-5, f"seed={seed} step {step}: stepped gradient off data + λF(θ−θ*) by {err:.2e} (relative)"


def test_consolidates_on_train_end_and_logs_the_penalty(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    net = mlp(seed % 100_000)
    ewc = EWC(net, lam=10.0)
    teacher = torch.randn(DIM, CLASSES, generator=g)
    callback = EWCCallback(ewc, kind="exact")
    data_a = teacher_task(20, g, teacher)
    trainer = fit(Classifier(net, lr=1e-2), data_a, [callback], batch_size=8)
    assert ewc.num_tasks == 1, f"seed={seed}"
    assert "ewc_penalty" in trainer.callback_metrics and float(trainer.callback_metrics["ewc_penalty"]) == 0.0
    expected = reference_fisher(net, [(data_a.tensors[0], data_a.tensors[1])], kind="exact")
    second = callback.consolidate(trainer)  # the same train dataloader, the same weights
    err = relative_error({n: f.double() for n, f in second.items()}, expected)
    assert err < 1e-4, f"seed={seed}: relative error {err:.2e} of the Fisher from the train dataloader"

    trainer = fit(Classifier(net, lr=1e-2), teacher_task(20, g, -teacher), [callback], batch_size=8)
    logged = float(trainer.callback_metrics["ewc_penalty"])
    assert logged > 0.0 and ewc.num_tasks == 3, f"seed={seed}: logged {logged}, {ewc.num_tasks} tasks"


def test_ewc_keeps_task_a(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(DIM, CLASSES, generator=g)
    task_a, task_b, test_a = (
        teacher_task(256, g, teacher),
        teacher_task(256, g, -teacher),
        teacher_task(512, g, teacher),
    )
    net = mlp(seed % 100_000)
    ewc = EWC(net, lam=1e3)
    fit(Classifier(net, lr=1e-2), task_a, [EWCCallback(ewc)], batch_size=32, max_epochs=5)
    weights, state = snapshot(net), ewc.state_dict()

    def loss_a() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(net(test_a.tensors[0]), test_a.tensors[1]))

    after_a = loss_a()
    losses = {}
    for name in ("ewc", "plain"):
        with torch.no_grad():
            for n, p in net.named_parameters():
                p.copy_(weights[n])
        ewc.load_state_dict(state)
        callbacks = [EWCCallback(ewc, consolidate_on_train_end=False)] if name == "ewc" else []
        fit(Classifier(net, lr=1e-2), task_b, callbacks, batch_size=32, max_epochs=5)
        losses[name] = loss_a()
    assert losses["ewc"] < losses["plain"] - 0.5, f"seed={seed}: task A loss after A {after_a:.3f}, after B {losses}"


def test_set_up_is_checked() -> None:
    net = mlp(0)
    callback = EWCCallback(EWC(net, lam=1.0))
    module = Classifier(net, lr=0.1)
    two = SimpleNamespace(optimizers=[object(), object()], world_size=1)
    with pytest.raises(ValueError, match="2 optimizers"):
        callback.on_fit_start(two, module)  # type: ignore[arg-type]
    ddp = SimpleNamespace(optimizers=[object()], world_size=2)
    callback.on_fit_start(ddp, module)  # type: ignore[arg-type]  # DDP needs no loader= any more
    with pytest.raises(TypeError, match="ewc: expected an ewc_rs.EWC"):
        EWCCallback(net)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no train dataloader"):
        callback.consolidate(SimpleNamespace(train_dataloader=None))  # type: ignore[arg-type]


def test_grad_scale_follows_where_amp_unscales() -> None:
    params = [nn.Parameter(torch.zeros(2))]
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler))
    assert _grad_scale(trainer, torch.optim.SGD(params, lr=0.1)) == 1.0  # type: ignore[arg-type]
    fused = torch.optim.Adam(params, lr=0.1, fused=True)
    assert getattr(fused, "_step_supports_amp_scaling", False)
    assert _grad_scale(trainer, fused) == 8.0  # type: ignore[arg-type]
    no_scaler = SimpleNamespace(precision_plugin=SimpleNamespace())
    assert _grad_scale(no_scaler, fused) == 1.0  # type: ignore[arg-type]


def test_ddp_consolidates_over_every_rank(seed: int, tmp_path: Path) -> None:
    """Lightning ``ddp_spawn`` on 2 CPU processes: each rank consolidates on its own shard of the train
    dataloader, and every rank gets the Fisher of the whole data set (``tests/helpers/lightning_ddp_job.py``)."""
    import lightning_ddp_job as job

    seed = seed % 100_000
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HELPERS), *sys.path]), "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(
            [sys.executable, str(HELPERS / "lightning_ddp_job.py"), str(seed), str(tmp_path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"seed={seed}: the Lightning DDP job did not finish in {e.timeout} s") from None
    assert done.returncode == 0, f"seed={seed}: the Lightning DDP job failed:\n{done.stderr[-4000:]}"
    data = job.make_data(seed)
    ref = reference_fisher(job.make_net(seed), [data.tensors], kind="exact")
    for rank in range(2):
        got = torch.load(tmp_path / f"fisher.{rank}.pt")
        err = relative_error(got, ref)
        assert err <= 1e-4, f"seed={seed}: rank {rank}: rel. error {err:.2e} against the reference"
