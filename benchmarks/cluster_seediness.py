"""Seediness or not: the demo's held-out SBD and |DiC| per seed mode, for trained checkpoints.

    python benchmarks/cluster_seediness.py runs/easy_s*/checkpoint.pt --out benchmarks/results/cpu/seediness_demo.md

Each checkpoint is evaluated exactly as ``python -m discloss.demo`` evaluates
it at the end of training (``discloss.demo.evaluate``: the network's own
foreground mask, its held-out images at the size and sticks it was trained
on), in every seed mode of ``discloss.demo.SEED_MODES``:

- hashed: ``cluster_embeddings`` as it is by default;
- seediness-order: seeds in descending seediness (``seed_scores``);
- seediness: the same, among pixels of seediness >= --min-seed-score only
  (``min_seed_score``).

Prints and writes a table per checkpoint and the mean over checkpoints.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from discloss import demo


def evaluate_checkpoint(path: str, eval_images: int, min_seed_score: float):
    checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    args = demo.parse_args([])
    for name, value in checkpoint["args"].items():
        setattr(args, name, value)
    args.sticks = tuple(args.sticks) if "sticks" in checkpoint["args"] else (8, 8)
    args.min_seed_score = min_seed_score
    args.eval_images = eval_images
    model = demo.StickNet(embedding_dim=checkpoint["embedding_dim"], widths=checkpoint["widths"])
    model.load_state_dict(checkpoint["model"])
    held_out = demo.make_dataset(args, args.eval_images, demo.HELD_OUT_SEED)
    start = time.perf_counter()
    scores = demo.evaluate(model, held_out, args, torch.device("cpu"))
    seconds = time.perf_counter() - start
    setting = f"{args.image_size}x{args.image_size}, {'-'.join(str(n) for n in dict.fromkeys(args.sticks))} sticks"
    return setting, {mode: (float(sbd.mean()), float(dic.float().mean())) for mode, (sbd, dic) in scores.items()}, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--eval-images", type=int, default=50, help="(default: %(default)s, as the demo)")
    parser.add_argument("--min-seed-score", type=float, default=0.5, help="(default: %(default)s, as the demo)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="markdown file for the table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    modes = demo.SEED_MODES
    header = ("| checkpoint | held-out set | " + " | ".join(f"SBD {m}" for m in modes) + " | "
              + " | ".join(f"abs DiC {m}" for m in modes) + " |")
    lines = [header, "|---|---|" + "---:|" * (2 * len(modes))]
    results = []
    for path in args.checkpoints:
        setting, scores, seconds = evaluate_checkpoint(path, args.eval_images, args.min_seed_score)
        results.append(scores)
        lines.append(f"| {path} | {setting} | " + " | ".join(f"{scores[m][0]:.4f}" for m in modes) + " | "
                     + " | ".join(f"{scores[m][1]:.2f}" for m in modes) + " |")
        print(lines[-1] + f"  ({seconds:.0f} s)", flush=True)
    if len(results) > 1:
        lines.append(f"| mean of {len(results)} | | "
                     + " | ".join(f"{statistics.mean(r[m][0] for r in results):.4f}" for m in modes) + " | "
                     + " | ".join(f"{statistics.mean(r[m][1] for r in results):.2f}" for m in modes) + " |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as handle:
            handle.write("# Seediness in the demo: held-out SBD and |DiC| per seed mode\n\n")
            handle.write(f"- evaluation: `discloss.demo.evaluate` (the network's own foreground, {args.eval_images} "
                         f"held-out images), min_seed_score {args.min_seed_score:g} for 'seediness'\n")
            handle.write(f"- torch {torch.__version__}, Python {platform.python_version()}\n")
            handle.write(f"- command: `python benchmarks/cluster_seediness.py {' '.join(argv or sys.argv[1:])}`\n\n")
            handle.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
