"""Cost of the label conventions and loss variants of DESIGN §1 on CPU or CUDA.

One process, side by side, at the 2D segmenter configuration (B=8, E=16,
512x512, 64 instances, float32), forward+backward, medians of
torch.utils.benchmark:

  dense     ids 1..64, max_instances=65 (the identity slot map)
  sparse    the same label maps with ids 1..64 mapped to int64 values up to 2^40,
            max_instances=64 (the sorted slot table, looked up once per run)
  push      dense ids with unlabeled_push=1 (the background pixels are the unlabeled
            ones), on label maps with about 20% background, against the plain
            loss on the same maps (plain20)
  push_s    the same with the unlabeled pixels scattered: label maps without
            background (the Voronoi grid's spare cells striped with the
            instances' ids), then 20% of the pixels, drawn at random, set to 0
            (plain20s the plain loss on them)
  *_near    the push cases with the embeddings scaled by 0.1: every unlabeled
            pixel then lies within delta_d of every mean (the push active on
            every pair, as early in training); the N(0, 1) embeddings of the
            other rows lie about 4 from every mean, beyond delta_d = 1.5,
            and differ from the means in norm (about 4 against 0.1)
  *_trained embeddings as training leaves them: each instance's pixels around
            its own mean, the unlabeled pixels around 16 means of their own
            (objects nobody labelled, in stripes of 4 rows), all means random on a sphere of
            radius 3 (about 4.2 apart), noise 0.15 per component: pixels and
            means alike in norm, the unlabeled ones out of every mean's reach
            (plain*_trained: the plain loss on the same embeddings)
  unhinged  dense ids with hinge_pull=False

and the memory floor of DESIGN's issue: 3 reads + 1 write of the embeddings
and 3 reads of the labels at the copy bandwidth measured in the same run.

    python benchmarks/variants.py [--device cpu|cuda] [--threads N] [--min-run-time S]
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
    ap.add_argument("--min-run-time", type=float, default=2.0)
    ap.add_argument("--config", default="2d_k64")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = next(c for c in W.CONFIGS if c.name == args.config)
    dev = args.device
    x = W.make_embeddings(cfg, torch.float32, dev).requires_grad_(True)
    dense = W.make_labels(cfg).to(torch.int64).to(dev)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2 ** 20, 2 ** 40, (cfg.instances,), generator=gen, dtype=torch.int64).unique()
    assert len(ids) == cfg.instances
    table = torch.cat([torch.zeros(1, dtype=torch.int64), ids[torch.randperm(len(ids), generator=gen)]]).to(dev)
    sparse = table[dense]
    gen20 = torch.Generator().manual_seed(2)
    labels20 = torch.stack([W.voronoi_labels(cfg.spatial, cfg.instances, gen20, background_fraction=0.2)
                            for _ in range(cfg.batch)]).to(dev)
    unlabeled = float((labels20 == 0).double().mean())
    gen_s = torch.Generator().manual_seed(3)
    full = torch.stack([W.voronoi_labels(cfg.spatial, cfg.instances, gen_s, background_fraction=0.0)
                        for _ in range(cfg.batch)])
    stripes = (torch.arange(full.numel()) // 4096 % cfg.instances + 1).view(full.shape)  # the grid's spare cells
    full = torch.where(full == 0, stripes, full)
    scattered = torch.where(torch.rand(full.shape, generator=gen_s) < 0.2, torch.zeros_like(full), full).to(dev)
    unlabeled_s = float((scattered == 0).double().mean())
    x_near = (0.1 * x.detach()).requires_grad_(True)

    def trained(labels):
        g = torch.Generator().manual_seed(4)
        B, E, K = cfg.batch, cfg.embed_dim, cfg.instances
        means = torch.randn(B, K + 1 + 16, E, generator=g)
        means = 3.0 * means / means.norm(dim=-1, keepdim=True)
        lab = labels.cpu().reshape(B, -1)
        own = K + 1 + torch.arange(lab.shape[1]).expand_as(lab) // 2048 % 16  # unlabeled pixels' objects: stripes
        which = torch.where(lab == 0, own, lab)
        emb = torch.gather(means, 1, which[..., None].expand(-1, -1, E)) + 0.15 * torch.randn(B, lab.shape[1], E, generator=g)
        return emb.transpose(1, 2).reshape(x.shape).contiguous().to(dev).requires_grad_(True)

    x_tr20, x_trs = trained(labels20), trained(scattered)
    K = cfg.instances

    def step(labels, k, emb=x, **kw):
        def call():
            terms = discloss.discriminative_loss(emb, labels, max_instances=k, validate=False, **kw)
            (g,) = torch.autograd.grad(sum(terms), emb)
            return g
        return call

    print(f"# discloss variants, {cfg.name}: B={cfg.batch} E={cfg.embed_dim} {cfg.shape_str} K={K} float32, "
          f"fwd+bwd, device={dev}, threads={torch.get_num_threads()}, {platform.processor() or platform.machine()}, "
          f"load {os.getloadavg()[0]:.2f}, torch {torch.__version__}")
    print(f"# push cases: unlabeled pixels {100 * unlabeled:.1f}% (background regions), "
          f"{100 * unlabeled_s:.1f}% (scattered, _s)")
    bw = M.copy_bandwidth(dev, cfg.embedding_bytes(torch.float32), min_run_time=args.min_run_time)
    floor = W.floor_bytes(cfg, torch.float32, torch.int64, "fwdbwd") / bw
    print(f"# copy bandwidth {bw / 1e9:.1f} GB/s -> floor {1e3 * floor:.1f} ms")
    rows = [
        ("dense", step(dense, K + 1)),
        ("sparse", step(sparse, K)),
        ("plain20", step(labels20, K + 1)),
        ("push20", step(labels20, K + 1, unlabeled_push=1.0)),
        ("plain20s", step(scattered, K + 1)),
        ("push20s", step(scattered, K + 1, unlabeled_push=1.0)),
        ("push20_near", step(labels20, K + 1, emb=x_near, unlabeled_push=1.0)),
        ("push20s_near", step(scattered, K + 1, emb=x_near, unlabeled_push=1.0)),
        ("plain20_trained", step(labels20, K + 1, emb=x_tr20)),
        ("push20_trained", step(labels20, K + 1, emb=x_tr20, unlabeled_push=1.0)),
        ("plain20s_trained", step(scattered, K + 1, emb=x_trs)),
        ("push20s_trained", step(scattered, K + 1, emb=x_trs, unlabeled_push=1.0)),
        ("unhinged", step(dense, K + 1, hinge_pull=False)),
    ]
    results = {}
    plain_of = {"push20": "plain20", "push20s": "plain20s", "push20_near": "plain20", "push20s_near": "plain20s",
                "push20_trained": "plain20_trained", "push20s_trained": "plain20s_trained"}
    print("| case | median ms | x floor | x dense | x plain, same labels |")
    print("|---|---|---|---|---|")
    for name, call in rows:
        results[name] = M.median_of_call(call, args.min_run_time)
        t = results[name]
        vs_plain = f"{t / results[plain_of[name]]:.2f}" if name in plain_of else ""
        print(f"| {name} | {1e3 * t:.1f} | {t / floor:.2f} | {t / results['dense']:.2f} | {vs_plain} |", flush=True)


if __name__ == "__main__":
    main()
