"""Invariances of the loss, checked on generated cases (hypothesis):
relabelling instance ids and permuting pixels leave it unchanged;
translating every embedding leaves var and dist unchanged."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import discloss

settings.register_profile("discloss", max_examples=40, deadline=None)
settings.load_profile("discloss")


@st.composite
def cases(draw):
    batch = draw(st.integers(1, 3))
    embed = draw(st.integers(1, 5))
    spatial = draw(st.lists(st.integers(1, 9), min_size=1, max_size=3))
    instances = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    norm = draw(st.sampled_from([1, 2]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, embed, *spatial, dtype=torch.float64, generator=g) * 2
    labels = torch.randint(0, instances + 1, (batch, *spatial), generator=g)
    return x, labels, instances, norm, g


def loss_terms(x, labels, K, norm, **kw):
    return torch.stack(list(discloss.discriminative_loss(x, labels, norm=norm, max_instances=K, reduction="none",
                                                         **kw)))


@given(cases())
def test_relabelling_ids_leaves_loss_unchanged(case):
    x, labels, K, norm, g = case
    # A random injective map of ids 1..K to ids in 1..3K; background stays 0.
    new_ids = torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(3 * K, generator=g)[:K] + 1])
    relabelled = new_ids[labels]
    a = loss_terms(x, labels, K + 1, norm)
    b = loss_terms(x, relabelled, 3 * K + 1, norm)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@given(cases())
def test_permuting_pixels_leaves_loss_unchanged(case):
    x, labels, K, norm, g = case
    B, E = x.shape[:2]
    perm = torch.randperm(labels[0].numel(), generator=g)
    xp = x.reshape(B, E, -1)[:, :, perm].reshape(x.shape)
    lp = labels.reshape(B, -1)[:, perm].reshape(labels.shape)
    torch.testing.assert_close(loss_terms(x, labels, K + 1, norm), loss_terms(xp, lp, K + 1, norm),
                               rtol=1e-10, atol=1e-12)


@given(cases(), st.floats(-50, 50), st.floats(-50, 50))
def test_translation_leaves_var_and_dist_unchanged(case, shift0, shift1):
    x, labels, K, norm, g = case
    E = x.shape[1]
    shift = torch.tensor([shift0, shift1] * E, dtype=torch.float64)[:E].reshape(1, E, *[1] * (x.dim() - 2))
    a = loss_terms(x, labels, K + 1, norm)
    b = loss_terms(x + shift, labels, K + 1, norm)
    torch.testing.assert_close(a[:2], b[:2], rtol=1e-8, atol=1e-9)


@given(cases())
def test_scaling_margins_with_embeddings(case):
    # Scaling the embeddings and both margins by s scales var and dist by s^2
    # (norms are homogeneous of degree 1) and reg by s.
    x, labels, K, norm, g = case
    s = 3.0
    a = loss_terms(x, labels, K + 1, norm)
    b = loss_terms(x * s, labels, K + 1, norm, delta_v=0.5 * s, delta_d=1.5 * s)
    torch.testing.assert_close(b, a * torch.tensor([[s * s], [s * s], [s]], dtype=torch.float64), rtol=1e-9,
                               atol=1e-10)
