"""Second-order gradients (Hessian-vector products, gradient penalties)
through the loss, against float64 per-instance loops differentiated twice by
autograd, and torch.autograd.gradgradcheck."""

import pytest
import torch

import discloss
from discloss.chainer import discriminative_margin_based_clustering_loss as chainer_loss
from helpers import blob_labels, loop_terms


def hvp(f, x, v):
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(x), x, create_graph=True)
    (h,) = torch.autograd.grad((g * v).sum(), x)
    return g.detach(), h


def test_issue_example():
    # The case of the issue: without double backward the discloss part of the
    # Hessian-vector product was silently dropped (hv == v).
    x = torch.randn(1, 2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lab = torch.tensor([[1, 1, 1, 2, 2, 2]])
    v = torch.randn_like(x)

    def ours(x):
        return sum(discloss.discriminative_loss(x, lab, 0.0, 3.0, max_instances=3)) + 0.5 * (x ** 2).sum()

    def ref(x):
        return sum(loop_terms(x, lab, 0.0, 3.0)) + 0.5 * (x ** 2).sum()

    g, h = hvp(ours, x, v)
    g_ref, h_ref = hvp(ref, x, v)
    torch.testing.assert_close(g, g_ref.detach(), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(h, v)


CASES = [
    dict(),
    dict(norm=1),
    dict(unlabeled_push=0.7, delta_d=2.0),
    dict(hinge_pull=False, reduction="sum"),
    dict(reduction="none", gamma=0.3),
    dict(ignore_index=None),
]


@pytest.mark.parametrize("kw", CASES)
def test_hvp_against_loop(kw):
    g = torch.Generator().manual_seed(4)
    lab = blob_labels(2, (6, 7), 3, seed=5)
    lab = torch.where(lab == 2, 2 ** 40, lab)  # arbitrary ids too
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64, generator=g) * 1.5
    v = torch.randn(x.shape, dtype=torch.float64, generator=g)
    w = torch.rand(2, dtype=torch.float64, generator=g) + 0.5 if kw.get("reduction") == "none" else 1.0

    def ours(x):
        return sum((w * t).sum() for t in discloss.discriminative_loss(x, lab, max_instances=4, **kw))

    def ref(x):
        return sum((w * t).sum() for t in loop_terms(x, lab, **kw))

    g1, h1 = hvp(ours, x, v)
    g2, h2 = hvp(ref, x, v)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h1, h2, rtol=1e-9, atol=1e-11)


def test_gradient_penalty_float32():
    # A gradient penalty ||dL/dx||^2 trained through: float32 against the float64 loop.
    lab = blob_labels(2, (8, 8), 4, seed=2)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    def penalty(f, x, dtype):
        x = x.to(dtype).requires_grad_(True)
        (g,) = torch.autograd.grad(f(x), x, create_graph=True)
        (d,) = torch.autograd.grad((g ** 2).sum(), x)
        return d

    d = penalty(lambda x: sum(discloss.discriminative_loss(x, lab, max_instances=5)), x, torch.float32)
    d_ref = penalty(lambda x: sum(loop_terms(x, lab)), x, torch.float64)
    torch.testing.assert_close(d.double(), d_ref, rtol=2e-4, atol=2e-6 * float(d_ref.abs().max()))


def test_gradgradcheck():
    lab = torch.tensor([[1, 1, 1, 0, 7, 7, 0, 9, 9]])
    x = torch.randn(1, 2, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(6), requires_grad=True)

    def f(x):
        return tuple(discloss.discriminative_loss(x, lab, 0.2, 1.0, max_instances=3, gamma=0.1, unlabeled_push=0.5))

    assert torch.autograd.gradgradcheck(f, (x,))


def test_gradgradcheck_chainer():
    lab = torch.tensor([[1, 1, 2, 2, 0, 3]])
    x = torch.randn(1, 2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7), requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: chainer_loss(x, lab, 0.2, 1.0, 3, gamma=0.1), (x,))


def test_first_order_path_unchanged():
    # Without create_graph the fused backward runs: same gradient as before, to rounding.
    lab = blob_labels(2, (9, 9), 3, seed=8)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, requires_grad=True)
    (g1,) = torch.autograd.grad(sum(discloss.discriminative_loss(x, lab, max_instances=4)), x)
    (g2,) = torch.autograd.grad(sum(discloss.discriminative_loss(x, lab, max_instances=4)), x, create_graph=True)
    torch.testing.assert_close(g1, g2.detach(), rtol=1e-12, atol=1e-14)
