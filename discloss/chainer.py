"""Drop-in for Chainer's ``discriminative_margin_based_clustering_loss``.

Same signature, defaults and normalisation (DESIGN §1), generalised to any
batch size, any ``max_embedding_dim`` and any number of spatial dims: label
slots are 1..max_embedding_dim; label 0 and labels above it are ignored.
"""

from __future__ import annotations

import torch

from .loss import _forward

__all__ = ["discriminative_margin_based_clustering_loss"]


def discriminative_margin_based_clustering_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    delta_v: float,
    delta_d: float,
    max_embedding_dim: int,
    norm: int = 1,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 0.001,
):
    """Return the tuple (alpha * variance, beta * distance, gamma * regularisation).

    embeddings: (B, E, *spatial) float; labels: (B, *spatial) integer.
    """
    if not isinstance(max_embedding_dim, int) or max_embedding_dim < 1:
        raise ValueError(f"max_embedding_dim: expected an int >= 1, got {max_embedding_dim!r}")
    if norm not in (1, 2):
        raise ValueError(f"norm: expected 1 or 2, got {norm!r}")
    var, dist, reg = _forward(
        embeddings, labels, None, None, max_embedding_dim, delta_v, delta_d, norm, alpha, beta, gamma, 0.0, None,
        "chainer", "mean",
    )[:3]
    return var, dist, reg
