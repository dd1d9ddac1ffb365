#!/usr/bin/env bash
# The device check: one run on a GPU machine that returns its data in OUT, at most 8 small files, in one command.
#
#   bash bench/device_check.sh [--budget SECONDS] OUT            # on a GPU machine: 480 s of step limits, under 9 minutes
#   bash bench/device_check.sh --dry-run [--budget SECONDS] OUT  # on a CPU: the same steps on tiny shapes with the
#                                                                # Triton interpreter; checks the plumbing, measures nothing
#
# Steps, in order of information per second (TIMEOUT_* below; they sum to 480 s, so one run with its setup fits in
# 9 minutes of wall time and no rerun is assumed; --budget SECONDS scales every limit by SECONDS / 480):
#   setup       pip install -e . without the C++ build (the package importable; seconds)
#   smoke       bench/gpu_smoke.py: one d16 batch through the Engine with graphs, bf16, checked against eager
#   e2e_d16     bench/bench_e2e.py --models d16 (B 1/16/64, SSG off/on, five methods incl. compiled_reference)
#   gpu_tests   pytest -m gpu
#   kernels     bench/bench_kernels.py
#   e2e_d30     bench/bench_e2e.py --models d30 (a batch size out of memory is a skipped row)
#   profile     ssg-engine bench --profile torch (d16, B=16)
#   aot_vs_jit  bench/aot_vs_jit.py against the precompiled AOT rows
#   summary     bench/device_summary.py -> OUT/summary.md
# In the background, from the setup on: the C++ KV-cache extension build (ninja; steps that start before it has
# succeeded run on the PyTorch KV cache, steps.tsv says which) and the precompile of every Triton configuration for
# this GPU's arch (bench/aot_compile.py --jobs, 16 cores; into Triton's cache), which runs beside the smoke step
# within its limit, and the warm-up of bench_e2e.py's compiled_reference arm (its torch.compile graphs and
# max-autotune results, d16 then d30, into Inductor's on-disk caches, stopping itself before the smoke's limit):
# timing starts when all are done.
#
# Every step appends its rows to OUT as it measures (JSON Lines, bench/rows.py), so a step stopped by its limit
# keeps what it wrote; a failed or stopped step is recorded and the next one runs. OUT holds exactly:
#   steps.tsv, summary.md, logs.tar.gz (every log, rewritten after each step), smoke.jsonl, e2e.jsonl,
#   kernels.jsonl, aot.jsonl, trace.json.gz
# The dry run also checks OUT's file count, the step order, and that a killed step keeps its rows (it kills
# e2e_d30 after its first row on purpose).
# Exit status: 0 when every step passed, 1 otherwise, 2 on a usage error (or no GPU without --dry-run).
set -uo pipefail

TIMEOUT_setup=30
TIMEOUT_smoke=60       # the precompile runs beside it, within the same limit
TIMEOUT_e2e_d16=90
TIMEOUT_gpu_tests=75
TIMEOUT_kernels=45
TIMEOUT_e2e_d30=90
TIMEOUT_profile=25
TIMEOUT_aot_vs_jit=55  # the quick set: 9 kernels, about 20 s on 2 CPU cores in the dry run (JIT side only)
TIMEOUT_summary=10
BUILD_LIMIT=240        # the background C++ build (about 100 s of wall time on the device; the steps go on meanwhile)
FULL_BUDGET=480
STEPS="setup smoke e2e_d16 gpu_tests kernels e2e_d30 profile aot_vs_jit summary"
OUT_FILES="steps.tsv summary.md logs.tar.gz smoke.jsonl e2e.jsonl kernels.jsonl aot.jsonl trace.json.gz"

usage() { echo "usage: bash bench/device_check.sh [--dry-run] [--budget SECONDS] OUT" >&2; exit 2; }
DRY=0
budget=$FULL_BUDGET
OUT=""
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --budget)
      [[ ${2:-} =~ ^[0-9]+$ ]] && [ "$2" -ge 60 ] || { echo "error: --budget takes whole seconds >= 60, e.g. --budget 480" >&2; exit 2; }
      budget=$2; shift ;;
    -*) usage ;;
    *) [ -z "$OUT" ] || usage; OUT=$1 ;;
  esac
  shift
done
[ -n "$OUT" ] || usage
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || { echo "error: cannot create $OUT" >&2; exit 2; }
for v in ${!TIMEOUT_@} BUILD_LIMIT; do printf -v "$v" '%d' $(( ${!v} * budget / FULL_BUDGET > 5 ? ${!v} * budget / FULL_BUDGET : 5 )); done
sum=0
for v in ${!TIMEOUT_@}; do sum=$((sum + ${!v})); done
export DEVICE_CHECK_BUDGET_S=$sum
echo "limits (s): $(for name in $STEPS; do v=TIMEOUT_$name; printf '%s=%s ' "$name" "${!v}"; done)build=$BUILD_LIMIT; $sum in all"

cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if [ $DRY = 1 ]; then
  export TRITON_INTERPRET=1  # Triton kernels on the CPU interpreter
  export OMP_NUM_THREADS=1   # tiny shapes: one thread is fastest and steady on a busy machine
  JOBS=2
else
  export TRITON_INTERPRET=0  # compiled kernels on the GPU (the test modules default to the interpreter otherwise)
  if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA device visible to torch; run with --dry-run on a CPU machine" >&2
    exit 2
  fi
  JOBS=16
fi
for f in $OUT_FILES; do rm -f "$OUT/$f"; done  # this script's outputs of an earlier run (no stale file in the summary)
WORK=$(mktemp -d)  # logs and scratch files; only the 8 files above go to OUT
LOGS=$WORK/logs
mkdir -p "$LOGS"
trap 'rm -rf "$WORK"' EXIT
status=0
echo "== device check$([ $DRY = 1 ] && echo ' (dry run)') into $OUT: $sum s of step limits ($(date +%T))"

archive_logs() {  # OUT/logs.tar.gz: every log so far, replaced whole
  tar czf "$WORK/logs.tar.gz" -C "$WORK" logs && mv -f "$WORK/logs.tar.gz" "$OUT/logs.tar.gz"
}

kv_cache() {  # the KV cache the next step's Engine gets: the extension once the background build has made it
  if [ -f "$WORK/build.rc" ] && grep -q "^C++ extension: available" "$LOGS/build.log"; then echo extension; else echo pytorch; fi
}

record() {  # record NAME RESULT SECONDS LIMIT WHERE: one line of OUT/steps.tsv
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$OUT/steps.tsv"
  echo "== $1: $2 in $3 s"
}

result_of() {  # result_of RC: ok / timeout / failed (exit RC)
  case $1 in 0) echo ok ;; 124 | 137) echo timeout ;; *) echo "failed (exit $1)" ;; esac
}

# step NAME COMMAND...: COMMAND under TIMEOUT_NAME, output to the terminal and LOGS/NAME.log, a line in steps.tsv
step() {
  local name=$1 limit_var="TIMEOUT_$1" rc start kv
  shift
  local limit=${!limit_var}
  kv=$(kv_cache)
  echo "== $name (limit ${limit} s, KV cache: $kv, $(date +%T))"
  start=$SECONDS
  SSG_ENGINE_BUILD_EXT=$([ "$kv" = extension ] && echo 1 || echo 0) timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || status=1
  record "$name" "$(result_of "$rc")" $((SECONDS - start)) "$limit" "$kv"
  archive_logs
  return "$rc"
}

# background NAME LIMIT COMMAND...: COMMAND in the background under LIMIT, output to LOGS/NAME.log; when it ends,
# its exit status goes to WORK/NAME.rc and its line to steps.tsv (marked background)
background() {
  local name=$1 limit=$2
  shift 2
  (
    start=$SECONDS
    timeout --kill-after=5 "$limit" "$@" > "$LOGS/$name.log" 2>&1 &
    echo $! > "$WORK/$name.pid"
    wait $!
    rc=$?
    echo $rc > "$WORK/$name.rc"
    [ $rc = 0 ] || echo "$name: $(result_of $rc)" >> "$WORK/background_failed"
    record "$name" "$(result_of $rc)" $((SECONDS - start)) "$limit" background > /dev/null
  ) &
  echo "== $name: in the background (limit $limit s)"
}

# stop_background NAME: end NAME's command if it still runs (its line says how it ended) and wait for it
stop_background() {
  local pid
  pid=$(cat "$WORK/$1.pid" 2>/dev/null) || return 0
  while [ ! -f "$WORK/$1.rc" ]; do kill -TERM "$pid" 2>/dev/null; sleep 0.5; done
}

# killed_step NAME FILE COMMAND...: the dry run's stopped step: COMMAND killed (SIGKILL, as a time limit's
# --kill-after does) once FILE has gained a row; it passes when the kill came before the command's end
killed_step() {
  local name=$1 file=$2 before pid rc start=$SECONDS
  shift 2
  rows_in() { local n; n=$(grep -c '"kind": "row"' "$file" 2>/dev/null); echo "${n:-0}"; }
  before=$(rows_in)
  echo "== $name (dry run: killed after its first row, $(date +%T))"
  "$@" > "$LOGS/$name.log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null && [ "$(rows_in)" -le "$before" ]; do sleep 0.2; done
  kill -KILL "$pid" 2>/dev/null
  wait "$pid"
  rc=$?
  if [ "$rc" = 137 ]; then
    record "$name" "killed after its first row (dry run)" $((SECONDS - start)) "$TIMEOUT_e2e_d30" "$(kv_cache)"
  else
    status=1
    record "$name" "failed: ended (exit $rc) before the kill" $((SECONDS - start)) "$TIMEOUT_e2e_d30" "$(kv_cache)"
  fi
  archive_logs
}

# pip without a PYTHONPATH: a checkout on it would let the repository's kernels/ folder shadow a module of that name
# that a setuptools plugin may import
PIP=(env -u PYTHONPATH python3 -m pip install -q --no-build-isolation --no-deps --no-index)
# the profile step's command, then the trace gzipped into OUT
GZIP_TRACE=(bash -c 'trace=$1 gz=$2; shift 2; "$@" && gzip -c "$trace" > "$gz"' gzip_trace "$WORK/trace.json" "$OUT/trace.json.gz")
if [ $DRY = 1 ]; then
  # resolves and prepares the package (setup.py runs) without installing it
  step setup "${PIP[@]}" --dry-run -e .
  ARCH=90
  # no C++ compile in the dry run: whether an installed build imports (either answer passes)
  BUILD=(env SSG_ENGINE_BUILD_EXT=0 python3 -c "import ssg_engine.kv_cache as k; print('C++ extension: available' if k.extension_available() else f'C++ extension: NOT available ({k._IMPORT_ERROR})')")
  PRECOMPILE=(python3 bench/aot_compile.py --arch $ARCH --quick --jobs $JOBS --out "$WORK/aot")
else
  step setup "${PIP[@]}" -e .
  ARCH=$(python3 -c "import torch; major, minor = torch.cuda.get_device_capability(); print(10 * major + minor)")
  BUILD=(python3 -c "import sys, ssg_engine.kv_cache as k; print('C++ extension: available (built with ninja)' if k.extension_available() else f'C++ extension: NOT available, the Engine uses the PyTorch KV cache ({k._IMPORT_ERROR})'); sys.exit(0 if k.extension_available() else 1)")
  PRECOMPILE=(python3 bench/aot_compile.py --arch "$ARCH" --jobs $JOBS --out "$WORK/aot")
fi
background build "$BUILD_LIMIT" "${BUILD[@]}"
background precompile "$TIMEOUT_smoke" "${PRECOMPILE[@]}"
# the compiled arm's compile, off the e2e steps' limits: a best effort that stops itself in time (nothing on a CPU)
WARM=(python3 bench/bench_e2e.py --warm-compiled $((TIMEOUT_smoke * 2 / 3)) --batches 1,16,64 --models d16,d30)
[ $DRY = 1 ] && WARM+=(--smoke)
background warm_compile "$TIMEOUT_smoke" "${WARM[@]}"

# the GPU tests: only the files that hold some (the device has none of the extras, e.g. diffusers, that other test files
# import), with -P so that the checkout's kernels/ folder cannot shadow HF's `kernels` package (the package is installed)
GPU_TESTS=($(grep -l 'mark\.gpu' tests/test_*.py))
if [ $DRY = 1 ]; then
  SSG_ENGINE_BACKEND=reference step smoke python3 bench/gpu_smoke.py --dry-run --rows "$OUT/smoke.jsonl"
else
  step smoke python3 bench/gpu_smoke.py --rows "$OUT/smoke.jsonl"
fi
while [ ! -f "$WORK/precompile.rc" ] || [ ! -f "$WORK/warm_compile.rc" ]; do sleep 0.5; done  # bounded by the smoke's limit: timing starts now

if [ $DRY = 1 ]; then
  step e2e_d16 python3 bench/bench_e2e.py --smoke --batches 2 --repeats 1 --warmup 0 --rows "$OUT/e2e.jsonl"
  echo "dry run: no CUDA device, so the GPU tests are collected and skip with their reason"
  step gpu_tests python3 -P -m pytest -q -ra -p no:cacheprovider -m gpu "${GPU_TESTS[@]}"
  step kernels python3 bench/bench_kernels.py --smoke --rows "$OUT/kernels.jsonl"
  SSG_ENGINE_BACKEND=reference killed_step e2e_d30 "$OUT/e2e.jsonl" \
    python3 bench/bench_e2e.py --smoke --batches 1,2 --repeats 1 --warmup 0 --rows "$OUT/e2e.jsonl"
  tiny=tests/golden/var_tiny
  # the profiler's plumbing (CLI, trace file), on the PyTorch reference ops: the interpreter ran in the steps above
  PROFILE=(python3 -m ssg_engine.cli bench --var $tiny/var.pth --vae $tiny/vae.pth --config $tiny/config.json
           --batch-size 1 --device cpu --repeats 1 --profile torch --trace "$WORK/trace.json")
  SSG_ENGINE_BACKEND=reference step profile "${GZIP_TRACE[@]}" "${PROFILE[@]}"
  AOT=(python3 bench/aot_vs_jit.py --dry-run --quick --jobs $JOBS --out-dir "$WORK/aot_vs_jit" --rows "$OUT/aot.jsonl")
else
  step e2e_d16 python3 bench/bench_e2e.py --models d16 --batches 1,16,64 --repeats 3 --warmup 1 --rows "$OUT/e2e.jsonl"
  step gpu_tests python3 -P -m pytest -q -ra -p no:cacheprovider -m gpu "${GPU_TESTS[@]}"
  step kernels python3 bench/bench_kernels.py --warmup 5 --reps 20 --rows "$OUT/kernels.jsonl"
  step e2e_d30 python3 bench/bench_e2e.py --models d30 --batches 1,16,64 --repeats 3 --warmup 1 --rows "$OUT/e2e.jsonl"
  PROFILE=(python3 -m ssg_engine.cli bench --random d16 --dtype bfloat16 --batch-size 16 --device cuda --profile torch
           --trace "$WORK/trace.json")
  step profile "${GZIP_TRACE[@]}" "${PROFILE[@]}"
  AOT=(python3 bench/aot_vs_jit.py --dtypes bfloat16 float32 --jobs $JOBS --out-dir "$WORK/aot_vs_jit" --rows "$OUT/aot.jsonl")
fi
if [ "$(find "$OUT/trace.json.gz" -size +15M 2>/dev/null)" ]; then
  echo "profile: trace.json.gz is over 15 MB (a device command returns at most 16 MiB a file): dropped"
  rm -f "$OUT/trace.json.gz"
fi
# the AOT side compiled in the background: its rows, unless the precompile failed (then aot_vs_jit compiles them)
[ "$(cat "$WORK/precompile.rc")" = 0 ] && AOT+=(--aot-dir "$WORK/aot")
step aot_vs_jit "${AOT[@]}"

stop_background build
[ -f "$WORK/background_failed" ] && status=1
step summary python3 bench/device_summary.py $([ $DRY = 1 ] && echo --dry-run) --logs "$LOGS" "$OUT"
archive_logs

if [ $DRY = 1 ]; then  # what a device run must satisfy: 8 files at most, the documented order, a stopped step's rows kept
  count=$(find "$OUT" -mindepth 1 | wc -l)
  order=$(awk -F'\t' '$5 != "background" {printf "%s ", $1}' "$OUT/steps.tsv")
  if [ "$count" -gt 8 ]; then echo "dry run: OUT holds $count files; a device command returns at most 8"; status=1; fi
  if [ "$order" != "$STEPS " ]; then echo "dry run: the steps ran as '$order', not '$STEPS'"; status=1; fi
  python3 - "$OUT/e2e.jsonl" <<'EOF' || status=1
import sys
sys.path.insert(0, "bench")
from rows import read_rows
lines = read_rows(sys.argv[1])
last = max(i for i, r in enumerate(lines) if r["kind"] == "run")
kinds = [r["kind"] for r in lines[last + 1:]]
if "row" not in kinds or "done" in kinds:
    sys.exit(f"dry run: the killed e2e_d30 step left {kinds.count('row')} rows and {'a' if 'done' in kinds else 'no'} done line")
print(f"dry run: OUT holds the files it may return; the killed step kept its {kinds.count('row')} rows")
EOF
fi
echo "== done (status $status): $OUT/summary.md, $OUT/steps.tsv"
exit $status
