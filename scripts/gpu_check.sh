#!/usr/bin/env bash
# GPU check (DESIGN §5): on a machine with an NVIDIA GPU, torch and a CUDA
# toolkit, and no network, build discloss for this GPU's architecture only,
# run the CUDA tests and the whole suite, compute-sanitizer (memcheck,
# racecheck, synccheck) on a small case, and the benchmark when
# benchmarks/bench.py exists. Logs and results go to OUTDIR; the exit status
# is non-zero when a step failed.
#
#   scripts/gpu_check.sh OUTDIR
#
# Environment:
#   PYTHON          interpreter with torch (default python3)
#   SKIP            comma-separated steps to skip: build,cuda-tests,suite,sanitizer,bench
#   BENCH_ARGS      extra arguments for benchmarks/bench.py
#   PYTEST_ARGS     extra arguments for pytest (e.g. "-x")
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
PY=${PYTHON:-python3}
SKIP=",${SKIP:-},"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
FAILED=0

say() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }
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
  echo "host: $(hostname)"
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

# ---- build, this GPU's architecture only ------------------------------------------------
if ! skipped build; then
  say "building for TORCH_CUDA_ARCH_LIST=$ARCH -> $OUT/build.log"
  rm -f discloss/_C*.so
  if TORCH_CUDA_ARCH_LIST="$ARCH" FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
    # Warnings in our own sources (not in torch's headers).
    grep -E "csrc/.*(warning|Warning)" "$OUT/build.log" >"$OUT/build_warnings.txt" || true
    record build ok "$(wc -l <"$OUT/build_warnings.txt") warning lines from csrc (build_warnings.txt)"
  else
    tail -40 "$OUT/build.log"
    record build FAIL "see build.log"
  fi
fi
if "$PY" -c "import torch, discloss; assert torch._C._dispatch_has_kernel_for_dispatch_key('discloss::forward', 'CUDA')" \
  >"$OUT/import.log" 2>&1; then
  record import ok "discloss::forward has a CUDA kernel"
else
  cat "$OUT/import.log"
  record import FAIL "the extension has no CUDA kernel (see import.log)"
fi

# Fails when every test of a JUnit file was skipped (a CUDA test that cannot
# run must not count as passed on a GPU machine).
not_all_skipped() {
  "$PY" - "$1" <<'EOF'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
tests = sum(int(s.get("tests", 0)) for s in suites)
skipped = sum(int(s.get("skipped", 0)) for s in suites)
print(f"{tests} tests, {skipped} skipped")
sys.exit(1 if tests == 0 or skipped == tests else 0)
EOF
}

# ---- tests --------------------------------------------------------------------------------
if ! "$PY" -c "import pytest" >/dev/null 2>&1; then
  say "pytest is not installed for $PY (and there is no network to install it): the test steps fail"
fi
if ! skipped cuda-tests; then
  say "pytest tests/test_cuda.py -> $OUT/test_cuda.log"
  "$PY" -m pytest tests/test_cuda.py -v -rs --junitxml="$OUT/test_cuda.xml" ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/test_cuda.log" | tail -30
  status=${PIPESTATUS[0]}
  counts=$(not_all_skipped "$OUT/test_cuda.xml" 2>&1)
  all_skipped=$?
  if [ "$status" -eq 0 ] && [ "$all_skipped" -eq 0 ]; then
    record cuda-tests ok "$counts"
  else
    record cuda-tests FAIL "pytest exit $status; $counts"
  fi
fi

if ! skipped suite; then
  # test_cuda.py already ran above unless that step was skipped.
  ignore=""
  case "$SKIP" in *",cuda-tests,"*) ;; *) ignore="--ignore=tests/test_cuda.py" ;; esac
  say "pytest tests $ignore (the whole suite; CUDA included through helpers.DEVICES) -> $OUT/test_suite.log"
  "$PY" -m pytest tests $ignore -rs --junitxml="$OUT/test_suite.xml" ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/test_suite.log" | tail -15
  status=${PIPESTATUS[0]}
  if [ "$status" -eq 0 ]; then record suite ok "$(tail -1 "$OUT/test_suite.log")"; else record suite FAIL "pytest exit $status"; fi
fi

# ---- compute-sanitizer on a small case ------------------------------------------------------
if ! skipped sanitizer; then
  SAN=$(command -v compute-sanitizer || true)
  if [ -z "$SAN" ]; then
    for c in "$(dirname "$(command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)")/compute-sanitizer" \
      /usr/local/cuda/compute-sanitizer/compute-sanitizer /usr/local/cuda/bin/compute-sanitizer; do
      if [ -x "$c" ]; then SAN=$c; break; fi
    done
  fi
  CASE="$OUT/sanitizer_case.py"
  # Every kernel path on small inputs, forward and backward: shared/direct,
  # shared/partial, global atomics, slot ranges (deterministic), chainer,
  # strided and misaligned inputs, float16/float64, sparse ids (the slot
  # map), the unlabeled push, and, with validation off, more than K distinct
  # ids and labels outside [0, K) for the raw op (the kernels must stay in
  # bounds).
  cat >"$CASE" <<'EOF'
import torch
import discloss

dev = "cuda"
g = torch.Generator().manual_seed(0)


def labels(batch, spatial, n, scale=1):
    lab = torch.randint(0, n + 1, (batch, *[(s + 3) // 4 for s in spatial]), generator=g)
    for d, s in enumerate(spatial):  # blocky, spatially coherent maps
        lab = lab.repeat_interleave(4, dim=d + 1).narrow(d + 1, 0, s)
    return (lab * scale).to(dev)


def step(x, lab, det=False, **kw):
    torch.use_deterministic_algorithms(det)
    x = x.detach().clone().requires_grad_(True)
    terms = discloss.discriminative_loss(x, lab, validate=False, **kw)
    sum(t.sum() for t in terms).backward()
    torch.cuda.synchronize()
    assert all(torch.isfinite(t).all() for t in terms) and torch.isfinite(x.grad).all()


for dtype in [torch.float32, torch.float16, torch.float64]:
    x = torch.randn(2, 5, 12, 20, device=dev).to(dtype)
    step(x, labels(2, (12, 20), 4), max_instances=6)                      # shared, direct
    x = torch.randn(2, 6, 40, 44, device=dev).to(dtype)
    lab = labels(2, (40, 44), 6)
    step(x, lab, max_instances=8, norm=1)                                # shared, partial
    step(x, lab * 50, max_instances=1024, reduction="none")              # global atomics
    step(x, lab * 50, det=True, max_instances=1024)                      # slot ranges
    step(x[..., ::2], lab[..., ::2], max_instances=8)                    # strided
    step(x.contiguous(memory_format=torch.channels_last), lab, max_instances=8)
    flat = torch.zeros(x.numel() + 1, device=dev, dtype=dtype)
    flat[1:] = x.reshape(-1)
    step(flat[1:].view(x.shape), lab, max_instances=8)                   # misaligned
    bad = lab.clone()
    bad[:, :4] = 5000
    bad[:, -3:] = -7
    step(x, bad, max_instances=8)                                        # invalid labels
    step(x, bad, det=True, max_instances=1024)
    step(x, lab, max_instances=8, unlabeled_push=0.5)                    # unlabeled push, shared paths
    step(x, lab * 50, max_instances=1024, unlabeled_push=0.5, hinge_pull=False)  # push, global atomics
    step(x, lab * 50, det=True, max_instances=1024, unlabeled_push=0.5)  # push, slot ranges
    step(x, lab * 2**40 - 3, max_instances=8, unlabeled_push=0.5)        # sparse ids (slot map)
    many = torch.randint(1, 10**6, tuple(lab.shape), generator=g).to(dev)
    step(x, many, max_instances=8)                                       # > 2K distinct ids, no validation
    # The raw op without a slot map: labels outside [0, K) get no slot.
    cfg = (0.5, 1.5, 2, 1.0, 1.0, 0.001, 0.5, 0, "paper", "mean")
    out = torch.ops.discloss.forward(x, bad, None, None, 8, *cfg)
    torch.ops.discloss.backward(*[torch.ones_like(t) for t in out[:4]], x, bad, None, None, *out[4:], *cfg)
    torch.cuda.synchronize()
vol = torch.randn(1, 3, 9, 10, 11, device=dev)
step(vol, labels(1, (9, 10, 11), 5), max_instances=65536)               # 3D, K = 65536
x = torch.randn(2, 4, 24, 28, device=dev, requires_grad=True)
terms = discloss.chainer.discriminative_margin_based_clustering_loss(x, labels(2, (24, 28), 5), 0.5, 1.5, 6)
sum(terms).backward()
torch.cuda.synchronize()
print("sanitizer case: ok")
EOF
  if [ -z "$SAN" ]; then
    record sanitizer FAIL "compute-sanitizer not found"
  else
    for tool in memcheck racecheck synccheck; do
      say "compute-sanitizer --tool $tool -> $OUT/sanitizer_$tool.log"
      extra=""
      if [ "$tool" = memcheck ]; then extra="--leak-check no"; fi
      # No caching allocator: every tensor is its own allocation, so an
      # out-of-bounds access cannot land in a neighbouring tensor unnoticed.
      if PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" $extra --error-exitcode 99 \
        "$PY" "$CASE" >"$OUT/sanitizer_$tool.log" 2>&1; then
        record "$tool" ok "$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer_$tool.log" | tail -1)"
      else
        tail -30 "$OUT/sanitizer_$tool.log"
        record "$tool" FAIL "see sanitizer_$tool.log"
      fi
    done
  fi
fi

# ---- benchmark ------------------------------------------------------------------------------
if ! skipped bench; then
  if [ -f benchmarks/bench.py ]; then
    say "python benchmarks/bench.py --device cuda --out $OUT/bench ${BENCH_ARGS:-} -> $OUT/bench.log"
    if "$PY" benchmarks/bench.py --device cuda --out "$OUT/bench" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -40; then
      record bench ok "results in bench/"
    else
      record bench FAIL "see bench.log"
    fi
  else
    record bench SKIP "benchmarks/bench.py not found"
  fi
fi

say "summary ($SUMMARY):"
cat "$SUMMARY"
exit $FAILED
