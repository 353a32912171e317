"""From the trained network to instances and scores: prediction per seed mode, SBD and |DiC|."""

from __future__ import annotations

from typing import Dict, NamedTuple, Sequence, Tuple

import torch

from .. import metrics
from ..cluster import cluster_embeddings
from ..data import ScatteredSticks
from .model import StickNet

__all__ = ["SEED_MODES", "ROBUST_OPTIONS", "Prediction", "predict", "evaluate"]

# How cluster_embeddings picks its seeds: in its hashed pixel order; in
# descending seediness (the head's probability); in descending seediness
# among the pixels whose seediness reaches --min-seed-score only; or
# "robust": the clustering made for touching instances (densest seeds first,
# satellites and bridges joined, every pixel to its nearest centre and one
# Lloyd step, ambiguous pixels by a vote of their 16 nearest; see
# cluster_embeddings), which needs no seediness. The demo takes the
# sequential search: on the embeddings of two networks trained here (the
# demo's, 253 steps; the hard set's, 91 steps) it scored 0.912 and 0.705
# against hashed seeds' 0.898 and 0.698, the parallel search (the
# benchmark's, 3-4x faster) 0.910 and 0.680 (it lost instances of the
# undertrained network).
SEED_MODES = ("hashed", "seediness-order", "seediness", "robust")
ROBUST_OPTIONS = dict(density_seeds=True, join="density", assign="nearest", mode_points=4096, neighbour_vote=16,
                      search="sequential")


def _seed_options(mode: str, seediness: torch.Tensor, args) -> dict:
    if mode == "hashed":
        return {}
    if mode == "robust":
        return dict(ROBUST_OPTIONS)
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
