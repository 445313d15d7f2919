"""Fisher of language models against a training step, and the GPT-2-small penalty, on this CPU.

Shapes (random weights from a config, nothing downloaded; ``--shapes`` picks, default all five):
- ``gpt2_small``: GPT-2 small (124M parameters, tied 50257 × 768 embedding), 32 sequences × 128
  tokens, batches of 8;
- ``gpt2_mid``: GPT-2 with 4 layers of width 256, vocabulary 2000, 4 sequences × 64 tokens;
- ``gpt2_mid_32``: the same model over 32 such sequences in batches of 4 (with ``gpt2_mid``, this
  separates the estimation's fixed cost, the once-per-estimation rule check, from each batch's);
- ``vocab_heavy``: GPT-2's 50257 × 768 tied embedding with 2 layers, 32 sequences × 128 tokens;
- ``llama``: a Llama shape (untied embedding and LM head, vocabulary 32000, width 512, 4 layers,
  8 query heads sharing 2 key/value heads, gated MLP), 32 sequences × 128 tokens (batches of 8);
- ``tiny`` / ``llama_tiny``: 2-layer stand-ins on short sequences, for the smoke test.

Per shape, side by side in one process, interleaved rounds (each in a shuffled order), on the same
sequences:
- ``fwd_bwd``: plain forward + backward of the causal-LM loss over the batches (the baseline: one
  training step's gradient work);
- ``ewc_rs:empirical`` and ``ewc_rs:mc``: ``fisher_diag(model, batches, kind=...,
  likelihood="causal_lm")``; the empirical one is first checked against the per-sample definition
  (float32 loop over 4 sequences of 16 tokens).
Each is timed (median over the rounds after a warm-up round). Peak memory is measured apart, one
fresh process per method (the allocator keeps freed memory, so a second call in one process would
look almost free): the process builds the model and the batches, resets the kernel's peak counter
(``/proc/self/clear_refs``), runs the method once, and reports its peak resident memory (VmHWM)
minus the resident memory just before the call. Then the GPT-2-small (``tiny``: the stand-in's)
penalty step against the one-pass floor, as in ``bench_penalty.py``.

``--profile SHAPE`` instead runs one empirical Fisher of SHAPE under ``torch.profiler`` and prints
where its time goes (phases of the estimation, and the operators with the most self time).

Targets (issue #21): Fisher ≤ 1.5× fwd_bwd in time and in peak memory above the model.

Usage: ``python benchmarks/bench_llm.py [--shapes gpt2_mid,vocab_heavy] [--rounds 3]
[--profile SHAPE]``. Writes ``benchmarks/results/llm_cpu.json`` (each shape's entry replaced,
the others kept).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ewc_rs  # noqa: E402
from bench_penalty import print_header, run_penalty  # noqa: E402
from common import RESULTS, write_results  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
Batches = list[tuple[dict[str, torch.Tensor], torch.Tensor]]


@dataclass(frozen=True)
class Shape:
    """A model family, its config and the sequences the Fisher is estimated over."""

    family: str  # "gpt2" or "llama"
    config: dict[str, Any]
    sequences: int
    tokens: int
    batch: int  # sequences per batch
    title: str


SHAPES: dict[str, Shape] = {
    "gpt2_small": Shape("gpt2", {}, 32, 128, 8, "GPT-2 small (tied 50257 x 768 embedding, 12 layers)"),
    "gpt2_mid": Shape(
        "gpt2",
        dict(n_layer=4, n_embd=256, n_head=4, vocab_size=2000, n_positions=256),
        4,
        64,
        4,
        "mid GPT-2 (vocabulary 2000, 4 layers of width 256)",
    ),
    # The same model over 8 batches: the estimation's fixed cost (the once-per-estimation rule
    # check) spread over the batches, and, against `gpt2_mid`, the cost of each further batch.
    "gpt2_mid_32": Shape(
        "gpt2",
        dict(n_layer=4, n_embd=256, n_head=4, vocab_size=2000, n_positions=256),
        32,
        64,
        4,
        "mid GPT-2 over 8 batches of 4 sequences",
    ),
    "vocab_heavy": Shape(
        "gpt2",
        dict(n_layer=2, n_embd=768, n_head=12, vocab_size=50257, n_positions=128),
        32,
        128,
        8,
        "vocabulary-heavy GPT-2 (tied 50257 x 768 embedding, 2 layers)",
    ),
    "llama": Shape(
        "llama",
        dict(
            hidden_size=512,
            intermediate_size=1376,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            vocab_size=32000,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        ),
        32,
        128,
        8,
        "Llama (untied 32000 x 512 embedding and head, GQA 8/2 heads, gated MLP, 4 layers)",
    ),
    "tiny": Shape(
        "gpt2", dict(n_layer=2, n_head=2, n_embd=64, vocab_size=500, n_positions=32), 8, 32, 4, "2-layer GPT-2 stand-in"
    ),
    "llama_tiny": Shape(
        "llama",
        dict(
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=500,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        ),
        8,
        32,
        4,
        "2-layer Llama stand-in",
    ),
}
DEFAULT_SHAPES = ("gpt2_mid", "gpt2_mid_32", "vocab_heavy", "llama", "gpt2_small")
KINDS = ("empirical", "mc")


def build(shape: Shape) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    if shape.family == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape.config)).eval()
    config = transformers.LlamaConfig(**shape.config)
    config._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(config).eval()


def batches(vocab: int, sequences: int, tokens: int, batch: int) -> Batches:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (sequences, tokens), generator=g)
    return [({"input_ids": ids[i : i + batch]}, ids[i : i + batch]) for i in range(0, sequences, batch)]


def setup(name: str) -> tuple[torch.nn.Module, Batches]:
    shape = SHAPES[name]
    model = build(shape)
    return model, batches(model.config.vocab_size, shape.sequences, shape.tokens, shape.batch)


def check_against_loop(model: torch.nn.Module, vocab: int) -> float:
    """Relative error of the empirical Fisher against a per-sample loop (float32, 4 × 16 tokens)."""
    data = batches(vocab, 4, 16, 2)
    got = ewc_rs.fisher_diag(model, data, kind="empirical", likelihood="causal_lm")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    want = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    for x, _ in data:
        for i in range(x["input_ids"].shape[0]):
            ids = x["input_ids"][i : i + 1]
            logits = model(input_ids=ids).logits[:, :-1].float()
            ll = torch.log_softmax(logits, -1).gather(2, ids[:, 1:].unsqueeze(2)).sum()
            grads = torch.autograd.grad(ll, list(params.values()))
            for (n, _), g in zip(params.items(), grads):
                want[n] += g.square()
            count += 1
    num = sum(float((got[n] - want[n] / count).square().sum()) for n in params)
    den = sum(float((want[n] / count).square().sum()) for n in params)
    return (num / den) ** 0.5


def methods(model: torch.nn.Module, data: Batches) -> dict[str, Callable[[], None]]:
    def fwd_bwd() -> None:
        for x, y in data:
            model(**x, labels=y).loss.backward()
        model.zero_grad(set_to_none=True)

    def fisher(kind: str) -> Callable[[], None]:
        def run() -> None:
            torch.manual_seed(1)
            ewc_rs.fisher_diag(model, data, kind=kind, likelihood="causal_lm")

        return run

    return {"fwd_bwd": fwd_bwd, **{f"ewc_rs:{k}": fisher(k) for k in KINDS}}


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE


def vm_hwm() -> int:
    """The process's peak resident memory (VmHWM), in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def peak_above_start(name: str, method: str) -> int:
    """Bytes of peak resident memory that ``method`` adds, measured in a fresh process."""
    proc = subprocess.run(
        [sys.executable, __file__, "--peak-of", method, "--shapes", name],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(proc.stdout.strip().splitlines()[-1])


def _report_peak(name: str, method: str) -> None:
    """In the child: set up, reset the kernel's peak counter, run ``method`` once, print the peak
    resident memory above the level just before the call."""
    model, data = setup(name)
    fn = methods(model, data)[method]
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM (the peak) to the current resident size
    start = rss_bytes()
    fn()
    print(max(vm_hwm() - start, 0))


def run_shape(name: str, rounds: int) -> dict[str, Any]:
    """Times (median of interleaved rounds) and peak memory of each method on one shape."""
    shape = SHAPES[name]
    model, data = setup(name)
    err = check_against_loop(model, model.config.vocab_size)
    fns = methods(model, data)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds + 1):  # round 0 warms up (allocator, thread pools)
        order = list(fns.items())
        random.Random(r).shuffle(order)  # no method always follows the same one
        for k, fn in order:
            t0 = time.perf_counter()
            fn()
            if r > 0:
                times[k].append(time.perf_counter() - t0)
    peaks = {k: peak_above_start(name, k) for k in fns}
    t = {k: statistics.median(v) for k, v in times.items()}
    params = sum(p.numel() for p in model.parameters())
    print(
        f"\n{name}: {shape.title}; {params / 1e6:.1f}M parameters, {shape.sequences} sequences x {shape.tokens} tokens"
    )
    print(f"  relative error of ewc_rs:empirical against the per-sample loop: {err:.1e}")
    print(f"  {'method':<20}{'median s':>10}{'x fwd_bwd':>11}{'peak MiB':>10}{'x fwd_bwd':>11}")
    for k in fns:
        tr, mr = t[k] / t["fwd_bwd"], peaks[k] / max(peaks["fwd_bwd"], 1)
        print(f"  {k:<20}{t[k]:>10.3f}{tr:>10.2f}x{peaks[k] / 2**20:>10.0f}{mr:>10.2f}x")
    return {
        "title": shape.title,
        "parameters": params,
        "sequences": shape.sequences,
        "tokens": shape.tokens,
        "batch": shape.batch,
        "rounds": rounds,
        "relative_error": err,
        "median_s": t,
        "peak_bytes": peaks,
        "time_ratio": {k: t[f"ewc_rs:{k}"] / t["fwd_bwd"] for k in KINDS},
        "memory_ratio": {k: peaks[f"ewc_rs:{k}"] / max(peaks["fwd_bwd"], 1) for k in KINDS},
    }


def profile(name: str) -> None:
    """Prints where one empirical Fisher of shape ``name`` spends its time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from ewc_rs._fisher.estimation import Estimation
    from ewc_rs._fisher.fallback import Fallback

    model, data = setup(name)
    fns = methods(model, data)
    for fn in fns.values():  # warm up
        fn()
    phases: dict[str, float] = {}

    def timed(owner: Any, attr: str, label: str) -> None:
        inner = getattr(owner, attr)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                phases[label] = phases.get(label, 0.0) + time.perf_counter() - t0

        setattr(owner, attr, wrapper)

    timed(Estimation, "_check_rules", "rule checks (once)")
    timed(Estimation, "_recorded_forward", "recorded forward passes")
    timed(Estimation, "_rules_step", "batch steps (forward, native engine, fallback)")
    timed(Fallback, "step", "fallback (per-sample vmap)")
    t_base = time.perf_counter()
    fns["fwd_bwd"]()
    base = time.perf_counter() - t_base
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fns["ewc_rs:empirical"]()
        total = time.perf_counter() - t0
    print(f"{name}: fwd_bwd {base:.3f} s; empirical Fisher {total:.3f} s under the profiler ({total / base:.2f}x)")
    for label, s in phases.items():
        print(f"  {label:<45}{s:>8.3f} s {s / total:>6.1%}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", metavar="SHAPE", choices=sorted(SHAPES), help="profile one empirical Fisher")
    ap.add_argument("--peak-of", help=argparse.SUPPRESS)  # internal: the child of the memory measurement
    args = ap.parse_args()
    names = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in names if s not in SHAPES]
    if unknown:
        ap.error(f"--shapes: unknown {unknown}; expected some of {sorted(SHAPES)}")
    if args.peak_of:
        _report_peak(names[0], args.peak_of)
        return
    if args.profile:
        profile(args.profile)
        return
    folder = Path(os.environ.get("EWC_RS_BENCH_RESULTS", RESULTS))
    old = folder / "llm_cpu.json"
    previous = json.loads(old.read_text()) if old.exists() else {}
    shapes = previous.get("shapes", {}) if isinstance(previous.get("shapes"), dict) else {}
    for name in names:
        shapes[name] = run_shape(name, args.rounds)
    shapes = {k: shapes[k] for k in sorted(shapes, key=lambda k: list(SHAPES).index(k) if k in SHAPES else len(SHAPES))}
    print()
    print_header()
    small = "gpt2_tiny" if set(names) <= {"tiny", "llama_tiny"} else "gpt2_small"
    penalty = run_penalty(small, "cpu", 5 if small == "gpt2_tiny" else 20)
    write_results("llm_cpu.json", {"shapes": shapes, "penalty": penalty})


if __name__ == "__main__":
    main()
