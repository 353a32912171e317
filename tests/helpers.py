"""Shared test helpers: label maps, the float64 oracle and comparisons."""

import pytest
import torch

from cudasim_device import HAVE_GPU
from discloss.reference import discriminative_loss_reference


class SimulatedCuda(str):
    """The device "cpu" for torch, marking a test whose ops run csrc/cuda's
    kernels on the CUDA simulator (tests/conftest.py activates it)."""


CUDA_SIM = SimulatedCuda("cpu")
# Every device test runs on the CPU kernels and on the CUDA kernels: on a GPU
# when there is one, else on the simulator.
DEVICES = ["cpu", "cuda" if HAVE_GPU else pytest.param(CUDA_SIM, id="cudasim")]
LABEL_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]


def blob_labels(batch, spatial, num_instances, *, background=0, seed=0, dtype=torch.int64, first_label=1):
    """Spatially coherent instance maps: each pixel takes the label of its
    nearest random centre (Voronoi cells); about a quarter of the pixels,
    the ones farthest from every centre, are background."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for s in spatial:
        n *= s
    grids = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in spatial], indexing="ij"), -1)
    coords = grids.reshape(n, len(spatial))
    out = torch.empty(batch, n, dtype=torch.int64)
    for b in range(batch):
        centres = torch.rand(num_instances, len(spatial), generator=g, dtype=torch.float64)
        centres = centres * torch.tensor(spatial, dtype=torch.float64)
        d = torch.cdist(coords, centres)
        nearest = d.min(1)
        lab = nearest.indices + first_label
        far = nearest.values > torch.quantile(nearest.values, 0.75)
        lab[far] = background
        out[b] = lab
    return out.reshape(batch, *spatial).to(dtype)


def reference64(embeddings, labels, **kwargs):
    """The float64 pure-PyTorch oracle: terms and d(sum of terms)/d(embeddings)."""
    x = embeddings.detach().to(torch.float64).requires_grad_(True)
    terms = discriminative_loss_reference(x, labels, **kwargs)
    grad = torch.autograd.grad(sum(t.sum() for t in terms), x)[0]
    return [t.detach() for t in terms], grad


def tolerances(dtype):
    return {
        torch.float64: dict(rtol=1e-9, atol=1e-11),
        torch.float32: dict(rtol=2e-4, atol=2e-6),
        torch.float16: dict(rtol=2e-2, atol=2e-3),
        torch.bfloat16: dict(rtol=3e-2, atol=1e-2),
    }[dtype]


def assert_close(actual, expected, dtype, what=""):
    tol = tolerances(dtype)
    torch.testing.assert_close(actual.to(torch.float64).cpu(), expected.to(torch.float64).cpu(), **tol, msg=lambda m: f"{what}: {m}")


def assert_grad_close(actual, expected, dtype, what="grad"):
    """Elementwise, with the absolute tolerance scaled to the gradient's size:
    most entries are sums of a few large and many small contributions."""
    tol = tolerances(dtype)
    scale = (float(expected.abs().max()) if expected.numel() else 0.0) or 1.0
    torch.testing.assert_close(
        actual.to(torch.float64).cpu(), expected.to(torch.float64).cpu(), rtol=tol["rtol"],
        atol=max(tol["atol"], tol["rtol"] * scale), msg=lambda m: f"{what}: {m}",
    )


def loop_terms(x, labels, delta_v=0.5, delta_d=1.5, *, norm=2, alpha=1.0, beta=1.0, gamma=0.001, ignore_index=0,
               unlabeled_push=0.0, hinge_pull=True, reduction="mean", twice_differentiable=False):
    """DESIGN §1 written as a per-image, per-instance loop in the dtype of x:
    the (var, dist, reg, push) terms, weighted and reduced. Clusters are the
    distinct label values (any ids) other than ignore_index.

    twice_differentiable: the norm of an exactly zero vector (a one-pixel
    cluster minus its mean) gets first and second derivatives 0 (autograd's
    second derivative of vector_norm there is NaN), for Hessian products."""
    B, E = x.shape[:2]
    zero = torch.zeros((), dtype=x.dtype, device=x.device)  # not x.sum() * 0: NaN for an inf in x

    def nrm(v, dim=-1):
        if not twice_differentiable:
            return torch.linalg.vector_norm(v, ord=norm, dim=dim)
        is_zero = (v == 0).all(dim=dim)
        stand_in = torch.where(is_zero.unsqueeze(dim), torch.ones_like(v), v)
        return torch.where(is_zero, 0.0, torch.linalg.vector_norm(stand_in, ord=norm, dim=dim))

    per_image = []
    for b in range(B):
        xb = x[b].reshape(E, -1).T  # (N, E)
        lab = labels[b].reshape(-1).long()
        ids = torch.unique(lab)
        if ignore_index is not None:
            ids = ids[ids != ignore_index]
        C = len(ids)
        var = dist = reg = push = zero
        if C > 0:
            mus = []
            for i in ids:
                xi = xb[lab == i]
                mu = xi.mean(0)
                mus.append(mu)
                r = nrm(xi - mu)
                h = torch.relu(r - delta_v) if hinge_pull else r
                var = var + (h ** 2).mean() / C
                reg = reg + nrm(mu) / C
            for a in range(C):
                for c in range(C):
                    if a != c:
                        dist = dist + torch.relu(2 * delta_d - nrm(mus[a] - mus[c])) ** 2 / (C * (C - 1))
            if unlabeled_push > 0:
                xu = xb[lab == ignore_index]
                if len(xu) > 0:
                    for mu in mus:
                        push = push + (torch.relu(delta_d - nrm(xu - mu)) ** 2).mean() / C
        per_image.append(torch.stack([alpha * var, beta * dist, gamma * reg, unlabeled_push * push]))
    t = torch.stack(per_image) if per_image else torch.zeros(0, 4, dtype=x.dtype)
    if reduction == "mean":
        t = t.mean(0) if B > 0 else torch.zeros(4, dtype=x.dtype)
    elif reduction == "sum":
        t = t.sum(0)
    else:
        t = t.T
    return list(t)


def loop_reference64(embeddings, labels, **kwargs):
    """loop_terms in float64: the four terms and d(sum of terms)/d(embeddings)."""
    x = embeddings.detach().to(torch.float64).requires_grad_(True)
    terms = loop_terms(x, labels, **kwargs)
    total = sum(t.sum() for t in terms)
    grad = torch.autograd.grad(total, x, allow_unused=True)[0] if total.requires_grad else None
    if grad is None:
        grad = torch.zeros_like(x)
    return [t.detach() for t in terms], grad
