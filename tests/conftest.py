"""Runs device tests on the CUDA simulator where no GPU is present (see
helpers.DEVICES and cudasim_device.py) and says, at the end of the run,
which CUDA kernels and launch sites ran there."""

import pytest

import cudasim_device
from helpers import SimulatedCuda

@pytest.fixture(autouse=True)
def _cuda_simulator(request):
    callspec = getattr(request.node, "callspec", None)
    device = callspec.params.get("device") if callspec is not None else None
    if isinstance(device, SimulatedCuda):
        with cudasim_device.activate():
            yield
    else:
        yield


def pytest_terminal_summary(terminalreporter):
    if not cudasim_device.ON_SIMULATOR or not cudasim_device.is_loaded():
        return
    expected, ran = cudasim_device.launch_sites_in_sources(), cudasim_device.launch_sites_run()
    kernels = {k for _, k in expected}
    kernels_ran = {k for _, k in ran}
    missing = sorted(f"{f}:{k}" for (f, k), n in expected.items() if ran[(f, k)] < n)
    terminalreporter.write_line(
        f"CUDA simulator: {len(kernels_ran & kernels)} of {len(kernels)} kernels and "
        f"{sum(min(ran[s], n) for s, n in expected.items())} of {sum(expected.values())} launch sites ran"
        + (f"; not run: {', '.join(missing)}" if missing else "")
    )
