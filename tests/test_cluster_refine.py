"""cluster_embeddings' refine="quickshift" (search="parallel"): the step against a plain Python
float64 reference on small 1-d, 2-d and 3-d images (the density, the parent links, the chains, the
image vote), the fused CPU op against the torch ops on random batches and other layouts, and the
errors for bad arguments."""

import itertools
from collections import Counter

import pytest
import torch

from discloss import cluster
from discloss.cluster import _refine_quickshift, cluster_embeddings

from test_cluster_fused import both_paths, fused, touching_sticks  # noqa: F401 (fused: a fixture)
from test_cluster_robust import squared

DELTA_V = 0.5
PARALLEL = dict(density_seeds=True, join="density", assign="nearest", neighbour_vote=16, search="parallel")
REFINED = dict(PARALLEL, neighbour_vote=0, refine="quickshift")


# ----------------------------------------------------------------------------- a plain reference

def reference_refine(points, slots, kept, searched, pixels, shape):
    """The documented refinement of one image in Python floats. Returns (each point's slot, kept,
    and what the quick shift alone gave: each point's slot before the vote)."""
    density_sq, link_sq = (cluster._DENSITY_RADIUS * DELTA_V) ** 2, (cluster._LINK_RADIUS * DELTA_V) ** 2
    count = len(points)
    means = {}
    for k, keep in enumerate(kept):
        mine = [points[i] for i in range(count) if slots[i] == k]
        if keep and mine:
            means[k] = [sum(column) / len(mine) for column in zip(*mine)]
    ambiguous = []
    for i in range(count):
        distances = sorted(squared(points[i], mean) for mean in means.values())
        if len(distances) >= 2 and distances[0] >= cluster._AMBIGUOUS_RATIO ** 2 * distances[1]:
            ambiguous.append(i)
    reference = [j for j in range(count) if searched[j]]
    density = {i: sum(squared(points[i], points[j]) <= density_sq for j in reference)
               for i in set(ambiguous) | set(reference)}
    parent = {}
    for a in ambiguous:
        denser = [j for j in reference if density[j] > density[a] and squared(points[a], points[j]) <= link_sq]
        if denser:
            parent[a] = min(denser, key=lambda j: (squared(points[a], points[j]), j))
    shifted = list(slots)
    for a in sorted(ambiguous, key=lambda a: -density[a]):  # a parent is denser: final when read
        if a in parent:
            shifted[a] = shifted[parent[a]]
    at_pixel = {pixel: slot for pixel, slot in zip(pixels, shifted)}
    voted = list(shifted)
    for i in range(count):
        if shifted[i] == slots[i]:
            continue
        where = []
        rest = pixels[i]
        for size in reversed(shape):
            where.insert(0, rest % size)
            rest //= size
        votes = Counter()
        for step in itertools.product((-1, 0, 1), repeat=len(shape)):
            neighbour = [c + s for c, s in zip(where, step)]
            if all(0 <= c < size for c, size in zip(neighbour, shape)):
                flat = 0
                for c, size in zip(neighbour, shape):
                    flat = flat * size + c
                if at_pixel.get(flat, -1) >= 0:
                    votes[at_pixel[flat]] += 1
        top = max(votes.values())
        winners = [k for k, v in votes.items() if v == top]
        if len(winners) == 1:
            voted[i] = winners[0]
    return voted, [keep and k in voted for k, keep in enumerate(kept)], shifted


def band_image(shape, seed, pull=0.6, reach=5, strays=0.05, noise=0.15, dim=3, gap=3.0):
    """Two instances side by side along the last axis of an image of ``shape``, means ``gap`` apart:
    as where a network's receptive field straddles both, a pixel d px from the other instance is
    pulled pull * (1 - (d - 1) / reach) of the way to its mean (those next to it past the midpoint:
    the nearest centre gives them away), and ``strays`` of the rest of instance 0 (scattered) are
    pulled ``pull`` of the way; about 10% background. Returns (embeddings (dim, *shape) float64,
    foreground, ground truth (0/1))."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.tensor([[0.0] * dim, [gap] + [0.0] * (dim - 1)], dtype=torch.float64)
    width = shape[-1]
    column = torch.arange(width).expand(shape)
    truth = (column >= width // 2).long()
    away = torch.where(truth == 0, width // 2 - column, column - width // 2 + 1)  # d: 1 next to the other
    along = pull * (1 - (away - 1) / reach).clamp(min=0)
    along = torch.where((truth == 0) & (torch.rand(shape, generator=generator) < strays), pull, along)
    embeddings = means[truth] + along.unsqueeze(-1) * (means[1 - truth] - means[truth])
    embeddings = embeddings + torch.randn(shape + (dim,), generator=generator, dtype=torch.float64) * noise
    foreground = torch.rand(shape, generator=generator) > 0.1
    return embeddings.movedim(-1, 0).contiguous(), foreground, truth


def band_batch(shape, seeds, dtype):
    built = [band_image(shape, seed) for seed in seeds]
    return torch.stack([e for e, _, _ in built]).to(dtype), torch.stack([f for _, f, _ in built])


@pytest.mark.parametrize("shape, searched_fraction, strays", [((14, 20), 1.0, 0.05), ((14, 20), 0.6, 0.05),
                                                              ((4, 6, 12), 1.0, 0.05), ((240,), 1.0, 0.2)])
def test_refine_matches_a_plain_reference(shape, searched_fraction, strays):
    built = [band_image(shape, seed, strays=strays) for seed in (0, 1)]
    points, image, pixel, slots = [], [], [], []
    for b, (embeddings, foreground, _) in enumerate(built):
        flat = foreground.reshape(-1).nonzero(as_tuple=True)[0]
        mine = embeddings.reshape(embeddings.shape[0], -1)[:, flat].T
        # The nearest of the two instances' true means, as an assignment would leave them.
        means = torch.tensor([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0]], dtype=torch.float64)
        points.append(mine)
        image.append(torch.full_like(flat, b))
        pixel.append(flat)
        slots.append(torch.cdist(mine, means).argmin(dim=1))
    points, image, pixel, slot_of_point = (torch.cat(t) for t in (points, image, pixel, slots))
    points_per_image = torch.bincount(image)
    kept = torch.ones(2, 2, dtype=torch.bool)
    searched = torch.rand(points.shape[0], generator=torch.Generator().manual_seed(3)) < searched_fraction
    new_slots, new_kept = _refine_quickshift(
        points, image, points_per_image, slot_of_point, kept, searched, pixel, shape,
        density_sq=(cluster._DENSITY_RADIUS * DELTA_V) ** 2, link_sq=(cluster._LINK_RADIUS * DELTA_V) ** 2)
    moved = reverted = 0
    for b in range(2):
        mine = image == b
        expected, expected_kept, shifted = reference_refine(
            points[mine].tolist(), slot_of_point[mine].tolist(), kept[b].tolist(), searched[mine].tolist(),
            pixel[mine].tolist(), shape)
        assert new_slots[mine].tolist() == expected
        assert new_kept[b].tolist() == expected_kept
        before = slot_of_point[mine].tolist()
        moved += sum(s != t for s, t in zip(shifted, before))
        reverted += sum(s != t and v == t for s, t, v in zip(shifted, before, expected))
    # The cases reach every step: the quick shift moves points, the vote moves some of them back.
    assert moved > 0 and reverted > 0


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", [
    dict(REFINED, mode_points=4096), dict(REFINED, mode_points=150), dict(REFINED, neighbour_vote=16),
    dict(REFINED, split_instances=True, neighbour_vote=16)], ids=["robust", "sampled", "vote", "split"])
def test_fused_refine_equals_the_torch_ops_on_random_batches(fused, seed, dtype, options):
    for embeddings, foreground in (touching_sticks(48, (3, 6), seed, dtype),
                                   band_batch((20, 28), (3 * seed, 3 * seed + 1, 3 * seed + 2), dtype)):
        fused_labels, fused_scores, torch_labels, torch_scores = both_paths(fused, embeddings, foreground, **options)
        assert fused_labels.max() >= 2
        assert torch.equal(fused_labels, torch_labels)
        torch.testing.assert_close(fused_scores, torch_scores, rtol=0, atol=1e-6)
    # The refinement moved pixels of the bands.
    fused(True)
    assert not torch.equal(cluster_embeddings(embeddings, foreground, **dict(options, refine=None))[0], fused_labels)


@pytest.mark.parametrize("layout", ["1-d", "3-d", "one row", "one pixel"])
def test_fused_refine_equals_the_torch_ops_on_other_layouts(fused, layout):
    embeddings, foreground = band_batch((24, 24), (0, 1, 2), torch.float32)
    if layout == "1-d":
        embeddings, foreground = band_batch((300,), (0, 1, 2), torch.float32)
    elif layout == "3-d":
        embeddings, foreground = band_batch((4, 6, 24), (0, 1, 2), torch.float32)
    elif layout == "one row":
        embeddings, foreground = embeddings[:, :, :1], foreground[:, :1]
    else:
        embeddings, foreground = embeddings[:, :, :1, :1], foreground[:, :1, :1]
    fused_labels, fused_scores, torch_labels, torch_scores = both_paths(fused, embeddings, foreground,
                                                                        **REFINED, min_size=1)
    assert torch.equal(fused_labels, torch_labels)
    torch.testing.assert_close(fused_scores, torch_scores, rtol=0, atol=1e-6)


def test_refine_leaves_well_separated_instances_alone(fused):
    embeddings, foreground, _ = band_image((16, 24), 0, pull=0.0, strays=0.0, gap=4.0)
    for flag in (True, False):
        fused(flag)
        refined, _ = cluster_embeddings(embeddings[None], foreground[None], **REFINED)
        plain, _ = cluster_embeddings(embeddings[None], foreground[None], **dict(REFINED, refine=None))
        assert torch.equal(refined, plain)


def test_invalid_refine_arguments_name_the_argument():
    embeddings, foreground, _ = band_image((8, 8), 0)
    with pytest.raises(ValueError, match="refine"):
        cluster_embeddings(embeddings[None], foreground[None], **dict(REFINED, refine="density"))
    with pytest.raises(ValueError, match="refine"):
        cluster_embeddings(embeddings[None], foreground[None], **dict(REFINED, refine=True))
    with pytest.raises(ValueError, match="refine"):
        cluster_embeddings(embeddings[None], foreground[None], **dict(REFINED, search="sequential"))


@pytest.mark.parametrize("name, value", [
    ("refine_density_sq", -1.0), ("refine_density_sq", float("inf")), ("refine_link_sq", 0.0),
    ("refine_link_sq", float("inf")), ("pixel", None), ("pixel", torch.arange(9)), ("pixel", torch.arange(10.0)),
    ("pixel", torch.arange(10) + 3), ("pixel", -torch.arange(10)), ("spatial", []), ("spatial", [3, 0])])
def test_raw_op_refine_errors_name_the_argument(name, value):
    points = torch.randn(10, 3)
    arguments = [points, torch.tensor([6, 4]), torch.arange(10), torch.arange(10) % 6, 4096, 512, 128, 1, 10, 64, 1,
                 16, True, 1.0, 2.25, 0.5, 0.7, 4.0, 1.5, 0.6, 0.3, 0.25, 1.8, 0.0, 0.3, 256, 0.5]
    refine = dict(refine_density_sq=0.25, refine_link_sq=1.0, pixel=torch.arange(10) % 6, spatial=[2, 3])
    refine[name] = value
    with pytest.raises(RuntimeError, match=name):
        torch.ops.discloss.cluster_parallel(*arguments, **refine)
    # Off (refine_density_sq 0, the default): the other three are not read.
    if name != "refine_density_sq":
        torch.ops.discloss.cluster_parallel(*arguments, **dict(refine, refine_density_sq=0.0))


def test_refine_on_the_benchmarks_touching_image(fused):
    """benchmarks/cluster_hard.py's 128 px touching set, image 1 (the one where the nearest centre
    gives a pulled band of instance 7 to instance 5, benchmarks/NOTES.md): the refinement gives it
    back, the same in both paths. (Also where the fused op's count of a candidate's density over the
    runs near the asking point would miss points if the runs reached less far.)"""
    import os
    import sys

    from discloss import metrics
    from discloss.data import ScatteredSticks

    pytest.importorskip("scipy")  # touching_embeddings' distance transforms
    saved = list(sys.path)  # cluster_hard adds the benchmarks folder too
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    try:
        from cluster_hard import HELD_OUT_SEED, ROBUST, touching_embeddings
    finally:
        sys.path[:] = saved
    batch = ScatteredSticks(length=10, image_size=128, num_sticks=(8, 8), seed=HELD_OUT_SEED).batch(range(10))
    embeddings = touching_embeddings(batch.labels, 8, DELTA_V, 1.5, seed=0)[1:2]
    foreground, truth = batch.foreground[1:2], batch.labels[1:2]
    options = dict(ROBUST, refine="quickshift", neighbour_vote=0)
    fused_labels, fused_scores, torch_labels, torch_scores = both_paths(fused, embeddings, foreground, **options)
    assert torch.equal(fused_labels, torch_labels)
    torch.testing.assert_close(fused_scores, torch_scores, rtol=0, atol=1e-6)
    plain, _ = cluster_embeddings(embeddings, foreground, **dict(options, refine=None))
    before = metrics.symmetric_best_dice(plain, truth).item()
    after = metrics.symmetric_best_dice(fused_labels, truth).item()
    assert before < 0.975 and after > 0.99
