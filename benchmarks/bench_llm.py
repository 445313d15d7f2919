"""Fisher and penalty of a GPT-2-small-shaped language model (124M parameters, from its config:
random weights, nothing downloaded), on this machine's CPU.

Side by side in one process, interleaved rounds, on the same 32 sequences of 128 tokens:
- ``fwd_bwd``: plain forward + backward of the causal-LM loss over the batches (the baseline);
- ``ewc_rs:empirical``: ``fisher_diag(model, batches, kind="empirical", likelihood="causal_lm")``,
  checked first against the per-sample definition on 4 sequences of 16 tokens (float32 vs a
  per-sample loop in float64 would not fit the time here).
Each is timed (median over interleaved rounds). Peak memory is measured apart, one fresh process
per method (the allocator keeps freed memory, so a second call in one process would look almost
free): the process builds the model and the batches, resets the kernel's peak counter
(``/proc/self/clear_refs``), runs the method once, and reports its peak resident memory (VmHWM)
minus the resident memory just before the call. Then the
penalty step for the same model against the one-pass floor, as in ``bench_penalty.py``.

Targets (the sequence-model issue): Fisher ≤ 3× fwd_bwd in time and ≤ 2.5× in peak memory;
penalty ≤ 1.5× the floor.

Usage: ``python benchmarks/bench_llm.py [--rounds 3] [--tiny]`` (``--tiny``: a 2-layer model on
short sequences, for the smoke test). Writes ``benchmarks/results/llm_cpu.json``.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ewc_rs  # noqa: E402
from bench_penalty import print_header, run_penalty  # noqa: E402
from common import write_results  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE


def peak_above_start(tiny: bool, method: str) -> int:
    """Bytes of peak resident memory that ``method`` adds, measured in a fresh process."""
    proc = subprocess.run(
        [sys.executable, __file__, "--peak-of", method, *(["--tiny"] if tiny else [])],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(proc.stdout.strip().splitlines()[-1])


def _report_peak(tiny: bool, method: str) -> None:
    """In the child: set up, reset the kernel's peak counter, run ``method`` once, print the peak
    resident memory above the level just before the call."""
    model, data = setup(tiny)
    fn = methods(model, data)[method]
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM (the peak) to the current resident size
    start = rss_bytes()
    fn()
    print(max(vm_hwm() - start, 0))


def vm_hwm() -> int:
    """The process's peak resident memory (VmHWM), in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def gpt2(tiny: bool) -> torch.nn.Module:
    import transformers

    kw: dict[str, Any] = dict(n_layer=2, n_head=2, n_embd=64, vocab_size=500, n_positions=32) if tiny else {}
    config = transformers.GPT2Config(**kw)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def batches(vocab: int, sequences: int, tokens: int, batch: int) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (sequences, tokens), generator=g)
    return [({"input_ids": ids[i : i + batch]}, ids[i : i + batch]) for i in range(0, sequences, batch)]


def check_against_loop(model: torch.nn.Module, vocab: int) -> float:
    """Relative error of the empirical Fisher against a per-sample loop (float32, 4 × 16 tokens)."""
    data = batches(vocab, 4, 16, 2)
    got = ewc_rs.fisher_diag(model, data, kind="empirical", likelihood="causal_lm")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    want = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    for x, y in data:
        for i in range(y.shape[0]):
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


def setup(tiny: bool) -> tuple[torch.nn.Module, list[tuple[dict[str, torch.Tensor], torch.Tensor]]]:
    model = gpt2(tiny)
    sequences, tokens, batch = shape(tiny)
    return model, batches(model.config.vocab_size, sequences, tokens, batch)


def shape(tiny: bool) -> tuple[int, int, int]:
    """Sequences, tokens per sequence, sequences per batch."""
    return (8, 32, 4) if tiny else (32, 128, 8)


def methods(model: torch.nn.Module, data: list) -> dict[str, Callable[[], None]]:
    def fwd_bwd() -> None:
        for x, y in data:
            model(**x, labels=y).loss.backward()
        model.zero_grad(set_to_none=True)

    def fisher() -> None:
        ewc_rs.fisher_diag(model, data, kind="empirical", likelihood="causal_lm")

    return {"fwd_bwd": fwd_bwd, "ewc_rs:empirical": fisher}


def run_llm(tiny: bool, rounds: int) -> dict[str, Any]:
    model, data = setup(tiny)
    sequences, tokens, _ = shape(tiny)
    vocab = model.config.vocab_size
    err = check_against_loop(model, vocab)
    print(f"relative error of ewc_rs:empirical against the per-sample loop: {err:.1e}")
    fns = methods(model, data)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds + 1):  # round 0 warms up (allocator, thread pools)
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r > 0:
                times[name].append(time.perf_counter() - t0)
    m = {k: peak_above_start(tiny, k) for k in fns}
    t = {k: statistics.median(v) for k, v in times.items()}
    params = sum(p.numel() for p in model.parameters())
    size = "tiny" if tiny else "small"
    print(f"\nGPT-2 {size} ({params / 1e6:.1f}M parameters), {sequences} sequences × {tokens} tokens")
    print(f"{'method':<20}{'median s':>10}{'peak MiB':>10}")
    for k in fns:
        print(f"{k:<20}{t[k]:>10.2f}{m[k] / 2**20:>10.0f}")
    time_ratio = t["ewc_rs:empirical"] / t["fwd_bwd"]
    mem_ratio = m["ewc_rs:empirical"] / max(m["fwd_bwd"], 1)
    print(f"Fisher / fwd_bwd: time {time_ratio:.2f}x (target <= 3), peak memory {mem_ratio:.2f}x (target <= 2.5)")
    return {
        "parameters": params,
        "sequences": sequences,
        "tokens": tokens,
        "relative_error": err,
        "median_s": t,
        "peak_bytes": m,
        "time_ratio": time_ratio,
        "memory_ratio": mem_ratio,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model on short sequences (smoke run)")
    ap.add_argument("--peak-of", help=argparse.SUPPRESS)  # internal: the child of the memory measurement
    args = ap.parse_args()
    if args.peak_of:
        _report_peak(args.tiny, args.peak_of)
        return
    fisher = run_llm(args.tiny, args.rounds)
    print()
    print_header()
    penalty = run_penalty("gpt2_tiny" if args.tiny else "gpt2_small", "cpu", 5 if args.tiny else 20)
    write_results("llm_cpu.json", {"fisher": fisher, "penalty": penalty})


if __name__ == "__main__":
    main()
