"""Finite inputs give finite gradients, and pixels that take part in no term
cannot make anything non-finite (issue 20, items 4 and 5): against float64
per-instance loops (tests/helpers.py) and values worked out by hand."""

import math

import pytest
import torch

import discloss
from discloss.chainer import discriminative_margin_based_clustering_loss as chainer_loss
from helpers import DEVICES, blob_labels, loop_reference64, loop_terms


def gradient(f, x):
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(x), x)
    return g


def gradient_and_hvp(f, x, v):
    """d f / dx through the double-backward path (create_graph=True), and the Hessian-vector product."""
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(x), x, create_graph=True)
    (h,) = torch.autograd.grad((g * v).sum(), x)
    return g.detach(), h


# ---- item 4: NaN or inf on pixels outside every cluster -------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw", [dict(), dict(norm=1), dict(hinge_pull=False, reduction="none", gamma=0.2),
                                dict(ignore_index=7, reduction="sum")])
def test_nonfinite_ignored_pixels_paper(value, dtype, kw):
    ignore = kw.get("ignore_index", 0)
    lab = blob_labels(2, (5, 6), 3, seed=1)
    lab = torch.where(lab == 0, ignore, lab)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, generator=g)
    v = torch.randn(x.shape, dtype=torch.float64, generator=g)
    ignored = (lab == ignore)[:, None].expand_as(x)
    assert bool(ignored.any())
    x_clean = x.masked_fill(ignored, 0.0)  # the values there do not take part: any will do
    x_bad = x.masked_fill(ignored, value).to(dtype)

    def ours(x):
        return sum(t.sum() for t in discloss.discriminative_loss(x, lab, max_instances=4, **kw))

    def ref(x):
        return sum(t.sum() for t in loop_terms(x, lab, twice_differentiable=True, **kw))

    fused = gradient(ours, x_bad)
    g, h = gradient_and_hvp(ours, x_bad, v.to(dtype))
    g_ref, h_ref = gradient_and_hvp(ref, x_clean, v)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for name, got, want in (("fused gradient", fused, g_ref), ("double-backward gradient", g, g_ref),
                            ("Hessian-vector product", h, h_ref)):
        assert bool(torch.isfinite(got).all()), f"{name}: {got}"
        assert bool((got[ignored] == 0).all()), name
        torch.testing.assert_close(got.double(), want, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("norm", [1, 2])
def test_nonfinite_ignored_pixels_chainer(value, norm):
    # Chainer's slots are labels 1..K: label 0 and labels above K belong to no cluster. Their values must not
    # matter on any path: the same gradients and Hessian products as with those pixels at 0 (those are checked
    # against the reference in test_double_backward.py), and exactly 0 there.
    lab = torch.tensor([[1, 1, 2, 0, 2, 9, 3, 3, 0]])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 9, dtype=torch.float64, generator=g)
    v = torch.randn(x.shape, dtype=torch.float64, generator=g)
    ignored = ((lab == 0) | (lab > 3))[:, None].expand_as(x)
    x_bad = x.masked_fill(ignored, value)
    x_clean = x.masked_fill(ignored, 0.0)

    def ours(x):
        return sum(chainer_loss(x, lab, 0.2, 1.0, 3, norm=norm, gamma=0.1))

    fused = gradient(ours, x_bad)
    g, h = gradient_and_hvp(ours, x_bad, v)
    g_clean, h_clean = gradient_and_hvp(ours, x_clean, v)
    assert bool(torch.isfinite(fused).all() and torch.isfinite(g).all() and torch.isfinite(h).all())
    for got, want in ((fused, g_clean), (g, g_clean), (h, h_clean)):
        assert bool((got[ignored] == 0).all())
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_nonfinite_unlabeled_pixel_with_the_push_is_not_hidden():
    # With the unlabeled push, an unlabeled pixel takes part: its NaN reaches the push term (DESIGN §1).
    lab = torch.tensor([[1, 1, 0, 2, 2]])
    x = torch.randn(1, 2, 5, dtype=torch.float64)
    x[0, :, 2] = math.nan
    terms = discloss.discriminative_loss(x, lab, max_instances=3, unlabeled_push=0.5)
    assert math.isnan(float(terms.push))
    assert math.isfinite(float(terms.var)) and math.isfinite(float(terms.dist))


# ---- item 5: the push gradient of a pixel almost on a mean ------------------------------------------------------

def push_case(scale, dtype, device):
    # issue 20's case: cluster {1, 3} x scale (mean 2 x scale), unlabeled pixels at 2.5 and 9 x scale
    x = (torch.tensor([1.0, 3.0, 2.5, 9.0], dtype=torch.float64) * scale).to(dtype).reshape(1, 1, 4).to(device)
    return x, torch.tensor([[1, 1, 0, 0]], device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e-40), (torch.float32, 1e-39), (torch.float32, 4e-38),
                                         (torch.float64, 1e-310), (torch.float64, 1e-300)])
@pytest.mark.parametrize("path", ["fused", "double-backward"])
def test_push_gradient_near_a_mean_by_hand(device, dtype, scale, path):
    # r = 0.5 and 7 x scale, q = 1.5 - r = 1.5 to rounding; push = (q1^2 + q2^2) / (C N_U) = (q1^2 + q2^2) / 2:
    # unlabeled pixels -q (they move away from the mean), the cluster's pixels +(q1 + q2) / 2 through the mean,
    # plus reg's gamma * sign(mu) / (C n) = 0.0005; var (r < delta_v) and dist (C = 1) add nothing.
    x, lab = push_case(scale, dtype, device)

    def f(x):
        return sum(discloss.discriminative_loss(x, lab, max_instances=2, unlabeled_push=1.0))

    g = gradient(f, x) if path == "fused" else gradient_and_hvp(f, x, torch.ones_like(x))[0]
    expected = torch.tensor([[[1.5005, 1.5005, -1.5, -1.5]]], dtype=torch.float64)
    assert bool(torch.isfinite(g).all()), g
    torch.testing.assert_close(g.double().cpu(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [1e-39, 3e-40])
@pytest.mark.parametrize("norm", [1, 2])
def test_push_near_means_against_the_loop(device, scale, norm):
    # E = 3, several clusters and unlabeled pixels within ~scale / 100 of a mean (float32, subnormal: -2q/r
    # overflows), against the float64 loop on the same float32 values.
    g = torch.Generator().manual_seed(11)
    lab = torch.tensor([[1, 1, 1, 2, 2, 0, 0, 0, 0, 3, 3, 0]])
    x = torch.randn(1, 3, 12, dtype=torch.float64, generator=g)
    for p, c in ((5, 1), (6, 2), (7, 3), (8, 1), (11, 2)):
        mean = x[0, :, (lab[0] == c)].mean(1)
        x[0, :, p] = mean + 0.01 * torch.randn(3, dtype=torch.float64, generator=g)
    x = (x * scale).float()
    kw = dict(norm=norm, unlabeled_push=0.8, gamma=0.01)
    grad = gradient(lambda x: sum(discloss.discriminative_loss(x, lab.to(device), max_instances=4, **kw)),
                    x.to(device))
    _, ref = loop_reference64(x.double(), lab, **kw)
    assert bool(torch.isfinite(grad).all()), grad
    torch.testing.assert_close(grad.double().cpu(), ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unlabeled_pixel_on_a_mean_takes_the_subgradient(device, dtype):
    # r = 0 exactly (equal embeddings): the push's gradient there is the subgradient 0, as the reference's.
    x = torch.tensor([[[0.25, 0.25, 0.25, 0.25]]], dtype=dtype, device=device)
    lab = torch.tensor([[1, 1, 0, 0]], device=device)
    grad = gradient(lambda x: sum(discloss.discriminative_loss(x, lab, max_instances=2, unlabeled_push=1.0,
                                                                gamma=0.0)), x)
    _, ref = loop_reference64(x.double().cpu(), lab.cpu(), unlabeled_push=1.0, gamma=0.0)
    torch.testing.assert_close(grad.double().cpu(), ref, rtol=0, atol=0)


@pytest.mark.parametrize("scale", [1.0, 1e-20, 1e-30])
def test_double_backward_near_a_mean_against_the_loop(scale):
    # The double-backward path at tiny distances (float32 sums of squares underflow below ~1e-19): the gradient
    # and the Hessian-vector product, which grows like 1 / distance, against the float64 loop on the same values.
    # (Much closer, ~1e-39, the push's second derivatives themselves pass float32's largest value.)
    g = torch.Generator().manual_seed(12)
    lab = torch.tensor([[1, 1, 1, 2, 2, 0, 0, 0]])
    x = torch.randn(1, 3, 8, dtype=torch.float64, generator=g)
    v = torch.randn(1, 3, 8, dtype=torch.float64, generator=g)
    x[0, :, 5] = x[0, :, :3].mean(1) + 0.1 * torch.randn(3, dtype=torch.float64, generator=g)
    x = (x * scale).float()
    kw = dict(unlabeled_push=0.8, gamma=0.01, delta_v=0.0)

    def ours(x):
        return sum(discloss.discriminative_loss(x, lab, max_instances=3, **kw))

    def ref(x):
        return sum(loop_terms(x, lab, twice_differentiable=True, **kw))

    grad, h = gradient_and_hvp(ours, x, v.float())
    grad_ref, h_ref = gradient_and_hvp(ref, x.double(), v)
    assert bool(torch.isfinite(grad).all() and torch.isfinite(h).all())
    torch.testing.assert_close(grad.double(), grad_ref, rtol=1e-3, atol=1e-4 * float(grad_ref.abs().max()))
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-3, atol=1e-4 * float(h_ref.abs().max()))
