"""cluster_embeddings on embeddings with a known answer."""

import math

import numpy as np
import pytest
import torch

from discloss import metrics
from discloss.cluster import cluster_embeddings
from discloss.data import ScatteredSticks

DELTA_V, DELTA_D = 0.5, 1.5


def trained_like_embeddings(labels: torch.Tensor, dim: int = 8, radius: float = 0.4, seed: int = 0):
    """Embeddings with zero discriminative loss for ``labels`` (B, *spatial).

    Instance means lie on a lattice of spacing 2 * delta_d + 1 (pushed apart
    beyond the margin), each pixel within ``radius`` < delta_v of its mean.
    """
    generator = torch.Generator().manual_seed(seed)
    batch = labels.shape[0]
    num_labels = int(labels.max()) + 1
    spacing = 2 * DELTA_D + 1.0
    # Distinct lattice points, shuffled per image.
    lattice = torch.stack(torch.meshgrid(*[torch.arange(3.0)] * 3, indexing="ij"), dim=-1).reshape(-1, 3)
    centres = torch.zeros(batch, num_labels, dim)
    for b in range(batch):
        order = torch.randperm(lattice.shape[0], generator=generator)[:num_labels]
        centres[b, :, :3] = lattice[order] * spacing
    centres[..., 3:] = torch.randn(batch, num_labels, dim - 3, generator=generator) * 0.1
    noise = torch.randn(labels.shape + (dim,), generator=generator)
    length = torch.rand(labels.shape + (1,), generator=generator) * radius
    noise = noise / noise.norm(dim=-1, keepdim=True) * length
    image_ids = torch.arange(batch).reshape((batch,) + (1,) * (labels.dim() - 1))
    pixels = centres[image_ids, labels] + noise
    return pixels.movedim(-1, 1).contiguous(), centres


@pytest.fixture(scope="module")
def sticks():
    return ScatteredSticks(length=6, image_size=64, seed=4).batch(range(6))


def test_zero_loss_embeddings_give_the_ground_truth(sticks):
    embeddings, _ = trained_like_embeddings(sticks.labels)
    labels, scores = cluster_embeddings(embeddings, sticks.foreground, delta_v=DELTA_V, delta_d=DELTA_D)
    assert labels.shape == sticks.labels.shape and labels.dtype == torch.int64
    sbd = metrics.symmetric_best_dice(labels, sticks.labels)
    assert sbd.min().item() == 1.0
    assert metrics.absolute_difference_in_count(labels, sticks.labels).sum().item() == 0
    assert torch.equal(labels > 0, sticks.foreground)
    # Every pixel within delta_v of its mean, and the modes found are those means.
    assert scores.shape == (6, 8)
    assert torch.all(scores > 0.99)


def test_batched_equals_one_image_at_a_time(sticks):
    embeddings, _ = trained_like_embeddings(sticks.labels, radius=0.6, seed=1)
    batched, batched_scores = cluster_embeddings(embeddings, sticks.foreground)
    for b in range(embeddings.shape[0]):
        alone, scores = cluster_embeddings(embeddings[b:b + 1], sticks.foreground[b:b + 1])
        assert torch.equal(alone[0], batched[b])
        torch.testing.assert_close(scores[0], batched_scores[b, :scores.shape[1]])


def test_noisy_embeddings_are_still_clustered_well(sticks):
    # Pixels up to 1.2 from their mean: beyond delta_v, inside delta_d.
    embeddings, _ = trained_like_embeddings(sticks.labels, radius=1.2, seed=2)
    labels, scores = cluster_embeddings(embeddings, sticks.foreground)
    assert metrics.symmetric_best_dice(labels, sticks.labels).mean().item() > 0.97
    assert torch.all((scores >= 0) & (scores <= 1))


def test_instances_below_min_size_join_the_nearest():
    # Two clusters of 30 pixels and a stray group of 3 pixels near the first.
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels.view(-1)[:30] = 1
    labels.view(-1)[30:60] = 2
    embeddings = torch.zeros(1, 2, 8, 8)
    embeddings[0, 0].view(-1)[30:60] = 5.0
    stray = torch.tensor([60, 61, 62])
    labels.view(-1)[stray] = 1
    embeddings[0, 0].view(-1)[stray] = 2.2  # nearer 0 than 5, outside every threshold ball
    foreground = labels > 0
    kept, scores = cluster_embeddings(embeddings, foreground, min_size=5)
    assert metrics.symmetric_best_dice(kept, labels).item() == 1.0
    assert scores.shape == (1, 2)
    split, _ = cluster_embeddings(embeddings, foreground, min_size=1)
    assert metrics.count_instances(split).item() == 3


def test_background_only_and_three_spatial_dims():
    empty, scores = cluster_embeddings(torch.randn(2, 4, 5, 6), torch.zeros(2, 5, 6, dtype=torch.bool))
    assert empty.shape == (2, 5, 6) and not empty.any() and scores.shape == (2, 0)
    volume = torch.zeros(1, 4, 6, 6)
    volume[0, 1, 3:] = 2
    labels = torch.ones(1, 4, 6, 6, dtype=torch.long)
    labels[0, 1, 3:] = 2
    embeddings = torch.zeros(1, 3, 4, 6, 6)
    embeddings[:, 0] = volume * 2.0
    clustered, _ = cluster_embeddings(embeddings, torch.ones(1, 4, 6, 6, dtype=torch.bool))
    assert metrics.symmetric_best_dice(clustered, labels).item() == 1.0


def test_same_partition_as_scikit_learn_mean_shift(sticks):
    cluster = pytest.importorskip("sklearn.cluster")
    embeddings, _ = trained_like_embeddings(sticks.labels[:2], radius=0.45, seed=3)
    ours, _ = cluster_embeddings(embeddings, sticks.foreground[:2])
    for b in range(2):
        mask = sticks.foreground[b]
        points = embeddings[b][:, mask].T.numpy()
        theirs = torch.zeros_like(ours[b])
        theirs[mask] = torch.from_numpy(cluster.MeanShift(bandwidth=1.0, bin_seeding=True).fit_predict(points)) + 1
        assert metrics.symmetric_best_dice(ours[b:b + 1], theirs[None]).item() == 1.0


def test_invalid_arguments_name_the_argument():
    embeddings = torch.zeros(1, 2, 4, 4)
    foreground = torch.ones(1, 4, 4, dtype=torch.bool)
    with pytest.raises(TypeError, match="foreground"):
        cluster_embeddings(embeddings, foreground.float())
    with pytest.raises(ValueError, match="foreground"):
        cluster_embeddings(embeddings, foreground[:, :3])
    with pytest.raises(TypeError, match="embeddings"):
        cluster_embeddings(embeddings.long(), foreground)
    with pytest.raises(ValueError, match="min_size"):
        cluster_embeddings(embeddings, foreground, min_size=-1)
    with pytest.raises(ValueError, match="bandwidth"):
        cluster_embeddings(embeddings, foreground, bandwidth=0.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_matches_cpu(sticks):
    embeddings, _ = trained_like_embeddings(sticks.labels, radius=0.6, seed=5)
    on_cpu, scores_cpu = cluster_embeddings(embeddings, sticks.foreground)
    on_gpu, scores_gpu = cluster_embeddings(embeddings.cuda(), sticks.foreground.cuda())
    assert on_gpu.is_cuda
    assert torch.equal(on_cpu, on_gpu.cpu())
    torch.testing.assert_close(scores_cpu, scores_gpu.cpu())


def test_seed_order_is_a_permutation_of_positions():
    from discloss.cluster import _seed_priority

    positions = torch.arange(200_000)
    first, second = _seed_priority(positions, 0), _seed_priority(positions, 1)
    assert first.unique().numel() == positions.numel() and first.min() >= 0
    assert not torch.equal(first.argsort(), second.argsort())


# ----------------------------------------------------------------------------- seed_scores

def reference_seed_order(pixels, scores, seed=0):
    """The documented seed rule in plain Python: descending score, NaN lowest,
    ties in descending hashed priority of the pixel position."""

    def priority(pixel):
        mask = (seed * 0x9E3779B1 + 0x7F4A7C15) & 0xFFFFFFFF
        return ((pixel * 0x5BD1E995) & 0xFFFFFFFF) ^ mask

    def key(pixel):
        score = -math.inf if scores is None or math.isnan(scores[pixel]) else scores[pixel]
        return (score, priority(pixel))

    return sorted(pixels, key=key, reverse=True)


def seed_order_case(foreground, scores=None, seed=0, device="cpu", min_seed_score=None):
    """Cluster points so far apart, with radii so small, that every foreground
    pixel is an instance of its own: the instance numbers are the seed order."""
    batch, height, width = foreground.shape
    embeddings = torch.zeros(batch, 2, height, width, dtype=torch.float64)
    embeddings[:, 0] = torch.arange(height * width, dtype=torch.float64).reshape(height, width) * 10.0
    labels, _ = cluster_embeddings(embeddings.to(device), foreground.to(device), delta_v=0.1, delta_d=0.2,
                                   min_size=1, max_iterations=height * width, seed=seed,
                                   seed_scores=None if scores is None else scores.to(device),
                                   min_seed_score=min_seed_score)
    if min_seed_score is not None:
        return labels.cpu()
    orders = []
    for b in range(batch):
        flat = labels[b].cpu().reshape(-1)
        assert sorted(flat[flat > 0].tolist()) == list(range(1, int(foreground[b].sum()) + 1))
        orders.append(flat.argsort()[(flat == 0).sum():].tolist())  # pixels by instance number
    return orders


def seed_order_inputs():
    generator = torch.Generator().manual_seed(7)
    foreground = torch.rand(2, 5, 7, generator=generator) < 0.7
    # Few distinct values, so that many pixels tie; a NaN and an infinity too.
    scores = torch.randint(0, 3, (2, 5, 7), generator=generator).to(torch.float32) * 0.5
    scores[0, 1, 2] = float("nan")
    scores[1, 3, 3] = float("inf")
    scores[1, 0, 0] = -float("inf")
    foreground[0, 1, 2] = foreground[1, 3, 3] = foreground[1, 0, 0] = True
    return foreground, scores


@pytest.mark.parametrize("seed", [0, 3])
def test_seeds_follow_descending_scores_then_hashed_order(seed):
    foreground, scores = seed_order_inputs()
    orders = seed_order_case(foreground, scores, seed=seed)
    for b in range(2):
        pixels = foreground[b].reshape(-1).nonzero().flatten().tolist()
        assert orders[b] == reference_seed_order(pixels, scores[b].reshape(-1).tolist(), seed=seed)


def test_without_scores_seeds_follow_the_hashed_order():
    foreground, _ = seed_order_inputs()
    orders = seed_order_case(foreground)
    for b in range(2):
        pixels = foreground[b].reshape(-1).nonzero().flatten().tolist()
        assert orders[b] == reference_seed_order(pixels, None)


def test_pixels_below_min_seed_score_never_seed():
    foreground, scores = seed_order_inputs()
    labels = seed_order_case(foreground, scores, min_seed_score=0.5)
    for b in range(2):
        flat_scores = scores[b].reshape(-1).tolist()
        pixels = foreground[b].reshape(-1).nonzero().flatten().tolist()
        seeds = [p for p in reference_seed_order(pixels, flat_scores) if flat_scores[p] >= 0.5]
        flat = labels[b].reshape(-1)
        # Instance k is the k-th seed of the reference order...
        assert [int(flat[p]) for p in seeds] == list(range(1, len(seeds) + 1))
        # ...and every other foreground pixel joined a seed nearest to it
        # (embedding = 10 * position).
        for p in set(pixels) - set(seeds):
            nearest = min(abs(p - q) for q in seeds)
            assert abs(p - seeds[int(flat[p]) - 1]) == nearest
    with pytest.raises(ValueError, match="min_seed_score"):
        cluster_embeddings(torch.zeros(1, 2, 3, 3), torch.ones(1, 3, 3, dtype=torch.bool), min_seed_score=0.5)


def test_equal_scores_change_nothing(sticks):
    embeddings, _ = trained_like_embeddings(sticks.labels, radius=1.2, seed=6)
    plain, plain_scores = cluster_embeddings(embeddings, sticks.foreground)
    flat, flat_scores = cluster_embeddings(embeddings, sticks.foreground,
                                           seed_scores=torch.full(sticks.foreground.shape, 0.25))
    assert torch.equal(plain, flat)
    assert torch.equal(plain_scores, flat_scores)


def test_scores_batched_equal_one_image_at_a_time(sticks):
    embeddings, _ = trained_like_embeddings(sticks.labels, radius=0.9, seed=8)
    scores = torch.rand(sticks.foreground.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    batched, _ = cluster_embeddings(embeddings, sticks.foreground, seed_scores=scores)
    for b in range(embeddings.shape[0]):
        alone, _ = cluster_embeddings(embeddings[b:b + 1], sticks.foreground[b:b + 1], seed_scores=scores[b:b + 1])
        assert torch.equal(alone[0], batched[b])


def test_a_central_seed_avoids_the_spurious_mode_of_a_stray_seed():
    # 1-D embeddings, hand-checked with the defaults (window and claim radius
    # 2*delta_v = 1, merge radius delta_d = 1.5) and min_size=5; all values
    # exact in binary. Instance A: 40 pixels at 0 and 5 strays at 1.375;
    # instance B: 40 pixels at 2.875, so the strays are 1.375 from A's mode
    # and 1.5 from B's.
    labels = torch.zeros(1, 1, 85, dtype=torch.long)
    embeddings = torch.zeros(1, 1, 1, 85)
    labels[0, 0, :40] = 1
    labels[0, 0, 40:80] = 2
    embeddings[0, 0, 0, 40:80] = 2.875
    labels[0, 0, 80:85] = 1
    embeddings[0, 0, 0, 80:85] = 1.375
    foreground = labels > 0
    central = torch.zeros(1, 1, 85)
    central[0, 0, :80] = 1.0
    # Central seeds first: the modes 0 and 2.875, each window holding its
    # own 40 pixels. The strays lie outside both claim balls but within a
    # merge radius (so they seed nothing) and finally join the nearest
    # centre, A's: the ground truth.
    found, _ = cluster_embeddings(embeddings, foreground, min_size=5, seed_scores=central)
    assert metrics.symmetric_best_dice(found, labels).item() == 1.0
    assert metrics.count_instances(found).item() == 2
    # A stray seed first: its window holds only the strays, a mode at 1.375
    # that claims them (5 pixels, kept) and is within delta_d of every other
    # pixel, which are all visited, seed nothing, and join it: one instance.
    stray_first, _ = cluster_embeddings(embeddings, foreground, min_size=5, seed_scores=1.0 - central)
    assert metrics.count_instances(stray_first).item() == 1
    assert torch.equal(stray_first > 0, foreground)


def test_invalid_seed_scores_name_the_argument():
    embeddings = torch.zeros(2, 3, 4, 5)
    foreground = torch.ones(2, 4, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="seed_scores"):
        cluster_embeddings(embeddings, foreground, seed_scores=torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="seed_scores"):
        cluster_embeddings(embeddings, foreground, seed_scores=torch.zeros(2, 1, 4, 5))
    with pytest.raises(TypeError, match="seed_scores"):
        cluster_embeddings(embeddings, foreground, seed_scores=torch.zeros(2, 4, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="seed_scores"):
        cluster_embeddings(embeddings, foreground, seed_scores=np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="seed_scores"):
        cluster_embeddings(embeddings, foreground, seed_scores=torch.zeros(2, 4, 5, device="meta"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_seeds_follow_descending_scores():
    foreground, scores = seed_order_inputs()
    orders = seed_order_case(foreground, scores, device="cuda")
    for b in range(2):
        pixels = foreground[b].reshape(-1).nonzero().flatten().tolist()
        assert orders[b] == reference_seed_order(pixels, scores[b].reshape(-1).tolist())
    with pytest.raises(ValueError, match="seed_scores"):
        cluster_embeddings(torch.zeros(2, 3, 5, 7, device="cuda"), foreground.cuda(), seed_scores=scores)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_matches_cpu_with_seed_scores(sticks):
    embeddings, _ = trained_like_embeddings(sticks.labels, radius=1.0, seed=9)
    scores = torch.rand(sticks.foreground.shape, generator=torch.Generator().manual_seed(9))
    on_cpu, scores_cpu = cluster_embeddings(embeddings, sticks.foreground, seed_scores=scores)
    on_gpu, scores_gpu = cluster_embeddings(embeddings.cuda(), sticks.foreground.cuda(), seed_scores=scores.cuda())
    assert torch.equal(on_cpu, on_gpu.cpu())
    torch.testing.assert_close(scores_cpu, scores_gpu.cpu())
