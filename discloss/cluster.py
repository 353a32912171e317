"""From pixel embeddings to instances: ``cluster_embeddings``.

The discriminative loss pulls every pixel to within delta_v of its instance's
mean and pushes the means of two instances more than 2*delta_d apart. When
delta_d > 2*delta_v, a ball of radius 2*delta_v around any pixel then holds
its whole instance and nothing else, so clustering reduces to: find a centre,
take the pixels near it, repeat (De Brabandere et al. 2017, section 3.3).
Mean shift moves each seed to its cluster's centre first, which makes the
thresholding robust to pixels that the network has not pulled all the way in.

Where the seeds come from matters when some pixels sit far from their
instance (stray pixels, crossings): a seed there can find a spurious mode.
Fathi et al. (2017, "Semantic instance segmentation via deep metric
learning") train a seediness head that scores how good a seed each pixel is;
``seed_scores`` takes such a score map and seeds in descending score.

Where instances touch, a network leaves boundary pixels partway between two
means, and some means closer than 2*delta_d. A seed there finds a spurious
mode that claims pixels of both instances and, within delta_d of the real
modes, absorbs them. The options ``density_seeds`` (seed at dense pixels
first, never at sparse ones), ``join="density"`` (modes that are satellites
of a much denser mode, or lie on a bridge between two, join them) and
``assign="nearest"`` (every pixel to its nearest mode, then one Lloyd step;
``neighbour_vote``: ambiguous pixels take their neighbours' instance)
address this; ``mode_points`` searches the modes on a sample of each image.
``refine="quickshift"`` then lets the ambiguous pixels follow the density to
their instance's core, and the image layout vote on those that moved.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["cluster_embeddings"]

# Points processed at once in the final nearest-centre assignment, which
# needs a (points, centres, E) difference tensor.
_ASSIGN_CHUNK = 1 << 16
# Points of an image that every point is compared with to estimate its
# density (see _estimated_density), and the most (points x samples)
# distances formed at once there.
_DENSITY_SAMPLES = 512
_DENSITY_CHUNK = 1 << 22
# search="parallel": the most (sample x sample) distances formed at once.
_PEAK_CHUNK = 1 << 18
# join="density": how many times denser than a new mode a mode found before
# must be for the new one to count as its satellite (within 2*delta_d) or as
# a bridge between two of them (within the window of their segment). Real
# instances of the hard benchmark's sticks differ in size by up to about 3x.
# Where two small instances' boundary pixels are pulled towards each other
# they meet midway, in a crowd up to about half as dense as the smaller
# instance (the 15% stray set at 128 x 128): hence only 1.5x for a bridge,
# which a real instance rarely lies on.
_SATELLITE_RATIO = 4.0
_BRIDGE_RATIO = 1.5
# search="parallel": a sampled point is a density peak (a seed) when no denser
# sampled point lies within this fraction of the window. With the whole
# window (1.0), an instance whose embedding overlaps a denser one's (an
# undertrained network's, means ~1 apart) has no peak and is lost: on a
# network trained 91 steps on the hard set, SBD 0.745 against 0.787 for the
# sequential search; 0.7 gives 0.784, with the synthetic sets unchanged and
# about 20% more time; 0.5 seeds spurious modes (the 128 px boundary set).
_PEAK_RADIUS = 0.7
# neighbour_vote: a point whose nearest centre is at least this fraction of
# the distance to the second is ambiguous (3-7% of the pixels of the
# synthetic touching sets).
_AMBIGUOUS_RATIO = 0.6
# search="parallel" with join="density": a mode does not join an earlier mode within 2*delta_d
# (as its duplicate, satellite or bridge end) when a density valley lies between them: fewer
# points within _VALLEY_RADIUS * delta_v of a point a quarter, half or three quarters of the way
# than _VALLEY_RATIO times as many as within that radius of either mode (0: no valley test).
_VALLEY_RATIO = 0.3
_VALLEY_RADIUS = 1.0
_VALLEY_COUNT_RATIO = 1.8
# split_instances: the fine window's radius in delta_v (a mode of each instance at least as large
# as the image's median one is searched again with it), and the least window count of a fine mode,
# as a fraction of its instance's densest, that may split off. An undertrained network leaves
# instances' means 1.0-1.7 apart, which the coarse window (2 * delta_v) merges; at 0.7 * delta_v
# their densities dip between them to 0.0-0.3 of the sparser mode's. The fine modes of stray
# clouds and boundary crowds hold 0.1-0.25 of their instance's densest (the synthetic sets of
# benchmarks/cluster_hard.py); those of merged instances 0.3-1.
_SPLIT_RADIUS = 0.7
_SPLIT_COUNT_RATIO = 0.3
# split_instances: the fine density peaks are those of a sample of each searched instance's points
# (its first in the hashed order), as the parallel search's of each image's: the (sample x sample)
# distances, not all (points x points), cost what the step adds.
_SPLIT_SAMPLES = 256
# split_instances: only instances with fewer than this fraction of their points within delta_v of
# their centre are searched again. The pull term puts an instance's pixels within delta_v of its
# mean; the centre of two merged instances lies between them, where few of their pixels do (at
# most 0.29 of the instances split on the hard benchmark's networks, 0.18-0.7 of the rest).
_SPLIT_CONFIDENCE = 0.5
# refine="quickshift": each ambiguous point (as for neighbour_vote, against the instances' means)
# links to the nearest searched point within _LINK_RADIUS * delta_v that has more searched points
# within _DENSITY_RADIUS * delta_v than itself, and takes its instance (quick shift: Vedaldi and
# Soatto 2008); then each point whose instance changed takes the instance most common in its 3^d
# image window. The radii are those of the prototype measured in benchmarks/NOTES.md (issue 18).
_DENSITY_RADIUS = 1.0
_LINK_RADIUS = 2.0
# search="parallel" on CPU tensors: the fused C++ op (discloss::cluster_parallel) instead of the
# torch-op path, which stays for CUDA tensors and as the reference the tests compare it with.
_FUSED_CPU_SEARCH = True


def _check_seed_scores(seed_scores, foreground):
    if not isinstance(seed_scores, torch.Tensor) or not seed_scores.is_floating_point():
        raise TypeError("seed_scores: expected a floating point torch.Tensor of shape (B, *spatial) or None")
    if seed_scores.shape != foreground.shape:
        raise ValueError(f"seed_scores: expected shape {tuple(foreground.shape)} (that of foreground), "
                         f"got {tuple(seed_scores.shape)}")
    if seed_scores.device != foreground.device:
        raise ValueError(f"seed_scores: expected device {foreground.device} (that of embeddings), "
                         f"got {seed_scores.device}")


def _check_inputs(embeddings, foreground, delta_v, delta_d, min_size, bandwidth, threshold,
                  mean_shift_steps, max_iterations):
    if not isinstance(embeddings, torch.Tensor) or not embeddings.is_floating_point():
        raise TypeError("embeddings: expected a floating point torch.Tensor of shape (B, E, *spatial)")
    if embeddings.dim() < 3:
        raise ValueError(f"embeddings: expected shape (B, E, *spatial), got {tuple(embeddings.shape)}")
    if not isinstance(foreground, torch.Tensor) or foreground.dtype != torch.bool:
        raise TypeError("foreground: expected a bool torch.Tensor of shape (B, *spatial) "
                        "(threshold probabilities first, e.g. probability > 0.5)")
    expected = (embeddings.shape[0],) + tuple(embeddings.shape[2:])
    if tuple(foreground.shape) != expected:
        raise ValueError(f"foreground: expected shape {expected} to match embeddings "
                         f"{tuple(embeddings.shape)}, got {tuple(foreground.shape)}")
    if foreground.device != embeddings.device:
        raise ValueError(f"foreground: expected device {embeddings.device} (that of embeddings), "
                         f"got {foreground.device}")
    for name, value in (("delta_v", delta_v), ("delta_d", delta_d), ("bandwidth", bandwidth),
                        ("threshold", threshold)):
        if not value > 0:
            raise ValueError(f"{name}: expected > 0, got {value!r}")
    if not isinstance(min_size, int) or min_size < 0:
        raise ValueError(f"min_size: expected an int >= 0, got {min_size!r}")
    if not isinstance(mean_shift_steps, int) or mean_shift_steps < 0:
        raise ValueError(f"mean_shift_steps: expected an int >= 0, got {mean_shift_steps!r}")
    if not isinstance(max_iterations, int) or max_iterations < 1:
        raise ValueError(f"max_iterations: expected an int >= 1, got {max_iterations!r}")


def _segment_sum(values: torch.Tensor, segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Sum rows of ``values`` (M, ...) into ``num_segments`` bins by ``segment`` (M,)."""
    out = values.new_zeros((num_segments,) + tuple(values.shape[1:]))
    return out.index_add_(0, segment, values)


def _per_image_sum(values: torch.Tensor, points_per_image: torch.Tensor) -> torch.Tensor:
    """Sum float rows of ``values`` (M, ...) per image; points are grouped by image in order.

    A segmented reduction over contiguous runs: on CPU about twice as fast as
    index_add_, and deterministic on CUDA.
    """
    return torch.segment_reduce(values, "sum", lengths=points_per_image, axis=0)


def _per_point(values: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Broadcast per-image ``values`` (B, ...) to the points; index_select is the fastest gather on CPU."""
    return values.index_select(0, image)


def _at(values: torch.Tensor, image: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """``values[image, slot]`` for (B, N, ...) ``values``: one index_select of the flattened rows,
    several times faster on CPU than advanced indexing."""
    return values.flatten(0, 1).index_select(0, image * values.shape[1] + slot)


def _seed_priority(pixel: torch.Tensor, seed: int) -> torch.Tensor:
    """A pseudo-random order of pixel positions: distinct values for distinct positions < 2**32.

    It depends on the position only, so that an image is clustered the same
    alone or in any batch, and it is computed on the pixels' device with no
    O(image size) permutation to build or copy. Multiplying by an odd
    constant modulo 2**32 is a bijection that spreads consecutive positions
    evenly over the range (a Weyl sequence: seeds fall all over the image);
    the xor with a seed-dependent mask, also a bijection, varies the order.
    The constant is below 2**31 so that the int64 product cannot overflow.
    """
    mask = (seed * 0x9E3779B1 + 0x7F4A7C15) & 0xFFFFFFFF
    return ((pixel & 0xFFFFFFFF) * 0x5BD1E995 & 0xFFFFFFFF) ^ mask


def _pick_seeds(open_priority, open_score, image, batch):
    """Per image, the open point of highest score, ties broken by highest priority.

    ``open_priority`` (M,) int64 is -1 at closed points, distinct >= 0
    elsewhere; ``open_score`` (M,) is -inf at closed points (None: priority
    alone). Returns (best priority (B,), -1 where an image has no open
    point; is_best (M,) bool). Two segmented maxima, so no host
    synchronisation: first the best score per image, then the best priority
    among the points that reach it.
    """
    if open_score is not None:
        best_score = torch.full((batch,), -torch.inf, dtype=open_score.dtype, device=open_score.device)
        best_score = best_score.scatter_reduce(0, image, open_score, reduce="amax")
        contender = open_score == _per_point(best_score, image)
        open_priority = torch.where(contender, open_priority, torch.full_like(open_priority, -1))
    best = torch.full((batch,), -1, dtype=torch.long, device=open_priority.device)
    best = best.scatter_reduce(0, image, open_priority, reduce="amax")
    is_best = (open_priority == _per_point(best, image)) & (open_priority >= 0)
    return best, is_best


def _mean_shift(points, image, points_per_image, centres, bandwidth_sq, steps, stop_when_converged):
    """Flat-kernel mean shift of one centre per image over all its points.

    With a flat kernel a centre whose window keeps the same points stays
    exactly where it is, so a step that moves no centre ends the search;
    testing that costs a host synchronisation, hence only when asked (CPU).
    """
    for _ in range(steps):
        offsets = points - _per_point(centres, image)
        inside = ((offsets * offsets).sum(dim=1) <= bandwidth_sq).to(points.dtype)
        sums = _per_image_sum(points * inside.unsqueeze(1), points_per_image)
        counts = _per_image_sum(inside, points_per_image).unsqueeze(1)
        # An empty window (possible only in degenerate cases) keeps its centre.
        shifted = torch.where(counts > 0, sums / counts.clamp(min=1.0), centres)
        if stop_when_converged and torch.equal(shifted, centres):
            break
        centres = shifted
    return centres


def _nearest_centre(points, image, centres, kept):
    """Index of the nearest kept centre of each point's image, -1 if none.

    points (P, E), image (P,), centres (B, K, E), kept (B, K) bool.
    """
    nearest = torch.full((points.shape[0],), -1, dtype=torch.long, device=points.device)
    for start in range(0, points.shape[0], _ASSIGN_CHUNK):
        stop = start + _ASSIGN_CHUNK
        offsets = points[start:stop].unsqueeze(1) - centres[image[start:stop]]
        distance_sq = (offsets * offsets).sum(dim=2)
        distance_sq = distance_sq.masked_fill(~kept[image[start:stop]], float("inf"))
        best_sq, best = distance_sq.min(dim=1)
        nearest[start:stop] = torch.where(torch.isfinite(best_sq), best, torch.full_like(best, -1))
    return nearest


def _position_in_image(image: torch.Tensor, points_per_image: torch.Tensor) -> torch.Tensor:
    """Index of each point within its image; points are grouped by image in order."""
    if points_per_image.shape[0] == 1:
        return torch.arange(image.numel(), device=image.device)
    offsets = torch.cumsum(points_per_image, 0) - points_per_image
    return torch.arange(image.numel(), device=image.device) - _per_point(offsets, image)


def _rank_in_image(image, points_per_image, priority):
    """Rank of each point within its image by descending ``priority`` (>= -1): one sort of a combined key."""
    key = image * (1 << 33) + ((1 << 32) - 1 - priority)
    order = torch.argsort(key)
    rank = torch.empty_like(order)
    rank[order] = _position_in_image(image[order], points_per_image)
    return rank


def _estimated_density(points, image, points_per_image, priority, bandwidth_sq, samples):
    """Per point, an estimate of how many points of its image lie within ``bandwidth`` of it.

    Exact counts cost O(points^2) distances per image; instead each point is
    compared with ``samples`` points of its image (those of highest hashed
    priority, so that an image's estimate does not depend on the rest of the
    batch) and the fraction inside the window is scaled to the image's point
    count. An instance of n points in an image of N holds about
    n * samples / N of the samples, so one that could be kept (n >= min_size)
    goes unsampled with probability about exp(-min_size * samples / N).
    The distances come from one padded (B, points, samples) batched product,
    in chunks of points to bound memory; one host synchronisation sizes it.
    """
    batch, dim = points_per_image.shape[0], points.shape[1]
    position = _position_in_image(image, points_per_image)
    rank = _rank_in_image(image, points_per_image, priority)
    sampled = rank < samples
    # d^2 <= bandwidth^2  <=>  [x, |x|^2, 1] . [2s, -1, bandwidth^2 - |s|^2] >= 0, so one batched
    # product per (point, sample) pair (> 0 counted: a pair at exactly the
    # window's edge is not, which an estimate can afford); an unused sample
    # slot is [0, 0, -1], negative for every point.
    sample_count = points_per_image.clamp(max=samples)
    sample_rows = points.new_zeros(batch, samples, dim + 2)
    sample_rows[..., dim + 1] = -1.0
    chosen = points[sampled]
    sample_rows[image[sampled], rank[sampled]] = torch.cat(
        [2.0 * chosen, -torch.ones_like(chosen[:, :1]),
         (bandwidth_sq - (chosen * chosen).sum(dim=1, keepdim=True))], dim=1)
    most = int(points_per_image.max())  # one synchronisation
    point_rows = points.new_ones(batch, most, dim + 2)
    point_rows[image, position, :dim] = points
    point_rows[image, position, dim] = (points * points).sum(dim=1)
    sample_rows = sample_rows.transpose(1, 2)
    hits = points.new_zeros(batch, most)
    chunk = max(1, _DENSITY_CHUNK // max(batch * samples, 1))
    for first in range(0, most, chunk):
        # clamp, sign, sum: in place and about 3x faster on CPU than comparing and summing bools.
        product = torch.bmm(point_rows[:, first:first + chunk], sample_rows)
        hits[:, first:first + chunk] = product.clamp_(min=0).sign_().sum(dim=2)
    scale = points_per_image.to(points.dtype) / sample_count.clamp(min=1).to(points.dtype)
    return hits[image, position] * _per_point(scale, image)


def _next_seeds(points, image, points_per_image, visited, priority, score, min_seeds):
    """One seed per image: the unvisited open point of highest score, then priority.

    An image gets none once it has fewer than ``min_seeds`` unvisited points
    (they could not make an instance that is kept) or no open point left.
    Returns is_seed (M,) bool, has_seed (B,) bool, point_has_seed (M,) bool
    and the seeds' embeddings (B, E), zero where an image has none.
    """
    batch = points_per_image.shape[0]
    unvisited_count = _per_image_sum((~visited).to(points.dtype), points_per_image)
    open_priority = torch.where(visited, torch.full_like(priority, -1), priority)
    open_score = None if score is None else torch.where(visited, torch.full_like(score, -torch.inf), score)
    best, is_best = _pick_seeds(open_priority, open_score, image, batch)
    has_seed = (best >= 0) & (unvisited_count >= min_seeds)
    point_has_seed = _per_point(has_seed, image)
    is_seed = is_best & point_has_seed
    seeds = _per_image_sum(points * is_seed.unsqueeze(1).to(points.dtype), points_per_image)
    return is_seed, has_seed, point_has_seed, seeds


def _window_count(points, image, points_per_image, centre, bandwidth_sq):
    """Points of each image within the window around its ``centre`` (B, E): (B,) float."""
    offsets = points - _per_point(centre, image)
    inside = ((offsets * offsets).sum(dim=1) <= bandwidth_sq).to(points.dtype)
    return _per_image_sum(inside, points_per_image)


def _beside_a_denser_mode(mode, mode_count, centres, centre_counts, num_found, radius_sq):
    """(B,) bool: a mode found before lies within sqrt(radius_sq) of ``mode`` and has at least
    _SATELLITE_RATIO times as many points in its window.

    The push term leaves the means of two instances 2*delta_d apart; a mode
    nearer than that to a much denser one is a satellite of it (a crowd of
    pixels that the network left partway out), not an instance of its own.
    mode (B, E), mode_count (B,), centres (B, K, E), centre_counts (B, K).
    """
    capacity = centres.shape[1]
    found = torch.arange(capacity, device=centres.device).unsqueeze(0) < num_found.unsqueeze(1)
    offsets = centres - mode.unsqueeze(1)
    near = (offsets * offsets).sum(dim=2) <= radius_sq
    return (found & near & (centre_counts >= _SATELLITE_RATIO * mode_count.unsqueeze(1))).any(dim=1)


def _on_a_bridge(mode, mode_count, centres, centre_counts, num_found, radius_sq):
    """(B,) bool: ``mode`` lies within sqrt(radius_sq) of the segment between two modes found
    before, each with at least _BRIDGE_RATIO times as many points in its window.

    Where instances a and b touch, the network puts a's boundary pixels
    partway towards b's mean: on the segment between the two means. A rim
    of them is a small density peak of its own that mean shift settles on,
    and a spurious instance if kept. A small instance of its own lies on
    such a segment only if its mean happens to be in line with two others.
    mode (B, E), mode_count (B,), centres (B, K, E), centre_counts (B, K).
    """
    capacity = centres.shape[1]
    found = torch.arange(capacity, device=centres.device).unsqueeze(0) < num_found.unsqueeze(1)
    denser = found & (centre_counts >= _BRIDGE_RATIO * mode_count.unsqueeze(1))  # (B, K)
    start = centres.unsqueeze(2)  # a, (B, K, 1, E)
    span = centres.unsqueeze(1) - start  # b - a, (B, K, K, E)
    to_mode = mode.unsqueeze(1).unsqueeze(1) - start
    length_sq = (span * span).sum(dim=3)
    along = (to_mode * span).sum(dim=3) / length_sq.clamp(min=torch.finfo(centres.dtype).tiny)
    off = to_mode - along.unsqueeze(3) * span
    between = (along > 0) & (along < 1) & ((off * off).sum(dim=3) <= radius_sq)
    pairs = denser.unsqueeze(2) & denser.unsqueeze(1)
    return (between & pairs).flatten(1).any(dim=1)


def _add_or_join_mode(centres, num_found, mode, has_seed, merge_sq, join=None):
    """File each image's new ``mode`` (B, E): a new slot, or the slot of the nearest mode found.

    The means of two instances are pushed 2*delta_d apart, so a mode within
    delta_d (sqrt(merge_sq)) of one already found is the same instance seen
    from another seed; ``join`` (B,) bool, when given, joins more (modes on
    a bridge, ``_on_a_bridge``). centres (B, capacity, E) and num_found (B,)
    are updated for images with ``has_seed``; returns (slot (B,), is_new
    (B,), centres, num_found). A full image (num_found == capacity) only
    joins.
    """
    capacity = centres.shape[1]
    slot_ids = torch.arange(capacity, device=centres.device)
    batch_ids = torch.arange(centres.shape[0], device=centres.device)
    to_existing = centres - mode.unsqueeze(1)
    existing_sq = (to_existing * to_existing).sum(dim=2)
    existing_sq = existing_sq.masked_fill(slot_ids.unsqueeze(0) >= num_found.unsqueeze(1), float("inf"))
    nearest_sq, nearest_slot = existing_sq.min(dim=1)
    duplicate = nearest_sq <= merge_sq
    if join is not None:
        duplicate = duplicate | (join & torch.isfinite(nearest_sq))
    is_new = has_seed & ~duplicate
    slot = torch.where(duplicate, nearest_slot, num_found)
    write_slot = num_found.clamp(max=capacity - 1)
    centres = centres.clone()
    centres[batch_ids, write_slot] = torch.where(is_new.unsqueeze(1), mode, centres[batch_ids, write_slot])
    return slot, is_new, centres, num_found + is_new.long()


def _claim(points, image, mode, seeds, slot, point_label, visited, is_seed, point_has_seed,
           threshold_sq, merge_sq, bandwidth_sq):
    """Label the unvisited points within the threshold of each image's ``mode`` with ``slot`` + 1.

    Points within delta_d of a mode cannot seed a new instance (its mode
    would be a duplicate), nor can the seed's own window, which the first
    mean shift step used: they are marked visited, claimed or not, and left
    to the final assignment, so that stray points cost no iterations of
    their own. Returns (point_label, visited).
    """
    offsets = points - _per_point(mode, image)
    distance_sq = (offsets * offsets).sum(dim=1)
    claim = (distance_sq <= threshold_sq) & ~visited & point_has_seed
    point_label = torch.where(claim, _per_point(slot, image) + 1, point_label)
    offsets = points - _per_point(seeds, image)
    around_seed = (offsets * offsets).sum(dim=1) <= bandwidth_sq
    visited = visited | ((distance_sq <= merge_sq) | around_seed | is_seed) & point_has_seed
    return point_label, visited


def _find_modes(points, image, points_per_image, priority, score, *, bandwidth_sq, threshold_sq, merge_sq,
                mean_shift_steps, max_iterations, min_size, join_density=False, density=None):
    """The seed / mean shift / claim loop, every image at once.

    With ``join_density``, modes also join as satellites or bridges
    (``_beside_a_denser_mode``, ``_on_a_bridge``); given each point's
    ``density`` (M,) too (points within the window, estimated), a point
    within 2*delta_d of a mode at least _SATELLITE_RATIO times denser than
    itself is marked visited: its own mode would be a satellite of that one,
    so the many boundary points between touching instances cost no
    iterations.

    Returns centres (B, max_iterations, E), num_found (B,) (slots
    0..num_found-1 hold a mode) and point_label (M,) (0: unclaimed, else the
    claiming slot + 1). The only host synchronisation is the check whether
    any image still has a seed: every iteration on CPU, every 8 on CUDA.
    """
    batch, dim = points_per_image.shape[0], points.shape[1]
    device = points.device
    centres = points.new_zeros(batch, max_iterations, dim)
    num_found = torch.zeros(batch, dtype=torch.long, device=device)
    point_label = torch.zeros(points.shape[0], dtype=torch.long, device=device)
    visited = torch.zeros(points.shape[0], dtype=torch.bool, device=device)
    check_every = 8 if device.type == "cuda" else 1
    if join_density:
        counts = points.new_zeros(batch, max_iterations)
        batch_ids = torch.arange(batch, device=device)
    for iteration in range(max_iterations):
        is_seed, has_seed, point_has_seed, seeds = _next_seeds(points, image, points_per_image, visited, priority,
                                                               score, max(min_size, 1))
        mode = _mean_shift(points, image, points_per_image, seeds, bandwidth_sq, mean_shift_steps,
                           stop_when_converged=device.type == "cpu")
        join = None
        if join_density:
            count = _window_count(points, image, points_per_image, mode, bandwidth_sq)
            join = (_beside_a_denser_mode(mode, count, centres, counts, num_found, 4.0 * merge_sq)
                    | _on_a_bridge(mode, count, centres, counts, num_found, bandwidth_sq))
        slot, is_new, centres, num_found = _add_or_join_mode(centres, num_found, mode, has_seed, merge_sq, join)
        if join_density:
            write_slot = slot.clamp(max=max_iterations - 1)
            counts[batch_ids, write_slot] = torch.where(is_new, count, counts[batch_ids, write_slot])
        point_label, visited = _claim(points, image, mode, seeds, slot, point_label, visited, is_seed,
                                      point_has_seed, threshold_sq, merge_sq, bandwidth_sq)
        if join_density and density is not None:
            offsets = points - _per_point(centres[batch_ids, write_slot], image)
            near = (offsets * offsets).sum(dim=1) <= 4.0 * merge_sq
            sparser = _SATELLITE_RATIO * density <= _per_point(counts[batch_ids, write_slot], image)
            visited = visited | near & sparser & point_has_seed
        if (iteration + 1) % check_every == 0 and not bool(has_seed.any()):
            break
    return centres, num_found, point_label


def _density_peaks(points, image, points_per_image, priority, rank, image_size, bandwidth_sq, samples, min_density,
                   most_seeds, peak_threshold=None):
    """Seeds of the parallel search: the density peaks of each image's sample of points.

    The sample is each image's first ``samples`` points in the hashed order,
    those that _estimated_density compares every point with; a sampled
    point's density is estimated as there (the fraction of the sample within
    the window, times ``image_size`` (B,), the image's foreground pixels),
    from the (B, samples, samples) distances among the sample alone. A
    sampled point with density >= ``min_density`` is a peak when no other
    such point within _PEAK_RADIUS of the window is denser (ties: higher
    priority). Inside
    an instance's core the densest sampled point beats the rest, so an
    instance yields one or a few peaks; a crowd of boundary points yields a
    peak only where it is denser than everything around it, and a stray
    point none. At most ``most_seeds`` peaks per image, densest first.
    ``rank`` (M,) is each point's rank in its image by descending
    ``priority`` (_rank_in_image). Returns (seeds (B, S, E), valid (B, S)
    bool); two host synchronisations size them.
    """
    batch, dim = points_per_image.shape[0], points.shape[1]
    sampled = rank < samples
    chosen = sampled.nonzero(as_tuple=True)[0]
    chosen_image = image.index_select(0, chosen)
    chosen_count = torch.bincount(chosen_image, minlength=batch)
    most = int(chosen_count.max())  # one synchronisation
    rows = _padded(points.index_select(0, chosen), chosen_image, chosen_count, most)
    key_priority = _padded(priority.index_select(0, chosen) + 1, chosen_image, chosen_count, most) - 1  # -1: padding
    valid = key_priority >= 0
    # bandwidth^2 - |x - s|^2 = [x, |x|^2, 1] . [2s, -1, bandwidth^2 - |s|^2]: one batched product;
    # a padding column is [0, 0, -1], negative for every row.
    squared = (rows * rows).sum(dim=2, keepdim=True)
    left = torch.cat([rows, squared, torch.ones_like(squared)], dim=2)
    right = torch.cat([2.0 * rows, -torch.ones_like(squared), bandwidth_sq - squared], dim=2)
    right = right.masked_fill(~valid.unsqueeze(2), 0.0)
    right[..., -1].masked_fill_(~valid, -1.0)
    right = right.transpose(1, 2)
    # The (samples x samples) products in chunks of images that stay in cache (1 MiB: one image
    # of 512 samples in float32), each made twice (for the densities, then for the peaks) when
    # there is more than one chunk: 5x faster for a batch of 10 than one product of the batch.
    step = max(1, _PEAK_CHUNK // max(most * most, 1))
    chunks = [slice(first, first + step) for first in range(0, batch, step)]
    products = [torch.bmm(left[chunk], right[chunk]) for chunk in chunks[:1]]  # (chunk, samples, samples)
    # 1.0 within the window, else 0.0: written as floats at once, 4x faster on CPU than a bool
    # tensor converted or summed.
    density = torch.cat([torch.ge(product, 0, out=torch.empty_like(product)).sum(dim=2)
                         for product in products + [torch.bmm(left[chunk], right[chunk]) for chunk in chunks[1:]]])
    scale = image_size.to(points.dtype) / chosen_count.clamp(min=1).to(points.dtype)
    density = density * scale.unsqueeze(1)
    candidate = valid & (density >= min_density)
    # Rank the candidates by (density, priority): value most - rank for the densest, ..., 0
    # for the rest; i is beaten when a point within its window has a higher value.
    key = torch.where(candidate, density, torch.full_like(density, -1.0))
    by_priority = key_priority.argsort(dim=1, descending=True, stable=True)
    order = torch.gather(by_priority, 1, torch.gather(key, 1, by_priority).argsort(dim=1, descending=True,
                                                                                  stable=True))
    value = torch.arange(most, 0, -1, device=points.device, dtype=points.dtype).expand(batch, -1)
    value = torch.zeros_like(density).scatter_(1, order, value) * candidate
    # d^2 <= (_PEAK_RADIUS * bandwidth)^2  <=>  bandwidth^2 - d^2 >= (1 - _PEAK_RADIUS^2) * bandwidth^2
    threshold = (1.0 - _PEAK_RADIUS ** 2) * bandwidth_sq if peak_threshold is None else peak_threshold
    beaten = []
    for index, chunk in enumerate(chunks):
        product = products[0] if len(chunks) == 1 else torch.bmm(left[chunk], right[chunk])
        near = torch.ge(product, threshold, out=torch.empty_like(product))
        beaten.append((near * value[chunk].unsqueeze(1)).amax(dim=2) > value[chunk])
    beaten = torch.cat(beaten)
    peak = candidate & ~beaten
    count = min(max(int(peak.sum(dim=1).max()), 1), most_seeds)  # one synchronisation
    # Peaks densest first.
    pick = torch.where(peak, value, torch.zeros_like(value)).argsort(dim=1, descending=True)[:, :count]
    return torch.gather(rows, 1, pick.unsqueeze(2).expand(-1, -1, dim)), torch.gather(peak, 1, pick)


def _mean_shift_many(points, image, points_per_image, centres, valid, bandwidth_sq, steps, stop_when_converged):
    """Flat-kernel mean shift of many centres per image at once, (B, S, E).

    Each step is two batched products over the padded points: the window
    test 2 x.c - |x|^2 >= |c|^2 - bandwidth^2 (|x - c| <= bandwidth), then
    the window sums and counts. A valid centre's window is never empty (its
    seed, then a point within the window of which it is the mean). Returns
    the centres and the number of points in each final window, (B, S) (0
    where not ``valid``). On CPU the search stops once no centre moves (one
    host synchronisation per step). About 15 operations a step, whatever
    the number of centres: on small images their dispatch costs more than
    the arithmetic.
    """
    dim = points.shape[1]
    most = int(points_per_image.max())  # one synchronisation
    # A padding row is all zeros in ``rows``: inside a window or not, it adds nothing to the sums and counts.
    rows = _padded(torch.cat([points, torch.ones_like(points[:, :1])], dim=1), image, points_per_image, most)
    doubled = (2.0 * rows[..., :dim]).transpose(1, 2)  # (B, E, most)
    minus_squared = -_padded((points * points).sum(dim=1), image, points_per_image, most).unsqueeze(1)
    invalid = ~valid.unsqueeze(2)
    inside = points.new_empty(centres.shape[0], centres.shape[1], most)
    for step in range(steps + 1):
        # An invalid centre's limit is +inf: its window is empty.
        limit = ((centres * centres).sum(dim=2, keepdim=True) - bandwidth_sq).masked_fill_(invalid, torch.inf)
        torch.ge(torch.baddbmm(minus_squared, centres, doubled), limit, out=inside)
        sums = torch.bmm(inside, rows)
        counts = sums[..., dim]
        if step == steps:
            break
        shifted = sums[..., :dim] / counts.clamp(min=1.0).unsqueeze(2)  # invalid centres go to 0 and stay
        if stop_when_converged and torch.equal(shifted, centres):
            break
        centres = shifted
    return centres, counts


def _window_counts(points, image, points_per_image, probes, probe_image, radius_sq):
    """Points of each probe's image within sqrt(radius_sq) of the probe, (probes,) float: one
    padded batched product (|x - p|^2 <= r^2 <=> 2 x.p - |x|^2 >= |p|^2 - r^2, as the mean shift's
    window test)."""
    batch = points_per_image.shape[0]
    probe_count = torch.bincount(probe_image, minlength=batch)
    most, most_probes = int(points_per_image.max()), int(probe_count.max())  # one synchronisation
    ones = _padded(torch.ones_like(points[:, 0]), image, points_per_image, most).unsqueeze(2)  # 0 at padding
    doubled = (2.0 * _padded(points, image, points_per_image, most)).transpose(1, 2)
    minus_squared = -_padded((points * points).sum(dim=1), image, points_per_image, most).unsqueeze(1)
    rows = _padded(probes, probe_image, probe_count, most_probes)
    limit = (rows * rows).sum(dim=2, keepdim=True) - radius_sq
    inside = torch.ge(torch.baddbmm(minus_squared, rows, doubled), limit).to(points.dtype)
    within = torch.bmm(inside, ones).squeeze(2)
    return _at(within.unsqueeze(2), probe_image, _position_in_image(probe_image, probe_count)).reshape(-1)


def _valley_between(points, image, points_per_image, start, end, pair_image, radius_sq):
    """Per pair of modes (start, end: (P, E), of image pair_image): a density valley lies between
    them, (P,) bool: a probe a quarter, half or three quarters of the way holds fewer than
    _VALLEY_RATIO times the smaller of the two modes' window counts (sqrt(radius_sq)), as in
    csrc/cpu/cluster.cpp. One batched window test of all pairs' probes."""
    # Per pair: the two modes, then the three probes.
    probes = torch.stack([start, end] + [start + t * (end - start) for t in (0.25, 0.5, 0.75)], dim=1)
    within = _window_counts(points, image, points_per_image, probes.flatten(0, 1), pair_image.repeat_interleave(5),
                            radius_sq).reshape(-1, 5)
    ends = torch.minimum(within[:, 0], within[:, 1])
    return within[:, 2:].amin(dim=1) < _VALLEY_RATIO * ends


def _valleys(modes, counts, valid, distance_sq, points, image, points_per_image, radius_sq, reach_sq):
    """valley[b, i, j] (i before j in the filing order): a density valley separates modes i and j.

    Only pairs within sqrt(reach_sq) whose window counts are comparable (the
    earlier one less than _VALLEY_COUNT_RATIO times the later one's: a mode
    much sparser than its neighbour is a satellite, whatever lies between)
    are tested. The test counts the points within sqrt(radius_sq) of each
    mode and of the probes a quarter, half and three quarters of the way from
    mode i to mode j: a valley is a probe with fewer than _VALLEY_RATIO times
    the smaller of the two modes' counts. Where two instances' embeddings
    overlap (an undertrained network's means 1.3-1.7 apart) mean shift
    still finds two modes, but the margin and bridge rules would join them;
    between two modes of one instance (a crowd of its boundary pixels) the
    density does not dip. One batched window test of the probes of all
    tested pairs (three host synchronisations: the pairs, and the sizes of two padded tensors).
    """
    count = modes.shape[1]
    earlier = torch.arange(count, device=modes.device)
    earlier = earlier.unsqueeze(1) < earlier.unsqueeze(0)
    tested = (earlier & (distance_sq <= reach_sq) & valid.unsqueeze(2) & valid.unsqueeze(1)
              & (counts.unsqueeze(2) < _VALLEY_COUNT_RATIO * counts.unsqueeze(1)))
    pair_image, first, second = tested.nonzero(as_tuple=True)  # one synchronisation; grouped by image
    valley = torch.zeros_like(tested)
    if pair_image.numel() == 0:
        return valley
    valley[pair_image, first, second] = _valley_between(points, image, points_per_image, modes[pair_image, first],
                                                        modes[pair_image, second], pair_image, radius_sq)
    return valley


def _file_modes(modes, counts, valid, merge_sq, bandwidth_sq, join_density, capacity, valley_points=None,
                valley_radius_sq=None):
    """Which modes are instances, filed densest first: the rule of _add_or_join_mode without a loop.

    A mode joins (is no new instance) when an earlier new mode lies within
    delta_d (sqrt(merge_sq)) of it; with ``join_density`` also when an
    earlier new mode within 2*delta_d is _SATELLITE_RATIO times denser, or
    when it lies within the window of the segment between two earlier new
    modes each _BRIDGE_RATIO times denser (_beside_a_denser_mode,
    _on_a_bridge). Whether a mode is new depends only on the modes before
    it, so iterating the rule from "all new" fixes one more mode each round
    at least: at most S rounds, usually two or three (one host
    synchronisation each). The first ``capacity`` new modes are kept.
    Returns (centres (B, capacity, E), num_found (B,)).
    """
    batch, count, dim = modes.shape
    key = torch.where(valid, counts, torch.full_like(counts, -1.0))
    order = key.argsort(dim=1, descending=True, stable=True)
    modes = torch.gather(modes, 1, order.unsqueeze(2).expand(-1, -1, dim))
    counts, valid = torch.gather(counts, 1, order), torch.gather(valid, 1, order)
    index = torch.arange(count, device=modes.device)
    earlier = (index.unsqueeze(1) < index.unsqueeze(0)) & valid.unsqueeze(2)  # [b, i, j]: i before j
    gram = torch.bmm(modes, modes.transpose(1, 2))
    squared = gram.diagonal(dim1=1, dim2=2)
    distance_sq = squared.unsqueeze(2) + squared.unsqueeze(1) - 2.0 * gram
    joins = earlier & (distance_sq <= merge_sq)
    bridge = None
    valley = None
    if join_density and valley_points is not None and _VALLEY_RATIO > 0:
        valley = _valleys(modes, counts, valid, distance_sq, *valley_points, valley_radius_sq, 4.0 * merge_sq)
    if join_density:
        joins = joins | earlier & (distance_sq <= 4.0 * merge_sq) & (
            counts.unsqueeze(2) >= _SATELLITE_RATIO * counts.unsqueeze(1))
        # bridge[b, i, k, j]: j within the window of the segment from mode i to mode k.
        # (m_j - m_i).(m_k - m_i) = G_jk - G_ji - G_ik + G_ii; off^2 = |m_j - m_i|^2 - dot^2 / |m_k - m_i|^2.
        dot = (gram.unsqueeze(1) - gram.unsqueeze(2) - gram.unsqueeze(3)
               + squared.unsqueeze(2).unsqueeze(3))  # [b, i, k, j]
        length_sq = distance_sq.unsqueeze(3)
        along = dot / length_sq.clamp(min=torch.finfo(modes.dtype).tiny)
        off_sq = distance_sq.unsqueeze(2) - along * dot
        denser = earlier & (counts.unsqueeze(2) >= _BRIDGE_RATIO * counts.unsqueeze(1))  # [b, i, j]
        bridge = (along > 0) & (along < 1) & (off_sq <= bandwidth_sq) & denser.unsqueeze(2) & denser.unsqueeze(1)
        if valley is not None:
            joins = joins & ~valley
            bridge = bridge & ~valley.unsqueeze(2) & ~valley.unsqueeze(1)
    new = valid
    for _ in range(count + 1):
        blocked = (joins & new.unsqueeze(2)).any(dim=1)
        if bridge is not None:
            pair = new.unsqueeze(2) & new.unsqueeze(1)
            blocked = blocked | (bridge & pair.unsqueeze(3)).flatten(1, 2).any(dim=1)
        updated = valid & ~blocked
        if torch.equal(updated, new):
            break
        new = updated
    new = new & (torch.cumsum(new.long(), dim=1) <= capacity)
    slot = torch.cumsum(new.long(), dim=1) - 1
    centres = modes.new_zeros(batch, capacity + 1, dim)
    # Modes that are not new go to the spare last slot, which is cut off.
    target = torch.where(new, slot, torch.full_like(slot, capacity))
    centres.scatter_(1, target.unsqueeze(2).expand(-1, -1, dim), modes)
    return centres[:, :capacity], new.sum(dim=1)


def _slot_sizes(slot_of_point, image, capacity, batch):
    """Points per (image, slot), (B, capacity); points with slot -1 are not counted."""
    has_slot = slot_of_point >= 0
    segment = image * capacity + slot_of_point.clamp(min=0)
    return _segment_sum(has_slot.long(), segment, batch * capacity).reshape(batch, capacity)


def _assign_by_claim(points, image, centres, num_found, point_label, min_size):
    """The paper's assignment: each point keeps the instance that claimed it first.

    Instances with fewer than ``min_size`` points are dropped; their points
    and those no instance claimed join the nearest kept centre. Returns
    (slot_of_point (M,), -1 where no instance is kept in the image; kept
    (B, capacity) bool; centres, as given).
    """
    batch, capacity = centres.shape[:2]
    slot_ids = torch.arange(capacity, device=points.device)
    sizes = _slot_sizes(point_label - 1, image, capacity, batch)
    kept = (sizes >= max(min_size, 1)) & (slot_ids.unsqueeze(0) < num_found.unsqueeze(1))
    slot_of_point = point_label - 1
    in_kept = (slot_of_point >= 0) & _at(kept, image, slot_of_point.clamp(min=0))
    return _join_nearest(points, image, centres, kept, torch.where(in_kept, slot_of_point, -1)), kept, centres


def _padded(values, image, points_per_image, most):
    """Rows of ``values`` (M, ...) grouped by image, as (B, most, ...) with zeros after each image's rows.

    One image's rows need no padding: then the result is a view of ``values``.
    """
    if points_per_image.shape[0] == 1 and values.shape[0] == most:
        return values.unsqueeze(0)
    out = values.new_zeros((points_per_image.shape[0], most) + tuple(values.shape[1:]))
    out.flatten(0, 1).index_copy_(0, image * most + _position_in_image(image, points_per_image), values)
    return out


def _closeness(points, image, points_per_image, centres, found, layout=None):
    """(M, K): |x|^2 - |x - c|^2 = 2 x.c - |c|^2 for each point and its image's centres, -inf where not found.

    One padded (B, points, K) batched product, where a (points, K, E)
    difference tensor would be E times larger. ``layout``: the points'
    padded rows and where each point lies among them (_padded_layout), made
    here when None (one host synchronisation sizes them).
    """
    rows, where = layout if layout is not None else _padded_layout(points, image, points_per_image)
    columns = torch.cat([2.0 * centres, -(centres * centres).sum(dim=2, keepdim=True)], dim=2)
    closeness = torch.bmm(rows, columns.transpose(1, 2)).flatten(0, 1).index_select(0, where)
    return closeness.masked_fill(~_per_point(found, image), -torch.inf)


def _padded_layout(points, image, points_per_image):
    """The rows [x, 1] of each image's points, (B, most, E + 1), and each point's row there
    (image * most + position in the image)."""
    most = int(points_per_image.max())  # one synchronisation
    where = image * most + _position_in_image(image, points_per_image)
    rows = _padded(torch.cat([points, torch.ones_like(points[:, :1])], dim=1), image, points_per_image, most)
    return rows, where


def _nearest_of(closeness):
    """Index of the largest closeness per row (the nearest centre), -1 where every entry is -inf."""
    best, nearest = closeness.max(dim=1)
    return torch.where(torch.isfinite(best), nearest, torch.full_like(nearest, -1))


def _ambiguous(points, closeness):
    """(M,) bool: the point's nearest centre is not clearly nearer than the second (distance ratio >=
    _AMBIGUOUS_RATIO). ``closeness`` (M, K) as _closeness, -inf at the centres not counted; a point
    with fewer than two centres is never ambiguous."""
    # The two largest per row: two maxima are several times faster on CPU than topk.
    best, nearest = closeness.max(dim=1)
    second = closeness.scatter(1, nearest.unsqueeze(1), -torch.inf).amax(dim=1)
    squared = (points * points).sum(dim=1)
    nearest_sq = squared - best
    second_sq = squared - second
    return (nearest_sq >= _AMBIGUOUS_RATIO ** 2 * second_sq) & torch.isfinite(second_sq)


def _neighbour_vote(points, image, points_per_image, slot_of_point, centres, kept, reference, neighbours,
                    closeness=None):
    """Ambiguous points take the most common instance among their nearest reference points, twice.

    A point is ambiguous when its nearest kept centre is not clearly nearer
    than the second (distance ratio >= _AMBIGUOUS_RATIO): where two touching
    instances' boundary pixels overlap, the nearest centre splits them at the
    midpoint, while the instance whose pixels crowd around a point is the
    likelier owner (a k-nearest-neighbour vote follows the local density,
    as density-based clustering does). ``reference`` (M,) bool marks the
    points voted among (the searched sample); each ambiguous point compares
    itself with every reference point of its image: one padded batched
    product per chunk of ambiguous points. The second round sees the first
    round's votes. ``closeness``: _closeness of the points to ``centres``
    when known (only the kept centres are read). Returns (slot_of_point,
    kept), kept without the centres left with no point.
    """
    batch, capacity = kept.shape
    if closeness is None:
        closeness = _closeness(points, image, points_per_image, centres, kept)
    else:
        closeness = closeness.masked_fill(~_per_point(kept, image), -torch.inf)
    which = _ambiguous(points, closeness).nonzero(as_tuple=True)[0]  # one synchronisation
    if which.numel() == 0:
        return slot_of_point, kept
    reference_index = reference.nonzero(as_tuple=True)[0]
    reference_image, reference_points = image.index_select(0, reference_index), points.index_select(0, reference_index)
    reference_count = torch.bincount(reference_image, minlength=batch)
    most_reference = int(reference_count.max())  # one synchronisation
    # |r|^2 - 2 x.r ranks the reference points r by distance to x; padding at +inf.
    columns = _padded(torch.cat([-2.0 * reference_points, (reference_points ** 2).sum(1, keepdim=True)], dim=1),
                      reference_image, reference_count, most_reference)
    padding = torch.arange(most_reference, device=points.device).unsqueeze(0) >= reference_count.unsqueeze(1)
    columns[..., -1].masked_fill_(padding, torch.inf)
    global_index = _padded(reference_index, reference_image, reference_count, most_reference)
    asking_image, asking_points = image.index_select(0, which), points.index_select(0, which)
    asking_count = torch.bincount(asking_image, minlength=batch)
    most_asking = int(asking_count.max())  # one synchronisation
    rows = _padded(torch.cat([asking_points, torch.ones_like(asking_points[:, :1])], dim=1), asking_image,
                   asking_count, most_asking)
    k = min(neighbours, most_reference)
    nearest = torch.empty(batch, most_asking, k, dtype=torch.long, device=points.device)
    real = torch.empty(batch, most_asking, k, dtype=torch.bool, device=points.device)
    chunk = max(1, _DENSITY_CHUNK // max(batch * most_reference, 1))
    for first in range(0, most_asking, chunk):
        distance = torch.bmm(rows[:, first:first + chunk], columns.transpose(1, 2))
        closest = distance.topk(k, dim=2, largest=False)
        nearest[:, first:first + chunk] = closest.indices
        # An image with fewer than k reference points also gets padding, which must not vote.
        real[:, first:first + chunk] = torch.isfinite(closest.values)
    asking_position = _position_in_image(asking_image, asking_count)
    voters = torch.gather(global_index, 1, nearest.flatten(1)).reshape(batch, most_asking, k)
    voters = _at(voters, asking_image, asking_position).flatten()  # (A * k,) point indices
    weight = _at(real, asking_image, asking_position).to(points.dtype)
    for _ in range(2):
        votes = torch.zeros(which.numel(), capacity, dtype=points.dtype, device=points.device)
        votes.scatter_add_(1, slot_of_point.index_select(0, voters).reshape(-1, k).clamp(min=0), weight)
        slot_of_point = slot_of_point.index_copy(0, which, votes.argmax(dim=1))
    kept = kept & (_slot_sizes(slot_of_point, image, capacity, batch) > 0)
    return slot_of_point, kept


def _instance_means(points, image, slot_of_point, batch, capacity):
    """The mean of each (image, slot)'s points, (B, capacity, E), zero where a slot has none; summed
    in float64 (as csrc/cpu/cluster.cpp's move_to_slot_means) so that both paths round the same
    means."""
    has_slot = slot_of_point >= 0
    segment = image * capacity + slot_of_point.clamp(min=0)
    sums = _segment_sum(points.double() * has_slot.unsqueeze(1), segment, batch * capacity)
    sizes = _slot_sizes(slot_of_point, image, capacity, batch).reshape(-1, 1)
    return (sums / sizes.clamp(min=1)).to(points.dtype).reshape(batch, capacity, -1)


def _assign_to_nearest(points, image, points_per_image, centres, num_found, min_size, bandwidth_sq):
    """Every point to its nearest mode, whichever seed claimed it, then one Lloyd step.

    A boundary point that a network left partway between two instances goes
    to the nearer mode. A mode is dropped when fewer than ``min_size``
    points lie within its window (a stray point's own mode: the points
    nearest to it may still be many) or are nearest to it; the points of
    dropped modes join the nearest kept mode. Then each kept centre moves to
    the mean of its points and every point goes to the nearest moved centre
    (a mode is biased towards the side where more boundary points crowd its
    window; the mean of all its points balances the sides). Returns
    (slot_of_point (M,), kept (B, capacity) bool, centres (B, capacity, E),
    closeness (M, capacity) to the final centres, as _closeness, -inf where
    a centre was dropped before the step)).
    """
    batch, capacity = centres.shape[:2]
    slot_ids = torch.arange(capacity, device=points.device)
    found = slot_ids.unsqueeze(0) < num_found.unsqueeze(1)
    layout = _padded_layout(points, image, points_per_image)
    closeness = _closeness(points, image, points_per_image, centres, found, layout)
    squared = (points * points).sum(dim=1, keepdim=True)
    in_window = _segment_sum((closeness >= squared - bandwidth_sq).to(points.dtype), image, batch)
    slot_of_point = _nearest_of(closeness)
    kept = found & (in_window >= max(min_size, 1))
    kept = kept & (_slot_sizes(torch.where(_at(kept, image, slot_of_point.clamp(min=0)), slot_of_point, -1), image,
                               capacity, batch) >= max(min_size, 1))
    # Points whose nearest mode was dropped join the nearest kept one.
    slot_of_point = _nearest_of(closeness.masked_fill(~_per_point(kept, image), -torch.inf))

    sizes = _slot_sizes(slot_of_point, image, capacity, batch)
    means = _instance_means(points, image, slot_of_point, batch, capacity)
    centres = torch.where((sizes > 0).unsqueeze(2), means, centres)
    closeness = _closeness(points, image, points_per_image, centres, kept, layout)
    slot_of_point = _nearest_of(closeness)
    # A centre that the step left without points is no instance.
    kept = kept & (_slot_sizes(slot_of_point, image, capacity, batch) > 0)
    return slot_of_point, kept, centres, closeness


def _split_groups(points, image, points_per_image, slot_of_point, kept, centres, searched, least, delta_v_sq):
    """The instances that the split step searches, and their searched points.

    An instance is searched when it holds at least as many points as the image's median kept
    instance (the lower median), fewer than _SPLIT_CONFIDENCE of them within delta_v of its centre
    (sqrt(delta_v_sq)) and at least 2 * ``least`` searched points: a network that has not
    separated two instances leaves them as one instance larger than the rest, spread around a
    centre between them, while a part of one instance is smaller. Returns (candidate (B, capacity)
    bool; members (P,), the searched points of the candidates sorted by instance (image, then
    slot), in point order within each; group (P,), each member's instance among the candidates
    0..G-1, in (image, slot) order; the number of candidates G).
    """
    batch, capacity = kept.shape
    sizes = _slot_sizes(slot_of_point, image, capacity, batch)
    ordered = torch.where(kept, sizes, torch.full_like(sizes, torch.iinfo(sizes.dtype).max)).sort(dim=1).values
    lower = ((kept.sum(dim=1, keepdim=True) - 1) // 2).clamp(min=0)
    median = torch.gather(ordered, 1, lower)
    has_slot = slot_of_point >= 0
    key = image * capacity + slot_of_point.clamp(min=0)
    member_count = _slot_sizes(torch.where(searched & has_slot, slot_of_point, -1), image, capacity, batch)
    offsets = points - _at(centres, image, slot_of_point.clamp(min=0))
    near = ((offsets * offsets).sum(dim=1) <= delta_v_sq) & has_slot
    near_count = _slot_sizes(torch.where(near, slot_of_point, -1), image, capacity, batch)
    candidate = (kept & (sizes >= median) & (member_count >= 2 * least)
                 & (near_count.to(points.dtype) < _SPLIT_CONFIDENCE * sizes.to(points.dtype)))
    is_member = searched & has_slot & candidate.flatten().index_select(0, key)
    members = is_member.nonzero(as_tuple=True)[0]  # one synchronisation
    group_of_key = torch.cumsum(candidate.flatten().long(), 0) - 1
    members = members.index_select(0, torch.argsort(key.index_select(0, members), stable=True))
    group = group_of_key.index_select(0, key.index_select(0, members))
    return candidate, members, group, int(candidate.sum())  # one synchronisation


def _separate_modes(modes, counts, valid, points, group, group_count, radius_sq, least, apart_sq):
    """Which of each searched instance's fine modes are instances of their own, (G, S) bool.

    The modes in descending window count (stable); the first is kept; a later one is kept when its
    window holds at least _SPLIT_COUNT_RATIO times as many points as the first's and at least
    ``least``, and it lies at least sqrt(apart_sq) from every mode kept before it with a density
    valley between them (the test of _valleys at the fine window: a probe a quarter, half or three
    quarters of the way with fewer than _VALLEY_RATIO times the smaller of the two modes' counts).
    A cloud of stray points or a crowd of boundary points holds a small fraction of its instance's
    densest fine window; a second instance that the coarse window merged holds a comparable one.
    Returns (modes, counts and kept, each sorted by descending count).
    """
    groups, count, dim = modes.shape
    key = torch.where(valid, counts, torch.full_like(counts, -1.0))
    order = key.argsort(dim=1, descending=True, stable=True)
    modes = torch.gather(modes, 1, order.unsqueeze(2).expand(-1, -1, dim))
    counts, valid = torch.gather(counts, 1, order), torch.gather(valid, 1, order)
    eligible = valid & (counts >= _SPLIT_COUNT_RATIO * counts[:, :1]) & (counts >= least)
    offsets = modes.unsqueeze(2) - modes.unsqueeze(1)
    apart = (offsets * offsets).sum(dim=3) >= apart_sq  # [g, i, j]
    index = torch.arange(count, device=modes.device)
    tested = (index.unsqueeze(1) < index.unsqueeze(0)) & apart & eligible.unsqueeze(1) & (
        eligible | (index == 0) & valid).unsqueeze(2)
    pair_group, first, second = tested.nonzero(as_tuple=True)  # one synchronisation
    separable = torch.zeros_like(tested)
    if pair_group.numel() > 0:
        separable[pair_group, first, second] = _valley_between(points, group, group_count, modes[pair_group, first],
                                                               modes[pair_group, second], pair_group, radius_sq)
    kept = torch.zeros_like(valid)
    kept[:, 0] = valid[:, 0]
    for j in range(1, count):
        kept[:, j] = eligible[:, j] & (~kept[:, :j] | separable[:, :j, j]).all(dim=1)
    return modes, counts, kept


def _split_instances(points, image, points_per_image, slot_of_point, kept, centres, searched, priority, *,
                     radius_sq, least, steps, most_seeds, capacity, apart_sq, delta_v_sq):
    """Split the instances that hold two or more fine modes separated by a density valley.

    The coarse window (2 * delta_v) merges instances whose means a network left about 2 * delta_v
    apart or less (undertrained): one mode, one instance. Each instance at least as large as the
    image's median one (_split_groups) is searched again at the fine window sqrt(radius_sq): the
    density peaks of its searched points (at least ``least`` in a peak's window) and their mean
    shift, as in the parallel search (_density_peaks, _mean_shift_many), then _separate_modes. An
    instance with two or more kept fine modes is split: its points go to the nearest kept fine
    mode, then one Lloyd step (each mode to the mean of its points, every point to the nearest);
    the densest mode keeps the slot, the others take new slots after the image's last, in (slot,
    mode) order, while the image has fewer than ``capacity`` kept instances. Returns
    (slot_of_point, kept, centres), the last two widened by the new slots.
    """
    batch, slots = kept.shape
    candidate, members, group, groups = _split_groups(points, image, points_per_image, slot_of_point, kept, centres,
                                                      searched, least, delta_v_sq)
    if groups == 0:
        return slot_of_point, kept, centres
    group_count = torch.bincount(group, minlength=groups)
    group_points, group_priority = points.index_select(0, members), priority.index_select(0, members)
    seeds, valid = _density_peaks(group_points, group, group_count, group_priority,
                                  _rank_in_image(group, group_count, group_priority), group_count, radius_sq,
                                  _SPLIT_SAMPLES, least, most_seeds, peak_threshold=radius_sq - apart_sq)
    modes, counts = _mean_shift_many(group_points, group, group_count, seeds, valid, radius_sq, steps,
                                     stop_when_converged=points.device.type == "cpu")
    modes, counts, fine = _separate_modes(modes, counts, valid, group_points, group, group_count, radius_sq, least,
                                          apart_sq)
    # The new slots: each split instance's kept fine modes after its first, numbered within the
    # image in (slot, mode) order, while the image has room.
    groups_per_image = candidate.sum(dim=1)
    group_image = torch.arange(batch, device=points.device).repeat_interleave(groups_per_image)
    first = torch.zeros_like(fine)
    first[:, 0] = True
    extra = fine & ~first & (fine.sum(dim=1, keepdim=True) >= 2)
    before = (torch.cumsum(extra.long().flatten(), 0) - extra.long().flatten()).reshape(extra.shape)
    image_extra = _per_image_sum(extra.sum(dim=1).to(points.dtype), groups_per_image).long()
    image_first = torch.cumsum(image_extra, 0) - image_extra
    position = before - _per_point(image_first, group_image).unsqueeze(1)
    room = (capacity - kept.sum(dim=1)).clamp(min=0)
    extra = extra & (position < _per_point(room, group_image).unsqueeze(1))
    split = extra.any(dim=1)
    fine = extra | first & split.unsqueeze(1)
    target = torch.where(first, candidate.nonzero(as_tuple=True)[1].unsqueeze(1), slots + position)
    # The points of split instances: the nearest kept fine mode, one Lloyd step, the nearest again.
    key = image * slots + slot_of_point.clamp(min=0)
    group_of_key = torch.cumsum(candidate.flatten().long(), 0) - 1
    point_group = torch.where((slot_of_point >= 0) & candidate.flatten().index_select(0, key),
                              group_of_key.index_select(0, key), torch.full_like(key, -1))
    moving = (point_group >= 0) & split.index_select(0, point_group.clamp(min=0))
    which = moving.nonzero(as_tuple=True)[0]  # one synchronisation
    if which.numel() == 0:
        return slot_of_point, kept, centres
    moving_points, moving_group = points.index_select(0, which), point_group.index_select(0, which)
    allowed = fine.index_select(0, moving_group)

    def nearest(fine_centres):
        c = fine_centres.index_select(0, moving_group)  # (P, S, E)
        closeness = (moving_points.unsqueeze(1) * (2.0 * c)).sum(dim=2) - (c * c).sum(dim=2)
        return _nearest_of(closeness.masked_fill(~allowed, -torch.inf))

    width = fine.shape[1]
    part = nearest(modes)
    segment = moving_group * width + part
    sums = _segment_sum(moving_points, segment, groups * width).reshape(groups, width, -1)
    sizes = _segment_sum(torch.ones_like(moving_points[:, 0]), segment, groups * width).reshape(groups, width)
    means = torch.where((sizes > 0).unsqueeze(2), sums / sizes.clamp(min=1).unsqueeze(2), modes)
    part = nearest(means)
    slot_of_point = slot_of_point.index_copy(0, which, target.flatten().index_select(0, moving_group * width + part))
    # Widen to the new slots; the split instances' centres move to their parts' means.
    total = slots + int(image_extra.clamp(max=room).max())  # one synchronisation
    wide = centres.new_zeros(batch, total, centres.shape[2])
    wide[:, :slots] = centres
    placed_group, placed_mode = fine.nonzero(as_tuple=True)
    placed_image = group_image.index_select(0, placed_group)
    wide[placed_image, target[placed_group, placed_mode]] = means[placed_group, placed_mode]
    kept = torch.cat([kept, torch.ones_like(kept[:, :1]).expand(-1, total - slots)], dim=1)
    kept = kept & (_slot_sizes(slot_of_point, image, total, batch) > 0)
    return slot_of_point, kept, wide


def _quick_shift_links(points, image, points_per_image, asking, reference, density_sq, link_sq):
    """The quick-shift links of the ``asking`` points (M,) bool among the ``reference`` points (M,) bool.

    A point's density is the number of reference points of its image within sqrt(density_sq)
    (itself included when it is one); an asking point's parent is the nearest reference point
    within sqrt(link_sq) whose density is strictly higher (ties: the lower index), -1 when none.
    Following parents climbs the density from a crowd of boundary points to its instance's core,
    as single linkage does, where the nearest centre can split the crowd from its own instance.
    Distances as the window test of _mean_shift_many: 2 x.r - |r|^2 >= |x|^2 - radius^2, from
    padded batched products of the rows (asking or reference points) with the reference points,
    in chunks of rows. Returns parent (M,) long, -1 where none or not asking; three host
    synchronisations size the tables.
    """
    batch = points_per_image.shape[0]
    device = points.device
    ref_index = reference.nonzero(as_tuple=True)[0]  # one synchronisation
    ref_image = image.index_select(0, ref_index)
    ref_count = torch.bincount(ref_image, minlength=batch)
    most_ref = int(ref_count.max())  # one synchronisation
    ref_points = points.index_select(0, ref_index)
    # [2 r, -|r|^2]; a padding column [0, -inf] is never within a radius.
    columns = _padded(torch.cat([2.0 * ref_points, -(ref_points * ref_points).sum(dim=1, keepdim=True)], dim=1),
                      ref_image, ref_count, most_ref)
    padding = torch.arange(most_ref, device=device).unsqueeze(0) >= ref_count.unsqueeze(1)
    columns[..., -1].masked_fill_(padding, -torch.inf)
    columns = columns.transpose(1, 2)
    global_index = _padded(ref_index, ref_image, ref_count, most_ref)
    squared = (points * points).sum(dim=1)

    def table_rows(which):
        """The rows of the points ``which`` (grouped by image): padded [x, 1], their |x|^2 and where
        each point lies among them."""
        row_image = image.index_select(0, which)
        row_count = torch.bincount(row_image, minlength=batch)
        most_rows = int(row_count.max())  # one synchronisation
        row_points = points.index_select(0, which)
        rows = _padded(torch.cat([row_points, torch.ones_like(row_points[:, :1])], dim=1), row_image, row_count,
                       most_rows)
        row_squared = _padded(squared.index_select(0, which), row_image, row_count, most_rows).unsqueeze(2)
        return rows, row_squared, row_image, _position_in_image(row_image, row_count)

    step = max(1, _DENSITY_CHUNK // max(batch * most_ref, 1))  # rows per chunk of the tables
    rows_index = (asking | reference).nonzero(as_tuple=True)[0]  # one synchronisation
    rows, row_squared, row_image, row_position = table_rows(rows_index)
    counts = points.new_zeros(batch, rows.shape[1])
    for first in range(0, rows.shape[1], step):
        closeness = torch.bmm(rows[:, first:first + step], columns)
        counts[:, first:first + step] = (closeness >= row_squared[:, first:first + step] - density_sq).sum(dim=2)
    density = torch.full_like(squared, -1.0)
    density[rows_index] = _at(counts.unsqueeze(2), row_image, row_position).reshape(-1)
    column_density = _padded(density.index_select(0, ref_index), ref_image, ref_count, most_ref)
    column_density = column_density.masked_fill(padding, torch.inf).unsqueeze(1)  # padding: never denser

    asking_index = asking.nonzero(as_tuple=True)[0]  # one synchronisation
    parent = torch.full_like(image, -1)
    if asking_index.numel() == 0:
        return parent
    rows, row_squared, row_image, row_position = table_rows(asking_index)
    row_density = _padded(density.index_select(0, asking_index), row_image, torch.bincount(row_image, minlength=batch),
                          rows.shape[1]).unsqueeze(2)
    best = points.new_full((batch, rows.shape[1]), -torch.inf)
    which = torch.zeros(batch, rows.shape[1], dtype=torch.long, device=device)
    for first in range(0, rows.shape[1], step):
        closeness = torch.bmm(rows[:, first:first + step], columns)
        linked = (closeness >= row_squared[:, first:first + step] - link_sq) & (
            column_density > row_density[:, first:first + step])
        nearest = closeness.masked_fill(~linked, -torch.inf).max(dim=2)
        best[:, first:first + step], which[:, first:first + step] = nearest.values, nearest.indices
    found = torch.isfinite(_at(best.unsqueeze(2), row_image, row_position).reshape(-1))
    chosen = _at(torch.gather(global_index, 1, which).unsqueeze(2), row_image, row_position).reshape(-1)
    parent[asking_index] = torch.where(found, chosen, torch.full_like(chosen, -1))
    return parent


def _follow_parents(slot_of_point, parent):
    """Each point with a parent takes the slot of the end of its chain of parents: the first point on it
    without one. A parent is strictly denser than its child, so the chains have no cycle and this
    equals passing the slots down in descending density, each point taking its parent's final
    one. Pointer jumping: ceil(log2(M)) + 1 rounds of link = link[link], no host synchronisation."""
    link = torch.where(parent >= 0, parent, torch.arange(parent.numel(), device=parent.device))
    for _ in range(max(parent.numel() - 1, 1).bit_length() + 1):
        link = link.index_select(0, link)
    return slot_of_point.index_select(0, link)


def _window_offsets(spatial, device):
    """The flat offsets of the 3^d window around a pixel of an image padded by one pixel on each side
    of each of its d spatial dims, (3^d,) long, and the padded image's strides."""
    padded = [size + 2 for size in spatial]
    strides = [1] * len(padded)
    for axis in range(len(padded) - 2, -1, -1):
        strides[axis] = strides[axis + 1] * padded[axis + 1]
    offsets = torch.zeros(1, dtype=torch.long, device=device)
    for stride in strides:
        offsets = (offsets.unsqueeze(1) + stride * torch.arange(-1, 2, device=device)).flatten()
    return offsets, strides


def _image_vote(slot_of_point, changed, image, pixel, spatial, batch, capacity):
    """Each ``changed`` point (M,) bool takes the slot most common among the foreground pixels of its
    3^d image window (3 in 1-d, 3 x 3 in 2-d, 3 x 3 x 3 in 3-d; itself included), when one slot is
    more common than every other; all points read the slots as given (``slot_of_point``, -1: none).
    Pixels outside the image and background pixels do not vote. ``pixel`` (M,) is each point's flat
    index in its image of shape ``spatial``.

    Stray points, scattered among their own instance's pixels, are outvoted by their image
    neighbours; a band of boundary pixels that moved together keeps its move.
    """
    which = changed.nonzero(as_tuple=True)[0]  # one synchronisation
    if which.numel() == 0:
        return slot_of_point
    offsets, strides = _window_offsets(spatial, pixel.device)
    padded_size = strides[0] * (spatial[0] + 2)
    # Each point's flat index in its image padded by one pixel on every side.
    where = torch.zeros_like(pixel)
    rest = pixel
    for axis in range(len(spatial) - 1, -1, -1):
        where = where + (rest % spatial[axis] + 1) * strides[axis]
        rest = rest // spatial[axis]
    where = image * padded_size + where
    grid = torch.zeros(batch * padded_size, dtype=torch.long, device=pixel.device)
    grid[where] = slot_of_point + 1  # 0: background or no slot
    window = grid[where.index_select(0, which).unsqueeze(1) + offsets]  # (C, 3^d)
    votes = torch.zeros(which.numel(), capacity + 1, dtype=torch.long, device=pixel.device)
    votes.scatter_add_(1, window, torch.ones_like(window))
    votes[:, 0] = 0
    most, winner = votes.max(dim=1)
    single = (votes == most.unsqueeze(1)).sum(dim=1) == 1
    decided = torch.where(single & (most > 0), winner - 1, slot_of_point.index_select(0, which))
    return slot_of_point.index_copy(0, which, decided)


def _refine_quickshift(points, image, points_per_image, slot_of_point, kept, reference, pixel, spatial, *,
                       density_sq, link_sq):
    """refine="quickshift": ambiguous points follow the density to their instance's core, then the
    image layout votes on the points that moved.

    Where instances touch, a network pulls a band of one instance's boundary pixels partway towards
    the other's mean; the nearest centre (even the true means) gives that band to the wrong
    instance, and so does a vote among its nearest embeddings (the band is a crowd of its own).
    Here each ambiguous point (_ambiguous, against the means of the instances as they stand)
    follows its quick-shift parents (_quick_shift_links among the ``reference`` points, the
    searched ones) to a point that is not ambiguous or has no denser neighbour, and takes its
    instance (_follow_parents). That also moves stray points that lie partway to another instance;
    but those are scattered in the image among their own instance's pixels, while a pulled band
    moves as a whole, so every point that moved then takes the instance most common in its 3^d
    image window (_image_vote). Returns (slot_of_point, kept), kept without slots left empty.
    """
    batch, capacity = kept.shape
    means = _instance_means(points, image, slot_of_point, batch, capacity)
    closeness = _closeness(points, image, points_per_image, means, kept)
    asking = _ambiguous(points, closeness)
    parent = _quick_shift_links(points, image, points_per_image, asking, reference, density_sq, link_sq)
    moved = _follow_parents(slot_of_point, parent)
    changed = moved != slot_of_point
    slot_of_point = _image_vote(moved, changed, image, pixel, spatial, batch, capacity)
    kept = kept & (_slot_sizes(slot_of_point, image, capacity, batch) > 0)
    return slot_of_point, kept


def _join_nearest(points, image, centres, kept, slot_of_point):
    """Points with slot -1 join the nearest kept centre of their image (-1 if it has none)."""
    orphans = (slot_of_point < 0).nonzero(as_tuple=True)[0]  # one synchronisation
    if orphans.numel() > 0:
        slot_of_point = slot_of_point.clone()
        slot_of_point[orphans] = _nearest_centre(points[orphans], image[orphans], centres, kept)
    return slot_of_point


def _number_instances(slot_of_point, image, points, centres, kept, delta_v):
    """Instance ids 1..L_b per image in slot order, and each instance's confidence.

    Returns (ids (M,), 0 where a point has no slot; scores (B, L) float32):
    the fraction of an instance's points within delta_v of its centre.
    """
    batch, capacity = kept.shape
    new_id = torch.cumsum(kept.long(), dim=1) * kept.long()  # (B, capacity), 0 for dropped
    has_slot = slot_of_point >= 0
    safe_slot = slot_of_point.clamp(min=0)
    ids = torch.where(has_slot, _at(new_id, image, safe_slot), torch.zeros_like(safe_slot))
    offsets = points - _at(centres, image, safe_slot)
    within = ((offsets * offsets).sum(dim=1) <= float(delta_v) ** 2) & has_slot
    segment = image * capacity + safe_slot
    totals = _segment_sum(has_slot.to(points.dtype), segment, batch * capacity).reshape(batch, capacity)
    hits = _segment_sum(within.to(points.dtype), segment, batch * capacity).reshape(batch, capacity)
    confidence = hits / totals.clamp(min=1.0)
    num_instances = int(kept.sum(dim=1).max())  # one synchronisation
    scores = torch.zeros(batch, num_instances + 1, dtype=torch.float32, device=points.device)
    # Dropped slots go to the spare last column, which is cut off.
    column = torch.where(kept, new_id - 1, torch.full_like(new_id, num_instances))
    scores.scatter_(1, column, confidence.float())
    return ids, scores[:, :num_instances]


def cluster_embeddings(
    embeddings: torch.Tensor,
    foreground: torch.Tensor,
    *,
    delta_v: float = 0.5,
    delta_d: float = 1.5,
    min_size: int = 10,
    bandwidth: Optional[float] = None,
    threshold: Optional[float] = None,
    mean_shift_steps: int = 10,
    max_iterations: int = 64,
    seed: int = 0,
    seed_scores: Optional[torch.Tensor] = None,
    min_seed_score: Optional[float] = None,
    density_seeds: bool = False,
    join: str = "margin",
    assign: str = "claim",
    mode_points: Optional[int] = None,
    neighbour_vote: int = 0,
    search: str = "sequential",
    split_instances: bool = False,
    refine: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cluster pixel embeddings into instances, batched, on any device.

    The paper's post-processing, run on every image of the batch at once.
    Only foreground pixels take part. Each iteration, in every image that
    still has unvisited foreground pixels:

    1. seed: pick an unvisited pixel: the one of highest ``seed_scores``
       when given (e.g. a seediness head's output), or of highest estimated
       density with ``density_seeds``, ties broken as without them; without
       either, in a random order of the pixel positions fixed by ``seed``, so
       an image's result does not depend on the rest of the batch;
    2. mean shift: move the seed's embedding to the mean of the image's
       foreground embeddings within ``bandwidth`` of it, ``mean_shift_steps``
       times (flat kernel; all foreground pixels count, visited or not, so
       every seed of one instance converges to the same mode);
    3. claim: the unvisited pixels within ``threshold`` of that centre form a
       new instance; if the centre lies within ``delta_d`` of the centre of an
       instance already found in the image (the means of two instances are
       pushed 2*delta_d apart), they join that instance instead. The seed,
       the pixels within ``bandwidth`` of it and those within ``delta_d`` of
       the centre are marked visited, claimed or not (none of them could
       seed a new instance), so every iteration makes progress and stray
       pixels cost no iterations of their own.

    An image stops when fewer than ``min_size`` of its pixels are unvisited
    (they could not make an instance that is kept).

    After the last iteration, with ``assign="claim"`` (the paper's way)
    instances with fewer than ``min_size`` pixels are dropped, and every
    foreground pixel not in a kept instance (pixels that no threshold ball
    claimed, and those of dropped instances) joins the kept instance whose
    centre is nearest to its embedding. With ``assign="nearest"`` every
    foreground pixel goes to the nearest centre found, whichever seed claimed
    it (a Lloyd assignment step: a boundary pixel that the network left
    partway between two instances goes to the nearer one); centres with
    fewer than ``min_size`` pixels nearest to them or within ``bandwidth``
    of them are dropped and their pixels join the nearest kept centre; then
    each centre moves to the mean of its pixels and every pixel goes to the
    nearest moved centre (one Lloyd step). Either way no foreground pixel is left unlabelled.
    Instances are numbered 1, 2, ... per image in the order they were found.

    Cost: at most (mean_shift_steps + 2) passes over the foreground
    embeddings per iteration, with no Python loop over images; density seeds
    add one pass over (points x _DENSITY_SAMPLES) distances. The only host
    synchronisations are a constant few (gathering the foreground pixels,
    sizing the outputs) plus the check whether any image still has a seed,
    done after every iteration on CPU and every 8 iterations on CUDA; none
    per instance. Memory is O(foreground pixels * E). With
    ``search="parallel"`` there is no iteration: one (B, 512, 512) distance
    product finds the seeds, each mean shift step is two batched products of
    (peaks x points), and the host synchronisations are a constant few plus
    one per round of filing the modes (usually two or three) and, on CPU
    only, one per mean shift step (the test whether any centre moved).

    Args:
        embeddings: (B, E, *spatial) float; computed in float32 (float64 for
            float64 input). Gradients are not tracked.
        foreground: (B, *spatial) bool; pixels to cluster (e.g. the
            network's foreground probability > 0.5).
        delta_v, delta_d: the margins the embeddings were trained with.
        min_size: instances with fewer pixels are dropped (their pixels join
            the nearest kept instance).
        bandwidth: mean shift window radius. None: 2 * delta_v, the diameter
            of a cluster trained to zero loss: from any of its pixels the
            window holds the whole cluster, and no other when
            delta_d > 2 * delta_v.
        threshold: radius of the ball around a centre whose pixels are
            claimed. None: 2 * delta_v (the whole cluster, with a margin of
            delta_v for pixels not pulled all the way in).
        mean_shift_steps: the most mean shift iterations per seed. On CPU
            the search stops early once no centre moves; on CUDA all are run,
            so that no convergence test needs a synchronisation.
        max_iterations: the most seeds per image, hence the most instances.
        seed: seeds the order in which pixels are picked as seeds (among
            pixels of equal ``seed_scores`` when those are given).
        seed_scores: None, or (B, *spatial) float on the device of
            ``embeddings``: how good a seed each pixel is (higher is
            better), e.g. a seediness head's probability (Fathi et al.
            2017). Seeds are then the unvisited foreground pixels in
            descending score. NaN counts as the lowest score (-inf). Only
            the order of the scores matters, and only at foreground pixels.
        min_seed_score: with ``seed_scores``, pixels scoring below this never
            seed an instance (as SpatialEmbeddings-style methods stop at a
            seed-map threshold): an image stops when no unvisited pixel
            reaches it, and the rest join the nearest kept instance. Stray
            pixels then cannot start spurious instances. None: no threshold.
        density_seeds: seed at the densest unvisited pixel first: the one
            with the most foreground pixels of its image within
            ``bandwidth``, estimated from _DENSITY_SAMPLES pixels per image.
            Seeds then start at instance cores, not at boundary or stray
            pixels, whose spurious modes would take an instance's place; and
            a pixel whose window holds fewer than ``min_size`` pixels
            (estimated) never seeds, so stray pixels cost no iterations.
            Not with ``seed_scores``.
        assign: "claim" (the paper's) or "nearest" (a Lloyd step), as above.
        mode_points: None, or search the modes on at most this many
            foreground pixels per image (the first in the hashed order, so an
            image's sample does not depend on the batch; min_size shrinks in
            proportion there), then assign every pixel (needs
            ``assign="nearest"``). Faster on large images.
        neighbour_vote: 0, or k > 0 (needs ``assign="nearest"``): a pixel
            whose nearest centre is not clearly nearer than the second
            (distance ratio >= 0.6) takes the instance most common among its
            k nearest pixels of the searched sample, twice (the second round
            sees the first's votes). Where two instances' boundary pixels
            overlap, the crowd around a pixel tells its owner better than the
            midpoint between the centres does.
        search: "sequential" (steps 1-3 above, one seed per image at a
            time) or "parallel" (needs ``density_seeds`` and
            ``assign="nearest"``): the seeds are all density peaks of each
            image's _DENSITY_SAMPLES-pixel sample (a sampled pixel with no
            denser one within 0.7 * ``bandwidth``, and at least ``min_size``
            pixels in its window, estimated), mean shift moves them all at
            once (two batched matrix products a step), and the modes are
            filed densest first by the same rule as in step 3 (within
            ``delta_d`` of a mode already filed, or with ``join="density"``
            its satellite or on a bridge: no new instance; with
            ``join="density"`` a mode never joins a mode of comparable
            window count (< 1.8x) within 2 * ``delta_d`` when a density
            valley lies between them: fewer points within ``delta_v`` of a
            point 1/4, 1/2 or 3/4 of the way than 0.3 times as many as
            around either mode, as where an undertrained network leaves two
            instances' means 1.3-1.7 apart), at most ``max_iterations`` of
            them. No pixel is claimed or visited, so
            no loop runs per instance: 3-5x faster on CPU (at most
            2 * max_iterations peaks per image; memory O(B * peaks^3) for
            the bridge rule). On CPU tensors it runs as one fused C++ op
            (discloss::cluster_parallel), the same steps in loops: about
            2 ms per 128 x 128 image on one thread instead of ~600 tensor
            operations' 4-5 ms; CUDA tensors take the tensor operations.
        split_instances: with ``search="parallel"``: after the assignment
            (and the vote), an instance is searched again at a finer window
            (0.7 * delta_v) when it holds at least as many pixels as the
            image's median instance (the lower median) and fewer than half
            of them lie within delta_v of its centre: the density peaks of a
            256-pixel sample of its searched pixels (no denser one within
            delta_v, at least ``min_size`` in the window), the mean shift of
            each over its searched pixels, then its fine modes densest first:
            one is an instance of its own when its window holds at least 0.3
            times as many pixels as the densest's (and ``min_size``), and it
            lies at least delta_v from each mode kept before it with a
            density valley between them (the valley test above, at the fine
            window). The instance's pixels then go to the nearest kept fine
            mode (one Lloyd step); the new instances are numbered after the
            image's others, at most ``max_iterations`` in all. Where a
            network leaves two instances' means closer than 2 * delta_v (an
            undertrained one: 1.0-1.7 apart on the hard benchmark), the
            coarse window finds one mode between them and the instance is
            the two; clouds of stray pixels and crowds of boundary pixels
            hold less than 0.3 of their instance's densest fine window.
            Adds about 0.3 ms per 128 x 128 image on CPU.
        refine: None, or "quickshift" (needs ``search="parallel"``; uses the
            image layout): after the assignment, the vote and the split, each
            ambiguous pixel (its nearest instance mean not clearly nearer than
            the second: distance ratio >= 0.6, the means of the instances as
            they stand) follows quick-shift links (Vedaldi and Soatto 2008):
            to the nearest searched pixel within 2 * delta_v whose window of
            radius delta_v holds strictly more searched pixels than its own
            (ties: the lower index), and from there on while the pixel
            reached is ambiguous too, and takes the instance of the pixel
            where its chain ends. Then each pixel whose instance changed takes
            the instance most common among the foreground pixels of its 3^d
            image window (3 pixels in 1-d, 3 x 3 in 2-d, 3 x 3 x 3 in 3-d;
            itself included; pixels outside the image do not vote), when one
            is more common than every other. Where instances touch, a network
            pulls a band of one instance's boundary pixels partway towards
            the other's mean: nearest-centre assignment (and a vote among
            nearest embeddings) gives the band to the other instance, while
            the density leads it back to its own core. Stray pixels partway
            to another instance follow the density the wrong way too, but
            they lie scattered among their own instance's pixels in the
            image, whose vote undoes their move; a band moves with its
            image neighbours and keeps it. It replaces ``neighbour_vote``
            (the benchmark's robust setting has ``neighbour_vote=0`` with
            it). Costs O(ambiguous pixels x searched pixels near them): on
            CPU 0.3-0.7 ms per 128 x 128 image of the benchmark's sets,
            less than the neighbour vote (0.7-1.7 ms).

    Returns:
        labels: (B, *spatial) int64, 0 for background, 1..L_b for the
            instances of image b.
        scores: (B, L) float32 with L = max_b L_b; scores[b, k - 1] is the
            confidence of instance k of image b: the fraction of its pixels
            whose embedding lies within delta_v of its centre (1 for a
            cluster trained to zero loss); 0 where image b has fewer than
            k instances.
    """
    if bandwidth is None:
        bandwidth = 2.0 * delta_v
    if threshold is None:
        threshold = 2.0 * delta_v
    _check_inputs(embeddings, foreground, delta_v, delta_d, min_size, bandwidth, threshold,
                  mean_shift_steps, max_iterations)
    if seed_scores is not None:
        _check_seed_scores(seed_scores, foreground)
    if min_seed_score is not None:
        if seed_scores is None:
            raise ValueError("min_seed_score: needs seed_scores")
        if not isinstance(min_seed_score, (int, float)) or min_seed_score != min_seed_score:
            raise ValueError(f"min_seed_score: expected a number or None, got {min_seed_score!r}")
    if not isinstance(density_seeds, bool):
        raise TypeError(f"density_seeds: expected a bool, got {density_seeds!r}")
    if density_seeds and seed_scores is not None:
        raise ValueError("density_seeds: expected False when seed_scores is given (both set the seed order)")
    if join not in ("margin", "density"):
        raise ValueError(f"join: expected 'margin' or 'density', got {join!r}")
    if assign not in ("claim", "nearest"):
        raise ValueError(f"assign: expected 'claim' or 'nearest', got {assign!r}")
    if mode_points is not None:
        if not isinstance(mode_points, int) or isinstance(mode_points, bool) or mode_points < 1:
            raise ValueError(f"mode_points: expected an int >= 1 or None, got {mode_points!r}")
        if assign != "nearest":
            raise ValueError("mode_points: needs assign='nearest' (only the sampled pixels are claimed)")
    if not isinstance(neighbour_vote, int) or isinstance(neighbour_vote, bool) or neighbour_vote < 0:
        raise ValueError(f"neighbour_vote: expected an int >= 0, got {neighbour_vote!r}")
    if neighbour_vote > 0 and assign != "nearest":
        raise ValueError("neighbour_vote: needs assign='nearest'")
    if search not in ("sequential", "parallel"):
        raise ValueError(f"search: expected 'sequential' or 'parallel', got {search!r}")
    if search == "parallel" and not (density_seeds and assign == "nearest"):
        raise ValueError("search: 'parallel' needs density_seeds=True and assign='nearest' "
                         "(its seeds are density peaks, and it claims no pixels)")
    if not isinstance(split_instances, bool):
        raise TypeError(f"split_instances: expected a bool, got {split_instances!r}")
    if split_instances and search != "parallel":
        raise ValueError("split_instances: needs search='parallel'")
    if refine not in (None, "quickshift"):
        raise ValueError(f"refine: expected None or 'quickshift', got {refine!r}")
    if refine is not None and search != "parallel":
        raise ValueError("refine: needs search='parallel'")
    # Inference mode skips autograd's bookkeeping on every op (about 10% of a small image's
    # time on CPU); the results are cloned outside it so that callers may modify them in place.
    with torch.inference_mode():
        labels, scores = _cluster(
            embeddings, foreground, delta_v=delta_v, delta_d=delta_d, min_size=min_size, bandwidth=bandwidth,
            threshold=threshold, mean_shift_steps=mean_shift_steps, max_iterations=max_iterations, seed=seed,
            seed_scores=seed_scores, min_seed_score=min_seed_score, density_seeds=density_seeds, join=join,
            assign=assign, mode_points=mode_points, neighbour_vote=neighbour_vote, search=search,
            split_instances=split_instances, refine=refine)
    return labels.clone(), scores.clone()


def _cluster(embeddings, foreground, *, delta_v, delta_d, min_size, bandwidth, threshold, mean_shift_steps,
             max_iterations, seed, seed_scores, min_seed_score, density_seeds, join, assign, mode_points,
             neighbour_vote, search, split_instances, refine):
    """The body of cluster_embeddings, its arguments checked."""
    batch, dim = embeddings.shape[:2]
    spatial = tuple(embeddings.shape[2:])
    device = embeddings.device
    compute_dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    flat = embeddings.detach().reshape(batch, dim, -1)
    image, pixel = foreground.reshape(batch, -1).nonzero(as_tuple=True)  # one synchronisation
    points = flat[image, :, pixel].to(compute_dtype)  # (M, E), grouped by image in order
    points_per_image = torch.bincount(image, minlength=batch)
    labels_flat = torch.zeros(batch, flat.shape[2], dtype=torch.long, device=device)
    if points.shape[0] == 0:
        return labels_flat.reshape((batch,) + spatial), torch.zeros(batch, 0, device=device)

    bandwidth_sq = float(bandwidth) ** 2
    priority = _seed_priority(pixel, seed)
    point_priority = priority
    split_radius_sq = (_SPLIT_RADIUS * float(delta_v)) ** 2 if split_instances else 0.0
    refine_density_sq = (_DENSITY_RADIUS * float(delta_v)) ** 2 if refine == "quickshift" else 0.0
    refine_link_sq = (_LINK_RADIUS * float(delta_v)) ** 2
    score = None
    if seed_scores is not None:
        # Compared as given (no rounding to float32 that could make ties).
        score = seed_scores.detach().reshape(-1).index_select(0, image * flat.shape[2] + pixel)
        score = torch.nan_to_num(score, nan=-torch.inf)
        if min_seed_score is not None:
            # Below the threshold a pixel is never open: -inf, like a visited one.
            priority = torch.where(score >= min_seed_score, priority, torch.full_like(priority, -1))
    if search == "parallel" and device.type == "cpu" and _FUSED_CPU_SEARCH:
        # The whole search and assignment in one C++ op (csrc/cpu/cluster.cpp): the steps below,
        # in plain loops instead of ~600 small tensor operations. (No seed_scores: density seeds.)
        ids, scores, num_instances = torch.ops.discloss.cluster_parallel(
            points.contiguous(), points_per_image, priority, _rank_in_image(image, points_per_image, priority),
            mode_points if mode_points is not None else points.shape[0], _DENSITY_SAMPLES, 2 * max_iterations,
            max(min_size, 1), mean_shift_steps, max_iterations, min_size, neighbour_vote, join == "density",
            bandwidth_sq, float(delta_d) ** 2, float(delta_v), _PEAK_RADIUS, _SATELLITE_RATIO, _BRIDGE_RATIO,
            _AMBIGUOUS_RATIO, _VALLEY_RATIO, (_VALLEY_RADIUS * float(delta_v)) ** 2, _VALLEY_COUNT_RATIO,
            split_radius_sq, _SPLIT_COUNT_RATIO, _SPLIT_SAMPLES, _SPLIT_CONFIDENCE, refine_density_sq, refine_link_sq,
            pixel if refine is not None else None, list(spatial))
        labels_flat.view(-1).index_copy_(0, image * labels_flat.shape[1] + pixel, ids)
        return labels_flat.reshape((batch,) + spatial), scores[:, :int(num_instances.max())]  # one synchronisation
    # The modes are searched on all points, or on a sample of each image's
    # (the first mode_points in the hashed order); min_size shrinks with it.
    search_points, search_image, search_count, search_min_size = points, image, points_per_image, min_size
    search_rank, chosen = None, None
    # (No image larger than the sample: nothing to choose.)
    if mode_points is not None and int(points_per_image.max()) > mode_points:  # one synchronisation
        rank = _rank_in_image(image, points_per_image, priority)
        chosen = rank < mode_points
        index = chosen.nonzero(as_tuple=True)[0]  # one synchronisation
        search_rank = rank.index_select(0, index)  # the sample holds each image's best ranks, in the same order
        search_points, search_image = points.index_select(0, index), image.index_select(0, index)
        search_count = points_per_image.clamp(max=mode_points)
        priority = priority.index_select(0, index)
        score = None if score is None else score.index_select(0, index)
        largest = int(points_per_image.max())
        search_min_size = max(1, min_size * min(mode_points, largest) // largest)
    density = None
    if density_seeds and search == "sequential":
        density = _estimated_density(search_points, search_image, search_count, priority, bandwidth_sq,
                                     _DENSITY_SAMPLES)
        # In pixels of the whole image, whatever the sample.
        score = density * _per_point(points_per_image.to(density.dtype) / search_count.to(density.dtype),
                                     search_image)
        priority = torch.where(score >= max(min_size, 1), priority, torch.full_like(priority, -1))

    if search == "parallel":
        rank = search_rank if search_rank is not None else _rank_in_image(search_image, search_count, priority)
        seeds, valid = _density_peaks(search_points, search_image, search_count, priority, rank, points_per_image,
                                      bandwidth_sq, _DENSITY_SAMPLES, max(min_size, 1), 2 * max_iterations)
        modes, counts = _mean_shift_many(search_points, search_image, search_count, seeds, valid, bandwidth_sq,
                                         mean_shift_steps, stop_when_converged=device.type == "cpu")
        centres, num_found = _file_modes(modes, counts, valid, float(delta_d) ** 2, bandwidth_sq, join == "density",
                                         max_iterations, (search_points, search_image, search_count),
                                         (_VALLEY_RADIUS * float(delta_v)) ** 2)
    else:
        centres, num_found, point_label = _find_modes(
            search_points, search_image, search_count, priority, score, bandwidth_sq=bandwidth_sq,
            threshold_sq=float(threshold) ** 2, merge_sq=float(delta_d) ** 2, mean_shift_steps=mean_shift_steps,
            max_iterations=max_iterations, min_size=search_min_size, join_density=join == "density",
            density=density)
    centres = centres[:, :max(int(num_found.max()), 1)]  # one synchronisation
    if assign == "claim":
        slot_of_point, kept, centres = _assign_by_claim(points, image, centres, num_found, point_label, min_size)
    else:
        slot_of_point, kept, centres, closeness = _assign_to_nearest(points, image, points_per_image, centres,
                                                                      num_found, min_size, bandwidth_sq)
        searched = chosen if chosen is not None else torch.ones_like(slot_of_point, dtype=torch.bool)
        if neighbour_vote > 0:
            slot_of_point, kept = _neighbour_vote(points, image, points_per_image, slot_of_point, centres, kept,
                                                  searched, neighbour_vote, closeness)
        if split_instances:
            slot_of_point, kept, centres = _split_instances(
                points, image, points_per_image, slot_of_point, kept, centres, searched, point_priority,
                radius_sq=split_radius_sq, least=max(min_size, 1), steps=mean_shift_steps,
                most_seeds=2 * max_iterations, capacity=max_iterations, apart_sq=float(delta_v) ** 2,
                delta_v_sq=float(delta_v) ** 2)
        if refine == "quickshift":
            slot_of_point, kept = _refine_quickshift(points, image, points_per_image, slot_of_point, kept, searched,
                                                     pixel, spatial, density_sq=refine_density_sq,
                                                     link_sq=refine_link_sq)
    ids, scores = _number_instances(slot_of_point, image, points, centres, kept, delta_v)
    labels_flat.view(-1).index_copy_(0, image * labels_flat.shape[1] + pixel, ids)
    return labels_flat.reshape((batch,) + spatial), scores
