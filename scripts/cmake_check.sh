#!/usr/bin/env bash
# Builds the op library and its C++ test against the libtorch of the given
# Python's torch with CMake, then runs the test with ctest.
#   scripts/cmake_check.sh [PYTHON] [BUILD_DIR]
# With a CUDA build of torch, torch's CMake config needs the CUDA toolkit
# (found from nvcc, which may be a wrapper script) and nvrtc (from the pip
# nvidia packages when the toolkit lacks it); the op library itself is
# CPU-only here (pass -DDISCLOSS_CUDA=ON through CMAKE_ARGS for the kernels).
set -euo pipefail
PY=${1:-.venv/bin/python}
BUILD=${2:-build/cmake}
read -r PREFIX SITE CUDA_VER < <("$PY" -c 'import os, torch; print(torch.utils.cmake_prefix_path, os.path.dirname(os.path.dirname(torch.__file__)), torch.version.cuda or "none")')
mkdir -p "$(dirname "$BUILD")"
args=(-DCMAKE_PREFIX_PATH="$PREFIX" -DCMAKE_BUILD_TYPE=Release)
if [ "$CUDA_VER" != none ]; then
  home=${CUDA_HOME:-}
  if [ -z "$home" ] && command -v nvcc >/dev/null; then
    home=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n1)
    home=$(cd "$home" && pwd -P)
  fi
  [ -n "$home" ] || { echo "cmake_check: torch is a CUDA build but no CUDA toolkit was found (set CUDA_HOME)" >&2; exit 1; }
  args+=(-DCUDA_TOOLKIT_ROOT_DIR="$home" -DTORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}")
  for d in "$SITE"/nvidia/cu*; do
    [ -d "$d/include" ] && export CPATH="$d/include${CPATH:+:$CPATH}"
    nvrtc=$(ls "$d"/lib/libnvrtc.so* 2>/dev/null | head -n1 || true)
    [ -n "$nvrtc" ] && [ ! -e "$home/lib64/libnvrtc.so" ] && args+=(-DCUDA_nvrtc_LIBRARY="$nvrtc")
  done
fi
cmake -S . -B "$BUILD" "${args[@]}" ${CMAKE_ARGS:-} >"$BUILD.configure.log" 2>&1 || { cat "$BUILD.configure.log"; exit 1; }
cmake --build "$BUILD" -j "${MAX_JOBS:-2}"
ctest --test-dir "$BUILD" --output-on-failure
