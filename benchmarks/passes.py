"""Where a training step's time goes on CPU (or CUDA): each step of the fused
loss timed alone, side by side in one process, against the bytes it must
move at the copy bandwidth of the same run.

    slot_map   one read of the labels (the ids present per image)
    forward    slot_map, pass 1 (sums, counts), pass 2 (hinge sums), finalize:
               2 reads of the embeddings + 2 of the labels
    backward   coefficients, pass 3 (the gradient): 1 read of the embeddings
               and the labels, 1 write of the gradient
    step       forward + backward

Medians of torch.utils.benchmark (torch.no_grad for forward; backward is
torch.autograd.grad on a graph kept with retain_graph). The floor of a step
is its bytes / copy bandwidth (read + write counted, as in bench.py); the
project's floor for forward+backward counts 3 label reads (slot_map folded
into pass 1), this table the 4 the code makes.

    python benchmarks/passes.py [--config 2d_k64] [--threads 2] [--dtype float32] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import measure as M  # noqa: E402
import workloads as W  # noqa: E402

import discloss  # noqa: E402



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--config", default="2d_k64")
    ap.add_argument("--min-run-time", type=float, default=2.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = next(c for c in W.CONFIGS if c.name == args.config)
    dtype = getattr(torch, args.dtype)
    dev = args.device
    x = W.make_embeddings(cfg, dtype, dev).requires_grad_(True)
    labels = W.make_labels(cfg).to(torch.int64).to(dev)
    K = cfg.max_instances
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def loss():
        return discloss.discriminative_loss(x, labels, max_instances=K, validate=False)

    def slot_map():
        torch.ops.discloss.slot_map(labels, K, 0)
        sync()

    def forward():
        with torch.no_grad():
            loss()
        sync()

    kept = sum(loss())

    def backward():
        torch.autograd.grad(kept, x, retain_graph=True)
        sync()

    def step():
        torch.autograd.grad(sum(loss()), x)
        sync()

    emb = cfg.embedding_bytes(dtype)
    lab = cfg.batch * cfg.pixels * labels.element_size()
    rows = [
        ("slot_map", slot_map, lab),
        ("forward", forward, 2 * emb + 2 * lab),
        ("backward", backward, 2 * emb + lab),
        ("step", step, 4 * emb + 3 * lab),
    ]
    bw_start = M.copy_bandwidth(dev, emb, min_run_time=args.min_run_time)
    print(f"# discloss passes, {cfg.name}: B={cfg.batch} E={cfg.embed_dim} {cfg.shape_str} K={cfg.instances} "
          f"{args.dtype}, device={dev}, threads={torch.get_num_threads()}, "
          f"{platform.processor() or platform.machine()}, load {os.getloadavg()[0]:.2f}, torch {torch.__version__}")
    times = {name: M.median_of_call(call, args.min_run_time) for name, call, _ in rows}
    bw_end = M.copy_bandwidth(dev, emb, min_run_time=args.min_run_time)
    bw = max(bw_start, bw_end)
    print(f"# copy bandwidth {bw_start / 1e9:.1f} GB/s at the start, {bw_end / 1e9:.1f} at the end; "
          f"floors use the higher")
    print("| step | median ms | bytes it must move (MB) | floor ms | x floor | share of step |")
    print("|---|---|---|---|---|---|")
    for name, _, nbytes in rows:
        t = times[name]
        print(f"| {name} | {1e3 * t:.1f} | {nbytes / 1e6:.0f} | {1e3 * nbytes / bw:.1f} | {t * bw / nbytes:.2f} | "
              f"{t / times['step']:.2f} |")
    rest = times["step"] - times["forward"] - times["backward"]
    print(f"# step - forward - backward = {1e3 * rest:.1f} ms (autograd, the gradient's allocation, "
          f"forward's saved tensors)")


if __name__ == "__main__":
    main()
