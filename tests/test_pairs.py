"""The pair step of the dist term with many clusters (CPU, L2, paper mode):
csrc/cpu/kernels.h compares one mean with blocks of 128 others in vector
lanes (the gradient: tiles of 128 x 128 pairs, each pair formed once, in
rounds of tiles with disjoint rows and columns), and redoes pairs whose
distance leaves the unscaled sum's exact range. Checked against the float64
reference with pairs of every kind in several blocks and tiles, and bitwise
across thread counts."""

import pytest
import torch

import discloss
from helpers import assert_close, assert_grad_close, reference64

C = 300  # three column blocks (an odd count: the schedule's dummy block), nineteen row tiles


def cluster_case(dtype, seed=0):
    """Embeddings (2, 3, 2C + 40) whose clusters are two equal pixels each, so
    that every mean is exact; among them coincident means, means a tiny and
    a huge distance apart, in different blocks and tiles; 40 background pixels."""
    tiny, huge = (1e-20, 1e20) if dtype == torch.float32 else (1e-140, 1e140)
    g = torch.Generator().manual_seed(seed)
    B, E = 2, 3
    means = torch.randn(B, C, E, generator=g, dtype=torch.float64)
    for b in range(B):
        means[b, 6] = means[b, 5]               # coincident (r = 0), one tile
        means[b, 251] = means[b, 17]            # coincident, another block and tile
        means[b, 8] = means[b, 7]
        means[b, 8, 0] += tiny * (1 + b)        # a tiny distance apart
        means[b, 9] = huge                      # far from everything
        means[b, 290] = means[b, 9] * (1 + 1e-3)  # far, near another far one
    means = means.to(dtype)
    ids = torch.stack([torch.randperm(C, generator=g) * 7 + 3 for _ in range(B)])  # arbitrary ids
    x = torch.empty(B, E, 2 * C + 40, dtype=dtype)
    labels = torch.zeros(B, 2 * C + 40, dtype=torch.int64)
    for b in range(B):
        x[b, :, : 2 * C] = means[b].repeat_interleave(2, 0).T
        x[b, :, 2 * C:] = torch.randn(E, 40, generator=g, dtype=torch.float64).to(dtype)
        labels[b, : 2 * C] = ids[b].repeat_interleave(2)
    return x, labels


def run(x, labels, **kw):
    x = x.clone().requires_grad_(True)
    terms = discloss.discriminative_loss(x, labels, max_instances=C, **kw)
    (grad,) = torch.autograd.grad(sum(t.sum() for t in terms), x)
    return [t.detach() for t in terms], grad


def slots(labels):
    """The wrapper's slot of each id: ids in ascending order per image (0 stays background)."""
    out = torch.zeros_like(labels)
    for b in range(labels.shape[0]):
        ids = torch.unique(labels[b][labels[b] != 0])
        out[b][labels[b] != 0] = torch.searchsorted(ids, labels[b][labels[b] != 0]) + 1
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_many_clusters_against_float64(dtype, reduction):
    x, labels = cluster_case(dtype)
    kw = dict(delta_v=0.5, delta_d=1.5, gamma=0.0, reduction=reduction)
    terms, grad = run(x, labels, **kw)
    ref, ref_grad = reference64(x, slots(labels), max_instances=C + 1, **kw)
    assert float(ref[1].sum()) > 0  # pairs within the hinge
    for name, t, r in zip(["var", "dist", "reg"], terms, ref):
        assert_close(t, r, dtype, name)
    assert torch.isfinite(grad).all()
    assert_grad_close(grad, ref_grad, dtype)


def test_many_clusters_bitwise_across_thread_counts():
    x, labels = cluster_case(torch.float32, seed=1)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(run(x, labels, gamma=0.01))
    finally:
        torch.set_num_threads(before)
    (t1, g1) = results[0]
    for terms, grad in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(terms, t1))
        assert torch.equal(grad, g1)


def spread_case(dtype):
    """Means far apart in their first component (the pair step skips pairs more
    than 2 delta_d apart there), with pairs right at that edge and close pairs."""
    g = torch.Generator().manual_seed(2)
    B, E = 1, 4
    means = torch.randn(B, C, E, generator=g, dtype=torch.float64)
    means[..., 0] = torch.randn(B, C, generator=g, dtype=torch.float64) * 40
    for k, gap in [(10, 3.0), (20, 3.0 * (1 + 2e-7)), (30, 3.0 * (1 - 2e-7)), (40, 2.9)]:
        means[0, k + 1] = means[0, k]
        means[0, k + 1, 0] += gap  # first components exactly 2 delta_d apart, or just beyond or inside
    means = means.to(dtype)
    x = means.repeat_interleave(2, 1).transpose(1, 2).contiguous()
    labels = (torch.arange(2 * C) // 2 + 1).repeat(B, 1)
    return x, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_far_apart_pairs_skipped_exactly(dtype):
    x, labels = spread_case(dtype)
    kw = dict(delta_v=0.5, delta_d=1.5, gamma=0.0)
    terms, grad = run(x, labels, **kw)
    ref, ref_grad = reference64(x, labels, max_instances=C + 1, **kw)
    assert float(ref[1]) > 0
    for name, t, r in zip(["var", "dist", "reg"], terms, ref):
        assert_close(t, r, dtype, name)
    assert_grad_close(grad, ref_grad, dtype)


def test_a_nan_mean_reaches_dist_as_in_plain_pytorch():
    # With a non-finite mean nothing is skipped: its pairs' NaN reaches dist.
    x, labels = spread_case(torch.float32)
    x[0, 1, 100] = float("nan")  # one pixel of cluster 51, component 1 (not the sorting one)
    terms = discloss.discriminative_loss(x, labels, max_instances=C + 1, gamma=0.0)
    ref = discloss.reference.discriminative_loss_reference(x.double(), labels, max_instances=C + 1, gamma=0.0)
    assert torch.isnan(ref[1]) and torch.isnan(terms.dist)


@pytest.mark.parametrize("clusters", [1, 2, 127, 128, 129, 256, 400, 513])
def test_every_pair_once_for_any_count_of_blocks(clusters):
    # The gradient's tiles of 128 x 128 pairs run in round-robin rounds: one
    # block, two, an even count (400: 4 blocks) and odd ones (129, 513: a
    # dummy block), partial last blocks. Means N(0, 1/2) in 3 dims: nearly
    # every pair within the hinge, so every tile has terms.
    g = torch.Generator().manual_seed(clusters)
    E = 3
    means = torch.randn(1, clusters, E, generator=g, dtype=torch.float64) * 0.7
    x = means.repeat_interleave(2, 1).transpose(1, 2).contiguous().float()
    labels = (torch.arange(2 * clusters) // 2 + 1)[None]
    kw = dict(delta_v=0.5, delta_d=1.5, gamma=0.0)
    xg = x.clone().requires_grad_(True)
    terms = discloss.discriminative_loss(xg, labels, max_instances=clusters + 1, **kw)
    (grad,) = torch.autograd.grad(sum(t.sum() for t in terms), xg)
    ref, ref_grad = reference64(x, labels, max_instances=clusters + 1, **kw)
    if clusters > 1:
        assert float(ref[1]) > 0
    for name, t, r in zip(["var", "dist", "reg"], terms, ref):
        assert_close(t, r, torch.float32, name)
    assert_grad_close(grad, ref_grad, torch.float32)
