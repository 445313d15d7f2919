"""The documentation's generated and executed parts: the reference pages ``scripts/docs_pages.py``
writes at build time say what the code and the result files say (the torch-versions page is
checked with the other torch-line facts, in ``test_packaging.py``); the tutorial pages are executed
runs of the notebooks as they are now; the README stays a page."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ewc_rs import _core
from repo_files import REPO, load_module

pages = load_module("docs_pages", REPO / "scripts" / "docs_pages.py")


def test_every_registered_layer_has_a_probe_and_a_row() -> None:
    """A type added to the Rust registry without a probe in the page's script fails here."""
    registered = _core.registered_layers()
    assert registered, "the registry is empty"
    missing = set(registered) - pages.PROBED
    assert not missing, f"scripts/docs_pages.py has no probe for {sorted(missing)}"
    rows = pages.layer_rows()
    assert [r[0].strip("`") for r in rows] == registered
    for row in rows:
        if "not installed" not in row[2]:
            assert row[2] == "yes", f"the probe of {row[0]} is not covered by its own rule: fix the probe"


def test_kronecker_forms_are_the_extensions() -> None:
    rows = {r[0].strip("`"): r[3] for r in pages.layer_rows()}
    assert rows["torch.nn.modules.linear.Linear"].startswith("A 3(+1) × G 2")
    assert rows["torch.nn.modules.normalization.LayerNorm"] == "diagonal"
    assert "[in, out]" in rows["transformers.pytorch_utils.Conv1D"]


# Result files quoted on other generated pages (scripts/llm_figures.py writes docs/llm.md).
ELSEWHERE = {"llm_cpu.json", "llm_1b_cpu.json", "fisher8_codes.json"}


def test_benchmarks_page_quotes_every_result_file() -> None:
    page = pages.benchmarks_page()
    commands = set(re.findall(r"`python benchmarks/(\w+)\.py", page))
    for path in sorted((REPO / "benchmarks" / "results").glob("*_cpu.json")):
        if path.name in ELSEWHERE:
            continue
        script = path.name.removesuffix("_cpu.json")
        script = script if script == "fisher_memory" else f"bench_{script}"
        assert script in commands, f"{path.name} ({script}.py) has no section on the benchmarks page"


def test_benchmarks_page_ratios_are_the_json_s() -> None:
    res = json.loads((REPO / "benchmarks" / "results" / "fisher_cpu.json").read_text(encoding="utf-8"))
    page = pages.fisher_section()
    row = next(line for line in page.splitlines() if line.startswith("| `ewc_rs:empirical`"))
    for model, cell in zip(res["results"], row.split("|")[2:-1]):
        t = res["results"][model]["times_s"]
        assert f"({t['ewc_rs:empirical'] / t['seed_batched']:.2f}×)" in cell, model


def _cells(path: Path) -> list[tuple[str, str]]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    return [(c["cell_type"], "".join(c["source"])) for c in nb["cells"]]


@pytest.mark.parametrize("notebook", sorted((REPO / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem)
def test_tutorial_page_is_a_full_run_of_the_notebook(notebook: Path) -> None:
    """docs/tutorials/NAME.ipynb is notebooks/NAME.ipynb executed by scripts/run_tutorials.py: the
    same cells, every code cell run (a changed notebook needs the script run again)."""
    page = REPO / "docs" / "tutorials" / notebook.name
    assert page.exists() and not page.is_symlink(), f"run: python scripts/run_tutorials.py {notebook.stem}"
    assert _cells(page) == _cells(notebook), f"{page} is stale: run python scripts/run_tutorials.py {notebook.stem}"
    nb = json.loads(page.read_text(encoding="utf-8"))
    assert "executed_seconds" in nb["metadata"].get("ewc_rs", {})
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c["execution_count"] is not None for c in code), "a code cell was not executed"


def test_readme_is_a_page() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
