"""Target conversion for code written against one-hot instance masks.

Some public ports (nyoki-mtl's pytorch-discriminative-loss, Wizaron's
instance-segmentation-pytorch) feed their loss a stack of binary masks,
(B, K, *spatial) with one channel per instance, plus a count of the channels
in use per image. discloss takes a (B, *spatial) label map instead;
``labels_from_onehot`` turns the one into the other.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

__all__ = ["labels_from_onehot"]


def _check_onehot(onehot) -> None:
    if not isinstance(onehot, torch.Tensor):
        raise TypeError(f"onehot: expected a torch.Tensor, got {type(onehot).__name__}")
    if onehot.dim() < 3:
        raise ValueError(
            f"onehot: expected shape (B, K, *spatial) with at least one spatial dim, got {tuple(onehot.shape)}"
        )
    if onehot.is_complex():
        raise TypeError(f"onehot: expected a bool, integer or floating dtype, got {onehot.dtype}")


def _channels_in_use(n_instances, batch: int, channels: int, device) -> torch.Tensor:
    """(B, K) bool: which channels of each image hold an instance."""
    if isinstance(n_instances, torch.Tensor):
        if n_instances.is_floating_point() or n_instances.is_complex() or n_instances.dtype == torch.bool:
            raise TypeError(f"n_instances: expected an integer tensor, got {n_instances.dtype}")
        counts = n_instances.detach().to(device=device, dtype=torch.int64).reshape(-1)
        if n_instances.dim() > 1:
            raise ValueError(f"n_instances: expected shape (B,) = ({batch},), got {tuple(n_instances.shape)}")
    else:
        try:
            values = [int(n) for n in n_instances]
            exact = all(v == n for v, n in zip(values, n_instances))
        except (TypeError, ValueError):
            exact = False
        if not exact:
            raise TypeError(f"n_instances: expected None, a sequence of ints or an integer tensor, "
                            f"got {n_instances!r}")
        counts = torch.tensor(values, dtype=torch.int64, device=device)
    if counts.numel() != batch:
        raise ValueError(f"n_instances: expected one count per image ({batch}), got {counts.numel()}")
    if bool(((counts < 0) | (counts > channels)).any()):
        raise ValueError(
            f"n_instances: expected counts in [0, K={channels}], got {counts.tolist()}"
        )
    return torch.arange(channels, device=device)[None, :] < counts[:, None]


def labels_from_onehot(
    onehot: torch.Tensor,
    n_instances: Optional[Union[Sequence[int], torch.Tensor]] = None,
) -> torch.Tensor:
    """Turn per-instance masks (B, K, *spatial) into a (B, *spatial) int64 label map.

    Channel k (0-based) becomes label k + 1; a pixel set in no channel is 0,
    the background (discloss's default ``ignore_index``). So the labels lie
    in [0, K] and ``max_instances=K + 1`` is a static bound for discloss.

    Args:
        onehot: (B, K, *spatial) masks, bool or with values 0 and 1 only
            (integer or floating; any other value is an error, because the
            ports weight pixels by it). Any device; the result is on it.
        n_instances: optional count of channels in use per image, (B,) ints
            (nyoki-mtl's ``n_clusters``, Wizaron's ``n_objects``): only the
            first ``n_instances[b]`` channels of image b are read, the rest
            (padding) are ignored whatever they hold.

    Overlaps: a pixel set in two or more channels in use is an error. The
    ports count such a pixel in every instance it belongs to; a label map
    gives each pixel one id, so no conversion would preserve their loss.

    Empty channels: a channel in use with no pixel gives a label that does
    not occur. discloss then has one cluster fewer in that image (C counts
    the clusters present); nyoki-mtl and Wizaron return NaN on an empty
    one-hot channel.

    Returns:
        (B, *spatial) int64 labels.

    Checks values (0/1, overlaps) with one host synchronisation each.
    """
    _check_onehot(onehot)
    batch, channels = onehot.shape[:2]
    spatial = onehot.shape[2:]
    member = onehot != 0
    if n_instances is not None:
        in_use = _channels_in_use(n_instances, batch, channels, onehot.device)
        member = member & in_use.view(batch, channels, *([1] * len(spatial)))
    if onehot.dtype != torch.bool:
        # The ports weight each pixel by its mask value; only 0 and 1 mean
        # "in this instance" or "not". Channels not in use are not read.
        bad = member & (onehot != 1)
        if bool(bad.any()):
            where = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"onehot: expected values 0 or 1 only, found {onehot[where].item()!r} at index {where}"
            )
    if channels == 0:
        return torch.zeros((batch, *spatial), dtype=torch.int64, device=onehot.device)
    per_pixel = member.sum(1)
    overlap = per_pixel > 1
    if bool(overlap.any()):
        where = tuple(int(i) for i in overlap.nonzero()[0])
        chans = member[(where[0], slice(None), *where[1:])].nonzero().flatten().tolist()
        raise ValueError(
            f"onehot: masks overlap: pixel {where} (image, *spatial) is set in channels {chans}; "
            f"each pixel may belong to one instance at most"
        )
    # argmax finds the one set channel; pixels in none come out as 0 and are masked.
    first = member.to(torch.uint8).argmax(1)
    return torch.where(per_pixel > 0, first + 1, torch.zeros_like(first))
