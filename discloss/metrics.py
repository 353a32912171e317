"""Instance segmentation metrics of the CVPPP leaf segmentation challenge.

Objects are the label values > 0; 0 (and any negative value) is background.
Label values need not be consecutive.

- Best Dice, BD(A, B) = 1/M * sum_{i=1..M} max_{j=1..N} 2|A_i ∩ B_j| / (|A_i| + |B_j|),
  with A_1..A_M the objects of A and B_1..B_N those of B (max over no object
  is 0); as in CVPPP's evaluation code, BD(A, B) = 0 when A has no object.
- Symmetric Best Dice, SBD = min(BD(pred, gt), BD(gt, pred)).
- Difference in Count, DiC = #objects(pred) - #objects(gt), and |DiC|.

(Scharr et al., "Leaf segmentation in plant phenotyping: a collation study",
MVA 2016.) Everything here is batched: it takes (B, *spatial) label maps and
returns (B,) tensors, from one confusion matrix per image built with a single
``bincount`` over the whole batch, never a loop over objects.
"""

from __future__ import annotations

from typing import Tuple

import torch

__all__ = [
    "confusion_matrices",
    "best_dice",
    "symmetric_best_dice",
    "count_instances",
    "difference_in_count",
    "absolute_difference_in_count",
]


def _check_label_maps(pred: torch.Tensor, gt: torch.Tensor) -> None:
    for name, value in (("pred", pred), ("gt", gt)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
        if value.is_floating_point() or value.is_complex():
            raise TypeError(f"{name}: expected an integer or bool label map, got dtype {value.dtype}")
        if value.dim() < 2:
            raise ValueError(f"{name}: expected shape (B, *spatial), got {tuple(value.shape)}")
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt: expected the same shape, got {tuple(pred.shape)} and {tuple(gt.shape)}")
    if pred.device != gt.device:
        raise ValueError(f"pred and gt: expected the same device, got {pred.device} and {gt.device}")


def _compact(labels: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """Map (B, N) labels to 0 (background) and 1..L (objects), batch-wide.

    Keeps the confusion matrix small whatever the label values (e.g. 65535).
    """
    labels = labels.long()
    values, inverse = torch.unique(labels.clamp(min=0), return_inverse=True)
    # inverse + 1 never collides with 0; the slot of value 0 stays empty.
    return torch.where(labels > 0, inverse + 1, torch.zeros_like(inverse)), values.numel() + 1


def confusion_matrices(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-image pixel counts of every (pred object, gt object) pair.

    Returns (B, P, G) int64, row 0 and column 0 being background. Rows and
    columns index objects after compaction of the label values present in
    the batch (ascending), so they are only meaningful through the metrics.
    """
    _check_label_maps(pred, gt)
    batch = pred.shape[0]
    pred_slots, num_pred = _compact(pred.reshape(batch, -1))
    gt_slots, num_gt = _compact(gt.reshape(batch, -1))
    image = torch.arange(batch, device=pred.device).unsqueeze(1)
    flat = (image * num_pred + pred_slots) * num_gt + gt_slots
    counts = torch.bincount(flat.reshape(-1), minlength=batch * num_pred * num_gt)
    return counts.reshape(batch, num_pred, num_gt)


def _best_dice_from_confusion(counts: torch.Tensor) -> torch.Tensor:
    """BD(rows, columns) per image from (B, P, G) counts, float64 (B,)."""
    counts = counts.double()
    row_sizes = counts.sum(dim=2)[:, 1:]  # (B, P-1): object sizes, background column included
    col_sizes = counts.sum(dim=1)[:, 1:]  # (B, G-1)
    overlap = counts[:, 1:, 1:]
    denominator = row_sizes.unsqueeze(2) + col_sizes.unsqueeze(1)
    dice = 2.0 * overlap / denominator.clamp(min=1.0)
    best = dice.amax(dim=2) if dice.shape[2] > 0 else torch.zeros_like(row_sizes)
    present = row_sizes > 0
    num_objects = present.sum(dim=1)
    total = torch.where(present, best, torch.zeros_like(best)).sum(dim=1)
    return torch.where(num_objects > 0, total / num_objects.clamp(min=1), torch.zeros_like(total))


def best_dice(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """BD(a, b) per image: (B, *spatial) label maps -> (B,) float64. Not symmetric."""
    return _best_dice_from_confusion(confusion_matrices(a, b))


def symmetric_best_dice(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """SBD per image, min(BD(pred, gt), BD(gt, pred)): (B, *spatial) -> (B,) float64.

    Add a batch dimension for a single image: ``symmetric_best_dice(p[None], g[None])``.
    """
    counts = confusion_matrices(pred, gt)
    forward = _best_dice_from_confusion(counts)
    backward = _best_dice_from_confusion(counts.transpose(1, 2))
    return torch.minimum(forward, backward)


def count_instances(labels: torch.Tensor) -> torch.Tensor:
    """Number of distinct object labels (> 0) per image: (B, *spatial) -> (B,) int64."""
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dim() < 2:
        raise TypeError("labels: expected an integer tensor of shape (B, *spatial)")
    batch = labels.shape[0]
    slots, num_slots = _compact(labels.reshape(batch, -1))
    image = torch.arange(batch, device=labels.device).unsqueeze(1)
    counts = torch.bincount((image * num_slots + slots).reshape(-1), minlength=batch * num_slots)
    return (counts.reshape(batch, num_slots)[:, 1:] > 0).sum(dim=1)


def difference_in_count(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """DiC per image, #objects(pred) - #objects(gt): (B,) int64."""
    _check_label_maps(pred, gt)
    return count_instances(pred) - count_instances(gt)


def absolute_difference_in_count(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """|DiC| per image: (B,) int64."""
    return difference_in_count(pred, gt).abs()
