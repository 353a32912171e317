"""Images the common ports return NaN on: no instance, one instance,
everything ignored, 1-pixel instances, identical means, zero distances."""

import pytest
import torch

import discloss
from helpers import DEVICES, assert_close, assert_grad_close, reference64


def terms_and_grad(x, labels, **kw):
    x = x.detach().clone().requires_grad_(True)
    terms = discloss.discriminative_loss(x, labels, **kw)
    grad = torch.autograd.grad(sum(t.sum() for t in terms), x)[0]
    return [t.detach() for t in terms], grad


def check_finite_and_reference(x, labels, **kw):
    terms, grad = terms_and_grad(x, labels, **kw)
    for t in terms:
        assert torch.isfinite(t).all()
    assert torch.isfinite(grad).all()
    ref_terms, ref_grad = reference64(x, labels, **kw)
    for a, b in zip(terms, ref_terms):
        assert_close(a, b, torch.float64)
    assert_grad_close(grad, ref_grad, torch.float64)
    return terms, grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", [1, 2])
def test_no_instance(device, norm):
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, device=device)
    labels = torch.zeros(2, 8, 8, dtype=torch.long, device=device)
    terms, grad = check_finite_and_reference(x, labels, norm=norm, max_instances=4)
    assert all(float(t) == 0 for t in terms)
    assert bool((grad == 0).all())
    # Still part of the graph: backward runs and gives zeros.
    xg = x.clone().requires_grad_(True)
    sum(discloss.discriminative_loss(xg, labels, max_instances=4)).backward()
    assert xg.grad is not None and bool((xg.grad == 0).all())


@pytest.mark.parametrize("device", DEVICES)
def test_everything_ignored_with_other_index(device):
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, device=device)
    labels = torch.full((1, 5, 5), 3, device=device)
    terms, grad = check_finite_and_reference(x, labels, ignore_index=3, max_instances=4)
    assert all(float(t) == 0 for t in terms)


@pytest.mark.parametrize("device", DEVICES)
def test_one_instance_has_no_dist(device):
    x = torch.randn(3, 4, 6, 7, dtype=torch.float64, device=device)
    labels = torch.ones(3, 6, 7, dtype=torch.long, device=device)
    terms, _ = check_finite_and_reference(x, labels, reduction="none")
    assert bool((terms[1] == 0).all())
    assert bool((terms[0] > 0).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", [1, 2])
def test_one_pixel_instances(device, norm):
    # every pixel its own instance: var = 0 (x == mu), zero-distance pulls.
    x = torch.randn(1, 3, 4, 5, dtype=torch.float64, device=device)
    labels = torch.arange(1, 21, device=device).reshape(1, 4, 5)
    terms, _ = check_finite_and_reference(x, labels, norm=norm)
    assert float(terms[0]) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", [1, 2])
def test_identical_means_and_zero_embeddings(device, norm):
    # Two instances at the same place: ||mu_a - mu_b|| = 0, the norm's
    # gradient at 0 must be 0, not NaN. All-zero embeddings: ||mu|| = 0 too.
    x = torch.zeros(1, 2, 4, 4, dtype=torch.float64, device=device)
    labels = torch.tensor([[1, 1, 2, 2]] * 4, device=device).reshape(1, 4, 4)
    terms, grad = check_finite_and_reference(x, labels, norm=norm)
    assert float(terms[1]) == pytest.approx((2 * 1.5) ** 2)
    x2 = x.clone()
    x2[0, 0] = 1.0  # same non-zero embedding everywhere: equal means
    check_finite_and_reference(x2, labels, norm=norm)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_batch_with_empty_images(device):
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64, device=device)
    labels = torch.zeros(4, 6, 6, dtype=torch.long, device=device)
    labels[1, :3] = 1
    labels[1, 3:] = 2
    labels[3, 2:4, 2:4] = 5
    terms, _ = check_finite_and_reference(x, labels, max_instances=6, reduction="none")
    for t in terms:
        assert float(t[0]) == 0 and float(t[2]) == 0
    # mean over all B images, empty ones included
    mean_terms = discloss.discriminative_loss(x, labels, max_instances=6)
    for m, t in zip(mean_terms, terms):
        assert float(m) == pytest.approx(float(t.sum()) / 4)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_and_empty_spatial(device):
    for shape in [(0, 3, 4, 4), (2, 3, 0, 4)]:
        x = torch.randn(*shape, dtype=torch.float64, device=device, requires_grad=True)
        labels = torch.zeros(shape[0], *shape[2:], dtype=torch.long, device=device)
        terms = discloss.discriminative_loss(x, labels, max_instances=3)
        assert all(float(t.detach()) == 0 for t in terms)
        sum(terms).backward()
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
def test_large_coordinates_stay_finite(device):
    # Far from the origin (float32 keeps ~8 units of precision at 1e8): every
    # term is representable, so every term and gradient must be finite.
    x = (1e8 + torch.randn(2, 2, 6, 6, device=device)).float()
    labels = torch.ones(2, 6, 6, dtype=torch.long, device=device)
    labels[:, 3:] = 2
    terms, grad = terms_and_grad(x, labels)
    assert all(torch.isfinite(t).all() for t in terms)
    assert torch.isfinite(grad).all()
