"""cluster_embeddings on embeddings with a known answer."""

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
