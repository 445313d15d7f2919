"""``ewc_rs.integrations.avalanche.EWCPlugin`` in Avalanche's ``Naive`` strategy, with a plain MLP and
synthetic tensor experiences.

* After an experience, the stored Fisher is the per-sample Fisher of that experience's data (the
  float64 reference; Avalanche's own plugin squares minibatch gradients instead), and the gradient of
  the next experience's first step is the data gradient plus λF(θ0−θ*) (not 0: Avalanche's plugin
  once had an always-zero penalty).
* EWC does its job: after experience B, experience A's loss is lower with the plugin than without.

(``import avalanche`` alone takes several seconds: it imports its whole tree, torchvision included.)
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

pytest.importorskip("avalanche", reason="the Avalanche integration needs avalanche-lib (extra [avalanche])")

from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets  # noqa: E402
from avalanche.benchmarks.utils import as_taskaware_classification_dataset  # noqa: E402
from avalanche.models import MultiTaskModule  # noqa: E402
from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin  # noqa: E402
from avalanche.training.supervised import Naive  # noqa: E402

from ewc_helpers import naive_value_and_grads, perturb, snapshot  # noqa: E402
from ewc_rs.integrations.avalanche import EWCPlugin, ExperienceBatches  # noqa: E402
from reference import reference_fisher, relative_error  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py

DIM, CLASSES = 10, 3


class Tensors(TensorDataset):
    """A TensorDataset with the ``targets`` field Avalanche's classification datasets read."""

    @property
    def targets(self) -> Tensor:
        return self.tensors[1]


def teacher_data(n: int, g: torch.Generator, teacher: Tensor) -> Tensors:
    x = torch.randn(n, DIM, generator=g)
    return Tensors(x, (x @ teacher).argmax(1))


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, 32), nn.Tanh(), nn.Linear(32, CLASSES))


class GradsAfterBackward(SupervisedPlugin):  # type: ignore[misc]
    """Records every ``.grad`` after each backward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, Tensor]] = []

    def after_backward(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self.seen.append({n: p.grad.detach().clone() for n, p in strategy.model.named_parameters()})


def naive(model: nn.Module, plugins: list, *, lr: float, epochs: int = 1, batch: int = 32) -> Any:
    return Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=lr)
        if lr == 0
        else torch.optim.Adam(model.parameters(), lr=lr),
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=batch,
        train_epochs=epochs,
        device="cpu",
        plugins=plugins,
        evaluator=EvaluationPlugin(loggers=[]),
    )


def experiences(*datasets: Tensors) -> list[Any]:
    return list(benchmark_from_datasets(train=[as_taskaware_classification_dataset(d) for d in datasets]).train_stream)


@pytest.mark.filterwarnings("ignore:No loggers specified")
def test_fisher_of_the_experience_and_penalty_gradient(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    net = mlp(seed % 100_000)
    data_a, data_b = (
        teacher_data(20, g, torch.randn(DIM, CLASSES, generator=g)),
        teacher_data(8, g, torch.randn(DIM, CLASSES, generator=g)),
    )
    exp_a, exp_b = experiences(data_a, data_b)
    lam = 30.0
    plugin = EWCPlugin(lam, kind="empirical", batch_size=6)
    naive(net, [plugin], lr=0.0).train(exp_a, eval_streams=[])  # lr 0: θ* = the initial weights

    assert plugin.ewc is not None and plugin.ewc.num_tasks == 1, f"seed={seed}"
    expected = reference_fisher(net, [(data_a.tensors[0], data_a.tensors[1])], kind="empirical")
    star = snapshot(net)
    fisher = plugin.ewc.state_dict()["tasks"][0]["diagonal"]
    err = relative_error({n: f.double() for n, f in fisher.items()}, expected)
    assert err < 1e-4, f"seed={seed}: relative error {err:.2e} of the experience's Fisher"

    perturb(net, g, scale=0.2)
    _, penalty = naive_value_and_grads(net, [(star, fisher)], lam)
    assert any(float(p.abs().max()) > 0 for p in penalty.values()), f"seed={seed}: zero penalty gradient"
    with_ewc, plain = GradsAfterBackward(), GradsAfterBackward()
    naive(net, [plugin, with_ewc], lr=0.0, batch=8).train(exp_b, eval_streams=[])
    naive(net, [plain], lr=0.0, batch=8).train(exp_b, eval_streams=[])
    added = {n: with_ewc.seen[0][n] - plain.seen[0][n] for n in penalty}
    err = relative_error(added, penalty)
    assert err < 1e-4, f"seed={seed}: gradient added by the plugin off λF(θ−θ*) by {err:.2e} (relative)"
    assert plugin.ewc.num_tasks == 2, f"seed={seed}: experience B consolidated too"


@pytest.mark.filterwarnings("ignore:No loggers specified")
def test_ewc_keeps_experience_a(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(DIM, CLASSES, generator=g)
    exp_a, exp_b = experiences(teacher_data(256, g, teacher), teacher_data(256, g, -teacher))
    test_a = teacher_data(512, g, teacher)
    losses = {}
    for name in ("ewc", "plain"):
        net = mlp(seed % 100_000)
        plugins = [EWCPlugin(1e3)] if name == "ewc" else []
        strategy = naive(net, plugins, lr=1e-2, epochs=5)
        for exp in (exp_a, exp_b):
            strategy.train(exp, eval_streams=[])
        with torch.no_grad():
            losses[name] = float(F.cross_entropy(net(test_a.tensors[0]), test_a.tensors[1]))
    assert losses["ewc"] < losses["plain"] - 0.5, f"seed={seed}: experience A's loss after B {losses}"


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="lam"):
        EWCPlugin(-1.0)
    with pytest.raises(ValueError, match="kind"):
        EWCPlugin(1.0, kind="diagonal")
    with pytest.raises(ValueError, match="batch_size"):
        EWCPlugin(1.0, batch_size=0)

    class TwoHeads(MultiTaskModule):  # type: ignore[misc]
        def forward_single_task(self, x: Tensor, task_label: int) -> Tensor:
            return x

    with pytest.raises(TypeError, match="MultiTaskModule"):
        EWCPlugin(1.0).bind(TwoHeads())
    plugin = EWCPlugin(1.0)
    plugin.bind(mlp(0))
    with pytest.raises(ValueError, match="not the one EWCPlugin was bound to"):
        plugin.bind(mlp(1))
    with pytest.raises(ValueError, match="empty"):
        ExperienceBatches(Tensors(torch.zeros(0, DIM), torch.zeros(0, dtype=torch.long)), 4)
    three = Tensors(torch.zeros(5, DIM), torch.arange(5))
    ((x, y),) = list(ExperienceBatches(as_taskaware_classification_dataset(three), 8))
    assert x.shape == (5, DIM) and torch.equal(y, torch.arange(5))
