"""Builds discloss._C from csrc/: C++ sources always, CUDA sources when a usable
CUDA toolkit is found (or FORCE_CUDA=1), never with USE_CUDA=0.

Environment:
  USE_CUDA=0             skip the CUDA sources
  FORCE_CUDA=1           compile them even without a visible GPU (CI does);
                         without it they are compiled when torch is a CUDA build,
                         a toolkit is found and a GPU is visible or
                         TORCH_CUDA_ARCH_LIST is set
  CUDA_HOME              toolkit root; found from nvcc when unset
  TORCH_CUDA_ARCH_LIST   architectures, e.g. "9.0" for H100/H200
  DISCLOSS_DEBUG=1       -O0 -g
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_home_from_nvcc():
    """The toolkit root nvcc really runs from (nvcc may be a wrapper script)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ TOP=(.*)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(m.group(1).strip()) if m else None


# torch.utils.cpp_extension reads CUDA_HOME when it is imported.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and os.environ.get("USE_CUDA") != "0":
    home = _cuda_home_from_nvcc()
    if home:
        os.environ["CUDA_HOME"] = home

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda():
    if os.environ.get("USE_CUDA") == "0":
        return False
    if os.environ.get("FORCE_CUDA") == "1":
        if torch.version.cuda is None or CUDA_HOME is None:
            sys.exit(
                "FORCE_CUDA=1 needs a CUDA build of torch (have %s) and a CUDA toolkit (CUDA_HOME=%s)"
                % (torch.__version__, CUDA_HOME)
            )
        return True
    if torch.version.cuda is None or CUDA_HOME is None:
        return False
    # Without a GPU to build for, torch would compile for every architecture
    # it supports (tens of minutes) for kernels that cannot run here.
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        print("discloss: no GPU visible, skipping the CUDA sources "
              "(FORCE_CUDA=1 or TORCH_CUDA_ARCH_LIST=... compiles them)", file=sys.stderr)
        return False
    return True


def _pip_cuda_includes():
    """Headers of the pip CUDA packages (cusparse.h etc.) that torch's headers include."""
    dirs = []
    for site in sys.path:
        dirs += glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(site, "nvidia", "*", "include"))
    return sorted({d for d in dirs if os.path.isdir(d)})


def extensions():
    debug = os.environ.get("DISCLOSS_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = ["csrc/discloss.cpp", "csrc/checks.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fno-math-errno, -fno-trapping-math: sqrt without an errno branch and
    # if-converted divisions, so that the per-pixel loops vectorize.
    cxx = opt + ["-DDISCLOSS_PYTHON_MODULE", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    # No -I csrc: csrc/math.h would shadow the system <math.h>; sources include relatively.
    kwargs = dict(extra_link_args=["-fopenmp"], include_dirs=[])
    if _want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = opt + ["--expt-relaxed-constexpr", "-lineinfo"]
        kwargs["include_dirs"] += _pip_cuda_includes()
        kwargs["define_macros"] = [("DISCLOSS_WITH_CUDA", None)]
        return [CUDAExtension("discloss._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)]
    return [CppExtension("discloss._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)]


class BuildExtensionRecordingTorch(BuildExtension):
    """Builds the extension, then writes discloss/_build_info.py next to it.

    The file records the torch (and the CUDA, when the CUDA sources were
    compiled) the extension was built against, so that ``import discloss``
    can say so when another torch is running instead of failing with an
    undefined symbol (discloss/_extension.py).
    """

    def run(self):
        # Let ninja decide what to recompile: it follows every header
        # (torch's too) and the compile flags. distutils' own up-to-date
        # check looks at the .cpp files only and would keep a stale
        # extension after a header, torch or USE_CUDA change.
        self.force = True
        super().run()
        with_cuda = any(source.endswith(".cu") for ext in self.extensions for source in ext.sources)
        # After run(), get_ext_fullpath names where the extension went: the
        # source tree for --inplace and editable installs, else build_lib
        # (what a wheel packs).
        path = os.path.join(os.path.dirname(self.get_ext_fullpath("discloss._C")), "_build_info.py")
        with open(path, "w") as handle:
            handle.write(
                "# Written by setup.py when discloss._C was built; not in version control.\n"
                f"torch_version = {torch.__version__!r}\n"
                f"cuda_version = {(torch.version.cuda if with_cuda else None)!r}\n"
            )


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtensionRecordingTorch.with_options(use_ninja=True)},
)
