"""Exact ties and the range of the L2 norm (CPU; CUDA cases skip without a GPU),
against float64 per-instance loops and hand-computed values."""

import math

import pytest
import torch

import discloss
from helpers import DEVICES, loop_reference64


def run(x, labels, **kw):
    x = x.detach().clone().requires_grad_(True)
    terms = discloss.discriminative_loss(x, labels, **kw)
    (g,) = torch.autograd.grad(sum(terms), x)
    return [t.detach() for t in terms], g


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("value", [0.75, 0.1, -3.3, 1e-3])
def test_equal_embeddings_give_equal_means(device, dtype, value):
    # The case: all embeddings equal, clusters of 49 and 1 pixels. The
    # means are equal, so var = 0 and the dist gradient is the documented
    # subgradient 0: only reg's gradient remains, the same on every pixel of
    # a cluster, gamma * mu / ||mu|| / (C n_c).
    x = torch.full((1, 3, 50), value, dtype=dtype, device=device)
    lab = torch.tensor([[1] * 49 + [2]], device=device)
    (var, dist, reg), g = run(x, lab, max_instances=3)
    assert float(var) == 0.0
    assert float(dist) == pytest.approx(9.0)  # (2 delta_d - 0)^2
    v = float(x[0, 0, 0])  # the value as stored in dtype
    unit = math.copysign(1.0, v) / math.sqrt(3.0)
    expected = torch.full((1, 3, 50), float(unit) * 0.001 / 2 / 49, dtype=torch.float64)
    expected[0, :, 49] = float(unit) * 0.001 / 2
    torch.testing.assert_close(g.double().cpu(), expected, rtol=1e-2 if dtype != torch.float64 else 1e-12, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_equal_means_across_chunks(device):
    # 300 000 equal pixels in one cluster span several chunks (CUDA: the
    # per-chunk partial path), and a 1-pixel cluster with the same value:
    # still exactly equal means.
    n = 300_000
    x = torch.full((1, 2, n + 1), 0.3, dtype=torch.float32, device=device)
    lab = torch.ones(1, n + 1, dtype=torch.int64, device=device)
    lab[0, -1] = 2
    (var, dist, reg), g = run(x, lab, max_instances=3)
    assert float(var) == 0.0
    # the single pixel's gradient: reg only (no push direction from rounding)
    torch.testing.assert_close(g[0, :, -1].double().cpu(), torch.full((2,), 0.001 / 2 / 2 ** 0.5, dtype=torch.float64),
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [1e-23, 1e-30, 1e-38, 1e19, 1e30])
def test_float32_norms_keep_their_range(device, scale):
    # Norms of tiny and huge float32 vectors: the reg term and every gradient
    # against the float64 loop (whose squares do not under- or overflow).
    g = torch.Generator().manual_seed(1)
    lab = torch.tensor([[1, 1, 1, 2, 2, 0, 3, 3]], device=device)
    base = torch.randn(1, 3, 8, generator=g, dtype=torch.float64)
    x = (base * scale).float().to(device)
    kw = dict(delta_v=0.0, delta_d=0.0, gamma=1.0, max_instances=4)
    (var, dist, reg), grad = run(x, lab, **kw)
    ref, ref_grad = loop_reference64(x.double().cpu(), lab.cpu(), **{k: v for k, v in kw.items() if k != "max_instances"})
    assert float(reg) > 0 and torch.isfinite(reg)
    torch.testing.assert_close(reg.double().cpu(), ref[2], rtol=1e-5, atol=0)
    if scale < 1:  # var ~ scale^2 is itself out of float32's range for the huge ones
        torch.testing.assert_close(var.double().cpu(), ref[0], rtol=1e-4, atol=1e-44)
    torch.testing.assert_close(grad.double().cpu(), ref_grad, rtol=1e-4, atol=1e-6 * float(ref_grad.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
def test_norm_range_in_the_push_and_pairs(device):
    # tiny distances between means (dist) and between unlabeled pixels and means (push)
    lab = torch.tensor([[1, 1, 2, 2, 0, 0]])
    x = torch.tensor([[[1e-21, 3e-21, -2e-21, -4e-21, 5e-22, 7e-21]]], dtype=torch.float32)
    kw = dict(delta_v=0.0, delta_d=1e-20, gamma=0.0, unlabeled_push=1.0)
    terms, grad = run(x.to(device), lab.to(device), max_instances=3, **kw)
    ref, ref_grad = loop_reference64(x.double(), lab, **kw)
    # the terms (~1e-42) are float32 subnormals: a few units of 2^-149 apart at most
    for t, r in zip(terms, ref):
        assert float(r) > 0 or float(t) == 0
        torch.testing.assert_close(t.double().cpu(), r, rtol=1e-4, atol=4 * 2.0 ** -149)
    torch.testing.assert_close(grad.double().cpu(), ref_grad, rtol=1e-4, atol=1e-4 * float(ref_grad.abs().max()))
