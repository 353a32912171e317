"""The public loss: ``discriminative_loss`` and ``DiscriminativeLoss``."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import _ops  # noqa: F401  (registers fake kernels and autograd)

__all__ = [
    "DiscriminativeLossTerms", "DiscriminativeLossTermsWithPush", "discriminative_loss", "DiscriminativeLoss",
    "distinct_ids_per_image",
]

_REDUCTIONS = ("mean", "sum", "none")


class DiscriminativeLossTerms(NamedTuple):
    """The weighted terms alpha*var, beta*dist, gamma*reg; their sum is the loss."""

    var: torch.Tensor
    dist: torch.Tensor
    reg: torch.Tensor


class DiscriminativeLossTermsWithPush(NamedTuple):
    """The weighted terms with the unlabeled push (w*push); their sum is the loss."""

    var: torch.Tensor
    dist: torch.Tensor
    reg: torch.Tensor
    push: torch.Tensor


def _check_args(embeddings, labels, norm, reduction, max_instances, unlabeled_push=0.0, ignore_index=0):
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"embeddings: expected a torch.Tensor, got {type(embeddings).__name__}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels: expected a torch.Tensor, got {type(labels).__name__}")
    if labels.device != embeddings.device:
        # Before anything reads the labels (a meta tensor has no values).
        raise RuntimeError(f"labels: expected the device of embeddings ({embeddings.device}), got {labels.device}")
    if norm not in (1, 2):
        raise ValueError(f"norm: expected 1 or 2, got {norm!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")
    if max_instances is not None and (not isinstance(max_instances, int) or max_instances < 1):
        raise ValueError(f"max_instances: expected None or an int >= 1, got {max_instances!r}")
    if not isinstance(unlabeled_push, (int, float)) or not unlabeled_push >= 0 or unlabeled_push == float("inf"):
        raise ValueError(f"unlabeled_push: expected a finite weight >= 0, got {unlabeled_push!r}")
    if unlabeled_push > 0 and ignore_index is None:
        raise ValueError("unlabeled_push: the unlabeled pixels are those labelled ignore_index, which is None")


def _kernels_check_labels(embeddings: torch.Tensor) -> bool:
    # The CPU kernels check label values themselves; the CUDA kernels only
    # stay in bounds, so the wrapper checks CUDA inputs (and the tests swap
    # this for the CUDA simulator, whose kernels are the CUDA ones on CPU).
    return not embeddings.is_cuda


def _tracing() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def distinct_ids_per_image(labels: torch.Tensor, ignore_index: Optional[int]) -> torch.Tensor:
    """(B,) int64: the number of distinct labels other than ignore_index in each image.

    No host synchronisation by itself; O(N log N), a sort per image (the
    callers skip it when every id is non-negative and small enough).
    """
    B = labels.shape[0]
    if B == 0 or labels.numel() == 0:
        return torch.zeros(B, dtype=torch.int64, device=labels.device)
    lab = labels.reshape(B, -1).long()  # comparing uint8 with ints >= 256 would wrap
    srt = lab.sort(dim=1).values
    first = torch.ones_like(srt, dtype=torch.bool)
    first[:, 1:] = srt[:, 1:] != srt[:, :-1]
    if ignore_index is not None:
        first &= srt != ignore_index
    return first.sum(1)


def _infer_max_instances(labels: torch.Tensor, ignore_index: Optional[int]) -> int:
    # One or two host synchronisations; pass max_instances to avoid them.
    if labels.numel() == 0:
        return 1
    lo, hi = (int(v) for v in torch.aminmax(labels.long()))
    if lo >= 0 and hi < 4096:
        # Small ids: K = max id + 1 keeps the identity slot map (the fast path).
        return max(hi + 1, 1)
    return max(int(distinct_ids_per_image(labels, ignore_index).max()), 1)


def check_distinct_ids(labels: torch.Tensor, max_instances: int, ignore_index: Optional[int]) -> None:
    """Raise if an image holds more than max_instances distinct ids (ignore_index aside).

    Host synchronisation; the CPU kernel runs this check itself, the wrapper
    runs it for CUDA inputs in eager mode.
    """
    if labels.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(labels.long()))
    if lo >= 0 and hi < max_instances:
        return  # at most max_instances distinct values
    counts = distinct_ids_per_image(labels, ignore_index)
    worst = int(counts.argmax())
    if int(counts[worst]) > max_instances:
        other = f" other than ignore_index={ignore_index}" if ignore_index is not None else ""
        raise RuntimeError(
            f"labels: image {worst} holds more than max_instances={max_instances} distinct ids{other}; "
            "raise max_instances to the most clusters one image holds"
        )


def _forward(embeddings, labels, slot_ids, num_ids, max_instances, delta_v, delta_d, norm, alpha, beta, gamma,
             unlabeled_push, ignore_index, normalization, reduction):
    return torch.ops.discloss.forward(
        embeddings, labels, slot_ids, num_ids, max_instances, float(delta_v), float(delta_d), int(norm),
        float(alpha), float(beta), float(gamma), float(unlabeled_push), ignore_index, normalization, reduction,
    )


def discriminative_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    delta_v: float = 0.5,
    delta_d: float = 1.5,
    *,
    norm: int = 2,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 0.001,
    ignore_index: Optional[int] = 0,
    max_instances: Optional[int] = None,
    reduction: str = "mean",
    unlabeled_push: float = 0.0,
    hinge_pull: bool = True,
    validate: bool = True,
):
    """The discriminative loss of De Brabandere et al. (2017), fused.

    Args:
        embeddings: (B, E, *spatial) float16, bfloat16, float32 or float64.
        labels: (B, *spatial) integer instance ids of any value of their
            dtype (not necessarily consecutive, e.g. connected-component ids);
            ``ignore_index`` marks pixels that belong to no cluster (default
            0, background; None: every label is a cluster).
        delta_v, delta_d: the pull and push margins.
        norm: 1 or 2 (not squared).
        alpha, beta, gamma: weights of the var, dist and reg terms.
        max_instances: K, the most clusters one image may hold (not a bound
            on the id values). Giving it makes every shape static (no host
            synchronisation: capturable in a CUDA graph, no graph break
            under torch.compile). None: inferred from the labels (host
            synchronisation; a sort per image when some id is negative or
            4096 or more).
        reduction: "mean" or "sum" over the batch, or "none" for (B,) terms.
        unlabeled_push: w >= 0, the weight of SPOCO's unlabeled push: every
            pixel labelled ``ignore_index`` is pushed to at least delta_d
            from every cluster mean (DESIGN §1); 0 = off.
        hinge_pull: False pulls every pixel to its mean with
            ||x - mu||^2 (the hinge with delta_v = 0).
        validate: for CUDA inputs in eager mode, check that no image holds
            more than max_instances distinct ids (host synchronisation).
            Never done while compiling or capturing; the kernels stay in
            bounds whatever the labels hold. CPU inputs are always checked,
            by the kernel.

    Returns:
        DiscriminativeLossTerms(var, dist, reg), each weighted, or with
        ``unlabeled_push`` > 0 DiscriminativeLossTermsWithPush(var, dist,
        reg, push); ``sum(terms)`` is the loss.
    """
    _check_args(embeddings, labels, norm, reduction, max_instances, unlabeled_push, ignore_index)
    if not isinstance(hinge_pull, bool):
        raise TypeError(f"hinge_pull: expected a bool, got {type(hinge_pull).__name__}")
    if max_instances is None:
        max_instances = _infer_max_instances(labels, ignore_index)
    if validate and not _kernels_check_labels(embeddings) and not _tracing():
        check_distinct_ids(labels, max_instances, ignore_index)
    slot_ids, num_ids = torch.ops.discloss.slot_map(labels, max_instances, ignore_index)
    var, dist, reg, push = _forward(
        embeddings, labels, slot_ids, num_ids, max_instances, delta_v if hinge_pull else 0.0, delta_d, norm, alpha,
        beta, gamma, unlabeled_push, ignore_index, "paper", reduction,
    )[:4]
    if unlabeled_push > 0:
        return DiscriminativeLossTermsWithPush(var, dist, reg, push)
    return DiscriminativeLossTerms(var, dist, reg)


class DiscriminativeLoss(torch.nn.Module):
    """``discriminative_loss`` as a module returning the sum of its terms."""

    def __init__(
        self,
        delta_v: float = 0.5,
        delta_d: float = 1.5,
        *,
        norm: int = 2,
        alpha: float = 1.0,
        beta: float = 1.0,
        gamma: float = 0.001,
        ignore_index: Optional[int] = 0,
        max_instances: Optional[int] = None,
        reduction: str = "mean",
        unlabeled_push: float = 0.0,
        hinge_pull: bool = True,
        validate: bool = True,
    ) -> None:
        super().__init__()
        self.options = dict(
            delta_v=delta_v, delta_d=delta_d, norm=norm, alpha=alpha, beta=beta, gamma=gamma,
            ignore_index=ignore_index, max_instances=max_instances, reduction=reduction,
            unlabeled_push=unlabeled_push, hinge_pull=hinge_pull, validate=validate,
        )
        _check_args(torch.empty(0), torch.empty(0), norm, reduction, max_instances, unlabeled_push, ignore_index)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        terms = discriminative_loss(embeddings, labels, **self.options)
        return sum(terms[1:], terms[0])

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
