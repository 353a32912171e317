"""End-to-end demo: train a small U-Net on scattered sticks with discloss.

    python -m discloss.demo            # the defaults: at most about 8 minutes on 2 CPU cores
    python -m discloss.demo --help

The network has three heads on a shared U-Net: a foreground logit (trained
with binary cross-entropy + Dice), a per-pixel embedding (trained with the
discriminative loss) and a seediness logit (Fathi et al. 2017, "Semantic
instance segmentation via deep metric learning": how good a seed for the
clustering each pixel is; see ``seediness_loss``). At test time the
foreground mask selects the pixels that ``cluster_embeddings`` groups into
instances, and the result is scored with Symmetric Best Dice (SBD) and
|DiC| on 50 held-out images, once per seed mode: hashed (the clustering's
own pixel order), seediness-order (seeds in descending seediness) and
seediness (the same, among pixels of seediness >= ``--min-seed-score``
only).

To fit the CPU budget the defaults train and evaluate at 128 x 128 pixels:
``ScatteredSticks(image_size=128)``, the 256 x 256 sticks geometry scaled by
1/2 (sticks 7.5 px wide, 40-50 px long). Pass ``--image-size 256`` for the
full size (on a GPU), ``--sticks 16-24`` for the hard set. Training runs 600
steps of 8 images, or stops after ``--time-limit`` (420 s) with the learning
rate annealed on the clock, so a slow or busy machine still finishes in
time. Measured with the defaults in three runs (network seeds 0, 1, 2) on 2
AMD EPYC cores shared with other work (load average 2-6): 371-544 steps in
the 420 s, about 7.5 minutes in all; mean SBD over the 50 held-out images
0.926 / 0.922 / 0.938 with hashed seeds and 0.930 / 0.918 / 0.941 with
seediness (mean 0.929 and 0.930), |DiC| 0.49 and 0.48 on average: on this
easy set seediness changes little, because seeds are not what limits it
(clustering these networks' embeddings of the ground-truth foreground,
learned seediness gains 0.004 SBD and seeds chosen from the ground truth
only 0.016; benchmarks/results/cpu/cluster_demo_set.md).

Outputs go to ``--out`` (default runs/demo): checkpoint.pt and panel.png,
drawn with matplotlib: per row, the image, the ground truth, the instances
found with hashed and with seediness seeds (coloured after the ground-truth
instance they overlap most, with the image's SBD and DiC), the seediness
map, and the embeddings projected to 2D by PCA, coloured by ground truth,
with a circle of radius delta_v around each instance's mean.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed, metrics
from .cluster import cluster_embeddings
from .data import ScatteredSticks
from .loss import discriminative_loss

__all__ = ["StickNet", "ThreadChooser", "Prediction", "SEED_MODES", "evaluate", "main", "make_dataset", "parse_args",
           "predict", "save_panel", "seediness_loss", "seediness_target", "train"]

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
    """A small U-Net with a foreground head, an embedding head and a seediness head.

    Input: (B, 3, H, W) images, H and W divisible by 2**(len(widths) - 1).
    Two pixel-coordinate channels are appended inside, so that the embedding
    can depend on where a pixel is (two sticks of the same colour differ only
    by position). Returns (foreground logits (B, H, W), embeddings
    (B, E, H, W), seediness logits (B, H, W)); see ``seediness_loss``.
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
        # Seediness is about how far a pixel's embedding (linear in the
        # features) lies from its instance's mean: not a linear function of
        # the features, so this head has a hidden layer, and a 3x3 context
        # to see crossings and edges (Fathi et al. also give it its own
        # convolutions).
        self.seediness_head = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, 1, 1),
        )

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
        return self.foreground_head(x).squeeze(1), self.embedding_head(x), self.seediness_head(x).squeeze(1)


# ----------------------------------------------------------------------------- training

def _dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    probability = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1)
    intersection = (probability * target).sum(dim=1)
    # The +1 keeps images without foreground finite.
    return (1.0 - (2.0 * intersection + 1.0) / (probability.sum(dim=1) + target.sum(dim=1) + 1.0)).mean()


def seediness_target(embeddings: torch.Tensor, labels: torch.Tensor, delta_v: float) -> torch.Tensor:
    """How good a seed each pixel is: exp(-||x_i - mu_c||^2 / (2 delta_v^2)), in (0, 1].

    embeddings (B, E, H, W), labels (B, H, W) with 0 for background; mu_c is
    the mean embedding of pixel i's instance c in its image. 1 at the mean,
    0.61 at delta_v (the pull margin: a pixel trained to zero loss scores at
    least that) and 0.14 at 2*delta_v, where the clustering's window ends.
    Computed without gradient (x_i and mu_c detached): the head learns to
    predict where the embedding head puts a pixel, and does not pull the
    embeddings towards easy targets. Background pixels get 0.
    """
    with torch.no_grad():
        batch, dim = embeddings.shape[:2]
        x = embeddings.detach().float().reshape(batch, dim, -1).transpose(1, 2)  # (B, N, E)
        ids = labels.reshape(batch, -1).long()
        slots = int(ids.max()) + 1 if ids.numel() else 1
        segment = (torch.arange(batch, device=ids.device).unsqueeze(1) * slots + ids).reshape(-1)
        sums = x.new_zeros(batch * slots, dim).index_add_(0, segment, x.reshape(-1, dim))
        counts = x.new_zeros(batch * slots).index_add_(0, segment, x.new_ones(segment.numel()))
        means = sums / counts.clamp(min=1.0).unsqueeze(1)
        distance_sq = ((x.reshape(-1, dim) - means[segment]) ** 2).sum(dim=1)
        target = torch.exp(-distance_sq / (2.0 * delta_v * delta_v)) * (ids.reshape(-1) > 0)
        return target.reshape(labels.shape)


def seediness_loss(seediness_logits: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor,
                   delta_v: float) -> torch.Tensor:
    """Binary cross-entropy of the seediness head against ``seediness_target``, on foreground pixels.

    Cross-entropy against the soft target (rather than the squared error of
    the probability) because its gradient in the logit, p - t, does not
    vanish where the sigmoid saturates. Background pixels are left out: the
    clustering seeds only among foreground pixels, which the foreground head
    selects.
    """
    target = seediness_target(embeddings, labels, delta_v)
    foreground = (labels > 0).float()
    per_pixel = F.binary_cross_entropy_with_logits(seediness_logits, target, reduction="none")
    return (per_pixel * foreground).sum() / foreground.sum().clamp(min=1.0)


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
    totals = np.zeros(5)
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
        logits, embeddings, seediness_logits = model(images)
        target = foreground.float()
        foreground_loss = F.binary_cross_entropy_with_logits(logits, target) + _dice_loss(logits, target)
        var, dist, reg = discriminative_loss(
            embeddings, labels, args.delta_v, args.delta_d, max_instances=dataset.max_sticks + 1
        )
        seed_loss = seediness_loss(seediness_logits, embeddings, labels, args.delta_v)
        loss = foreground_loss + var + dist + reg + seed_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        totals += [foreground_loss.item(), var.item(), dist.item(), reg.item(), seed_loss.item()]
        reported_steps += 1
        now = time.perf_counter()
        if thread_chooser is not None:
            thread_chooser.after_step(now - step_start)
        if step + 1 == args.steps or now - last_report >= args.log_every:
            elapsed = now - start
            eta = min(elapsed / (step + 1) * (args.steps - step - 1), max(time_limit - elapsed, 0.0))
            mean = totals / reported_steps
            log(f"step {step + 1:5d}/{args.steps}  foreground {mean[0]:.3f}  var {mean[1]:.3f}  "
                f"dist {mean[2]:.3f}  reg {mean[3]:.3f}  seediness {mean[4]:.3f}  [{elapsed:5.0f} s elapsed, ~{eta:.0f} s left]")
            totals[:] = 0
            reported_steps = 0
            last_report = now
    return args.steps


# How cluster_embeddings picks its seeds: in its hashed pixel order; in
# descending seediness (the head's probability); or in descending seediness
# among the pixels whose seediness reaches --min-seed-score only.
SEED_MODES = ("hashed", "seediness-order", "seediness")
_PANEL_MODES = ("hashed", "seediness")


def _seed_options(mode: str, seediness: torch.Tensor, args) -> dict:
    if mode == "hashed":
        return {}
    if mode == "seediness-order":
        return {"seed_scores": seediness}
    if mode == "seediness":
        return {"seed_scores": seediness, "min_seed_score": args.min_seed_score}
    raise ValueError(f"seed mode: expected one of {SEED_MODES}, got {mode!r}")


class Prediction(NamedTuple):
    foreground: torch.Tensor  # (B, H, W) bool
    seediness: torch.Tensor  # (B, H, W) probability
    embeddings: torch.Tensor  # (B, E, H, W)
    labels: Dict[str, torch.Tensor]  # per seed mode: (B, H, W) int64 instances


@torch.no_grad()
def predict(model: StickNet, images: torch.Tensor, args, seed_modes: Sequence[str] = SEED_MODES) -> Prediction:
    """Foreground, seediness, embeddings and instances (clustered per seed mode) for (B, 3, H, W) images."""
    model.eval()
    logits, embeddings, seediness_logits = model(images)
    foreground = logits > 0.0
    seediness = torch.sigmoid(seediness_logits)
    labels = {}
    for mode in seed_modes:
        labels[mode], _ = cluster_embeddings(embeddings, foreground, delta_v=args.delta_v, delta_d=args.delta_d,
                                             min_size=args.min_size, **_seed_options(mode, seediness, args))
    return Prediction(foreground, seediness, embeddings, labels)


@torch.no_grad()
def evaluate(model: StickNet, dataset: ScatteredSticks, args, device: torch.device,
             seed_modes: Sequence[str] = SEED_MODES) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Per seed mode, SBD and |DiC| of every image of the data set: two (N,) tensors."""
    sbd = {mode: [] for mode in seed_modes}
    abs_dic = {mode: [] for mode in seed_modes}
    for first in range(0, len(dataset), args.batch_size):
        batch = dataset.batch(range(first, min(first + args.batch_size, len(dataset))))
        prediction = predict(model, batch.image.to(device), args, seed_modes)
        for mode in seed_modes:
            labels = prediction.labels[mode].cpu()
            sbd[mode].append(metrics.symmetric_best_dice(labels, batch.labels))
            abs_dic[mode].append(metrics.absolute_difference_in_count(labels, batch.labels))
    return {mode: (torch.cat(sbd[mode]), torch.cat(abs_dic[mode])) for mode in seed_modes}


# ----------------------------------------------------------------------------- the panel

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


def _label_colours(count: int) -> np.ndarray:
    """(count, 3) RGB in [0, 1]: black for 0, then well-separated hues (golden-ratio steps)."""
    import matplotlib.colors

    hues = (np.arange(count) * 0.618033988749895) % 1.0
    colours = matplotlib.colors.hsv_to_rgb(np.stack([hues, np.ones(count), np.ones(count)], axis=1))
    colours[0] = 0.0
    return colours


def _draw_embeddings(axes, embeddings: np.ndarray, truth: np.ndarray, delta_v: float, colours: np.ndarray) -> None:
    """Foreground pixels' embeddings (E, H, W) on their first two principal axes, coloured by ground truth.

    The projection is orthonormal, so distances can only shrink and a
    circle of radius delta_v around each instance's projected mean has the
    true scale of the pull margin.
    """
    from matplotlib.patches import Circle

    mask = truth > 0
    axes.set_aspect("equal")
    axes.set_xticks([])
    axes.set_yticks([])
    if mask.sum() < 3:
        return
    points = embeddings[:, mask].T.astype(np.float64)
    point_labels = truth[mask]
    centred = points - points.mean(axis=0)
    _, _, principal = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ principal[:2].T
    axes.scatter(projected[:, 0], projected[:, 1], s=1, c=colours[point_labels], linewidths=0, rasterized=True)
    for label in np.unique(point_labels):
        mean = projected[point_labels == label].mean(axis=0)
        axes.add_patch(Circle(tuple(mean), delta_v, fill=False, edgecolor="black", linewidth=0.8))
    axes.autoscale_view()


def save_panel(path: str, batch, prediction: Prediction, delta_v: float, seed_modes: Sequence[str] = _PANEL_MODES,
               tile_inches: float = 2.4) -> None:
    """One row per image of ``batch``, one titled column per view, drawn with matplotlib.

    Columns: image | ground truth | instances found per seed mode (coloured
    after the ground-truth instance each overlaps most, with the image's
    SBD and DiC) | seediness | embeddings in 2D with circles of radius
    delta_v around the instance means.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = batch.image.shape[0]
    truth_maps = [batch.labels[row].numpy() for row in range(rows)]
    predicted = {mode: prediction.labels[mode].cpu() for mode in seed_modes}
    matched = {mode: [_match_to_truth(predicted[mode][row].numpy(), truth_maps[row]) for row in range(rows)]
               for mode in seed_modes}
    count = max([int(batch.labels.max())] + [int(m.max()) for maps in matched.values() for m in maps]) + 1
    colours = _label_colours(max(count, 2))
    titles = (["image", "ground truth"] + [f"instances, {mode} seeds" for mode in seed_modes]
              + ["seediness (foreground)", "embeddings, PCA; circles: delta_v"])
    figure = Figure(figsize=(tile_inches * len(titles), tile_inches * rows + 0.4), dpi=100)
    FigureCanvasAgg(figure)
    grid = figure.subplots(rows, len(titles), squeeze=False)
    # Seediness only where the network sees foreground (seeds come from there).
    seediness = np.where(prediction.foreground.cpu().numpy(), prediction.seediness.cpu().numpy(), np.nan)
    seediness_colours = matplotlib.colormaps["viridis"].with_extremes(bad="black")
    embeddings = prediction.embeddings.cpu().numpy()
    for row in range(rows):
        cells = iter(grid[row])
        axes = next(cells)
        axes.imshow(batch.image[row].permute(1, 2, 0).numpy(), interpolation="nearest")
        axes = next(cells)
        axes.imshow(colours[truth_maps[row]], interpolation="nearest")
        axes.set_xlabel(f"{len(np.unique(truth_maps[row])) - 1} instances", fontsize=8)
        for mode in seed_modes:
            axes = next(cells)
            axes.imshow(colours[matched[mode][row]], interpolation="nearest")
            pred_row, gt_row = predicted[mode][row:row + 1], batch.labels[row:row + 1]
            sbd = float(metrics.symmetric_best_dice(pred_row, gt_row)[0])
            dic = int(metrics.difference_in_count(pred_row, gt_row)[0])
            axes.set_xlabel(f"SBD {sbd:.3f}, DiC {dic:+d}", fontsize=8)
        axes = next(cells)
        # Stretched to the image's own range: a trained head's values span a narrow band.
        shown = seediness[row][np.isfinite(seediness[row])]
        low, high = (np.percentile(shown, [2, 98]) if shown.size else (0.0, 1.0))
        high = max(high, low + 1e-3)
        axes.imshow(seediness[row], cmap=seediness_colours, vmin=low, vmax=high, interpolation="nearest")
        axes.set_xlabel(f"{low:.2f} (dark) to {high:.2f} (yellow)", fontsize=8)
        _draw_embeddings(next(cells), embeddings[row], truth_maps[row], delta_v, colours)
        for axes in grid[row][:-1]:
            axes.set_xticks([])
            axes.set_yticks([])
    for axes, title in zip(grid[0], titles):
        axes.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path)


# ----------------------------------------------------------------------------- command line

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
    train_set = make_dataset(args, args.steps * args.batch_size * context.world_size, _TRAIN_SEED)
    held_out = make_dataset(args, args.eval_images, _HELD_OUT_SEED)
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
        save_panel(panel_path, shown, predict(model, shown.image.to(device), args, _PANEL_MODES), args.delta_v)
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
    for mode, suffix in (("hashed", ""), ("seediness-order", "_seediness_order"), ("seediness", "_seediness")):
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


if __name__ == "__main__":
    main(sys.argv[1:])
