"""Builds the CUDA simulator's library: csrc/cuda/*.cu compiled as plain C++
on the simulator (tests/cudasim/cudasim.h), registered as discloss_cudasim::*
on CPU tensors. Test-only: never part of the wheel or the sdist.

    python tests/cudasim/build.py [--asan]

builds (incrementally, with ninja) into build/cudasim[-asan]/ and prints the
library's path. With --asan the library is compiled with AddressSanitizer;
load it in a process started with libasan preloaded (see `make
test-cudasim-asan`).
"""

import argparse
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent
SOURCES = [
    HERE / "engine.cpp",
    HERE / "ops.cpp",
    HERE / "loss_sim.cpp",
    HERE / "slot_map_sim.cpp",
    ROOT / "csrc" / "checks.cpp",
]
# Every .cu/.cuh the simulator's units include: a change rebuilds them
# (ninja tracks headers itself; listing them here keeps the name stable).
NAME = "discloss_cudasim"


def build_dir(asan):
    return ROOT / "build" / ("cudasim-asan" if asan else "cudasim")


def build(asan=False, verbose=False):
    """Builds (or finds up to date) the library; returns its path."""
    from torch.utils import cpp_extension

    flags = ["-std=c++20", "-O2", "-g", "-Wno-unknown-pragmas", "-fno-math-errno", "-fno-trapping-math"]
    ldflags = []
    if asan:
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer", "-O1"]
        ldflags += ["-fsanitize=address"]
    out = build_dir(asan)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MAX_JOBS", "2")
    cpp_extension.load(
        name=NAME + ("_asan" if asan else ""),
        sources=[str(s) for s in SOURCES],
        extra_cflags=flags,
        extra_ldflags=ldflags,
        extra_include_paths=[str(ROOT / "csrc")],
        build_directory=str(out),
        is_python_module=False,
        verbose=verbose,
    )
    return library_path(asan)


def library_path(asan=False):
    return build_dir(asan) / (NAME + ("_asan" if asan else "") + ".so")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--asan", action="store_true", help="compile with AddressSanitizer")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()
    path = build(args.asan, args.verbose)
    print(path)


if __name__ == "__main__":
    sys.exit(main())
