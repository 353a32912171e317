"""SBD and |DiC| against a brute-force transcription of CVPPP's definition."""

import numpy as np
import pytest
import torch

from discloss import metrics


def brute_force_best_dice(a: np.ndarray, b: np.ndarray) -> float:
    """CVPPP's BestDice: a loop over the objects of a, the best Dice with any object of b."""
    objects_a = [value for value in np.unique(a) if value > 0]
    objects_b = [value for value in np.unique(b) if value > 0]
    if not objects_a:
        return 0.0
    total = 0.0
    for i in objects_a:
        mask_a = a == i
        best = 0.0
        for j in objects_b:
            mask_b = b == j
            dice = 2.0 * np.logical_and(mask_a, mask_b).sum() / (mask_a.sum() + mask_b.sum())
            best = max(best, dice)
        total += best
    return total / len(objects_a)


def brute_force_sbd(pred: np.ndarray, gt: np.ndarray) -> float:
    return min(brute_force_best_dice(pred, gt), brute_force_best_dice(gt, pred))


def brute_force_count(labels: np.ndarray) -> int:
    return len([value for value in np.unique(labels) if value > 0])


def random_label_maps(rng, batch, shape, max_label, sparse_values=False):
    labels = rng.integers(0, max_label + 1, size=(batch,) + shape)
    # Blocky maps, so that objects overlap in interesting proportions.
    labels = np.repeat(np.repeat(labels, 3, axis=1), 2, axis=2)
    if sparse_values:
        values = np.concatenate([[0], rng.choice(np.arange(1, 30000), size=max_label, replace=False)])
        labels = values[labels]
    return labels


def test_hand_computed_example():
    gt = torch.tensor([[[0, 1, 1], [2, 2, 0]]])
    pred = torch.tensor([[[0, 5, 5], [5, 7, 0]]])
    # BD(pred, gt) = (0.8 + 2/3) / 2 = BD(gt, pred) = 11/15.
    assert metrics.symmetric_best_dice(pred, gt).item() == pytest.approx(11 / 15, abs=1e-12)
    assert metrics.best_dice(pred, gt).item() == pytest.approx(11 / 15, abs=1e-12)
    assert metrics.absolute_difference_in_count(pred, gt).tolist() == [0]


@pytest.mark.parametrize("sparse_values", [False, True])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16])
def test_sbd_matches_brute_force(dtype, sparse_values):
    rng = np.random.default_rng(7)
    pred = random_label_maps(rng, 6, (5, 7), 6, sparse_values)
    gt = random_label_maps(rng, 6, (5, 7), 4, sparse_values)
    gt[1] = 0  # an image without ground-truth objects
    pred[2] = 0  # an image without predicted objects
    pred[3], gt[3] = 0, 0  # neither
    pred[4] = gt[4]  # a perfect prediction
    sbd = metrics.symmetric_best_dice(torch.from_numpy(pred).to(dtype), torch.from_numpy(gt).to(dtype))
    expected = [brute_force_sbd(p, g) for p, g in zip(pred, gt)]
    assert sbd.dtype == torch.float64 and sbd.shape == (6,)
    np.testing.assert_allclose(sbd.numpy(), expected, rtol=0, atol=1e-12)
    assert sbd[4].item() == 1.0
    assert sbd[1].item() == sbd[2].item() == sbd[3].item() == 0.0


def test_best_dice_is_not_symmetric_and_matches_both_directions():
    rng = np.random.default_rng(3)
    pred = random_label_maps(rng, 4, (6, 6), 7)
    gt = random_label_maps(rng, 4, (6, 6), 3)
    pred_t, gt_t = torch.from_numpy(pred), torch.from_numpy(gt)
    np.testing.assert_allclose(metrics.best_dice(pred_t, gt_t).numpy(),
                               [brute_force_best_dice(p, g) for p, g in zip(pred, gt)], atol=1e-12)
    np.testing.assert_allclose(metrics.best_dice(gt_t, pred_t).numpy(),
                               [brute_force_best_dice(g, p) for p, g in zip(pred, gt)], atol=1e-12)


def test_three_spatial_dims_and_uint8():
    rng = np.random.default_rng(11)
    pred = rng.integers(0, 5, size=(2, 4, 5, 6)).astype(np.uint8)
    gt = rng.integers(0, 3, size=(2, 4, 5, 6)).astype(np.uint8)
    sbd = metrics.symmetric_best_dice(torch.from_numpy(pred), torch.from_numpy(gt))
    np.testing.assert_allclose(sbd.numpy(), [brute_force_sbd(p, g) for p, g in zip(pred, gt)], atol=1e-12)


def test_negative_labels_are_background():
    gt = torch.tensor([[[1, 1, -1, 2]]])
    pred = torch.tensor([[[1, 1, 0, 2]]])
    assert metrics.symmetric_best_dice(pred, gt).item() == 1.0
    assert metrics.count_instances(gt).tolist() == [2]


def test_difference_in_count_matches_brute_force():
    rng = np.random.default_rng(5)
    pred = random_label_maps(rng, 5, (4, 4), 9, sparse_values=True)
    gt = random_label_maps(rng, 5, (4, 4), 3)
    pred[0] = 0
    dic = metrics.difference_in_count(torch.from_numpy(pred), torch.from_numpy(gt))
    expected = [brute_force_count(p) - brute_force_count(g) for p, g in zip(pred, gt)]
    assert dic.tolist() == expected
    assert metrics.absolute_difference_in_count(torch.from_numpy(pred), torch.from_numpy(gt)).tolist() == [
        abs(value) for value in expected
    ]


def test_invalid_inputs_name_the_argument():
    labels = torch.zeros(1, 3, 3, dtype=torch.long)
    with pytest.raises(TypeError, match="pred"):
        metrics.symmetric_best_dice(labels.float(), labels)
    with pytest.raises(TypeError, match="gt"):
        metrics.symmetric_best_dice(labels, labels.float())
    with pytest.raises(ValueError, match="pred and gt"):
        metrics.symmetric_best_dice(labels, torch.zeros(1, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="pred"):
        metrics.symmetric_best_dice(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
