"""discloss: the discriminative loss for instance segmentation, fused in C++/CUDA.

    import discloss
    terms = discloss.discriminative_loss(embeddings, labels)   # (var, dist, reg)
    loss = sum(terms)

Around the loss: ``cluster_embeddings`` (embeddings to instances),
``metrics`` (Symmetric Best Dice, |DiC|), ``data.ScatteredSticks`` (a
synthetic data set) and ``python -m discloss.demo`` (end-to-end training).
"""

from . import _extension

_extension.load()  # discloss._C, or an ImportError naming the torch it was built against and the fix

from . import _autocast  # noqa: E402  (float32 under torch.autocast, like torch's own losses)
from . import chainer, cluster, convert, data, metrics, reference  # noqa: E402
from .cluster import cluster_embeddings  # noqa: E402
from .convert import labels_from_onehot  # noqa: E402
from .data import ScatteredSticks  # noqa: E402
from .loss import (  # noqa: E402
    DiscriminativeLoss, DiscriminativeLossTerms, DiscriminativeLossTermsWithPush, discriminative_loss,
)

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
