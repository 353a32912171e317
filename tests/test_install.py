"""Loading the extension (discloss/_extension.py): the build records its torch,
and an extension built against another torch, or one that fails to load or
is missing, gives an ImportError that says so and names the fix. Also, when
the suite is pointed at an installed copy (make test-installed), that this
copy is what the tests import."""

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch

import discloss
from discloss import _extension

PACKAGE_DIR = os.path.dirname(os.path.realpath(discloss.__file__))


def test_suite_runs_against_the_installed_copy_when_asked():
    source = os.environ.get("DISCLOSS_EXPECT_INSTALLED")
    if not source:
        pytest.skip("runs when the suite tests an installed copy (make test-installed sets DISCLOSS_EXPECT_INSTALLED)")
    source = os.path.realpath(source)
    site = os.path.realpath(sysconfig.get_paths()["platlib"])
    assert os.path.commonpath([PACKAGE_DIR, source]) != source, f"discloss imported from {PACKAGE_DIR}"
    assert os.path.commonpath([PACKAGE_DIR, site]) == site, f"discloss imported from {PACKAGE_DIR}, not {site}"


def test_build_records_the_torch_it_was_built_against():
    from discloss import _build_info

    assert _build_info.torch_version.split("+")[0] == torch.__version__.split("+")[0]
    assert _build_info.cuda_version in (None, torch.version.cuda)


@pytest.mark.parametrize("built, running, expected", [
    (("2.14.1", None), ("2.14.1", None), None),
    (("2.14.1+cu130", None), ("2.14.1+cpu", None), None),  # a CPU-only build loads into either variant
    (("2.14.1+cu130", "13.0"), ("2.14.1+cu130", "13.0"), None),
    (("2.4.0", None), ("2.14.1", "13.0"), "discloss was built against torch 2.4.0, but torch 2.14.1 is running."),
    (("2.14.1", None), ("2.14.0", None), "discloss was built against torch 2.14.1, but torch 2.14.0 is running."),
    (("2.14.1+cu130", "13.0"), ("2.14.1+cpu", None),
     "discloss was built with CUDA kernels against torch 2.14.1+cu130 (CUDA 13.0), but the running torch "
     "2.14.1+cpu has no CUDA."),
    (("2.14.1+cu128", "12.8"), ("2.14.1+cu130", "13.0"),
     "discloss was built with CUDA kernels against torch 2.14.1+cu128 (CUDA 12.8), but the running torch "
     "2.14.1+cu130 has CUDA 13.0."),
])
def test_build_mismatch(built, running, expected):
    assert _extension.build_mismatch(*built, *running) == expected


def import_copy(tmp_path, edit):
    """Import a copy of the installed package, changed by edit(copy_dir), in a fresh interpreter."""
    copy = tmp_path / "discloss"
    shutil.copytree(PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    edit(copy)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    return subprocess.run([sys.executable, "-c", "import discloss"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


def write_build_info(copy, torch_version, cuda_version=None):
    (copy / "_build_info.py").write_text(f"torch_version = {torch_version!r}\ncuda_version = {cuda_version!r}\n")


def extension_files(copy):
    return [name for name in os.listdir(copy) if name.startswith("_C.") and name.endswith((".so", ".pyd"))]


def test_import_against_another_torch_names_both_and_the_fix(tmp_path):
    result = import_copy(tmp_path, lambda copy: write_build_info(copy, "2.3.0"))
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: discloss was built against torch 2.3.0, but torch "
                           f"{torch.__version__} is running.")
    assert "pip install --no-build-isolation" in last


def test_undefined_symbol_is_explained(tmp_path):
    # What loading an extension built against another torch looks like when
    # no build record says so: the loader's undefined-symbol error.
    def edit(copy):
        for name in extension_files(copy):
            os.remove(copy / name)
        os.remove(copy / "_build_info.py")
        (copy / "_C.py").write_text(textwrap.dedent("""\
            raise ImportError("/x/discloss/_C.so: undefined symbol: _ZN3c1017RegisterOperatorsD1Ev")
        """))

    result = import_copy(tmp_path, edit)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: discloss's compiled extension failed to load (/x/discloss/_C.so: "
                           "undefined symbol: _ZN3c1017RegisterOperatorsD1Ev). It was probably built against "
                           f"another torch; torch {torch.__version__} is running.")
    assert "pip install --no-build-isolation" in last


def test_missing_extension_is_explained(tmp_path):
    def edit(copy):
        for name in extension_files(copy):
            os.remove(copy / name)

    result = import_copy(tmp_path, edit)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: discloss's compiled extension (discloss._C) is missing")
    assert "make build" in last
