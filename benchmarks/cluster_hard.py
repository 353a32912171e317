"""Clustering on hard sticks: discloss (hashed, seediness, oracle seeds) vs scikit-learn.

    python benchmarks/cluster_hard.py                                      # synthetic embeddings only
    python benchmarks/cluster_hard.py --images 6 --name cluster_touching   # (the run in results/cpu)
    python benchmarks/cluster_hard.py --checkpoints runs/hard_s*/checkpoint.pt   # and trained networks
    python benchmarks/cluster_hard.py --image-size 128 --sticks 8 8 --name cluster_demo_set \
        --checkpoints runs/demo/checkpoint.pt                       # the demo's own (easy) set

The hard set: full 256 x 256 ScatteredSticks with 16-24 sticks per image
(many crossings), held-out images (the demo's held-out seed). Every method
clusters the same embeddings of the same foreground pixels (the ground-truth
foreground, so that only the clustering differs) and is scored with SBD and
|DiC| against the ground truth. Embeddings come from

- synthetic (``packed_embeddings``): instance means packed about
  2-2.5*delta_d apart, as the push term leaves them; 15% stray pixels a
  quarter to half of the way to the nearest other instance; no network,
  hence no seediness row;
- synthetic touching (``touching_embeddings``): close means, pixels near a
  touching instance pulled partway to its mean, strays; and the same with
  the pulls alone ("boundary only");
- each ``--checkpoints`` file: a demo network (``python -m discloss.demo
  --image-size 256 --sticks 16-24``), its embeddings and seediness head.

Methods, image by image on one CPU thread each (torch and, through
threadpoolctl, scikit-learn's native code):

- discloss hashed: ``cluster_embeddings`` as it is by default;
- discloss seediness order: ``seed_scores`` = the network's seediness
  probability (seeds in descending seediness);
- discloss seediness: the same with ``min_seed_score`` = --min-seed-score
  (0.5, as the demo): pixels below it never seed;
- discloss oracle order / oracle: the same with ``seed_scores`` =
  exp(-||x_i - mu_c||^2 / (2 delta_v^2)), mu_c the ground-truth instance
  means: the target the seediness head is trained to predict (a reference
  for what a perfect seediness head would give);
- discloss density seeds, + join, + nearest (all points), + nearest,
  + vote (sequential search), + parallel search, + split: the robust
  clustering's options added one at a time (``density_seeds``,
  ``join="density"``, ``assign="nearest"``, ``mode_points=4096``,
  ``neighbour_vote=16``, ``search="parallel"``, ``split_instances=True``);
- discloss robust: + split with ``refine="quickshift"`` instead of the
  neighbour vote (``neighbour_vote=0``): it uses the image layout (a 3 x 3
  vote on the pixels that the quick shift moved);
- sklearn MeanShift(bandwidth=2*delta_v, bin_seeding=True), the same window
  as ours;
- sklearn HDBSCAN(min_cluster_size=N) for each N of
  --hdbscan-min-cluster-size (the verdicts take the best); its noise points
  join the cluster whose mean is nearest to them, as ``cluster_embeddings``
  does with the points no instance claimed;
- 3x3 vote on HDBSCAN's best size and on discloss + split: the image vote
  of ``refine="quickshift"`` applied to every foreground pixel of their
  labels (each takes the label most common in its 3 x 3 window when one is
  more common than every other), time included: what the image layout alone
  gives a method that does not use it.

Times: per image, wall time of the clustering call alone (the network's
forward pass excluded), median over the images; discloss also as the whole
batch in one call. Writes cluster_hard.md, cluster_hard.csv and
cluster_hard.png to benchmarks/results/<cpu|cuda>/.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cluster_vs_sklearn import HELD_OUT_SEED, machine_description  # noqa: E402

from discloss import metrics  # noqa: E402
from discloss.cluster import cluster_embeddings  # noqa: E402
from discloss.data import ScatteredSticks  # noqa: E402

PACKED = "synthetic, 15% stray"
TOUCHING = "synthetic, touching"
BOUNDARY = "synthetic, boundary only"
# The robust clustering: each idea is also run alone, added one at a time. The quick-shift
# refinement replaces the neighbour vote (faster, and as good or better on every set).
SPLIT = dict(density_seeds=True, join="density", assign="nearest", mode_points=4096, neighbour_vote=16,
             search="parallel", split_instances=True)
ROBUST = dict(SPLIT, neighbour_vote=0, refine="quickshift")
ABLATION = {
    "discloss density seeds": dict(density_seeds=True),
    "discloss density seeds + join": dict(density_seeds=True, join="density"),
    "discloss + nearest, all points": dict(density_seeds=True, join="density", assign="nearest"),
    "discloss + nearest": dict(density_seeds=True, join="density", assign="nearest", mode_points=4096),
    "discloss + vote (sequential search)": dict(SPLIT, search="sequential", split_instances=False),
    "discloss + parallel search": dict(SPLIT, split_instances=False),
    "discloss + split": SPLIT,
    "discloss robust": ROBUST,
}
# The image vote of refine="quickshift" applied to every foreground pixel of another method's labels:
# what the image layout alone gives a method that does not use it.
VOTED = ("discloss + split", "sklearn HDBSCAN, the best size")
NETWORK_ONLY = ("discloss seediness order", "discloss seediness")
DISCLOSS = ("discloss hashed", "discloss seediness order", "discloss seediness", "discloss oracle order",
            "discloss oracle") + tuple(ABLATION)


def packed_embeddings(labels: torch.Tensor, dim: int, delta_v: float, delta_d: float, seed: int,
                      stray_fraction: float = 0.15) -> torch.Tensor:
    """Embeddings of a network trained near the margins, with stray pixels at crossings.

    The push term stops at 2*delta_d, so a trained network leaves instance
    means not much further apart than that: here they are drawn one by one
    from a Gaussian that widens only when a draw keeps failing to land
    2*delta_d from the others, so nearest means sit about 2-2.5*delta_d
    apart. Most pixels lie within 1.2*delta_v of their mean;
    ``stray_fraction`` of them (the pixels a network gets wrong where sticks
    cross) lie a fraction t ~ U(0.25, 0.5) of the way to the nearest other
    instance's mean, plus the same noise: up to halfway, where no clustering
    can tell which instance they belong to.
    """
    generator = torch.Generator().manual_seed(seed)
    batch, num_labels = labels.shape[0], int(labels.max()) + 1
    centres = torch.zeros(batch, num_labels, dim)
    for b in range(batch):
        found, scale = [], delta_d
        while len(found) < num_labels:
            for _ in range(50):
                candidate = torch.randn(dim, generator=generator) * scale
                if all(float((candidate - other).norm()) >= 2 * delta_d for other in found):
                    found.append(candidate)
                    break
            else:
                scale *= 1.1
        centres[b] = torch.stack(found)
    # The nearest other instance (background, label 0, is never chosen).
    gaps = torch.cdist(centres, centres)
    gaps[:, :, 0] = torch.inf
    gaps.diagonal(dim1=1, dim2=2).fill_(torch.inf)
    nearest = gaps.argmin(dim=2)  # (B, num_labels)
    image_ids = torch.arange(batch).reshape(batch, 1, 1)
    means = centres[image_ids, labels]  # (B, H, W, E)
    neighbours = centres[image_ids, nearest[image_ids, labels]]
    direction = torch.randn(means.shape, generator=generator)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    noise = direction * torch.rand(labels.shape + (1,), generator=generator) * 1.2 * delta_v
    stray = torch.rand(labels.shape + (1,), generator=generator) < stray_fraction
    along = 0.25 + 0.25 * torch.rand(labels.shape + (1,), generator=generator)
    pixels = means + noise + torch.where(stray, along * (neighbours - means), torch.zeros_like(means))
    return pixels.permute(0, 3, 1, 2).contiguous()


def touching_embeddings(labels: torch.Tensor, dim: int, delta_v: float, delta_d: float, seed: int,
                        close_fraction: float = 0.2, stray_fraction: float = 0.04, pull: float = 0.45,
                        reach: float = 4.0) -> torch.Tensor:
    """Embeddings with the three flaws of a network's where instances touch.

    - close means: each instance after the first is, with probability
      ``close_fraction``, placed 1.3-2*delta_d from a mean already drawn
      (an undertrained push), the others at least 2*delta_d from all;
    - boundary pixels: a pixel whose nearest pixel of another instance is d
      pixels away moves a fraction t = pull * u * (1 - (d - 1) / reach),
      u ~ U(0.6, 1), of the way to that instance's mean (t = 0 beyond
      ``reach`` + 1 px): the receptive field straddles both instances, so
      the network's answer lies partway between them;
    - strays: ``stray_fraction`` of the pixels moved 2-4*delta_v in a random
      direction, away from every instance.

    Every pixel also lies within 1.2*delta_v of where the rest puts it (as in
    ``packed_embeddings``). With ``pull`` < 0.5 a boundary pixel still lies
    nearer its own mean than the other's, up to that noise.
    """
    from scipy import ndimage

    generator = torch.Generator().manual_seed(seed)
    batch, height, width = labels.shape
    num_labels = int(labels.max()) + 1
    centres = torch.zeros(batch, num_labels, dim)
    for b in range(batch):
        found = [torch.randn(dim, generator=generator) * delta_d]
        scale = delta_d
        while len(found) < num_labels:
            if float(torch.rand((), generator=generator)) < close_fraction:
                anchor = found[int(torch.randint(len(found), (), generator=generator))]
                direction = torch.randn(dim, generator=generator)
                gap = (1.3 + 0.7 * float(torch.rand((), generator=generator))) * delta_d
                candidate = anchor + direction / direction.norm() * gap
                if all(float((candidate - other).norm()) >= 1.3 * delta_d - 1e-6 for other in found):
                    found.append(candidate)
                continue
            for _ in range(50):
                candidate = torch.randn(dim, generator=generator) * scale
                if all(float((candidate - other).norm()) >= 2 * delta_d for other in found):
                    found.append(candidate)
                    break
            else:
                scale *= 1.1
        centres[b] = torch.stack(found)
    image_ids = torch.arange(batch).reshape(batch, 1, 1)
    pixels = centres[image_ids, labels]  # (B, H, W, E)
    # Per pixel, the nearest other instance and its distance in pixels.
    target = torch.zeros(batch, height, width, dtype=torch.long)
    gap_px = torch.full((batch, height, width), float("inf"))
    for b in range(batch):
        image_labels = labels[b].numpy()
        for k in range(1, int(image_labels.max()) + 1):
            distance = torch.from_numpy(ndimage.distance_transform_edt(image_labels != k)).float()
            closer = (distance < gap_px[b]) & (labels[b] != k) & (labels[b] > 0)
            gap_px[b] = torch.where(closer, distance, gap_px[b])
            target[b] = torch.where(closer, torch.full_like(target[b], k), target[b])
    strength = (1.0 - (gap_px - 1.0) / reach).clamp(0.0, 1.0)
    u = 0.6 + 0.4 * torch.rand(labels.shape, generator=generator)
    along = (pull * u * strength).unsqueeze(-1)
    pixels = pixels + along * (centres[image_ids, target] - pixels)
    direction = torch.randn(pixels.shape, generator=generator)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    pixels = pixels + direction * torch.rand(labels.shape + (1,), generator=generator) * 1.2 * delta_v
    stray = torch.rand(labels.shape + (1,), generator=generator) < stray_fraction
    away = torch.randn(pixels.shape, generator=generator)
    away = away / away.norm(dim=-1, keepdim=True) * (2 + 2 * torch.rand(labels.shape + (1,), generator=generator))
    pixels = pixels + torch.where(stray, away * delta_v, torch.zeros_like(pixels))
    return pixels.permute(0, 3, 1, 2).contiguous()


def load_network(path: str):
    from discloss.demo import StickNet

    checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    model = StickNet(embedding_dim=checkpoint["embedding_dim"], widths=checkpoint["widths"])
    model.load_state_dict(checkpoint["model"])
    return model.eval()


@torch.no_grad()
def network_outputs(model, images: torch.Tensor, batch_size: int = 4):
    embeddings, seediness = [], []
    for first in range(0, images.shape[0], batch_size):
        _, embedding, seediness_logits = model(images[first:first + batch_size])
        embeddings.append(embedding)
        seediness.append(torch.sigmoid(seediness_logits))
    return torch.cat(embeddings), torch.cat(seediness)


def join_noise_to_nearest(points: np.ndarray, found: np.ndarray) -> np.ndarray:
    """HDBSCAN's noise (-1) joins the cluster with the nearest mean; 0-based labels in, 1-based out."""
    clusters = np.unique(found[found >= 0])
    if clusters.size == 0:
        return np.ones_like(found)  # everything noise: one instance
    means = np.stack([points[found == c].mean(axis=0) for c in clusters])
    noise = found < 0
    if noise.any():
        distance = ((points[noise][:, None, :] - means[None]) ** 2).sum(axis=2)
        found = found.copy()
        found[noise] = clusters[distance.argmin(axis=1)]
    return found + 1


def image_vote(labels: torch.Tensor) -> torch.Tensor:
    """Each foreground pixel of ``labels`` (H, W) (0: background) takes the label most common among
    the foreground pixels of its 3 x 3 window (itself included) when one is more common than every
    other; all read the labels as given (the vote of refine="quickshift", on every pixel)."""
    count = int(labels.max()) + 1
    one_hot = torch.nn.functional.one_hot(labels, count).permute(2, 0, 1).float()[1:]  # background does not vote
    votes = torch.nn.functional.conv2d(one_hot.unsqueeze(1), torch.ones(1, 1, 3, 3), padding=1).squeeze(1)
    if votes.shape[0] == 0:
        return labels
    most, winner = votes.max(dim=0)
    single = (votes == most).sum(dim=0) == 1
    return torch.where((labels > 0) & single & (most > 0), winner + 1, labels)


def time_per_image(cluster_one, images: int):
    """Labels (B, H, W) and the per-image wall times of ``cluster_one(b)`` -> (H, W) labels."""
    cluster_one(0)  # warm-up
    labels, seconds = [], []
    for b in range(images):
        start = time.perf_counter()
        labels.append(cluster_one(b))
        seconds.append(time.perf_counter() - start)
    return torch.stack(labels), seconds


def hdbscan_name(size: int) -> str:
    return f"sklearn HDBSCAN (min_cluster_size {size})"


def run_source(name, embeddings, seed_scores, batch, args, sklearn_cluster):
    """Rows (source, method, mean SBD, mean |DiC|, median ms/image, batched ms/image) for one embedding source."""
    from discloss.demo import seediness_target

    foreground = batch.foreground
    options = dict(delta_v=args.delta_v, delta_d=args.delta_d, min_size=args.min_size)
    oracle = seediness_target(embeddings, batch.labels, args.delta_v)
    settings = {"discloss hashed": dict(), "discloss seediness order": dict(seed_scores=seed_scores),
                "discloss seediness": dict(seed_scores=seed_scores, min_seed_score=args.min_seed_score),
                "discloss oracle order": dict(seed_scores=oracle),
                "discloss oracle": dict(seed_scores=oracle, min_seed_score=args.min_seed_score), **ABLATION}
    points = [embeddings[b][:, foreground[b]].T.double().numpy() for b in range(args.images)]
    methods = [m for m in DISCLOSS if seed_scores is not None or m not in NETWORK_ONLY]
    methods += ["sklearn MeanShift"] + [hdbscan_name(size) for size in args.hdbscan_min_cluster_size]
    rows, found = [], {}
    for method in methods:
        batched_ms = float("nan")
        if method.startswith("discloss"):
            setting = settings[method]

            def per_image(b, setting=setting):
                return {k: v[b:b + 1] if isinstance(v, torch.Tensor) else v for k, v in setting.items()}

            def cluster_one(b, per_image=per_image):
                return cluster_embeddings(embeddings[b:b + 1], foreground[b:b + 1], **options, **per_image(b))[0][0]

            labels, seconds = time_per_image(cluster_one, args.images)
            batched = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                cluster_embeddings(embeddings, foreground, **options, **setting)
                batched.append(time.perf_counter() - start)
            if batched:
                batched_ms = statistics.median(batched) / args.images * 1e3
        else:
            if method == "sklearn MeanShift":
                def fit(b):
                    return sklearn_cluster.MeanShift(bandwidth=2 * args.delta_v, bin_seeding=True).fit_predict(
                        points[b]) + 1
            else:
                size = int(method.rsplit(" ", 1)[1].rstrip(")"))

                def fit(b, size=size):
                    found = sklearn_cluster.HDBSCAN(min_cluster_size=size, copy=True).fit_predict(points[b])
                    return join_noise_to_nearest(points[b], found)

            def cluster_one(b, fit=fit):
                out = torch.zeros_like(batch.labels[b])
                out[foreground[b]] = torch.from_numpy(np.asarray(fit(b))).long()
                return out

            labels, seconds = time_per_image(cluster_one, args.images)
        rows.append(score_row(name, method, labels, seconds, batched_ms, batch))
        found[method] = (labels, seconds)
    # The image vote on the labels of our robust row without the refinement, and of HDBSCAN's best size.
    hdbscan = [row for row in rows if row[1].startswith("sklearn HDBSCAN")]
    for method in VOTED:
        if method.startswith("sklearn"):
            if not hdbscan:
                continue
            best = max(hdbscan, key=lambda row: row[2])[1]
            label = f"3x3 vote on {best}"
        else:
            best, label = method, f"3x3 vote on {method}"
        labels, seconds = found[best]
        image_vote(labels[0])  # warm-up
        voted, vote_seconds = [], []
        for b in range(args.images):
            start = time.perf_counter()
            voted.append(image_vote(labels[b]))
            vote_seconds.append(time.perf_counter() - start)
        rows.append(score_row(name, label, torch.stack(voted), [s + v for s, v in zip(seconds, vote_seconds)],
                              float("nan"), batch))
    return rows


def score_row(name, method, labels, seconds, batched_ms, batch):
    """(source, method, mean SBD, mean |DiC|, median ms/image, batched ms/image), printed."""
    sbd = metrics.symmetric_best_dice(labels, batch.labels).mean().item()
    abs_dic = metrics.absolute_difference_in_count(labels, batch.labels).float().mean().item()
    ms = statistics.median(seconds) * 1e3
    print(f"  {name:>24} | {method:<40} SBD {sbd:.4f}  |DiC| {abs_dic:5.2f}  {ms:9.1f} ms/image"
          + (f"  (whole batch {batched_ms:.1f} ms/image)" if batched_ms == batched_ms else ""), flush=True)
    return (name, method, sbd, abs_dic, ms, batched_ms)


def summarise(rows):
    """Per method, the mean over the network sources of SBD, |DiC| and ms/image."""
    summary = []
    networks = [row for row in rows if not row[0].startswith("synthetic")]
    for method in dict.fromkeys(row[1] for row in networks):
        chosen = [row for row in networks if row[1] == method]
        summary.append((f"networks (mean of {len(chosen)})", method,
                        *(statistics.mean(row[i] for row in chosen) for i in (2, 3, 4, 5))))
    return summary


def verdicts(rows):
    """Per source: the robust clustering against the old default, MeanShift and HDBSCAN's best
    min_cluster_size, and the issue's targets (SBD >= HDBSCAN's best, >= 10x its speed)."""
    lines = []
    by_source = {}
    for row in rows:
        by_source.setdefault(row[0], {})[row[1]] = row
    for source, methods in by_source.items():
        ours, old = methods["discloss robust"], methods["discloss hashed"]
        lines.append(f"- {source}: discloss robust SBD {ours[2]:.4f}, |DiC| {ours[3]:.2f} in {ours[4]:.1f} ms/image; "
                     f"the old default (hashed) SBD {old[2]:.4f}, |DiC| {old[3]:.2f} in {old[4]:.1f} ms/image")
        hdbscan = [m for name, m in methods.items() if name.startswith("sklearn HDBSCAN")]
        others = ([max(hdbscan, key=lambda m: m[2])] if hdbscan else []) + (
            [methods["sklearn MeanShift"]] if "sklearn MeanShift" in methods else [])
        for them in others:
            line = (f"- {source}: vs {them[1]}{' (the best of the sizes tried)' if 'HDBSCAN' in them[1] else ''} "
                    f"SBD {them[2]:.4f} in {them[4]:.1f} ms/image: SBD {ours[2] - them[2]:+.4f}, "
                    f"{them[4] / ours[4]:.1f}x the speed image by image"
                    + (f" ({them[4] / ours[5]:.1f}x as one batch)" if ours[5] == ours[5] else ""))
            if "HDBSCAN" in them[1]:
                met = ours[2] >= them[2] and them[4] >= 10 * ours[4]
                line += f"; targets (SBD >= and >= 10x faster image by image) {'met' if met else 'NOT met'}"
            lines.append(line)
        for voted in [m for name, m in methods.items() if name.startswith("3x3 vote on")]:
            lines.append(f"- {source}: vs {voted[1]} (the image layout alone) SBD {voted[2]:.4f} in {voted[4]:.1f} "
                         f"ms/image: SBD {ours[2] - voted[2]:+.4f}, {voted[4] / ours[4]:.1f}x the speed image by image")
        for mode in ("discloss seediness order", "discloss seediness", "discloss oracle order", "discloss oracle"):
            if mode in methods:
                seed = methods[mode]
                lines.append(f"- {source}: {mode[9:]} vs hashed seeds: SBD {seed[2] - old[2]:+.4f}, "
                             f"|DiC| {seed[3] - old[3]:+.2f}")
    return lines


def plot(rows, path, title):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sources = list(dict.fromkeys(row[0] for row in rows))
    methods = list(dict.fromkeys(row[1] for row in rows))
    figure = Figure(figsize=(5.2 * len(sources), 6.2), dpi=100)
    FigureCanvasAgg(figure)
    axes_list = figure.subplots(1, len(sources), squeeze=False)[0]
    markers = "o<s>^DvPX*hd"
    style = {m: (markers[i % len(markers)], f"C{i % 10}") for i, m in enumerate(methods)}
    handles = {}
    for axes, source in zip(axes_list, sources):
        for row in rows:
            if row[0] == source:
                marker, colour = style[row[1]]
                handles[row[1]] = axes.scatter(row[4], row[2], marker=marker, color=colour, s=60)
        axes.set_xscale("log")
        axes.minorticks_off()
        axes.set_xlabel("ms per image (median, 1 CPU thread)")
        axes.set_ylabel("mean SBD")
        axes.set_title(source, fontsize=10)
        axes.grid(True, alpha=0.3)
    # One legend for all panels, below them, so that no point is hidden.
    figure.legend(list(handles.values()), list(handles), loc="lower center", ncol=4, fontsize=8)
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0.04 + 0.035 * ((len(handles) + 3) // 4), 1, 1))
    figure.savefig(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10, help="held-out images (default: %(default)s)")
    parser.add_argument("--checkpoints", nargs="*", default=[], help="demo checkpoints trained on the hard set")
    parser.add_argument("--image-size", type=int, default=256, help="(default: %(default)s)")
    parser.add_argument("--sticks", type=int, nargs=2, default=(16, 24), metavar=("LOW", "HIGH"),
                        help="sticks per image (default: 16 24)")
    parser.add_argument("--name", default="cluster_hard", help="results file names (default: %(default)s)")
    parser.add_argument("--no-synthetic", action="store_true", help="skip the synthetic embeddings")
    parser.add_argument("--synthetic", nargs="+", default=["packed", "touching", "boundary"],
                        choices=["packed", "touching", "boundary"],
                        help="synthetic sets: packed (15%% stray), touching (close means, boundary pixels pulled "
                             "toward the touching instance, 4%% strays), boundary (the pulls alone) "
                             "(default: all three)")
    parser.add_argument("--delta-v", type=float, default=0.5)
    parser.add_argument("--delta-d", type=float, default=1.5)
    parser.add_argument("--min-size", type=int, default=10, help="cluster_embeddings' min_size (default: %(default)s)")
    parser.add_argument("--min-seed-score", type=float, default=0.5, help="(default: %(default)s, as the demo)")
    parser.add_argument("--hdbscan-min-cluster-size", type=int, nargs="+", default=[25, 50, 100, 200],
                        help="sizes tried; the verdicts take the best (default: 25 50 100 200; sticks keep >= 400 "
                             "visible pixels)")
    parser.add_argument("--repeats", type=int, default=3, help="timed whole-batch calls of ours (default: %(default)s)")
    parser.add_argument("--out-dir", default=None, help="default: benchmarks/results/cpu")
    parser.add_argument("--replot", action="store_true", help="only redraw the plot from the CSV of an earlier run")
    args = parser.parse_args(argv)
    try:
        from sklearn import __version__ as sklearn_version
        from sklearn import cluster as sklearn_cluster
        from threadpoolctl import threadpool_limits
    except ImportError:
        print("this benchmark needs scikit-learn >= 1.3: pip install scikit-learn", file=sys.stderr)
        return 2
    out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu")
    title = f"clustering {args.image_size}x{args.image_size} sticks, {args.sticks[0]}-{args.sticks[1]} per image"
    if args.replot:
        with open(os.path.join(out_dir, args.name + ".csv")) as handle:
            rows = [(r[0], r[1], float(r[2]), float(r[3]), float(r[4]), float(r[5])) for r in list(csv.reader(handle))[1:]]
        plot(rows, os.path.join(out_dir, args.name + ".png"), title)
        return 0
    torch.set_num_threads(1)
    threadpool_limits(1)
    data = ScatteredSticks(length=args.images, image_size=args.image_size, num_sticks=tuple(args.sticks),
                           seed=HELD_OUT_SEED)
    batch = data.batch(range(args.images))
    pixels = int(batch.foreground.sum()) / args.images
    sticks = batch.labels.flatten(1).amax(dim=1).float().mean().item()
    print(f"{args.images} images of {args.image_size}x{args.image_size} px, {sticks:.1f} sticks and {pixels:.0f} foreground pixels per image; "
          f"{machine_description(torch.device('cpu'))}", flush=True)
    rows = []
    synthetic = [] if args.no_synthetic else args.synthetic
    if "packed" in synthetic:
        embeddings = packed_embeddings(batch.labels, 8, args.delta_v, args.delta_d, seed=0, stray_fraction=0.15)
        rows += run_source(PACKED, embeddings, None, batch, args, sklearn_cluster)
    if "touching" in synthetic:
        embeddings = touching_embeddings(batch.labels, 8, args.delta_v, args.delta_d, seed=0)
        rows += run_source(TOUCHING, embeddings, None, batch, args, sklearn_cluster)
    if "boundary" in synthetic:
        embeddings = touching_embeddings(batch.labels, 8, args.delta_v, args.delta_d, seed=0, close_fraction=0.0,
                                         stray_fraction=0.0)
        rows += run_source(BOUNDARY, embeddings, None, batch, args, sklearn_cluster)
    for path in args.checkpoints:
        embeddings, seediness = network_outputs(load_network(path), batch.image)
        name = os.path.basename(os.path.dirname(os.path.abspath(path))) or path
        rows += run_source(f"network {name}", embeddings, seediness, batch, args, sklearn_cluster)
    summary = summarise(rows) if args.checkpoints else []

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, args.name + ".csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["source", "method", "mean_sbd", "mean_abs_dic", "ms_per_image_median",
                         "ms_per_image_whole_batch"])
        writer.writerows(rows + summary)
    lines = ["| embeddings | method | mean SBD | mean abs DiC | ms / image (median) | ms / image, whole batch |",
             "|---|---|---:|---:|---:|---:|"]
    for source, method, sbd, abs_dic, ms, batched_ms in rows + summary:
        batched = f"{batched_ms:.1f}" if batched_ms == batched_ms else "-"
        lines.append(f"| {source} | {method} | {sbd:.4f} | {abs_dic:.2f} | {ms:.1f} | {batched} |")
    table = "\n".join(lines)
    verdict = "\n".join(verdicts(rows + summary))
    print("\n" + table + "\n\n" + verdict)
    with open(os.path.join(out_dir, args.name + ".md"), "w") as handle:
        handle.write(f"# Clustering {args.image_size}x{args.image_size} sticks ({args.sticks[0]}-{args.sticks[1]} per "
                     "image): discloss vs scikit-learn\n\n")
        handle.write(f"- data: {args.images} held-out ScatteredSticks images, {args.image_size}x{args.image_size} px, "
                     f"{args.sticks[0]}-{args.sticks[1]} sticks "
                     f"({sticks:.1f} on average), {pixels:.0f} foreground pixels per image (ground-truth mask)\n")
        descriptions = {
            "packed": "synthetic, 15% stray: dimension 8, means packed about 2-2.5*delta_d apart, 15% stray pixels "
                      "1/4-1/2 of the way to the nearest other instance (packed_embeddings)",
            "touching": "synthetic, touching: 20% of the means only 1.3-2*delta_d from another, pixels within 5 px "
                        "of a touching instance pulled up to 0.45 of the way to its mean, 4% strays 2-4*delta_v "
                        "off (touching_embeddings)",
            "boundary": "synthetic, boundary only: the touching set's pulls alone",
        }
        sources = [descriptions[name] for name in ([] if args.no_synthetic else args.synthetic)]
        if args.checkpoints:
            sources.append(f"{len(args.checkpoints)} demo network(s) trained on this set: {', '.join(args.checkpoints)}")
        handle.write("- sources: " + "; ".join(sources) + "\n")
        handle.write(f"- discloss: delta_v {args.delta_v:g}, delta_d {args.delta_d:g}, min_size {args.min_size}, "
                     f"min_seed_score {args.min_seed_score:g} (rows without 'order'), "
                     f"window and claim radius 2*delta_v; robust = {ROBUST} (it uses the image layout); the "
                     f"rows above it add the options of + split = {SPLIT} one at a time; '3x3 vote on': the image "
                     f"vote of refine='quickshift' on every foreground pixel of those labels; MeanShift bandwidth 2*delta_v, bin_seeding; HDBSCAN min_cluster_size "
                     f"{' '.join(map(str, args.hdbscan_min_cluster_size))}, other options default, noise joins the "
                     "nearest cluster mean\n")
        handle.write(f"- machine: {machine_description(torch.device('cpu'))} (shared with other work: times are "
                     f"noisy); torch {torch.__version__}, scikit-learn {sklearn_version}, Python "
                     f"{platform.python_version()}; 1 thread for every method\n")
        handle.write(f"- times: per image, the clustering call alone, median over the {args.images} images after a "
                     f"warm-up; whole batch: median of {args.repeats} calls on all images, divided by their number\n")
        handle.write(f"- command: `python benchmarks/cluster_hard.py {' '.join(argv or sys.argv[1:])}`\n\n")
        handle.write(table + "\n\n" + verdict + f"\n\n![SBD against time]({args.name}.png)\n")
    plot(rows + summary, os.path.join(out_dir, args.name + ".png"), title)
    print(f"wrote {out_dir}/{args.name}.md, .csv and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
