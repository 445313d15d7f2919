# The README's two commands are `make demo` (main job) and `make test` (every test).
# Both set everything up first (virtualenv, Python packages, the Rust extension) and are
# idempotent: the second run reuses the venv and cargo's incremental build.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The one place the torch version is written (tch's libtorch must match it).
TORCH_VERSION_FILE := python/ewc_rs/_torch_version.py
TORCH_VERSION := $(shell sed -n 's/^TORCH_VERSION = "\(.*\)"/\1/p' $(TORCH_VERSION_FILE))
ifeq ($(TORCH_VERSION),)
$(error no 'TORCH_VERSION = "x.y.z"' line in $(TORCH_VERSION_FILE))
endif
DEPS_STAMP := $(VENV)/.deps-$(shell cat requirements-dev.txt $(TORCH_VERSION_FILE) | md5sum | cut -c1-12)
# pip constraint pinning torch, written from TORCH_VERSION_FILE: no requirement (torchvision, lightning,
# avalanche-lib, ...) can make pip upgrade or replace torch; it fails instead.
TORCH_CONSTRAINT := $(VENV)/torch-constraint.txt
OUT ?= demo_out
# The demos and tests read their data from EWC_RS_DATA (docs: How-to, "Run the demos"). The library never looks
# next to a checkout; this Makefile does: ../shared/data, when it exists and the variable is unset.
ifneq ($(wildcard ../shared/data),)
export EWC_RS_DATA ?= $(abspath ../shared/data)
endif
# The PATH this make was started with (before .venv/bin goes first): `make gpu-check` runs the
# system python3 of the GPU machine, never a venv's.
HOST_PATH := $(PATH)
# tch links libtorch from the installed torch package; tests need its lib/ on the loader path.
export LIBTORCH_USE_PYTORCH := 1
# torch-sys's build script asks `python` for torch's location: make it the venv's.
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)
TORCH_LIB = $(shell $(PY) -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")

# Other torch lines (docs: Reference, "Torch versions", generated from _torch_version.py): one manifest each, build-torch-X.Y/Cargo.toml, for the
# same src/. `make test-core TORCH=2.13` makes a venv with that torch and the core test needs, builds
# ewc_rs there with the README's `pip install --no-build-isolation .` (the in-tree backend picks the
# line's manifest) and runs CORE_TESTS; `make wheels` builds one wheel per supported line into dist/.
SUPPORTED := $(shell $(PYTHON) -c "import runpy; print(*runpy.run_path('$(TORCH_VERSION_FILE)')['SUPPORTED_TORCH_VERSIONS'])")
DEFAULT_LINE := $(basename $(TORCH_VERSION))
TORCH ?= 2.13
LINE_VERSION = $(filter $(TORCH).%,$(SUPPORTED))
# The venv and cargo target dir of another line live outside the clone, in EWC_RS_CACHE, so that CI
# on the same machine reuses them (torch download, compiled torch-sys; a fresh machine makes them).
# Both stay together: torch-sys's cached build links the libtorch of the venv it was built in.
# The default line builds its wheel in .venv.
EWC_RS_CACHE ?= $(HOME)/.cache/ewc_rs
LINE_VENV = $(if $(filter $(TORCH),$(DEFAULT_LINE)),$(VENV),$(EWC_RS_CACHE)/venv-torch$(LINE_VERSION))
LINE_PY = $(LINE_VENV)/bin/python
LINE_STAMP = $(LINE_VENV)/.deps-$(LINE_VERSION)-$(shell cat requirements-core.txt | md5sum | cut -c1-12)
LINE_ENV = env VIRTUAL_ENV=$(abspath $(LINE_VENV)) PATH=$(abspath $(LINE_VENV))/bin:$$PATH \
	CARGO_TARGET_DIR=$(EWC_RS_CACHE)/target-torch$(LINE_VERSION)
# The core tests: those marked `core` (they need no transformers, lightning, peft, avalanche, notebooks
# or demo data). `make test-core` runs them on another torch line; `make test` runs every test on the default line.
CORE_TESTS := -m core tests

.PHONY: gpu-prep gpu-baseline-wheels gpu-check
.PHONY: setup build demo test test-rust test-python test-docs docs tutorials lint bench wheel clean check-line setup-line build-line test-core wheel-line wheels patch-line

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): requirements-dev.txt $(TORCH_VERSION_FILE) | $(PY)
	$(PY) -m pip install -q --upgrade pip
	echo "torch==$(TORCH_VERSION)" > $(TORCH_CONSTRAINT)
	$(PY) -m pip install -q torch==$(TORCH_VERSION) -c $(TORCH_CONSTRAINT) -r requirements-dev.txt
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	rm -f $(VENV)/.deps-* && touch $@

setup: $(DEPS_STAMP)

build: setup
	maturin develop --release -q

demo: build
	$(PY) -m ewc_rs.demo seed --out $(OUT)
	$(PY) -m ewc_rs.demo permuted --out $(OUT)

lint: setup
	cargo fmt --check
	cargo clippy --release --all-targets -q -- -D warnings
	$(PY) -m ruff check python tests benchmarks build_backend scripts conftest.py
	$(PY) -m ruff format --check python tests benchmarks build_backend scripts conftest.py
	$(PY) -m mypy python/ewc_rs build_backend scripts
	PYTHONPATH=python $(VENV)/bin/lint-imports --no-cache --no-logo
	$(PY) -m mypy.stubtest ewc_rs._core --allowlist .ci/stubtest-allowlist.txt

test-rust: build
	LD_LIBRARY_PATH=$(TORCH_LIB):$$LD_LIBRARY_PATH cargo test --release -q

test-python: build
	$(PY) -m pytest -q -p no:cacheprovider tests

# The Python code blocks of the README, the docs and the public docstrings (conftest.py, Sybil).
test-docs: build
	$(PY) -m pytest -q -p no:cacheprovider README.md docs python/ewc_rs

# The documentation site into site/ (mkdocs.yml), warnings as errors (broken links, missing references).
docs: build
	NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true $(VENV)/bin/mkdocs build --strict -q

# The tutorial pages: each notebook executed in full into docs/tutorials/ (a few minutes; the MNIST
# notebooks need the demo data). Run after changing a notebook (tests/project/test_docs_pages.py says so).
tutorials: build
	$(PY) scripts/run_tutorials.py

test: build lint test-rust test-python test-docs docs

bench: build
	$(PY) -m pip install -q torch==$(TORCH_VERSION) -c $(TORCH_CONSTRAINT) -r requirements-bench.txt
	$(PY) benchmarks/bench_fisher.py
	$(PY) benchmarks/bench_penalty.py
	$(PY) benchmarks/bench_recurrent.py --threads 1

# A wheel that does not bundle libtorch (it loads torch's own at import).
wheel: setup
	maturin build --release --auditwheel skip -o dist

check-line:
	@test -n "$(LINE_VERSION)" || { echo "TORCH=$(TORCH) is not a supported torch line; supported: $(SUPPORTED)"; exit 1; }

ifeq ($(TORCH),$(DEFAULT_LINE))
# The default line is .venv's: `make setup`, and `make build` (maturin develop) for the tests.
setup-line: check-line setup
build-line: check-line build
else
# The venv of another torch line: that torch (pinned by a constraint) and requirements-core.txt. A new
# venv drops the line's old target dir, whose torch-sys would link the libtorch of a venv now gone.
setup-line: check-line
	@if [ ! -f $(LINE_STAMP) ]; then \
		set -e; test -x $(LINE_PY) || { rm -rf $(EWC_RS_CACHE)/target-torch$(LINE_VERSION); $(PYTHON) -m venv $(LINE_VENV); }; \
		$(LINE_PY) -m pip install -q --upgrade pip; \
		echo "torch==$(LINE_VERSION)" > $(LINE_VENV)/torch-constraint.txt; \
		$(LINE_PY) -m pip install -q torch==$(LINE_VERSION) -c $(LINE_VENV)/torch-constraint.txt -r requirements-core.txt; \
		rm -f $(LINE_VENV)/.deps-*; touch $(LINE_STAMP); \
	fi

# The README's install command, run in the line's venv (cargo's incremental build makes reruns quick).
build-line: setup-line patch-line
	$(LINE_ENV) $(LINE_PY) -m pip install -q --no-build-isolation --no-deps --force-reinstall .
endif

# The lines PATCHED_TORCH_SYS lists build with a patched torch-sys (.patched/, git-ignored); the build
# backend makes it too, this makes it visible (and its errors) before pip starts.
PATCHED := $(shell $(PYTHON) -c "import runpy; print(*runpy.run_path('$(TORCH_VERSION_FILE)')['PATCHED_TORCH_SYS'])")
patch-line:
	$(if $(filter $(LINE_VERSION),$(PATCHED)),$(PYTHON) scripts/patch_torch_sys.py,@true)

test-core: build-line
	$(LINE_ENV) $(LINE_PY) -c "import ewc_rs, torch; print('ewc_rs', ewc_rs.__version__, 'with torch', torch.__version__)"
	$(LINE_ENV) $(LINE_PY) -m pytest -q -p no:cacheprovider $(CORE_TESTS)

wheel-line: setup-line patch-line
	$(LINE_ENV) $(LINE_PY) -m pip wheel -q --no-build-isolation --no-deps -w dist .

# One abi3 wheel per supported torch line (local version +torchXY), and dist/index.html listing them
# (a find-links page: pip install ewc_rs==0.1.0+torch213 -f dist/index.html).
wheels:
	rm -f dist/ewc_rs-*.whl
	for v in $(SUPPORTED); do $(MAKE) --no-print-directory wheel-line TORCH=$${v%.*} || exit 1; done
	$(PYTHON) scripts/wheel_index.py dist

# The GPU machine (CPython 3.12, torch 2.11.0+cu130, no Rust, no network; see scripts/gpu_check.sh).
# Here: `make gpu-prep` puts the ewc_rs wheel for CPython 3.12 (abi3; built by GPU_WHEEL) and the benchmarks' baseline
# wheels that machine lacks into .whl/ (git-ignored; carry it). There: `make gpu-check`.
GPU_WHEEL ?= ../shared/tools/gpu-wheel
# bench_fisher.py's BackPACK and its one requirement the GPU machine lacks (einops, torchvision, numpy
# and packaging are there); the versions of .venv's requirements-bench.txt install.
GPU_BASELINE_WHEELS := backpack-for-pytorch==1.7.1 unfoldNd==0.2.3
GPU_PLATFORMS := --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64

gpu-baseline-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -d .whl $(GPU_BASELINE_WHEELS)

# Its own cargo target dir: torch-sys built against the cp312 venv's torch would otherwise replace
# (and then rebuild) the one target/ holds for .venv.
gpu-prep: gpu-baseline-wheels
	rm -f .whl/ewc_rs-*.whl
	CARGO_TARGET_DIR=$(EWC_RS_CACHE)/target-gpu-wheel $(GPU_WHEEL) .whl
	ls -la .whl

# The system python3, whatever venv this Makefile exports for the other targets.
gpu-check:
	env -u VIRTUAL_ENV PATH="$(HOST_PATH)" PYTHON=python3 bash scripts/gpu_check.sh

clean:
	cargo clean
	rm -rf $(VENV) dist $(OUT)  # EWC_RS_CACHE (other torch lines) is left alone
