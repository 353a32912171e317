"""ScatteredSticks: determinism, and stick geometry measured from the pixels."""

import math

import numpy as np
import pytest
import torch

from discloss.data import ScatteredSticks


def principal_extents(mask: np.ndarray):
    """Length and width of a filled rectangle from its pixels' second moments.

    A uniform segment of length L has variance L**2 / 12 along it.
    """
    rows, cols = np.nonzero(mask)
    coords = np.stack([rows, cols], axis=1).astype(np.float64)
    covariance = np.cov(coords, rowvar=False)
    small, large = np.linalg.eigvalsh(covariance)
    return math.sqrt(12 * large), math.sqrt(12 * small)


def touches_border(mask: np.ndarray) -> bool:
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def test_samples_are_deterministic_per_index_and_seed():
    first = ScatteredSticks(length=10, image_size=64, seed=3)
    second = ScatteredSticks(length=10, image_size=64, seed=3)
    other_seed = ScatteredSticks(length=10, image_size=64, seed=4)
    late = first[7]
    for index in (0, 5):  # ask in a different order: sample 7 must not change
        first[index]
    for part_a, part_b in zip(late, first[7]):
        assert torch.equal(part_a, part_b)
    for part_a, part_b in zip(first[7], second[7]):
        assert torch.equal(part_a, part_b)
    assert not torch.equal(first[7].labels, other_seed[7].labels)
    assert not torch.equal(first[7].labels, first[6].labels)
    assert torch.equal(first[-3].image, first[7].image)


def test_default_samples_have_eight_visible_sticks():
    dataset = ScatteredSticks(length=30, seed=1)
    for index in range(len(dataset)):
        image, foreground, labels = dataset[index]
        assert image.shape == (3, 256, 256) and image.dtype == torch.float32
        assert labels.shape == (256, 256) and labels.dtype == torch.int64
        assert foreground.dtype == torch.bool
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert torch.equal(foreground, labels > 0)
        visible = torch.bincount(labels.flatten(), minlength=9)
        assert visible.numel() == 9  # labels are 0..8 exactly
        assert visible[1:].min() >= 400


def test_stick_width_and_length_from_second_moments():
    dataset = ScatteredSticks(length=80, num_sticks=1, seed=2)
    lengths, widths, areas = [], [], []
    for index in range(len(dataset)):
        mask = dataset[index].labels.numpy() == 1
        if touches_border(mask):
            continue
        length, width = principal_extents(mask)
        lengths.append(length)
        widths.append(width)
        areas.append(mask.sum() / (length * width))
    assert len(lengths) >= 30
    # Pixelation blurs the extents by about a pixel.
    assert 79 <= min(lengths) and max(lengths) <= 101
    assert 88 <= np.mean(lengths) <= 92  # uniform on [80, 100]
    assert np.all(np.abs(np.array(widths) - 15) < 1.0)
    assert np.all(np.abs(np.array(areas) - 1) < 0.05)  # a filled rectangle


def test_last_stick_occludes_the_others():
    # The stick drawn last is a whole rectangle; earlier ones may be cut.
    dataset = ScatteredSticks(length=40, image_size=256, seed=5)
    checked = 0
    for index in range(len(dataset)):
        labels = dataset[index].labels.numpy()
        top = labels == 8
        if touches_border(top):
            continue
        length, width = principal_extents(top)
        assert 79 <= length <= 101 and abs(width - 15) < 1.0
        assert abs(top.sum() / (length * width) - 1) < 0.05
        checked += 1
    assert checked >= 10
    # Some earlier stick must have lost pixels to a later one somewhere.
    full_area = 15 * 80
    assert any((dataset[i].labels == 1).sum() < full_area * 0.9 for i in range(len(dataset)))


def test_geometry_scales_with_image_size():
    dataset = ScatteredSticks(length=60, image_size=128, num_sticks=1, seed=6)
    assert dataset.stick_width == 7.5 and dataset.stick_length == (40.0, 50.0)
    assert dataset.min_visible_pixels == 100
    widths = []
    for index in range(len(dataset)):
        mask = dataset[index].labels.numpy() == 1
        if not touches_border(mask):
            widths.append(principal_extents(mask)[1])
    assert abs(np.mean(widths) - 7.5) < 1.0


def test_batch_stacks_samples():
    dataset = ScatteredSticks(length=4, image_size=32, seed=0)
    batch = dataset.batch([2, 0])
    assert batch.image.shape == (2, 3, 32, 32)
    assert batch.labels.shape == batch.foreground.shape == (2, 32, 32)
    assert torch.equal(batch.labels[0], dataset[2].labels)


def test_invalid_arguments_name_the_argument():
    with pytest.raises(ValueError, match="image_size"):
        ScatteredSticks(image_size=4)
    with pytest.raises(ValueError, match="stick_length"):
        ScatteredSticks(stick_length=(50.0, 10.0))
    with pytest.raises(ValueError, match="min_visible_pixels"):
        ScatteredSticks(min_visible_pixels=5000)
    with pytest.raises(IndexError, match="index"):
        ScatteredSticks(length=3)[3]


def test_a_range_of_sticks_gives_every_count_in_it():
    dataset = ScatteredSticks(length=60, image_size=64, num_sticks=(2, 4), seed=9)
    assert dataset.max_sticks == 4 and dataset.num_sticks == (2, 4)
    counts = []
    for index in range(len(dataset)):
        labels = dataset[index].labels
        count = int(labels.max())
        # Labels are exactly 1..count, each with enough visible pixels.
        visible = torch.bincount(labels.flatten(), minlength=count + 1)
        assert visible.numel() == count + 1 and visible[1:].min() >= dataset.min_visible_pixels
        counts.append(count)
    assert set(counts) == {2, 3, 4}
    # The pair (n, n) is the same data set as the int n (no count is drawn).
    fixed, pair = ScatteredSticks(length=3, image_size=64, seed=9), ScatteredSticks(length=3, image_size=64,
                                                                                    num_sticks=(8, 8), seed=9)
    assert all(torch.equal(fixed[i].image, pair[i].image) for i in range(3))


@pytest.mark.parametrize("num_sticks", [(4, 2), (-1, 3), (1, 2, 3), 2.5])
def test_invalid_sticks_range_names_the_argument(num_sticks):
    with pytest.raises(ValueError, match="num_sticks"):
        ScatteredSticks(num_sticks=num_sticks)
