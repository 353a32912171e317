"""How things are measured: median time, peak memory, copy bandwidth, and the
worker that runs one job (one configuration family, one or more
implementations) in its own process.

Time: torch.utils.benchmark.Timer (it synchronises the device around each
block), after warm-up, median of the measured runs.

Peak memory, the extra bytes an implementation needs on top of its inputs:
the high-water mark during one warm call minus the memory in use before the
implementation's first call. Memory it keeps between calls (a buffer cache,
compiled code) therefore counts; the transient peak of the warm-up call
(torch.compile compiling) does not.
  CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(),
        against memory_allocated() before the first call.
  CPU:  the process's peak resident set (VmHWM, reset after warm-up by
        writing 5 to /proc/self/clear_refs) against its resident set before
        the first call; freed heap pages are handed back with malloc_trim(0)
        before each reading. On CPU each implementation of each
        configuration runs in a fresh worker process (bench.py plans that),
        so that peaks never mix. Where clear_refs cannot be written,
        getrusage's ru_maxrss is used instead (and the figure then includes
        the warm-up's peak).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import resource
import signal
import sys
import time
import traceback
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.utils.benchmark as tbench

import workloads as W

# --------------------------------------------------------------------------
# memory


def _proc_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_bytes(device: str) -> int:
    """Memory in use now: allocated CUDA bytes, or the resident set after
    handing freed heap pages back to the system."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    _malloc_trim()
    return (_proc_status_kib("VmRSS") or 0) * 1024


def measure_peak(call: Callable[[], object], device: str, cold_bytes: int) -> Tuple[int, int, float]:
    """(peak bytes, retained bytes, seconds) of one warm call.

    peak: the high-water mark during the call minus `cold_bytes`, the memory
    in use before the implementation's first (warm-up) call. So memory an
    implementation keeps between calls (a buffer cache, compiled code) counts,
    while the transient peak of torch.compile's compilation, during warm-up,
    does not. retained: the part of it already held before the call.
    """
    before = current_bytes(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = call()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        high = torch.cuda.max_memory_allocated()
    elif _reset_cpu_peak():
        t0 = time.perf_counter()
        out = call()
        seconds = time.perf_counter() - t0
        high = (_proc_status_kib("VmHWM") or 0) * 1024
    else:  # no clear_refs: high-water mark of the whole process so far
        t0 = time.perf_counter()
        out = call()
        seconds = time.perf_counter() - t0
        high = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del out
    return max(high - cold_bytes, 0), max(before - cold_bytes, 0), seconds


# --------------------------------------------------------------------------
# time


class OverBudget(Exception):
    pass


_ALARM = {"fired": False}


@contextlib.contextmanager
def wall_clock_limit(seconds: float):
    """Raise OverBudget once `seconds` have passed. The signal is handled
    between Python-level torch calls: it stops the per-instance loop within
    milliseconds, a single long C++ call only when it returns."""
    if seconds <= 0 or not hasattr(signal, "setitimer"):
        yield
        return

    def handler(signum, frame):
        _ALARM["fired"] = True  # the exception may come back wrapped by autograd
        raise OverBudget()

    _ALARM["fired"] = False
    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def timed_once(call: Callable[[], object], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = call()
    if device == "cuda":
        torch.cuda.synchronize()
    del out
    return time.perf_counter() - t0


def median_time(call: Callable[[], object], device: str, warm_s: float, min_run_time: float,
                slow_reps: int, allowance_s: float) -> Dict[str, float]:
    """Median seconds per call, after warm-up.

    Calls faster than a quarter second: Timer.blocked_autorange for at least
    `min_run_time` seconds. Slower calls: single calls timed between device
    synchronisations (what Timer does, without the two extra warm-up calls
    Timer.timeit makes each time), `warm_s` (an already measured warm call)
    included, as many as fit in `allowance_s`, at least 1 and at most
    `slow_reps`."""
    if warm_s > 0.25:
        reps = max(1, min(slow_reps, int(allowance_s / warm_s)))
        times = sorted([warm_s] + [timed_once(call, device) for _ in range(reps - 1)])
        q1, q3 = times[len(times) // 4], times[(3 * len(times)) // 4]
        return {"median_s": _median(times), "iqr_s": q3 - q1, "runs": len(times)}
    timer = tbench.Timer(stmt="call()", globals={"call": call}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return {"median_s": m.median, "iqr_s": m.iqr, "runs": len(m.times) * m.number_per_run}


def _median(values):
    n = len(values)
    return values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])


def median_of_call(call: Callable[[], object], min_run_time: float) -> float:
    """Median seconds of call() after one warm-up (torch.utils.benchmark, at
    the current thread count)."""
    call()
    timer = tbench.Timer(stmt="call()", globals={"call": call}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def copy_bandwidth(device: str, nbytes: int, min_run_time: float = 1.0) -> float:
    """Bytes per second of dst.copy_(src): read + write counted (2 * nbytes);
    the write-allocate traffic of CPU caches is not counted."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    timer = tbench.Timer(stmt="dst.copy_(src)", globals={"dst": dst, "src": src},
                         num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    del src, dst
    if device == "cuda":
        torch.cuda.empty_cache()  # leave the memory to the workers
    return 2 * n * 4 / m.median


# --------------------------------------------------------------------------
# one (implementation, dtype, pass) case


def _pass_call(fn, x, labels, pass_: str) -> Callable[[], object]:
    if pass_ == "fwd":
        def call():
            with torch.no_grad():
                return fn(x, labels)
        return call
    xg = x.detach().requires_grad_(True)

    def call():
        var, dist, reg = fn(xg, labels)
        (grad,) = torch.autograd.grad(var + dist + reg, xg)
        return grad
    return call


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError if hasattr(torch, "OutOfMemoryError") else MemoryError):
        return True
    text = str(exc)
    return "out of memory" in text or "can't allocate memory" in text or isinstance(exc, MemoryError)


def run_case(fn, x, labels, cfg: W.Config, impl: str, pass_: str, job: dict, log) -> dict:
    """Warm up, measure peak memory, then time. Returns the measured fields
    and a status: "ok", "skipped (budget)", "skipped (out of memory)", "error"."""
    device = job["device"]
    budget = job["time_budget_s"]
    row: Dict[str, object] = {"status": "ok", "note": ""}
    dtype = x.dtype
    if impl == "loop":
        predicted = W.predicted_loop_seconds(cfg, pass_, device)
        if predicted > budget:
            row.update(status="skipped (budget)",
                       note=f"predicted {predicted:.0f} s per call > budget {budget:g} s")
            return row
    predicted_mem = W.predicted_peak_bytes(impl, cfg, dtype, pass_)
    if predicted_mem > job["mem_budget_bytes"]:
        row.update(status="skipped (budget)",
                   note=f"predicted {predicted_mem / 2**30:.1f} GiB > budget "
                        f"{job['mem_budget_bytes'] / 2**30:.1f} GiB")
        return row
    call = _pass_call(fn, x, labels, pass_)
    try:
        cold = current_bytes(device)
        # The first call warms up (and compiles, for ref_compiled: not limited).
        limit = 0 if impl == "ref_compiled" else budget
        t0 = time.perf_counter()
        with wall_clock_limit(limit):
            row["first_call_s"] = timed_once(call, device)
        if row["first_call_s"] > budget and impl != "ref_compiled":
            raise OverBudget()
        # The second call measures memory and, being warm, decides how to time.
        t0 = time.perf_counter()
        with wall_clock_limit(budget):
            row["peak_bytes"], row["retained_bytes"], second = measure_peak(call, device, cold)
        if second > budget:
            raise OverBudget()
        row.update(median_time(call, device, second, job["min_run_time"], job["slow_reps"],
                               job["case_allowance_s"]))
    except Exception as exc:  # noqa: BLE001 - a failing baseline must not stop the run
        row.pop("peak_bytes", None)
        row.pop("retained_bytes", None)
        if isinstance(exc, OverBudget) or _ALARM["fired"]:
            row.update(status="skipped (budget)",
                       note=f"one call took more than the {budget:g} s budget (stopped after "
                            f"{time.perf_counter() - t0:.1f} s)")
        elif _is_oom(exc):
            row.update(status="skipped (out of memory)", note=str(exc).splitlines()[0][:120])
        else:
            row.update(status="error", note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            log(traceback.format_exc())
    finally:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


# --------------------------------------------------------------------------
# the worker: runs one job file, appends one JSON line per result


def _max_value(dtype: torch.dtype) -> int:
    return torch.iinfo(dtype).max


def _import_discloss(attempts: int = 12, wait_s: float = 10.0):
    """discloss is built in place; while it is being rebuilt its import can
    fail for a moment, so wait and retry rather than lose the job."""
    for attempt in range(attempts):
        try:
            import discloss  # noqa: F401
            return
        except (ImportError, OSError) as exc:
            if attempt == attempts - 1:
                raise
            print(f"  import discloss failed ({exc}); retrying in {wait_s:g} s", file=sys.stderr, flush=True)
            time.sleep(wait_s)


def discloss_build() -> str:
    """When the loaded extension was built (its file's mtime, UTC): the
    extension is rebuilt in place, so a run can straddle two builds."""
    import discloss._C as ext
    stamp = os.path.getmtime(ext.__file__)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(stamp))


def run_job(job: dict) -> None:
    device = job["device"]
    _import_discloss()
    build = discloss_build()
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 64
    else:
        torch._dynamo.config.cache_size_limit = 64
    label_dtype = W.LABEL_DTYPES[job["label_dtype"]]
    out = open(job["result_file"], "a")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    stop_impls = set()  # sweeps: past the budget at one size, skip the larger ones
    for cfg_dict in job["configs"]:
        cfg = W.Config(**{**cfg_dict, "spatial": tuple(cfg_dict["spatial"])})
        labels_cpu = torch.load(job["labels"][cfg.name])
        for dtype_name in job["dtypes"]:
            dtype = W.DTYPES[dtype_name]
            x = W.make_embeddings(cfg, dtype, device)
            labels = labels_cpu.to(device=device, dtype=label_dtype)
            too_small = cfg.instances > _max_value(label_dtype)
            for impl in job["impls"]:
                if impl == "ref_compiled":
                    torch._dynamo.reset()
                fn = W.make_loss_fn(impl, cfg, device)
                for pass_ in job["passes"]:
                    key = dict(job=job["kind"], config=cfg.name, batch=cfg.batch, embed_dim=cfg.embed_dim,
                               spatial=list(cfg.spatial), instances=cfg.instances, dtype=dtype_name,
                               impl=impl, pass_=pass_)
                    tag = f"{cfg.name} {dtype_name} {pass_:6s} {impl:12s}"
                    if too_small:
                        row = {"status": "error", "note": f"--label-dtype {job['label_dtype']} cannot hold "
                                                          f"label {cfg.instances}"}
                    elif job.get("deadline") and time.time() > job["deadline"]:
                        row = {"status": "skipped (budget)", "note": "past the run's --max-minutes deadline"}
                    elif (impl, pass_) in stop_impls:
                        row = {"status": "skipped (budget)", "note": "a smaller size was over budget"}
                    else:
                        log(f"  {tag} ...")
                        t0 = time.perf_counter()
                        row = run_case(fn, x, labels, cfg, impl, pass_, job, log)
                        row["wall_s"] = time.perf_counter() - t0
                    if row["status"] == "skipped (budget)" and job["kind"] == "sweep":
                        stop_impls.add((impl, pass_))
                    msg = (f"{row['median_s'] * 1e3:10.2f} ms  peak {row['peak_bytes'] / 2**20:8.1f} MiB"
                           if row["status"] == "ok" else f"{row['status']}: {row['note']}")
                    log(f"  {tag} {msg}")
                    out.write(json.dumps({**key, **row, "build": build}) + "\n")
                    out.flush()
                del fn
            del x, labels
            gc.collect()
    out.close()


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        run_job(json.load(f))
