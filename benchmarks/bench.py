#!/usr/bin/env python
"""Benchmark discloss against pure PyTorch (issue 4). See benchmarks/README.md.

    python benchmarks/bench.py --quick                 # CPU, < 2 minutes (make bench)
    python benchmarks/bench.py --full                  # every configuration, dtype, sweep
    python benchmarks/bench.py --device cuda --out DIR # GPU, full by default

Each implementation runs in a fresh worker process (measure.py) so that peak
memory figures never mix; this process plans the jobs, prepares the label
maps once, measures the copy bandwidth, and writes the tables and plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import torch  # noqa: E402

import measure  # noqa: E402
import report  # noqa: E402
import workloads as W  # noqa: E402


def _csv(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="2d_k64 float32, discloss vs eager reference vs loop, small sweeps "
                           "(the default on CPU)")
    mode.add_argument("--full", action="store_true",
                      help="every configuration, float32 and bfloat16, all four implementations, "
                           "full sweeps (the default on CUDA)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default=None,
                   help="output folder (default benchmarks/results/<device>, quick mode: .../<device>/quick)")
    p.add_argument("--config", type=_csv, default=None,
                   help=f"comma-separated subset of: {', '.join(W.CONFIGS_BY_NAME)}")
    p.add_argument("--dtype", type=_csv, default=None, help="comma-separated: float32, bfloat16, float16, float64")
    p.add_argument("--impl", type=_csv, default=None, help=f"comma-separated subset of: {', '.join(W.IMPLS)}")
    p.add_argument("--pass", dest="passes", type=_csv, default=None, help="comma-separated: fwd, fwdbwd")
    p.add_argument("--label-dtype", default="int64", choices=list(W.LABEL_DTYPES))
    p.add_argument("--no-scaling", action="store_true", help="skip the pixel and K sweeps")
    p.add_argument("--scaling-only", action="store_true", help="only the pixel and K sweeps")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds one call may take before an implementation is skipped "
                        "(default: quick 5, full 10)")
    p.add_argument("--mem-budget", type=float, default=None,
                   help="GiB an implementation may be predicted to need (default: CPU min(8, 60%% of "
                        "available memory), CUDA 80%% of free memory)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="wall-clock limit of the whole run; what has not run by then is reported as "
                        "skipped (budget) (default: none on CPU, 5 on CUDA, where scripts/gpu_check.sh "
                        "runs it inside a 10-minute command)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the workers (default: torch's)")
    p.add_argument("--cache", default=None,
                   help="label maps and raw worker output (default benchmarks/results/<device>/raw, git-ignored)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--rerender", metavar="RUN_JSON", default=None,
                   help="measure nothing: rewrite the tables and plots from a finished run's "
                        "<cache>/runs/<stamp>/run.json (into its --out, or the given --out)")
    args = p.parse_args(argv)
    if not args.quick and not args.full:
        args.full = args.device == "cuda"
        args.quick = not args.full
    return args


def device_slug(device: str) -> str:
    if device == "cpu":
        return "cpu"
    name = torch.cuda.get_device_name(0)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def plan(args) -> Dict:
    quick = args.quick
    configs = args.config or (W.QUICK_CONFIGS if quick else [c.name for c in W.CONFIGS])
    for name in configs:
        if name not in W.CONFIGS_BY_NAME:
            raise SystemExit(f"--config: unknown configuration {name!r}; expected one of {list(W.CONFIGS_BY_NAME)}")
    dtypes = args.dtype or (["float32"] if quick else ["float32", "bfloat16"])
    for d in dtypes:
        if d not in W.DTYPES:
            raise SystemExit(f"--dtype: unknown dtype {d!r}; expected one of {list(W.DTYPES)}")
    impls = args.impl or (["discloss", "ref_eager", "loop"] if quick else list(W.IMPLS))
    for i in impls:
        if i not in W.IMPLS:
            raise SystemExit(f"--impl: unknown implementation {i!r}; expected one of {list(W.IMPLS)}")
    if "discloss" not in impls:
        impls = ["discloss"] + impls  # speedups are against discloss
    passes = args.passes or list(W.PASSES)
    for s in passes:
        if s not in W.PASSES:
            raise SystemExit(f"--pass: unknown pass {s!r}; expected one of {list(W.PASSES)}")
    if args.device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        mem_budget = 0.8 * free
    else:
        mem_budget = min(8 << 30, 0.6 * _available_memory_bytes())
    if args.mem_budget is not None:
        mem_budget = args.mem_budget * 2**30
    return dict(
        mode="quick" if quick else "full",
        configs=[] if args.scaling_only else configs,
        dtypes=dtypes, impls=impls, passes=passes,
        pixel_sweep=[] if args.no_scaling else (W.PIXEL_SWEEP_QUICK if quick else W.PIXEL_SWEEP_FULL),
        k_sweep=[] if args.no_scaling else (W.K_SWEEP_QUICK if quick else W.K_SWEEP_FULL),
        time_budget_s=args.time_budget or (5.0 if quick else 10.0),
        mem_budget_bytes=int(mem_budget),
        min_run_time=0.3 if quick else 1.0,
        slow_reps=3,
        case_allowance_s=4.0 if quick else 8.0,
        job_timeout_s=240 if quick else 1200,
        max_minutes=args.max_minutes if args.max_minutes is not None else (5.0 if args.device == "cuda" else None),
    )


def machine_info(device: str) -> Dict[str, str]:
    cpu_model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no", "--",
                                "csrc", "discloss", "setup.py", "CMakeLists.txt"],
                               capture_output=True, text=True).stdout.strip()
        commit += " (with uncommitted changes to csrc/ or discloss/)" if dirty else ""
    except OSError:
        commit = "unknown"
    info = {
        "machine": f"{platform.node()} ({platform.system()} {platform.release()}, {platform.machine()})",
        "CPU": f"{cpu_model}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "CUDA (torch built with)": str(torch.version.cuda),
        "discloss commit": commit,
        "date (UTC)": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }
    env = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS",
                                              "CUDA_VISIBLE_DEVICES", "TORCHINDUCTOR_CACHE_DIR")
           if k in os.environ]
    if env:
        info["environment"] = " ".join(env)
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["GPU"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}"
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            pass
    else:
        info["GPU"] = "none used (CPU run)"
    return info


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def prepare_labels(configs: List[W.Config], cache: str) -> Dict[str, str]:
    """Generate each label map once (seeded), store it in the cache."""
    os.makedirs(os.path.join(cache, "labels"), exist_ok=True)
    paths = {}
    for cfg in configs:
        path = os.path.join(cache, "labels", f"v1_{cfg.name}_b{cfg.batch}_{cfg.shape_str}_k{cfg.instances}.pt")
        if not os.path.exists(path):
            print(f"[labels] generating {cfg.name} (B={cfg.batch}, {cfg.shape_str}, K={cfg.instances})", flush=True)
            torch.save(W.make_labels(cfg).to(torch.int32), path + ".tmp")
            os.replace(path + ".tmp", path)
        paths[cfg.name] = path
    return paths


def run_worker(job: Dict, job_dir: str, index: int, timeout_s: float, skip: str = None) -> List[Dict]:
    """Run one job in a fresh process; return its rows, one per planned
    (configuration, dtype, implementation, pass), measured or not."""
    job_file = os.path.join(job_dir, f"job{index:03d}.json")
    job["result_file"] = os.path.join(job_dir, f"job{index:03d}.jsonl")
    with open(job_file, "w") as f:
        json.dump(job, f)
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONWARNINGS", "ignore")
    if job.get("deadline"):
        # a job already started may finish its current case (one time budget)
        timeout_s = min(timeout_s, job["deadline"] - time.time() + 3 * job["time_budget_s"] + 60)
    if skip:
        failure = skip
    elif job.get("deadline") and time.time() > job["deadline"]:
        failure = "past the run's --max-minutes deadline"
    else:
        try:
            proc = subprocess.run([sys.executable, os.path.join(HERE, "measure.py"), job_file], env=env,
                                  timeout=timeout_s)
            failure = None if proc.returncode == 0 else f"worker exited with status {proc.returncode}"
        except subprocess.TimeoutExpired:
            failure = f"worker timed out after {timeout_s:.0f} s"
    rows = []
    if os.path.exists(job["result_file"]):
        with open(job["result_file"]) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    # Every planned row appears in the tables, measured or not.
    done = {(r["config"], r["dtype"], r["impl"], r["pass_"]) for r in rows}
    for cfg in job["configs"]:
        for dtype in job["dtypes"]:
            for impl in job["impls"]:
                for pass_ in job["passes"]:
                    if (cfg["name"], dtype, impl, pass_) not in done:
                        over = failure and ("timed out" in failure or "deadline" in failure
                                            or "over budget" in failure)
                        status = "skipped (budget)" if over else "error"
                        rows.append(dict(job=job["kind"], config=cfg["name"], batch=cfg["batch"],
                                         embed_dim=cfg["embed_dim"], spatial=list(cfg["spatial"]),
                                         instances=cfg["instances"], dtype=dtype, impl=impl, pass_=pass_,
                                         status=status, note=failure or "not run"))
    return rows


def rerender(run_json: str, out: str = None, plots: bool = True) -> int:
    """Write the tables and plots again from a finished run's run.json."""
    with open(run_json) as f:
        run = json.load(f)
    out = out or run["out"]
    os.makedirs(out, exist_ok=True)
    report.write_all(out, run["meta"], run["table_rows"], run["sweep_rows"], plots=plots)
    print(f"wrote {out}/results.md, results.csv" + (", plots" if plots else ""))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.rerender:
        return rerender(args.rerender, args.out, plots=not args.no_plots)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available to torch", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)  # the copy bandwidth is measured with the workers' threads
    slug = device_slug(args.device)
    p = plan(args)
    out = args.out or os.path.join(HERE, "results", slug, *(["quick"] if args.quick else []))
    cache = args.cache or os.path.join(HERE, "results", slug, "raw")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    job_dir = os.path.join(cache, "runs", f"{stamp}-{p['mode']}")
    os.makedirs(out, exist_ok=True)
    os.makedirs(job_dir, exist_ok=True)
    t_start = time.time()
    info = machine_info(args.device)
    print(f"discloss benchmark: {p['mode']} mode on {slug}; results in {out}", flush=True)
    for k, v in info.items():
        print(f"  {k}: {v}", flush=True)
    load_start = load_average()

    copy_bytes = (256 << 20) if args.device == "cpu" else (1 << 30)
    copy_bw = [measure.copy_bandwidth(args.device, copy_bytes, p["min_run_time"])]
    print(f"[copy] {copy_bw[0] / 1e9:.1f} GB/s (dst.copy_(src), {copy_bytes >> 20} MiB, read + write)", flush=True)

    main_cfgs = [W.CONFIGS_BY_NAME[n] for n in p["configs"]]
    pixel_cfgs = [W.pixel_sweep_config(n) for n in p["pixel_sweep"]]
    k_cfgs = [W.k_sweep_config(k) for k in p["k_sweep"]]
    labels = prepare_labels(main_cfgs + pixel_cfgs + k_cfgs, cache)

    deadline = t_start + 60 * p["max_minutes"] if p["max_minutes"] else None
    common = dict(device=args.device, deadline=deadline, label_dtype=args.label_dtype, labels=labels,
                  threads=args.threads,
                  time_budget_s=p["time_budget_s"], mem_budget_bytes=p["mem_budget_bytes"],
                  min_run_time=p["min_run_time"], slow_reps=p["slow_reps"],
                  case_allowance_s=p["case_allowance_s"])
    # CPU: one process per (configuration, implementation), so that resident
    # memory peaks never mix. CUDA: memory is counted per call by the caching
    # allocator, so processes are grouped: one per configuration for the
    # uncompiled implementations, one for all compiled runs (it keeps the
    # compiler warm), the compiled runs last so a deadline cuts them first.
    per_impl = args.device == "cpu"
    sweep_impls = [i for i in p["impls"] if args.impl or p["mode"] == "full" or i in ("discloss", "ref_eager")]
    # Full sweeps allow 3x the time per call: their largest sizes are the point.
    sweep_budget = p["time_budget_s"] * (1 if p["mode"] == "quick" or args.time_budget else 3)

    def table_job(cfgs, impls):
        return dict(common, kind="table", configs=[dataclasses.asdict(c) for c in cfgs], dtypes=p["dtypes"],
                    impls=impls, passes=p["passes"])

    def sweep_job(sweep, cfgs, impls):
        return dict(common, kind="sweep", sweep=sweep, configs=[dataclasses.asdict(c) for c in cfgs],
                    time_budget_s=sweep_budget, dtypes=["float32"], impls=impls, passes=["fwdbwd"])

    sweeps = [(s, c) for s, c in (("pixels", pixel_cfgs), ("K", k_cfgs)) if c]
    jobs = []
    if per_impl:
        jobs += [table_job([cfg], [i]) for cfg in main_cfgs for i in p["impls"]]
        # Sweeps too get a process per point: discloss's CPU backward keeps
        # its gradient buffers for reuse, which would hide the next point's.
        jobs += [sweep_job(s, [cfg], [i]) for s, cfgs in sweeps for i in sweep_impls for cfg in cfgs]
    else:
        eager = [i for i in p["impls"] if i != "ref_compiled"]
        jobs += [table_job([cfg], eager) for cfg in main_cfgs]
        jobs += [sweep_job(s, cfgs, [i for i in sweep_impls if i != "ref_compiled"]) for s, cfgs in sweeps]
        if "ref_compiled" in p["impls"] and main_cfgs:
            jobs.append(table_job(main_cfgs, ["ref_compiled"]))
        if "ref_compiled" in sweep_impls:
            jobs += [sweep_job(s, cfgs, ["ref_compiled"]) for s, cfgs in sweeps]

    table_rows, sweep_rows = [], []
    over_budget = set()  # (sweep, impl) past the budget at a smaller size
    for i, job in enumerate(jobs, 1):
        if job["kind"] == "table":
            what = ", ".join(c["name"] for c in job["configs"])
        else:
            what = f"{job['sweep']} sweep" + (f" {job['configs'][0]['name']}" if len(job["configs"]) == 1 else "")
        print(f"[{i}/{len(jobs)}] {what}: {', '.join(job['impls'])} "
              f"({', '.join(job['dtypes'])}; {', '.join(job['passes'])})  t={time.time() - t_start:.0f}s",
              flush=True)
        skip = None
        if job["kind"] == "sweep" and all((job["sweep"], impl) in over_budget for impl in job["impls"]):
            skip = "a smaller size was over budget"
        rows = run_worker(job, job_dir, i, p["job_timeout_s"], skip=skip)
        if job["kind"] == "sweep":
            for r in rows:
                r["sweep"] = job["sweep"]
                if r["status"] == "skipped (budget)":
                    over_budget.add((job["sweep"], r["impl"]))
            sweep_rows += rows
        else:
            table_rows += rows

    copy_bw.append(measure.copy_bandwidth(args.device, copy_bytes, p["min_run_time"]))
    print(f"[copy] {copy_bw[1] / 1e9:.1f} GB/s at the end", flush=True)
    meta = dict(info=info, mode=p["mode"], device=args.device, slug=slug, copy_bw=copy_bw,
                copy_bytes=copy_bytes, label_dtype=args.label_dtype, load_start=load_start,
                load_end=load_average(), elapsed_s=time.time() - t_start, plan=p,
                argv=" ".join(sys.argv[1:]))
    with open(os.path.join(job_dir, "run.json"), "w") as f:
        json.dump(dict(meta=meta, table_rows=table_rows, sweep_rows=sweep_rows, out=out), f)
    report.write_all(out, meta, table_rows, sweep_rows, plots=not args.no_plots)
    print(f"done in {time.time() - t_start:.0f} s; wrote {out}/results.md, results.csv"
          + ("" if args.no_plots else ", plots"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
