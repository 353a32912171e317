"""The unlabeled push on CPU (csrc/cpu/kernels.h): the unlabeled pixels of a
segment are gathered, 512 at a time, and meet the means four at a time in
16 (float32) or 8 (float64) lanes; (mean, lanes) blocks are ruled out by a
norm test and a Gram test, each with a rounding margin, before the exact
sums. Checked against the float64 reference: pixels right at the hinge's
edge (where a test without its margin drops pairs), far from the origin
(where the Gram form cancels), radial to their mean (where the norm test is
tight), in coherent and scattered layouts, and bitwise across thread
counts."""

import pytest
import torch

import discloss
from helpers import assert_close, assert_grad_close, reference64

DELTA_D = 1.5


def spread_means(g, C, E, offset):
    """C means at least 4 delta_d apart, shifted by a common vector of norm offset."""
    means = torch.zeros(C, E, dtype=torch.float64)
    for k in range(C):
        means[k, k % E] = 6.0 * DELTA_D * (1 + k // E)
        means[k] += 0.3 * torch.randn(E, generator=g, dtype=torch.float64)
    shift = torch.randn(E, generator=g, dtype=torch.float64)
    return means + offset * shift / shift.norm()


def edge_case(dtype, *, offset=0.0, radial=False, edge=1.0, repeat=1, seed=0, C=7, E=5, width=1504):
    """One image (E, 3, width): rows of labelled pixels (exactly their means)
    and unlabeled ones (label 0), about 40% per row. A fraction edge of the
    unlabeled pixels lie at distance delta_d (1 + s) from one mean, |s| in
    [1e-4, 3e-3], inside or outside the hinge; the others far from every
    mean (20 delta_d outward when radial, else 3 delta_d away). radial:
    along the mean's own direction, else a random one. repeat: every pixel
    repeated that many times along the row (16: each 16 lanes the same pixel)."""
    g = torch.Generator().manual_seed(seed)
    means = spread_means(g, C, E, offset)
    n = 3 * width // repeat
    labels = torch.randint(1, C + 1, (n,), generator=g)
    unlabeled = torch.rand(n, generator=g) < 0.4
    near = torch.randint(0, C, (n,), generator=g)
    s = (1e-4 + (3e-3 - 1e-4) * torch.rand(n, generator=g, dtype=torch.float64))
    s = torch.where(torch.rand(n, generator=g) < 0.5, -s, s)
    r = DELTA_D * (1 + s)
    if radial:
        direction = means[near] / means[near].norm(dim=1, keepdim=True)
        direction = torch.where(torch.rand(n, 1, generator=g) < 0.5, -direction, direction)
        far = 20 * DELTA_D
    else:
        direction = torch.randn(n, E, generator=g, dtype=torch.float64)
        direction = direction / direction.norm(dim=1, keepdim=True)
        far = 3 * DELTA_D
    is_edge = torch.rand(n, generator=g) < edge
    if radial:  # far pixels outward, so that their norms differ from every mean's
        direction = torch.where(is_edge[:, None], direction, direction.abs() * means[near].sign())
    r = torch.where(is_edge, r, torch.full_like(r, far))
    x = means[labels - 1].clone()
    x[unlabeled] = means[near[unlabeled]] + r[unlabeled][:, None] * direction[unlabeled]
    labels[unlabeled] = 0
    x, labels, keep = (t.repeat_interleave(repeat, 0) for t in (x, labels, unlabeled & is_edge))
    x = x.to(dtype).T.reshape(1, E, 3, width).contiguous()
    return x, labels.reshape(1, 3, width), keep.reshape(1, 3, width)


def run(x, labels, **kw):
    x = x.clone().requires_grad_(True)
    terms = discloss.discriminative_loss(x, labels, **kw)
    (grad,) = torch.autograd.grad(sum(t.sum() for t in terms), x)
    return [t.detach() for t in terms], grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("offset, radial, repeat", [(0.0, False, 1), (1e3, False, 1), (1e5, True, 1), (0.0, True, 1),
                                                    (1e5, False, 16)])
@pytest.mark.parametrize("edge", [1.0, 1 / 16])
def test_pairs_at_the_hinge_edge_are_kept(dtype, offset, radial, repeat, edge):
    # Far from the origin, ||x||^2 + ||mu||^2 - 2 x.mu cancels (float32:
    # about 0.3 off on r^2 = 2.25 at offset 1e3); along the mean's direction,
    # | ||x|| - ||mu|| | equals r (float32 norms about 5e-3 off at 1e5); 16
    # lanes of one pixel make a ball of radius 0 whose centre is r from the
    # mean. A test without its margin drops pairs inside the hinge there, and
    # their pixels' gradients go to 0, when the other pixels of their 16
    # lanes are ruled out too (edge = 1/16, or repeat = 16).
    x, labels, unlabeled = edge_case(dtype, offset=offset, radial=radial, edge=edge, repeat=repeat)
    kw = dict(delta_v=0.5, delta_d=DELTA_D, gamma=0.0, unlabeled_push=1.0)
    terms, grad = run(x, labels, max_instances=8, **kw)
    ref, ref_grad = reference64(x, labels, max_instances=8, **kw)
    assert float(ref[3]) > 0  # pairs inside the hinge
    # q = delta_d - r is about 1e-3 here: float32 gets it to about 1e-3
    # relative, float64 to about 1e-8 far from the origin (the means' last bits)
    rtol = 2e-2 if dtype == torch.float32 else 1e-6
    torch.testing.assert_close(terms[3].double(), ref[3], rtol=rtol, atol=0)
    mask = unlabeled.unsqueeze(1).expand_as(grad)
    g, r = grad[mask].double(), ref_grad[mask]
    assert int((r != 0).sum()) > (100 if edge == 1.0 else 20)
    torch.testing.assert_close(g, r, rtol=rtol, atol=1e-3 * float(r.abs().max()))


def mixed_case(dtype, layout, C, E, seed=0):
    """Two images (E, 40, 150) with about 30% unlabeled pixels, coherent
    (whole rows) or scattered; unlabeled pixels at every distance from the
    means: well inside delta_d, at its edge, beyond it, on a mean."""
    g = torch.Generator().manual_seed(seed)
    B, H, W = 2, 40, 150
    x = torch.empty(B, E, H, W, dtype=torch.float64)
    labels = torch.empty(B, H, W, dtype=torch.int64)
    for b in range(B):
        means = spread_means(g, C, E, 0.0) * 0.35  # some means within 2 delta_d of each other
        lab = torch.randint(1, C + 1, (H, W), generator=g)
        if layout == "coherent":
            unl = (torch.arange(H) % 10 < 3)[:, None].expand(H, W).clone()
        else:
            unl = torch.rand(H, W, generator=g) < 0.3
        near = torch.randint(0, C, (H, W), generator=g)
        kind = torch.randint(0, 4, (H, W), generator=g).double()
        r = torch.where(kind == 0, 0.5, torch.where(kind == 1, 1.0 + 1e-3, torch.where(kind == 2, 3.0, 0.0)))
        r = r * DELTA_D * (1 + 0.1 * torch.rand(H, W, generator=g, dtype=torch.float64))
        d = torch.randn(H, W, E, generator=g, dtype=torch.float64)
        d = d / d.norm(dim=-1, keepdim=True)
        pix = means[lab - 1] + 0.2 * torch.randn(H, W, E, generator=g, dtype=torch.float64)
        pix[unl] = means[near[unl]] + r[unl][:, None] * d[unl]
        lab[unl] = 0
        x[b] = pix.permute(2, 0, 1)
        labels[b] = lab
    return x.to(dtype), labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["coherent", "scattered"])
@pytest.mark.parametrize("C, E", [(7, 5), (70, 16), (3, 1)])
def test_push_against_float64(dtype, layout, C, E):
    x, labels = mixed_case(dtype, layout, C, E)
    kw = dict(delta_v=0.5, delta_d=DELTA_D, unlabeled_push=1.0)
    terms, grad = run(x, labels, max_instances=C + 1, **kw)
    ref, ref_grad = reference64(x, labels, max_instances=C + 1, **kw)
    assert float(ref[3]) > 0
    for name, t, r in zip(["var", "dist", "reg", "push"], terms, ref):
        assert_close(t, r, dtype, name)
    assert_grad_close(grad, ref_grad, dtype)


def test_push_l1_against_float64():
    x, labels = mixed_case(torch.float64, "scattered", 7, 5)
    kw = dict(delta_v=0.5, delta_d=DELTA_D, unlabeled_push=1.0, norm=1)
    terms, grad = run(x, labels, max_instances=8, **kw)
    ref, ref_grad = reference64(x, labels, max_instances=8, **kw)
    assert float(ref[3]) > 0
    for name, t, r in zip(["var", "dist", "reg", "push"], terms, ref):
        assert_close(t, r, torch.float64, name)
    assert_grad_close(grad, ref_grad, torch.float64)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_unlabeled_pixel_as_in_plain_pytorch(value):
    # Such a pixel is never ruled out: it reaches the push as in the reference.
    x, labels = mixed_case(torch.float32, "scattered", 7, 5)
    b, i, j = torch.nonzero(labels == 0)[5].tolist()
    x[b, 2, i, j] = value
    kw = dict(delta_v=0.5, delta_d=DELTA_D, unlabeled_push=1.0, max_instances=8)
    terms = discloss.discriminative_loss(x, labels, **kw)
    ref = discloss.reference.discriminative_loss_reference(x.double(), labels, **kw)
    assert torch.equal(torch.isnan(terms[3]), torch.isnan(ref[3]))
    if not torch.isnan(ref[3]):
        assert_close(terms[3], ref[3], torch.float32, "push")


def test_push_bitwise_across_thread_counts():
    x, labels = mixed_case(torch.float32, "scattered", 70, 16, seed=1)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(run(x, labels, max_instances=71, unlabeled_push=1.0))
    finally:
        torch.set_num_threads(before)
    t1, g1 = results[0]
    for terms, grad in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(terms, t1))
        assert torch.equal(grad, g1)
