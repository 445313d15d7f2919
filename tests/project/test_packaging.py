"""Packaging invariants, checked without the compiled extension (files are read, not imported).

* The torch versions are written once, in ``python/ewc_rs/_torch_version.py``; the places that cannot
  read it (pyproject.toml's range, the README's commands, the per-line manifests build-torch-X.Y/, the
  docs' torch-versions page) must say the same, and each line's manifest must be the root one with
  only its tch crates changed.
* The core package ``ewc_rs`` does not import the demo (``ewc_rs.demo``: data files, plots), nor the
  framework integrations (``ewc_rs.integrations``), whose package imports no framework.
* The integrations' extras are in requirements-dev.txt (the test command installs it), and the
  Makefile installs requirements under a constraint file pinning torch.
"""

from __future__ import annotations

import ast
import re
import runpy
import sys
from pathlib import Path
from typing import Any

import pytest

from repo_files import load_module

REPO = Path(__file__).resolve().parents[2]
VERSION_FILE = REPO / "python" / "ewc_rs" / "_torch_version.py"


def _versions() -> dict[str, Any]:
    return runpy.run_path(str(VERSION_FILE))


def _torch_version() -> str:
    version = _versions()["TORCH_VERSION"]
    assert isinstance(version, str) and re.fullmatch(r"\d+\.\d+\.\d+", version), version
    return version


def _supported() -> tuple[str, ...]:
    supported = _versions()["SUPPORTED_TORCH_VERSIONS"]
    assert all(re.fullmatch(r"\d+\.\d+\.\d+", v) for v in supported), supported
    assert _torch_version() in supported
    return tuple(supported)


def _toml(path: Path) -> dict[str, Any]:
    if sys.version_info < (3, 11):
        pytest.skip("reading TOML needs tomllib (Python 3.11)")
    import tomllib

    return tomllib.loads(path.read_text(encoding="utf-8"))


def _pyproject_dependencies() -> list[str]:
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    if sys.version_info >= (3, 11):
        import tomllib

        return list(tomllib.loads(text)["project"]["dependencies"])
    match = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, re.MULTILINE | re.DOTALL)
    assert match is not None, "pyproject.toml: no [project] dependencies list"
    return re.findall(r'"([^"]+)"', match.group(1))


def test_pyproject_torch_range_is_the_supported_versions() -> None:
    """pyproject's torch requirement admits each supported release, and no other X.Y.0 around them."""
    from packaging.requirements import Requirement

    pins = [Requirement(d) for d in _pyproject_dependencies() if re.match(r"torch\b(?!vision)", d)]
    assert len(pins) == 1, pins
    supported = _supported()
    for minor in range(5, 20):
        release = f"2.{minor}.0"
        assert pins[0].specifier.contains(release) == (release in supported), (str(pins[0]), release)


def test_version_line_is_what_the_makefile_reads() -> None:
    """The Makefile extracts the version with ``sed 's/^TORCH_VERSION = "\\(.*\\)"/\\1/p'``."""
    text = VERSION_FILE.read_text(encoding="utf-8")
    assert re.findall(r'^TORCH_VERSION = "(.*)"$', text, re.MULTILINE) == [_torch_version()]
    assert "python/ewc_rs/_torch_version.py" in (REPO / "Makefile").read_text(encoding="utf-8")


LINE_CRATES = ("tch", "torch-sys", "pyo3-tch")


def _tch_version(manifest: dict[str, Any]) -> str:
    deps = manifest["dependencies"]
    versions = {name: deps[name] if isinstance(deps[name], str) else deps[name]["version"] for name in LINE_CRATES}
    assert len(set(versions.values())) == 1, versions
    return str(versions["tch"]).lstrip("=")


def _locked_versions(lock: Path) -> dict[str, str]:
    return {p["name"]: p["version"] for p in _toml(lock)["package"]}


@pytest.mark.parametrize("version", _supported())
def test_each_supported_line_has_a_manifest_like_the_root_one(version: str) -> None:
    """build-torch-X.Y/Cargo.toml: the root manifest with the line's tch crates and version tag."""
    versions = _versions()
    folder = REPO / versions["build_dir"](version)
    root, line = _toml(REPO / "Cargo.toml"), _toml(folder / "Cargo.toml")
    assert line["package"]["version"] == f"{root['package']['version']}+{versions['local_tag'](version)}"
    assert line["package"]["build"] == "../build.rs"
    assert line["lib"] == {**root["lib"], "path": "../src/lib.rs"}
    assert line["profile"] == root["profile"] and "workspace" in line
    same = {k: v for k, v in line["dependencies"].items() if k not in LINE_CRATES}
    assert same == {k: v for k, v in root["dependencies"].items() if k not in LINE_CRATES}
    if version == _torch_version():
        assert _tch_version(line) == _tch_version(root), "the default line's manifest must match the root one"
    locked = _locked_versions(folder / "Cargo.lock")
    assert all(locked[name] == _tch_version(line) for name in LINE_CRATES), folder / "Cargo.lock"
    assert locked["pyo3"] == _locked_versions(REPO / "Cargo.lock")["pyo3"]


def test_only_bypassed_lines_borrow_a_tch() -> None:
    """Each line has its own tch release, except those BYPASS_VERSION_CHECK lists, which reuse one."""
    versions = _versions()
    tch = {v: _tch_version(_toml(REPO / versions["build_dir"](v) / "Cargo.toml")) for v in _supported()}
    own = [tch[v] for v in _supported() if v not in versions["BYPASS_VERSION_CHECK"]]
    assert len(own) == len(set(own)), tch
    assert set(versions["BYPASS_VERSION_CHECK"]) <= set(_supported())
    assert all(tch[v] in own for v in versions["BYPASS_VERSION_CHECK"]), tch


def test_no_manifest_for_an_unsupported_line() -> None:
    versions = _versions()
    lines = {p.name for p in REPO.glob("build-torch-*")}
    assert lines == {versions["build_dir"](v) for v in _supported()}


def test_requirements_leave_torch_to_the_makefile() -> None:
    for name in ("requirements-dev.txt", "requirements-bench.txt", "requirements-core.txt"):
        lines = (REPO / name).read_text(encoding="utf-8").splitlines()
        assert not [ln for ln in lines if re.match(r"\s*torch\s*([=<>!~]|$)", ln)], name


def test_readme_names_the_supported_versions() -> None:
    """The README's install lines name supported versions only, the default one among them."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    named = set(re.findall(r"torch==(\d+\.\d+\.\d+)", readme))
    assert _torch_version() in named
    assert named <= set(_supported())


def test_torch_versions_page_lists_every_line_with_its_tch() -> None:
    """The docs' torch-versions page (generated by scripts/docs_pages.py) has one row per supported
    version, with the tch of that line's manifest, and says which lines the test command and CI run."""
    pages = load_module("docs_pages", REPO / "scripts" / "docs_pages.py")
    rows = pages.torch_rows()
    assert [r[0] for r in rows] == list(_supported())
    for version, tch, *_ in rows:
        assert tch == _tch_version(_toml(REPO / _versions()["build_dir"](version) / "Cargo.toml")), version
    page = pages.torch_versions_page()
    assert "make test`: every test (default line)" in page
    assert "make test-core TORCH=2.13` in CI" in page


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
    assert 'echo "torch==$(LINE_VERSION)" > $(LINE_VENV)/torch-constraint.txt' in makefile
    assert "-c $(LINE_VENV)/torch-constraint.txt -r requirements-core.txt" in makefile


def test_integrations_package_imports_no_framework() -> None:
    """``ewc_rs.integrations`` imports nothing; the core never imports the integrations."""
    init = REPO / "python" / "ewc_rs" / "integrations" / "__init__.py"
    assert not _imported_modules(init), f"{init.name} imports {sorted(_imported_modules(init))}"
    for path in sorted((REPO / "python" / "ewc_rs").glob("*.py")):
        found = {m for m in _imported_modules(path) if re.match(r"^(\.|ewc_rs\.)integrations\b", m)}
        assert not found, f"{path.name} imports {sorted(found)}"
