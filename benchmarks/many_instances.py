#!/usr/bin/env python
"""Many instances: one 64^3 volume, E=16, cubic blocks as instances, so that the
number of clusters C grows while the pixels stay the same; forward+backward
on the CPU. The pixel passes cost the same at every C; what grows is the
pairwise dist term (finalize and the backward coefficients, O(C^2 E)).

    python benchmarks/many_instances.py [--threads 1,2] [--sides 8,5,3,2] [--out benchmarks/results/cpu]

Two kinds of embeddings: "random" (N(0, 1) per pixel: every cluster mean
near the origin, nearly every pair within the hinge, nothing to skip) and
"spread" (each instance's pixels around its own centre drawn from N(0, 10^2 I),
as training leaves them: most pairs farther than 2 delta_d apart, which the
pair step skips by their first component).

Prints a table (medians; the copy bandwidth and a volume-streaming time of
the same run for scale) and writes many_instances.md/.csv (and a plot with
--plot) under --out.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

import discloss  # noqa: E402

SIDE = 64
EMBED_DIM = 16


def block_labels(block: int) -> torch.Tensor:
    """(1, 64, 64, 64) int64: cubes of `block` pixels a side, ids 1..C."""
    idx = torch.arange(SIDE) // block
    n = int(idx.max()) + 1
    lab = (idx[:, None, None] * n + idx[None, :, None]) * n + idx[None, None, :] + 1
    return lab[None]


def median_seconds(call, min_time: float = 1.0, max_reps: int = 15) -> float:
    call()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
        if times[-1] > 5 * min_time and len(times) >= 1:
            break
    return statistics.median(times)


def copy_gbps(nbytes: int = 256 << 20) -> float:
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    return 2 * nbytes / median_seconds(lambda: dst.copy_(src), 0.5) / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="2,1")
    p.add_argument("--sides", default="8,5,3,2", help="block sides: 8 -> C=512, 5 -> 2197, 3 -> 10648, 2 -> 32768")
    p.add_argument("--kinds", default="random,spread")
    p.add_argument("--out", default=None)
    p.add_argument("--plot", action="store_true")
    args = p.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, EMBED_DIM, SIDE, SIDE, SIDE, generator=gen)
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        bw = copy_gbps()
        stream_s = x0.numel() * 4 * 4 / (bw * 1e9)  # 3 reads + 1 write of the volume
        print(f"threads {threads}: copy {bw:.1f} GB/s; streaming the volume 4 times: {stream_s * 1e3:.1f} ms", flush=True)
        for kind in args.kinds.split(","):
            for side in [int(s) for s in args.sides.split(",")]:
                lab = block_labels(side)
                C = int(lab.max())
                if kind == "spread":
                    centres = torch.randn(C + 1, EMBED_DIM, generator=torch.Generator().manual_seed(side)) * 10
                    x = (x0 + centres[lab[0]].permute(3, 0, 1, 2)[None]).requires_grad_(True)
                else:
                    x = x0.clone().requires_grad_(True)

                def step():
                    x.grad = None
                    sum(discloss.discriminative_loss(x, lab, max_instances=C + 1)).backward()

                s = median_seconds(step)
                rows.append(dict(threads=threads, embeddings=kind, C=C, seconds=s, copy_gbps=bw,
                                 stream_ms=stream_s * 1e3))
                print(f"  {kind:6s} C={C:6d}: fwd+bwd {s * 1e3:9.1f} ms", flush=True)
    md = ["| threads | embeddings | C | fwd+bwd (ms) | copy GB/s | 4 volume passes at that bandwidth (ms) |",
          "| --- | --- | --- | --- | --- | --- |"]
    md += [f"| {r['threads']} | {r['embeddings']} | {r['C']} | {r['seconds'] * 1e3:.1f} | {r['copy_gbps']:.1f} | "
           f"{r['stream_ms']:.1f} |" for r in rows]
    print("\n".join(md))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "many_instances.md"), "w") as f:
            f.write(f"# Many instances: 1x{EMBED_DIM}x{SIDE}^3 float32, block labels, forward+backward\n\n")
            f.write(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
                    f"{os.cpu_count()} logical cores, load {os.getloadavg()[0]:.2f} at the end\n\n")
            f.write("\n".join(md) + "\n")
        with open(os.path.join(args.out, "many_instances.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        if args.plot:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            fig, ax = plt.subplots(figsize=(5, 3.5))
            for threads in sorted({r["threads"] for r in rows}):
                for kind in sorted({r["embeddings"] for r in rows}):
                    rs = [r for r in rows if r["threads"] == threads and r["embeddings"] == kind]
                    ax.loglog([r["C"] for r in rs], [r["seconds"] for r in rs], "o-",
                              label=f"{kind}, {threads} thread(s)")
            ax.set_xlabel("clusters C")
            ax.set_ylabel("fwd+bwd (s)")
            ax.set_title("64^3, E=16, float32, CPU")
            ax.legend()
            fig.tight_layout()
            fig.savefig(os.path.join(args.out, "many_instances.png"), dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
