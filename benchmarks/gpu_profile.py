#!/usr/bin/env python
"""Where discloss's CUDA time goes at one configuration (default: the headline,
B=8 E=16 512x512 K=64): per call, eagerly and replayed from a CUDA graph
(which leaves out the host's launch work), and per kernel (torch.profiler),
against the memory floor at the copy bandwidth measured in the same run.

    python benchmarks/gpu_profile.py [--config 2d_k64] [--dtype float32,bfloat16] [--out DIR]

Times are medians of CUDA-event-timed calls, after warm-up. Needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

import discloss  # noqa: E402
import workloads as W  # noqa: E402


def event_median_ms(call, reps: int = 50, warmup: int = 5) -> float:
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_gbps(nbytes: int = 1 << 30) -> float:
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = event_median_ms(lambda: dst.copy_(src), reps=20)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def graphed(step):
    """step() captured into a CUDA graph (warmed up on a side stream); returns replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def kernel_table(step, iters: int = 20):
    """{kernel name: (launches per step, device ms per step)} and host ms per step."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    per_kernel = defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            k = per_kernel[ev.name]
            k[0] += 1
            k[1] += ev.time_range.elapsed_us() / 1e3
    return {name: (n / iters, ms / iters) for name, (n, ms) in per_kernel.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="2d_k64", choices=list(W.CONFIGS_BY_NAME))
    p.add_argument("--dtype", default="float32,bfloat16")
    p.add_argument("--labels", default=None, help="a label file written by bench.py's cache (else generated)")
    p.add_argument("--out", default=None, help="folder for profile.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_profile.py needs a CUDA device", file=sys.stderr)
        return 2
    cfg = W.CONFIGS_BY_NAME[args.config]
    labels = torch.load(args.labels) if args.labels else W.make_labels(cfg)
    labels = labels.to("cuda", torch.int64)
    K = cfg.max_instances
    bw = copy_gbps()
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}; copy bandwidth {bw:.0f} GB/s (read + write)")
    print(f"config {cfg.name}: B={cfg.batch} E={cfg.embed_dim} {cfg.shape_str} K={K}")
    results = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, copy_gbps=bw, config=cfg.name,
                   rows=[])
    for name in args.dtype.split(","):
        dtype = W.DTYPES[name]
        x = W.make_embeddings(cfg, dtype, "cuda").requires_grad_(True)

        def fwd():
            with torch.no_grad():
                return discloss.discriminative_loss(x, labels, max_instances=K, validate=False)

        def fwdbwd():
            x.grad = None
            sum(discloss.discriminative_loss(x, labels, max_instances=K, validate=False)).backward()

        for pass_, step in (("fwd", fwd), ("fwdbwd", fwdbwd)):
            floor_mb = W.floor_bytes(cfg, dtype, torch.int64, pass_) / 1e6
            floor_ms = floor_mb / bw  # MB / (GB/s) = ms
            eager = event_median_ms(step)
            replay = graphed(step)
            graph = event_median_ms(replay)
            try:
                kernels = kernel_table(step)
            except Exception as error:  # the timings above still count
                print(f"  torch.profiler failed: {error!r}")
                kernels = {}
            device_ms = sum(ms for _, ms in kernels.values())
            row = dict(dtype=name, pass_=pass_, floor_mb=floor_mb, floor_ms=floor_ms, eager_ms=eager, graph_ms=graph,
                       kernels_ms=device_ms, kernels={k: dict(launches=n, ms=ms) for k, (n, ms) in kernels.items()})
            results["rows"].append(row)
            print(f"\n{name} {pass_}: floor {floor_mb:.0f} MB = {floor_ms:.3f} ms; eager {eager:.3f} ms "
                  f"({eager / floor_ms:.1f}x floor), graph replay {graph:.3f} ms ({graph / floor_ms:.1f}x), "
                  f"sum of kernel times {device_ms:.3f} ms")
            for k, (n, ms) in sorted(kernels.items(), key=lambda kv: -kv[1][1]):
                print(f"  {ms:8.4f} ms  x{n:4.1f}  {k[:110]}")
        del x
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "profile.json"), "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
