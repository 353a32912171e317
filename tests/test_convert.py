"""labels_from_onehot against label maps written out by hand."""

import pytest
import torch

import discloss
from discloss.convert import labels_from_onehot

# One image, 2x3 pixels, three channels:
#   channel 0 covers (0,0) (0,1)        -> label 1
#   channel 1 covers (1,2)              -> label 2
#   channel 2 covers (0,2) (1,0)        -> label 3
#   (1,1) is in no channel              -> label 0
ONEHOT = torch.tensor(
    [[[[1, 1, 0], [0, 0, 0]],
      [[0, 0, 0], [0, 0, 1]],
      [[0, 0, 1], [1, 0, 0]]]]
)
LABELS = torch.tensor([[[1, 1, 3], [3, 0, 2]]])


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32, torch.float64])
def test_channels_become_labels(dtype):
    out = labels_from_onehot(ONEHOT.to(dtype))
    assert out.dtype == torch.int64
    assert torch.equal(out, LABELS)


def test_n_instances_reads_only_the_channels_in_use():
    # Image 0 uses 2 channels: channel 2 is padding, ignored (its pixels become background).
    # Image 1 uses all 3; image 2 none (every pixel background).
    onehot = ONEHOT.repeat(3, 1, 1, 1)
    expected = torch.tensor(
        [[[1, 1, 0], [0, 0, 2]],
         [[1, 1, 3], [3, 0, 2]],
         [[0, 0, 0], [0, 0, 0]]]
    )
    for counts in ([2, 3, 0], torch.tensor([2, 3, 0], dtype=torch.int32)):
        assert torch.equal(labels_from_onehot(onehot, counts), expected)


def test_padding_channels_may_overlap_and_hold_any_value():
    # Channels past n_instances are not read at all.
    onehot = torch.zeros(1, 3, 1, 4)
    onehot[0, 0, 0, :2] = 1
    onehot[0, 1, 0, :] = 7.0
    onehot[0, 2, 0, :] = 1
    out = labels_from_onehot(onehot, [1])
    assert torch.equal(out, torch.tensor([[[1, 1, 0, 0]]]))


def test_empty_channel_gives_a_missing_label():
    onehot = torch.zeros(1, 3, 2, 2, dtype=torch.bool)
    onehot[0, 0, 0, 0] = True
    onehot[0, 2, 1, :] = True  # channel 1 is empty: label 2 does not occur
    assert torch.equal(labels_from_onehot(onehot), torch.tensor([[[1, 0], [3, 3]]]))


def test_one_and_three_spatial_dims():
    one_d = torch.tensor([[[0, 1, 1, 0], [1, 0, 0, 0]]])  # (B=1, K=2, N=4)
    assert torch.equal(labels_from_onehot(one_d), torch.tensor([[2, 1, 1, 0]]))
    three_d = torch.zeros(1, 2, 2, 1, 2)
    three_d[0, 0, 0, 0, 1] = 1
    three_d[0, 1, 1, 0, 0] = 1
    assert torch.equal(labels_from_onehot(three_d), torch.tensor([[[[0, 1]], [[2, 0]]]]))


def test_no_channels():
    out = labels_from_onehot(torch.zeros(2, 0, 3, 3))
    assert out.shape == (2, 3, 3) and out.dtype == torch.int64 and not out.any()


def test_non_contiguous_input():
    # channels-last and a sliced view read the same as the contiguous tensor
    onehot = ONEHOT.float().contiguous(memory_format=torch.channels_last)
    assert torch.equal(labels_from_onehot(onehot), LABELS)
    wide = torch.zeros(1, 3, 2, 6)
    wide[..., ::2] = ONEHOT.float()
    assert torch.equal(labels_from_onehot(wide[..., ::2]), LABELS)


def test_overlap_is_an_error_naming_the_pixel():
    onehot = ONEHOT.clone()
    onehot[0, 1, 0, 1] = 1  # pixel (0, 1) now in channels 0 and 1
    with pytest.raises(ValueError, match=r"onehot: masks overlap: pixel \(0, 0, 1\).*channels \[0, 1\]"):
        labels_from_onehot(onehot)
    # The same overlap is no error when the second channel is not in use.
    assert torch.equal(labels_from_onehot(onehot, [1]), torch.tensor([[[1, 1, 0], [0, 0, 0]]]))


@pytest.mark.parametrize(
    "onehot,counts,error,match",
    [
        ([[[[1]]]], None, TypeError, "onehot"),
        (torch.ones(2, 3), None, ValueError, "onehot"),  # no spatial dim
        (torch.ones(3), None, ValueError, "onehot"),
        (torch.ones(1, 1, 2, dtype=torch.complex64), None, TypeError, "onehot"),
        (torch.tensor([[[0.0, 0.5]]]), None, ValueError, r"onehot: expected values 0 or 1.*index \(0, 0, 1\)"),
        (torch.tensor([[[0, -1]]]), None, ValueError, "onehot: expected values 0 or 1"),
        (torch.tensor([[[0.0, float("nan")]]]), None, ValueError, "onehot: expected values 0 or 1"),
        (torch.ones(2, 3, 4), [1], ValueError, "n_instances: expected one count per image"),
        (torch.ones(2, 3, 4), [1, 4], ValueError, r"n_instances: expected counts in \[0, K=3\]"),
        (torch.ones(2, 3, 4), [1, -1], ValueError, "n_instances"),
        (torch.ones(2, 3, 4), [1, 1.5], TypeError, "n_instances"),
        (torch.ones(2, 3, 4), 2, TypeError, "n_instances"),
        (torch.ones(2, 3, 4), torch.tensor([1.0, 1.0]), TypeError, "n_instances"),
        (torch.ones(2, 3, 4), torch.ones(2, 1, dtype=torch.int64), ValueError, "n_instances"),
    ],
)
def test_bad_arguments(onehot, counts, error, match):
    with pytest.raises(error, match=match):
        labels_from_onehot(onehot, counts)


def test_feeds_discloss():
    # DESIGN §1's check values: x = (0,0), (2,0), (1,1); the first two pixels in
    # channel 0, the third in channel 1 -> labels 1, 1, 2. Paper L1,
    # delta_v=0.5, delta_d=1.5, unweighted: var 0.125, dist 4.0, reg 1.5.
    onehot = torch.tensor([[[1, 1, 0], [0, 0, 1]]])
    labels = labels_from_onehot(onehot)
    assert torch.equal(labels, torch.tensor([[1, 1, 2]]))
    x = torch.tensor([[[0.0, 2.0, 1.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    terms = discloss.discriminative_loss(x, labels, 0.5, 1.5, norm=1, gamma=1.0, max_instances=onehot.shape[1] + 1)
    assert [float(t) for t in terms] == pytest.approx([0.125, 4.0, 1.5], rel=1e-12)
