"""End-to-end demo: train a small U-Net on scattered sticks with discloss.

    python -m discloss.demo            # the defaults: at most about 8 minutes on 2 CPU cores
    python -m discloss.demo --help

The network has two heads on a shared U-Net: a foreground logit (trained
with binary cross-entropy + Dice) and a per-pixel embedding (trained with the
discriminative loss). At test time the foreground mask selects the pixels
that ``cluster_embeddings`` groups into instances, and the result is scored
with Symmetric Best Dice (SBD) and |DiC| on 50 held-out images.

To fit the CPU budget the defaults train and evaluate at 128 x 128 pixels:
``ScatteredSticks(image_size=128)``, the 256 x 256 sticks geometry scaled by
1/2 (sticks 7.5 px wide, 40-50 px long). Pass ``--image-size 256`` for the
full size (on a GPU). Training runs 600 steps of 8 images, or stops after
``--time-limit`` (420 s) with the learning rate annealed on the clock, so a
slow or busy machine still finishes in time. Measured in four runs on 2
shared AMD EPYC cores busy with other work (load average 2-5): 533-600
steps, mean SBD 0.935-0.948, mean |DiC| 0.38-0.54, 6-8 minutes wall time in
all.

Outputs go to ``--out`` (default runs/demo): checkpoint.pt and panel.png
(per row: image, ground truth, predicted instances coloured after the
ground-truth instance they overlap most, and the embeddings projected to 2D
by PCA, coloured by ground truth, with a circle of radius delta_v around
each instance's mean).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import struct
import sys
import time
import zlib
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed, metrics
from .cluster import cluster_embeddings
from .data import ScatteredSticks
from .loss import discriminative_loss

__all__ = ["StickNet", "ThreadChooser", "main", "parse_args", "train", "evaluate"]

# Training and held-out samples come from data sets with different seeds.
_TRAIN_SEED = 0
_HELD_OUT_SEED = 1_000_003
_PANEL_ROWS = 4


# ----------------------------------------------------------------------------- model

class _ConvBlock(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class StickNet(nn.Module):
    """A small U-Net with a foreground head and an embedding head.

    Input: (B, 3, H, W) images, H and W divisible by 2**(len(widths) - 1).
    Two pixel-coordinate channels are appended inside, so that the embedding
    can depend on where a pixel is (two sticks of the same colour differ only
    by position). Returns (foreground logits (B, H, W), embeddings (B, E, H, W)).
    """

    def __init__(self, embedding_dim: int = 8, widths: Sequence[int] = (16, 32, 64, 128)) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.widths = tuple(widths)
        self.encoders = nn.ModuleList()
        in_channels = 3 + 2
        for width in self.widths:
            self.encoders.append(_ConvBlock(in_channels, width))
            in_channels = width
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for width in reversed(self.widths[:-1]):
            self.upsamplers.append(nn.ConvTranspose2d(in_channels, width, 2, stride=2))
            self.decoders.append(_ConvBlock(2 * width, width))
            in_channels = width
        self.foreground_head = nn.Conv2d(in_channels, 1, 1)
        self.embedding_head = nn.Conv2d(in_channels, embedding_dim, 1)

    def forward(self, images: torch.Tensor):
        batch, _, height, width = images.shape
        factor = 2 ** (len(self.widths) - 1)
        if height % factor or width % factor:
            raise ValueError(f"images: height and width must be divisible by {factor}, got {height}x{width}")
        rows = torch.linspace(-1.0, 1.0, height, device=images.device, dtype=images.dtype)
        cols = torch.linspace(-1.0, 1.0, width, device=images.device, dtype=images.dtype)
        grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij")).expand(batch, -1, -1, -1)
        x = torch.cat([images, grid], dim=1)
        skips = []
        for level, encoder in enumerate(self.encoders):
            if level > 0:
                x = F.max_pool2d(x, 2)
            x = encoder(x)
            skips.append(x)
        for upsample, decoder, skip in zip(self.upsamplers, self.decoders, reversed(skips[:-1])):
            x = decoder(torch.cat([upsample(x), skip], dim=1))
        return self.foreground_head(x).squeeze(1), self.embedding_head(x)


# ----------------------------------------------------------------------------- training

def _dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    probability = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1)
    intersection = (probability * target).sum(dim=1)
    # The +1 keeps images without foreground finite.
    return (1.0 - (2.0 * intersection + 1.0) / (probability.sum(dim=1) + target.sum(dim=1) + 1.0)).mean()


def _learning_rate(progress: float, peak: float, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` of training, then cosine decay to 1% of the peak."""
    if progress < warmup:
        return peak * max(progress / warmup, 0.02)
    progress = min((progress - warmup) / (1.0 - warmup), 1.0)
    return peak * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress)))


class ThreadChooser:
    """Runs CPU training with whichever thread count is fastest now, re-checked every so often.

    Why: PyTorch's OpenMP threads wait for each other at every operation, so
    when other programs keep the cores busy one descheduled thread stalls the
    others. On a busy 2-core machine a demo step took 2-5 s with 2 threads
    and 0.7-0.9 s with 1; on idle cores 2 threads are faster. So the
    candidates take turns for a few (real, not wasted) training steps, the
    fastest median wins, and the contest is held again every
    ``recheck_seconds``.
    """

    def __init__(self, candidates: Sequence[int], recheck_seconds: float = 90.0, probe_steps: int = 3,
                 log=print) -> None:
        self.candidates = list(dict.fromkeys(candidates))
        self.recheck_seconds = recheck_seconds
        self.probe_steps = probe_steps
        self.log = log
        self.chosen: Optional[int] = None
        self._start_probe()

    def _start_probe(self) -> None:
        # The first step after a switch is not timed: it pays for the switch.
        self._plan = [threads for threads in self.candidates for _ in range(self.probe_steps + 1)]
        self._times = {threads: [] for threads in self.candidates}
        self._previous: Optional[int] = None

    def before_step(self) -> None:
        if self._plan:
            threads = self._plan[0]
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
        elif time.perf_counter() >= self._recheck_at and len(self.candidates) > 1:
            self._start_probe()
            self.before_step()

    def settle(self) -> None:
        """Use the chosen thread count from now on (e.g. for evaluation), even if stopped mid-contest."""
        self._plan = []
        self._recheck_at = math.inf
        if self.chosen is not None:
            torch.set_num_threads(self.chosen)

    def after_step(self, seconds: float) -> None:
        if not self._plan:
            return
        threads = self._plan.pop(0)
        if self._previous == threads:
            self._times[threads].append(seconds)
        self._previous = threads
        if self._plan:
            return
        medians = {count: statistics.median(times) for count, times in self._times.items() if times}
        best = min(medians, key=medians.get)
        if best != self.chosen:
            timings = ", ".join(f"{count} thread{'s' if count > 1 else ''} {medians[count]:.2f} s"
                                for count in self.candidates if count in medians)
            self.log(f"using {best} CPU thread{'s' if best > 1 else ''} (median step time: {timings})")
        self.chosen = best
        torch.set_num_threads(best)
        self._recheck_at = time.perf_counter() + self.recheck_seconds


def train(model: StickNet, dataset: ScatteredSticks, args, device: torch.device, log=print,
          thread_chooser: Optional[ThreadChooser] = None, context: Optional[distributed.Context] = None) -> int:
    """Train for ``args.steps`` steps or ``args.time_limit`` seconds, whichever ends first.

    The learning rate schedule follows whichever of the two is further
    along, so that training stopped by the clock still ends annealed (on a
    slow or busy machine). Returns the number of steps done. Under torchrun
    (``context``), the ranks take the stop decision together.
    """
    try:
        return _train_steps(model, dataset, args, device, log, thread_chooser, context or distributed.Context())
    finally:
        if thread_chooser is not None:
            thread_chooser.settle()


def _train_steps(model, dataset, args, device, log, thread_chooser, context) -> int:
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    model.train()
    start = time.perf_counter()
    last_report = start
    totals = np.zeros(4)
    reported_steps = 0
    time_limit = args.time_limit if args.time_limit > 0 else math.inf
    for step in range(args.steps):
        step_start = time.perf_counter()
        progress = max(step / args.steps, (step_start - start) / time_limit)
        progress = distributed.agree_max(progress, context)  # every rank stops at the same step
        if progress >= 1.0:
            log(f"time limit of {args.time_limit:g} s reached after {step} of {args.steps} steps")
            return step
        if thread_chooser is not None:
            thread_chooser.before_step()
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(progress, args.lr, warmup=0.04)
        first = step * args.batch_size
        batch = dataset.batch(range(first, first + args.batch_size))
        images = batch.image.to(device)
        foreground = batch.foreground.to(device)
        labels = batch.labels.to(device)
        logits, embeddings = model(images)
        target = foreground.float()
        foreground_loss = F.binary_cross_entropy_with_logits(logits, target) + _dice_loss(logits, target)
        var, dist, reg = discriminative_loss(
            embeddings, labels, args.delta_v, args.delta_d, max_instances=dataset.num_sticks + 1
        )
        loss = foreground_loss + var + dist + reg
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        totals += [foreground_loss.item(), var.item(), dist.item(), reg.item()]
        reported_steps += 1
        now = time.perf_counter()
        if thread_chooser is not None:
            thread_chooser.after_step(now - step_start)
        if step + 1 == args.steps or now - last_report >= args.log_every:
            elapsed = now - start
            eta = min(elapsed / (step + 1) * (args.steps - step - 1), max(time_limit - elapsed, 0.0))
            mean = totals / reported_steps
            log(f"step {step + 1:5d}/{args.steps}  foreground {mean[0]:.3f}  var {mean[1]:.3f}  "
                f"dist {mean[2]:.3f}  reg {mean[3]:.3f}  [{elapsed:5.0f} s elapsed, ~{eta:.0f} s left]")
            totals[:] = 0
            reported_steps = 0
            last_report = now
    return args.steps


@torch.no_grad()
def predict(model: StickNet, images: torch.Tensor, args):
    """Foreground mask, instance labels, instance scores and embeddings for (B, 3, H, W) images."""
    model.eval()
    logits, embeddings = model(images)
    foreground = logits > 0.0
    labels, scores = cluster_embeddings(embeddings, foreground, delta_v=args.delta_v, delta_d=args.delta_d,
                                        min_size=args.min_size)
    return foreground, labels, scores, embeddings


@torch.no_grad()
def evaluate(model: StickNet, dataset: ScatteredSticks, args, device: torch.device):
    """SBD and |DiC| of every image of the data set: two (N,) tensors."""
    sbd, abs_dic = [], []
    for first in range(0, len(dataset), args.batch_size):
        batch = dataset.batch(range(first, min(first + args.batch_size, len(dataset))))
        foreground, labels, _, embeddings = predict(model, batch.image.to(device), args)
        labels = labels.cpu()
        sbd.append(metrics.symmetric_best_dice(labels, batch.labels))
        abs_dic.append(metrics.absolute_difference_in_count(labels, batch.labels))
    return torch.cat(sbd), torch.cat(abs_dic)


# ----------------------------------------------------------------------------- the PNG panel

def _palette(count: int) -> np.ndarray:
    """Distinct colours for labels 0..count-1 (0 is black), as uint8 (count, 3)."""
    colours = np.zeros((max(count, 1), 3), dtype=np.float64)
    golden = 0.618033988749895
    for label in range(1, count):
        hue = (label * golden) % 1.0
        # HSV -> RGB at full saturation and value.
        h6 = hue * 6.0
        x = 1.0 - abs(h6 % 2.0 - 1.0)
        sector = int(h6) % 6
        rgb = [(1, x, 0), (x, 1, 0), (0, 1, x), (0, x, 1), (x, 0, 1), (1, 0, x)][sector]
        colours[label] = rgb
    return (colours * 255).astype(np.uint8)


def _colour_labels(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    return palette[np.clip(labels, 0, len(palette) - 1)]


def _embedding_scatter(embeddings: np.ndarray, labels: np.ndarray, size: int, delta_v: float,
                       palette: np.ndarray) -> np.ndarray:
    """Foreground pixels' embeddings (E, H, W) projected to their first 2 principal axes, as an image."""
    canvas = np.full((size, size, 3), 255, dtype=np.uint8)
    mask = labels > 0
    if mask.sum() < 3:
        return canvas
    points = embeddings[:, mask].T.astype(np.float64)  # (n, E)
    point_labels = labels[mask]
    centre = points.mean(axis=0)
    _, _, axes = np.linalg.svd(points - centre, full_matrices=False)
    projected = (points - centre) @ axes[:2].T  # (n, 2); a projection only shortens distances
    extent = max(np.abs(projected).max(), 1e-6) * 1.1
    scale = (size / 2 - 1) / extent

    def to_pixel(xy):
        return np.clip(np.round(size / 2 + xy * scale).astype(int), 0, size - 1)

    pixels = to_pixel(projected)
    colours = palette[np.clip(point_labels, 0, len(palette) - 1)]
    dot = max(1, size // 128)  # dots of 2x2 pixels on a 256 px tile
    for dr in range(dot):
        for dc in range(dot):
            canvas[np.minimum(pixels[:, 1] + dr, size - 1), np.minimum(pixels[:, 0] + dc, size - 1)] = colours
    angles = np.linspace(0, 2 * np.pi, 90)
    circle = np.stack([np.cos(angles), np.sin(angles)], axis=1) * delta_v
    for label in np.unique(point_labels):
        mean = projected[point_labels == label].mean(axis=0)
        ring = to_pixel(mean + circle)
        canvas[ring[:, 1], ring[:, 0]] = 0
    return canvas


def write_png(path: str, image: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 array as an 8-bit RGB PNG (standard library only)."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    height, width, _ = image.shape
    rows = np.concatenate([np.zeros((height, 1), dtype=np.uint8), image.reshape(height, -1)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    with open(path, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
                     + chunk(b"IEND", b""))


def _match_to_truth(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Renumber predicted instances after the ground-truth instance each overlaps most.

    Only for display: matched instances then share the ground truth's
    colour. Each truth label is given once, largest overlaps first; the
    other instances get labels past the truth's.
    """
    num_pred, num_truth = int(predicted.max()) + 1, int(truth.max()) + 1
    overlap = np.zeros((num_pred, num_truth), dtype=np.int64)
    np.add.at(overlap, (predicted.ravel(), truth.ravel()), 1)
    overlap[0, :] = overlap[:, 0] = 0
    mapping = np.zeros(num_pred, dtype=np.int64)
    next_free = num_truth
    for flat in np.argsort(overlap, axis=None)[::-1]:
        p, t = divmod(int(flat), num_truth)
        if overlap[p, t] == 0:
            break
        if mapping[p] == 0 and t not in mapping:
            mapping[p] = t
    for p in range(1, num_pred):
        if mapping[p] == 0 and (predicted == p).any():
            mapping[p] = next_free
            next_free += 1
    return mapping[predicted]


def save_panel(path: str, batch, predicted: torch.Tensor, embeddings: torch.Tensor, delta_v: float,
               tile_size: int = 256) -> None:
    """One row per image of ``batch``: image | ground truth | predicted instances | embeddings in 2D.

    Images are enlarged (nearest neighbour) by an integer factor to about
    ``tile_size`` pixels; predicted instances take the colour of the
    ground-truth instance they overlap most.
    """
    rows = batch.image.shape[0]
    size = batch.image.shape[-1]
    zoom = max(1, tile_size // size)
    tile = size * zoom
    matched = [_match_to_truth(predicted[row].numpy(), batch.labels[row].numpy()) for row in range(rows)]
    count = max([int(batch.labels.max())] + [int(m.max()) for m in matched]) + 1
    palette = _palette(max(count, 2))
    gap = 4
    lines = []

    def enlarge(array: np.ndarray) -> np.ndarray:
        return array.repeat(zoom, axis=0).repeat(zoom, axis=1)

    for row in range(rows):
        image = (batch.image[row].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        truth = batch.labels[row].numpy()
        tiles = [
            enlarge(image),
            enlarge(_colour_labels(truth, palette)),
            enlarge(_colour_labels(matched[row], palette)),
            _embedding_scatter(embeddings[row].numpy(), truth, tile, delta_v, palette),
        ]
        spacer = np.full((tile, gap, 3), 255, dtype=np.uint8)
        line = np.concatenate(sum(([part, spacer] for part in tiles), [])[:-1], axis=1)
        lines.extend([line, np.full((gap, line.shape[1], 3), 255, dtype=np.uint8)])
    write_png(path, np.concatenate(lines[:-1], axis=0))


# ----------------------------------------------------------------------------- command line

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
    parser.add_argument("--embedding-dim", type=int, default=8, help="embedding dimension (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of Adam (default: %(default)s)")
    parser.add_argument("--delta-v", type=float, default=0.5, help="pull margin (default: %(default)s)")
    parser.add_argument("--delta-d", type=float, default=1.5, help="push margin (default: %(default)s)")
    parser.add_argument("--min-size", type=int, default=10,
                        help="smallest instance kept by the clustering, in pixels (default: %(default)s)")
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
    if args.min_size < 0:
        parser.error(f"--min-size: expected >= 0, got {args.min_size}")
    return args


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
    train_set = ScatteredSticks(length=args.steps * args.batch_size * context.world_size, image_size=args.image_size,
                                seed=_TRAIN_SEED)
    held_out = ScatteredSticks(length=args.eval_images, image_size=args.image_size, seed=_HELD_OUT_SEED)
    model = StickNet(embedding_dim=args.embedding_dim).to(device)
    print(f"discloss demo: {args.steps} steps of {args.batch_size} images of {args.image_size}x{args.image_size} px "
          f"(ScatteredSticks at {args.image_size / 256:g}x the 256 px geometry) on {device}"
          + (f" ({torch.get_num_threads()} threads" + (" or 1, whichever is faster)" if thread_chooser else ")")
             if device.type == "cpu" else "")
          + (f", {context.world_size} processes (DDP, {args.batch_size} images each per step)"
             if context.distributed else ""), flush=True)
    print(f"model: U-Net widths {model.widths}, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"embedding dim {args.embedding_dim}, delta_v {args.delta_v}, delta_d {args.delta_d}", flush=True)

    start = time.perf_counter()
    steps_done = train(distributed.wrap_model(model, context), distributed.RankShard(train_set, context), args,
                       device, log=lambda line: print(line, flush=True), thread_chooser=thread_chooser,
                       context=context)
    train_seconds = time.perf_counter() - start
    checkpoint_path = os.path.join(args.out, "checkpoint.pt")
    if context.is_main:
        torch.save({"model": model.state_dict(), "embedding_dim": args.embedding_dim, "widths": model.widths,
                    "args": vars(args)}, checkpoint_path)

    evaluation_start = time.perf_counter()
    sbd, abs_dic = evaluate(model, distributed.RankShard(held_out, context), args, device)
    sbd, abs_dic = distributed.gather(sbd, context), distributed.gather(abs_dic, context)  # every image, every rank
    evaluate_seconds = time.perf_counter() - evaluation_start
    panel_path = os.path.join(args.out, "panel.png")
    if context.is_main:
        shown = held_out.batch(range(min(_PANEL_ROWS, len(held_out))))
        _, predicted, _, embeddings = predict(model, shown.image.to(device), args)
        save_panel(panel_path, shown, predicted.cpu(), embeddings.cpu(), args.delta_v)
    result = {
        "sbd": float(sbd.mean()),
        "abs_dic": float(abs_dic.float().mean()),
        "steps": steps_done,
        "train_seconds": train_seconds,
        "evaluate_seconds": evaluate_seconds,
        "checkpoint": checkpoint_path,
        "panel": panel_path,
        "evaluated_images": len(sbd),
        "world_size": context.world_size,
    }
    print(f"held-out ({len(sbd)} images, {args.image_size}x{args.image_size}): "
          f"mean SBD {result['sbd']:.3f}, mean |DiC| {result['abs_dic']:.2f}", flush=True)
    print(f"time: training {train_seconds:.0f} s ({steps_done} steps), evaluation {evaluate_seconds:.1f} s; "
          f"saved {checkpoint_path} and {panel_path}", flush=True)
    return result


def _print_on_main_rank(context: distributed.Context):
    if context.is_main:
        return print
    return lambda *args, **kwargs: None


if __name__ == "__main__":
    main(sys.argv[1:])
