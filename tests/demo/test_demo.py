"""The demo's quick mode (``python -m ewc_rs.demo seed|permuted|merge --quick``), its data errors, and
its run without matplotlib.

The data comes from ``$EWC_RS_DATA`` (conftest defaults it to ``../shared/data`` next to the
repository); tests that need it skip, saying why, when it is missing.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from real_data import missing_reason, real_data_root

DATA = real_data_root()
needs_data = pytest.mark.skipif(DATA is None, reason=missing_reason())

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SEED_ROWS = {"no_ewc", "ewc_batched", "ewc_exact", "ewc_exact_bn_update"}
SEED_METRICS = {"mnist_after_a", "mnist_after_b", "fashion_after_b"}
METHODS = {"none", "l2", "ewc_exact", "ewc_empirical", "ewc_mc", "ewc_batched"}


@pytest.fixture(autouse=True)
def _keep_threads() -> Iterator[None]:
    """The demo sets torch's thread count; give the rest of the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _demo_main(argv: list[str]) -> int:
    from ewc_rs.demo.__main__ import main

    return main(argv)


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def _is_accuracy(v: object) -> bool:
    return isinstance(v, float) and 0.0 <= v <= 1.0


@needs_data
def test_seed_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _demo_main(["seed", "--quick", "--data", str(DATA), "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "seed.json").read_text())
    assert set(payload) == {"seed"}
    assert set(payload["seed"]) == SEED_ROWS
    for row, metrics in payload["seed"].items():
        assert set(metrics) == SEED_METRICS, row
        assert all(_is_accuracy(v) for v in metrics.values()), (row, metrics)
    # Task A is trained once: every row starts task B from the same model.
    assert len({m["mnist_after_a"] for m in payload["seed"].values()}) == 1
    assert _is_png(tmp_path / "seed.png")
    out = capsys.readouterr().out
    assert "| ewc_exact |" in out and "MNIST after B" in out


@needs_data
def test_merge_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _demo_main(["merge", "--quick", "--data", str(DATA), "--out", str(tmp_path)]) == 0
    acc = json.loads((tmp_path / "merge.json").read_text())["accuracy"]
    assert set(acc) == {"base", "fine-tuned on A", "fine-tuned on B", "plain average", "Fisher merge"}
    for row in acc.values():
        assert set(row) == {"task A", "task B", "mean"} and all(_is_accuracy(v) for v in row.values())
        assert row["mean"] == pytest.approx((row["task A"] + row["task B"]) / 2)
    # each fine-tuned model knows its own task best (even in the quick setting)
    assert acc["fine-tuned on A"]["task A"] > acc["fine-tuned on A"]["task B"]
    assert acc["fine-tuned on B"]["task B"] > acc["fine-tuned on B"]["task A"]
    assert _is_png(tmp_path / "merge.png")
    assert "| Fisher merge |" in capsys.readouterr().out


@needs_data
def test_permuted_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _demo_main(["permuted", "--quick", "--data", str(DATA), "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "permuted.json").read_text())
    assert set(payload["permuted"]) == METHODS
    for method, curve in payload["permuted"].items():
        assert isinstance(curve, list) and len(curve) == 3, method  # quick: 3 tasks
        assert all(_is_accuracy(v) for v in curve), (method, curve)
    assert set(payload["matrix"]) == METHODS
    for method, matrix in payload["matrix"].items():
        assert [len(row) for row in matrix] == [1, 2, 3], method
        assert all(_is_accuracy(v) for row in matrix for v in row)
        # The curve is the mean of each row of the matrix.
        for avg, row in zip(payload["permuted"][method], matrix):
            assert avg == pytest.approx(sum(row) / len(row))
    # Before any consolidation every method is plain training from the same start.
    assert len({c[0] for c in payload["permuted"].values()}) == 1
    assert _is_png(tmp_path / "permuted.png")
    assert _is_png(tmp_path / "permuted_matrix.png")
    assert "| ewc_exact |" in capsys.readouterr().out


def test_missing_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-data"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "ewc_rs.demo", "seed", "--quick", "--data", str(missing), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert str(missing) in proc.stderr and "no such directory" in proc.stderr
    assert "t10k-images-idx3-ubyte" in proc.stderr  # says which files are needed
    assert not (tmp_path / "o" / "seed.json").exists()


def test_data_dir_without_the_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    (empty / "mnist").mkdir(parents=True)
    code = _demo_main(["permuted", "--quick", "--data", str(empty), "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "not found there" in err and str(empty / "mnist") in err
    assert "t10k-labels-idx1-ubyte" in err and "torchvision" in err


@needs_data
def test_data_dir_with_torchvision_layout(tmp_path: Path) -> None:
    """``--data`` accepts torchvision's ``<root>/MNIST/raw`` layout."""
    from ewc_rs.demo.train import load_data

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (DATA / "mnist").iterdir():
        (raw / f.name).symlink_to(f)
    split = load_data("mnist", tmp_path)
    assert split.files is not None and split.files.directory == raw
    if split.source == "t10k-split":
        assert split.x_train.shape == (8000, 28, 28) and split.x_test.shape == (2000, 28, 28)


def test_plots_available_without_matplotlib(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ewc_rs.demo.plots import PLOTS_SKIPPED, plots_available

    assert "pip install 'ewc_rs[demo]'" in PLOTS_SKIPPED
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib...` now raises ImportError
    assert plots_available() is False
    assert capsys.readouterr().out == PLOTS_SKIPPED + "\n"


@needs_data
def test_seed_quick_without_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without matplotlib the demo runs, writes its JSON, no PNG, and says once how to get the plots."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert _demo_main(["seed", "--quick", "--data", str(DATA), "--out", str(tmp_path)]) == 0
    assert set(json.loads((tmp_path / "seed.json").read_text())["seed"]) == SEED_ROWS
    assert list(tmp_path.glob("*.png")) == []
    out = capsys.readouterr().out
    assert out.count("pip install 'ewc_rs[demo]'") == 1
    assert "| ewc_exact |" in out and "seed.png" not in out


@needs_data
def test_permuted_methods_option_runs_kfac(tmp_path: Path) -> None:
    argv = ["permuted", "--quick", "--data", str(DATA), "--out", str(tmp_path), "--methods", "none,kfac,kfac_online"]
    assert _demo_main(argv) == 0
    payload = json.loads((tmp_path / "permuted.json").read_text())
    assert list(payload["permuted"]) == ["none", "kfac", "kfac_online"]
    for method, curve in payload["permuted"].items():
        assert len(curve) == 3 and all(_is_accuracy(v) for v in curve), method
    # Kronecker-factored EWC keeps the first tasks better than plain fine-tuning, even in the quick setting.
    assert payload["permuted"]["kfac"][-1] > payload["permuted"]["none"][-1]


def test_permuted_methods_option_refuses_unknown_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--methods: expected names among"):
        _demo_main(["permuted", "--quick", "--out", str(tmp_path), "--methods", "none,kfca"])


@needs_data
def test_fisher_kinds_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The quick setting of ``fisher_kinds`` on MNIST: every variant, the validation grid, the seeds,
    the class-incremental column, the Fisher masses, the table and the figure."""
    from ewc_rs.demo.fisher_kinds import CLASS_IL_VARIANTS, QUICK, VARIANTS

    argv = ["fisher_kinds", "--quick", "--data", str(DATA), "--out", str(tmp_path), "--datasets", "mnist"]
    assert _demo_main(argv) == 0
    payload = json.loads((tmp_path / "fisher_kinds.json").read_text())
    assert payload["seeds"] == 2 and payload["protocol"]["quick"] is True
    ds = payload["datasets"]["mnist"]
    task, cls = ds["task_il"], ds["class_il"]
    assert list(task["results"]) == list(VARIANTS) and list(cls["results"]) == list(CLASS_IL_VARIANTS)
    for variant, r in {**task["results"], **{f"class {k}": v for k, v in cls["results"].items()}}.items():
        assert len(r["accuracy"]) == 2 and all(_is_accuracy(a) for a in r["accuracy"]), variant
        assert r["mean"] == pytest.approx(sum(r["accuracy"]) / 2)
        assert r["se"] == pytest.approx(abs(r["accuracy"][0] - r["accuracy"][1]) / 2)
        assert all(len(p) == 5 for p in r["per_task"])
        assert all(t >= f >= 0 for t, f in zip(r["train_s"], r["fisher_s"])), variant
    assert task["search_start"]["exact"] == QUICK.lam_start
    for variant in VARIANTS[:-1]:
        lams = [float(k) for k in task["validation"][variant]]
        start = task["search_start"][variant]
        # decades around the start (at most QUICK.max_decades of them, no refinement in the quick setting)
        assert start in lams and 3 <= len(lams) <= QUICK.max_decades, (variant, lams)
        assert all(math.isclose(math.log10(lam / start), round(math.log10(lam / start))) for lam in lams)
        scores = task["validation"][variant]
        assert scores[f"{task['chosen_lam'][variant]:g}"] == max(scores.values()), variant
        assert sum(task["results"][variant]["fisher_s"]) > 0
    assert task["chosen_lam"]["none"] is None and task["results"]["none"]["fisher_s"] == [0.0, 0.0]
    mass = ds["fisher_mass"]
    assert set(mass) == set(VARIANTS[:-1]) and all(m > 0 for m in mass.values())
    assert mass["batched"] < mass["empirical"]  # squares of batch means: far smaller
    assert _is_png(tmp_path / "fisher_kinds.png")
    out = capsys.readouterr().out
    assert "| exact_500 |" in out and "van de Ven" in out


def test_fisher_kinds_refuses_bad_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--datasets: expected names among"):
        _demo_main(["fisher_kinds", "--quick", "--out", str(tmp_path), "--datasets", "cifar"])
    with pytest.raises(ValueError, match="--seeds: expected a positive number"):
        _demo_main(["fisher_kinds", "--quick", "--out", str(tmp_path), "--seeds", "0"])
