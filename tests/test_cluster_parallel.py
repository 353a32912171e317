"""cluster_embeddings' parallel search (search="parallel") against plain Python references:
the density peaks that seed it, mean shift from many seeds at once, and the filing of the modes."""

import random

import pytest
import torch

from discloss.cluster import (_PEAK_RADIUS, _VALLEY_COUNT_RATIO, _VALLEY_RATIO, _density_peaks, _file_modes,
                              _mean_shift_many, _rank_in_image, _seed_priority, cluster_embeddings)

from test_cluster import trained_like_embeddings
from test_cluster_robust import reference_joins, squared

DELTA_V, DELTA_D = 0.5, 1.5
PARALLEL = dict(density_seeds=True, join="density", assign="nearest", neighbour_vote=16, search="parallel")


def two_images(counts, dim, seed, spread=3.0, groups=4):
    """Points of len(counts) images, grouped by image, around a few group centres each."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.cat([torch.full((n,), b) for b, n in enumerate(counts)])
    centres = torch.randn(len(counts), groups, dim, generator=generator, dtype=torch.float64) * spread
    which = torch.randint(0, groups, (image.numel(),), generator=generator)
    points = centres[image, which] + torch.randn(image.numel(), dim, generator=generator, dtype=torch.float64) * 0.5
    return points, image


# ----------------------------------------------------------------------------- seeds: density peaks

def reference_peaks(points, priority, image_size, window_sq, samples, min_density, most_seeds=None):
    """One image, in Python floats: the documented peaks, densest first (ties: higher priority):
    no denser candidate within _PEAK_RADIUS of the window."""
    sample = sorted(range(len(points)), key=lambda i: -priority[i])[:samples]
    scale = image_size / len(sample)
    density = {i: scale * sum(squared(points[i], points[j]) <= window_sq for j in sample) for i in sample}
    candidates = [i for i in sample if density[i] >= min_density]
    peaks = [i for i in candidates
             if not any(squared(points[i], points[j]) <= _PEAK_RADIUS ** 2 * window_sq
                        and (density[j], priority[j]) > (density[i], priority[i]) for j in candidates)]
    peaks.sort(key=lambda i: (-density[i], -priority[i]))
    return [points[i] for i in peaks[:most_seeds]]


@pytest.mark.parametrize("samples, most_seeds, min_density", [(512, 64, 12), (60, 64, 12), (60, 3, 12), (25, 64, 4)])
def test_density_peaks_match_a_plain_reference(samples, most_seeds, min_density):
    counts, dim, window_sq = [150, 90], 2, 0.8
    points, image = two_images(counts, dim, seed=samples + most_seeds, groups=7)
    pixel = torch.cat([torch.arange(n) * 7 for n in counts])
    points_per_image = torch.tensor(counts)
    priority = _seed_priority(pixel, 0)
    # The images' foreground pixels, of which these are the sample: twice the sample, so that
    # densities are even numbers and some equal min_density.
    image_size = torch.tensor([2 * min(samples, n) for n in counts])
    rank = _rank_in_image(image, points_per_image, priority)
    seeds, valid = _density_peaks(points, image, points_per_image, priority, rank, image_size, window_sq, samples,
                                  min_density, most_seeds)
    start = 0
    for b, n in enumerate(counts):
        expected = reference_peaks(points[start:start + n].tolist(), priority[start:start + n].tolist(),
                                   int(image_size[b]), window_sq, samples, min_density, most_seeds)
        assert valid[b].sum().item() == len(expected)
        assert not valid[b, len(expected):].any()
        assert seeds[b, :len(expected)].tolist() == expected
        uncapped = reference_peaks(points[start:start + n].tolist(), priority[start:start + n].tolist(),
                                   int(image_size[b]), window_sq, samples, min_density)
        assert len(uncapped) > (most_seeds if most_seeds < 64 else 0)  # the cap of 3 cuts some off
        start += n


# ----------------------------------------------------------------------------- mean shift from many seeds

def reference_mean_shift(points, seed, window_sq, steps):
    """Flat-kernel mean shift of one seed in Python floats until no step moves it; the window count."""
    centre = list(seed)
    for _ in range(steps):
        inside = [p for p in points if squared(p, centre) <= window_sq]
        shifted = [sum(column) / len(inside) for column in zip(*inside)] if inside else centre
        if shifted == centre:
            break
        centre = shifted
    return centre, sum(squared(p, centre) <= window_sq for p in points)


@pytest.mark.parametrize("steps", [2, 30])
def test_mean_shift_many_matches_one_seed_at_a_time(steps):
    counts, dim, window_sq = [120, 70], 3, 1.5
    points, image = two_images(counts, dim, seed=steps, spread=2.0)
    generator = torch.Generator().manual_seed(1)
    seeds = points[torch.randint(0, 70, (2, 5), generator=generator) + torch.tensor([[0], [120]])]
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    centres, window_counts = _mean_shift_many(points, image, torch.tensor(counts), seeds, valid, window_sq, steps,
                                              stop_when_converged=True)
    start = 0
    for b, n in enumerate(counts):
        for s in range(5):
            if not valid[b, s]:
                assert window_counts[b, s].item() == 0
                continue
            centre, count = reference_mean_shift(points[start:start + n].tolist(), seeds[b, s].tolist(), window_sq,
                                                 steps)
            torch.testing.assert_close(centres[b, s], torch.tensor(centre, dtype=torch.float64), rtol=0, atol=1e-9)
            assert window_counts[b, s].item() == count
        start += n


# ----------------------------------------------------------------------------- filing the modes

def reference_valley(points, earlier, mode, earlier_count, count, radius, reach):
    """The documented valley test in Python floats: ``earlier`` within ``reach`` of ``mode``, its
    count below _VALLEY_COUNT_RATIO times ``count``, and a point 1/4, 1/2 or 3/4 of the way from
    it to ``mode`` with fewer points within ``radius`` than _VALLEY_RATIO times the fewer of
    those within ``radius`` of the two modes."""
    if squared(earlier, mode) > reach ** 2 or not earlier_count < _VALLEY_COUNT_RATIO * count:
        return False

    def within(centre):
        return sum(squared(centre, x) <= radius ** 2 for x in points)

    probes = [[a + t * (b - a) for a, b in zip(earlier, mode)] for t in (0.25, 0.5, 0.75)]
    return min(within(p) for p in probes) < _VALLEY_RATIO * min(within(earlier), within(mode))


def reference_file(modes, counts, merge_sq, satellite_radius, window, capacity, points=None, valley_radius=None):
    """The sequential rule of _add_or_join_mode with join="density", one mode at a time in
    descending window count: new unless within the merge radius of a new mode found before,
    or a satellite or bridge of those (reference_joins). Given ``points``, the new modes found
    before that a density valley separates from the mode (reference_valley) take no part."""
    order = sorted(range(len(modes)), key=lambda i: -counts[i])
    found, found_counts = [], []
    for i in order:
        if len(found) == capacity:
            break
        usable = [(c, n) for c, n in zip(found, found_counts)
                  if points is None or not reference_valley(points, c, modes[i], n, counts[i], valley_radius,
                                                            satellite_radius)]
        if any(squared(modes[i], c) <= merge_sq for c, _ in usable):
            continue
        if usable and reference_joins(modes[i], counts[i], [c for c, _ in usable], [n for _, n in usable],
                                      satellite_radius, window):
            continue
        found.append(modes[i])
        found_counts.append(counts[i])
    return found


@pytest.mark.parametrize("capacity", [10, 3])
def test_file_modes_matches_the_sequential_rule(capacity):
    rng = random.Random(capacity)
    batch, count, dim = 40, 7, 2
    modes = torch.tensor([[[rng.uniform(-4, 4) for _ in range(dim)] for _ in range(count)] for _ in range(batch)],
                         dtype=torch.float64)
    # Distinct counts, so that the order is the same in both.
    counts = torch.tensor([rng.sample([5, 12, 20, 33, 47, 60, 90, 130, 200], count) for _ in range(batch)],
                          dtype=torch.float64)
    valid = torch.rand(batch, count, generator=torch.Generator().manual_seed(capacity)) < 0.85
    centres, num_found = _file_modes(modes, counts, valid, DELTA_D ** 2, (2 * DELTA_V) ** 2, True, capacity)
    joined = 0
    for b in range(batch):
        alive = [i for i in range(count) if valid[b, i]]
        expected = reference_file([modes[b, i].tolist() for i in alive], [counts[b, i].item() for i in alive],
                                  DELTA_D ** 2, 2 * DELTA_D, 2 * DELTA_V, capacity)
        assert num_found[b].item() == len(expected)
        assert centres[b, :len(expected)].tolist() == expected
        joined += len(alive) - len(expected)
    assert joined > batch  # the cases join many modes


def test_file_modes_with_valleys_matches_the_sequential_rule():
    # Modes 1-2.5 apart (merge, satellite and bridge distances) over blobs of points around them
    # and some points scattered between: valleys between some pairs and not others.
    rng = random.Random(7)
    batch, count, dim = 30, 6, 2
    modes = torch.tensor([[[rng.uniform(-2, 2) for _ in range(dim)] for _ in range(count)] for _ in range(batch)],
                         dtype=torch.float64)
    counts = torch.tensor([rng.sample([20, 30, 38, 45, 52, 60, 70, 85, 100], count) for _ in range(batch)],
                          dtype=torch.float64)
    valid = torch.rand(batch, count, generator=torch.Generator().manual_seed(7)) < 0.9
    per_image = []
    for b in range(batch):
        blobs = [[x + rng.gauss(0, 0.2) for x in modes[b, i].tolist()] for i in range(count)
                 for _ in range(int(counts[b, i]) // 4)]
        scattered = [[rng.uniform(-2.5, 2.5) for _ in range(dim)] for _ in range(rng.choice([0, 30, 150]))]
        per_image.append(blobs + scattered)
    points = torch.tensor([p for image in per_image for p in image], dtype=torch.float64)
    image = torch.cat([torch.full((len(image_points),), b) for b, image_points in enumerate(per_image)])
    points_per_image = torch.bincount(image, minlength=batch)
    radius = 0.5
    centres, num_found = _file_modes(modes, counts, valid, DELTA_D ** 2, (2 * DELTA_V) ** 2, True, 10,
                                     (points, image, points_per_image), radius ** 2)
    plain, plain_found = _file_modes(modes, counts, valid, DELTA_D ** 2, (2 * DELTA_V) ** 2, True, 10)
    for b in range(batch):
        alive = [i for i in range(count) if valid[b, i]]
        expected = reference_file([modes[b, i].tolist() for i in alive], [counts[b, i].item() for i in alive],
                                  DELTA_D ** 2, 2 * DELTA_D, 2 * DELTA_V, 10, per_image[b], radius)
        assert num_found[b].item() == len(expected)
        assert centres[b, :len(expected)].tolist() == expected
    # The valleys split modes in some images, and not in all.
    assert 0 < (num_found > plain_found).sum().item() < batch
    assert (num_found >= plain_found).all()


def file_over(points, modes, counts, radius=0.25):
    """_file_modes of one image with the valley test over ``points``: the number of new modes."""
    points = torch.tensor(points, dtype=torch.float64)
    _, num_found = _file_modes(torch.tensor([modes], dtype=torch.float64), torch.tensor([counts], dtype=torch.float64),
                               torch.ones(1, len(modes), dtype=torch.bool), DELTA_D ** 2, 1.0, True, 8,
                               (points, torch.zeros(len(points), dtype=torch.long), torch.tensor([len(points)])),
                               radius ** 2)
    return num_found.item()


def test_a_valley_keeps_two_modes_apart():
    # 1-D: modes at 0 (60 points) and 1.2 (50 points), within delta_d: joined by the margin rule
    # unless a valley lies between. Points spread over the whole gap fill it (they join); spread
    # over its far part only, the probe a quarter of the way still finds a valley.
    rng = random.Random(3)
    blobs = [[rng.gauss(0.0, 0.05)] for _ in range(60)] + [[rng.gauss(1.2, 0.05)] for _ in range(50)]
    whole_gap = [[0.3 + 0.6 * k / 29] for k in range(30)]
    far_part = [[0.6 + 0.4 * k / 39] for k in range(40)]
    assert [file_over(blobs + gap, [[0.0], [1.2]], [60.0, 50.0]) for gap in ([], whole_gap, far_part)] == [2, 1, 2]
    # Much denser (60 >= 1.8 x 30): a satellite, joined whatever lies between.
    assert file_over(blobs, [[0.0], [1.2]], [60.0, 30.0]) == 1


def test_a_valley_to_either_end_stops_a_bridge():
    # 2-D: a (0, 0) and k (3.4, 0), 80 points each; j (1.7, 0.3), 50 points, on the bridge between
    # them (within the window of the segment; both 1.5x denser) and beyond delta_d of both. Points
    # fill the gap from a to j; a valley between j and k alone stops the bridge.
    rng = random.Random(4)

    def blob(x, y, n):
        return [[rng.gauss(x, 0.05), rng.gauss(y, 0.05)] for _ in range(n)]

    blobs = blob(0.0, 0.0, 80) + blob(3.4, 0.0, 80) + blob(1.7, 0.3, 50)
    filled = [[1.7 * t, 0.3 * t] for t in (0.2 + 0.6 * k / 79 for k in range(80))]
    modes, counts = [[0.0, 0.0], [3.4, 0.0], [1.7, 0.3]], [80.0, 80.0, 50.0]
    assert file_over(blobs + filled, modes, counts) == 3
    # Filled on both sides: no valley, j joins.
    other = [[3.4 - 1.7 * t, 0.3 * t] for t in (0.2 + 0.6 * k / 79 for k in range(80))]
    assert file_over(blobs + filled + other, modes, counts) == 2


def test_file_modes_with_the_margin_rule_alone():
    # 1-D: modes at 0 (count 50), 1.2 (40: within delta_d of 0, joins), 2.0 (30: 2.0 from 0,
    # 0.8 from the joined 1.2: new, since only new modes count), 2.1 (5: joins 2.0).
    modes = torch.tensor([[[0.0], [1.2], [2.0], [2.1]]], dtype=torch.float64)
    counts = torch.tensor([[50.0, 40.0, 30.0, 5.0]], dtype=torch.float64)
    centres, num_found = _file_modes(modes, counts, torch.ones(1, 4, dtype=torch.bool), DELTA_D ** 2, 1.0, False, 8)
    assert num_found.tolist() == [2]
    assert centres[0, :2].flatten().tolist() == [0.0, 2.0]


# ----------------------------------------------------------------------------- whole calls

# (zero-loss embeddings give the ground truth, batched = one image at a time,
# CUDA = CPU: test_cluster_robust.py, for both searches)


def test_results_are_ordinary_tensors():
    # The work runs in inference mode; what comes back must still be modifiable in place.
    embeddings, _ = trained_like_embeddings(torch.ones(1, 8, 8, dtype=torch.long))
    labels, scores = cluster_embeddings(embeddings, torch.ones(1, 8, 8, dtype=torch.bool), **PARALLEL)
    assert not labels.is_inference() and not scores.is_inference()
    labels[labels == 1] = 5
    scores.mul_(2)


def test_invalid_search_names_the_argument():
    embeddings = torch.zeros(1, 2, 4, 4)
    foreground = torch.ones(1, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="search"):
        cluster_embeddings(embeddings, foreground, search="fast")
    with pytest.raises(ValueError, match="search"):
        cluster_embeddings(embeddings, foreground, assign="nearest", search="parallel")  # no density seeds
    with pytest.raises(ValueError, match="search"):
        cluster_embeddings(embeddings, foreground, density_seeds=True, search="parallel")  # assign="claim"
