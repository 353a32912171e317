#!/usr/bin/env bash
# discloss as a user receives it: a distribution built from this checkout,
# installed with pip --no-build-isolation into a fresh virtual environment,
# used from outside the source tree.
#
#   scripts/install_check.sh [--wheel] [--tests] PYTHON WORKDIR
#
# Default: build the sdist, check that it carries every source file (the C++
# and CUDA sources and headers included), install it and run
# scripts/smoke_test.py. --wheel: build a wheel from the checkout
# (pip wheel --no-build-isolation .) and install that instead. --tests: then
# run the whole pytest suite against the installed package.
#
# PYTHON is the interpreter whose torch the build uses (e.g. .venv/bin/python).
# The fresh environment sees PYTHON's packages (torch, numpy, pytest) through
# a .pth file, so torch is not downloaded again, and nothing else: discloss
# comes from the distribution only. The install compiles the C++ sources
# only unless USE_CUDA is set otherwise (USE_CUDA=0 by default, to keep it
# cheap; the main build compile-checks the CUDA sources).
set -euo pipefail
MODE=sdist
TESTS=0
while [ $# -gt 2 ]; do
  case "$1" in
    --wheel) MODE=wheel ;;
    --tests) TESTS=1 ;;
    *) echo "install_check: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
[ $# -eq 2 ] || { echo "usage: $0 [--wheel] [--tests] PYTHON WORKDIR" >&2; exit 2; }
PY=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
rm -rf "$2"
mkdir -p "$2"
WORK=$(cd "$2" && pwd)
export USE_CUDA=${USE_CUDA:-0}
unset PYTHONPATH  # make exports the source tree; the installed copy must not see it
say() { echo "[install_check $(date +%H:%M:%S)] $*"; }
cd "$ROOT"

if [ "$MODE" = sdist ]; then
  say "building the sdist"
  "$PY" -m build --sdist --no-isolation --outdir "$WORK/dist" . >"$WORK/sdist.log" 2>&1 || { cat "$WORK/sdist.log"; exit 1; }
  DIST=$(ls "$WORK"/dist/discloss-*.tar.gz)
  say "checking $(basename "$DIST") ($(du -k "$DIST" | cut -f1) KiB) carries every source file"
  # Every tracked file the build or the tests read, compared with the archive.
  "$PY" - "$DIST" <<'EOF'
import subprocess, sys, tarfile
with tarfile.open(sys.argv[1]) as archive:
    names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
tracked = subprocess.run(["git", "ls-files", "csrc", "discloss", "tests", "scripts", "setup.py", "pyproject.toml",
                          "MANIFEST.in", "README.md", "CMakeLists.txt"], capture_output=True, text=True, check=True)
needed = set(tracked.stdout.split())
if not needed:
    sys.exit("install_check: git ls-files listed nothing (not a git checkout?)")
missing = sorted(needed - names)
cuda = sorted(name for name in names if name.endswith((".cu", ".cuh")))
headers = sorted(name for name in names if name.startswith("csrc/") and name.endswith(".h"))
built = sorted(name for name in names if name.endswith((".so", ".o")) or name.endswith("_build_info.py"))
print(f"  {len(names)} entries; {len(needed)} tracked source files needed, {len(missing)} missing; "
      f"CUDA sources: {', '.join(cuda) or 'none'}; {len(headers)} headers under csrc")
if missing or not cuda or built:
    sys.exit(f"install_check: missing from the sdist: {missing}; build outputs in it: {built}")
EOF
else
  say "building a wheel from the checkout"
  "$PY" -m pip wheel --no-build-isolation --no-deps --wheel-dir "$WORK/dist" . >"$WORK/wheel.log" 2>&1 || { cat "$WORK/wheel.log"; exit 1; }
  DIST=$(ls "$WORK"/dist/discloss-*.whl)
  say "$(basename "$DIST"): $(du -k "$DIST" | cut -f1) KiB"
fi

say "fresh virtual environment $WORK/venv (sees $PY's packages)"
"$PY" -m venv --without-pip "$WORK/venv"
SITE=$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$PY" -c 'import sysconfig; print("\n".join(dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))))' \
  >"$SITE/_discloss_check_parent_env.pth"
say "pip install --no-build-isolation $(basename "$DIST")$([ "$MODE" = sdist ] && echo " (compiled with USE_CUDA=$USE_CUDA)")"
# pip from the parent environment, installing into the fresh one; --no-index:
# every dependency must already be there, nothing is downloaded.
# --ignore-installed: into the fresh environment even if the parent has a
# discloss (its site-packages come first on sys.path, so the fresh copy wins).
"$WORK/venv/bin/python" -m pip install --no-build-isolation --no-index --ignore-installed --no-deps "$DIST" \
  >"$WORK/install.log" 2>&1 || { cat "$WORK/install.log"; exit 1; }
"$WORK/venv/bin/python" -m pip check >>"$WORK/install.log" 2>&1 || { cat "$WORK/install.log"; exit 1; }
tail -n 1 "$WORK/install.log"

cd "$WORK"
say "smoke test from $WORK"
"$WORK/venv/bin/python" "$ROOT/scripts/smoke_test.py" --installed
if [ "$TESTS" = 1 ]; then
  say "pytest against the installed package"
  DISCLOSS_EXPECT_INSTALLED="$ROOT/discloss" "$WORK/venv/bin/python" -m pytest "$ROOT/tests" -p no:cacheprovider \
    ${PYTEST_ARGS:-}
fi
say "passed"
