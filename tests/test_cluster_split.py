"""cluster_embeddings' split_instances (search="parallel"): the split step against a plain Python
reference on small cases, the fused CPU op against the torch ops, and whole calls on instances
whose means lie closer than the coarse window."""

import pytest
import torch

from discloss import cluster
from discloss.cluster import _seed_priority, _split_instances, cluster_embeddings

from test_cluster_fused import both_paths, fused, touching_sticks  # noqa: F401 (fused: a fixture)
from test_cluster_parallel import reference_mean_shift
from test_cluster_robust import squared

DELTA_V = 0.5
PARALLEL = dict(density_seeds=True, join="density", assign="nearest", neighbour_vote=16, search="parallel")


# ----------------------------------------------------------------------------- a plain reference

def reference_split(points, slots, kept, centres, searched, priority, *, least, steps, most_seeds, capacity,
                    samples):
    """The documented split step for one image in Python floats. Returns each point's slot (new
    slots numbered after the len(kept) given, in (slot, mode) order) and the kept flag of every
    slot, given and new."""
    radius_sq, apart_sq = (cluster._SPLIT_RADIUS * DELTA_V) ** 2, DELTA_V ** 2
    width = len(kept)
    sizes = [slots.count(k) for k in range(width)]
    ordered = sorted(sizes[k] for k in range(width) if kept[k])
    if not ordered:
        return slots, kept
    median = ordered[(len(ordered) - 1) // 2]
    slots, kept = list(slots), list(kept)
    room = capacity - sum(kept)
    for k in range(width):
        members = [i for i in range(len(points)) if slots[i] == k and searched[i]]
        near = sum(squared(points[i], centres[k]) <= DELTA_V ** 2 for i in range(len(points)) if slots[i] == k)
        if not (kept[k] and sizes[k] >= median and len(members) >= 2 * least
                and near < cluster._SPLIT_CONFIDENCE * sizes[k]):
            continue
        mine = [points[i] for i in members]
        # Density peaks of the sample (the first `samples` members in descending priority):
        # no denser sampled point within delta_v.
        sample = sorted(members, key=lambda i: -priority[i])[:samples]
        scale = len(members) / len(sample)
        density = {i: scale * sum(squared(points[i], points[j]) <= radius_sq for j in sample) for i in sample}
        candidates = [i for i in sample if density[i] >= least]
        peaks = [i for i in candidates
                 if not any(squared(points[i], points[j]) <= apart_sq
                            and (density[j], priority[j]) > (density[i], priority[i]) for j in candidates)]
        peaks.sort(key=lambda i: (-density[i], -priority[i]))
        shifted = [reference_mean_shift(mine, points[i], radius_sq, steps) for i in peaks[:most_seeds]]
        shifted.sort(key=lambda mode_count: -mode_count[1])  # stable: peaks' order among equal counts
        if not shifted:
            continue

        def within(centre):
            return sum(squared(centre, x) <= radius_sq for x in mine)

        def valley(a, b):
            probes = [[u + t * (v - u) for u, v in zip(a, b)] for t in (0.25, 0.5, 0.75)]
            return min(within(p) for p in probes) < cluster._VALLEY_RATIO * min(within(a), within(b))

        chosen = [shifted[0][0]]
        for mode, count in shifted[1:]:
            if (count >= cluster._SPLIT_COUNT_RATIO * shifted[0][1] and count >= least
                    and all(squared(mode, other) >= apart_sq and valley(other, mode) for other in chosen)):
                chosen.append(mode)
        chosen = chosen[:max(room, 0) + 1]
        if len(chosen) < 2:
            continue
        room -= len(chosen) - 1
        everyone = [i for i in range(len(points)) if slots[i] == k]

        def nearest(modes):
            return [min(range(len(modes)), key=lambda f: (squared(points[i], modes[f]), f)) for i in everyone]

        part = nearest(chosen)
        means = [[sum(column) / len(group) for column in zip(*group)] if group else chosen[f]
                 for f, group in enumerate([[points[i] for i, p in zip(everyone, part) if p == f]
                                            for f in range(len(chosen))])]
        part = nearest(means)
        target = [k] + list(range(len(kept), len(kept) + len(chosen) - 1))
        kept += [False] * (len(chosen) - 1)
        for i, p in zip(everyone, part):
            slots[i] = target[p]
        for t in target:
            kept[t] = t in slots
    return slots, kept


def blob_image(seed, groups, dim=3):
    """Points around the given groups, each (mean, count, noise); slots by group as given (a slot
    may hold several groups); returns points (N, dim) float64, slots (N,), pixel positions (N,)."""
    generator = torch.Generator().manual_seed(seed)
    points, slots = [], []
    for mean, count, noise, slot in groups:
        mean = torch.tensor(mean + [0.0] * (dim - len(mean)), dtype=torch.float64)
        points.append(mean + torch.randn(count, dim, generator=generator, dtype=torch.float64) * noise)
        slots += [slot] * count
    order = torch.randperm(len(slots), generator=generator)
    return torch.cat(points)[order], torch.tensor(slots)[order]


# Image 0: slots 0 and 1 two groups 1.2 apart each (merged by a coarse window; slot 1 is not the
# largest), slot 2 two groups 1.2 apart but smaller than the median (not searched), slot 3 a group
# with a satellite of a tenth of its points (below the count ratio). Image 1: slot 0 three groups
# (two split off), slot 1 one group, slot 2 two groups only 0.45 apart (closer than delta_v: one
# instance), slot 3 two wide groups 0.8 apart (no valley between their fine modes).
IMAGES = [
    [([0.0, 0.0], 60, 0.08, 0), ([1.2, 0.0], 50, 0.08, 0), ([4.0, 0.0], 50, 0.08, 1), ([5.2, 0.0], 50, 0.08, 1),
     ([0.0, 4.0], 30, 0.08, 2), ([1.2, 4.0], 25, 0.08, 2), ([4.0, 4.0], 90, 0.1, 3), ([4.0, 5.0], 10, 0.08, 3)],
    [([0.0, 0.0], 50, 0.08, 0), ([1.2, 0.0], 45, 0.08, 0), ([0.6, 1.1], 40, 0.08, 0), ([5.0, 0.0], 70, 0.1, 1),
     ([0.0, 5.0], 40, 0.06, 2), ([0.45, 5.0], 40, 0.06, 2), ([5.0, 5.0], 60, 0.25, 3), ([5.8, 5.0], 60, 0.25, 3)],
]


@pytest.mark.parametrize("samples, capacity, searched_fraction", [(256, 64, 1.0), (30, 64, 0.8), (256, 4, 1.0),
                                                                (256, 5, 1.0)])
def test_split_matches_a_plain_reference(monkeypatch, samples, capacity, searched_fraction):
    monkeypatch.setattr(cluster, "_SPLIT_SAMPLES", samples)
    built = [blob_image(seed, groups) for seed, groups in enumerate(IMAGES)]
    points = torch.cat([p for p, _ in built])
    slot_of_point = torch.cat([s for _, s in built])
    image = torch.cat([torch.full((p.shape[0],), b) for b, (p, _) in enumerate(built)])
    points_per_image = torch.tensor([p.shape[0] for p, _ in built])
    slots = 4
    kept = torch.tensor([[True, True, True, True], [True, True, True, True]])
    centres = torch.zeros(2, slots, 3, dtype=torch.float64)
    for b in range(2):
        for k in range(slots):
            mine = (image == b) & (slot_of_point == k)
            if mine.any():
                centres[b, k] = points[mine].mean(dim=0)
    pixel = torch.cat([torch.arange(n) * 3 for n in points_per_image.tolist()])
    priority = _seed_priority(pixel, 0)
    searched = torch.rand(points.shape[0], generator=torch.Generator().manual_seed(5)) < searched_fraction
    options = dict(least=5, steps=10, most_seeds=32, capacity=capacity)
    new_slots, new_kept, new_centres = _split_instances(
        points, image, points_per_image, slot_of_point, kept, centres, searched, priority,
        radius_sq=(cluster._SPLIT_RADIUS * DELTA_V) ** 2, apart_sq=DELTA_V ** 2, delta_v_sq=DELTA_V ** 2, **options)
    splits = 0
    for b in range(2):
        mine = image == b
        expected_slots, expected_kept = reference_split(
            points[mine].tolist(), slot_of_point[mine].tolist(), kept[b].tolist(), centres[b].tolist(),
            searched[mine].tolist(), priority[mine].tolist(), samples=samples, **options)
        assert new_slots[mine].tolist() == expected_slots
        width = len(expected_kept)
        assert new_kept[b, :width].tolist() == expected_kept
        assert not new_kept[b, width:].any()
        splits += width - slots
    # Image 0's slots 0 and 1 and image 1's slot 0 split (into two, two and three), the rest not; a
    # capacity of four leaves room for none in either image (four kept).
    assert splits == {4: 0, 5: 2}.get(capacity, 4)


# ----------------------------------------------------------------------------- whole calls

def close_pairs(seed, dtype, gap=1.0, noise=0.1):
    """(2, 3, 24, 24) embeddings of four instances in two pairs whose means are ``gap`` apart:
    closer than the window (2 * delta_v), so that mean shift finds one mode per pair."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.tensor([[0.0, 0.0, 0.0], [gap, 0.0, 0.0], [0.0, 4.0, 0.0], [gap, 4.0, 0.2]], dtype=torch.float64)
    which = torch.randint(0, 4, (2, 24, 24), generator=generator)
    embeddings = means[which] + torch.randn(2, 24, 24, 3, generator=generator, dtype=torch.float64) * noise
    foreground = torch.rand(2, 24, 24, generator=generator) > 0.1
    return embeddings.permute(0, 3, 1, 2).contiguous().to(dtype), foreground, which


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_split_separates_instances_closer_than_the_window(fused, seed, dtype):
    embeddings, foreground, which = close_pairs(seed, dtype)
    fused_labels, fused_scores, torch_labels, torch_scores = both_paths(
        fused, embeddings, foreground, **PARALLEL, split_instances=True)
    assert torch.equal(fused_labels, torch_labels)
    torch.testing.assert_close(fused_scores, torch_scores, rtol=0, atol=1e-6)
    assert fused_labels.flatten(1).amax(dim=1).tolist() == [4, 4]
    # Each ground-truth instance is one label, but for a few pixels of its noise.
    for b in range(2):
        for k in range(4):
            labels = fused_labels[b][foreground[b] & (which[b] == k)]
            assert (labels == labels.mode().values).float().mean() > 0.97
    # Without the split each pair is one instance, in both paths.
    fused_labels, _, torch_labels, _ = both_paths(fused, embeddings, foreground, **PARALLEL)
    assert torch.equal(fused_labels, torch_labels)
    assert fused_labels.flatten(1).amax(dim=1).tolist() == [2, 2]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode_points", [None, 150])
def test_fused_split_equals_the_torch_ops_on_random_batches(fused, seed, dtype, mode_points):
    embeddings, foreground = touching_sticks(48, (3, 6), seed, dtype)
    fused_labels, fused_scores, torch_labels, torch_scores = both_paths(
        fused, embeddings, foreground, **PARALLEL, mode_points=mode_points, split_instances=True)
    assert fused_labels.max() >= 3
    assert torch.equal(fused_labels, torch_labels)
    torch.testing.assert_close(fused_scores, torch_scores, rtol=0, atol=1e-6)


def test_split_leaves_well_separated_instances_alone(fused):
    embeddings, foreground, _ = close_pairs(0, torch.float32, gap=3.0)
    for flag in (True, False):
        fused(flag)
        with_split, _ = cluster_embeddings(embeddings, foreground, **PARALLEL, split_instances=True)
        without, _ = cluster_embeddings(embeddings, foreground, **PARALLEL)
        assert torch.equal(with_split, without)


def test_invalid_split_arguments_name_the_argument():
    embeddings, foreground, _ = close_pairs(0, torch.float32)
    with pytest.raises(TypeError, match="split_instances"):
        cluster_embeddings(embeddings, foreground, **PARALLEL, split_instances=1)
    with pytest.raises(ValueError, match="split_instances"):
        cluster_embeddings(embeddings, foreground, **dict(PARALLEL, search="sequential"), split_instances=True)


@pytest.mark.parametrize("name, value", [("split_radius_sq", -1.0), ("split_radius_sq", float("inf")),
                                         ("split_count_ratio", -0.1), ("split_samples", 0),
                                         ("split_confidence", -0.5)])
def test_raw_op_split_errors_name_the_argument(name, value):
    points = torch.randn(10, 3)
    arguments = [points, torch.tensor([6, 4]), torch.arange(10), torch.arange(10) % 6, 4096, 512, 128, 1, 10, 64, 1,
                 16, True, 1.0, 2.25, 0.5, 0.7, 4.0, 1.5, 0.6, 0.3, 0.25, 1.8]
    split = dict(split_radius_sq=0.1225, split_count_ratio=0.3, split_samples=256, split_confidence=0.5)
    split[name] = value
    with pytest.raises(RuntimeError, match=name):
        torch.ops.discloss.cluster_parallel(*arguments, **split)
