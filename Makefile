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
# The demos and tests read their data from EWC_RS_DATA (README, "Data"). The library never looks
# next to a checkout; this Makefile does: ../shared/data, when it exists and the variable is unset.
ifneq ($(wildcard ../shared/data),)
export EWC_RS_DATA ?= $(abspath ../shared/data)
endif
# tch links libtorch from the installed torch package; tests need its lib/ on the loader path.
export LIBTORCH_USE_PYTORCH := 1
# torch-sys's build script asks `python` for torch's location: make it the venv's.
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)
TORCH_LIB = $(shell $(PY) -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")

.PHONY: setup build demo test test-rust test-python lint bench wheel clean

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
	$(PY) -m ruff check python tests benchmarks
	$(PY) -m ruff format --check python tests benchmarks
	$(PY) -m mypy python/ewc_rs
	$(PY) -m mypy.stubtest ewc_rs._core --allowlist .ci/stubtest-allowlist.txt

test-rust: build
	LD_LIBRARY_PATH=$(TORCH_LIB):$$LD_LIBRARY_PATH cargo test --release -q

test-python: build
	$(PY) -m pytest -q -p no:cacheprovider tests

test: build lint test-rust test-python

bench: build
	$(PY) -m pip install -q torch==$(TORCH_VERSION) -c $(TORCH_CONSTRAINT) -r requirements-bench.txt
	$(PY) benchmarks/bench_fisher.py
	$(PY) benchmarks/bench_penalty.py

# A wheel that does not bundle libtorch (it loads torch's own at import).
wheel: setup
	maturin build --release --auditwheel skip -o dist

clean:
	cargo clean
	rm -rf $(VENV) dist $(OUT)
