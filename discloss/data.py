"""Synthetic data for instance segmentation: ``ScatteredSticks``.

Scattered sticks are the toy problem of De Brabandere et al. (2017): long thin
rectangles at random angles that cross and occlude each other, so that a
pixel's instance cannot be read off its neighbourhood alone. Every sample is
drawn from its own random generator, seeded by (seed, index), so a sample is
the same whatever order or process asks for it, and no file is ever read.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["StickSample", "ScatteredSticks"]

# The geometry at the reference size of 256 x 256 pixels; other image sizes
# scale lengths linearly and the minimum visible area quadratically.
_REFERENCE_SIZE = 256
_REFERENCE_WIDTH = 15.0
_REFERENCE_LENGTH = (80.0, 100.0)
_REFERENCE_MIN_VISIBLE = 400


class StickSample(NamedTuple):
    """One sample: image (3, H, W) float32 in [0, 1], foreground (H, W) bool,
    labels (H, W) int64 with 0 for background and 1..num_sticks in drawing
    order (stick k + 1 is drawn over sticks 1..k)."""

    image: torch.Tensor
    foreground: torch.Tensor
    labels: torch.Tensor


class ScatteredSticks(Dataset):
    """A torch Dataset of synthetic images of scattered, overlapping sticks.

    Each sample has ``num_sticks`` rectangles (or a number drawn uniformly
    from ``low..high`` per sample when ``num_sticks`` is a pair) of width
    ``stick_width`` and a length drawn uniformly from ``stick_length``, at
    uniformly random angles, centred uniformly in the image (a stick may run
    off the border). Sticks drawn later occlude earlier ones. A sample in
    which any stick keeps fewer than ``min_visible_pixels`` visible pixels is
    redrawn (from the same generator, so still deterministic; the number of
    sticks is kept), hence every sample with n sticks has exactly n
    instances, labelled 1..n.

    Each stick has its own random colour on a dark background, with Gaussian
    pixel noise of standard deviation ``noise``; colours of two sticks may be
    close, so colour alone does not always separate instances.

    Args:
        length: the number of samples (indices 0..length-1).
        image_size: height and width in pixels.
        num_sticks: sticks per image: an int, or (low, high) for a number
            drawn uniformly from low..high (both included) per sample. The
            attribute ``max_sticks`` is the most sticks a sample can have.
        stick_width: in pixels. None: 15 px scaled by image_size / 256.
        stick_length: (low, high) in pixels. None: (80, 100) px scaled by
            image_size / 256.
        min_visible_pixels: None: 400 px scaled by (image_size / 256) ** 2.
        noise: standard deviation of the pixel noise.
        seed: selects the data set; sample i depends only on (seed, i).

    The defaults give the 256 x 256 data set of the paper's kind; the demo
    uses ``image_size=128`` with the geometry scaled to it.
    """

    def __init__(
        self,
        length: int = 1000,
        image_size: int = 256,
        num_sticks: Union[int, Tuple[int, int]] = 8,
        stick_width: Optional[float] = None,
        stick_length: Optional[Tuple[float, float]] = None,
        min_visible_pixels: Optional[int] = None,
        noise: float = 0.05,
        seed: int = 0,
    ) -> None:
        if not isinstance(length, int) or length < 0:
            raise ValueError(f"length: expected an int >= 0, got {length!r}")
        if not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"image_size: expected an int >= 8, got {image_size!r}")
        if isinstance(num_sticks, int):
            sticks_range = (num_sticks, num_sticks)
        elif (isinstance(num_sticks, (tuple, list)) and len(num_sticks) == 2
              and all(isinstance(n, int) for n in num_sticks)):
            sticks_range = (int(num_sticks[0]), int(num_sticks[1]))
        else:
            raise ValueError(f"num_sticks: expected an int or a pair (low, high) of ints, got {num_sticks!r}")
        if not 0 <= sticks_range[0] <= sticks_range[1]:
            raise ValueError(f"num_sticks: expected >= 0 (and low <= high for a pair), got {num_sticks!r}")
        scale = image_size / _REFERENCE_SIZE
        if stick_width is None:
            stick_width = _REFERENCE_WIDTH * scale
        if stick_length is None:
            stick_length = (_REFERENCE_LENGTH[0] * scale, _REFERENCE_LENGTH[1] * scale)
        if min_visible_pixels is None:
            min_visible_pixels = int(round(_REFERENCE_MIN_VISIBLE * scale * scale))
        if not stick_width > 0:
            raise ValueError(f"stick_width: expected > 0, got {stick_width!r}")
        if len(stick_length) != 2 or not 0 < stick_length[0] <= stick_length[1]:
            raise ValueError(f"stick_length: expected (low, high) with 0 < low <= high, got {stick_length!r}")
        if min_visible_pixels < 0:
            raise ValueError(f"min_visible_pixels: expected >= 0, got {min_visible_pixels!r}")
        # A single unoccluded stick must be able to keep min_visible_pixels,
        # or the redraw loop could never end.
        if min_visible_pixels > 0.5 * stick_width * stick_length[0]:
            raise ValueError(
                f"min_visible_pixels: {min_visible_pixels} is more than half the area of the shortest stick "
                f"({stick_width:g} x {stick_length[0]:g} px); samples would be redrawn forever"
            )
        if noise < 0:
            raise ValueError(f"noise: expected >= 0, got {noise!r}")
        self.length = length
        self.image_size = image_size
        # An int stays an int (as given); a pair is kept as a tuple.
        self.num_sticks = num_sticks if isinstance(num_sticks, int) else sticks_range
        self.sticks_range = sticks_range
        self.max_sticks = sticks_range[1]
        self.stick_width = float(stick_width)
        self.stick_length = (float(stick_length[0]), float(stick_length[1]))
        self.min_visible_pixels = int(min_visible_pixels)
        self.noise = float(noise)
        self.seed = int(seed)
        centres = np.arange(image_size, dtype=np.float64) + 0.5
        self._rows, self._cols = np.meshgrid(centres, centres, indexing="ij")

    def __len__(self) -> int:
        return self.length

    def _draw_labels(self, rng: np.random.Generator, count: int) -> np.ndarray:
        size = self.image_size
        labels = np.zeros((size, size), dtype=np.int64)
        angles = rng.uniform(0.0, math.pi, count)
        lengths = rng.uniform(self.stick_length[0], self.stick_length[1], count)
        centres = rng.uniform(0.0, size, (count, 2))
        for k in range(count):
            # Coordinates of every pixel centre along and across the stick.
            dr = self._rows - centres[k, 0]
            dc = self._cols - centres[k, 1]
            along = dr * math.sin(angles[k]) + dc * math.cos(angles[k])
            across = -dr * math.cos(angles[k]) + dc * math.sin(angles[k])
            inside = (np.abs(along) <= lengths[k] / 2) & (np.abs(across) <= self.stick_width / 2)
            labels[inside] = k + 1
        return labels

    def __getitem__(self, index: int) -> StickSample:
        if not -self.length <= index < self.length:
            raise IndexError(f"index: {index} out of range for a data set of {self.length} samples")
        index %= self.length
        rng = np.random.default_rng([self.seed, index])
        low, high = self.sticks_range
        # A fixed count draws nothing here, so samples of the int form are
        # those of earlier versions.
        count = low if low == high else int(rng.integers(low, high + 1))
        while True:
            labels = self._draw_labels(rng, count)
            visible = np.bincount(labels.ravel(), minlength=count + 1)[1:]
            if count == 0 or visible.min() >= self.min_visible_pixels:
                break
        size = self.image_size
        background = rng.uniform(0.0, 0.2, 3)
        # Bright colours (one channel near 1) so that sticks stand out from
        # the dark background; hue is free.
        colours = rng.uniform(0.0, 1.0, (count, 3))
        colours = 0.3 + 0.7 * colours / colours.max(axis=1, keepdims=True)
        palette = np.concatenate([background[None], colours], axis=0)
        image = palette[labels] + rng.normal(0.0, self.noise, (size, size, 3))
        image = np.clip(image, 0.0, 1.0).astype(np.float32).transpose(2, 0, 1)
        labels_tensor = torch.from_numpy(labels)
        return StickSample(torch.from_numpy(np.ascontiguousarray(image)), labels_tensor > 0, labels_tensor)

    def batch(self, indices) -> StickSample:
        """Stack the samples at ``indices`` into (B, 3, H, W), (B, H, W), (B, H, W)."""
        samples = [self[int(i)] for i in indices]
        return StickSample(*(torch.stack(parts) for parts in zip(*samples)))
