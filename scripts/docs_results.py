"""The documentation's Results page (``results/demos.md``), generated from the demos' committed
result files ``docs/*.json`` and figures ``docs/*.png``: every number on the page is read from a
JSON file, under the command that wrote it.

mkdocs-gen-files runs this script at build time (through ``runpy.run_path``, so ``__name__`` is
``"<run_path>"``) and the page is written into the site; run standalone,

    python scripts/docs_results.py

prints the page. ``page()`` builds it; ``PROMISED`` lists the JSON files it is built from.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Optional

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
DOCS = ROOT / "docs"
PAGE = "results/demos.md"

if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))
from llm_figures import merge_table  # noqa: E402
from permuted_table import load_curves, markdown_table  # noqa: E402

#: The result files the page is built from (under docs/), each shown with the command that wrote it.
PROMISED = (
    "seed.json",
    "permuted.json",
    "permuted_kfac_20.json",
    "permuted_ekfac_20.json",
    "permuted_kfac_50.json",
    "permuted_kfac_50_10epochs.json",
    "permuted_kfac_50_damped.json",
    "merge.json",
)

SEED_ROWS = {
    "no_ewc": "no EWC",
    "ewc_batched": "EWC, the seed's `batched` Fisher",
    "ewc_exact": "EWC, `exact` Fisher",
    "ewc_exact_bn_update": 'EWC, `exact`, `norm_stats="update"`',
}
SEED_METRICS = {
    "mnist_after_a": "MNIST after A",
    "mnist_after_b": "MNIST after B",
    "fashion_after_b": "Fashion after B",
}


def load(name: str) -> dict[str, Any]:
    """One committed result file, ``docs/<name>``."""
    data: dict[str, Any] = json.loads((DOCS / name).read_text())
    return data


def num(v: float) -> str:
    """A setting as the commands write it: 100, 0.5, 3e4, 3e-5."""
    if v == 0 or 1e-2 <= abs(v) < 1e4:
        return f"{v:g}"
    return re.sub(r"e([+-])0*(\d)", lambda m: "e" + ("-" if m.group(1) == "-" else "") + m.group(2), f"{v:.3g}")


def demo_defaults(demo: str) -> Optional[dict[str, Any]]:
    """The demo's default settings (``SEED_CONFIG`` / ``PERMUTED_CONFIG``), for result files that
    record none; None when ewc_rs cannot be imported."""
    try:
        if demo == "seed":
            from ewc_rs.demo.seed import SEED_CONFIG

            return dict(SEED_CONFIG)
        from ewc_rs.demo.permuted import PERMUTED_CONFIG

        return dict(PERMUTED_CONFIG)
    except ImportError:
        return None


def command(cmd: str, files: str, note: str = "") -> str:
    """The line that says how the results below were made."""
    return f"Command: `{cmd}`{f' ({note})' if note else ''}; results: {files}."


def figure(name: str, alt: str) -> str:
    """A committed figure, if it is there (the page lives one folder below docs/)."""
    return f"![{alt}](../{name})" if (DOCS / name).is_file() else ""


def permuted_config(data: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """A permuted run's settings: its recorded ``config``, else the demo's defaults (False)."""
    if "config" in data:
        return data["config"], True
    return demo_defaults("permuted") or {}, False


def lam_line(files: list[str]) -> str:
    """λ of every method of these runs, from each file's config or the demo's defaults."""
    parts, unrecorded = [], []
    for name in files:
        data = load(name)
        cfg, recorded = permuted_config(data)
        if not recorded:
            unrecorded.append(f"`docs/{name}`")
        for method in data["permuted"]:
            lam = cfg.get("lam", {}).get(method)
            if lam is not None:
                parts.append(f"`{method}` {num(lam)}")
    text = "λ: " + ", ".join(dict.fromkeys(parts)) + "."
    if unrecorded:
        verb = "records" if len(unrecorded) == 1 else "record"
        text += f" ({', '.join(unrecorded)} {verb} no settings: the λ shown are the demo's defaults, "
        text += "which the command used.)"
    return text


def final_sentence(curves: dict[str, list[float]]) -> str:
    """The average accuracy after the last task, per column."""
    tasks = max(len(c) for c in curves.values())
    ends = [f"{label} {c[-1]:.4f}" for label, c in curves.items() if len(c) == tasks]
    return f"Average accuracy after task {tasks}: " + ", ".join(ends) + "."


def first_and_last(files: list[str], labels: list[str]) -> str:
    """From the runs' accuracy matrices: after the last task, the accuracy on task 1 and on the last."""
    parts = []
    given = iter(labels)
    for name in files:
        for matrix in load(name)["matrix"].values():
            last = matrix[-1]
            parts.append(f"{next(given)} {last[0]:.4f} / {last[-1]:.4f}")
    return f"After the last task, accuracy on task 1 / on the last task: {', '.join(parts)}."


def seed_section() -> str:
    data = load("seed.json")["seed"]
    cfg = demo_defaults("seed") or {}
    lams: dict[str, Optional[float]] = {
        "ewc_batched": cfg.get("lam_batched"),
        "ewc_exact": cfg.get("lam_exact"),
        "ewc_exact_bn_update": cfg.get("lam_exact"),
    }
    lines = ["| row | λ | " + " | ".join(SEED_METRICS.values()) + " |", "|---|---:" + "|---:" * len(SEED_METRICS) + "|"]
    for row, accs in data.items():
        lam = lams.get(row)
        name = SEED_ROWS.get(row, row)
        cells = " | ".join(f"{accs[m]:.4f}" for m in SEED_METRICS)
        lines.append(f"| {name} (`{row}`) | {num(lam) if lam else '–'} | {cells} |")
    return "\n".join(
        [
            "## MNIST → Fashion-MNIST: the seed article's table",
            "",
            command(
                "python -m ewc_rs.demo seed --threads 1",
                "`docs/seed.json`, `docs/seed.png`",
                "about 1.5 minutes on the 2-core development machine",
            ),
            "",
            "The seed article's MLP (784-100-100-10 with two BatchNorm layers), Adam 1e-3, batch 100, 4 epochs "
            "per task. Where only MNIST's test file is available it is split 8000 train / 2000 test with a fixed "
            "seed (the official split is used when the training files are present); Fashion-MNIST is the full "
            "set. λ are the demo's settings (`SEED_CONFIG` in `ewc_rs/demo/seed.py`; the file records none). The "
            "`batched` row reproduces the article's estimator at its λ, which it needs because that estimator is "
            "about 1/batch_size of the Fisher ([The Fisher kinds](../explanation/fisher-kinds.md)). The first "
            "three rows keep BatchNorm's statistics frozen during task B, so that they differ only in the "
            "penalty; the last lets them follow task B: EWC protects parameters, not buffers.",
            "",
            "\n".join(lines),
            "",
            figure("seed.png", "MNIST → Fashion-MNIST: accuracy per row"),
        ]
    )


def permuted_section() -> str:
    data = load("permuted.json")
    cfg, _ = permuted_config(data)
    curves = data["permuted"]
    tasks = max(len(c) for c in curves.values())
    lines = [
        "| method | λ | " + " | ".join(f"after {t}" for t in range(1, tasks + 1)) + " |",
        "|---|---:" + "|---:" * tasks + "|",
    ]
    for method, curve in curves.items():
        lam = cfg.get("lam", {}).get(method)
        lines.append(
            f"| `{method}` | {num(lam) if lam is not None else '–'} | " + " | ".join(f"{v:.4f}" for v in curve) + " |"
        )
    return "\n".join(
        [
            f"## Permuted MNIST, {tasks} tasks (Kirkpatrick et al. 2017, Fig. 2A)",
            "",
            command(
                "python -m ewc_rs.demo permuted --threads 1",
                "`docs/permuted.json`, `docs/permuted.png`",
                "about 1.5 minutes on the 2-core development machine",
            ),
            "",
            f"{tasks} tasks (task 1 unpermuted), MLP 784-256-256-10, Adam {num(cfg.get('lr', 1e-3))}, batch "
            f"{cfg.get('batch_size')}, {cfg.get('epochs')} epochs per task, the Fisher from "
            f"{cfg.get('fisher_samples')} training images per task. λ per method (from the file) was chosen by a "
            "validation sweep that never sees the test images (`python -m ewc_rs.demo.sweep`, see its docstring). "
            "Average test accuracy over the tasks seen so far:",
            "",
            "\n".join(lines),
            "",
            figure("permuted.png", "permuted MNIST: average accuracy over the tasks seen"),
        ]
    )


def kfac20_section() -> str:
    files = ["permuted_kfac_20.json"]
    curves = load_curves([DOCS / f for f in files])
    return "\n".join(
        [
            "## Kronecker-factored EWC against the diagonal, 20 tasks",
            "",
            command(
                "python -m ewc_rs.demo permuted --tasks 20 --methods none,ewc_exact,kfac_online,kfac --threads 1",
                "`docs/permuted_kfac_20.json`, `docs/permuted_kfac.png`",
                "about 30 minutes, most of them `kfac`, whose penalty grows with the number of stored tasks",
            ),
            "",
            "The protocol of the 5-task table, 20 tasks. " + lam_line(files) + " Average test accuracy over "
            "the tasks seen so far ([Kronecker-factored EWC](../how-to/kfac.md)):",
            "",
            markdown_table(curves),
            "",
            final_sentence(curves),
            "",
            figure("permuted_kfac.png", "permuted MNIST, 20 tasks: KFAC against the diagonal"),
        ]
    )


def ekfac_section() -> str:
    files = ["permuted_kfac_20.json", "permuted_ekfac_20.json"]
    curves = load_curves([DOCS / f for f in files])
    tasks = max(len(c) for c in curves.values())
    rows = sorted({1, *range(5, tasks + 1, 5), tasks})
    return "\n".join(
        [
            "## EKFAC, 20 tasks",
            "",
            command(
                "python -m ewc_rs.demo permuted --tasks 20 --methods ekfac_online,ekfac --threads 1",
                "`docs/permuted_ekfac_20.json`, `docs/permuted_ekfac_20.png`",
                "about 12 minutes, most of them `ekfac`",
            ),
            "",
            "The same protocol, the Fisher's images a fixed subset so that EKFAC's two passes see the same "
            "ones, beside the 20-task KFAC run's columns. " + lam_line(files) + " Every task: "
            "`python scripts/permuted_table.py docs/permuted_kfac_20.json docs/permuted_ekfac_20.json`.",
            "",
            markdown_table(curves, rows),
            "",
            final_sentence(curves),
            "",
            figure("permuted_ekfac_20.png", "permuted MNIST, 20 tasks: EKFAC"),
        ]
    )


def kfac50_section() -> str:
    runs = [
        (
            "permuted_kfac_50.json",
            "python -m ewc_rs.demo permuted --tasks 50 --methods none,ewc_exact,kfac_online --threads 1",
        ),
        (
            "permuted_kfac_50_10epochs.json",
            "python -m ewc_rs.demo permuted --tasks 50 --methods kfac_online --kfac-lam 3 --damping 0 "
            "--epochs 10 --threads 1",
        ),
        (
            "permuted_kfac_50_damped.json",
            "python -m ewc_rs.demo permuted --tasks 50 --methods kfac_online --kfac-lam 3 --damping 3e-5 "
            "--epochs 10 --threads 1",
        ),
    ]
    labels = []
    for name, _ in runs:
        data = load(name)
        cfg, _ = permuted_config(data)
        for method in data["permuted"]:
            if method.startswith("kfac"):
                labels.append(f"`{method}` ({cfg.get('epochs')} epochs, d = {num(cfg.get('kfac_damping', 0.0))})")
            else:
                labels.append(f"`{method}`")
    files = [name for name, _ in runs]
    curves = load_curves([DOCS / f for f in files], labels)
    tasks = max(len(c) for c in curves.values())
    listing = "\n".join(f"- `{cmd}` → `docs/{name}`" for name, cmd in runs)
    return "\n".join(
        [
            f"## {tasks} tasks: online KFAC (Ritter et al. report > 0.90)",
            "",
            "Commands:",
            "",
            listing,
            "",
            "The first run keeps the 20-task settings; the other two train 10 epochs a task, the last with "
            "Ritter et al.'s prior precision on the factors, each task's (A + √d I) ⊗ (G + √d I) "
            "(`consolidate(damping=d)`), λ and d chosen on validation images over 10 tasks "
            "(`python -m ewc_rs.demo.sweep`, its grid in its docstring). " + lam_line(files) + " Every task: "
            "`python scripts/permuted_table.py " + " ".join(f"docs/{f}" for f in files) + "`.",
            "",
            markdown_table(curves, range(10, tasks + 1, 10)),
            "",
            final_sentence(curves),
            "",
            first_and_last(files, labels),
            "",
            figure("permuted_kfac_50.png", f"permuted MNIST, {tasks} tasks, 3 epochs a task"),
            "",
            figure("permuted_kfac_50_damped.png", f"permuted MNIST, {tasks} tasks, online KFAC with the prior term"),
        ]
    )


def merge_section() -> str:
    data = load("merge.json")
    lines = merge_table(data.get("accuracy", {}))
    if not lines:
        return ""
    cfg = data.get("config", {})
    return "\n".join(
        [
            "## Fisher-weighted merging (Matena & Raffel 2022)",
            "",
            command("python -m ewc_rs.demo merge", "`docs/merge.json`, `docs/merge.png`"),
            "",
            "A base MLP (784-256-256-10) learns MNIST; two copies are fine-tuned, one on each of two permuted "
            f"tasks ({cfg.get('base_epochs')} epochs for the base, {cfg.get('epochs')} for each fine-tuning), "
            f"and each one's exact diagonal Fisher is estimated on {cfg.get('fisher_samples')} images of its "
            "task. The two are merged by plain averaging and by `ewc_rs.fisher_merge` (equal weights); test "
            "accuracy on each task:",
            "",
            "\n".join(lines),
            "",
            figure("merge.png", "merging two fine-tuned models: accuracy per task"),
        ]
    )


def page() -> str:
    """The whole page, Markdown."""
    sections = [seed_section(), permuted_section(), kfac20_section(), ekfac_section(), kfac50_section()]
    sections.append(merge_section())
    head = "\n".join(
        [
            "# Demo results",
            "",
            "<!-- generated by scripts/docs_results.py from docs/*.json; do not edit -->",
            "",
            "What the demos (`python -m ewc_rs.demo`, see [Run the demos](../how-to/demos.md)) measured. Every "
            "table is read from the result file committed under `docs/` when the site is built, below the "
            "command that wrote it; run the command again to check a number (its own run may differ in the last "
            "digits). Which Fisher kind and which λ: [the comparison after van de Ven](../fisher_kinds.md); "
            "language models: [Language models](../llm.md).",
            "",
        ]
    )
    body = "\n\n".join(s.rstrip() for s in sections if s)
    return head + "\n" + body + "\n"


if __name__ == "__main__":
    sys.stdout.write(page())
elif __name__ == "<run_path>":  # mkdocs-gen-files
    import mkdocs_gen_files

    with mkdocs_gen_files.open(PAGE, "w") as f:
        f.write(page())
