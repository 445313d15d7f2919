"""Which 8-bit code to store a diagonal Fisher in, measured on the Fishers of trained models.

A diagonal Fisher F is non-negative and spans many orders of magnitude (tens of binades inside
one tensor). This script trains three models on a task A, estimates their empirical Fisher, moves
the weights with a few steps on a task B, and measures how much each candidate 8-bit code of F
changes the EWC penalty P = Σ F d² and its gradient F ⊙ d at that displacement d = θ_B − θ*.

Models (CPU, the torch threads of ``ewc_rs.demo.train.set_threads``: ``$EWC_RS_THREADS``, else 1):

``mlp``
    ``ewc_rs.demo.models.permuted_mlp(seed=0)`` (784-256-256-10), 1 epoch of Adam (lr 1e-3,
    batch 128) on MNIST (``ewc_rs.demo.datasets.load_split("mnist")``: the official split, or the
    t10k file split 8000 / 2000 when the train files are missing). Task B: the same images with
    their pixels shuffled by one permutation (``torch.Generator().manual_seed(1)``).
``resnet18``
    ``torchvision.models.resnet18(num_classes=10)`` with a 3×3 stride-1 first convolution on one
    input channel and no max-pool, 1 epoch of Adam (lr 1e-3, batch 64) on 4000 Fashion-MNIST
    training images (about 2 s a step on one thread, 63 steps). Task B: 1000 MNIST images.
``gpt2``
    ``transformers.GPT2LMHeadModel`` (4 layers, width 256, 4 heads, vocabulary 2000, 128
    positions; 3.7M parameters), 150 steps of AdamW (lr 1e-3, batch 16 × 64 tokens, labels = input
    ids) on sequences of a first-order Markov chain over the 2000 tokens: each token has 32
    successors (drawn with seed 0) with Zipf probabilities ∝ 1/rank^1.1. Task B: another chain
    (seed 1).

After task A: θ* = the weights; F = ``ewc_rs.fisher_diag(model, batches, kind="empirical")``
(``likelihood="causal_lm"`` for gpt2) on 512 held-out task-A samples. Then 50 steps on task B
(a fresh Adam/AdamW, same learning rate and batch, no penalty) give θ_B, and d = θ_B − θ*.
F (``ewc_rs.save_fisher``), θ* and θ_B (safetensors) are cached under ``--cache``
(default ``~/.cache/ewc_rs/fisher8``) in a folder named by the model and a hash of its
settings, so a second run only measures the codes (seconds).

Codes, emulated in float64 from the float32 F, per tensor (each parameter's F flattened, cut into
blocks of B contiguous values, the last block possibly short), B ∈ {32, 64, 128, 256, 1024, 4096}:

``linear``
    s = max(F_block) (float32, 4 bytes a block); q = round(F / s · 255) ∈ [0, 255]; F8 = q/255 · s.
``log``
    Over the block's positive values, hi = log₂ max, lo = max(log₂ min, hi − R) for a range cap
    R ∈ {16, 24, 32, 48, inf} binades, step = (hi − lo)/254; (lo, step) stored as two float32
    (8 bytes a block), and the codes are rounded against the stored pair. k = round((log₂ F − lo)
    / step); code 0 for F = 0 or k < 0 (more than half a step below 2^lo: flushed to zero), else
    q = clamp(1 + k, 1, 255) (step = 0: q = 1 for log₂ F ≥ lo − ½); F8 = 2^(lo + (q − 1)·step)
    for q ≥ 1, 0 for q = 0. The conventions of ``src/fisher8.rs``.
``bfloat16``
    For comparison: F cast to bfloat16 (2 bytes a parameter), no blocks.

Figures per model and code: bytes a parameter (1 + scale bytes / B; ``actual`` counts each
tensor's short last block), the penalty error |P8 − P32| / P32, the gradient error
‖F8 ⊙ d − F ⊙ d‖₂ / ‖F ⊙ d‖₂ (one norm over all parameters), the largest relative error
|F8 − F| / F over the elements with F > 0, and the fraction of those decoded as 0. The
recommendation: among the 8-bit codes with penalty error ≤ 1% and gradient error ≤ 2% on every
model, the log code with the largest B whose gradient error is ≤ 1% on every model if there is
one, else the one with the fewest bytes.

Then the implementation itself: ``EWC(fisher_bits=8)``'s code (``ewc_rs._blocks.fisher8.Fisher8``
with its block size and range) read by the fused penalty (``ewc_rs._core.penalty``, float32
parameters θ_B, θ* float32) against the same pass over the float32 F: the penalty error and the
gradient error (relative norm), which the issue bounds by 1% and 2%.

Usage: ``python benchmarks/fisher8_codes.py [--quick] [--models mlp,resnet18,gpt2] [--cache DIR]
[--data DIR]`` (MNIST / Fashion-MNIST from ``--data`` or ``$EWC_RS_DATA``, see
:mod:`ewc_rs.demo.datasets`). ``--quick``: tiny versions of the three models and a few steps,
a smoke test (under a minute), cached apart, written to ``fisher8_codes_quick.json``. Writes
``benchmarks/results/fisher8_codes.json`` (or under ``$EWC_RS_BENCH_RESULTS``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ewc_rs  # noqa: E402
from common import write_results  # noqa: E402
from ewc_rs.demo.datasets import load_split  # noqa: E402
from ewc_rs.demo.models import permuted_mlp  # noqa: E402
from ewc_rs.demo.train import TensorLoader, set_threads, subset, train_task  # noqa: E402

MODELS = ("mlp", "resnet18", "gpt2")
BLOCKS = (32, 64, 128, 256, 1024, 4096)
RANGES = (16.0, 24.0, 32.0, 48.0, math.inf)
#: Scale bytes a block: linear one float32 (s), log two (lo, step).
SCALE_BYTES = {"linear": 4, "log": 8}
CODE_ORDER = {"bfloat16": 0, "linear": 1, "log": 2}
STEPS = 254.0
PEN_MAX, GRAD_MAX, GRAD_PREFERRED = 0.01, 0.02, 0.01

# Settings of each model (hashed into its cache key); ``--quick`` replaces them by QUICK.
FULL: dict[str, dict[str, Any]] = {
    "mlp": {
        "hidden": 256,
        "train_samples": None,
        "epochs": 1,
        "lr": 1e-3,
        "batch": 128,
        "fisher_samples": 512,
        "b_steps": 50,
        "perm_seed": 1,
    },
    "resnet18": {
        "depth": [2, 2, 2, 2],
        "pool": 1,
        "train_samples": 4000,
        "epochs": 1,
        "lr": 1e-3,
        "batch": 64,
        "fisher_samples": 512,
        "b_samples": 1000,
        "b_steps": 50,
    },
    "gpt2": {
        "n_layer": 4,
        "n_embd": 256,
        "n_head": 4,
        "vocab": 2000,
        "n_positions": 128,
        "tokens": 64,
        "batch": 16,
        "steps": 150,
        "lr": 1e-3,
        "fanout": 32,
        "zipf": 1.1,
        "chain_seeds": [0, 1],
        "fisher_samples": 512,
        "b_steps": 50,
    },
}
QUICK: dict[str, dict[str, Any]] = {
    "mlp": {**FULL["mlp"], "hidden": 32, "train_samples": 1024, "fisher_samples": 64, "b_steps": 5},
    "resnet18": {
        **FULL["resnet18"],
        "depth": [1, 1, 1, 1],
        "pool": 2,
        "train_samples": 64,
        "batch": 16,
        "fisher_samples": 16,
        "b_samples": 64,
        "b_steps": 2,
    },
    "gpt2": {
        **FULL["gpt2"],
        "n_layer": 1,
        "n_embd": 32,
        "n_head": 2,
        "vocab": 200,
        "n_positions": 32,
        "tokens": 16,
        "batch": 8,
        "steps": 10,
        "fanout": 8,
        "fisher_samples": 32,
        "b_steps": 5,
    },
}

Batch = tuple[Any, torch.Tensor]
LossFn = Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- training


def cycle(loader: Iterable[Batch]) -> Iterator[Batch]:
    """The batches of ``loader``, pass after pass, without end."""
    while True:
        yield from loader


def train_steps(
    model: nn.Module, batches: Iterator[Batch], steps: int, opt: torch.optim.Optimizer, loss: LossFn
) -> float:
    """``steps`` optimizer steps on the next batches; returns the mean loss of the last 10 steps."""
    model.train()
    last: list[float] = []
    for _ in range(steps):
        x, y = next(batches)
        value = loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        last = (last + [float(value.detach())])[-10:]
    return sum(last) / max(len(last), 1)


def ce_loss(model: nn.Module, x: Any, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def lm_loss(model: nn.Module, x: Any, y: torch.Tensor) -> torch.Tensor:
    return model(**x, labels=y).loss


def batched(x: Any, y: torch.Tensor, size: int) -> list[Batch]:
    """``(inputs, targets)`` batches of ``size`` in order; a dict input is cut entry by entry."""
    out: list[Batch] = []
    for i in range(0, len(y), size):
        xi = {k: v[i : i + size] for k, v in x.items()} if isinstance(x, dict) else x[i : i + size]
        out.append((xi, y[i : i + size]))
    return out


def run_mlp(cfg: dict[str, Any], data_dir: Optional[str]) -> tuple[nn.Module, list[Batch], Callable[[], float], dict]:
    split = load_split("mnist", data_dir)
    x_tr, y_tr = subset(split.x_train, split.y_train, cfg["train_samples"])
    x_tr = x_tr.reshape(len(x_tr), -1)
    x_te = split.x_test.reshape(len(split.x_test), -1)[: cfg["fisher_samples"]]
    y_te = split.y_test[: cfg["fisher_samples"]]
    model = permuted_mlp(0, hidden=cfg["hidden"])
    losses = train_task(
        model, TensorLoader(x_tr, y_tr, cfg["batch"], shuffle=True, seed=0), epochs=cfg["epochs"], lr=cfg["lr"]
    )
    perm = torch.randperm(x_tr.shape[1], generator=torch.Generator().manual_seed(cfg["perm_seed"]))
    loader_b = TensorLoader(x_tr[:, perm], y_tr, cfg["batch"], shuffle=True, seed=1)

    def task_b() -> float:
        opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
        return train_steps(model, cycle(loader_b), cfg["b_steps"], opt, ce_loss)

    info = {"data": split.note, "train_loss_a": losses[-1], "train_samples_a": len(y_tr)}
    return model, batched(x_te, y_te, 64), task_b, info


def resnet(cfg: dict[str, Any]) -> nn.Module:
    import torchvision
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    if cfg["depth"] == [2, 2, 2, 2]:
        model: nn.Module = torchvision.models.resnet18(num_classes=10)
    else:
        model = ResNet(BasicBlock, cfg["depth"], num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def run_resnet18(
    cfg: dict[str, Any], data_dir: Optional[str]
) -> tuple[nn.Module, list[Batch], Callable[[], float], dict]:
    def images(x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(1)
        return F.avg_pool2d(x, cfg["pool"]) if cfg["pool"] > 1 else x

    fashion, mnist = load_split("fashion-mnist", data_dir), load_split("mnist", data_dir)
    x_tr, y_tr = subset(fashion.x_train, fashion.y_train, cfg["train_samples"])
    x_te, y_te = fashion.x_test[: cfg["fisher_samples"]], fashion.y_test[: cfg["fisher_samples"]]
    x_b, y_b = subset(mnist.x_train, mnist.y_train, cfg["b_samples"])
    model = resnet(cfg)
    losses = train_task(
        model, TensorLoader(images(x_tr), y_tr, cfg["batch"], shuffle=True, seed=0), epochs=cfg["epochs"], lr=cfg["lr"]
    )
    loader_b = TensorLoader(images(x_b), y_b, cfg["batch"], shuffle=True, seed=1)

    def task_b() -> float:
        opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
        return train_steps(model, cycle(loader_b), cfg["b_steps"], opt, ce_loss)

    info = {"data": [fashion.note, mnist.note], "train_loss_a": losses[-1], "train_samples_a": len(y_tr)}
    return model, batched(images(x_te), y_te, 32), task_b, info


class MarkovChain:
    """A first-order Markov chain over ``vocab`` tokens: each token has ``fanout`` successors
    (a seeded random choice), taken with Zipf probabilities ∝ 1/rank^``zipf``; the first token of
    a sequence is uniform."""

    def __init__(self, vocab: int, fanout: int, zipf: float, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.successors = torch.rand(vocab, vocab, generator=g).topk(fanout, dim=1).indices
        ranks = torch.arange(1, fanout + 1, dtype=torch.float64)
        self.probs = ranks.pow(-zipf) / ranks.pow(-zipf).sum()
        self.vocab = vocab

    def sample(self, n: int, length: int, seed: int) -> torch.Tensor:
        """``n`` sequences of ``length`` tokens, int64 ``[n, length]``."""
        g = torch.Generator().manual_seed(seed)
        rank = torch.multinomial(self.probs, n * (length - 1), replacement=True, generator=g).view(n, length - 1)
        tokens = [torch.randint(0, self.vocab, (n,), generator=g)]
        for t in range(length - 1):
            tokens.append(self.successors[tokens[-1], rank[:, t]])
        return torch.stack(tokens, 1)


def lm_batches(ids: torch.Tensor, size: int) -> list[Batch]:
    return batched({"input_ids": ids}, ids, size)


def run_gpt2(cfg: dict[str, Any], data_dir: Optional[str]) -> tuple[nn.Module, list[Batch], Callable[[], float], dict]:
    import transformers

    config = transformers.GPT2Config(
        n_layer=cfg["n_layer"],
        n_embd=cfg["n_embd"],
        n_head=cfg["n_head"],
        vocab_size=cfg["vocab"],
        n_positions=cfg["n_positions"],
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    chain_a, chain_b = (MarkovChain(cfg["vocab"], cfg["fanout"], cfg["zipf"], s) for s in cfg["chain_seeds"])
    n_a, n_b, b, t = cfg["steps"] * cfg["batch"], cfg["b_steps"] * cfg["batch"], cfg["batch"], cfg["tokens"]
    train_a = lm_batches(chain_a.sample(n_a, t, seed=10), b)
    held_out = lm_batches(chain_a.sample(cfg["fisher_samples"], t, seed=11), 32)
    train_b = lm_batches(chain_b.sample(n_b, t, seed=12), b)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
    loss_a = train_steps(model, iter(train_a), cfg["steps"], opt, lm_loss)

    def task_b() -> float:
        opt_b = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
        return train_steps(model, iter(train_b), cfg["b_steps"], opt_b, lm_loss)

    info = {"data": "synthetic Markov chains", "train_loss_a": loss_a, "uniform_loss": math.log(cfg["vocab"])}
    return model, held_out, task_b, info


RUNNERS = {"mlp": run_mlp, "resnet18": run_resnet18, "gpt2": run_gpt2}


# --------------------------------------------------------------------------- cache


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters()}


def prepare(
    name: str, cfg: dict[str, Any], cache: Path, data_dir: Optional[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """F, θ*, θ_B and facts of one model, from the cache or by training (then cached)."""
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(json.dumps({"model": name, **cfg}, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache / f"{name}-{key}"
    if (folder / "info.json").is_file():
        info = json.loads((folder / "info.json").read_text())
        fisher = dict(ewc_rs.load_fisher(folder / "fisher"))
        return (
            fisher,
            load_file(str(folder / "theta_star.safetensors")),
            load_file(str(folder / "theta_b.safetensors")),
            {
                **info,
                "cached": str(folder),
            },
        )
    t0 = time.perf_counter()
    model, held_out, task_b, info = RUNNERS[name](cfg, data_dir)
    t_a = time.perf_counter() - t0
    theta_star = weights(model)
    t0 = time.perf_counter()
    likelihood = "causal_lm" if name == "gpt2" else "categorical"
    fisher = ewc_rs.fisher_diag(model, held_out, kind="empirical", likelihood=likelihood)
    t_f = time.perf_counter() - t0
    t0 = time.perf_counter()
    info["train_loss_b"] = task_b()
    t_b = time.perf_counter() - t0
    theta_b = weights(model)
    info.update(
        config=cfg,
        parameters=sum(p.numel() for p in theta_star.values()),
        fisher_metadata={k: v for k, v in fisher.metadata.items()},
        seconds={"train_a": t_a, "fisher": t_f, "train_b": t_b},
    )
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=cache))
    try:
        ewc_rs.save_fisher(staging / "fisher", fisher, metadata={"model": name, "config": cfg})
        save_file(theta_star, str(staging / "theta_star.safetensors"))
        save_file(theta_b, str(staging / "theta_b.safetensors"))
        (staging / "info.json").write_text(json.dumps(info, indent=1) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dict(fisher), theta_star, theta_b, {**info, "cached": None}


# --------------------------------------------------------------------------- codes


def blocks_of(tensors: list[torch.Tensor], block: int) -> torch.Tensor:
    """The flattened tensors cut into rows of ``block`` values, each tensor's last row padded with
    zeros (F = 0 and d = 0 there: the padding decodes to 0 and weighs nothing), float64."""
    rows = []
    for t in tensors:
        flat = t.reshape(-1).to(torch.float64)
        pad = -flat.numel() % block
        rows.append(F.pad(flat, (0, pad)).view(-1, block))
    return torch.cat(rows)


def linear_code(f: torch.Tensor) -> torch.Tensor:
    """Decoded F of the linear code; ``f`` is ``[blocks, B]``."""
    s = f.amax(1, keepdim=True).to(torch.float32).to(torch.float64)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(f / safe * 255.0).clamp(0, 255)
    return q / 255.0 * s


def log_code(f: torch.Tensor, log_f: torch.Tensor, positive: torch.Tensor, r: float) -> torch.Tensor:
    """Decoded F of the log code with range cap ``r`` binades; ``log_f`` = log₂ F where F > 0."""
    inf = torch.tensor(math.inf, dtype=torch.float64)
    hi = torch.where(positive, log_f, -inf).amax(1, keepdim=True)
    has = hi > -math.inf
    low = torch.where(positive, log_f, inf).amin(1, keepdim=True)
    lo = torch.maximum(low, hi - r) if math.isfinite(r) else low
    lo = torch.where(has, lo, torch.zeros_like(lo)).to(torch.float32).to(torch.float64)
    hi = torch.where(has, hi, torch.zeros_like(hi))
    step = ((hi - lo) / STEPS).to(torch.float32).to(torch.float64)
    flat = step == 0
    k = torch.round((log_f - lo) / torch.where(flat, torch.ones_like(step), step))
    q = torch.where(k < -0.5, torch.zeros_like(k), (k + 1).clamp(1, 255))
    q = torch.where(flat, (log_f >= lo - 0.5).to(q.dtype), q)
    q = torch.where(positive, q, torch.zeros_like(q))
    return torch.where(q > 0, torch.exp2(lo + (q - 1) * step), torch.zeros_like(q))


def metrics(f8: torch.Tensor, f: torch.Tensor, d2: torch.Tensor, positive: torch.Tensor, ref: dict[str, float]) -> dict:
    """Errors of a decoded F8 against F (same layout), ``d2`` = d²."""
    p8 = float((f8 * d2).sum())
    grad = math.sqrt(float(((f8 - f).square() * d2).sum()))
    rel = ((f8 - f).abs() / torch.where(positive, f, torch.ones_like(f)))[positive]
    return {
        "penalty_err": abs(p8 - ref["P32"]) / ref["P32"],
        "grad_err": grad / ref["grad_norm"],
        "max_rel_err_F": float(rel.max()) if rel.numel() else 0.0,
        "zeroed": float((f8[positive] == 0).sum()) / max(int(positive.sum()), 1),
    }


def measure(fisher: dict[str, torch.Tensor], d: dict[str, torch.Tensor]) -> tuple[list[dict], dict[str, Any]]:
    """Every code's rows for one model, and facts about its F and d."""
    names = sorted(fisher)
    fs, ds = [fisher[n].float() for n in names], [d[n] for n in names]
    sizes = [t.numel() for t in fs]
    n = sum(sizes)
    f_all, d_all = torch.cat([t.reshape(-1).double() for t in fs]), torch.cat([t.reshape(-1).double() for t in ds])
    pos_all = f_all > 0
    ref = {
        "P32": float((f_all * d_all.square()).sum()),
        "grad_norm": float((f_all * d_all).norm()),
    }
    lf = f_all[pos_all].log2()
    facts = {
        "parameters": n,
        "tensors": len(names),
        "zero_fraction": 1.0 - float(pos_all.sum()) / n,
        "log2_min_positive": float(lf.min()),
        "log2_max": float(lf.max()),
        "log2_quantiles_1_50_99": [
            float(v)
            for v in torch.quantile(
                lf[:: max(1, lf.numel() // 1_000_000)], torch.tensor([0.01, 0.5, 0.99], dtype=torch.float64)
            )
        ],
        "d_norm": float(d_all.norm()),
        **ref,
    }
    rows = [{"code": "bfloat16", "R": None, "B": None, "bytes": 2.0, "actual_bytes": 2.0}]
    rows[0].update(metrics(f_all.to(torch.bfloat16).double(), f_all, d_all.square(), pos_all, ref))
    del f_all, d_all, pos_all
    for block in BLOCKS:
        f, dd = blocks_of(fs, block), blocks_of(ds, block).square_()
        positive = f > 0
        log_f = torch.where(positive, f, torch.ones_like(f)).log2()
        n_blocks = sum(-(-s // block) for s in sizes)
        for code in ("linear", "log"):
            nominal = 1.0 + SCALE_BYTES[code] / block
            actual = (n + SCALE_BYTES[code] * n_blocks) / n
            for r in RANGES if code == "log" else (None,):
                f8 = linear_code(f) if code == "linear" else log_code(f, log_f, positive, r)  # type: ignore[arg-type]
                row = {"code": code, "R": r, "B": block, "bytes": nominal, "actual_bytes": actual}
                row.update(metrics(f8, f, dd, positive, ref))
                rows.append(row)
                del f8
        del f, dd, positive, log_f
    rows.sort(key=lambda r: (CODE_ORDER[r["code"]], r["R"] or 0.0, r["B"] or 0))
    return rows, facts


# --------------------------------------------------------------------------- report


def implementation(
    fisher: dict[str, torch.Tensor], star: dict[str, torch.Tensor], theta: dict[str, torch.Tensor]
) -> dict:
    """The errors of ``EWC(fisher_bits=8)``'s own code, read by the fused penalty, against the
    same pass over the float32 F."""
    from ewc_rs._blocks.fisher8 import BLOCK, RANGE, Fisher8

    names = sorted(fisher)
    params = [theta[n].float().contiguous() for n in names]
    flat_star = torch.cat([star[n].float().reshape(-1) for n in names])
    dense = torch.cat([fisher[n].float().reshape(-1) for n in names])
    coded = [Fisher8.of(fisher[n].float()) for n in names]
    codes = torch.cat([c.codes.reshape(-1) for c in coded])
    scales = torch.cat([c.scales for c in coded])
    v32, g32, _ = ewc_rs._core.penalty(params, flat_star, dense, 2.0)
    v8, g8, _ = ewc_rs._core.penalty(params, flat_star, codes, 2.0, fisher_code=(scales, BLOCK))
    bytes_ = (codes.numel() + 4 * scales.numel()) / codes.numel()
    return {
        "B": BLOCK,
        "R": RANGE,
        "bytes": bytes_,
        "penalty_err": abs(float(v8) - float(v32)) / float(v32),
        "grad_err": float((g8.double() - g32.double()).norm() / g32.double().norm()),
    }


def fmt_r(r: Optional[float]) -> str:
    return "-" if r is None else ("inf" if math.isinf(r) else f"{r:g}")


def table(name: str, rows: list[dict], facts: dict[str, Any]) -> str:
    lines = [
        f"{name}: {facts['parameters']:,} parameters in {facts['tensors']} tensors; F = 0 for "
        f"{100 * facts['zero_fraction']:.2f}%; log2 F of the positive values from {facts['log2_min_positive']:.1f} "
        f"to {facts['log2_max']:.1f} (1%/50%/99%: "
        + "/".join(f"{v:.1f}" for v in facts["log2_quantiles_1_50_99"])
        + f"); ‖d‖ = {facts['d_norm']:.3g}, P32 = Σ F d² = {facts['P32']:.4g}",
        f"{'code':<9} {'R':>4} {'B':>5} {'bytes':>6} {'actual':>6} {'penalty err':>12} {'grad err':>10} "
        f"{'max rel F':>10} {'zeroed':>9}",
    ]
    for r in rows:
        lines.append(
            f"{r['code']:<9} {fmt_r(r['R']):>4} {r['B'] or '-':>5} {r['bytes']:>6.3f} {r['actual_bytes']:>6.3f} "
            f"{r['penalty_err']:>12.2e} {r['grad_err']:>10.2e} {r['max_rel_err_F']:>10.2e} {r['zeroed']:>9.2e}"
        )
    return "\n".join(lines)


def recommend(results: dict[str, list[dict]]) -> dict[str, Any]:
    """The recommendation over the models measured (rule: the module docstring)."""
    by_key: dict[tuple, list[dict]] = {}
    for rows in results.values():
        for r in rows:
            if r["code"] != "bfloat16":
                by_key.setdefault((r["code"], r["B"], r["R"]), []).append(r)
    summary = []
    for (code, block, r), rows in by_key.items():
        summary.append(
            {
                "code": code,
                "B": block,
                "R": r,
                "bytes": rows[0]["bytes"],
                "worst_penalty_err": max(x["penalty_err"] for x in rows),
                "worst_grad_err": max(x["grad_err"] for x in rows),
            }
        )
    ok = [s for s in summary if s["worst_penalty_err"] <= PEN_MAX and s["worst_grad_err"] <= GRAD_MAX]
    smallest = min(ok, key=lambda s: (s["bytes"], s["worst_grad_err"]), default=None)
    preferred = [s for s in ok if s["code"] == "log" and s["worst_grad_err"] <= GRAD_PREFERRED]
    best = max(preferred, key=lambda s: (s["B"], -s["worst_grad_err"], s["R"]), default=None)
    return {
        "rule": (
            f"penalty error <= {PEN_MAX:.0%} and gradient error <= {GRAD_MAX:.0%} on every model; among those, "
            f"the log code with the largest B and gradient error <= {GRAD_PREFERRED:.0%} on every model, "
            "else the fewest bytes"
        ),
        "models": sorted(results),
        "smallest_bytes": smallest,
        "preferred_log": best,
        "choice": best if best is not None else smallest,
    }


def jsonable(value: Any) -> Any:
    """``value`` with infinite floats (the uncapped range) written as the string ``"inf"``."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    return value


def describe(s: Optional[dict[str, Any]]) -> str:
    if s is None:
        return "none"
    return (
        f"{s['code']} B={s['B']} R={fmt_r(s['R'])} ({s['bytes']:.4f} bytes/param; worst penalty err "
        f"{s['worst_penalty_err']:.2e}, worst grad err {s['worst_grad_err']:.2e})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "ewc_rs" / "fisher8")
    ap.add_argument("--quick", action="store_true", help="tiny models and few steps (smoke test)")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    ap.add_argument("--data", default=None, help="folder with MNIST / Fashion-MNIST (default: $EWC_RS_DATA)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: $EWC_RS_THREADS, else 1)")
    args = ap.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown or not models:
        ap.error(f"--models: expected names among {', '.join(MODELS)}, got {args.models!r}")
    threads = set_threads(args.threads)
    t_start = time.perf_counter()
    settings = QUICK if args.quick else FULL
    results: dict[str, list[dict]] = {}
    implemented: dict[str, dict] = {}
    report: dict[str, Any] = {}
    for name in models:
        t0 = time.perf_counter()
        fisher, theta_star, theta_b, info = prepare(name, settings[name], args.cache.expanduser(), args.data)
        t_prep = time.perf_counter() - t0
        d = {n: theta_b[n].double() - theta_star[n].double() for n in fisher}
        t0 = time.perf_counter()
        rows, facts = measure(fisher, d)
        impl = implementation(fisher, theta_star, theta_b)
        t_meas = time.perf_counter() - t0
        results[name] = rows
        implemented[name] = impl
        report[name] = {
            "implementation": impl,
            "facts": facts,
            "training": info,
            "seconds": {"prepare": t_prep, "measure": t_meas},
            "rows": rows,
        }
        source = f"cached in {info['cached']}" if info.get("cached") else "trained now"
        print(table(name, rows, facts))
        print(
            f"ewc_rs fisher_bits=8 (log, B={impl['B']}, R={fmt_r(impl['R'])}; {impl['bytes']:.3f} "
            f"bytes/param) in the fused penalty vs float32 F: penalty err {impl['penalty_err']:.2e}, "
            f"grad err {impl['grad_err']:.2e}"
        )
        print(f"({source}; prepare {t_prep:.1f} s, measure {t_meas:.1f} s)\n", flush=True)
    rec = recommend(results)
    total = time.perf_counter() - t_start
    print(f"smallest-bytes code within the limits on {', '.join(rec['models'])}: {describe(rec['smallest_bytes'])}")
    print(f"log code with the largest B and grad err <= 1% everywhere: {describe(rec['preferred_log'])}")
    print(f"recommendation: {describe(rec['choice'])}")
    print("ewc_rs fisher_bits=8 in the fused penalty vs float32 F (limits: penalty 1%, gradient 2%):")
    for name, impl in implemented.items():
        ok = impl["penalty_err"] <= PEN_MAX and impl["grad_err"] <= GRAD_MAX
        print(
            f"  {name:<9} penalty err {impl['penalty_err']:.2e}  grad err {impl['grad_err']:.2e}  "
            f"{'within' if ok else 'OUTSIDE'} the limits"
        )
    name = "fisher8_codes_quick.json" if args.quick else "fisher8_codes.json"
    path = write_results(
        name,
        jsonable(
            {
                "quick": args.quick,
                "threads": threads,
                "blocks": list(BLOCKS),
                "ranges": [fmt_r(r) for r in RANGES],
                "models": report,
                "recommendation": rec,
                "seconds": total,
            }
        ),
    )
    print(f"total {total:.1f} s; wrote {path}")


if __name__ == "__main__":
    main()
