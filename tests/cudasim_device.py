"""The CUDA tests' device: a real GPU when there is one, else the CUDA
simulator (tests/cudasim), on which csrc/cuda's kernels run as plain C++ on
CPU tensors.

`activate()` swaps the CPU kernels of discloss::forward, backward and
slot_map for the simulator's (the CUDA sources, registered as
discloss_cudasim::*) for as long as it is active, so the public API,
autograd, the fake kernels and torch.compile all reach the CUDA kernels;
tensors stay on the CPU. Tests written for CUDA use DEVICE for their tensors
and sync() where they would synchronise.

The library is built on first use (tests/cudasim/build.py, ninja,
incremental) unless DISCLOSS_CUDASIM_LIB names one already built (the
AddressSanitizer build of `make test-cudasim-asan`).
"""

import contextlib
import os
import pathlib
import re
import sys
from collections import Counter

import pytest
import torch

HAVE_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAVE_GPU else "cpu"
ON_SIMULATOR = not HAVE_GPU
_OPS = ("forward", "backward", "slot_map")
_loaded = False
_lib = None  # the override while active


def load():
    """Loads the simulator's library (building it if needed)."""
    global _loaded
    if _loaded:
        return
    path = os.environ.get("DISCLOSS_CUDASIM_LIB")
    if not path:
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "cudasim"))
        try:
            import build as cudasim_build
        finally:
            sys.path.pop(0)
        path = str(cudasim_build.library_path())
        if not os.path.exists(path) or os.environ.get("DISCLOSS_CUDASIM_REBUILD", "1") == "1":
            path = str(cudasim_build.build())
    if not hasattr(torch.ops, "discloss_cudasim") or not hasattr(torch.ops.discloss_cudasim, "configure"):
        torch.ops.load_library(path)
    _loaded = True


def is_loaded():
    return _loaded


def configure(sm_count=2, order="forward", seed=0):
    torch.ops.discloss_cudasim.configure(sm_count, order, seed)


@contextlib.contextmanager
def activate(sm_count=2, order="forward", seed=0):
    """The CUDA kernels serve discloss's ops on CPU tensors while active."""
    import discloss.loss

    load()
    configure(sm_count, order, seed)
    checks = discloss.loss._kernels_check_labels
    try:
        _override()
        discloss.loss._kernels_check_labels = lambda embeddings: False
        yield
    finally:
        discloss.loss._kernels_check_labels = checks
        _restore()
        configure()


def _override():
    global _lib
    _lib = torch.library.Library("discloss", "IMPL")
    for name in _OPS:
        _lib.impl(name, getattr(torch.ops.discloss_cudasim, name).default, "CPU")


def _restore():
    global _lib
    if _lib is not None:
        _lib._destroy()
        _lib = None


@contextlib.contextmanager
def cpu_kernels():
    """discloss's own CPU kernels for a while, inside activate(): the
    reference that a CUDA result is compared with. A no-op on a GPU."""
    if _lib is None:
        yield
        return
    _restore()
    try:
        yield
    finally:
        _override()


def to_cpu_reference(fn, *args, **kwargs):
    """fn(*args) on CPU copies of its tensor arguments, by the CPU kernels."""
    def cpu(a):
        if isinstance(a, torch.Tensor):
            return a.cpu()
        if isinstance(a, (list, tuple)):
            return type(a)(cpu(v) for v in a)
        return a

    with cpu_kernels():
        return fn(*cpu(args), **{k: cpu(v) for k, v in kwargs.items()})


def launch_log():
    """{"kernel@file:line": launches} since the last reset_launch_log()."""
    load()
    out = {}
    for line in torch.ops.discloss_cudasim.launch_log().splitlines():
        site, n = line.rsplit(" ", 1)
        out[site] = int(n)
    return out


def reset_launch_log():
    load()
    torch.ops.discloss_cudasim.reset_launch_log()


@contextlib.contextmanager
def pruning(enabled):
    """The kernels' pruning (runtime.cuh pruning_enabled) on or off while
    active: the same kernels computing every term, to compare bitwise."""
    load()
    torch.ops.discloss_cudasim.set_pruning(enabled)
    try:
        yield
    finally:
        torch.ops.discloss_cudasim.set_pruning(True)


def skipped():
    """{"push_tiles": (tile, cluster) pairs of the push ruled out, "pairs":
    pairs of means whose distance stopped early, "push_pixels": (pixel,
    cluster) pairs of the push's gradient whose distance stopped early}
    since the last reset_skipped()."""
    load()
    push_tiles, pairs, push_pixels = torch.ops.discloss_cudasim.skipped()
    return {"push_tiles": push_tiles, "pairs": pairs, "push_pixels": push_pixels}


def reset_skipped():
    load()
    torch.ops.discloss_cudasim.reset_skipped()


CUDA_SOURCES = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda"


def launch_sites_in_sources():
    """Counter of (file, kernel) over the DISCLOSS_LAUNCH sites of csrc/cuda."""
    sites = Counter()
    for path in sorted(CUDA_SOURCES.glob("*.cu")):
        for m in re.finditer(r"DISCLOSS_LAUNCH\(\s*(\w+)", path.read_text()):
            sites[(path.name, m.group(1))] += 1
    return sites


def launch_sites_run():
    """Counter of (file, kernel) over the distinct launch sites that ran."""
    ran = Counter()
    for site in launch_log():
        kernel, where = site.split("@")
        ran[(where.rsplit(":", 1)[0], kernel)] += 1
    return ran


def sync():
    if HAVE_GPU:
        torch.cuda.synchronize()


@pytest.fixture(autouse=True)
def cuda_device():
    """The CUDA kernels serve the ops: on the GPU, or on the simulator. A test
    module that imports this fixture runs all its tests so."""
    if not ON_SIMULATOR:
        yield
        return
    with activate():
        yield
