"""The fused CPU op of the parallel search (discloss::cluster_parallel, csrc/cpu/cluster.cpp):
against a plain-Python float64 reference of the whole search on small cases, equal to the torch-op
path of cluster.py (the CUDA path and its reference) on random batches, and its argument checks."""

import pytest
import torch

from discloss import cluster
from discloss.cluster import _seed_priority, cluster_embeddings
from discloss.data import ScatteredSticks

from test_cluster import trained_like_embeddings
from test_cluster_parallel import reference_file, reference_mean_shift, reference_peaks
from test_cluster_robust import reference_assign_to_nearest, reference_neighbour_vote, squared

DELTA_V, DELTA_D = 0.5, 1.5
PARALLEL = dict(density_seeds=True, join="density", assign="nearest", neighbour_vote=16, search="parallel")


@pytest.fixture
def fused(monkeypatch):
    """Runs cluster_embeddings through the fused op (True) or the torch ops (False)."""
    def use(flag):
        monkeypatch.setattr(cluster, "_FUSED_CPU_SEARCH", flag)
    return use


# ----------------------------------------------------------------------------- a plain reference

def reference_parallel_search(points, pixels, *, mode_points, samples, min_size, steps, max_iterations, neighbours):
    """One image in Python floats, from the step references: peaks of the sample, mean shift of
    each over the searched points, filing, nearest assignment with its Lloyd step, the vote;
    returns each point's instance id (1.. in slot order of the kept centres, 0 for none) and each
    instance's score: the fraction of its points within delta_v of its centre (moved by the Lloyd step)."""
    window_sq = (2 * DELTA_V) ** 2
    priority = _seed_priority(torch.tensor(pixels), 0).tolist()
    searched = sorted(range(len(points)), key=lambda i: -priority[i])[:mode_points]
    searched.sort()  # point order, as the search reads them
    search_points = [points[i] for i in searched]
    seeds = reference_peaks(search_points, [priority[i] for i in searched], len(points), window_sq,
                            min(samples, mode_points), max(min_size, 1), 2 * max_iterations)
    shifted = [reference_mean_shift(search_points, seed, window_sq, steps) for seed in seeds]
    centres = reference_file([m for m, _ in shifted], [n for _, n in shifted], DELTA_D ** 2, 2 * DELTA_D,
                             2 * DELTA_V, max_iterations, search_points, cluster._VALLEY_RADIUS * DELTA_V)
    slots, kept = reference_assign_to_nearest(points, centres, window_sq, min_size)
    if neighbours > 0:
        slots = reference_neighbour_vote(points, slots, centres, kept, searched, neighbours)
        kept = [keep and k in slots for k, keep in enumerate(kept)]
    new_id = {k: n + 1 for n, k in enumerate(k for k, keep in enumerate(kept) if keep)}
    scores = []
    for k in new_id:
        mine = [p for p, s in zip(points, slots) if s == k]
        scores.append(sum(squared(p, centres[k]) <= DELTA_V ** 2 for p in mine) / len(mine))
    return [new_id.get(s, 0) for s in slots], scores


def blob_image(height, width, groups, seed, spread=1.6, noise=0.45, dim=3):
    """(dim, height, width) float64 embeddings around `groups` random means, ~20% background."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(groups, dim, generator=generator, dtype=torch.float64) * spread
    which = torch.randint(0, groups, (height, width), generator=generator)
    embeddings = means[which] + torch.randn(height, width, dim, generator=generator, dtype=torch.float64) * noise
    foreground = torch.rand(height, width, generator=generator) > 0.2
    return embeddings.permute(2, 0, 1), foreground


@pytest.mark.parametrize("seed, mode_points, samples, neighbours, grid", [
    (0, None, 512, 16, False), (1, None, 512, 0, False), (2, 150, 512, 16, False), (3, None, 90, 16, False),
    (4, 200, 70, 8, False), (5, None, 512, 16, True), (6, 150, 90, 16, True)])
def test_fused_search_matches_a_plain_reference(fused, monkeypatch, seed, mode_points, samples, neighbours, grid):
    monkeypatch.setattr(cluster, "_DENSITY_SAMPLES", samples)
    fused(True)
    images = [blob_image(18, 20, 5, seed), blob_image(12, 15, 3, seed + 10)]
    if grid:
        # Embeddings on a grid of 0.5, exact in binary: distances tie the window's edge exactly
        # (inside, as documented) and densities tie (the higher priority wins).
        images = [((e * 2).round() / 2, f) for e, f in images]
    embeddings = torch.zeros(2, 3, 18, 20, dtype=torch.float64)
    foreground = torch.zeros(2, 18, 20, dtype=torch.bool)
    for b, (e, f) in enumerate(images):
        embeddings[b, :, :e.shape[1], :e.shape[2]] = e
        foreground[b, :f.shape[0], :f.shape[1]] = f
    options = dict(min_size=6, mean_shift_steps=10, max_iterations=16)
    labels, scores = cluster_embeddings(embeddings, foreground, mode_points=mode_points,
                                   **dict(PARALLEL, neighbour_vote=neighbours), **options)
    instances = 0
    for b in range(2):
        pixels = foreground[b].flatten().nonzero(as_tuple=True)[0].tolist()
        points = embeddings[b].flatten(1).t()[pixels].tolist()
        expected, expected_scores = reference_parallel_search(
            points, pixels, mode_points=mode_points or len(points), samples=samples, neighbours=neighbours, steps=10,
            max_iterations=16, min_size=6)
        assert labels[b].flatten()[pixels].tolist() == expected
        if not grid:
            # (On the grid a point can lie equally far from two modes: which one it joins before the
            # Lloyd step then turns on the rounding of 2 x.c - |c|^2 against |x - c|^2, which moves a
            # centre, hence the scores, and not the labels.)
            torch.testing.assert_close(scores[b, :len(expected_scores)], torch.tensor(expected_scores), rtol=0,
                                       atol=1e-6)
        assert not scores[b, len(expected_scores):].any()
        instances += max(expected)
    assert instances >= 4  # the cases have several instances


def close_pairs(seed, dtype, noise=0.12):
    """(2, 3, 20, 22) embeddings of four instances in two pairs whose means are 1.4 apart (within
    delta_d: one mode each, joined by the margin rule but for the valley between them)."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.tensor([[0.0, 0.0, 0.0], [1.4, 0.0, 0.0], [0.0, 4.0, 0.0], [1.4, 4.0, 0.2]], dtype=torch.float64)
    which = torch.randint(0, 4, (2, 20, 22), generator=generator)
    embeddings = means[which] + torch.randn(2, 20, 22, 3, generator=generator, dtype=torch.float64) * noise
    foreground = torch.rand(2, 20, 22, generator=generator) > 0.1
    return embeddings.permute(0, 3, 1, 2).contiguous().to(dtype), foreground


def test_fused_search_matches_a_plain_reference_across_valleys(fused):
    fused(True)
    embeddings, foreground = close_pairs(0, torch.float64)
    labels, _ = cluster_embeddings(embeddings, foreground, **PARALLEL, min_size=6, max_iterations=16)
    for b in range(2):
        pixels = foreground[b].flatten().nonzero(as_tuple=True)[0].tolist()
        points = embeddings[b].flatten(1).t()[pixels].tolist()
        expected, _ = reference_parallel_search(points, pixels, mode_points=len(points), samples=512, neighbours=16,
                                                steps=10, max_iterations=16, min_size=6)
        assert labels[b].flatten()[pixels].tolist() == expected
        assert max(expected) == 4


# ----------------------------------------------------------------------------- fused = torch ops

def touching_sticks(size, sticks, seed, dtype):
    data = ScatteredSticks(length=3, image_size=size, num_sticks=sticks, seed=seed)
    batch = data.batch(range(3))
    # Noisy (radius 0.9 > delta_v): boundary pixels, ambiguous points and spurious modes.
    embeddings, _ = trained_like_embeddings(batch.labels, radius=0.9, seed=seed)
    return embeddings.to(dtype), batch.foreground


def both_paths(fused, embeddings, foreground, **options):
    fused(True)
    fused_labels, fused_scores = cluster_embeddings(embeddings, foreground, **options)
    fused(False)
    torch_labels, torch_scores = cluster_embeddings(embeddings, foreground, **options)
    return fused_labels, fused_scores, torch_labels, torch_scores


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", [
    dict(PARALLEL, mode_points=4096), dict(PARALLEL, mode_points=150), dict(PARALLEL, neighbour_vote=0),
    dict(PARALLEL, join="margin", min_size=25)], ids=["robust", "sampled", "no-vote", "margin"])
def test_fused_equals_the_torch_ops_on_random_batches(fused, seed, dtype, options):
    embeddings, foreground = touching_sticks(48, (3, 6), seed, dtype)
    fused_labels, fused_scores, torch_labels, torch_scores = both_paths(fused, embeddings, foreground, **options)
    assert fused_labels.max() >= 3
    assert torch.equal(fused_labels, torch_labels)
    torch.testing.assert_close(fused_scores, torch_scores, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_equals_the_torch_ops_across_valleys(fused, monkeypatch, seed, dtype):
    embeddings, foreground = close_pairs(seed, dtype)
    fused_labels, fused_scores, torch_labels, torch_scores = both_paths(fused, embeddings, foreground, **PARALLEL)
    assert torch.equal(fused_labels, torch_labels)
    torch.testing.assert_close(fused_scores, torch_scores, rtol=0, atol=1e-6)
    assert fused_labels.flatten(1).amax(dim=1).tolist() == [4, 4]
    # Without the valley test each pair is one instance, in both paths.
    monkeypatch.setattr(cluster, "_VALLEY_RATIO", 0.0)
    fused_labels, _, torch_labels, _ = both_paths(fused, embeddings, foreground, **PARALLEL)
    assert torch.equal(fused_labels, torch_labels)
    assert fused_labels.flatten(1).amax(dim=1).tolist() == [2, 2]


@pytest.mark.parametrize("case", ["empty image", "all empty", "one pixel", "one image of many"])
def test_fused_equals_the_torch_ops_on_edge_sizes(fused, case):
    embeddings, foreground = touching_sticks(96 if case == "one image of many" else 32, (12, 16) if case ==
                                             "one image of many" else (3, 5), 4, torch.float32)
    if case == "empty image":
        foreground[1] = False
    elif case == "all empty":
        foreground[:] = False
    elif case == "one pixel":
        foreground[:] = False
        foreground[0, 5, 7] = True
        foreground[2, 0, 0] = True
    else:
        embeddings, foreground = embeddings[:1], foreground[:1]
    for min_size in (0, 10):
        fused_labels, fused_scores, torch_labels, torch_scores = both_paths(
            fused, embeddings, foreground, **dict(PARALLEL, mode_points=1000, min_size=min_size))
        assert torch.equal(fused_labels, torch_labels)
        assert torch.equal(fused_scores, torch_scores)
        assert fused_labels[~foreground].eq(0).all()
        if case == "one pixel":
            assert fused_labels[foreground].tolist() == ([1, 1] if min_size <= 1 else [0, 0])
        if case in ("empty image", "one image of many"):
            assert fused_labels.max() >= 3


# ----------------------------------------------------------------------------- the raw op's checks

def raw_arguments(**changes):
    points = torch.randn(10, 3)
    arguments = dict(points=points, points_per_image=torch.tensor([6, 4]), priority=torch.arange(10),
                     rank=torch.arange(10) % 6, search_points=4096, density_samples=512, most_seeds=128,
                     min_density=1, mean_shift_steps=10, max_instances=64, min_size=1, neighbour_vote=16,
                     join_density=True, bandwidth_sq=1.0, merge_sq=2.25, delta_v=0.5, peak_radius=0.7,
                     satellite_ratio=4.0, bridge_ratio=1.5, ambiguous_ratio=0.6, valley_ratio=0.3,
                     valley_radius_sq=0.25, valley_count_ratio=1.8)
    arguments.update(changes)
    return list(arguments.values())


def test_raw_op_runs_on_valid_arguments():
    ids, scores, num_instances = torch.ops.discloss.cluster_parallel(*raw_arguments())
    assert ids.shape == (10,) and scores.shape == (2, 64) and num_instances.shape == (2,)
    assert (ids >= 0).all() and (ids.reshape(-1)[:6].max() == num_instances[0])


@pytest.mark.parametrize("name, value", [
    ("points", torch.zeros(10, 3, dtype=torch.long)), ("points", torch.zeros(10)),
    ("points_per_image", torch.tensor([6, 5])), ("points_per_image", torch.tensor([11, -1])),
    ("points_per_image", torch.tensor([6.0, 4.0])), ("priority", torch.arange(9)), ("rank", torch.zeros(10)),
    ("search_points", 0), ("density_samples", 0), ("most_seeds", 0), ("mean_shift_steps", -1),
    ("max_instances", 0), ("min_size", -1), ("neighbour_vote", -1), ("bandwidth_sq", 0.0),
    ("bandwidth_sq", float("inf")), ("merge_sq", -1.0), ("delta_v", 0.0), ("valley_ratio", -0.1),
    ("valley_radius_sq", 0.0), ("valley_radius_sq", float("inf"))])
def test_raw_op_errors_name_the_argument(name, value):
    with pytest.raises(RuntimeError, match=name):
        torch.ops.discloss.cluster_parallel(*raw_arguments(**{name: value}))
