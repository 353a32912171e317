"""The CUDA simulator checked against what a GPU does: the warp intrinsics'
results computed here by hand, and each check it claims (divergent barriers
and collectives, exited lanes, the launch limits, misaligned vector loads, a
missing barrier as an order-dependent result) failing where it should, and
the flush of subnormals by float atomics in global memory.
Kernels: tests/cudasim/selftest.cpp."""

import re

import pytest
import torch

import cudasim_device

pytestmark = pytest.mark.skipif(not cudasim_device.ON_SIMULATOR,
                                reason="the simulator's self-test; a GPU runs the CUDA tests itself")


@pytest.fixture(autouse=True)
def simulator():
    cudasim_device.load()
    cudasim_device.configure(2, "forward", 0)
    yield
    cudasim_device.configure()


def selftest(name):
    return torch.ops.discloss_cudasim.selftest(name)


def test_warp_collectives_give_what_a_gpu_gives():
    out = selftest("collectives")[: 32 * 8].reshape(32, 8).tolist()
    for lane in range(32):
        r = out[lane]
        assert r[0] == ((lane + 3) * 10 if lane + 3 < 32 else lane * 10), lane  # past lane 31: its own value
        assert r[1] == ((lane - 5) * 10 if lane >= 5 else lane * 10), lane
        assert r[2] == (lane ^ 6) * 10, lane
        assert r[3] == 70, lane
        assert r[4] == sum(1 << i for i in range(32) if i % 3 == 0), lane
        assert r[5] == 0b1111 << (4 * (lane // 4)), lane
        assert r[6] == 1 + 0, lane  # any(lane == 17) true, all(lane < 31) false
        if lane % 2 == 0:
            assert r[7] == sum(1 << i for i in range(0, 32, 2) if i % 8 == lane % 8), lane
        else:
            assert r[7] == -1, lane


def test_float_atomics_in_global_memory_flush_subnormals_as_a_gpu_does():
    # A GPU's float32 atomic add in global memory runs in flush-to-zero mode
    # (seen on an H200: sums of 1e-38 embeddings lost on the global path);
    # shared memory keeps subnormals, and so does discloss's
    # atomic_add_keep_subnormals (csrc/cuda/reduce.cuh).
    bits = selftest("float_atomics")[:3]
    got = bits.to(torch.int32).view(torch.float32).tolist()
    tiny = torch.tensor(1e-40, dtype=torch.float32)
    kept = float(tiny + tiny)
    assert kept > 0
    assert got == [0.0, kept, kept]


@pytest.mark.parametrize(
    "case,message",
    [
        ("divergent_barrier", "exited"),
        ("divergent_shuffle", "can never complete"),
        ("exited_lane", "exited"),
        ("shared_over_48k", "exceed 48 KiB"),
        ("block_over_bounds", "__launch_bounds__(64)"),
        ("grid_y_over_65535", "65535"),
        ("misaligned_vector_load", "misaligned"),
    ],
)
def test_what_a_gpu_refuses_or_hangs_on_is_an_error(case, message):
    with pytest.raises(RuntimeError, match=re.escape(message)):
        selftest(case)


def test_a_missing_barrier_shows_as_an_order_dependent_result():
    right = 64 * 65 // 2
    for order in ["forward", "reverse", "random"]:
        cudasim_device.configure(2, order, 3)
        assert selftest("block_sum")[:4].tolist() == [right] * 4, order
    cudasim_device.configure(2, "forward", 0)
    forward = selftest("block_sum_missing_barrier")[:4].tolist()
    cudasim_device.configure(2, "reverse", 0)
    reverse = selftest("block_sum_missing_barrier")[:4].tolist()
    assert reverse == [right] * 4  # thread 0 runs last and sees every write
    assert forward != reverse  # thread 0 runs first: the others' slots hold the 0xff fill
