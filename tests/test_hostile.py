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
which is done where the library exists).
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
    for pattern in ("/lib/*/libc_malloc_debug.so.0", "/usr/lib/*/libc_malloc_debug.so.0", "/lib64/libc_malloc_debug.so.0",
                    "/usr/lib64/libc_malloc_debug.so.0"):
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def _env(perturb):
    env = dict(os.environ, MALLOC_CHECK_="3", MALLOC_PERTURB_=str(perturb), OMP_NUM_THREADS="2")
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
            assert any(n.startswith(f"{op}/{argument.name}/") for n in names), f"no hostile case for {op}'s {argument.name}"


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
