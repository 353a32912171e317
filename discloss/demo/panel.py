"""The demo's picture: per held-out image, the instances found and the embeddings, drawn with matplotlib.

matplotlib is imported inside the functions: the rest of the demo (and
discloss) runs without it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .. import metrics
from .evaluation import Prediction

__all__ = ["PANEL_MODES", "save_panel"]

PANEL_MODES = ("hashed", "seediness")


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


def save_panel(path: str, batch, prediction: Prediction, delta_v: float, seed_modes: Sequence[str] = PANEL_MODES,
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
