"""Hostile and careless arguments of the raw ops (DESIGN §7), each case in a
subprocess under glibc's heap checks: a crash is a failure of that case with
its signal, not a lost test run.

The cases live in hostile_worker.py. All of them run in one worker process
(a crash restarts a worker on the cases after the one that crashed), twice:
with MALLOC_PERTURB_ set to two different bytes, so that freshly allocated
and freed heap memory holds different garbage in the two runs. A case passes
when it raised the error it names (or returned the value its check expects)
in both runs, and its returned tensors are bitwise the same in both: a
result that changes with the perturbation byte was read from memory the op
never wrote. MALLOC_CHECK_=3 makes glibc abort on heap corruption it
detects (glibc >= 2.34 reads it only with libc_malloc_debug.so preloaded,
which is done where the library exists), and the thread cache is off so
that every free checks its neighbours' headers.
"""

import glob
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import hostile_worker

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "hostile_worker.py")
TIMEOUT_SECONDS = 300
PERTURB_BYTES = (0x5A, 0xC3)


def _malloc_debug_library():
    for pattern in ("/lib/*/libc_malloc_debug.so.0", "/usr/lib/*/libc_malloc_debug.so.0",
                    "/lib64/libc_malloc_debug.so.0", "/usr/lib64/libc_malloc_debug.so.0"):
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def _env(perturb):
    env = dict(os.environ, MALLOC_CHECK_="3", MALLOC_PERTURB_=str(perturb), OMP_NUM_THREADS="2")
    # Without the per-thread cache every free goes through the chunk-header checks: a write past a block
    # then aborts at its free ("free(): invalid next size"); with the cache it may pass unnoticed.
    tunables = "glibc.malloc.tcache_count=0"
    env["GLIBC_TUNABLES"] = ":".join(t for t in (os.environ.get("GLIBC_TUNABLES", ""), tunables) if t)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, os.environ.get("PYTHONPATH", "")) if p)
    library = _malloc_debug_library()
    if library is not None:
        env["LD_PRELOAD"] = " ".join(p for p in (library, os.environ.get("LD_PRELOAD", "")) if p)
    return env


def _signal_name(returncode):
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit status {returncode}"


def run_cases(names, perturb, worker=WORKER):
    """{name: outcome} for every case, running workers until each case has an outcome."""
    outcomes = {}
    pending = list(names)
    while pending:
        process = subprocess.run([sys.executable, worker, *pending], capture_output=True, text=True,
                                 env=_env(perturb), timeout=TIMEOUT_SECONDS, cwd=HERE)
        started = None
        for line in process.stdout.splitlines():
            if line.startswith("START "):
                started = line[len("START "):]
            elif line.startswith("{"):
                result = json.loads(line)
                outcomes[result["name"]] = result
                started = None
        if process.returncode != 0:
            crashed = started if started is not None else next((n for n in pending if n not in outcomes), None)
            if crashed is None:
                break
            outcomes[crashed] = {"ok": False, "crash": True,
                                 "detail": f"the process died ({_signal_name(process.returncode)}) in this case; "
                                           f"stderr: {process.stderr[-1500:]}"}
        pending = [n for n in pending if n not in outcomes]
    return outcomes


@pytest.fixture(scope="module")
def outcomes():
    names = sorted(hostile_worker.cases())
    return [run_cases(names, perturb) for perturb in PERTURB_BYTES]


@pytest.mark.parametrize("name", sorted(hostile_worker.cases()))
def test_hostile_case(name, outcomes):
    runs = [o.get(name, {"ok": False, "detail": "no outcome (the worker stopped before this case)"}) for o in outcomes]
    for perturb, run in zip(PERTURB_BYTES, runs):
        assert run["ok"], f"{name} (MALLOC_PERTURB_={perturb}): {run['detail']}"
    assert runs[0]["digest"] == runs[1]["digest"], (
        f"{name}: the returned tensors differ between MALLOC_PERTURB_={PERTURB_BYTES[0]} and {PERTURB_BYTES[1]}: "
        "the op returned memory it never wrote")


def test_every_raw_op_argument_has_a_case():
    names = hostile_worker.cases()
    for op in ("slot_map", "forward", "backward"):
        schema = getattr(torch.ops.discloss, op).default._schema
        for argument in schema.arguments:
            assert any(n.startswith(f"{op}/{argument.name}/") for n in names), (
                f"no hostile case for {op}'s {argument.name}")


def test_a_crash_is_reported_with_its_signal(tmp_path):
    # The harness itself: a case that kills its process fails naming the signal, and the cases after it still
    # run, in a fresh worker.
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import json, os, signal, sys\n"
        "for name in sys.argv[1:]:\n"
        "    print('START ' + name, flush=True)\n"
        "    if name == 'b-crash':\n"
        "        os.kill(os.getpid(), signal.SIGSEGV)\n"
        "    print(json.dumps({'name': name, 'ok': True, 'digest': name}), flush=True)\n"
    )
    got = run_cases(["a", "b-crash", "c"], PERTURB_BYTES[0], worker=str(worker))
    assert got["a"]["ok"] and got["c"]["ok"]
    assert not got["b-crash"]["ok"] and "SIGSEGV" in got["b-crash"]["detail"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap checks")
def test_the_heap_checks_catch_a_write_past_a_block():
    # The environment the cases run in: 16 bytes written past a 24-byte block (over the next block's header)
    # abort the process at the free, as the writes of issue 20 did ("free(): invalid next size").
    code = ("import ctypes; c = ctypes.CDLL(None); c.malloc.restype = ctypes.c_void_p; "
            "c.free.argtypes = [ctypes.c_void_p]; p = c.malloc(24); q = c.malloc(24); "
            "ctypes.memset(p, 0x41, 40); c.free(p); print('survived')")
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(PERTURB_BYTES[0]))
    assert process.returncode == -signal.SIGABRT, (process.returncode, process.stdout, process.stderr)
