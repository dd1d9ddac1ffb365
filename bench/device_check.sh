#!/usr/bin/env bash
# One script for a GPU machine: build, GPU tests, AOT-vs-JIT registers, kernel and end-to-end benchmarks, a
# torch.profiler trace, and OUT/summary.md (every step's status, the measured ratios next to the cost model's floor).
#
#   bash bench/device_check.sh OUT              # on a GPU machine (at most 470 s of steps: under 8 minutes)
#   bash bench/device_check.sh --dry-run OUT    # on a CPU: the same steps on tiny shapes with the Triton
#                                               # interpreter; checks the plumbing, measures nothing
#
# Every step runs under its own time limit (TIMEOUT_* below; their sum stays <= 470 s, so the whole check and a
# rerun fit in a device session and one run fits the 600 s a device command may take). A step that fails or times
# out is recorded in OUT/steps.tsv and the next step runs; benchmarks write their rows as they go, so a timeout
# keeps what was measured. A failed C++ build is reported and the Engine uses the pure-PyTorch KV cache.
# Exit status: 0 when every step passed, 1 otherwise, 2 on a usage error (or no GPU without --dry-run).
# OUT holds more files than a device command returns: bring it back as one archive (tar czf).
set -uo pipefail

TIMEOUT_build=70       # pip install -e . (the C++ extension with ninja)
TIMEOUT_extension=25   # import check (builds the extension at first use if the install did not)
TIMEOUT_gpu_tests=90   # pytest -m gpu
TIMEOUT_aot_vs_jit=55  # JIT registers on the device vs aot_compile.py for its arch
TIMEOUT_kernels=50     # bench/bench_kernels.py
TIMEOUT_e2e=145        # bench/bench_e2e.py (d16, d30; B 1/16/64; SSG off/on)
TIMEOUT_profile=25     # ssg-engine bench --profile torch (d16, B=16)
TIMEOUT_summary=10     # bench/device_summary.py -> OUT/summary.md
budget=0
for v in ${!TIMEOUT_@}; do budget=$((budget + ${!v})); done
export DEVICE_CHECK_BUDGET_S=$budget

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ $# -ne 1 ] || [ "${1:0:1}" = "-" ]; then
  echo "usage: bash bench/device_check.sh [--dry-run] OUT" >&2
  exit 2
fi
mkdir -p "$1" && OUT=$(cd "$1" && pwd) || { echo "error: cannot create $1" >&2; exit 2; }
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if [ $DRY = 1 ]; then
  export TRITON_INTERPRET=1  # Triton kernels on the CPU interpreter
  export OMP_NUM_THREADS=1   # tiny shapes: one thread is fastest and steady on a busy machine
else
  export TRITON_INTERPRET=0  # compiled kernels on the GPU (the test modules default to the interpreter otherwise)
  if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA device visible to torch; run with --dry-run on a CPU machine" >&2
    exit 2
  fi
fi
# this script's outputs of an earlier run (the summary must not report a stale file)
rm -rf "$OUT/steps.tsv" "$OUT/summary.md" "$OUT/e2e.json" "$OUT/kernels.json" "$OUT/trace.json" "$OUT/aot" "$OUT"/*.log
status=0
echo "== device check$([ $DRY = 1 ] && echo ' (dry run)') into $OUT: 8 steps, ${budget} s of step limits in all"

# step NAME COMMAND...: run COMMAND under TIMEOUT_NAME, output to the terminal and OUT/NAME.log, status to OUT/steps.tsv
step() {
  local name=$1 limit_var="TIMEOUT_$1" rc start secs result
  shift
  local limit=${!limit_var}
  echo "== $name (limit ${limit} s, $(date +%T))"
  start=$SECONDS
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  secs=$((SECONDS - start))
  case $rc in
    0) result=ok ;;
    124 | 137) result="timeout"; status=1 ;;
    *) result="failed (exit $rc)"; status=1 ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$result" "$secs" "$limit" >> "$OUT/steps.tsv"
  echo "== $name: $result in ${secs} s"
  return "$rc"
}

if [ $DRY = 1 ]; then
  # resolves and prepares the package (setup.py runs) without installing it
  step build python3 -m pip install --dry-run -q --no-build-isolation --no-deps --no-index -e .
else
  step build python3 -m pip install -q --no-build-isolation --no-deps --no-index -e .
fi
step extension python3 -c "
import sys
import ssg_engine.kv_cache as k
if k.extension_available():
    print('C++ extension: available (ssg_engine._C)')
else:
    print('C++ extension: NOT available, the Engine uses the pure-PyTorch KV cache:', k._IMPORT_ERROR)
    sys.exit(1)
" || export SSG_ENGINE_BUILD_EXT=0  # no further build attempts at first use: every later step uses the fallback

if [ $DRY = 1 ]; then
  echo "dry run: no CUDA device, so the GPU tests are collected and skip with their reason"
fi
step gpu_tests python3 -m pytest -q -ra -p no:cacheprovider -m gpu tests/

if [ $DRY = 1 ]; then
  step aot_vs_jit python3 bench/aot_vs_jit.py --dry-run --quick --out-dir "$OUT/aot"
  step kernels python3 bench/bench_kernels.py --smoke --out "$OUT/kernels.json"
  step e2e python3 bench/bench_e2e.py --smoke --batches 2 --repeats 1 --warmup 0 --out "$OUT/e2e.json"
  tiny=tests/golden/var_tiny
  # the profiler's plumbing (CLI, trace file), on the PyTorch reference ops: the interpreter ran in the steps above
  SSG_ENGINE_BACKEND=reference step profile python3 -m ssg_engine.cli bench --var $tiny/var.pth --vae $tiny/vae.pth --config $tiny/config.json \
    --batch-size 1 --device cpu --repeats 1 --profile torch --trace "$OUT/trace.json"
  step summary python3 bench/device_summary.py --dry-run "$OUT"
else
  step aot_vs_jit python3 bench/aot_vs_jit.py --dtypes bfloat16 float32 --out-dir "$OUT/aot"
  step kernels python3 bench/bench_kernels.py --warmup 5 --reps 20 --out "$OUT/kernels.json"
  step e2e python3 bench/bench_e2e.py --repeats 3 --warmup 1 --out "$OUT/e2e.json"
  step profile python3 -m ssg_engine.cli bench --random d16 --dtype bfloat16 --batch-size 16 --device cuda \
    --profile torch --trace "$OUT/trace.json"
  step summary python3 bench/device_summary.py "$OUT"
fi

echo "== done (status $status): $OUT/summary.md, $OUT/steps.tsv"
exit $status
