"""The CPU kernels are built for several instruction sets (csrc/cpu/kernels_*.cpp)
and the best one the processor runs is picked at import; the rest of the
suite runs that one only. Here the value, pair, push, finiteness and fuzz
tests run again in a subprocess under each other set this processor has
(DISCLOSS_CPU_ISA caps the choice), so that every copy of the kernels is
checked against the float64 reference, and a bad value of the variable is
an error that names it."""

import os
import platform
import subprocess
import sys

import pytest
import torch

import discloss
from discloss.reference import discriminative_loss_reference

TESTS = os.path.dirname(os.path.abspath(__file__))
SUITE = ["test_values.py", "test_pairs.py", "test_push.py", "test_finite.py", "test_fuzz.py"]


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def available_isas():
    """The sets csrc/cpu/loss.cpp cpu_isa() would pick on this processor, best last."""
    isas = ["generic"]
    if platform.machine() not in ("x86_64", "AMD64"):
        return isas
    flags = cpu_flags()
    if {"avx2", "fma"} <= flags:
        isas.append("avx2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            isas.append("avx512")
            if "avx512_bf16" in flags:
                isas.append("avx512bf16")
    return isas


# The best set is the one the rest of the suite runs.
OTHERS = available_isas()[:-1]


def env_with(**variables):
    """This environment, with the discloss this process imported (the source
    tree or an installed copy) first on the path, and the variables set."""
    path = os.pathsep.join(p for p in (os.path.dirname(os.path.dirname(discloss.__file__)),
                                       os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, **variables)


@pytest.mark.skipif(os.environ.get("DISCLOSS_CPU_ISA") is not None, reason="already running under a capped set")
@pytest.mark.parametrize("isa", OTHERS)
def test_kernels_of_each_instruction_set_pass_the_value_tests(isa):
    env = env_with(DISCLOSS_CPU_ISA=isa, DISCLOSS_CUDASIM_REBUILD="0")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *SUITE],
                            cwd=TESTS, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"under DISCLOSS_CPU_ISA={isa}:\n{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
    assert " passed" in result.stdout.strip().splitlines()[-1], result.stdout[-2000:]


def test_a_bad_instruction_set_is_named():
    env = env_with(DISCLOSS_CPU_ISA="sse9")
    code = ("import torch, discloss\n"
            "discloss.discriminative_loss(torch.randn(1, 2, 8), torch.ones(1, 8, dtype=torch.long), max_instances=2)")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "DISCLOSS_CPU_ISA: expected generic, avx2, avx512 or avx512bf16, got 'sse9'" in result.stderr


def test_the_variable_changes_the_kernels_not_the_values():
    # The same loss under every set, to the float32 rounding of the sums: the
    # sets sum in different vector widths, so equal to a few ulps, not bits.
    code = ("import torch, discloss\n"
            "g = torch.Generator().manual_seed(3)\n"
            "x = torch.randn(2, 16, 40, 40, generator=g)\n"
            "labels = torch.randint(0, 300, (2, 40, 40), generator=g)\n"
            "t = discloss.discriminative_loss(x, labels, max_instances=300)\n"
            "print(repr([float(v) for v in t]))")
    values = {}
    for isa in available_isas():
        env = env_with(DISCLOSS_CPU_ISA=isa)
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        values[isa] = torch.tensor(eval(result.stdout.strip().splitlines()[-1]), dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 40, 40, generator=g)
    labels = torch.randint(0, 300, (2, 40, 40), generator=g)
    expected = torch.stack(list(discriminative_loss_reference(x.double(), labels, max_instances=300)))
    for isa, v in values.items():
        torch.testing.assert_close(v, expected, rtol=2e-5, atol=1e-6, msg=f"DISCLOSS_CPU_ISA={isa}")
