"""Writes ``docs/llm.md``, the figures of Fisher at LLM scale, from the benchmarks' result files
(never by hand): the language models' Fisher against a training step
(``benchmarks/results/llm_cpu.json``), the 8-bit code's errors
(``benchmarks/results/fisher8_codes.json``), the billion-parameter run
(``benchmarks/results/llm_1b_cpu.json``) and the merge demo (``docs/merge.json``).

    python scripts/llm_figures.py --write    # (re)writes docs/llm.md
    python scripts/llm_figures.py --check    # exits 1 when docs/llm.md differs (tests/project/test_llm_figures.py)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "llm.md"
STEP = ROOT / "benchmarks" / "results" / "llm_cpu.json"
CODES = ROOT / "benchmarks" / "results" / "fisher8_codes.json"
LLM = ROOT / "benchmarks" / "results" / "llm_1b_cpu.json"
MERGE = ROOT / "docs" / "merge.json"


def gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def codes_section(res: dict[str, Any]) -> list[str]:
    rec = res["recommendation"]["choice"]
    lines = [
        "## The 8-bit Fisher (`EWC(fisher_bits=8)`)",
        "",
        f"Chosen by `python benchmarks/fisher8_codes.py` on the Fishers of trained models: the {rec['code']} code,",
        f"blocks of {rec['B']} values, range {rec['R']:g} binades ({rec['bytes']:.3f} bytes a parameter). Rule: "
        + res["recommendation"]["rule"]
        + ".",
        "The implementation's own figures (codes read by the fused penalty, against the same pass over the",
        "float32 F; limits: penalty 1%, gradient 2%):",
        "",
        "| model | parameters | penalty error | gradient error (relative norm) |",
        "|---|---:|---:|---:|",
    ]
    for name, m in res["models"].items():
        impl = m["implementation"]
        lines.append(f"| {name} | {m['facts']['parameters']:,} | {impl['penalty_err']:.2e} | {impl['grad_err']:.2e} |")
    lines += ["", "The alternatives at the same block size (worst over the models):", ""]
    lines += ["| code | range | block | bytes/param | worst penalty error | worst gradient error | most zeroed |"]
    lines += ["|---|---:|---:|---:|---:|---:|---:|"]
    rows: dict[tuple, list[dict]] = {}
    for m in res["models"].values():
        for r in m["rows"]:
            if r["B"] in (None, rec["B"]):
                rows.setdefault((r["code"], str(r["R"]), r["B"]), []).append(r)
    for (code, r, b), group in rows.items():
        lines.append(
            f"| {code} | {'-' if r == 'None' else r} | {b or '-'} | {group[0]['bytes']:.3f} | "
            f"{max(x['penalty_err'] for x in group):.2e} | {max(x['grad_err'] for x in group):.2e} | "
            f"{max(x['zeroed'] for x in group):.2%} |"
        )
    return lines


def llm_section(res: dict[str, Any]) -> list[str]:
    m = res["model"]
    steps = res["steps"]
    lines = [
        "## A billion parameters on this machine's CPU",
        "",
        f"`python benchmarks/bench_llm_1b.py`: a Llama-shaped model of {m['parameters']:,} parameters "
        f"({gib(m['float32_bytes'])} in float32), {m['shape'][0]} sequences of {m['shape'][1]} tokens, "
        f"{res['threads']} threads; each step in a fresh process.",
        "",
        "| step | activation checkpointing | time | peak memory above the model |",
        "|---|---|---:|---:|",
    ]
    for key, r in steps.items():
        method, ckpt = key.split("/")
        lines.append(f"| {method} | {ckpt} | {r['seconds']:.1f} s | {gib(r['peak_above_bytes'])} |")
    ratios, load = res["fisher_over_fwd_bwd"], res["load"]
    lines += [
        "",
        "Fisher / forward+backward time: " + ", ".join(f"checkpointing {k} {v:.2f}×" for k, v in ratios.items()) + ".",
        "",
        f"Fisher file: {gib(res['fisher_file']['file_bytes'])} in {res['fisher_file']['shards']} shards, "
        f"written in {res['fisher_file']['save_seconds']:.1f} s; `load_fisher` took {load['seconds']:.1f} s with "
        f"a peak of {gib(load['peak_above_bytes'])} above the process's start for {gib(load['loaded_bytes'])} "
        f"of tensors (memory-mapped shards), {gib(load['peak_after_reading_all_bytes'])} once every value was "
        "read: the file's size, not twice it.",
        "",
        "One penalty step (`EWC.backward()`, model in bfloat16):",
        "",
        "| F and θ* | state bytes/param | resident bytes/param | step | byte floor | ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    notes = [
        "",
        "Each row's floor (the bytes the pass must move at the bandwidth of `torch.addcmul`) is measured in",
        "that row's process; this 2-core machine is noisy (the measured bandwidth differs between rows), so",
        "read ratios, not seconds. The 8-bit pass computes 2^x for every value and is bound by arithmetic on",
        "this CPU, not by memory; resident bytes count the stored state and the flat buffers the pass reads.",
    ]
    for name, r in res["penalty"].items():
        lines.append(
            f"| {name} | {r['state_bytes_per_param']:.3f} | {r['resident_bytes_per_param']:.2f} | "
            f"{r['median_s']:.2f} s | {r['floor_s']:.2f} s | {r['ratio_to_floor']:.2f} |"
        )
    return lines + notes


def step_section(res: dict[str, Any]) -> list[str]:
    lines = [
        "## The Fisher of a language model against a training step",
        "",
        '`python benchmarks/bench_llm.py --shapes SHAPE,...`: `fisher_diag(kind=..., likelihood="causal_lm")` '
        "against forward + backward of the causal-LM loss over the same sequences (random weights from "
        "each config), in one process, median of interleaved rounds after a warm-up; peak memory above "
        "the model per method in a fresh process. Target: 1.5x in time and in memory.",
        "",
        "| shape | parameters | sequences x tokens | fwd+bwd | empirical | mc | memory (empirical) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in res.get("shapes", {}).items():
        t = r["median_s"]
        lines.append(
            f"| `{name}`: {r['title']} | {r['parameters'] / 1e6:.1f}M | {r['sequences']} x {r['tokens']} | "
            f"{t['fwd_bwd']:.2f} s | {r['time_ratio']['empirical']:.2f}x | {r['time_ratio']['mc']:.2f}x | "
            f"{r['memory_ratio']['empirical']:.2f}x |"
        )
    lines += fixed_and_per_batch(res.get("shapes", {}))
    threads = res.get("machine", {}).get("torch_threads")
    lines += ["", f"Measured on this machine's CPU with {threads} threads; ratios, not seconds, carry over."]
    return lines


def fixed_and_per_batch(shapes: dict[str, Any], one: str = "gpt2_mid", many: str = "gpt2_mid_32") -> list[str]:
    """The empirical Fisher's cost split into a fixed part per estimation and a part per batch, from
    the same model measured over one batch (``one``) and over several (``many``)."""
    if one not in shapes or many not in shapes:
        return []
    a, b = shapes[one], shapes[many]
    ta, tb = a["median_s"], b["median_s"]
    per_batch = (tb["ewc_rs:empirical"] - ta["ewc_rs:empirical"]) / (tb["fwd_bwd"] - ta["fwd_bwd"])
    fixed = ta["ewc_rs:empirical"] - per_batch * ta["fwd_bwd"]
    return [
        "",
        f"`{one}` and `{many}` are one model over {a['sequences']} and {b['sequences']} sequences (batches of "
        f"{b['batch']}). Between them, the empirical Fisher costs {per_batch:.2f}x forward+backward for each further "
        f"batch, plus a fixed {fixed * 1000:.0f} ms per estimation ({fixed / ta['fwd_bwd']:.1f}x the forward+backward "
        f"of one batch): mostly the rule check, which runs once, on the first batch's first two sequences.",
    ]


def merge_table(accuracy: dict[str, dict[str, float]]) -> list[str]:
    """The merge demo's accuracy table (``merge.json``'s ``accuracy``: model → task → accuracy), as
    Markdown lines; also the Results page's (``scripts/docs_results.py``)."""
    if not accuracy:
        return []
    tasks = list(next(iter(accuracy.values())))
    lines = ["| model | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for model, row in accuracy.items():
        lines.append(f"| {model} | " + " | ".join(f"{row[t]:.4f}" for t in tasks) + " |")
    return lines


def merge_section(res: dict[str, Any]) -> list[str]:
    return [
        "## Fisher-weighted merging",
        "",
        "`python -m ewc_rs.demo merge`: two fine-tunes of one base on two permuted-MNIST tasks, merged.",
        "",
        *merge_table(res["accuracy"]),
    ]


def render() -> str:
    parts = [
        "# Fisher at LLM scale: figures",
        "",
        "Generated by `python scripts/llm_figures.py --write`; do not edit.",
        "",
    ]
    sections = ((STEP, step_section), (CODES, codes_section), (LLM, llm_section), (MERGE, merge_section))
    for path, section in sections:
        if path.is_file():
            parts += section(json.loads(path.read_text())) + [""]
    return "\n".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python scripts/llm_figures.py --write", file=sys.stderr)
            return 1
        return 0
    if args.write:
        OUT.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
