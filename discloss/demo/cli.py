"""The demo's command: its options, and the run that ties training, evaluation and the panel together.

``python -m discloss.demo`` (``__main__.py``) calls ``main``; so does
``torchrun -m discloss.demo``, one process per rank.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import List, Optional, Tuple

import torch

from .. import distributed
from ..data import ScatteredSticks
from .evaluation import evaluate, predict
from .model import StickNet
from .panel import PANEL_MODES, save_panel
from ._threads import ThreadChooser
from .training import train

__all__ = ["TRAIN_SEED", "HELD_OUT_SEED", "parse_args", "make_dataset", "main"]

# Training and held-out samples come from data sets with different seeds.
TRAIN_SEED = 0
HELD_OUT_SEED = 1_000_003
_PANEL_ROWS = 4


def _sticks_range(text: str) -> Tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        sticks = (int(low), int(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LOW-HIGH, e.g. 8 or 16-24, got {text!r}") from None
    if not 1 <= sticks[0] <= sticks[1]:
        raise argparse.ArgumentTypeError(f"expected 1 <= LOW <= HIGH, got {text!r}")
    return sticks


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m discloss.demo",
        description="Train a small U-Net with the discriminative loss on synthetic scattered sticks, "
                    "cluster its embeddings into instances and report SBD and |DiC| on held-out images.",
    )
    parser.add_argument("--steps", type=int, default=600, help="training steps (default: %(default)s)")
    parser.add_argument("--time-limit", type=float, default=420.0,
                        help="stop training after this many seconds even if --steps are not done; the learning "
                             "rate schedule follows the clock then; 0: no limit (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=128,
                        help="image height and width; the sticks geometry scales with it (default: %(default)s, "
                             "the 256 x 256 data set at half size)")
    parser.add_argument("--sticks", type=_sticks_range, default=(8, 8), metavar="N or LOW-HIGH",
                        help="sticks per image, e.g. 8, or 16-24 for a number drawn per image (default: 8)")
    parser.add_argument("--embedding-dim", type=int, default=8, help="embedding dimension (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of Adam (default: %(default)s)")
    parser.add_argument("--delta-v", type=float, default=0.5, help="pull margin (default: %(default)s)")
    parser.add_argument("--delta-d", type=float, default=1.5, help="push margin (default: %(default)s)")
    parser.add_argument("--min-size", type=int, default=10,
                        help="smallest instance kept by the clustering, in pixels (default: %(default)s)")
    parser.add_argument("--min-seed-score", type=float, default=0.5,
                        help="seediness below which a pixel never seeds an instance, in the 'seediness' evaluation "
                             "(default: %(default)s: a pixel predicted within about 1.2*delta_v of its "
                             "instance's mean)")
    parser.add_argument("--eval-images", type=int, default=50, help="held-out images scored (default: %(default)s)")
    parser.add_argument("--out", default=os.path.join("runs", "demo"),
                        help="output directory for checkpoint.pt and panel.png (default: %(default)s)")
    parser.add_argument("--device", default=None,
                        help="torch device, e.g. cpu or cuda (default: cuda when available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the network's initialisation (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: whichever of torch's default, one per core, and 1 "
                             "trains faster, re-checked every 90 s: on cores busy with other work 1 thread can "
                             "be several times faster)")
    parser.add_argument("--log-every", type=float, default=10.0,
                        help="seconds between progress lines (default: %(default)s)")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "embedding_dim", "eval_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    if args.image_size < 16 or args.image_size % 8:
        parser.error(f"--image-size: expected a multiple of 8, >= 16, got {args.image_size}")
    if args.time_limit < 0:
        parser.error(f"--time-limit: expected >= 0 seconds, got {args.time_limit}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads: expected >= 1, got {args.threads}")
    if not 0.0 <= args.min_seed_score <= 1.0:
        parser.error(f"--min-seed-score: expected a probability in [0, 1], got {args.min_seed_score}")
    if args.min_size < 0:
        parser.error(f"--min-size: expected >= 0, got {args.min_size}")
    return args


def make_dataset(args: argparse.Namespace, length: int, seed: int) -> ScatteredSticks:
    """The demo's sticks at ``args.image_size`` with ``args.sticks`` sticks per image."""
    low, high = args.sticks
    return ScatteredSticks(length=length, image_size=args.image_size, num_sticks=low if low == high else (low, high),
                           seed=seed)


def main(argv: Optional[List[str]] = None) -> dict:
    """Run the demo; returns a dict with the mean SBD, mean |DiC|, timings and output paths."""
    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads_before)  # a caller's setting outlives the demo


def _run(args: argparse.Namespace) -> dict:
    # Under torchrun: one rank per process, DDP, each rank its share of every batch (discloss/distributed.py).
    context = distributed.setup(args.device)
    try:
        return _run_rank(args, context)
    finally:
        distributed.cleanup(context)


def _run_rank(args: argparse.Namespace, context: distributed.Context) -> dict:
    device = context.device
    print = _print_on_main_rank(context)
    if args.eval_images < context.world_size:
        raise SystemExit(f"--eval-images: expected at least one per process ({context.world_size}), "
                         f"got {args.eval_images}")
    thread_chooser = None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu" and torch.get_num_threads() > 1:
        thread_chooser = ThreadChooser([torch.get_num_threads(), 1], log=lambda line: print(line, flush=True))
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    train_set = make_dataset(args, args.steps * args.batch_size * context.world_size, TRAIN_SEED)
    held_out = make_dataset(args, args.eval_images, HELD_OUT_SEED)
    model = StickNet(embedding_dim=args.embedding_dim).to(device)
    sticks = "-".join(str(n) for n in dict.fromkeys(args.sticks))
    print(f"discloss demo: {args.steps} steps of {args.batch_size} images of {args.image_size}x{args.image_size} px "
          f"(ScatteredSticks, {sticks} sticks, at {args.image_size / 256:g}x the 256 px geometry) on {device}"
          + (f" ({torch.get_num_threads()} threads" + (" or 1, whichever is faster)" if thread_chooser else ")")
             if device.type == "cpu" else "")
          + (f", {context.world_size} processes (DDP, {args.batch_size} images each per step)"
             if context.distributed else ""), flush=True)
    print(f"model: U-Net widths {model.widths}, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"embedding dim {args.embedding_dim} and a seediness head, delta_v {args.delta_v}, delta_d {args.delta_d}",
          flush=True)

    start = time.perf_counter()
    steps_done = train(distributed.wrap_model(model, context), distributed.RankShard(train_set, context), args,
                       device, log=lambda line: print(line, flush=True), thread_chooser=thread_chooser,
                       context=context)
    train_seconds = time.perf_counter() - start
    checkpoint_path = os.path.join(args.out, "checkpoint.pt")
    if context.is_main:
        torch.save({"model": model.state_dict(), "embedding_dim": args.embedding_dim, "widths": model.widths,
                    "args": {**vars(args), "sticks": list(args.sticks)}}, checkpoint_path)

    evaluation_start = time.perf_counter()
    scores = evaluate(model, distributed.RankShard(held_out, context), args, device)
    # every image, every rank
    scores = {mode: (distributed.gather(sbd, context), distributed.gather(abs_dic, context))
              for mode, (sbd, abs_dic) in scores.items()}
    evaluate_seconds = time.perf_counter() - evaluation_start
    panel_path = os.path.join(args.out, "panel.png")
    if context.is_main:
        shown = held_out.batch(range(min(_PANEL_ROWS, len(held_out))))
        save_panel(panel_path, shown, predict(model, shown.image.to(device), args, PANEL_MODES), args.delta_v)
    sbd = scores["hashed"][0]
    result = {
        "steps": steps_done,
        "train_seconds": train_seconds,
        "evaluate_seconds": evaluate_seconds,
        "checkpoint": checkpoint_path,
        "panel": panel_path,
        "evaluated_images": len(sbd),
        "world_size": context.world_size,
    }
    # "sbd" and "abs_dic": hashed seeds, as before seediness existed.
    for mode, suffix in (("hashed", ""), ("seediness-order", "_seediness_order"), ("seediness", "_seediness"),
                         ("robust", "_robust")):
        sbd, abs_dic = scores[mode]
        result["sbd" + suffix] = float(sbd.mean())
        result["abs_dic" + suffix] = float(abs_dic.float().mean())
        print(f"held-out ({len(sbd)} images, {args.image_size}x{args.image_size}), {mode} seeds: "
              f"mean SBD {result['sbd' + suffix]:.3f}, mean |DiC| {result['abs_dic' + suffix]:.2f}", flush=True)
    print(f"time: training {train_seconds:.0f} s ({steps_done} steps), evaluation {evaluate_seconds:.1f} s; "
          f"saved {checkpoint_path} and {panel_path}", flush=True)
    return result


def _print_on_main_rank(context: distributed.Context):
    if context.is_main:
        return print
    return lambda *args, **kwargs: None
