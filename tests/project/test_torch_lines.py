"""The torch-line machinery, without building: the in-tree build backend's choice of manifest, the
import check's reading of the extension's torch version, and the wheels' find-links page.

The builds themselves are checked by ``make test-core TORCH=X.Y`` (CI runs it for 2.13).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import re
import runpy
import sys
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from repo_files import load_module

REPO = Path(__file__).resolve().parents[2]
VERSIONS: dict[str, Any] = runpy.run_path(str(REPO / "python" / "ewc_rs" / "_torch_version.py"))


@pytest.fixture(scope="module")
def backend() -> ModuleType:
    pytest.importorskip("maturin", reason="the build backend delegates to maturin (requirements-dev.txt)")
    return load_module("ewc_rs_backend_under_test", REPO / "build_backend" / "ewc_rs_backend.py")


def _native() -> ModuleType:
    """``ewc_rs/_native.py`` loaded as part of a stand-in package, so ewc_rs itself is not imported."""
    package = ModuleType("ewc_rs_native_under_test")
    package.__path__ = [str(REPO / "python" / "ewc_rs")]
    sys.modules[package.__name__] = package
    return load_module(f"{package.__name__}._native", REPO / "python" / "ewc_rs" / "_native.py")


@pytest.mark.parametrize("version", VERSIONS["SUPPORTED_TORCH_VERSIONS"])
def test_backend_picks_the_manifest_of_the_line(backend: ModuleType, version: str) -> None:
    manifest = backend.manifest_for(f"{version}+cu130")
    assert manifest == f"build-torch-{version.rsplit('.', 1)[0]}/Cargo.toml"
    assert (REPO / manifest).is_file()


@pytest.mark.parametrize("version", VERSIONS["SUPPORTED_TORCH_VERSIONS"])
def test_backend_bypasses_the_version_check_only_where_listed(backend: ModuleType, version: str) -> None:
    env = backend.build_environment(f"{version}+cu130")
    assert ("LIBTORCH_BYPASS_VERSION_CHECK" in env) == (version in VERSIONS["BYPASS_VERSION_CHECK"]), env


@pytest.mark.parametrize("version", ["2.8.0", "2.16.0+cpu", "2.13.1", "3.0.0"])
def test_backend_refuses_an_unsupported_torch_naming_the_supported_ones(backend: ModuleType, version: str) -> None:
    if version.split("+")[0] in VERSIONS["SUPPORTED_TORCH_VERSIONS"]:
        pytest.skip(f"{version} is supported now")
    with pytest.raises(backend.UnsupportedTorch, match=re.escape(VERSIONS["supported_text"]())):
        backend.manifest_for(version)


def test_backend_says_when_torch_is_missing(backend: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(backend.importlib.metadata, "version", missing)
    with pytest.raises(backend.UnsupportedTorch, match="--no-build-isolation"):
        backend.installed_torch()


def test_backend_environment_adds_the_manifest_to_maturins_args(
    backend: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MATURIN_PEP517_ARGS", "--profile release")
    env = backend.build_environment("2.13.0+cu130")
    assert env["MATURIN_PEP517_ARGS"] == "--profile release --manifest-path build-torch-2.13/Cargo.toml"
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    assert ("LIBTORCH_BYPASS_VERSION_CHECK" in env) == ("2.13.0" in VERSIONS["BYPASS_VERSION_CHECK"])
    monkeypatch.setenv("MATURIN_PEP517_ARGS", "--manifest-path Cargo.toml")
    assert backend.build_environment("2.13.0")["MATURIN_PEP517_ARGS"] == "--manifest-path Cargo.toml"


def test_backend_hooks_check_torch_before_maturin(backend: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend.importlib.metadata, "version", lambda name: "2.8.0")
    for hook in ("get_requires_for_build_wheel", "prepare_metadata_for_build_wheel", "build_wheel"):
        with pytest.raises(backend.UnsupportedTorch, match="2.8.0"):
            getattr(backend, hook)("unused-directory")


def test_pyproject_uses_the_in_tree_backend() -> None:
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert 'build-backend = "ewc_rs_backend"' in text and 'backend-path = ["build_backend"]' in text


def test_marker_is_read_from_the_extension_file(tmp_path: Path) -> None:
    native = _native()
    fake = tmp_path / "_core.abi3.so"
    fake.write_bytes(b"\x7fELF\x00junk" + b"ewc_rs built for torch 2.13.0;" + b"\x00more")
    assert native.built_for(fake) == "2.13.0"
    fake.write_bytes(b"\x7fELF\x00no marker here")
    assert native.built_for(fake) is None


def test_mismatch_message_names_both_versions_and_the_supported_ones() -> None:
    native = _native()
    assert native.mismatch_message("2.13.0", "2.13.0+cu130") is None
    message = native.mismatch_message("2.13.0", "2.11.0+cu130")
    assert message is not None
    for part in ("2.13.0", "2.11.0+cu130", "torch==2.13.0", VERSIONS["supported_text"]()):
        assert part in message, message


def test_built_extension_carries_the_torch_it_was_built_for() -> None:
    """The compiled module (when built) holds the marker, equal to its TORCH_VERSION and to torch's release."""
    native = _native()
    spec = importlib.util.find_spec("ewc_rs")  # finds the package without running its __init__
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    built = [p for folder in folders for p in Path(folder).glob("_core.*") if p.suffix in (".so", ".pyd")]
    if not built:
        pytest.skip("ewc_rs._core is not built here")
    path = built[0]
    import torch

    import ewc_rs._core as core

    assert native.built_for(path) == core.TORCH_VERSION == VERSIONS["torch_release"](torch.__version__)


def test_wheel_index_lists_the_wheels(tmp_path: Path) -> None:
    script = load_module("wheel_index_under_test", REPO / "scripts" / "wheel_index.py")
    names = ["ewc_rs-0.1.0+torch213-cp39-abi3-linux_x86_64.whl", "ewc_rs-0.1.0+torch29-cp39-abi3-linux_x86_64.whl"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert script.main([str(tmp_path)]) == 0
    page = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert sorted(re.findall(r'href="([^"]+)"', page)) == sorted(names)
    assert script.main([str(tmp_path / "empty")]) == 1


def test_metadata_pins_the_torch_of_the_build(backend: ModuleType) -> None:
    metadata = (
        "Metadata-Version: 2.4\nName: ewc_rs\nVersion: 0.1.0+torch213\n"
        "Requires-Dist: torch>=2.9.0,!=2.12.*,<2.14\nRequires-Dist: numpy\n"
        "Requires-Dist: torchvision==0.26.0 ; extra == 'avalanche'\n"
    )
    pinned = backend.pin_torch(metadata, "2.13.0+cu130")
    assert pinned == metadata.replace("torch>=2.9.0,!=2.12.*,<2.14", "torch==2.13.0")


def test_wheel_metadata_and_record_are_rewritten_together(backend: ModuleType, tmp_path: Path) -> None:
    wheel = tmp_path / "ewc_rs-0.1.0+torch213-cp39-abi3-linux_x86_64.whl"
    info = "ewc_rs-0.1.0+torch213.dist-info"
    metadata = b"Name: ewc_rs\nRequires-Dist: torch>=2.9.0,<2.14\nRequires-Dist: tqdm\n"
    module = b"print('hi')\n"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("ewc_rs/__init__.py", module)
        zf.writestr(f"{info}/METADATA", metadata)
        record = [
            backend._record_line(name, data)
            for name, data in [("ewc_rs/__init__.py", module), (f"{info}/METADATA", metadata)]
        ]
        zf.writestr(f"{info}/RECORD", "\n".join([*record, f"{info}/RECORD,,"]) + "\n")
    backend.pin_torch_in_wheel(wheel, "2.13.0")
    with zipfile.ZipFile(wheel) as zf:
        new_metadata = zf.read(f"{info}/METADATA")
        rows = {row.split(",")[0]: row for row in zf.read(f"{info}/RECORD").decode().splitlines()}
        assert zf.read("ewc_rs/__init__.py") == module
    assert new_metadata == b"Name: ewc_rs\nRequires-Dist: torch==2.13.0\nRequires-Dist: tqdm\n"
    digest = base64.urlsafe_b64encode(hashlib.sha256(new_metadata).digest()).rstrip(b"=").decode()
    assert rows[f"{info}/METADATA"] == f"{info}/METADATA,sha256={digest},{len(new_metadata)}"
    assert rows["ewc_rs/__init__.py"] == record[0]


def _patcher() -> ModuleType:
    return load_module("ewc_rs_patch_torch_sys_under_test", REPO / "scripts" / "patch_torch_sys.py")


def _fake_torch_sys(folder: Path, patcher: ModuleType) -> dict[str, str]:
    """A stand-in torch-sys source holding each patch site once, inside some other text."""
    texts: dict[str, str] = {}
    for name, original, _ in patcher.PATCHES:
        texts[name] = texts.get(name, "// start\n") + f"    {original}\n// between\n"
    for name, text in texts.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
    return texts


def test_patch_replaces_each_site_and_is_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    patcher = _patcher()
    source = tmp_path / "registry" / "torch-sys-0.26.0"
    texts = _fake_torch_sys(source, patcher)
    monkeypatch.setattr(patcher, "registry_source", lambda fetch=True: source)
    target = tmp_path / ".patched" / "torch-sys-0.26.0"
    assert patcher.patched_torch_sys(target) == target
    for name, original, replacement in patcher.PATCHES:
        text = (target / name).read_text(encoding="utf-8")
        assert original not in text and replacement in text, name
        assert (source / name).read_text(encoding="utf-8") == texts[name], "the registry's copy must stay pristine"
    build = (target / "build.rs").read_text(encoding="utf-8")
    assert "c++17" not in build and "-std=c++20" in build
    generated = (target / "libtch" / "torch_api_generated.cpp").read_text(encoding="utf-8")
    assert "torch::cholesky(" not in generated and "torch::qr(" not in generated
    assert 'torch::linalg_qr(*self, (bool)some ? "reduced" : "complete")' in generated
    assert "torch::linalg_cholesky(*self, (bool)upper)" in generated
    before = {name: (target / name).read_text(encoding="utf-8") for name in texts}
    (source / "build.rs").write_text("changed: a second run must not copy again", encoding="utf-8")
    patcher.patched_torch_sys(target)
    assert {name: (target / name).read_text(encoding="utf-8") for name in texts} == before


def test_patch_fails_loudly_when_a_site_is_missing(tmp_path: Path) -> None:
    patcher = _patcher()
    _fake_torch_sys(tmp_path, patcher)
    generated = tmp_path / "libtch" / "torch_api_generated.cpp"
    generated.write_text(generated.read_text(encoding="utf-8").replace("torch::qr(", "torch::other("), encoding="utf-8")
    with pytest.raises(patcher.PatchError, match=re.escape("torch::qr(*self")):
        patcher.apply_patches(tmp_path)


@pytest.mark.parametrize("version", VERSIONS["SUPPORTED_TORCH_VERSIONS"])
def test_only_listed_lines_use_the_patched_torch_sys(version: str) -> None:
    text = (REPO / VERSIONS["build_dir"](version) / "Cargo.toml").read_text(encoding="utf-8")
    patched = version in VERSIONS["PATCHED_TORCH_SYS"]
    assert ('torch-sys = { path = "../.patched/torch-sys-0.26.0" }' in text) == patched, version
    assert "[patch.crates-io]" in text or not patched, version
    if patched:
        assert version in VERSIONS["BYPASS_VERSION_CHECK"], "a patched line borrows tch 0.26 (made for 2.13)"


@pytest.mark.parametrize("version", ["2.13.0", "2.14.0+cu130"])
def test_backend_makes_the_patched_torch_sys_only_for_listed_lines(
    backend: ModuleType, monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    calls: list[str] = []
    real_run_path = backend.runpy.run_path

    def run_path(path: str) -> dict[str, Any]:
        calls.append(Path(path).name)
        return {"patched_torch_sys": lambda: None} if path.endswith("patch_torch_sys.py") else real_run_path(path)

    monkeypatch.setattr(backend.runpy, "run_path", run_path)
    backend.prepare_sources(version)
    expected = ["patch_torch_sys.py"] if version.split("+")[0] in VERSIONS["PATCHED_TORCH_SYS"] else []
    assert calls == expected, version
