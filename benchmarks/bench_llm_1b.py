"""A billion-parameter Llama-shaped model on this machine's CPU: the Fisher (with and without
activation checkpointing), the Fisher file, and one penalty step per way of storing F.

The model: ``transformers.LlamaForCausalLM`` from a config (hidden 2048, 16 layers, MLP 5504, 16
heads, vocabulary 32000, untied head: 0.94e9 parameters; random weights, nothing downloaded).
Data: 4 random sequences of 128 tokens, batches of 2. Each step runs in a fresh process (the
allocator keeps freed memory; a second measurement in one process would look free), which builds
the model and data, resets the kernel's peak counter (``/proc/self/clear_refs``), runs the step
once and reports its wall time and its peak resident memory (VmHWM) above the resident memory just
before it ("above the model": the model, data and, for the penalty, the EWC state already there).

1. ``fwd_bwd`` (the baseline: forward + backward of the causal-LM loss over the batches) and
   ``fisher`` (``ewc_rs.fisher_diag(kind="empirical", likelihood="causal_lm")``), each with
   activation checkpointing off and on (``model.gradient_checkpointing_enable()``): time ratio
   Fisher / fwd_bwd and both peaks.
2. The Fisher (checkpointing off) saved with ``ewc_rs.save_fisher`` in shards of 1 GiB, then
   ``ewc_rs.load_fisher`` in a fresh process: its peak above the process's start (the loaded
   tensors themselves are the file's size: memory-mapped shards, no second copy).
3. ``EWC.backward()`` (one penalty step straight into ``.grad``) with the model in bfloat16 (as
   LLM fine-tuning holds it; float32 F and θ* beside a float32 model and its gradient do not fit
   this 24 GiB machine twice over: see the bytes column), after ``consolidate_from`` the loaded
   Fisher and a small move of the weights, for F and θ* in float32, both in bfloat16, and θ* in
   bfloat16 with F in 8 bits (``fisher_bits=8``). Per row: bytes a parameter of the EWC state
   (θ* + F as stored), resident bytes a parameter the EWC adds (the state plus the flat buffers
   the pass reads), the median step time over 3 runs, the byte floor (the bytes the pass must
   move, θ and ``.grad`` read, θ* and F read, ``.grad`` written, at the bandwidth of
   ``torch.addcmul`` over 1 GiB of float32 streams measured in the same process) and their ratio;
   the value is checked against a float64 reference over the stored (decoded) F first.

Usage: ``python benchmarks/bench_llm_1b.py [--tiny] [--work DIR]`` (``--tiny``: a 2-layer model
for the smoke test; ``--work``: where the Fisher file goes, default a temporary folder).
Writes ``benchmarks/results/llm_1b_cpu.json``. The full run takes about 20 minutes here.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ewc_rs  # noqa: E402
from common import write_results  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
CONFIGS: dict[str, dict[str, Any]] = {
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5504,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=32000,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=500,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    ),
}
#: sequences, tokens, sequences per batch
SHAPES = {"1b": (4, 128, 2), "tiny": (4, 16, 2)}
#: storage_dtype, fisher_bits per penalty row
STORAGES = {
    "float32": (torch.float32, None),
    "bfloat16": (torch.bfloat16, None),
    "8-bit F, bfloat16 θ*": (torch.bfloat16, 8),
}
SHARD = 1 << 30


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE


def vm_hwm() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak() -> int:
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # VmHWM ← the current resident size
    return rss_bytes()


def llama(size: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIGS[size]))
    return model.to(dtype)


def batches(size: str) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    sequences, tokens, batch = SHAPES[size]
    ids = torch.randint(0, CONFIGS[size]["vocab_size"], (sequences, tokens), generator=torch.Generator().manual_seed(0))
    return [({"input_ids": ids[i : i + batch]}, ids[i : i + batch]) for i in range(0, sequences, batch)]


def child_step(size: str, method: str, ckpt: bool, save: str) -> dict[str, Any]:
    model, data = llama(size), batches(size)
    if ckpt:
        model.gradient_checkpointing_enable()
    model.train()  # no dropout in Llama; checkpointing runs only in training mode
    start = reset_peak()
    t0 = time.perf_counter()
    if method == "fwd_bwd":
        for x, y in data:
            model(**x, labels=y).loss.backward()
    else:
        fisher = ewc_rs.fisher_diag(model, data, kind="empirical", likelihood="causal_lm")
    seconds = time.perf_counter() - t0
    out: dict[str, Any] = {"seconds": seconds, "peak_above_bytes": max(vm_hwm() - start, 0)}
    if method == "fisher" and save:
        t0 = time.perf_counter()
        ewc_rs.save_fisher(save, fisher, metadata={"model": f"llama-{size} random"}, max_shard_bytes=SHARD)
        out["save_seconds"] = time.perf_counter() - t0
        files = list(Path(save).iterdir())
        out["file_bytes"] = sum(f.stat().st_size for f in files)
        out["shards"] = sum(f.suffix == ".safetensors" for f in files)
    return out


def child_load(folder: str) -> dict[str, Any]:
    start = reset_peak()
    t0 = time.perf_counter()
    fisher = ewc_rs.load_fisher(folder)
    seconds = time.perf_counter() - t0
    loaded = sum(t.numel() * t.element_size() for t in fisher.values())
    peak = max(vm_hwm() - start, 0)
    t0 = time.perf_counter()
    total = sum(float(t.sum(dtype=torch.float64)) for t in fisher.values())  # every value read once
    return {
        "seconds": seconds,
        "peak_above_bytes": peak,
        "loaded_bytes": loaded,
        "read_all_seconds": time.perf_counter() - t0,
        "peak_after_reading_all_bytes": max(vm_hwm() - start, 0),
        "mass": total,
    }


def floor_bandwidth() -> float:
    """Bytes per second of ``torch.addcmul`` over four float32 streams of 256 MiB (3 read, 1 written)."""
    a, b, c, d = (torch.rand(1 << 26) for _ in range(4))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        torch.addcmul(a, b, c, out=d)
        times.append(time.perf_counter() - t0)
    return 16 * a.numel() / statistics.median(times)


def child_penalty(size: str, storage: str, folder: str) -> dict[str, Any]:
    dtype, bits = STORAGES[storage]
    model = llama(size, torch.bfloat16)
    params = [p for p in model.parameters()]
    n = sum(p.numel() for p in params)
    for p in params:  # the gradients an optimizer step finds
        p.grad = torch.zeros_like(p)
    before = reset_peak()
    ewc = ewc_rs.EWC(model, lam=1.0, storage_dtype=dtype, fisher_bits=bits)
    ewc.consolidate_from(ewc_rs.load_fisher(folder))
    gc.collect()
    state = 0
    for task in ewc._tasks:
        state += sum(t.numel() * t.element_size() for t in task.star.values())
        for f in task.block("diagonal").fisher.values():  # type: ignore[union-attr]
            state += (
                f.nbytes if hasattr(f, "nbytes") and not isinstance(f, torch.Tensor) else f.numel() * f.element_size()
            )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.add_((1e-3 * torch.randn(p.shape, generator=g)).to(p.dtype))
    value = float(ewc.backward(model))  # builds the plan (the flat buffers) and warms up
    resident = rss_bytes() - before
    ref = 0.0
    (block,) = [b for b in ewc._tasks[0].blocks]
    named = dict(model.named_parameters())
    for name, f in block.fisher.items():  # type: ignore[attr-defined]
        dense = f if isinstance(f, torch.Tensor) else f.dense()
        d = named[name].detach().double() - ewc._tasks[0].star[name].double()
        ref += float((dense.double() * d * d).sum())
    ref *= 0.5
    times = []
    for _ in range(3):
        for p in params:
            p.grad.zero_()
        t0 = time.perf_counter()
        ewc.backward(model)
        times.append(time.perf_counter() - t0)
    stored = state / n
    moved = n * (3 * 2 + stored)  # θ and .grad read, .grad written (bfloat16); θ*, F read
    bandwidth = floor_bandwidth()
    median = statistics.median(times)
    return {
        "parameters": n,
        "state_bytes_per_param": stored,
        "resident_bytes_per_param": resident / n,
        "median_s": median,
        "floor_s": moved / bandwidth,
        "floor_gb_per_s": bandwidth / 1e9,
        "ratio_to_floor": median * bandwidth / moved,
        "value_rel_err": abs(value - ref) / ref if ref else 0.0,
    }


def run_child(args: list[str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model (smoke run)")
    ap.add_argument("--work", default=None, help="folder for the Fisher file (default: a temporary one)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # internal: one measured step
    args = ap.parse_args()
    size = "tiny" if args.tiny else "1b"
    torch.set_num_threads(int(os.environ.get("EWC_RS_THREADS", os.cpu_count() or 1)))
    if args.child:
        kind, *rest = args.child
        if kind == "step":
            out = child_step(size, rest[0], rest[1] == "on", rest[2] if len(rest) > 2 else "")
        elif kind == "load":
            out = child_load(rest[0])
        else:
            out = child_penalty(size, rest[0], rest[1])
        print(json.dumps(out))
        return
    tiny = ["--tiny"] if args.tiny else []
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        folder = str(Path(work) / "fisher")
        model = llama(size)
        n = sum(p.numel() for p in model.parameters())
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        del model
        print(f"Llama-shaped model ({size}): {n:,} parameters, {gib(model_bytes)} in float32; {SHAPES[size]}")
        steps: dict[str, Any] = {}
        for ckpt in ("off", "on"):
            for method in ("fwd_bwd", "fisher"):
                save = [folder] if method == "fisher" and ckpt == "off" else []
                r = steps[f"{method}/{ckpt}"] = run_child([*tiny, "--child", "step", method, ckpt, *save])
                print(
                    f"  {method:<8} checkpointing {ckpt:<3}: {r['seconds']:8.1f} s, "
                    f"peak above the model {gib(r['peak_above_bytes'])}"
                )
        ratios = {
            ckpt: steps[f"fisher/{ckpt}"]["seconds"] / steps[f"fwd_bwd/{ckpt}"]["seconds"] for ckpt in ("off", "on")
        }
        print("  Fisher / fwd_bwd time: " + ", ".join(f"checkpointing {k} {v:.2f}x" for k, v in ratios.items()))
        saved = steps["fisher/off"]
        print(
            f"  Fisher file: {gib(saved['file_bytes'])} in {saved['shards']} shards, "
            f"written in {saved['save_seconds']:.1f} s"
        )
        load = run_child([*tiny, "--child", "load", folder])
        print(
            f"  load_fisher: {load['seconds']:.1f} s, peak above the start {gib(load['peak_above_bytes'])} for "
            f"{gib(load['loaded_bytes'])} of tensors; after reading every value once "
            f"({load['read_all_seconds']:.1f} s): {gib(load['peak_after_reading_all_bytes'])}"
        )
        penalty = {}
        print(
            f"  {'penalty step (bf16 model)':<26} {'state B/param':>13} {'resident B/param':>16} "
            f"{'median':>9} {'floor':>9} {'ratio':>6} {'value err':>9}"
        )
        for storage in STORAGES:
            r = penalty[storage] = run_child([*tiny, "--child", "penalty", storage, folder])
            print(
                f"  {storage:<26} {r['state_bytes_per_param']:>13.3f} {r['resident_bytes_per_param']:>16.2f} "
                f"{r['median_s']:>8.3f}s {r['floor_s']:>8.3f}s {r['ratio_to_floor']:>6.2f} {r['value_rel_err']:>9.1e}"
            )
    result = {
        "model": {
            "size": size,
            "parameters": n,
            "config": CONFIGS[size],
            "shape": SHAPES[size],
            "float32_bytes": model_bytes,
        },
        "threads": torch.get_num_threads(),
        "steps": steps,
        "fisher_over_fwd_bwd": ratios,
        "fisher_file": {k: saved[k] for k in ("file_bytes", "shards", "save_seconds")},
        "load": load,
        "penalty": penalty,
    }
    path = write_results("llm_1b_cpu_quick.json" if args.tiny else "llm_1b_cpu.json", result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
