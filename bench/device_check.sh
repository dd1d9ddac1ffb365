#!/usr/bin/env bash
# One script for a GPU machine: build, GPU tests, kernel + end-to-end benchmarks; JSON into RESULTS_DIR.
# Usage: bash bench/device_check.sh RESULTS_DIR        (meant to finish in under 8 minutes on an H200)
set -uo pipefail
OUT=${1:?usage: bash bench/device_check.sh RESULTS_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0  # compiled kernels on the GPU (the test modules default to the interpreter otherwise)
status=0
step() { echo "== $1 ($(date +%T))"; }

step "build (C++ extension against this machine's torch)"
python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . > "$OUT/build.log" 2>&1 || { echo "build failed"; tail -30 "$OUT/build.log"; status=1; }
python3 -c "import ssg_engine.kv_cache as k; print('C++ extension built:', k.extension_available())"

step "GPU tests"
timeout 240 python3 -m pytest -q -ra -m gpu tests/ 2>&1 | tee "$OUT/gpu_tests.log" || status=1

step "kernel benchmarks"
timeout 150 python3 bench/bench_kernels.py --out "$OUT/kernels.json" 2>&1 | tail -60 || status=1

step "end-to-end benchmark"
timeout 240 python3 bench/bench_e2e.py --out "$OUT/e2e.json" 2>&1 | tail -80 || status=1

step "done (status $status)"
exit $status
