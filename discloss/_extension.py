"""Loads the compiled extension, discloss._C, and explains why when it cannot.

A C++ extension only loads into the torch it was compiled against: torch has
no stable C++ ABI, so another torch gives an "undefined symbol" error (or
worse). ``pip install`` without ``--no-build-isolation`` produces exactly
that: it builds against the newest torch in a throwaway environment, not the
one installed. setup.py records the torch it built against in
discloss/_build_info.py; here that record is compared with the running torch
before the library is loaded, and a failed load is explained.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

REBUILD = (
    "Rebuild discloss against the running torch: "
    "pip install --no-build-isolation --no-deps --force-reinstall <discloss source directory or sdist> "
    "(in a source checkout: make build, or pip install --no-build-isolation -e .). "
    "Without --no-build-isolation, pip builds against the newest torch in a temporary environment "
    "instead of the installed one."
)


def _release(version: str) -> str:
    """'2.14.1+cu130' -> '2.14.1': the local tag names the build variant, not the ABI."""
    return version.split("+", 1)[0]


def build_mismatch(built_torch: str, built_cuda: Optional[str], running_torch: str,
                   running_cuda: Optional[str]) -> Optional[str]:
    """Why an extension built against (built_torch, built_cuda) cannot load into the running torch; None if it can.

    built_cuda is None when the extension has no CUDA kernels; then the
    running torch's CUDA does not matter.
    """
    if _release(built_torch) != _release(running_torch):
        return f"discloss was built against torch {built_torch}, but torch {running_torch} is running."
    if built_cuda is not None and running_cuda != built_cuda:
        running = f"CUDA {running_cuda}" if running_cuda else "no CUDA"
        return (f"discloss was built with CUDA kernels against torch {built_torch} (CUDA {built_cuda}), "
                f"but the running torch {running_torch} has {running}.")
    return None


def load() -> None:
    """Import discloss._C (which registers the ops), or raise an ImportError that names the fix."""
    try:
        build = importlib.import_module(f"{__package__}._build_info")
    except ModuleNotFoundError as error:
        if error.name != f"{__package__}._build_info":
            raise
        build = None  # built by an older setup.py or by hand: rely on the load itself
    if build is not None:
        problem = build_mismatch(build.torch_version, build.cuda_version, torch.__version__, torch.version.cuda)
        if problem is not None:
            raise ImportError(f"{problem} {REBUILD}")
    try:
        importlib.import_module(f"{__package__}._C")
    except ModuleNotFoundError as error:
        if error.name != f"{__package__}._C":
            raise
        raise ImportError(
            "discloss's compiled extension (discloss._C) is missing: discloss is imported from a source tree that "
            "has not been built, or from an incomplete install. Build it: make build in a source checkout, or "
            "pip install --no-build-isolation . (or -e .)."
        ) from error
    except ImportError as error:
        message = str(error)
        if "undefined symbol" in message or "cannot open shared object file" in message:
            built = f"built against torch {build.torch_version}" if build is not None else "built against another torch"
            raise ImportError(
                f"discloss's compiled extension failed to load ({message}). It was probably {built}; "
                f"torch {torch.__version__} is running. {REBUILD}"
            ) from error
        raise
