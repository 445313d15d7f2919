"""``ewc_rs.integrations.transformers.EWCTrainer`` on a tiny BERT built from a config (random weights,
nothing downloaded) and synthetic token data.

* The penalty counts once per optimizer step whatever the gradient accumulation and whichever way the
  Trainer scales the loss: with learning rate 0 the weights stay at θ0, and the ``.grad`` seen before
  each optimizer step with EWC minus the one without equals λF(θ0−θ*) of the float64 reference,
  including the last, shorter accumulation step.
* ``trainer.consolidate()`` estimates F on the trainer's own train dataloader (against the reference).
* EWC does its job: after task B (labels that contradict task A's), task A's loss is lower with EWC.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

transformers = pytest.importorskip(
    "transformers", reason="the Trainer integration needs transformers (extra [transformers])"
)

from ewc_helpers import naive_value_and_grads, perturb, snapshot  # noqa: E402
from ewc_rs import EWC, fisher_diag  # noqa: E402
from ewc_rs.integrations.transformers import EWCTrainer, LabelSplit  # noqa: E402
from reference import reference_fisher, relative_error  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.py

SEQ, VOCAB, CLASSES = 8, 50, 3


def tiny_bert(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        num_hidden_layers=1,
        num_attention_heads=2,
        hidden_size=16,
        intermediate_size=32,
        vocab_size=VOCAB,
        max_position_embeddings=16,
        num_labels=CLASSES,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)


def token_task(task: str, n: int, g: torch.Generator) -> list[dict[str, Tensor]]:
    """Filler tokens with one marker token 1..3 at a random place among the first four; task "a": the
    label is the marker's class, task "b": the next class (contradicting "a")."""
    x = torch.randint(10, VOCAB, (n, SEQ), generator=g)
    cls = torch.randint(0, CLASSES, (n,), generator=g)
    x[torch.arange(n), torch.randint(0, 4, (n,), generator=g)] = 1 + cls
    y = cls if task == "a" else (cls + 1) % CLASSES
    mask = torch.ones(SEQ, dtype=torch.long)
    return [{"input_ids": x[i], "attention_mask": mask, "labels": y[i]} for i in range(n)]


def args(tmp_path: Any, **overrides: Any) -> Any:
    base: dict[str, Any] = dict(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        per_device_train_batch_size=16,
        num_train_epochs=4,
        learning_rate=1e-2,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        seed=0,
    )
    base.update(overrides)
    return transformers.TrainingArguments(**base)


def collate(data: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {key: torch.stack([d[key] for d in data]) for key in data[0]}


def task_loss(model: nn.Module, data: list[dict[str, Tensor]]) -> float:
    model.eval()
    with torch.no_grad():
        x = torch.stack([d["input_ids"] for d in data])
        y = torch.stack([d["labels"] for d in data])
        return float(F.cross_entropy(model(input_ids=x).logits, y))


class GradsBeforeStep(transformers.TrainerCallback):
    """Records every parameter's ``.grad`` before each optimizer step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Tensor]] = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.steps.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def sum_ce(outputs: Any, labels: Tensor, num_items_in_batch: Any = None) -> Tensor:
    return F.cross_entropy(outputs["logits"], labels, reduction="sum") / num_items_in_batch


#: How the Trainer scales the loss for accumulation: the model normalises by ``num_items_in_batch``
#: (BERT accepts loss kwargs), training_step divides the mean by the steps, or a ``compute_loss_func``.
LOSS_PATHS: dict[str, Callable[[Any], None]] = {
    "model_num_items": lambda trainer: None,
    "divided_by_steps": lambda trainer: setattr(trainer, "model_accepts_loss_kwargs", False),
    "compute_loss_func": lambda trainer: setattr(trainer, "compute_loss_func", sum_ce),
}


@pytest.mark.parametrize("path", sorted(LOSS_PATHS))
def test_penalty_counts_once_per_optimizer_step(path: str, seed: int, tmp_path: Any) -> None:
    g = torch.Generator().manual_seed(seed)
    model = tiny_bert(seed % 100_000)
    lam = 50.0
    ewc = EWC(model, lam=lam)
    fisher = ewc.consolidate(LabelSplit([collate(token_task("a", 6, g))]), kind="exact")  # ModelOutput.logits
    star = snapshot(model)
    perturb(model, g, scale=0.05)
    value, penalty_grads = naive_value_and_grads(model, [(star, fisher)], lam)
    data = token_task("b", 3, g)  # batch 1, accumulation 2: optimizer steps of 2 and 1 micro-batches

    def grads_before_steps(ewc_or_none: Optional[EWC]) -> tuple[list[dict[str, Tensor]], list[dict[str, Any]]]:
        run_args = args(
            tmp_path,
            per_device_train_batch_size=1,
            gradient_accumulation_steps=2,
            num_train_epochs=1,
            learning_rate=0.0,
            max_grad_norm=0.0,
            optim="sgd",
            logging_strategy="steps",
            logging_steps=1,
        )
        recorder = GradsBeforeStep()
        kw: dict[str, Any] = dict(model=model, args=run_args, train_dataset=data, callbacks=[recorder])
        trainer = EWCTrainer(ewc=ewc_or_none, **kw) if ewc_or_none else transformers.Trainer(**kw)
        LOSS_PATHS[path](trainer)
        trainer.train()
        return recorder.steps, trainer.state.log_history

    with_ewc, logs = grads_before_steps(ewc)
    without, _ = grads_before_steps(None)
    assert len(with_ewc) == len(without) == 2, f"seed={seed}: expected 2 optimizer steps"
    for step, (a, b) in enumerate(zip(with_ewc, without)):
        added = {n: a[n] - b.get(n, torch.zeros_like(grad)) for n, grad in penalty_grads.items()}
        err = relative_error(added, penalty_grads)
        assert err < 1e-4, f"seed={seed} path={path} step={step}: added gradient off λF(θ−θ*) by {err:.2e}"
    logged = [entry["ewc_penalty"] for entry in logs if "ewc_penalty" in entry]
    assert len(logged) == 2 and all(abs(v - value) <= 1e-4 * value for v in logged), (
        f"seed={seed}: logged {logged}, expected {value} twice"
    )


class Logits(nn.Module):
    """The reference needs logits: ``inner(**x).logits`` (parameter names gain the prefix ``inner.``)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, **x: Tensor) -> Tensor:
        return self.inner(**x).logits


def test_consolidate_reads_the_trainers_train_dataloader(seed: int, tmp_path: Any) -> None:
    g = torch.Generator().manual_seed(seed)
    model = tiny_bert(seed % 100_000)
    data = token_task("a", 10, g)
    trainer = EWCTrainer(
        model=model, args=args(tmp_path, per_device_train_batch_size=4), train_dataset=data, ewc=EWC(model, lam=1.0)
    )
    fisher = trainer.consolidate(kind="exact")
    batch = collate(data)
    labels = batch.pop("labels")
    expected = reference_fisher(Logits(model), [(batch, labels)], kind="exact")
    expected = {name.removeprefix("inner."): f for name, f in expected.items()}
    err = relative_error({n: f.double() for n, f in fisher.items()}, expected)
    assert err < 1e-4, f"seed={seed}: relative error {err:.2e} of the Fisher from the train dataloader"
    assert trainer.ewc.num_tasks == 1
    assert isinstance(model(**batch), transformers.modeling_outputs.SequenceClassifierOutput), "model's output changed"


def test_evaluation_loss_has_no_penalty(seed: int, tmp_path: Any) -> None:
    g = torch.Generator().manual_seed(seed)
    model = tiny_bert(seed % 100_000)
    ewc = EWC(model, lam=1e3)
    ewc.consolidate(LabelSplit([collate(token_task("a", 8, g))]))
    perturb(model, g)
    assert float(ewc.penalty(model).detach()) > 0, f"seed={seed}"
    data = token_task("a", 8, g)
    plain = transformers.Trainer(model=model, args=args(tmp_path)).evaluate(data)["eval_loss"]
    with_ewc = EWCTrainer(model=model, args=args(tmp_path), ewc=ewc).evaluate(data)["eval_loss"]
    assert with_ewc == pytest.approx(plain, rel=1e-6), f"seed={seed}"


def test_label_split_and_arguments_are_checked(tmp_path: Any) -> None:
    batch = {"input_ids": torch.zeros(2, SEQ, dtype=torch.long), "labels": torch.zeros(2, dtype=torch.long)}
    ((inputs, labels),) = list(LabelSplit([batch]))
    assert set(inputs) == {"input_ids"} and labels is batch["labels"]
    with pytest.raises(TypeError, match="dataloader: batch 0 is a tuple"):
        list(LabelSplit([(batch["input_ids"], batch["labels"])]))
    with pytest.raises(ValueError, match="has no 'label'"):
        list(LabelSplit([batch], ["label"]))
    with pytest.raises(ValueError, match="label_names: expected one"):
        LabelSplit([batch], ["start_positions", "end_positions"])
    with pytest.raises(TypeError, match="ewc: expected an ewc_rs.EWC"):
        EWCTrainer(model=tiny_bert(0), args=args(tmp_path), ewc=object())


def test_ewc_keeps_task_a(seed: int, tmp_path: Any) -> None:
    """Task A, consolidate, then task B (contradicting labels) with and without EWC from the same state."""
    g = torch.Generator().manual_seed(seed)
    model = tiny_bert(seed % 100_000)
    task_a, task_b, test_a = token_task("a", 128, g), token_task("b", 128, g), token_task("a", 256, g)
    # A is learnt well (loss ≈ 0.01), so the exact Fisher is small and λ large. With λ = 1e5 the margin
    # plain − ewc fell below 0.5 in 2 of 40 seeds; with λ = 1e7 it was 4.9 ± 0.9 (min 1.5) over 80 seeds.
    ewc = EWC(model, lam=1e7)
    trainer = EWCTrainer(model=model, args=args(tmp_path, num_train_epochs=8), train_dataset=task_a, ewc=ewc)
    trainer.train()
    trainer.consolidate(kind="exact")
    after_a, weights, state = task_loss(model, test_a), snapshot(model), ewc.state_dict()

    losses = {}
    for name in ("ewc", "plain"):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(weights[n])
        ewc.load_state_dict(state)
        kw: dict[str, Any] = dict(model=model, args=args(tmp_path), train_dataset=task_b)
        trainer = EWCTrainer(ewc=ewc, **kw) if name == "ewc" else transformers.Trainer(**kw)
        trainer.train()
        losses[name] = task_loss(model, test_a)
    assert losses["ewc"] < losses["plain"] - 0.5, f"seed={seed}: task A loss after A {after_a:.3f}, after B {losses}"


def test_consolidate_a_causal_lm_from_the_trainer(seed: int, tmp_path: Any) -> None:
    """A GPT-2 causal LM: ``consolidate(likelihood="causal_lm")`` reads the trainer's own dict batches
    (``labels`` with ignored positions) and gives the Fisher of ``fisher_diag`` on the same data."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed % 100_000)
    config = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=16, vocab_size=VOCAB, n_positions=SEQ, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, VOCAB, (6, SEQ), generator=g)
    labels = ids.clone()
    labels[:, -2:] = -100  # padding: left out of each sample's log-likelihood
    data = [{"input_ids": ids[i], "labels": labels[i]} for i in range(6)]
    trainer = EWCTrainer(
        model=model, args=args(tmp_path, per_device_train_batch_size=3), train_dataset=data, ewc=EWC(model, lam=1.0)
    )
    trainer.args.dataloader_drop_last = False
    got = trainer.consolidate(kind="empirical", likelihood="causal_lm")
    loader = trainer.get_train_dataloader()
    batches = [({"input_ids": b["input_ids"]}, b["labels"]) for b in loader]
    # the trainer's loader shuffles: same samples, maybe another order, so the same Fisher
    want = fisher_diag(model, batches, kind="empirical", likelihood="causal_lm")
    err = relative_error({n: f.double() for n, f in got.items()}, {n: f.double() for n, f in want.items()})
    assert err < 1e-5, f"seed={seed}: relative error {err:.2e}"
    assert trainer.ewc.num_tasks == 1
