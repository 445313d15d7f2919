#!/usr/bin/env bash
# The GPU check (`make gpu-check`): on the lent GPU machine (CPython 3.12, torch 2.11.0+cu130, no Rust,
# no network), in the repository's root, with the prebuilt wheels in .whl/ (`make gpu-prep` here, and
# `.whl` carried along):
#   1. env.txt: GPU (nvidia-smi), Python, torch, the ewc_rs that imports and where from;
#   2. installs .whl/*.whl (the ewc_rs wheel built with CPython 3.12 — abi3, so named cp39-abi3 — and BackPACK's wheels) into /tmp/ewc_site, first on
#      PYTHONPATH, so that the wheel, not the checkout's python/ folder, is what the steps import;
#   3. tests.log: tests/cuda/test_cuda.py, then the CUDA cases (-k cuda) of tests/fisher/test_fisher.py and tests/facade/test_ewc.py;
#   4. bench_penalty.log: benchmarks/bench_penalty.py --device cuda, float32 then bfloat16;
#   5. bench_fisher.log: benchmarks/bench_fisher.py --device cuda;
#   6. summary.txt: each step's exit status and seconds; results/*.json: the benchmarks' result files.
# Every step runs under its own `timeout` (100 + 100 + 100 + 100 + 110 s: worst case with the install
# ≈ 8.5 min, so give the device call timeout_s 570; expected about 4 min), and every step runs even
# when an earlier one failed. At most 8 files come back from $OUT; this writes 8.
#
#   OUT=/some/dir bash scripts/gpu_check.sh         (OUT defaults to ./gpu_check_out)
#
# Settings (environment): PYTHON (default python3); EWC_RS_GPU_CHECK_NO_INSTALL=1 skips step 2 and
# uses whatever `ewc_rs` imports (a dry run elsewhere: PYTHONPATH=$PWD/python PYTHON=.venv/bin/python);
# GPU_CHECK_ALLOW_CPU=1: without a GPU, exit 0 after the tests (which then skip) instead of 3, and with
# GPU_CHECK_CPU_BENCH=1 too, run the benchmark steps on the CPU in tiny settings (their plumbing only);
# GPU_CHECK_T_TESTS, GPU_CHECK_T_PENALTY (each dtype), GPU_CHECK_T_FISHER: the timeouts in seconds.
# Exit status: 0 when every step passed, 1 when one failed, 2 when ewc_rs could not be installed or
# imported, 3 when there is no GPU (and GPU_CHECK_ALLOW_CPU is not 1).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu_check_out}
SITE=/tmp/ewc_site
mkdir -p "$OUT/results"
OUT=$(cd "$OUT" && pwd)
ENV_TXT=$OUT/env.txt
SUMMARY=$OUT/summary.txt
: >"$ENV_TXT"
: >"$SUMMARY"
status=0

note() { echo "gpu-check: $*" | tee -a "$SUMMARY"; }

# run_step NAME LOG SECONDS CMD...: runs CMD unbuffered under `timeout`, output shown and appended to LOG.
run_step() {
    local name=$1 log=$2 limit=$3
    shift 3
    echo "=== $name: $*" | tee -a "$log"
    local start=$SECONDS rc
    PYTHONUNBUFFERED=1 timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    local msg="$name: exit $rc after $((SECONDS - start)) s"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then msg+=" (timed out: limit ${limit} s)"; fi
    echo "$msg" | tee -a "$log" "$SUMMARY"
    [ "$rc" -eq 0 ] || status=1
}

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -srm)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo '(no git metadata in this copy)')"
    echo "--- nvidia-smi"
    if command -v nvidia-smi >/dev/null; then nvidia-smi 2>&1; else echo "(no nvidia-smi here)"; fi
    echo "--- $PYTHON"
    "$PYTHON" -c 'import sys; print(sys.version)' 2>&1
} >>"$ENV_TXT"

if [ "${EWC_RS_GPU_CHECK_NO_INSTALL:-0}" = 1 ]; then
    echo "--- install skipped (EWC_RS_GPU_CHECK_NO_INSTALL=1): ewc_rs as found on PYTHONPATH=${PYTHONPATH:-}" >>"$ENV_TXT"
else
    shopt -s nullglob
    wheels=(.whl/*.whl)
    ours=(.whl/ewc_rs-*.whl)
    shopt -u nullglob
    if [ "${#ours[@]}" -ne 1 ]; then
        note "expected exactly one .whl/ewc_rs-*.whl, found ${#ours[@]}: run \`make gpu-prep\` on the build machine and carry .whl"
        exit 2
    fi
    rm -rf "$SITE"
    echo "--- install: ${wheels[*]}" >>"$ENV_TXT"
    if ! "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "${wheels[@]}" >>"$ENV_TXT" 2>&1; then
        note "pip install of ${wheels[*]} failed (its output: env.txt)"
        exit 2
    fi
    export PYTHONPATH=$SITE
fi

# What the steps will import. Installed: it must be the wheel, never the checkout's python/ folder.
"$PYTHON" - >>"$ENV_TXT" 2>&1 <<'EOF'
import importlib.util
import torch
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "| capability", torch.cuda.get_device_capability(0))
import ewc_rs
print("ewc_rs", ewc_rs.__version__, "from", ewc_rs.__file__)
print("ewc_rs.cuda_kernel:", "present" if importlib.util.find_spec("ewc_rs.cuda_kernel") else "absent")
try:
    from ewc_rs import cuda_kernel
    print("NVRTC folder:", cuda_kernel.nvrtc_dir())
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        print("kernel for this GPU:", cuda_kernel.compile_check(10 * major + minor))
except Exception as e:  # reported, not fatal: the tests say more
    print("kernel compile check failed:", repr(e))
for name in ("backpack", "unfoldNd", "einops", "torchvision", "pytest", "hypothesis"):
    try:
        mod = __import__(name)
        print(name, getattr(mod, "__version__", "?"), "from", mod.__file__)
    except ImportError as e:
        print(name, "not importable:", e)
EOF
imported=$(grep '^ewc_rs .* from ' "$ENV_TXT" | sed 's/.* from //')
if [ -z "$imported" ]; then
    note "ewc_rs does not import (see env.txt)"
    cat "$ENV_TXT"
    exit 2
fi
if [ "${EWC_RS_GPU_CHECK_NO_INSTALL:-0}" != 1 ] && [[ "$imported" != "$SITE"/* ]]; then
    note "ewc_rs imports from $imported, not from the installed wheel in $SITE"
    exit 2
fi
cat "$ENV_TXT"

gpu=0
"$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' && gpu=1

# 3. The CUDA tests (they skip, saying why, without a GPU).
TESTS_LOG=$OUT/tests.log
: >"$TESTS_LOG"
if [ -f tests/cuda/test_cuda.py ]; then
    run_step "tests/cuda/test_cuda.py" "$TESTS_LOG" "${GPU_CHECK_T_TESTS:-100}" \
        "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/cuda/test_cuda.py
else
    note "tests/cuda/test_cuda.py is missing: the CUDA kernel's own tests did not run"
    [ "$gpu" = 0 ] || status=1 # without a GPU they would have skipped anyway
fi
run_step "CUDA cases of test_fisher.py and test_ewc.py" "$TESTS_LOG" "${GPU_CHECK_T_TESTS:-100}" \
    "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/fisher/test_fisher.py tests/facade/test_ewc.py -k cuda

device=cuda
penalty_args=(--repeats 20)
fisher_args=(--samples 5000 --batch 500 --repeats 3)
if [ "$gpu" = 0 ]; then
    note "no GPU here (torch.cuda.is_available() is False): the CUDA tests skipped and the GPU benchmarks did not run"
    if [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]; then
        exit 3
    fi
    if [ "${GPU_CHECK_CPU_BENCH:-0}" != 1 ]; then
        note "GPU_CHECK_ALLOW_CPU=1: exit ${status} (the steps that ran)"
        exit "$status"
    fi
    # A dry run of the benchmark steps' plumbing (logs, result files) on the CPU, tiny settings.
    note "GPU_CHECK_CPU_BENCH=1: the benchmark steps run on the CPU, seed_mlp only (a dry run, not figures)"
    device=cpu
    penalty_args=(--models seed_mlp --repeats 3)
    fisher_args=(--models seed_mlp --samples 200 --batch 100 --repeats 1)
fi

# 4, 5. The GPU benchmarks; their JSON files go to $OUT/results.
export EWC_RS_BENCH_RESULTS=$OUT/results
PENALTY_LOG=$OUT/bench_penalty.log
: >"$PENALTY_LOG"
for dtype in float32 bfloat16; do
    run_step "bench_penalty --dtype $dtype" "$PENALTY_LOG" "${GPU_CHECK_T_PENALTY:-100}" \
        "$PYTHON" benchmarks/bench_penalty.py --device "$device" --dtype "$dtype" "${penalty_args[@]}"
done
FISHER_LOG=$OUT/bench_fisher.log
: >"$FISHER_LOG"
run_step "bench_fisher" "$FISHER_LOG" "${GPU_CHECK_T_FISHER:-110}" \
    "$PYTHON" benchmarks/bench_fisher.py --device "$device" "${fisher_args[@]}"

note "done: exit $status"
cat "$SUMMARY"
exit "$status"
