#!/usr/bin/env bash
# GPU check (DESIGN §5, issue 17): on a machine with an NVIDIA GPU and torch,
# and no network, within one short lease:
#   1. the extension: a prebuilt one (PREBUILT=dir) if it loads, else built
#      here for this GPU's architecture only;
#   2. correctness, in parallel: the CUDA tests and the whole suite on the GPU
#      (CUDA graphs, torch.compile, bitwise determinism and the fuzz suite's
#      CUDA cases included), and compute-sanitizer memcheck, racecheck,
#      synccheck and initcheck on one small case each;
#   3. the benchmark, alone on the GPU (BENCH_ARGS, then BENCH2_ARGS if set).
# Every step has a time limit; logs and results go to OUTDIR as they come;
# the exit status is non-zero when a step failed.
#
#   scripts/gpu_check.sh OUTDIR
#
# Environment:
#   PYTHON          interpreter with torch (default python3)
#   PREBUILT        folder with a prebuilt discloss/_C*.so and its _build_info.py
#   SKIP            comma-separated steps to skip: build,tests,sanitizer,bench
#   TEST_JOBS       pytest-xdist workers for the suite (default 12 where xdist is installed)
#   TEST_CASE_TIMEOUT  seconds one test may take (default 100, where pytest-timeout is installed)
#   TEST_TIMEOUT    seconds for the tests (default 240), SANITIZER_TIMEOUT per tool (default 200)
#   PYTEST_ARGS     extra arguments for pytest (e.g. "-x")
#   BENCH_ARGS      arguments for benchmarks/bench.py (default: the headline case,
#                   2d_k64 float32 + bfloat16, discloss vs eager and compiled reference)
#   BENCH2_ARGS     a second benchmark run after the first (default: none)
#   BENCH_TIMEOUT   seconds for each benchmark run (default 240)
#   BENCH_CACHE     the benchmark's cache (label maps, raw output; default OUTDIR/bench_raw,
#                   its label maps deleted at the end): pre-generated label maps save time
#   MAX_JOBS        parallel compile jobs (default: number of CPUs)
set -u -o pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
OUT=$1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SKIP=",${SKIP:-},"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
FAILED=0
T0=$(date +%s)

say() { echo "[gpu_check +$(($(date +%s) - T0))s] $*"; }
record() {  # record STEP STATUS [DETAIL]
  printf '%-12s %-5s %s\n' "$1" "$2" "${3:-}" | tee -a "$SUMMARY"
  if [ "$2" = FAIL ]; then FAILED=1; fi
}
skipped() { case "$SKIP" in *",$1,"*) record "$1" SKIP "SKIP=$SKIP"; return 0 ;; esac; return 1; }

# ---- environment ------------------------------------------------------------------
say "environment -> $OUT/env.txt"
if ! command -v nvcc >/dev/null 2>&1; then
  for d in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-*; do
    if [ -n "$d" ] && [ -x "$d/bin/nvcc" ]; then export PATH="$d/bin:$PATH"; break; fi
  done
fi
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(hostname), $(nproc) CPUs"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l) changed files"
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi 2>&1; else echo "nvidia-smi: not available"; fi
  echo "nvcc: $(command -v nvcc || echo 'not found')"
  nvcc --version 2>&1 | tail -2 || true
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" 2>&1
} >"$OUT/env.txt"
cat "$OUT/env.txt"

ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))" 2>/dev/null ||
  nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
if [ -z "$ARCH" ]; then
  record env FAIL "no CUDA device visible to torch or nvidia-smi"
  exit 1
fi
record env ok "GPU compute capability $ARCH"

# ---- 1. the extension: prebuilt, else built for this GPU's architecture only -------------
has_cuda_kernel() {
  "$PY" -c "import torch, discloss; assert torch._C._dispatch_has_kernel_for_dispatch_key('discloss::forward', 'CUDA'), 'no CUDA kernel'" \
    >"$OUT/import.log" 2>&1
}
loaded=0
if [ -n "${PREBUILT:-}" ]; then
  cp "$PREBUILT"/_C*.so "$PREBUILT"/_build_info.py discloss/ 2>"$OUT/import.log"
  if has_cuda_kernel; then
    loaded=1
    record prebuilt ok "$(cd "$PREBUILT" && ls _C*.so) loads, discloss::forward has a CUDA kernel"
  else
    tail -5 "$OUT/import.log"
    record prebuilt FAIL "the prebuilt extension does not load here (import.log); building"
    rm -f discloss/_C*.so discloss/_build_info.py
  fi
fi
if [ "$loaded" = 0 ] && ! skipped build; then
  say "building for TORCH_CUDA_ARCH_LIST=$ARCH -> $OUT/build.log"
  rm -f discloss/_C*.so
  if TORCH_CUDA_ARCH_LIST="$ARCH" FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    timeout -k 10 "${BUILD_TIMEOUT:-420}" "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
    # Warnings in our own sources (not in torch's headers).
    grep -E "csrc/.*(warning|Warning)" "$OUT/build.log" >"$OUT/build_warnings.txt" || true
    record build ok "$(wc -l <"$OUT/build_warnings.txt") warning lines from csrc (build_warnings.txt)"
  else
    tail -40 "$OUT/build.log"
    record build FAIL "see build.log"
  fi
  if has_cuda_kernel; then
    record import ok "discloss::forward has a CUDA kernel"
  else
    cat "$OUT/import.log"
    record import FAIL "the extension has no CUDA kernel (see import.log)"
    exit 1
  fi
fi

# ---- 2. correctness: tests and sanitizers side by side ----------------------------------------
# Fails when every test of a JUnit file was skipped (a CUDA test that cannot
# run must not count as passed on a GPU machine).
junit_counts() {
  if [ ! -f "$1" ]; then
    echo "no JUnit report (pytest was stopped before it wrote one; see the log)"
    return 1
  fi
  "$PY" - "$1" <<'EOF'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
get = lambda k: sum(int(s.get(k, 0)) for s in suites)
tests, skipped, failed = get("tests"), get("skipped"), get("failures") + get("errors")
print(f"{tests} tests, {failed} failed, {skipped} skipped")
sys.exit(1 if tests == 0 or skipped == tests else 0)
EOF
}

run_tests() {
  local jobs="" per_test=""
  if "$PY" -c "import xdist" >/dev/null 2>&1; then jobs="-n ${TEST_JOBS:-12}"; fi
  # A hanging test fails alone (with its stack) instead of stopping the run's report.
  if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then per_test="--timeout ${TEST_CASE_TIMEOUT:-100} --timeout-method thread"; fi
  # test_cudasim.py tests the simulator (not needed where a GPU runs the CUDA
  # tests); test_install.py installs from an sdist (pip, no network here).
  say "pytest tests $jobs (CUDA on the GPU through helpers.DEVICES) -> $OUT/tests.log"
  # -v: each result on its own line as it comes (the log says which tests ran
  # even when the time limit stops the run); two threads per worker.
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} timeout -k 10 "${TEST_TIMEOUT:-240}" \
    "$PY" -m pytest tests $jobs $per_test -v -p no:cacheprovider -rfEs --durations=20 \
    --ignore=tests/test_cudasim.py --ignore=tests/test_install.py \
    --junitxml="$OUT/tests.xml" ${PYTEST_ARGS:-} >"$OUT/tests.log" 2>&1
  local status=$?
  local counts
  counts=$(junit_counts "$OUT/tests.xml" 2>&1)
  local all_skipped=$?
  if [ "$status" -eq 0 ] && [ "$all_skipped" -eq 0 ]; then
    record tests ok "$counts"
  else
    local why=""
    if [ "$status" -eq 124 ]; then why=" (timed out)"; fi
    record tests FAIL "pytest exit $status$why; $counts"
  fi
}

find_sanitizer() {
  local c
  c=$(command -v compute-sanitizer || true)
  if [ -n "$c" ]; then echo "$c"; return; fi
  for c in "$(dirname "$(command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)")/compute-sanitizer" \
    /usr/local/cuda/compute-sanitizer/compute-sanitizer /usr/local/cuda/bin/compute-sanitizer; do
    if [ -x "$c" ]; then echo "$c"; return; fi
  done
}

run_sanitizer() {  # run_sanitizer TOOL [DTYPE ...]
  local tool=$1
  shift
  local extra=""
  if [ "$tool" = memcheck ]; then extra="--leak-check no"; fi
  if [ "$tool" = racecheck ]; then extra="--racecheck-report analysis"; fi
  say "compute-sanitizer --tool $tool ($*) -> $OUT/sanitizer_$tool.log"
  # No caching allocator: every tensor is its own allocation, so an
  # out-of-bounds access cannot land in a neighbouring tensor unnoticed.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 10 "${SANITIZER_TIMEOUT:-200}" "$SAN" --tool "$tool" $extra \
    --error-exitcode 99 "$PY" scripts/gpu_sanitizer_case.py "$@" >"$OUT/sanitizer_$tool.log" 2>&1
  local status=$?
  if [ "$status" -eq 0 ]; then
    record "$tool" ok "$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer_$tool.log" | tail -1)"
  else
    tail -30 "$OUT/sanitizer_$tool.log"
    record "$tool" FAIL "exit $status (99: errors found, 124: timed out); see sanitizer_$tool.log"
  fi
}

pids=()
if ! skipped tests; then
  if ! "$PY" -c "import pytest" >/dev/null 2>&1; then
    record tests FAIL "pytest is not installed for $PY (and there is no network to install it)"
  else
    run_tests &
    pids+=($!)
  fi
fi
if ! skipped sanitizer; then
  SAN=$(find_sanitizer)
  if [ -z "$SAN" ]; then
    record sanitizer FAIL "compute-sanitizer not found"
  else
    # memcheck over every dtype; the slower tools over float32.
    run_sanitizer memcheck float32 float16 float64 &
    pids+=($!)
    for tool in racecheck synccheck initcheck; do
      run_sanitizer "$tool" float32 &
      pids+=($!)
    done
  fi
fi
for p in "${pids[@]}"; do wait "$p"; done
if grep -q FAIL "$SUMMARY"; then FAILED=1; fi
if [ -f "$OUT/tests.log" ]; then tail -40 "$OUT/tests.log"; fi

# ---- 3. benchmark, alone on the GPU ------------------------------------------------------------
if ! skipped bench; then
  n=1
  for args in "${BENCH_ARGS:---config 2d_k64 --dtype float32,bfloat16 --impl discloss,ref_eager,ref_compiled --no-scaling --max-minutes 2.5}" \
    "${BENCH2_ARGS:-}"; do
    [ -n "$args" ] || continue
    say "python benchmarks/bench.py --device cuda --out $OUT/bench$n $args -> $OUT/bench$n.log"
    if timeout -k 10 "${BENCH_TIMEOUT:-240}" "$PY" benchmarks/bench.py --device cuda --no-plots --out "$OUT/bench$n" --cache "${BENCH_CACHE:-$OUT/bench_raw}" $args \
      >"$OUT/bench$n.log" 2>&1; then
      record "bench$n" ok "results in bench$n/"
    else
      tail -20 "$OUT/bench$n.log"
      record "bench$n" FAIL "see bench$n.log"
    fi
    n=$((n + 1))
  done
  rm -rf "$OUT/bench_raw/labels"
fi

say "summary ($SUMMARY):"
cat "$SUMMARY"
for f in "$OUT"/bench*/results.md; do [ -f "$f" ] && sed -n '/^|/p' "$f" | head -30; done
exit $FAILED
