"""The losses of the demo's two other heads, trained beside the discriminative loss.

Foreground: binary cross-entropy + Dice. Seediness (Fathi et al. 2017,
"Semantic instance segmentation via deep metric learning"): how good a seed
for the clustering each pixel is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["foreground_loss", "seediness_target", "seediness_loss"]


def foreground_loss(logits: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy + Dice of the foreground logits (B, H, W) against the boolean mask."""
    target = foreground.float()
    return F.binary_cross_entropy_with_logits(logits, target) + _dice_loss(logits, target)


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

