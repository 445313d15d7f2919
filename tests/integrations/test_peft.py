"""EWC with PEFT/LoRA, both recipes of ``ewc_rs.integrations.peft``.

(a) Plain ``EWC`` on a PEFT model: the Fisher's keys are exactly the LoRA parameters (the base is
    frozen), its values the float64 reference's, and it keeps task A when the same adapter goes on
    to learn task B.
(b) ``lora_delta_penalty``: value and gradient w.r.t. the LoRA parameters against a naive float64
    computation on the materialised merged weights W0 + ΔW (which also match PEFT's own
    ``merge_and_unload``), for a plain MLP and for a GPT-2 whose ``Conv1D`` layers are
    ``fan_in_fan_out``; and it keeps task A when a new adapter learns task B.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

peft = pytest.importorskip("peft", reason="the PEFT integration needs peft (extra [peft])")

from ewc_rs import EWC, fisher_diag  # noqa: E402
from ewc_rs.integrations.peft import lora_delta_penalty, lora_layers  # noqa: E402
from reference import reference_fisher, relative_error  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py

DIM, HIDDEN, CLASSES, RANK, ALPHA = 10, 24, 3, 4, 8


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def mlp(seed: int) -> MLP:
    torch.manual_seed(seed)
    return MLP()


def with_lora(model: nn.Module, *, random_b: bool = False, targets: Any = ("fc1", "fc2"), **kw: Any) -> Any:
    """LoRA on ``targets``; ``random_b``: B drawn at random too (PEFT's default B = 0 makes ΔW = 0)."""
    config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=list(targets), init_lora_weights=not random_b, **kw
    )
    return peft.get_peft_model(model, config)


def teacher_task(n: int, g: torch.Generator, teacher: Tensor) -> tuple[Tensor, Tensor]:
    x = torch.randn(n, DIM, generator=g)
    return x, (x @ teacher).argmax(1)


def train(model: nn.Module, data: tuple[Tensor, Tensor], penalty: Any = None, *, steps: int = 150) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = data
    for i in range(steps):
        xb, yb = x[(i * 32) % len(x) :][:32], y[(i * 32) % len(y) :][:32]
        loss = F.cross_entropy(model(xb), yb) + (penalty() if penalty is not None else 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()


def loss_on(model: nn.Module, data: tuple[Tensor, Tensor]) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(data[0]), data[1]))


# ------------------------------------------------------------------------------------------- (a)
def test_plain_ewc_on_a_peft_model_protects_the_adapters(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(DIM, CLASSES, generator=g)
    task_a, task_b, test_a = (
        teacher_task(256, g, teacher),
        teacher_task(256, g, -teacher),
        teacher_task(512, g, teacher),
    )
    model = with_lora(mlp(seed % 100_000), random_b=True)
    ewc = EWC(model, lam=1e3)
    train(model, task_a)
    fisher = ewc.consolidate([(task_a[0][i : i + 64], task_a[1][i : i + 64]) for i in range(0, 256, 64)])
    lora = {n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert set(fisher) == lora and len(lora) == 4, f"seed={seed}: Fisher keys {sorted(fisher)}"
    expected = reference_fisher(model, [task_a], kind="exact")
    err = relative_error({n: f.double() for n, f in fisher.items()}, expected)
    assert err < 1e-4, f"seed={seed}: relative error {err:.2e} of the adapters' Fisher"

    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = {}
    for name in ("ewc", "plain"):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(weights[n])
        train(model, task_b, (lambda: ewc.penalty(model)) if name == "ewc" else None)
        losses[name] = loss_on(model, test_a)
    assert losses["ewc"] < losses["plain"] - 0.3, f"seed={seed}: task A's loss after B {losses}"


# ------------------------------------------------------------------------------------------- (b)
def naive_merged_penalty(model: Any, base_weights: dict[str, Tensor], fisher: dict[str, Tensor], lam: float) -> Tensor:
    """(λ/2) Σ F (W − W0)² in float64 with W = W0 + (α/r) B @ A materialised (transposed for fan_in_fan_out)."""
    total = torch.zeros((), dtype=torch.float64)
    for name, layer in lora_layers(model):
        a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        delta = (ALPHA / RANK) * (b @ a)
        w0 = base_weights[f"{name}.weight"].double()
        merged = w0 + (delta.T if layer.fan_in_fan_out else delta)
        total = total + (fisher[f"{name}.weight"].double() * (merged - w0).square()).sum()
    return 0.5 * lam * total


def lora_grads(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def check_against_merged(base: nn.Module, peft_model: Any, g: torch.Generator, seed: int) -> None:
    base_weights = {n: p.detach().clone() for n, p in base.named_parameters()}
    fisher = {n: torch.rand(p.shape, generator=g, dtype=torch.float64).float() for n, p in base_weights.items()}
    lam = float(torch.empty(()).uniform_(1.0, 100.0, generator=g))

    merged = copy.deepcopy(peft_model).merge_and_unload()
    for name, layer in lora_layers(peft_model):
        a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        delta = (ALPHA / RANK) * (b @ a)
        expected = base_weights[f"{name}.weight"].double() + (delta.T if layer.fan_in_fan_out else delta)
        got = merged.get_submodule(name).weight.double()
        err = relative_error({name: got}, {name: expected})
        assert err < 1e-6, f"seed={seed} {name}: merge_and_unload's weight off W0 + ΔW by {err:.2e} (relative)"

    peft_model.zero_grad(set_to_none=True)
    value = lora_delta_penalty(peft_model, fisher, lam)
    value.backward()
    got_grads = lora_grads(peft_model)
    peft_model.zero_grad(set_to_none=True)
    naive = naive_merged_penalty(peft_model, base_weights, fisher, lam)
    naive.backward()
    assert value.dtype == torch.float32 and value.dim() == 0
    got, want = float(value.detach()), float(naive.detach())
    assert want > 0 and abs(got - want) <= 1e-5 * want, f"seed={seed}: {got} vs naive {want}"
    expected_grads = lora_grads(peft_model)
    assert set(got_grads) == set(expected_grads) and expected_grads, f"seed={seed}"
    err = relative_error(got_grads, expected_grads)
    assert err < 1e-5, f"seed={seed}: gradient w.r.t. the LoRA parameters off by {err:.2e} (relative)"


def test_lora_delta_penalty_is_the_penalty_of_the_merged_weights(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    base = mlp(seed % 100_000)
    peft_model = with_lora(base, random_b=True)
    assert [n for n, _ in lora_layers(peft_model)] == ["fc1", "fc2"]
    check_against_merged(copy.deepcopy(mlp(seed % 100_000)), peft_model, g, seed)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")
def test_lora_delta_penalty_on_gpt2_fan_in_fan_out(seed: int) -> None:
    transformers = pytest.importorskip("transformers", reason="the GPT-2 case needs transformers")
    g = torch.Generator().manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=1,
        n_head=2,
        n_embd=16,
        vocab_size=50,
        n_positions=16,
        num_labels=3,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed % 100_000)
    base = transformers.GPT2ForSequenceClassification(config)
    original = copy.deepcopy(base)
    peft_model = with_lora(base, random_b=True, targets=["c_attn", "c_fc"], fan_in_fan_out=True)
    names = [n for n, _ in lora_layers(peft_model)]
    assert names == ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"], names
    check_against_merged(original, peft_model, g, seed)


def test_lora_delta_penalty_keeps_task_a(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(DIM, CLASSES, generator=g)
    task_a, task_b, test_a = (
        teacher_task(256, g, teacher),
        teacher_task(256, g, -teacher),
        teacher_task(512, g, teacher),
    )
    base = mlp(seed % 100_000)
    train(base, task_a)
    fisher = fisher_diag(base, [task_a])
    losses = {}
    for name in ("ewc", "plain"):
        torch.manual_seed(seed % 100_000 + 1)  # the same adapter initialisation in both runs
        peft_model = with_lora(copy.deepcopy(base), targets=["fc1", "fc2", "head"])
        penalty = (lambda m=peft_model: lora_delta_penalty(m, fisher, 1e3)) if name == "ewc" else None
        train(peft_model, task_b, penalty)
        losses[name] = loss_on(peft_model, test_a)
    assert losses["ewc"] < losses["plain"] - 0.3, f"seed={seed}: task A's loss after B {losses}"


def test_lora_delta_penalty_checks_its_inputs() -> None:
    model = with_lora(mlp(0))
    fisher = {n: torch.ones_like(p) for n, p in mlp(0).named_parameters()}
    with pytest.raises(ValueError, match="no entry 'fc2.weight'"):
        lora_delta_penalty(model, {"fc1.weight": fisher["fc1.weight"]}, 1.0)
    with pytest.raises(ValueError, match="has shape"):
        lora_delta_penalty(model, {**fisher, "fc1.weight": torch.ones(2, 2)}, 1.0)
    with pytest.raises(ValueError, match="lam"):
        lora_delta_penalty(model, fisher, -1.0)
    with pytest.raises(ValueError, match="no LoRA layer"):
        lora_delta_penalty(mlp(0), fisher, 1.0)
    with pytest.raises(ValueError, match="no LoRA layer"):
        lora_delta_penalty(model, fisher, 1.0, adapters=["other"])
    merged = with_lora(mlp(0))
    merged.merge_adapter()
    with pytest.raises(ValueError, match="merged into the base weight"):
        lora_delta_penalty(merged, fisher, 1.0)
    dora = with_lora(mlp(0), use_dora=True)
    with pytest.raises(ValueError, match="LoRA variant"):
        lora_delta_penalty(dora, fisher, 1.0)
    assert float(lora_delta_penalty(model, fisher, 1.0).detach()) == 0.0  # PEFT's default B = 0: ΔW = 0
