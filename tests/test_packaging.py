"""Packaging invariants, checked without the compiled extension (files are read, not imported).

* The torch version is written once, in ``python/ewc_rs/_torch_version.py``; the places that cannot
  read it (pyproject.toml's pin, the README's commands) must say the same.
* The core package ``ewc_rs`` does not import the demo (``ewc_rs.demo``: data files, plots), nor the
  framework integrations (``ewc_rs.integrations``), whose package imports no framework.
* The integrations' extras are in requirements-dev.txt (the test command installs it), and the
  Makefile installs requirements under a constraint file pinning torch.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VERSION_FILE = REPO / "python" / "ewc_rs" / "_torch_version.py"


def _torch_version() -> str:
    spec = importlib.util.spec_from_file_location("ewc_rs_torch_version_under_test", VERSION_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    version = module.TORCH_VERSION
    assert isinstance(version, str) and re.fullmatch(r"\d+\.\d+\.\d+", version), version
    return version


def _pyproject_dependencies() -> list[str]:
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    if sys.version_info >= (3, 11):
        import tomllib

        return list(tomllib.loads(text)["project"]["dependencies"])
    match = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, re.MULTILINE | re.DOTALL)
    assert match is not None, "pyproject.toml: no [project] dependencies list"
    return re.findall(r'"([^"]+)"', match.group(1))


def test_pyproject_pins_the_torch_version() -> None:
    pins = [d for d in _pyproject_dependencies() if re.match(r"torch\b(?!vision)", d)]
    assert pins == [f"torch=={_torch_version()}"]


def test_version_line_is_what_the_makefile_reads() -> None:
    """The Makefile extracts the version with ``sed 's/^TORCH_VERSION = "\\(.*\\)"/\\1/p'``."""
    text = VERSION_FILE.read_text(encoding="utf-8")
    assert re.findall(r'^TORCH_VERSION = "(.*)"$', text, re.MULTILINE) == [_torch_version()]
    assert "python/ewc_rs/_torch_version.py" in (REPO / "Makefile").read_text(encoding="utf-8")


def test_requirements_leave_torch_to_the_makefile() -> None:
    for name in ("requirements-dev.txt", "requirements-bench.txt"):
        lines = (REPO / name).read_text(encoding="utf-8").splitlines()
        assert not [ln for ln in lines if re.match(r"\s*torch\s*([=<>!~]|$)", ln)], name


def test_readme_names_the_same_version() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert set(re.findall(r"torch==(\d+\.\d+\.\d+)", readme)) == {_torch_version()}


def _imported_modules(path: Path) -> set[str]:
    """Every module an ``import``/``from ... import`` in ``path`` names, relative ones with their dots."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names.add(base)
            names.update(f"{base}.{alias.name}" if node.module else base + alias.name for alias in node.names)
    return names


def test_core_does_not_import_the_demo() -> None:
    core = sorted((REPO / "python" / "ewc_rs").glob("*.py"))
    assert core, "no core modules found"
    for path in core:
        demo = {m for m in _imported_modules(path) if re.match(r"^(\.|ewc_rs\.)(demo|data)\b", m)}
        assert not demo, f"{path.name} imports {sorted(demo)}"


INTEGRATION_EXTRAS = ("transformers", "lightning", "peft", "avalanche")


def test_integration_extras_are_installed_for_the_tests() -> None:
    """The test command installs requirements-dev.txt; it must hold every integration extra's pins."""
    if sys.version_info < (3, 11):
        pytest.skip("reading pyproject's optional-dependencies needs tomllib (Python 3.11)")
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    lines = {ln.strip() for ln in (REPO / "requirements-dev.txt").read_text(encoding="utf-8").splitlines()}
    for name in INTEGRATION_EXTRAS:
        missing = [req for req in extras[name] if req not in lines]
        assert extras[name] and not missing, f"extra [{name}]: {missing} not in requirements-dev.txt"
    assert "torchvision==0.26.0" in extras["avalanche"], "torchvision must stay pinned to torch 2.11.0's release"


def test_makefile_installs_requirements_under_a_torch_constraint() -> None:
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert 'echo "torch==$(TORCH_VERSION)" > $(TORCH_CONSTRAINT)' in makefile
    for requirements in ("requirements-dev.txt", "requirements-bench.txt"):
        assert f"-c $(TORCH_CONSTRAINT) -r {requirements}" in makefile, requirements


def test_integrations_package_imports_no_framework() -> None:
    """``ewc_rs.integrations`` imports nothing; the core never imports the integrations."""
    init = REPO / "python" / "ewc_rs" / "integrations" / "__init__.py"
    assert not _imported_modules(init), f"{init.name} imports {sorted(_imported_modules(init))}"
    for path in sorted((REPO / "python" / "ewc_rs").glob("*.py")):
        found = {m for m in _imported_modules(path) if re.match(r"^(\.|ewc_rs\.)integrations\b", m)}
        assert not found, f"{path.name} imports {sorted(found)}"
