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
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["cluster_embeddings"]

# Points processed at once in the final nearest-centre assignment, which
# needs a (points, centres, E) difference tensor.
_ASSIGN_CHUNK = 1 << 16


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


@torch.no_grad()
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
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cluster pixel embeddings into instances, batched, on any device.

    The paper's post-processing, run on every image of the batch at once.
    Only foreground pixels take part. Each iteration, in every image that
    still has unvisited foreground pixels:

    1. seed: pick an unvisited pixel: the one of highest ``seed_scores``
       when given (e.g. a seediness head's output), ties broken as without
       it; without scores, in a random order of the pixel positions fixed by
       ``seed``, so an image's result does not depend on the rest of the
       batch;
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

    After the last iteration, instances with fewer than ``min_size`` pixels
    are dropped, and every foreground pixel not in a kept instance (pixels
    that no threshold ball claimed, and those of dropped instances) joins the
    kept instance whose centre is nearest to its embedding, so no foreground
    pixel is left unlabelled. Instances are numbered 1, 2, ... per image in
    the order they were found.

    Cost: at most (mean_shift_steps + 2) passes over the foreground
    embeddings per iteration, with no Python loop over images. The only host
    synchronisations are a constant few (gathering the foreground pixels,
    sizing the outputs) plus the check whether any image still has a seed, done
    after every iteration on CPU and every 8 iterations on CUDA; none per
    instance. Memory is O(foreground pixels * E).

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
    batch, dim = embeddings.shape[:2]
    spatial = tuple(embeddings.shape[2:])
    device = embeddings.device
    compute_dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    flat = embeddings.detach().reshape(batch, dim, -1)
    image, pixel = foreground.reshape(batch, -1).nonzero(as_tuple=True)  # one synchronisation
    points = flat[image, :, pixel].to(compute_dtype)  # (M, E), grouped by image in order
    points_per_image = torch.bincount(image, minlength=batch)
    num_points = points.shape[0]
    labels_flat = torch.zeros(batch, flat.shape[2], dtype=torch.long, device=device)
    if num_points == 0:
        return labels_flat.reshape((batch,) + spatial), torch.zeros(batch, 0, device=device)

    priority = _seed_priority(pixel, seed)
    score = None
    if seed_scores is not None:
        # Compared as given (no rounding to float32 that could make ties).
        score = seed_scores.detach().reshape(batch, -1)[image, pixel]
        score = torch.nan_to_num(score, nan=-torch.inf)
        if min_seed_score is not None:
            # Below the threshold a pixel is never open: -inf, like a visited one.
            priority = torch.where(score >= min_seed_score, priority, torch.full_like(priority, -1))
    bandwidth_sq = float(bandwidth) ** 2
    threshold_sq = float(threshold) ** 2
    merge_sq = float(delta_d) ** 2
    capacity = max_iterations
    centres = points.new_zeros(batch, capacity, dim)
    num_found = torch.zeros(batch, dtype=torch.long, device=device)
    slot_ids = torch.arange(capacity, device=device)
    batch_ids = torch.arange(batch, device=device)
    point_label = torch.zeros(num_points, dtype=torch.long, device=device)  # 0: unclaimed, else slot + 1
    visited = torch.zeros(num_points, dtype=torch.bool, device=device)
    check_every = 8 if device.type == "cuda" else 1
    # Fewer unvisited points than this cannot make an instance that is kept.
    min_seeds = max(min_size, 1)

    for iteration in range(max_iterations):
        # 1. The unvisited point of highest score (then priority) in each
        # image that still has enough unvisited points to make an instance
        # of min_size.
        unvisited_count = _per_image_sum((~visited).to(points.dtype), points_per_image)
        open_priority = torch.where(visited, torch.full_like(priority, -1), priority)
        open_score = None if score is None else torch.where(visited, torch.full_like(score, -torch.inf), score)
        best, is_best = _pick_seeds(open_priority, open_score, image, batch)
        has_seed = (best >= 0) & (unvisited_count >= min_seeds)
        point_has_seed = _per_point(has_seed, image)
        is_seed = is_best & point_has_seed
        seeds = _per_image_sum(points * is_seed.unsqueeze(1).to(points.dtype), points_per_image)

        # 2. Mean shift to the mode.
        centre = _mean_shift(points, image, points_per_image, seeds, bandwidth_sq, mean_shift_steps,
                             stop_when_converged=device.type == "cpu")

        # 3. New instance, or more pixels for the instance already at this mode.
        to_existing = centres - centre.unsqueeze(1)
        existing_sq = (to_existing * to_existing).sum(dim=2)
        existing_sq = existing_sq.masked_fill(slot_ids.unsqueeze(0) >= num_found.unsqueeze(1), float("inf"))
        nearest_sq, nearest_slot = existing_sq.min(dim=1)
        duplicate = nearest_sq <= merge_sq
        is_new = has_seed & ~duplicate
        slot = torch.where(duplicate, nearest_slot, num_found)
        write_slot = num_found.clamp(max=capacity - 1)
        centres[batch_ids, write_slot] = torch.where(is_new.unsqueeze(1), centre, centres[batch_ids, write_slot])
        num_found = num_found + is_new.long()

        offsets = points - _per_point(centre, image)
        distance_sq = (offsets * offsets).sum(dim=1)
        claim = (distance_sq <= threshold_sq) & ~visited & point_has_seed
        point_label = torch.where(claim, _per_point(slot, image) + 1, point_label)
        # Points within delta_d of a mode cannot seed a new instance (its mode
        # would be a duplicate), nor can the seed's own window, which the
        # first mean shift step used: they are visited, claimed or not, and
        # left to the final nearest-centre assignment, so that stray points
        # cost no iterations of their own.
        offsets = points - _per_point(seeds, image)
        around_seed = (offsets * offsets).sum(dim=1) <= bandwidth_sq
        visited = visited | ((distance_sq <= merge_sq) | around_seed | is_seed) & point_has_seed
        if (iteration + 1) % check_every == 0 and not bool(has_seed.any()):
            break

    # Drop small instances; every other foreground point joins its nearest kept centre.
    slot_of_point = (point_label - 1).clamp(min=0)
    claimed = point_label > 0
    sizes = _segment_sum(claimed.long(), image * capacity + slot_of_point, batch * capacity)
    kept = (sizes.reshape(batch, capacity) >= max(min_size, 1)) & (slot_ids.unsqueeze(0) < num_found.unsqueeze(1))
    in_kept = claimed & kept[image, slot_of_point]
    orphans = (~in_kept).nonzero(as_tuple=True)[0]  # one synchronisation
    num_slots = max(int(num_found.max()), 1)  # one synchronisation
    centres = centres[:, :num_slots]
    kept = kept[:, :num_slots]
    slot_of_point = torch.where(in_kept, slot_of_point, torch.full_like(slot_of_point, -1))
    if orphans.numel() > 0:
        slot_of_point[orphans] = _nearest_centre(points[orphans], image[orphans], centres, kept)

    # Number the kept instances 1..L_b per image, in the order found.
    new_id = torch.cumsum(kept.long(), dim=1) * kept.long()  # (B, num_slots), 0 for dropped
    has_slot = slot_of_point >= 0
    safe_slot = slot_of_point.clamp(min=0)
    final = torch.where(has_slot, new_id[image, safe_slot], torch.zeros_like(safe_slot))
    labels_flat[image, pixel] = final

    # Confidence: the fraction of an instance's pixels within delta_v of its centre.
    offsets = points - centres[image, safe_slot]
    within = ((offsets * offsets).sum(dim=1) <= float(delta_v) ** 2) & has_slot
    segment = image * num_slots + safe_slot
    totals = _segment_sum(has_slot.to(compute_dtype), segment, batch * num_slots).reshape(batch, num_slots)
    hits = _segment_sum(within.to(compute_dtype), segment, batch * num_slots).reshape(batch, num_slots)
    confidence = hits / totals.clamp(min=1.0)
    num_instances = int(kept.sum(dim=1).max())  # one synchronisation
    scores = torch.zeros(batch, num_instances + 1, dtype=torch.float32, device=device)
    # Dropped slots go to the spare last column, which is cut off.
    column = torch.where(kept, new_id - 1, torch.full_like(new_id, num_instances))
    scores.scatter_(1, column, confidence.float())
    return labels_flat.reshape((batch,) + spatial), scores[:, :num_instances]
