"""discloss: the discriminative loss for instance segmentation, fused in C++/CUDA.

    import discloss
    terms = discloss.discriminative_loss(embeddings, labels)   # (var, dist, reg)
    loss = sum(terms)

Around the loss: ``cluster_embeddings`` (embeddings to instances),
``metrics`` (Symmetric Best Dice, |DiC|), ``data.ScatteredSticks`` (a
synthetic data set) and ``python -m discloss.demo`` (end-to-end training).
"""

from . import chainer, cluster, convert, data, metrics, reference
from .cluster import cluster_embeddings
from .convert import labels_from_onehot
from .data import ScatteredSticks
from .loss import DiscriminativeLoss, DiscriminativeLossTerms, DiscriminativeLossTermsWithPush, discriminative_loss

__all__ = [
    "DiscriminativeLoss",
    "DiscriminativeLossTerms",
    "DiscriminativeLossTermsWithPush",
    "discriminative_loss",
    "cluster_embeddings",
    "labels_from_onehot",
    "ScatteredSticks",
    "chainer",
    "cluster",
    "convert",
    "data",
    "metrics",
    "reference",
]
__version__ = "0.1.0"
