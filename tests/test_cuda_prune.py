"""The CUDA kernels' pruning (issue 19): the unlabeled push rules out
(tile, cluster) pairs with a ball around the tile's unlabeled pixels
(csrc/cuda/push.cu), and the pair loops of dist (finalize.cu, backward.cu)
stop a pair's distance once its partial sum shows the hinge is 0 (math.h
mean_distance_or_far). Both only skip terms that are exactly 0, so:

- the results match the float64 reference and the CPU op at the CUDA
  tests' tolerances, and
- on the CUDA simulator, where runtime.cuh's pruning_enabled() can be
  switched off, they are bitwise equal to the same kernels computing every
  term, and the simulator's counters show that work was skipped.

Cases where a wrong bound would show: coherent unlabeled objects near one
mean and far from the others, pixels at the hinge's edge (inside and
outside by a few parts in 10^7) far from the origin, pixels on the radial
line through a mean (where the ball is tight), means spread beyond 2
delta_d with a few pairs at the edge, C beyond one block of threads, NaN and
inf inputs. On a GPU the bitwise and counter checks skip (no switch there);
the comparisons with the reference still run.
"""

import pytest
import torch

import discloss
from cudasim_device import DEVICE as CUDA
from cudasim_device import cuda_device  # noqa: F401 (autouse: every test here runs the CUDA kernels)
from cudasim_device import ON_SIMULATOR
from cudasim_device import to_cpu_reference as cpu_reference
from helpers import assert_close, assert_grad_close, reference64

pytestmark = [pytest.mark.cuda]
on_simulator_only = pytest.mark.skipif(
    not ON_SIMULATOR, reason="pruning can be switched off (and is counted) on the CUDA simulator only")

DELTA_D = 1.5




def assert_terms_and_grad_close(terms, grad, expected_terms, expected_grad, dtype):
    """The terms (as many as the loss returns) and the gradient, at the CUDA tests' tolerances."""
    for name, a, b in zip(["var", "dist", "reg", "push"], terms, expected_terms):
        assert_close(a, b, dtype, name)
    assert_grad_close(grad, expected_grad, dtype)


def run(x, labels, **kw):
    """Fused terms (per image) and d(sum of terms)/dx."""
    x = x.detach().clone().requires_grad_(True)
    terms = discloss.discriminative_loss(x, labels, **kw)
    grad = torch.autograd.grad(sum(t.sum() for t in terms), x)[0]
    return [t.detach() for t in terms], grad


def raw_forward(x, labels, K, *, norm, push, delta_d=DELTA_D):
    """torch.ops.discloss.forward's 8 outputs (the per-slot sums included)."""
    return torch.ops.discloss.forward(x, labels, None, None, K, 0.5, delta_d, norm, 1.0, 1.0, 0.01, push, 0,
                                      "paper", "none")


def pruned_and_full(fn):
    """fn() with pruning on, the simulator's skip counts, and fn() with it off."""
    import cudasim_device

    cudasim_device.reset_skipped()
    pruned = fn()
    counts = cudasim_device.skipped()
    with cudasim_device.pruning(False):
        cudasim_device.reset_skipped()
        full = fn()
        assert cudasim_device.skipped() == {"push_tiles": 0, "pairs": 0, "push_pixels": 0}
    return pruned, counts, full


def assert_bitwise(a, b, what):
    """Equal bits, NaN where NaN (a NaN's payload aside)."""
    a, b = a.cpu(), b.cpu()
    assert a.dtype == b.dtype and a.shape == b.shape, what
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    assert torch.equal(nan_a, nan_b), f"{what}: NaN in different places"
    same = torch.where(nan_a, torch.zeros_like(a), a)
    other = torch.where(nan_b, torch.zeros_like(b), b)
    bits = {torch.float32: torch.int32, torch.float64: torch.int64}[a.dtype]
    differ = (same.view(bits) != other.view(bits)).sum().item()
    assert differ == 0, f"{what}: {differ} elements differ from the unpruned kernels' bits"


def spread_means(g, C, E, offset, spacing=6.0):
    """C means at least spacing * delta_d - 0.6 apart (each on an axis, at
    increasing distances), shifted by a common vector of norm offset."""
    means = torch.zeros(C, E, dtype=torch.float64)
    for k in range(C):
        means[k, k % E] = spacing * DELTA_D * (1 + k // E)
        means[k] += 0.1 * torch.randn(E, generator=g, dtype=torch.float64)
    shift = torch.randn(E, generator=g, dtype=torch.float64)
    return means + offset * shift / shift.norm()


def unit(g, n, E):
    d = torch.randn(n, E, generator=g, dtype=torch.float64)
    return d / d.norm(dim=1, keepdim=True)


def push_image(dtype, *, C, E, offset=0.0, seed=0, tiles=12, edge=0.5, norm=2):
    """One image (1, E, tiles + C, 256): row t < tiles is one tile of
    unlabeled pixels (label 0), an object around mean near[t]: an edge
    fraction at distance delta_d (1 + s), |s| in [1e-7, 3e-6] (inside or
    outside the hinge), the others spread up to 0.5 delta_d around it (q >
    0), or, for a quarter of the rows, a radial segment through the mean
    whose near end is at the edge (the ball is tight there); the last C
    rows are the clusters, every pixel exactly on its mean. Every mean
    lies far (> 4 delta_d) from every other, so a tile's ball rules out all
    clusters but its own. Under L1 the distances are L1 distances."""
    g = torch.Generator().manual_seed(seed)
    means = spread_means(g, C, E, offset)
    W = 256
    x = torch.empty(tiles + C, W, E, dtype=torch.float64)
    labels = torch.zeros(tiles + C, W, dtype=torch.long)
    near = torch.randint(0, C, (tiles,), generator=g)
    for t in range(tiles):
        mu = means[near[t]]
        s = 1e-7 + (3e-6 - 1e-7) * torch.rand(W, generator=g, dtype=torch.float64)
        s = torch.where(torch.rand(W, generator=g) < 0.5, -s, s)
        if t % 4 == 3:  # a radial segment: from the edge outward along one direction
            d = unit(g, 1, E).expand(W, E)
            if norm == 1:
                d = d / d.abs().sum(1, keepdim=True)
            r = DELTA_D * (1 + s[0]) + torch.linspace(0, 0.3 * DELTA_D, W, dtype=torch.float64)
        else:
            d = unit(g, W, E)
            if norm == 1:
                d = d / d.abs().sum(1, keepdim=True)
            inside = 0.5 * DELTA_D * torch.rand(W, generator=g, dtype=torch.float64)
            r = torch.where(torch.rand(W, generator=g) < edge, DELTA_D * (1 + s), inside)
        x[t] = mu + r[:, None] * d
    for k in range(C):
        x[tiles + k] = means[k]
        labels[tiles + k] = k + 1
    return x.permute(2, 0, 1).unsqueeze(0).to(dtype).contiguous(), labels.unsqueeze(0)


def far_tiles_image(dtype, *, C, E, seed=0):
    """Two images: image 1 is push_image's; image 0 has the same clusters,
    and its unlabeled rows are one tight object around the first mean
    mirrored through the origin, at least 6 delta_d - 0.3 from every mean
    (push = 0: every (tile, cluster) pair can go)."""
    x1, l1 = push_image(dtype, C=C, E=E, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    tiles = x1.shape[2] - C
    x0 = x1.clone()
    centre = -x1[0, :, tiles, 0].double()
    spread = 0.1 * torch.randn(E, tiles, 256, generator=g, dtype=torch.float64)
    x0[0, :, :tiles] = (centre[:, None, None] + spread).to(dtype)
    return torch.cat([x0, x1]), torch.cat([l1, l1])


PUSH_CASES = [
    # C, E, offset
    (7, 5, 0.0),
    (7, 5, 1e3),  # far from the origin: the subtractions and the margin matter
    (3, 1, 0.0),
    (3, 1, 1e3),
    (20, 16, 0.0),
    (20, 16, 300.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C, E, offset", PUSH_CASES)
@pytest.mark.parametrize("norm", [1, 2])
def test_push_against_reference_and_cpu_op(dtype, C, E, offset, norm):
    x, labels = push_image(dtype, C=C, E=E, offset=offset, seed=C + E, norm=norm)
    x, labels = x.to(CUDA), labels.to(CUDA)
    kw = dict(delta_v=0.5, delta_d=DELTA_D, unlabeled_push=1.0, max_instances=C + 1, norm=norm, reduction="none")
    terms, grad = run(x, labels, **kw)
    ref, ref_grad = reference64(x.cpu(), labels.cpu(), **kw)
    assert float(ref[3].sum()) > 0  # the push takes part
    assert_terms_and_grad_close(terms, grad, ref, ref_grad, dtype)
    cpu_terms, cpu_grad = cpu_reference(run, x, labels, **kw)
    assert_terms_and_grad_close(terms, grad, cpu_terms, cpu_grad, dtype)


@on_simulator_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C, E, offset", PUSH_CASES)
@pytest.mark.parametrize("norm", [1, 2])
def test_push_bitwise_equal_to_the_unpruned_kernels(dtype, C, E, offset, norm):
    x, labels = push_image(dtype, C=C, E=E, offset=offset, seed=C + E + 1, norm=norm)
    K = C + 1

    def forward_and_grad():
        grad = run(x, labels, unlabeled_push=1.0, max_instances=K, norm=norm, reduction="none")[1]
        return raw_forward(x, labels, K, norm=norm, push=1.0), grad

    (out, grad), counts, (full_out, full_grad) = pruned_and_full(forward_and_grad)
    names = ["var", "dist", "reg", "push", "means", "counts", "hinge_grad_sums", "push_grad_sums"]
    for name, a, b in zip(names, out, full_out):
        if name == "counts":
            assert torch.equal(a, b)
        else:
            assert_bitwise(a, b, name)
    assert_bitwise(grad, full_grad, "grad")
    assert float(out[3].sum()) > 0
    tiles = x.shape[2] - C
    # Every tile lies near one mean and at least 4 delta_d from the others:
    # its ball rules out the other C - 1 (and sometimes its own, when every
    # pixel of the tile is outside the hinge by more than the margin).
    assert counts["push_tiles"] >= tiles * (C - 1), counts
    # Pass 3 stops the distance of each unlabeled pixel to the C - 1 far means.
    assert counts["push_pixels"] >= tiles * x.shape[3] * (C - 1), counts


@on_simulator_only
@pytest.mark.parametrize("C, E", [(7, 5), (3, 1), (20, 16)])
def test_far_tiles_all_ruled_out_and_bitwise(C, E):
    x, labels = far_tiles_image(torch.float32, C=C, E=E, seed=3)
    K = C + 1

    def forward_and_grad():
        grad = run(x, labels, unlabeled_push=1.0, max_instances=K, reduction="none")[1]
        return raw_forward(x, labels, K, norm=2, push=1.0), grad

    (out, grad), counts, (full_out, full_grad) = pruned_and_full(forward_and_grad)
    for i, (a, b) in enumerate(zip(out, full_out)):
        if a.is_floating_point():
            assert_bitwise(a, b, f"output {i}")
    assert_bitwise(grad, full_grad, "grad")
    tiles = x.shape[2] - C
    assert float(out[3][0]) == 0 and float(out[3][1]) > 0
    # Image 0: every (tile, cluster) pair goes; image 1: all but the tile's own mean.
    assert counts["push_tiles"] >= tiles * C + tiles * (C - 1), counts
    ref = reference64(x, labels, unlabeled_push=1.0, max_instances=K, reduction="none")[0]
    assert float(ref[3][0]) == 0


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("norm", [1, 2])
def test_non_finite_unlabeled_pixel_in_a_far_tile(value, norm):
    # The tile lies far from every mean (its ball would rule them all out)
    # except for one non-finite pixel: its centre or radius is then NaN or
    # inf and nothing is ruled out, so the pixel reaches the push (and its
    # gradient) as in plain PyTorch.
    x, labels = far_tiles_image(torch.float32, C=7, E=5, seed=4)
    x[0, 2, 1, 17] = value
    x, labels = x.to(CUDA), labels.to(CUDA)
    kw = dict(unlabeled_push=1.0, max_instances=8, norm=norm, delta_d=DELTA_D, reduction="none")
    terms, grad = run(x, labels, **kw)
    ref, ref_grad = reference64(x.cpu(), labels.cpu(), **kw)
    for name, a, b in zip(["var", "dist", "reg", "push"], terms, ref):
        a, b = a.cpu().double(), b.cpu()
        assert torch.equal(torch.isnan(a), torch.isnan(b)), name
        finite = torch.isfinite(b)
        assert_close(a[finite], b[finite], torch.float32, name)
    assert torch.equal(torch.isnan(grad.cpu()), torch.isnan(ref_grad))
    if ON_SIMULATOR:
        import cudasim_device

        with cudasim_device.pruning(False):
            full_terms, full_grad = run(x, labels, **kw)
        for name, a, b in zip(["var", "dist", "reg", "push"], terms, full_terms):
            assert_bitwise(a, b, name)
        assert_bitwise(grad, full_grad, "grad")


# ---- the pairs of dist ------------------------------------------------------------------------------


def pair_image(dtype, *, C, E, offset=0.0, seed=0, edge_pairs=4, norm=2, side=12):
    """Two images (2, E, C, side) of C clusters, one row each, every pixel
    on its mean, and no unlabeled pixel. Image 0: means spread at least 4
    delta_d apart (most pairs beyond 2 delta_d: their hinge is 0), except
    edge_pairs means placed at 2 delta_d (1 + s) from another, |s| in
    [1e-7, 3e-6] (inside or outside the hinge), along a random direction,
    and one pair well inside. Image 1: the same means, shuffled, at a
    third of the spacing (more pairs within reach). Under L1 distances are L1."""
    g = torch.Generator().manual_seed(seed)
    means = spread_means(g, C, E, offset, spacing=4.0)
    for i in range(edge_pairs):
        a, b = 2 * i, 2 * i + 1
        d = unit(g, 1, E)[0]
        if norm == 1:
            d = d / d.abs().sum()
        s = float(1e-7 + (3e-6 - 1e-7) * torch.rand((), generator=g, dtype=torch.float64))
        s = s if i % 2 == 0 else -s
        means[b] = means[a] + 2 * DELTA_D * (1 + s) * d
    means[C - 1] = means[C - 2] + 0.7 * DELTA_D * unit(g, 1, E)[0]
    second = means[torch.randperm(C, generator=g)] / 3
    x = torch.stack([means, second])[:, :, None, :].expand(2, C, side, E)
    labels = (torch.arange(C) + 1)[None, :, None].expand(2, C, side)
    return x.permute(0, 3, 1, 2).to(dtype).contiguous(), labels.contiguous()


PAIR_CASES = [
    # C, E, offset
    (12, 5, 0.0),
    (12, 5, 1e3),
    (9, 1, 0.0),
    (150, 16, 0.0),  # more clusters than a block of the coefficients step (128) and several finalize tiles
    (150, 16, 200.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C, E, offset", PAIR_CASES)
@pytest.mark.parametrize("norm", [1, 2])
def test_pairs_against_reference_and_cpu_op(dtype, C, E, offset, norm):
    x, labels = pair_image(dtype, C=C, E=E, offset=offset, seed=C + E, norm=norm,
                           edge_pairs=min(4, C // 2 - 1))
    x, labels = x.to(CUDA), labels.to(CUDA)
    kw = dict(delta_v=0.5, delta_d=DELTA_D, max_instances=C + 4, norm=norm, gamma=0.01, reduction="none")
    terms, grad = run(x, labels, **kw)
    ref, ref_grad = reference64(x.cpu(), labels.cpu(), **kw)
    assert float(ref[1][0]) > 0 and float(ref[1][1]) > 0  # pairs within reach in both images
    assert_terms_and_grad_close(terms, grad, ref, ref_grad, dtype)
    cpu_terms, cpu_grad = cpu_reference(run, x, labels, **kw)
    assert_terms_and_grad_close(terms, grad, cpu_terms, cpu_grad, dtype)


@on_simulator_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C, E, offset", PAIR_CASES)
@pytest.mark.parametrize("norm", [1, 2])
def test_pairs_bitwise_equal_to_the_unpruned_kernels(dtype, C, E, offset, norm):
    x, labels = pair_image(dtype, C=C, E=E, offset=offset, seed=C + E + 1, norm=norm,
                           edge_pairs=min(4, C // 2 - 1))
    kw = dict(delta_v=0.5, delta_d=DELTA_D, max_instances=C + 4, norm=norm, gamma=0.01, reduction="none")
    (terms, grad), counts, (full_terms, full_grad) = pruned_and_full(lambda: run(x, labels, **kw))
    for name, a, b in zip(["var", "dist", "reg", "push"], terms, full_terms):
        assert_bitwise(a, b, name)
    assert_bitwise(grad, full_grad, "grad")
    # Forward (finalize: each unordered pair once) and backward (coefficients:
    # each ordered pair) both stop most pairs of image 0.
    pairs = C * (C - 1) // 2
    assert counts["pairs"] >= pairs, counts


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("component", ["first", "last"])
@pytest.mark.parametrize("norm", [1, 2])
def test_non_finite_mean_is_not_lost_by_the_early_exit(value, component, norm):
    # Means spread far apart: every pair would stop after its first
    # component. A non-finite value in one pixel makes its cluster's mean
    # non-finite in that component; when it is the last component, a pair
    # that stopped early would never read it. dist (and the gradient) must
    # come out as the reference's: NaN where it is NaN.
    x, labels = pair_image(torch.float32, C=12, E=5, seed=7, norm=norm, edge_pairs=0)
    x = x.clone()
    x[0, 0 if component == "first" else 4, 3, 5] = value
    x, labels = x.to(CUDA), labels.to(CUDA)
    kw = dict(delta_d=DELTA_D, max_instances=16, norm=norm, reduction="none")
    terms, grad = run(x, labels, **kw)
    ref, ref_grad = reference64(x.cpu(), labels.cpu(), **kw)
    for name, a, b in zip(["var", "dist", "reg"], terms, ref):
        a, b = a.cpu().double(), b.cpu()
        assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{name}: {a} vs {b}"
        finite = torch.isfinite(b)
        assert_close(a[finite], b[finite], torch.float32, name)
    if value != value:  # (an inf: see the next test)
        assert torch.equal(torch.isnan(grad.cpu()), torch.isnan(ref_grad))
        assert torch.isnan(terms[1][0]) and torch.isfinite(terms[1][1])
    if ON_SIMULATOR:
        import cudasim_device

        with cudasim_device.pruning(False):
            full_terms, full_grad = run(x, labels, **kw)
        for name, a, b in zip(["var", "dist", "reg"], terms, full_terms):
            assert_bitwise(a, b, name)
        assert_bitwise(grad, full_grad, "grad")


@on_simulator_only
def test_chainer_pairs_are_not_pruned():
    # The Chainer normalisation's pair loop (every slot of every image) has
    # no early exit: nothing is counted, and its result stays the reference's.
    import cudasim_device
    from discloss.chainer import discriminative_margin_based_clustering_loss as chainer_loss

    x, labels = pair_image(torch.float64, C=6, E=3, seed=2, edge_pairs=1)
    cudasim_device.reset_skipped()
    terms = chainer_loss(x, labels, 0.5, DELTA_D, 6, norm=2)
    assert cudasim_device.skipped()["pairs"] == 0
    ref = discloss.reference.discriminative_loss_reference(x.double(), labels, 0.5, DELTA_D, norm=2,
                                                           max_instances=6, normalization="chainer", ignore_index=None)
    assert float(ref[1]) > 0
    for a, b in zip(terms, ref):
        assert_close(a, b, torch.float64)


@pytest.mark.parametrize("norm", [1, 2])
def test_inf_mean_gradient_nan_where_the_reference_has_it(norm):
    # Under L2 the pairs of the inf mean have p = 0 and a gradient term
    # 0 * (mu_k - mu_l) / r, NaN in the inf component of every other
    # cluster's mean (the reference's autograd; the CPU kernels agree).
    x, labels = pair_image(torch.float32, C=12, E=5, seed=7, norm=norm, edge_pairs=0)
    x = x.clone()
    x[0, 4, 3, 5] = float("inf")
    kw = dict(delta_d=DELTA_D, max_instances=16, norm=norm, reduction="none")
    grad = run(x.to(CUDA), labels.to(CUDA), **kw)[1]
    ref_grad = reference64(x, labels, **kw)[1]
    assert torch.equal(torch.isnan(grad.cpu()), torch.isnan(ref_grad))


def radial_edge_image(dtype, *, C, E, tiles, seed=0):
    """One image (1, E, tiles + C, 256) whose unlabeled pixels all lie on
    radial segments: row t < tiles runs outward from distance delta_d (1 +
    s), |s| <= 4e-7 (a few roundings), along a random direction through
    mean near[t]. On such a line the ball is tight (||c - mu|| - rho is the
    near end's distance), so the ball's rounding margin decides whether the
    tile's own mean is ruled out; and since no other pixel reaches the push,
    a wrongly skipped edge pixel changes its cluster's sums."""
    g = torch.Generator().manual_seed(seed)
    means = spread_means(g, C, E, 0.0)
    x = torch.empty(tiles + C, 256, E, dtype=torch.float64)
    labels = torch.zeros(tiles + C, 256, dtype=torch.long)
    near = torch.randint(0, C, (tiles,), generator=g)
    s = 4e-7 * (2 * torch.rand(tiles, generator=g, dtype=torch.float64) - 1)
    d = unit(g, tiles, E)
    for t in range(tiles):
        r = DELTA_D * (1 + s[t]) + torch.linspace(0, 0.3 * DELTA_D, 256, dtype=torch.float64)
        x[t] = means[near[t]] + r[:, None] * d[t]
    for k in range(C):
        x[tiles + k] = means[k]
        labels[tiles + k] = k + 1
    return x.permute(2, 0, 1).unsqueeze(0).to(dtype).contiguous(), labels.unsqueeze(0)


@on_simulator_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("E", [5, 16])
def test_push_radial_edge_tiles_bitwise(dtype, E):
    C = 3
    x, labels = radial_edge_image(dtype, C=C, E=E, tiles=160, seed=E)
    (out, counts, full_out) = pruned_and_full(lambda: raw_forward(x, labels, C + 1, norm=2, push=1.0))
    for name, i in [("push", 3), ("push_grad_sums", 7)]:
        assert_bitwise(out[i], full_out[i], name)
    assert float(out[3].sum()) > 0  # some edge pixels lie inside the hinge
    assert counts["push_tiles"] >= 160 * (C - 1), counts
