"""Writes the documentation's generated reference pages from the code and the measurements.

- ``reference/layers.md``: the Rust rule registry (``ewc_rs._core.registered_layers()``), each type's
  rule and Kronecker form asked of the extension on an instance, and the modules the Fisher engine
  decomposes in Python (attention, recurrent layers);
- ``reference/torch-versions.md``: ``python/ewc_rs/_torch_version.py``, each line's manifest
  (``build-torch-X.Y/Cargo.toml``) and the torch line CI tests besides the default (``.ci/run``);
- ``reference/benchmarks.md``: the tables of ``benchmarks/results/*.json`` with the command of each.

mkdocs-gen-files runs this file at build time (``mkdocs.yml``), so the pages exist only in the built
site and cannot drift; ``python scripts/docs_pages.py reference/layers.md`` prints one page.
"""

from __future__ import annotations

import json
import re
import runpy
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from torch import nn

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the venv's Python is 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
Table = list[list[str]]


def _table(header: list[str], rows: Table, align: Optional[str] = None) -> str:
    """A Markdown table; ``align`` one letter per column (``l``/``r``), numbers right by default."""
    spec = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in spec]
    lines = [header, rule, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# Supported layers

# One instance per registered type, to ask the extension for its rule and Kronecker form. A type
# registered in Rust without a probe here fails tests/project/test_docs_pages.py.
_TORCH_PROBES: dict[str, Callable[[], nn.Module]] = {
    "torch.nn.modules.linear.Linear": lambda: nn.Linear(3, 2),
    "torch.nn.modules.conv.Conv1d": lambda: nn.Conv1d(2, 3, 3),
    "torch.nn.modules.conv.Conv2d": lambda: nn.Conv2d(2, 3, 3),
    "torch.nn.modules.batchnorm.BatchNorm1d": lambda: nn.BatchNorm1d(3).eval(),
    "torch.nn.modules.batchnorm.BatchNorm2d": lambda: nn.BatchNorm2d(3).eval(),
    "torch.nn.modules.normalization.LayerNorm": lambda: nn.LayerNorm(3),
    "torch.nn.modules.normalization.GroupNorm": lambda: nn.GroupNorm(1, 3),
    "torch.nn.modules.normalization.RMSNorm": lambda: nn.RMSNorm(3),
    "torch.nn.modules.sparse.Embedding": lambda: nn.Embedding(5, 3),
}
_HF_PROBES: dict[str, tuple[str, str, tuple[Any, ...]]] = {  # type → (module, class, args)
    "transformers.models.llama.modeling_llama.LlamaRMSNorm": (
        "transformers.models.llama.modeling_llama",
        "LlamaRMSNorm",
        (3,),
    ),
    "transformers.models.mistral.modeling_mistral.MistralRMSNorm": (
        "transformers.models.mistral.modeling_mistral",
        "MistralRMSNorm",
        (3,),
    ),
    "transformers.models.qwen2.modeling_qwen2.Qwen2RMSNorm": (
        "transformers.models.qwen2.modeling_qwen2",
        "Qwen2RMSNorm",
        (3,),
    ),
    "transformers.models.qwen3.modeling_qwen3.Qwen3RMSNorm": (
        "transformers.models.qwen3.modeling_qwen3",
        "Qwen3RMSNorm",
        (3,),
    ),
    "transformers.pytorch_utils.Conv1D": ("transformers.pytorch_utils", "Conv1D", (2, 3)),
}
PROBED = set(_TORCH_PROBES) | set(_HF_PROBES)


def _probe(type_name: str) -> Optional[nn.Module]:
    """An instance of a registered type, or None when its package is not installed."""
    if type_name in _TORCH_PROBES:
        return _TORCH_PROBES[type_name]()
    module, cls, args = _HF_PROBES[type_name]
    try:
        mod = __import__(module, fromlist=[cls])
    except ImportError:
        return None
    made: nn.Module = getattr(mod, cls)(*args)
    return made


def layer_rows() -> Table:
    """One row per registered type: the type, its parameters, whether the rule applies to a default
    instance, and the Kronecker form of its weight (``structure="kfac"``)."""
    from ewc_rs import _core

    rows = []
    for type_name in _core.registered_layers():
        module = _probe(type_name)
        if module is None:
            rows.append([f"`{type_name}`", "–", "(package not installed when the docs were built)", "–"])
            continue
        rule = _core.layer_rule(module)
        params = ", ".join(f"`{n}`" for n, _ in module.named_parameters()) or "–"
        weight = getattr(module, "weight", None)
        form = rule.kfac_form(list(weight.shape)) if rule is not None and weight is not None else None
        kfac = (
            f"A {form[0]}(+1) × G {form[1]}" + (" (weight stored [in, out])" if form[2] else "") if form else "diagonal"
        )
        rows.append([f"`{type_name}`", params, "yes" if rule is not None else "no", kfac])
    return rows


def layers_page() -> str:
    """The supported-layers page."""
    from ewc_rs._fisher import attention, recurrent

    recurrent_types = ", ".join(f"`nn.{t.__name__}`" for t in recurrent._TYPES)
    return (
        "# Supported layers\n\n"
        "*Generated from the code when the site is built (`scripts/docs_pages.py`): the Rust rule "
        "registry (`src/fisher/rules/mod.rs`, `REGISTRY`), asked through `ewc_rs._core.registered_layers()`; "
        "each row's rule and Kronecker form are the extension's answers for a small instance (sizes in "
        "the form are that instance's).*\n\n"
        "## Layers with a rule\n\n"
        "The per-sample squared gradients of these modules' parameters are computed in Rust from the "
        "recorded input and output gradient of each call (the type must match exactly: a subclass may "
        'override `forward`). The last column is what `structure="kfac"` keeps for the layer: a '
        "Kronecker factor pair (A over the inputs, plus one for a bias; G over the outputs) or the "
        "diagonal. Grouped convolutions keep the diagonal.\n\n"
        + _table(["module type", "parameters", "rule (default settings)", "Kronecker form"], layer_rows(), "llll")
        + "\n## Decomposed while the Fisher is estimated\n\n"
        f"- `nn.MultiheadAttention` self-attention (`{attention.__name__}`): {_first_line(attention.__doc__)} "
        "Its packed input projection and output projection are Linear calls.\n"
        f"- {recurrent_types} (`{recurrent.__name__}`): {_first_line(recurrent.__doc__)}\n\n"
        "Each is checked against the module's own forward on first use; a module that disagrees, or a "
        "setting the decomposition does not cover, goes to the fallback.\n\n"
        "## Everything else\n\n"
        "Any other parameter (custom modules with raw `nn.Parameter`s, cross-attention, subclasses) "
        "takes the exact fallback: `torch.func` per-sample gradients. It is exact, only slower; see "
        "[How the engine works](../explanation/engine.md).\n"
    )


def _first_line(doc: Optional[str]) -> str:
    return (doc or "").strip().splitlines()[0] if doc else ""


# ---------------------------------------------------------------------------------------------------
# Torch versions


def _tch_of(manifest: Path) -> str:
    """The tch version a line's ``Cargo.toml`` pins (``"=0.26.0"`` → ``"0.26.0"``)."""
    dep = tomllib.loads(manifest.read_text(encoding="utf-8"))["dependencies"]["tch"]
    return str(dep if isinstance(dep, str) else dep["version"]).lstrip("=")


def _ci_lines() -> list[str]:
    return re.findall(r"make test-core TORCH=(\d+\.\d+)", (ROOT / ".ci" / "run").read_text(encoding="utf-8"))


def torch_rows() -> Table:
    """One row per supported torch release."""
    v = runpy.run_path(str(ROOT / "python" / "ewc_rs" / "_torch_version.py"))
    ci = _ci_lines()
    rows = []
    for version in v["SUPPORTED_TORCH_VERSIONS"]:
        manifest = ROOT / v["build_dir"](version) / "Cargo.toml"
        how = []
        if version in v["BYPASS_VERSION_CHECK"]:
            how.append("tch of a neighbouring line, torch-sys's version check bypassed")
        if version in v["PATCHED_TORCH_SYS"]:
            how.append("patched torch-sys (C++20, removed operators)")
        if version == v["TORCH_VERSION"]:
            tested = "`make test`: every test (default line)"
        elif v["line_of"](version) in ci:
            tested = f"`make test-core TORCH={v['line_of'](version)}` in CI"
        else:
            tested = f"`make test-core TORCH={v['line_of'](version)}`"
        rows.append(
            [
                version,
                _tch_of(manifest),
                "; ".join(how) or "its own tch release",
                f"`+{v['local_tag'](version)}`",
                tested,
            ]
        )
    return rows


def torch_versions_page() -> str:
    """The torch-versions page."""
    return (
        "# Torch versions\n\n"
        "*Generated when the site is built (`scripts/docs_pages.py`) from "
        "`python/ewc_rs/_torch_version.py` (the one place that lists them), each line's manifest "
        "`build-torch-X.Y/Cargo.toml` and `.ci/run`.*\n\n"
        "The extension links one libtorch through the `tch` crate, and each `tch` release supports one "
        "libtorch: there is one build per torch line, each a manifest over the same `src/`. The "
        "package a line installs is `ewc_rs 0.1.0+torchXY` and requires exactly that torch; "
        "`import ewc_rs` raises `ImportError` naming both versions when another torch is installed.\n\n"
        + _table(["torch", "tch", "how the line builds", "wheel tag", "tested by"], torch_rows(), "lllll")
        + "\nInstall for the torch in your environment (see [Getting started](../getting-started.md)):\n\n"
        "```bash\npip install torch==2.13.0 maturin\npip install --no-build-isolation .\n```\n\n"
        "`make test-core TORCH=X.Y` builds and tests one line in its own venv (kept in "
        "`~/.cache/ewc_rs`); `make wheels` builds one wheel per line into `dist/` with a find-links page; "
        "`scripts/try_torch_line.sh X.Y.Z [FROM_LINE]` tries a new torch release with another line's "
        "manifest. Lines without their own tch release bypass torch-sys's version check, but torch-sys "
        "still compiles its C++ wrapper against that torch's own headers; torch 2.14 and 2.15 need "
        "C++20 and miss four operators tch 0.26 wraps, so `scripts/patch_torch_sys.py` patches a copy "
        "of torch-sys (`.patched/`, made from cargo's registry by the build backend).\n"
    )


# ---------------------------------------------------------------------------------------------------
# Benchmarks


def _load(name: str) -> Optional[dict[str, Any]]:
    path = RESULTS / name
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _machine(res: dict[str, Any]) -> str:
    m = res.get("machine", {})
    return (
        f"torch {m.get('torch', '?')}, {m.get('cpu_count', '?')} CPUs, {m.get('torch_threads', '?')} intra-op threads"
    )


def _s(x: Optional[float]) -> str:
    if x is None:
        return "n/a"
    return f"{x * 1e3:.3f} ms" if x < 0.1 else f"{x:.3f} s"


def fisher_section() -> str:
    """``bench_fisher.py``: every method over the seed's batched estimator."""
    res = _load("fisher_cpu.json")
    if res is None:
        return ""
    models = list(res["results"])
    methods = list(res["results"][models[0]]["times_s"])
    rows = []
    for m in methods:
        row = [f"`{m}`"]
        for name in models:
            r = res["results"][name]
            t = r["times_s"].get(m)
            base = r["times_s"]["seed_batched"]
            row.append("n/a" if t is None else f"{_s(t)} ({t / base:.2f}×)")
        rows.append(row)
    err = ["relative error vs `loop`: `ewc_rs:empirical` / `seed_batched`"]
    for name in models:
        e = res["results"][name]["rel_error_vs_loop"]
        err.append(f"{e.get('ewc_rs:empirical', float('nan')):.1e} / {e.get('seed_batched', float('nan')):.2f}")
    rows.append(err)
    return (
        "## Fisher estimation\n\n"
        f"`python benchmarks/bench_fisher.py` (N = {res['samples']}, batch {res['batch']}; {_machine(res)}): "
        "seconds per estimation (median of interleaved rounds) and the ratio to the seed article's "
        "`batched` estimator, measured in the same process. `loop` is the definition (one "
        "forward/backward per sample), `vmap` `torch.func`'s per-sample gradients, `backpack` BackPACK's "
        "`SumGradSquared`, `fwd_bwd` one plain forward+backward over the same batches.\n\n"
        + _table(["method", *models], rows)
    )


def recurrent_section() -> str:
    """``bench_recurrent.py``: recurrent layers over their own forward+backward."""
    res = _load("recurrent_cpu.json")
    if res is None:
        return ""
    cells = list(res["results"])
    methods = list(res["results"][cells[0]]["over_fwd_bwd"])
    rows = [["`fwd_bwd` (s)", *(f"{res['results'][c]['times_s']['fwd_bwd']:.3f}" for c in cells)]]
    for m in methods[1:]:
        row = [f"`{m}`"]
        for c in cells:
            x = res["results"][c]["over_fwd_bwd"].get(m)
            row.append("n/a" if x is None else f"{x:.2f}×")
        rows.append(row)
    return (
        "## Recurrent layers\n\n"
        f"`python benchmarks/bench_recurrent.py --threads 1` (input {res['input']}, hidden {res['hidden']}, "
        f"{res['samples']} sequences of {res['steps']} steps in batches of {res['batch']}, {res['classes']} "
        f"classes; {_machine(res)}): time ÷ the module's own forward+backward over the same batches.\n\n"
        + _table(["method", *(c.upper() for c in cells)], rows)
    )


def penalty_section() -> str:
    """``bench_penalty.py``: one penalty step against the memory floor."""
    res = _load("penalty_cpu.json")
    if res is None:
        return ""
    cols = ["seed_loop", "ewc_rs", "ewc_rs_direct", "kernel", "engine", "floor"]
    rows = []
    for name, r in res["results"].items():
        t = r["times_s"]
        rows.append(
            [name, f"{r['tensors']}", f"{r['parameters']:,}"]
            + [_s(t[c]) for c in cols]
            + [
                f"{t['kernel'] / t['floor']:.2f}×",
                f"{t['ewc_rs_direct'] / t['floor']:.2f}×",
                f"{t['ewc_rs'] / t['floor']:.2f}×",
            ]
        )
    header = ["model", "tensors", "parameters", "seed loop", "ewc_rs", "direct", "kernel", "engine", "floor"]
    header += ["kernel ÷ floor", "direct ÷ floor", "ewc_rs ÷ floor"]
    return (
        "## Penalty and gradient\n\n"
        f"`python benchmarks/bench_penalty.py` ({res['dtype']}, {res['repeats']} calls a round; {_machine(res)}). "
        "`seed loop`: the seed's tensor ops per parameter + `backward()`; `ewc_rs`: "
        "`ewc.penalty(model).backward()`; `direct`: `ewc.backward(model)` into existing `.grad`; `kernel`: "
        "the raw fused call; `engine`: autograd alone handing ready-made gradients to the parameters; "
        "`floor`: `torch.addcmul` over buffers of the bytes the one-pass penalty must move.\n\n" + _table(header, rows)
    )


def kfac_section() -> str:
    """``bench_kfac.py``: Kronecker factors and their penalty against curvlinops and nngeometry."""
    res = _load("kfac_cpu.json")
    if res is None:
        return ""
    models = list(res["results"])
    labels = {
        "fisher_diag_exact": '`fisher_diag(kind="exact")`',
        "fisher_kfac_exact": '`fisher_kfac(kind="exact")`',
        "curvlinops_type2": "curvlinops `KFACLinearOperator` factors (type-2)",
    }
    rows = [[label, *(_s(res["results"][m]["estimation_s"].get(key)) for m in models)] for key, label in labels.items()]
    for tasks, per in res["results"][models[0]]["penalty_s"].items():
        for key in per:
            rows.append(
                [
                    f"penalty step, `{key}`, {tasks.replace('_', ' ')}",
                    *(_s(res["results"][m]["penalty_s"][tasks].get(key)) for m in models),
                ]
            )
    header = ["", *(f"{m} ({res['results'][m]['parameters']:,} parameters)" for m in models)]
    return (
        "## Kronecker-factored EWC\n\n"
        f"`python benchmarks/bench_kfac.py` (N = {res['samples']}; {_machine(res)}); the factors agree with "
        "curvlinops and nngeometry to float32 precision (the JSON holds every layer's difference).\n\n"
        + _table(header, rows)
    )


def distributed_section() -> str:
    """``bench_distributed.py``: Fisher and penalty step at world sizes 1 and 2."""
    res = _load("distributed_cpu.json")
    if res is None:
        return ""
    rows = []
    for world, wrappers in res["results"].items():
        for wrapper, r in wrappers.items():
            sent = ", ".join(f"{k} {v:,}" for k, v in r["fisher_comm"]["bytes"].items())
            rows.append(
                [
                    world,
                    wrapper.upper(),
                    _s(r["fisher_s"]),
                    _s(r["fisher_cpu_s"]),
                    sent,
                    _s(r["penalty_step_s"]),
                    f"{r['penalty_comm']['total_bytes']}",
                ]
            )
    c = res["config"]
    load = ", ".join(f"{x:.1f}" for x in res.get("load_avg_before", []))
    return (
        "## Data parallel\n\n"
        f"`python benchmarks/bench_distributed.py` (gloo, one thread a process; model {c['model']}, "
        f'`kind="{c["kind"]}"`, {c["samples"]} samples split over the ranks in batches of {c["batch"]}; '
        f"load average before the run: {load}; {_machine(res)}).\n\n"
        + _table(
            [
                "world",
                "wrapper",
                "Fisher (wall)",
                "Fisher (CPU of a rank)",
                "bytes sent per estimation",
                "penalty step",
                "bytes per step",
            ],
            rows,
            "rllrlrr",
        )
    )


def memory_section() -> str:
    """``fisher_memory.py``: peak resident memory of one estimation."""
    res = _load("fisher_memory_cpu.json")
    if res is None:
        return ""
    return (
        "## Memory\n\n"
        f"`python benchmarks/fisher_memory.py`: the `{res['kind']}` Fisher of a torchvision "
        f"{res['model']} on {res['size']}×{res['size']} inputs, batch {res['batch']}, peaks at "
        f"**{res['peak_rss_gib']:.1f} GiB** resident ({res['seconds']:.0f} s; {_machine(res)}).\n"
    )


def benchmarks_page() -> str:
    """The benchmarks page: every CPU result file's table."""
    sections = [
        fisher_section(),
        recurrent_section(),
        penalty_section(),
        kfac_section(),
        distributed_section(),
        memory_section(),
    ]
    return (
        "# Benchmarks\n\n"
        "*Generated when the site is built (`scripts/docs_pages.py`) from `benchmarks/results/*.json`, "
        "the files the benchmark scripts write; each section names its command.* Timings are medians "
        "of interleaved rounds, every method in the same process on the same data. They were measured "
        "on a shared 2-core machine: read the ratios, not the absolute times. Language models, the "
        "billion-parameter run and the 8-bit code are on [Language models](../llm.md); CUDA results "
        "will appear here once a GPU run is committed ([CUDA](../how-to/cuda.md)).\n\n"
        + "\n".join(s for s in sections if s)
    )


PAGES: dict[str, Callable[[], str]] = {
    "reference/layers.md": layers_page,
    "reference/torch-versions.md": torch_versions_page,
    "reference/benchmarks.md": benchmarks_page,
}


def _write_all() -> None:
    import mkdocs_gen_files

    for name, page in PAGES.items():
        with mkdocs_gen_files.open(name, "w") as f:
            f.write(page())


if __name__ == "__main__":
    for arg in sys.argv[1:] or list(PAGES):
        print(PAGES[arg]())
elif __name__ == "<run_path>":  # mkdocs-gen-files
    _write_all()
