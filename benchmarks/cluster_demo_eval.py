"""The demo's held-out score of a trained demo checkpoint, per clustering, before and after "robust".

    python benchmarks/cluster_demo_eval.py runs/demo_s0/checkpoint.pt
    python benchmarks/cluster_demo_eval.py runs/hard_s0/checkpoint.pt --image-size 256 --sticks 16-24 --eval-images 10

Scores the network as ``python -m discloss.demo`` does at the end of its
training (its predicted foreground, the held-out images, mean SBD and |DiC|)
for each of the demo's clusterings (``discloss.demo.evaluation.SEED_MODES``;
"robust" is ``ROBUST_OPTIONS``, the sequential search) and for the robust
clustering with the parallel search, without and with ``split_instances``,
and with ``split_instances`` and ``refine="quickshift"`` instead of the
neighbour vote (the benchmark's robust row, cluster_hard.py; it uses the
image layout).
Options after the checkpoint are the demo's (``--image-size``, ``--sticks``,
``--eval-images``...); they must describe the set the network was trained on.
Appends a table to benchmarks/results/cpu/cluster_demo_eval.md with --write.
"""

from __future__ import annotations

import os
import sys

import torch

from discloss import demo
from discloss.demo import evaluation
from discloss.demo.cli import HELD_OUT_SEED, make_dataset, parse_args

PARALLEL = "robust, parallel search"
SPLIT = "robust, parallel search, split"
QUICKSHIFT = "robust, parallel search, split, quickshift"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    write = "--write" in argv
    argv = [a for a in argv if a != "--write"]
    if not argv or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    path, args = argv[0], parse_args(argv[1:])
    torch.set_num_threads(1)
    checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    model = demo.StickNet(embedding_dim=checkpoint["embedding_dim"], widths=checkpoint["widths"])
    model.load_state_dict(checkpoint["model"])
    held_out = make_dataset(args, args.eval_images, HELD_OUT_SEED)
    seed_options = evaluation._seed_options

    def options(mode, seediness, arguments):
        if mode == PARALLEL:
            return dict(evaluation.ROBUST_OPTIONS, search="parallel")
        if mode == SPLIT:
            return dict(evaluation.ROBUST_OPTIONS, search="parallel", split_instances=True)
        if mode == QUICKSHIFT:
            return dict(evaluation.ROBUST_OPTIONS, search="parallel", split_instances=True, neighbour_vote=0,
                        refine="quickshift")
        return seed_options(mode, seediness, arguments)

    evaluation._seed_options = options
    try:
        modes = evaluation.SEED_MODES + (PARALLEL, SPLIT, QUICKSHIFT)
        scores = evaluation.evaluate(model, held_out, args, torch.device("cpu"), modes)
    finally:
        evaluation._seed_options = seed_options
    sticks = "-".join(str(n) for n in dict.fromkeys(args.sticks))
    lines = [f"\n## {path}: {len(held_out)} held-out images, {args.image_size}x{args.image_size} px, {sticks} sticks\n",
             f"- command: `python benchmarks/cluster_demo_eval.py {' '.join(argv)}`\n",
             "| clustering | mean SBD | mean abs DiC |", "|---|---:|---:|"]
    for mode in modes:
        sbd, abs_dic = scores[mode]
        lines.append(f"| {mode} | {sbd.mean():.4f} | {abs_dic.float().mean():.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if write:
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu", "cluster_demo_eval.md")
        new = not os.path.exists(out)
        with open(out, "a") as handle:
            if new:
                handle.write("# The demo's score per clustering, on networks trained on this machine\n\n"
                             "The demo's own evaluation (predicted foreground, held-out images); 'robust' is the "
                             "demo's (sequential search), 'robust, parallel search' the benchmark's. The "
                             "checkpoints (runs/, not in git) were trained here: runs/demo_s0 with "
                             "`python -m discloss.demo --threads 1 --out runs/demo_s0` (253 of 600 steps in the "
                             "420 s), runs/hard_s0 with `python -m discloss.demo --image-size 256 --sticks 16-24 "
                             "--threads 1 --time-limit 540 --eval-images 10 --out runs/hard_s0` (91 steps), both "
                             "undertrained.\n")
            handle.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
