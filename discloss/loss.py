"""The public loss: ``discriminative_loss`` and ``DiscriminativeLoss``."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import _ops  # noqa: F401  (registers fake kernels and autograd)

__all__ = ["DiscriminativeLossTerms", "discriminative_loss", "DiscriminativeLoss"]

_REDUCTIONS = ("mean", "sum", "none")


class DiscriminativeLossTerms(NamedTuple):
    """The weighted terms alpha*var, beta*dist, gamma*reg."""

    var: torch.Tensor
    dist: torch.Tensor
    reg: torch.Tensor


def _check_args(embeddings, labels, norm, reduction, max_instances):
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"embeddings: expected a torch.Tensor, got {type(embeddings).__name__}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels: expected a torch.Tensor, got {type(labels).__name__}")
    if norm not in (1, 2):
        raise ValueError(f"norm: expected 1 or 2, got {norm!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")
    if max_instances is not None and (not isinstance(max_instances, int) or max_instances < 1):
        raise ValueError(f"max_instances: expected None or an int >= 1, got {max_instances!r}")


def _tracing() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _infer_max_instances(labels: torch.Tensor) -> int:
    # One host synchronisation; pass max_instances to avoid it.
    if labels.numel() == 0:
        return 1
    return max(int(labels.max().item()) + 1, 1)


def check_label_values(labels: torch.Tensor, max_instances: int, ignore_index: Optional[int]) -> None:
    """Raise if a label is negative or >= max_instances (ignore_index aside).

    One host synchronisation. The CPU kernels run this check themselves; the
    wrapper runs it for CUDA inputs in eager mode.
    """
    lab = labels.long()  # a uint8 tensor compared with ints >= 256 would wrap
    bad = (lab < 0) | (lab >= max_instances)
    if ignore_index is not None:
        bad &= lab != ignore_index
    if bool(bad.any()):
        value = int(lab[bad][0])
        allowed = f" or ignore_index={ignore_index}" if ignore_index is not None else ""
        raise RuntimeError(
            f"labels: found label {value}; expected values in [0, max_instances={max_instances}){allowed}"
        )


def _forward(embeddings, labels, max_instances, delta_v, delta_d, norm, alpha, beta, gamma, ignore_index,
             normalization, reduction):
    return torch.ops.discloss.forward(
        embeddings, labels, max_instances, float(delta_v), float(delta_d), int(norm), float(alpha), float(beta),
        float(gamma), ignore_index, normalization, reduction,
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
    validate: bool = True,
) -> DiscriminativeLossTerms:
    """The discriminative loss of De Brabandere et al. (2017), fused.

    Args:
        embeddings: (B, E, *spatial) float16, bfloat16, float32 or float64.
        labels: (B, *spatial) integer instance ids in [0, max_instances);
            ``ignore_index`` marks pixels that belong to no cluster (default 0,
            background; None: every label is a cluster). Ids need not be
            consecutive.
        delta_v, delta_d: the pull and push margins.
        norm: 1 or 2 (not squared).
        alpha, beta, gamma: weights of the var, dist and reg terms.
        max_instances: K, the number of label slots. Giving it makes every
            shape static (no host synchronisation: capturable in a CUDA graph,
            no graph break under torch.compile). None: labels.max() + 1, one
            synchronisation.
        reduction: "mean" or "sum" over the batch, or "none" for (B,) terms.
        validate: for CUDA inputs in eager mode, check that every label is
            in range (one synchronisation). Never done while compiling or
            capturing; the kernels stay in bounds whatever the labels hold.
            CPU inputs are always checked, by the kernel.

    Returns:
        DiscriminativeLossTerms(var, dist, reg), each weighted.
    """
    _check_args(embeddings, labels, norm, reduction, max_instances)
    if max_instances is None:
        max_instances = _infer_max_instances(labels)
    if validate and embeddings.is_cuda and not _tracing():
        check_label_values(labels, max_instances, ignore_index)
    var, dist, reg, _, _, _ = _forward(
        embeddings, labels, max_instances, delta_v, delta_d, norm, alpha, beta, gamma, ignore_index, "paper",
        reduction,
    )
    return DiscriminativeLossTerms(var, dist, reg)


class DiscriminativeLoss(torch.nn.Module):
    """``discriminative_loss`` as a module returning var + dist + reg."""

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
        validate: bool = True,
    ) -> None:
        super().__init__()
        self.options = dict(
            delta_v=delta_v, delta_d=delta_d, norm=norm, alpha=alpha, beta=beta, gamma=gamma,
            ignore_index=ignore_index, max_instances=max_instances, reduction=reduction, validate=validate,
        )
        _check_args(torch.empty(0), torch.empty(0), norm, reduction, max_instances)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        terms = discriminative_loss(embeddings, labels, **self.options)
        return terms.var + terms.dist + terms.reg

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
