"""Arbitrary ids, the unlabeled push, the unhinged pull and non-finite inputs
(DESIGN §1 Variants), against float64 per-instance loops (tests/helpers.py
loop_terms) and hand-computed values. CUDA cases skip without a GPU."""

import math

import pytest
import torch

import discloss
from discloss.chainer import discriminative_margin_based_clustering_loss as chainer_loss
from helpers import DEVICES, LABEL_DTYPES, assert_close, assert_grad_close, blob_labels, loop_reference64


def run(x, labels, **kw):
    """Fused terms (push last, 0 when off) and d(sum of terms)/dx."""
    x = x.detach().clone().requires_grad_(True)
    terms = list(discloss.discriminative_loss(x, labels, **kw))
    grad = torch.autograd.grad(sum(t.sum() for t in terms), x)[0]
    if len(terms) == 3:
        terms.append(torch.zeros_like(terms[0]))
    return [t.detach() for t in terms], grad


def check(x, labels, dtype=torch.float64, **kw):
    """Compare run() with the float64 loop on (x, labels)."""
    loop_kw = {k: v for k, v in kw.items() if k not in ("max_instances", "validate")}
    terms, grad = run(x.to(dtype), labels, **kw)
    ref, ref_grad = loop_reference64(x.to(dtype), labels.cpu(), **loop_kw)
    for name, t, r in zip(("var", "dist", "reg", "push"), terms, ref):
        assert t.dtype == dtype, name
        assert_close(t, r, dtype, name)
    assert grad.dtype == dtype
    assert_grad_close(grad, ref_grad, dtype)


def sparse_ids(labels, mapping):
    """Relabel 1..n by mapping[i - 1] (0 stays 0)."""
    table = torch.tensor([0] + list(mapping), dtype=torch.int64)
    return table[labels.long()]


# ---- hand-computed values ------------------------------------------------------

def test_unlabeled_push_hand_computed():
    # 1D, E = 1: cluster 1 = {0, 2} (mean 1), unlabeled pixels at 1.5 and 4.
    # delta_d = 1: q = [1 - |x - 1|]+ = 0.5 and 0; push = 1/C * 1/N_U * 0.25
    # = 0.125 (C = 1, N_U = 2). d push / d x_u = 2 q * (-sign(x_u - mu)) / N_U
    # = -0.5 at 1.5 (pushed away from 1), and through mu (each cluster pixel
    # holds 1/2 of mu): +0.5 / 2 = 0.25 on each of 0 and 2.
    x = torch.tensor([[[0.0, 2.0, 1.5, 4.0]]], dtype=torch.float64, requires_grad=True)
    lab = torch.tensor([[1, 1, 0, 0]])
    t = discloss.discriminative_loss(x, lab, 10.0, 1.0, gamma=0.0, unlabeled_push=1.0)
    assert isinstance(t, discloss.DiscriminativeLossTermsWithPush)
    assert float(t.push) == pytest.approx(0.125, rel=1e-14)
    assert float(t.var) == 0.0 and float(t.dist) == 0.0
    (g,) = torch.autograd.grad(t.push, x)
    assert g.flatten().tolist() == pytest.approx([0.25, 0.25, -0.5, 0.0], rel=1e-14)
    assert float(sum(t)) == pytest.approx(0.125)
    w = discloss.discriminative_loss(x, lab, 10.0, 1.0, gamma=0.0, unlabeled_push=3.0)
    assert float(w.push) == pytest.approx(0.375)


def test_unhinged_pull_hand_computed():
    # Cluster {0, 2}: ||x - mu||^2 = 1 for both, var = 1 whatever delta_v.
    x = torch.tensor([[[0.0, 2.0]]], dtype=torch.float64)
    lab = torch.tensor([[1, 1]])
    t = discloss.discriminative_loss(x, lab, 5.0, 1.0, gamma=0.0, hinge_pull=False)
    assert float(t.var) == pytest.approx(1.0, rel=1e-14)
    t = discloss.discriminative_loss(x, lab, 5.0, 1.0, gamma=0.0)
    assert float(t.var) == 0.0


def test_terms_without_push_keep_three_fields():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    lab = blob_labels(2, (8, 8), 3)
    t = discloss.discriminative_loss(x, lab)
    assert type(t) is discloss.DiscriminativeLossTerms and len(t) == 3
    var, dist, reg = t  # unpacking as before
    assert float(var + dist + reg) == pytest.approx(float(discloss.DiscriminativeLoss()(x, lab)))


# ---- arbitrary ids ----------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
def test_sparse_ids_every_label_dtype(device, label_dtype):
    # ids that do not fit in [0, K): negative, large, and (int64) >= 2^32.
    big = {
        torch.uint8: [200, 7, 255, 64, 3],
        torch.int8: [-100, 127, -1, 50, 9],
        torch.int16: [-30000, 32767, 1000, -5, 12345],
        torch.int32: [-(2 ** 31), 2 ** 31 - 1, 77777, -3, 65001],
        torch.int64: [2 ** 40, -(2 ** 62), 2 ** 63 - 1, 2 ** 32 + 5, 65001],
    }[label_dtype]
    g = torch.Generator().manual_seed(3)
    lab = sparse_ids(blob_labels(2, (12, 14), 5, seed=4), big).to(label_dtype).to(device)
    x = torch.randn(2, 4, 12, 14, generator=g, dtype=torch.float64).to(device)
    check(x, lab, max_instances=5, norm=2)
    check(x, lab, max_instances=7, norm=1, reduction="none")
    check(x, lab, norm=2)  # max_instances inferred: the most distinct ids in one image


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_ids_equal_dense_ids(device):
    # A monotone relabelling keeps the slot order: bitwise the same terms and gradient.
    g = torch.Generator().manual_seed(5)
    dense = blob_labels(3, (20, 18), 6, seed=6)
    sparse = sparse_ids(dense, [10 ** 6, 10 ** 7, 3 * 10 ** 9, 2 ** 41, 2 ** 50, 2 ** 62])
    x = torch.randn(3, 5, 20, 18, generator=g, dtype=torch.float32)
    a = run(x.to(device), dense.to(device), max_instances=7)
    b = run(x.to(device), sparse.to(device), max_instances=6)
    for u, v in zip(a[0], b[0]):
        assert torch.equal(u, v)
    assert torch.equal(a[1], b[1])


@pytest.mark.parametrize("device", DEVICES)
def test_ids_colliding_modulo_k(device):
    # ids k and k + K (and k + 2^32) are different clusters.
    K = 4
    lab = torch.tensor([[1, 1, 5, 5, 9, 9, 2 ** 32 + 1, 2 ** 32 + 1, 0, 0]], device=device)
    x = torch.tensor([[[0.0, 0.2, 3.0, 3.1, -2.0, -2.4, 7.0, 7.5, 1.0, 1.0]]], dtype=torch.float64, device=device)
    check(x, lab, max_instances=K)
    terms, _ = run(x, lab, max_instances=K, gamma=1.0)
    # 4 clusters with means 0.1, 3.05, -2.2, 7.25: reg = mean |mu|.
    assert float(terms[2]) == pytest.approx((0.1 + 3.05 + 2.2 + 7.25) / 4, rel=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_negative_ids_and_ignore_index(device):
    lab = torch.tensor([[-1, -1, -7, -7, 3, 3, -1]], device=device)
    x = torch.tensor([[[0.0, 5.0, 1.0, 1.2, 4.0, 4.4, 9.0]]], dtype=torch.float64, device=device)
    check(x, lab, ignore_index=-1, max_instances=2)
    check(x, lab, ignore_index=None, max_instances=3)
    check(x, lab, ignore_index=-1, max_instances=2, unlabeled_push=0.5)


def test_more_distinct_ids_than_max_instances_names_it():
    lab = torch.tensor([[1, 2, 3, 70000]])
    x = torch.randn(1, 2, 4)
    with pytest.raises(RuntimeError, match="max_instances=3"):
        discloss.discriminative_loss(x, lab, max_instances=3)
    with pytest.raises(RuntimeError, match="max_instances=3"):
        torch.ops.discloss.slot_map(lab, 3, 0)
    discloss.discriminative_loss(x, lab, max_instances=4)  # exactly K ids: fine
    # dense ids >= K without a slot map are refused by the op itself
    with pytest.raises(RuntimeError, match="max_instances"):
        torch.ops.discloss.forward(x, lab, None, None, 3, 0.5, 1.5, 2, 1.0, 1.0, 0.001, 0.0, 0, "paper", "mean")


def test_time_independent_of_id_values():
    # The slot map makes K the number of clusters: ids 65001..65008 with K = 8
    # give the same result as ids 1..8, and the per-slot tensors are (B, 8, E).
    lab = blob_labels(2, (16, 16), 8, seed=1)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    shifted = torch.where(lab > 0, lab + 65000, lab)
    a = run(x, lab, max_instances=8)
    b = run(x, shifted, max_instances=8)
    for u, v in zip(a[0], b[0]):
        assert torch.equal(u, v)
    slot_ids, num_ids = torch.ops.discloss.slot_map(shifted, 8, 0)
    assert slot_ids.shape == (2, 8)
    for b_ in range(2):
        present = torch.unique(shifted[b_][shifted[b_] != 0])
        assert int(num_ids[b_]) == len(present)
        assert slot_ids[b_, : len(present)].tolist() == present.tolist()
    assert torch.ops.discloss.slot_map(lab, 9, 0)[1].tolist() == [-1, -1]  # identity for dense ids


# ---- unlabeled push and unhinged pull against the loop ----------------------------------

VARIANTS = [
    dict(unlabeled_push=1.0),
    dict(unlabeled_push=0.3, hinge_pull=False),
    dict(hinge_pull=False),
    dict(unlabeled_push=2.0, norm=1),
    dict(unlabeled_push=1.0, reduction="none", alpha=0.5, beta=2.0, gamma=0.1),
    dict(unlabeled_push=1.0, reduction="sum", delta_d=0.7),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kw", VARIANTS)
@pytest.mark.parametrize("spatial", [(40,), (11, 13), (4, 5, 6)])
def test_variants_against_loop(device, kw, spatial):
    g = torch.Generator().manual_seed(len(spatial))
    lab = blob_labels(3, spatial, 4, seed=2).to(device)
    x = torch.randn(3, 3, *spatial, generator=g, dtype=torch.float64).to(device)
    check(x, lab, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_variants_every_dtype(device, dtype):
    g = torch.Generator().manual_seed(9)
    lab = blob_labels(2, (14, 12), 5, seed=3).to(device)
    x = (torch.randn(2, 4, 14, 12, generator=g) * 0.8).to(dtype).to(device)
    check(x, lab, dtype=dtype, unlabeled_push=1.0, delta_d=1.0)
    check(x, lab, dtype=dtype, hinge_pull=False)


@pytest.mark.parametrize("device", DEVICES)
def test_push_degenerate_images(device):
    # image 0: no unlabeled pixel; image 1: no cluster; image 2: one cluster.
    lab = torch.tensor([[1, 1, 2, 2, 3, 3], [0, 0, 0, 0, 0, 0], [0, 0, 5, 5, 5, 0]], device=device)
    x = torch.randn(3, 2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(device)
    terms, grad = run(x, lab, unlabeled_push=1.0, delta_d=3.0, reduction="none")
    assert float(terms[3][0]) == 0.0 and float(terms[3][1]) == 0.0 and float(terms[3][2]) > 0.0
    assert torch.isfinite(grad).all()
    check(x, lab, unlabeled_push=1.0, delta_d=3.0)
    check(x, lab, unlabeled_push=1.0, delta_d=3.0, reduction="none")


def test_push_errors():
    x = torch.randn(1, 2, 4)
    lab = torch.tensor([[1, 1, 0, 0]])
    with pytest.raises(ValueError, match="unlabeled_push"):
        discloss.discriminative_loss(x, lab, unlabeled_push=1.0, ignore_index=None)
    with pytest.raises(ValueError, match="unlabeled_push"):
        discloss.discriminative_loss(x, lab, unlabeled_push=-1.0)
    with pytest.raises(ValueError, match="unlabeled_push"):
        discloss.DiscriminativeLoss(unlabeled_push=float("nan"))
    with pytest.raises(RuntimeError, match="unlabeled_push"):
        torch.ops.discloss.forward(x, lab, None, None, 2, 0.5, 1.5, 2, 1.0, 1.0, 0.001, 1.0, None, "chainer", "mean")


def test_gradcheck_variants():
    g = torch.Generator().manual_seed(2)
    lab = torch.tensor([[1, 1, 1, 0, 7, 7, 0, 2 ** 40, 2 ** 40]])
    x = torch.randn(1, 2, 9, generator=g, dtype=torch.float64, requires_grad=True)

    def f(x):
        return tuple(discloss.discriminative_loss(x, lab, 0.3, 1.2, max_instances=3, gamma=0.1,
                                                  unlabeled_push=0.7, hinge_pull=False))

    assert torch.autograd.gradcheck(f, (x,))


def test_opcheck_slot_map_and_push():
    from torch.library import opcheck

    lab = torch.tensor([[3, 3, 0, 2 ** 40, 2 ** 40, 0]])
    x = torch.randn(1, 2, 6, dtype=torch.float64, requires_grad=True)
    opcheck(torch.ops.discloss.slot_map.default, (lab, 3, 0))
    ids, n = torch.ops.discloss.slot_map(lab, 3, 0)
    opcheck(torch.ops.discloss.forward.default,
            (x, lab, ids, n, 3, 0.5, 1.5, 2, 1.0, 1.0, 0.001, 0.5, 0, "paper", "none"))


def test_compile_parity_variants():
    lab = sparse_ids(blob_labels(2, (10, 10), 3, seed=7), [5, 2 ** 35, 9])
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)

    def f(x):
        return sum(discloss.discriminative_loss(x, lab, max_instances=3, unlabeled_push=0.5, hinge_pull=False))

    eager = f(x)
    compiled = torch.compile(f, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=0)


# ---- non-finite inputs are never hidden --------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", [1, 2])
def test_nan_in_a_cluster_reaches_every_term(device, norm):
    lab = torch.tensor([[1, 1, 1, 2, 2, 0, 0]], device=device)
    x = torch.randn(1, 3, 7, dtype=torch.float32, generator=torch.Generator().manual_seed(0)).to(device)
    x[0, 1, 1] = float("nan")
    x.requires_grad_(True)
    t = discloss.discriminative_loss(x, lab, 0.1, 5.0, norm=norm, unlabeled_push=1.0)
    for name, v in zip(t._fields, t):
        assert torch.isnan(v), name  # var, dist, reg and the push all see cluster 1's NaN mean
    (g,) = torch.autograd.grad(sum(t), x)
    assert torch.isnan(g[0, :, :3]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_inf_and_unlabeled_nan(device):
    lab = torch.tensor([[1, 1, 2, 2, 0]], device=device)
    x = torch.zeros(1, 2, 5, dtype=torch.float64, device=device)
    x[0, 0, 2] = float("inf")
    t = discloss.discriminative_loss(x, lab, 0.5, 1.5)
    # as plain PyTorch: mean (inf, 0), var NaN (inf - inf), reg inf, and
    # dist 0 (the hinge of an infinite distance)
    ref = loop_reference64(x.cpu(), lab.cpu())[0]
    assert torch.isnan(t.var) and t.reg == float("inf") and float(t.dist) == 0.0
    torch.testing.assert_close(torch.stack(list(t)).cpu(), torch.stack(ref[:3]), equal_nan=True)
    # a NaN among the unlabeled pixels reaches the push only
    x = torch.zeros(1, 2, 5, dtype=torch.float64, device=device)
    x[0, 0, 4] = float("nan")
    t = discloss.discriminative_loss(x, lab, 0.5, 1.5, unlabeled_push=1.0)
    assert torch.isfinite(t.var) and torch.isfinite(t.dist) and torch.isfinite(t.reg) and torch.isnan(t.push)
    t = discloss.discriminative_loss(x, lab, 0.5, 1.5)
    assert all(torch.isfinite(v) for v in t)  # not taking part: not touched


def test_chainer_empty_batch_is_zero():
    x = torch.zeros(0, 3, 4, 4)
    lab = torch.zeros(0, 4, 4, dtype=torch.int64)
    var, dist, reg = chainer_loss(x, lab, 0.5, 1.5, 3)
    assert float(var) == 0.0 and float(dist) == 0.0 and float(reg) == 0.0


def test_max_instances_too_large_for_memory_names_it():
    x = torch.randn(2, 16, 4, 4)
    lab = torch.ones(2, 4, 4, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="max_instances"):
        discloss.discriminative_loss(x, lab, max_instances=2 ** 40)
