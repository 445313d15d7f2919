#!/usr/bin/env bash
# Tries ewc_rs with a torch release that has no tch of its own (item 2 of issue #13): builds it with
# the newest tch line's manifest (build-torch-2.13, tch 0.26) and torch-sys's version check bypassed
# (LIBTORCH_BYPASS_VERSION_CHECK), then runs the core tests. Reproduces how the 2.12 line was admitted
# (and 2.14 and 2.15, before the patched torch-sys of their own lines); docs: Reference, "Torch versions".
#
#   scripts/try_torch_line.sh 2.14.0 [FROM_LINE]     # FROM_LINE: the build-torch-X.Y line to borrow, default 2.13
#
# Uses a venv and a cargo target dir under $EWC_RS_CACHE (default ~/.cache/ewc_rs), writes a scratch
# manifest to .try-torch-X.Y/ (git-ignored) and logs each step to $EWC_RS_CACHE/try-torchX.Y.Z.log.
# Exit status: 0 when the build and the core tests pass, 1 when either fails, 2 on bad arguments.
set -uo pipefail
cd "$(dirname "$0")/.."
version="${1:-}"
from="${2:-2.13}"
if ! [[ "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || [ ! -f "build-torch-$from/Cargo.toml" ]; then
    echo "usage: $0 X.Y.Z [FROM_LINE]  (FROM_LINE: one of $(ls -d build-torch-* | sed 's/build-torch-//' | tr '\n' ' '))" >&2
    exit 2
fi
line="${version%.*}"
cache="${EWC_RS_CACHE:-$HOME/.cache/ewc_rs}"
venv="$cache/venv-torch$version"
try=".try-torch-$line"
log="$cache/try-torch$version.log"
mkdir -p "$cache" "$try"
: > "$log"
step() { echo "== $*" | tee -a "$log"; "$@" >> "$log" 2>&1; local rc=$?; echo "   exit $rc" | tee -a "$log"; return $rc; }
built=

if [ ! -x "$venv/bin/python" ]; then
    step python3 -m venv "$venv" || exit 1
fi
step "$venv/bin/python" -m pip install -q "torch==$version" -r requirements-core.txt || exit 1
tag="torch${line//./}"
sed -e "s/^version = \"\([0-9.]*\)+torch[0-9]*\"/version = \"\1+$tag\"/" "build-torch-$from/Cargo.toml" > "$try/Cargo.toml"
cp "build-torch-$from/Cargo.lock" "$try/Cargo.lock"
if grep -q '\.patched/' "$try/Cargo.toml"; then
    # a line built with the patched torch-sys (PATCHED_TORCH_SYS in _torch_version.py): make it first
    step python3 scripts/patch_torch_sys.py || exit 1
fi
echo "== torch $version with $(grep -o 'tch = { version = "=[0-9.]*"' "$try/Cargo.toml") (from build-torch-$from)" | tee -a "$log"

export VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH" CARGO_TARGET_DIR="$cache/target-try-torch$line"
export LIBTORCH_USE_PYTORCH=1 LIBTORCH_BYPASS_VERSION_CHECK=1
export MATURIN_PEP517_ARGS="--manifest-path $try/Cargo.toml"
build() { step python -m pip install -q --no-build-isolation --no-deps --force-reinstall .; }
if ! build; then
    # torch >= 2.14's headers require C++20 while torch-sys compiles its wrapper with -std=c++17;
    # cc-rs puts CXXFLAGS after its own flags, so a later -std=c++20 wins: try once more with it.
    if grep -q "C++20 or later compatible compiler is required" "$log" && [ -z "${CXXFLAGS:-}" ]; then
        echo "== torch $version's headers need C++20: building again with CXXFLAGS=-std=c++20" | tee -a "$log"
        export CXXFLAGS=-std=c++20
        build && built=1
    fi
    if [ -z "${built:-}" ]; then
        echo "build failed; the compiler's errors:" | tee -a "$log"
        grep -E "^ *cargo:warning=.*error:|^error" "$log" | sed 's/^ *cargo:warning=//' | sort -u | head -20 | cut -c1-300
        exit 1
    fi
fi
core_tests=$(sed -n '/^CORE_TESTS :=/,/[^\\]$/p' Makefile | sed 's/^CORE_TESTS :=//; s/\\//g' | tr -s ' \n' ' ')
step python -c "import ewc_rs, torch; print('ewc_rs', ewc_rs.__version__, 'with torch', torch.__version__)" || {
    tail -5 "$log"; exit 1; }
# shellcheck disable=SC2086
if step python -m pytest -q -p no:cacheprovider $core_tests; then
    tail -1 "$log"
    exit 0
fi
grep -E "^(FAILED|ERROR)|passed|failed" "$log" | tail -30
exit 1
