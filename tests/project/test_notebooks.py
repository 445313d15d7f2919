"""Runs the notebooks top to bottom in their quick setting (``EWC_RS_QUICK=1``) with nbclient.

Skipped when nbclient/nbformat/ipykernel are not installed. The MNIST notebooks (01, 02) also skip
when the data (``$EWC_RS_DATA``, which conftest defaults to ``../shared/data`` next to the
repository) is missing; the language-model notebook (03) needs no data, only ``transformers``,
and skips, saying so, without it. The notebooks are stored with outputs stripped; this test also
checks that.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from real_data import missing_reason, real_data_root

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
DATA = real_data_root()
NEEDS_DATA = {"01_seed_mnist_to_fashion", "02_permuted_mnist"}  # read MNIST / Fashion-MNIST
NEEDS_MODULES = {"03_llm_finetuning": ["transformers"]}  # beyond the test dependencies


def _run_param(path: Path) -> Any:
    """``path`` as a parameter of ``test_notebook_runs``, skipped (with the reason) when what the
    notebook needs is missing: the data for the MNIST notebooks, a module for the others."""
    marks = []
    if path.stem in NEEDS_DATA:
        marks.append(pytest.mark.skipif(DATA is None, reason=missing_reason()))
    for module in NEEDS_MODULES.get(path.stem, []):
        missing = importlib.util.find_spec(module) is None
        marks.append(pytest.mark.skipif(missing, reason=f"{path.name} needs {module}, which is not installed"))
    return pytest.param(path, marks=marks, id=path.stem)


def _kernel_name() -> str:
    """A kernel that runs this interpreter: ``python3`` when its spec starts ``python`` (which
    jupyter_client replaces by ``sys.executable``) or names this interpreter; otherwise a spec
    ``ewc-rs-test`` installed into ``sys.prefix`` (as ``ipykernel install --sys-prefix`` does)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    ksm = KernelSpecManager()
    try:
        spec = ksm.get_kernel_spec("python3")
        exe = spec.argv[0] if spec.argv else ""
        if exe in ("python", "python3", "{python}") or Path(exe).resolve() == Path(sys.executable).resolve():
            return "python3"
    except NoSuchKernel:
        pass
    from ipykernel.kernelspec import install

    install(prefix=sys.prefix, kernel_name="ewc-rs-test", display_name="Python (ewc_rs tests)")
    return "ewc-rs-test"


def test_notebooks_found() -> None:
    assert [p.name for p in NOTEBOOKS] == [
        "01_seed_mnist_to_fashion.ipynb",
        "02_permuted_mnist.ipynb",
        "03_llm_finetuning.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_outputs_stripped(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: outputs not stripped"


@pytest.mark.parametrize("path", [_run_param(p) for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel inherits this process's environment.
    monkeypatch.setenv("EWC_RS_QUICK", "1")
    if DATA is not None:
        monkeypatch.setenv("EWC_RS_DATA", str(DATA))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=_kernel_name(),
        timeout=600,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
    images = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
    ]
    assert images, f"{path.name}: no figure was shown"
