"""cluster_embeddings' robust options (density seeds, join="density", assign="nearest",
mode_points) against plain Python references and hand-computed cases."""

import math
import random

import pytest
import torch

from discloss import metrics
from discloss.cluster import (_AMBIGUOUS_RATIO, _assign_to_nearest, _beside_a_denser_mode, _estimated_density,
                              _neighbour_vote, _on_a_bridge, _seed_priority, cluster_embeddings)
from discloss.data import ScatteredSticks

from test_cluster import trained_like_embeddings

DELTA_V, DELTA_D = 0.5, 1.5
ROBUST = dict(density_seeds=True, join="density", assign="nearest", neighbour_vote=16)


def squared(a, b):
    return sum((x - y) ** 2 for x, y in zip(a, b))


# ----------------------------------------------------------------------------- the assignment step

def reference_assign_to_nearest(points, centres, window_sq, min_size):
    """The documented rule for one image, in Python floats: every point to its nearest centre;
    a centre is dropped when fewer than min_size points lie within its window or are nearest
    to it (among all centres); points of dropped centres go to the nearest kept one; then one
    Lloyd step."""
    def nearest(point, allowed):
        options = [k for k in range(len(centres)) if allowed[k]]
        return min(options, key=lambda k: squared(point, centres[k])) if options else -1

    first = [nearest(p, [True] * len(centres)) for p in points]
    in_window = [sum(squared(p, c) <= window_sq for p in points) for c in centres]
    kept = [in_window[k] >= min_size for k in range(len(centres))]
    sizes = [sum(1 for f in first if f == k) for k in range(len(centres))]
    kept = [kept[k] and sizes[k] >= min_size for k in range(len(centres))]
    assigned = [f if f >= 0 and kept[f] else nearest(p, kept) for p, f in zip(points, first)]
    # One Lloyd step: kept centres to the mean of their points, points to the nearest moved one.
    for k in range(len(centres)):
        mine = [p for p, a in zip(points, assigned) if a == k]
        if mine:
            centres[k] = [sum(column) / len(mine) for column in zip(*mine)]
    assigned = [nearest(p, kept) for p in points]
    kept = [kept[k] and k in assigned for k in range(len(centres))]
    return assigned, kept


@pytest.mark.parametrize("trial", range(4))
def test_assign_to_nearest_matches_a_plain_reference(trial):
    generator = torch.Generator().manual_seed(trial)
    counts = [37, 23]  # two images of different sizes
    capacity, dim, window_sq, min_size = 6, 3, 1.0, 5
    found = [4, 6]
    image = torch.cat([torch.full((n,), b) for b, n in enumerate(counts)])
    # Clusters around some centres, a sparse centre and a centre that no point is near.
    centres = torch.randn(2, capacity, dim, generator=generator, dtype=torch.float64) * 2.5
    points = centres[image, torch.randint(0, 3, (image.numel(),), generator=generator)]
    points = points + torch.randn(image.numel(), dim, generator=generator, dtype=torch.float64) * 0.6
    slot, kept, _, _ = _assign_to_nearest(points, image, torch.tensor(counts), centres, torch.tensor(found), min_size,
                                       window_sq)
    start = 0
    for b, n in enumerate(counts):
        mine = points[start:start + n].tolist()
        expected_slot, expected_kept = reference_assign_to_nearest(mine, centres[b, :found[b]].tolist(), window_sq,
                                                                    min_size)
        assert slot[start:start + n].tolist() == expected_slot
        assert kept[b, :found[b]].tolist() == expected_kept
        assert not kept[b, found[b]:].any()
        start += n


def test_nearest_assignment_moves_a_boundary_pixel_to_the_nearer_mode():
    # 1-D, defaults (window and claim radius 1, merge radius 1.5), hand-checked:
    # A: 40 pixels at 0, B: 40 pixels at 1.8, one boundary pixel p at 0.95.
    # Seeds at A first (seed_scores). A's mode = 0.95 / 41 = 0.0232 (p is in
    # its window); B's = (40 * 1.8 + 0.95) / 41 = 1.779; they are 1.756 apart,
    # more than the merge radius. p is 0.927 from A's mode and 0.829 from B's:
    # within the claim radius of both, so A, found first, claims it; the
    # nearest mode is B's, and still after the Lloyd step (A's mean 0, B's
    # 1.779).
    embeddings = torch.zeros(1, 1, 1, 81, dtype=torch.float64)
    embeddings[0, 0, 0, 40:80] = 1.8
    embeddings[0, 0, 0, 80] = 0.95
    foreground = torch.ones(1, 1, 81, dtype=torch.bool)
    scores = torch.zeros(1, 1, 81, dtype=torch.float64)
    scores[0, 0, :40] = 2.0
    scores[0, 0, 40:80] = 1.0
    claimed, _ = cluster_embeddings(embeddings, foreground, seed_scores=scores)
    nearest, _ = cluster_embeddings(embeddings, foreground, seed_scores=scores, assign="nearest")
    assert claimed[0, 0, :40].eq(1).all() and claimed[0, 0, 40:80].eq(2).all()
    assert nearest[0, 0, :40].eq(1).all() and nearest[0, 0, 40:80].eq(2).all()
    assert claimed[0, 0, 80].item() == 1
    assert nearest[0, 0, 80].item() == 2


def reference_neighbour_vote(points, slots, centres, kept, reference, k):
    """The documented vote for one image in Python floats: a point whose nearest kept centre
    is at least _AMBIGUOUS_RATIO of the distance to the second takes the most common slot
    (lowest on ties) among its k nearest reference points, twice, the second round seeing
    the first's result."""
    alive = [c for c, keep in zip(centres, kept) if keep]
    ambiguous = []
    for i, p in enumerate(points):
        distances = sorted(math.sqrt(squared(p, c)) for c in alive)
        if len(distances) > 1 and distances[0] >= _AMBIGUOUS_RATIO * distances[1]:
            ambiguous.append(i)
    voters = {i: sorted(reference, key=lambda j: squared(points[i], points[j]))[:k] for i in ambiguous}
    slots = list(slots)
    for _ in range(2):
        new = {}
        for i in ambiguous:
            counts = [0] * len(centres)
            for j in voters[i]:
                counts[slots[j]] += 1
            new[i] = counts.index(max(counts))
        for i, slot in new.items():
            slots[i] = slot
    return slots


@pytest.mark.parametrize("trial", range(3))
def test_neighbour_vote_matches_a_plain_reference(trial):
    generator = torch.Generator().manual_seed(10 + trial)
    counts, capacity, dim, k = [40, 30], 3, 2, 5
    image = torch.cat([torch.full((n,), b) for b, n in enumerate(counts)])
    centres = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [9.0, 9.0]]] * 2, dtype=torch.float64)
    kept = torch.tensor([[True, True, False], [True, True, True]])
    # Points along the segment between the first two centres, many ambiguous.
    points = torch.rand(image.numel(), dim, generator=generator, dtype=torch.float64) * torch.tensor([2.0, 0.6])
    slots = torch.randint(0, 2, (image.numel(),), generator=generator)
    reference = torch.rand(image.numel(), generator=generator) < 0.6
    voted, voted_kept = _neighbour_vote(points, image, torch.tensor(counts), slots, centres, kept, reference, k)
    start = 0
    for b, n in enumerate(counts):
        mine = range(start, start + n)
        expected = reference_neighbour_vote(points[start:start + n].tolist(), slots[start:start + n].tolist(),
                                            centres[b].tolist(), kept[b].tolist(),
                                            [j - start for j in mine if reference[j]], k)
        assert voted[start:start + n].tolist() == expected
        assert voted_kept[b].tolist() == [kept[b, c].item() and c in expected for c in range(capacity)]
        start += n
    assert not torch.equal(voted, slots)  # the case moves some points


# ----------------------------------------------------------------------------- the merge rule

def reference_joins(mode, count, centres, counts, satellite_radius, window, satellite_ratio=4.0, bridge_ratio=1.5):
    """The documented join rule in Python floats: ``mode`` is a satellite of a found centre
    within satellite_radius holding >= satellite_ratio * count points in its window, or lies
    within ``window`` of the segment between two found centres each holding >= bridge_ratio *
    count (strictly between their ends)."""
    for c, n in zip(centres, counts):
        if squared(mode, c) <= satellite_radius ** 2 and n >= satellite_ratio * count:
            return True
    for a, n_a in zip(centres, counts):
        for b, n_b in zip(centres, counts):
            if n_a < bridge_ratio * count or n_b < bridge_ratio * count:
                continue
            span = [y - x for x, y in zip(a, b)]
            length_sq = sum(s * s for s in span)
            if length_sq == 0:
                continue
            along = sum((m - x) * s for m, x, s in zip(mode, a, span)) / length_sq
            off = [m - x - along * s for m, x, s in zip(mode, a, span)]
            if 0 < along < 1 and sum(o * o for o in off) <= window ** 2:
                return True
    return False


def test_join_rule_matches_a_plain_reference():
    rng = random.Random(5)
    batch, capacity, dim = 64, 5, 2
    centres = torch.tensor([[[rng.uniform(-3, 3) for _ in range(dim)] for _ in range(capacity)]
                            for _ in range(batch)], dtype=torch.float64)
    counts = torch.tensor([[float(rng.choice([10, 40, 90, 200])) for _ in range(capacity)] for _ in range(batch)],
                          dtype=torch.float64)
    num_found = torch.tensor([rng.randint(0, capacity) for _ in range(batch)])
    modes = torch.tensor([[rng.uniform(-3, 3) for _ in range(dim)] for _ in range(batch)], dtype=torch.float64)
    mode_counts = torch.tensor([float(rng.choice([5, 20, 45, 100])) for _ in range(batch)], dtype=torch.float64)
    satellite_radius, window = 2 * DELTA_D, 2 * DELTA_V
    joined = (_beside_a_denser_mode(modes, mode_counts, centres, counts, num_found, satellite_radius ** 2)
              | _on_a_bridge(modes, mode_counts, centres, counts, num_found, window ** 2))
    expected = [reference_joins(modes[b].tolist(), mode_counts[b].item(), centres[b, :num_found[b]].tolist(),
                                counts[b, :num_found[b]].tolist(), satellite_radius, window) for b in range(batch)]
    assert joined.tolist() == expected
    assert 5 < sum(expected) < batch - 5  # the cases exercise both answers


def blobs(*groups, dim=2):
    """Embeddings (1, dim, 1, N) and foreground for groups of (count, position) pixels."""
    columns = [torch.tensor(position, dtype=torch.float64).reshape(dim, 1).expand(dim, count)
               for count, position in groups]
    embeddings = torch.cat(columns, dim=1).reshape(1, dim, 1, -1).contiguous()
    return embeddings, torch.ones(1, 1, embeddings.shape[3], dtype=torch.bool)


@pytest.mark.parametrize("rim, instances_margin, instances_density", [
    # 12 pixels 2.0 from A (100 at 0), beside the segment to B: outside the
    # merge radius 1.5, within 2*delta_d = 3 of a mode 100 / 12 > 4 times
    # denser: a satellite.
    ((12, (0.0, 2.0)), 3, 2),
    # 30 pixels there: 100 / 30 < 4, not a satellite, and not between A and
    # B: an instance of its own either way.
    ((30, (0.0, 2.0)), 3, 3),
    # 30 pixels 1.6 along the segment from A (100 at 0) to B (100 at 5):
    # both at least 1.5 times as dense, the segment within the window: a bridge.
    ((30, (1.6, 0.0)), 3, 2),
    # The same 1.2 off the segment, more than the window (1): its own.
    ((30, (1.6, 1.2)), 3, 3),
])
@pytest.mark.parametrize("search", ["sequential", "parallel"])
def test_satellites_and_bridges_join_the_denser_instance(rim, instances_margin, instances_density, search):
    # Windows of radius 1 hold one group each, so every mode sits on its
    # group and every window count is the group's size; with N <= 512
    # pixels the density estimate is exact. Hand-checked.
    embeddings, foreground = blobs((100, (0.0, 0.0)), (100, (5.0, 0.0)), rim)
    margin, _ = cluster_embeddings(embeddings, foreground, density_seeds=True, assign="nearest", search=search)
    density, _ = cluster_embeddings(embeddings, foreground, **dict(ROBUST, search=search))
    assert metrics.count_instances(margin).item() == instances_margin
    assert metrics.count_instances(density).item() == instances_density
    # A joined rim goes to the nearest mode, A's (at 0).
    rim_label = density[0, 0, 200:]
    assert rim_label.unique().numel() == 1
    if instances_density == 2:
        assert rim_label[0] == density[0, 0, 0]


# ----------------------------------------------------------------------------- density seeds

def test_estimated_density_is_exact_up_to_the_sample_size():
    generator = torch.Generator().manual_seed(3)
    points = torch.randn(300, 3, generator=generator, dtype=torch.float64)
    image = torch.cat([torch.zeros(180, dtype=torch.long), torch.ones(120, dtype=torch.long)])
    pixel = torch.cat([torch.arange(180), torch.arange(120)])
    priority = _seed_priority(pixel, 0)
    estimate = _estimated_density(points, image, torch.tensor([180, 120]), priority, 1.0, samples=512)
    for i in range(300):
        mine = [j for j in range(300) if image[j] == image[i]]
        exact = sum(squared(points[i].tolist(), points[j].tolist()) <= 1.0 for j in mine)
        assert estimate[i].item() == exact
    # Fewer samples than points: the fraction of the image's highest
    # priorities within the window, times its point count.
    estimate = _estimated_density(points, image, torch.tensor([180, 120]), priority, 1.0, samples=50)
    for b, (first, count) in enumerate([(0, 180), (180, 120)]):
        order = sorted(range(first, first + count), key=lambda j: -priority[j].item())[:50]
        for i in range(first, first + count):
            hits = sum(squared(points[i].tolist(), points[j].tolist()) <= 1.0 for j in order)
            assert estimate[i].item() == pytest.approx(hits * count / 50, rel=1e-12)


def test_density_seeds_skip_stray_pixels():
    # Two instances of 60 pixels, and 200 strays, each alone in its window
    # (density 1 < min_size): no stray seeds, so two iterations find both
    # instances, and the strays join the nearest one. In the hashed order the
    # first two seeds are strays here, and nothing is kept.
    rng = random.Random(1)
    strays = [(1, (rng.uniform(-60, 60), rng.uniform(-60, 60))) for _ in range(200)]
    strays = [s for s in strays if min(math.dist(s[1], (0, 0)), math.dist(s[1], (5, 0))) > 2]
    embeddings, foreground = blobs((60, (0.0, 0.0)), (60, (5.0, 0.0)), *strays)
    hashed, _ = cluster_embeddings(embeddings, foreground, max_iterations=2)
    assert metrics.count_instances(hashed).item() < 2
    labels, _ = cluster_embeddings(embeddings, foreground, density_seeds=True, max_iterations=2)
    assert metrics.count_instances(labels).item() == 2
    assert labels[0, 0, :60].eq(labels[0, 0, 0]).all() and labels[0, 0, 60:120].eq(labels[0, 0, 60]).all()
    assert labels[0, 0, 0] != labels[0, 0, 60]
    for k, (_, position) in enumerate(strays):
        nearer_a = math.dist(position, (0, 0)) < math.dist(position, (5, 0))
        assert labels[0, 0, 120 + k] == (labels[0, 0, 0] if nearer_a else labels[0, 0, 60])


# ----------------------------------------------------------------------------- whole calls

@pytest.fixture(scope="module")
def sticks():
    return ScatteredSticks(length=4, image_size=64, seed=4).batch(range(4))


@pytest.mark.parametrize("search", ["sequential", "parallel"])
@pytest.mark.parametrize("mode_points", [None, 200])
def test_robust_options_give_the_ground_truth_on_zero_loss_embeddings(sticks, mode_points, search):
    embeddings, _ = trained_like_embeddings(sticks.labels)
    labels, scores = cluster_embeddings(embeddings, sticks.foreground, **ROBUST, mode_points=mode_points,
                                        search=search)
    assert metrics.symmetric_best_dice(labels, sticks.labels).min().item() == 1.0
    assert torch.equal(labels > 0, sticks.foreground)
    assert torch.all(scores > 0.99)


@pytest.mark.parametrize("search", ["sequential", "parallel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_robust_batched_equals_one_image_at_a_time(sticks, dtype, search):
    embeddings, _ = trained_like_embeddings(sticks.labels, radius=0.9, seed=2)
    embeddings = embeddings.to(dtype)
    options = dict(ROBUST, mode_points=300, search=search)
    batched, batched_scores = cluster_embeddings(embeddings, sticks.foreground, **options)
    for b in range(embeddings.shape[0]):
        alone, scores = cluster_embeddings(embeddings[b:b + 1], sticks.foreground[b:b + 1], **options)
        assert torch.equal(alone[0], batched[b])
        torch.testing.assert_close(scores[0], batched_scores[b, :scores.shape[1]])


@pytest.mark.parametrize("search", ["sequential", "parallel"])
def test_vote_in_an_image_with_fewer_reference_pixels_than_neighbours(search):
    # Image 1 has 12 pixels (fewer than the 16 neighbours asked for) beside
    # image 0's 600: its votes must come from its own pixels only, as when
    # it is clustered alone (image 0's first pixel, in its second slot, must
    # not lend the 4 missing votes to image 1's second slot). 1-D, hand-checked, min_size 3: groups at 0 and
    # 2.5 (5 and 6 pixels; their windows hold 5 and 6, the pixel at 1.3 none
    # but itself, so it never seeds; neither mode is a satellite of the
    # other: 6 < 4 * 5). The pixel at 1.3 is nearer 2.5 (1.2 against 1.3),
    # still after the Lloyd step (2.329: 1.03), a ratio > 0.6: ambiguous.
    # Its 12 nearest (all of image 1) hold 7 of the group at 2.5 with
    # itself and 5 of the group at 0.
    foreground = torch.zeros(2, 1, 600, dtype=torch.bool)
    embeddings = torch.zeros(2, 1, 1, 600)
    foreground[0] = True
    embeddings[0, 0, 0, 250:] = 20.0  # the denser group, found first
    foreground[1, 0, :12] = True
    embeddings[1, 0, 0, 5:11] = 2.5
    embeddings[1, 0, 0, 11] = 1.3
    options = dict(ROBUST, min_size=3, search=search)
    batched, _ = cluster_embeddings(embeddings, foreground, **options)
    alone, _ = cluster_embeddings(embeddings[1:], foreground[1:], **options)
    assert torch.equal(batched[1], alone[0])
    row = alone[0, 0, :12]
    assert row[:5].eq(row[0]).all() and row[5:11].eq(row[5]).all() and row[0] != row[5]
    assert row[11] == row[5]


def test_invalid_robust_arguments_name_the_argument():
    embeddings = torch.zeros(1, 2, 4, 4)
    foreground = torch.ones(1, 4, 4, dtype=torch.bool)
    with pytest.raises(TypeError, match="density_seeds"):
        cluster_embeddings(embeddings, foreground, density_seeds=1)
    with pytest.raises(ValueError, match="density_seeds"):
        cluster_embeddings(embeddings, foreground, density_seeds=True, seed_scores=torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="join"):
        cluster_embeddings(embeddings, foreground, join="nearest")
    with pytest.raises(ValueError, match="assign"):
        cluster_embeddings(embeddings, foreground, assign="lloyd")
    with pytest.raises(ValueError, match="mode_points"):
        cluster_embeddings(embeddings, foreground, assign="nearest", mode_points=0)
    with pytest.raises(ValueError, match="mode_points"):
        cluster_embeddings(embeddings, foreground, assign="nearest", mode_points=2.5)
    with pytest.raises(ValueError, match="mode_points"):
        cluster_embeddings(embeddings, foreground, mode_points=100)  # assign="claim" labels only the sample
    with pytest.raises(ValueError, match="neighbour_vote"):
        cluster_embeddings(embeddings, foreground, assign="nearest", neighbour_vote=-1)
    with pytest.raises(ValueError, match="neighbour_vote"):
        cluster_embeddings(embeddings, foreground, neighbour_vote=8)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("search", ["sequential", "parallel"])
def test_cuda_robust_matches_cpu(sticks, search):
    embeddings, _ = trained_like_embeddings(sticks.labels, radius=0.9, seed=5)
    options = dict(ROBUST, mode_points=300, search=search)
    on_cpu, _ = cluster_embeddings(embeddings, sticks.foreground, **options)
    on_gpu, _ = cluster_embeddings(embeddings.cuda(), sticks.foreground.cuda(), **options)
    assert on_gpu.is_cuda
    assert torch.equal(on_cpu, on_gpu.cpu())
