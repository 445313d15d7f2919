"""The Results page (``scripts/docs_results.py``, generated at build time by mkdocs-gen-files) renders
from the committed result files, names every one it promises and every demo result under docs/,
and shows the numbers those files hold: each table is checked against its JSON, read here on its own."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from types import ModuleType
from typing import Any

import pytest

from repo_files import REPO as ROOT
from repo_files import load_module

DOCS = ROOT / "docs"
SCRIPT = ROOT / "scripts" / "docs_results.py"
# Result files with a generated page of their own.
OWN_PAGE = {"fisher_kinds.json"}


def load_script() -> ModuleType:
    return load_module("docs_results", SCRIPT)


@pytest.fixture(scope="module")
def page() -> str:
    text = load_script().page()
    assert isinstance(text, str)
    return text


def read(name: str) -> Any:
    return json.loads((DOCS / name).read_text())


def section(page: str, heading_start: str) -> str:
    """The text of the ``## `` section whose heading starts with ``heading_start``."""
    parts = re.split(r"^## ", page, flags=re.M)
    found = [p for p in parts[1:] if p.startswith(heading_start)]
    assert len(found) == 1, (heading_start, [p.splitlines()[0] for p in parts[1:]])
    return found[0]


def table(text: str) -> list[list[str]]:
    """The rows (cells stripped) of the first Markdown table in ``text``, header first, no rule line."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|"):
            if set(line) <= set("|-: "):
                continue
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:
            break
    assert rows, text[:200]
    return rows


def cell(rows: list[list[str]], first: str, column: str) -> str:
    """The cell in the row whose first cell contains ``first`` and the column headed ``column``."""
    header = rows[0]
    col = header.index(column)
    match = [r for r in rows[1:] if first in r[0]]
    assert len(match) == 1, (first, [r[0] for r in rows])
    return match[0][col]


def test_standalone_run_prints_the_page(page: str) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == page
    assert page.startswith("# ") and "do not edit" in page


def test_every_promised_and_every_demo_result_appears(page: str) -> None:
    promised = set(load_script().PROMISED)
    committed = {p.name for p in DOCS.glob("*.json")} - OWN_PAGE
    assert committed <= promised, f"demo results in docs/ that the Results page does not show: {committed - promised}"
    for name in promised:
        assert (DOCS / name).is_file(), name
        assert f"docs/{name}" in page, name
    # every figure the page embeds is committed, and linked from results/ one folder up
    for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page):
        assert target.startswith("../") and (DOCS / target[3:]).is_file(), target


def test_seed_table_matches_its_json(page: str) -> None:
    rows = table(section(page, "MNIST → Fashion-MNIST"))
    data = read("seed.json")["seed"]
    assert len(rows) == 1 + len(data)
    for row, accs in data.items():
        assert float(cell(rows, f"`{row}`", "MNIST after B")) == pytest.approx(accs["mnist_after_b"], abs=5e-5)
        assert float(cell(rows, f"`{row}`", "Fashion after B")) == pytest.approx(accs["fashion_after_b"], abs=5e-5)


def test_permuted_table_matches_its_json(page: str) -> None:
    rows = table(section(page, "Permuted MNIST"))
    data = read("permuted.json")
    for method, curve in data["permuted"].items():
        last = f"after {len(curve)}"
        assert float(cell(rows, f"`{method}`", last)) == pytest.approx(curve[-1], abs=5e-5)
        lam = data["config"]["lam"][method]
        shown = cell(rows, f"`{method}`", "λ")
        assert shown == "–" if lam is None else float(shown) == pytest.approx(lam)


def test_kfac_20_table_matches_its_json(page: str) -> None:
    rows = table(section(page, "Kronecker-factored EWC against the diagonal"))
    curves = read("permuted_kfac_20.json")["permuted"]
    by_task = {r[0]: r for r in rows[1:]}
    assert list(by_task) == [str(t) for t in range(1, max(len(c) for c in curves.values()) + 1)]  # every task
    for method, curve in curves.items():
        col = rows[0].index(f"`{method}`")
        for t in (1, 10, len(curve)):
            assert float(by_task[str(t)][col]) == pytest.approx(curve[t - 1], abs=5e-5)


def test_ekfac_table_matches_its_json(page: str) -> None:
    rows = table(section(page, "EKFAC"))
    ekfac = read("permuted_ekfac_20.json")["permuted"]
    kfac = read("permuted_kfac_20.json")["permuted"]
    by_task = {r[0]: r for r in rows[1:]}
    for method, curve in {**kfac, **ekfac}.items():
        col = rows[0].index(f"`{method}`")
        assert float(by_task[str(len(curve))][col]) == pytest.approx(curve[-1], abs=5e-5)
        assert float(by_task["5"][col]) == pytest.approx(curve[4], abs=5e-5)


def test_kfac_50_table_matches_its_json(page: str) -> None:
    rows = table(section(page, "50 tasks"))
    by_task = {r[0]: r for r in rows[1:]}
    first = read("permuted_kfac_50.json")["permuted"]
    damped = read("permuted_kfac_50_damped.json")
    plain10 = read("permuted_kfac_50_10epochs.json")
    header = rows[0]
    # columns in file order: the first run's methods, then the 10-epoch run, then the damped one
    assert len(header) == 1 + len(first) + len(plain10["permuted"]) + len(damped["permuted"])
    assert float(by_task["50"][1 + list(first).index("ewc_exact")]) == pytest.approx(first["ewc_exact"][49], abs=5e-5)
    assert float(by_task["30"][-2]) == pytest.approx(plain10["permuted"]["kfac_online"][29], abs=5e-5)
    assert float(by_task["50"][-1]) == pytest.approx(damped["permuted"]["kfac_online"][49], abs=5e-5)
    assert "d = 3e-5" in header[-1] and f"{damped['config']['epochs']} epochs" in header[-1]


def test_merge_table_matches_its_json(page: str) -> None:
    acc = read("merge.json")["accuracy"]
    rows = table(section(page, "Fisher-weighted merging"))
    assert [r[0] for r in rows[1:]] == list(acc)
    for model, row in acc.items():
        assert float(cell(rows, model, "mean")) == pytest.approx(row["mean"], abs=5e-5)
