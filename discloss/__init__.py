"""discloss: the discriminative loss for instance segmentation, fused in C++/CUDA.

    import discloss
    terms = discloss.discriminative_loss(embeddings, labels)   # (var, dist, reg)
    loss = sum(terms)
"""

from . import chainer, reference
from .loss import DiscriminativeLoss, DiscriminativeLossTerms, discriminative_loss

__all__ = [
    "DiscriminativeLoss",
    "DiscriminativeLossTerms",
    "discriminative_loss",
    "chainer",
    "reference",
]
__version__ = "0.1.0"
