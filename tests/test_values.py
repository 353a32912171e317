"""Values and gradients of the fused op against the float64 pure-PyTorch
reference and against hand-computed values."""

import itertools

import pytest
import torch

import discloss
from discloss.chainer import discriminative_margin_based_clustering_loss as chainer_loss
from helpers import DEVICES, LABEL_DTYPES, assert_close, assert_grad_close, blob_labels, reference64


def run(x, labels, **kw):
    """Fused terms and d(sum of terms)/dx."""
    x = x.detach().clone().requires_grad_(True)
    terms = discloss.discriminative_loss(x, labels, **kw)
    grad = torch.autograd.grad(sum(t.sum() for t in terms), x)[0]
    return [t.detach() for t in terms], grad


# ---- hand-computed values (DESIGN §1) ---------------------------------------

# Three pixels (0,0), (2,0), (1,1); labels 1, 1, 2. Cluster 1 has mean (1,0)
# and both pixels at distance 1 (L1 and L2): var = 1/2 * (2 * 0.5^2 / 2) = 0.125.
# The means (1,0), (1,1) are 1 apart: dist = (3 - 1)^2 = 4. reg (unweighted):
# L1 (1 + 2) / 2 = 1.5, L2 (1 + sqrt 2) / 2.
CHECK_X = [[[0.0, 2.0, 1.0], [0.0, 0.0, 1.0]]]
CHECK_LABELS = [[1, 1, 2]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm,expected", [(1, (0.125, 4.0, 1.5)), (2, (0.125, 4.0, 1.2071067811865475))])
def test_design_check_values(device, norm, expected):
    x = torch.tensor(CHECK_X, dtype=torch.float64, device=device)
    labels = torch.tensor(CHECK_LABELS, device=device)
    terms = discloss.discriminative_loss(x, labels, norm=norm, gamma=1.0)
    assert [float(t) for t in terms] == pytest.approx(expected, rel=1e-12)
    weighted = discloss.discriminative_loss(x, labels, norm=norm, alpha=2.0, beta=3.0, gamma=0.5)
    assert [float(t) for t in weighted] == pytest.approx([2 * expected[0], 3 * expected[1], 0.5 * expected[2]])


@pytest.mark.parametrize("device", DEVICES)
def test_chainer_check_values(device):
    # K = 2: var = 1/2 * (0.5 / 2 + 0 / 1); one pair over B*K*(K-1)/2 = 1;
    # reg L1 = (|(1,0)| + |(1,1)|) / (K B) = 1.5; L2 = (1 + sqrt 2) / 2.
    x = torch.tensor(CHECK_X, dtype=torch.float64, device=device)
    labels = torch.tensor(CHECK_LABELS, device=device)
    assert [float(t) for t in chainer_loss(x, labels, 0.5, 1.5, 2, gamma=1.0)] == pytest.approx([0.125, 4.0, 1.5])
    assert [float(t) for t in chainer_loss(x, labels, 0.5, 1.5, 2, norm=2, gamma=1.0)] == pytest.approx(
        [0.125, 4.0, 1.2071067811865475])
    # K = 3 adds an empty slot with mean 0: pairs (1,3): |(1,0)| = 1 -> 4,
    # (2,3): |(1,1)|_1 = 2 -> 1, over B*K*(K-1)/2 = 3 pairs; var and reg / 3.
    v, d, r = chainer_loss(x, labels, 0.5, 1.5, 3, gamma=1.0)
    assert [float(v), float(d), float(r)] == pytest.approx([0.25 / 3, (4 + 4 + 1) / 3, 3 / 3])


def test_chainer_default_signature():
    import inspect

    sig = inspect.signature(chainer_loss)
    assert list(sig.parameters) == [
        "embeddings", "labels", "delta_v", "delta_d", "max_embedding_dim", "norm", "alpha", "beta", "gamma"]
    defaults = {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}
    assert defaults == {"norm": 1, "alpha": 1.0, "beta": 1.0, "gamma": 0.001}


# ---- randomized cases against the float64 reference -------------------------

CASES = [
    # spatial, K instances, max_instances
    ((37,), 3, 5),
    ((13, 17), 6, 9),
    ((5, 6, 7), 4, 8),
    ((24, 24), 1, 2),
    ((32, 40), 150, 300),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spatial,instances,max_instances", CASES)
@pytest.mark.parametrize("norm", [1, 2])
def test_random_against_reference(device, spatial, instances, max_instances, norm):
    labels = blob_labels(3, spatial, instances, seed=len(spatial) + instances).to(device)
    x = torch.randn(3, 4, *spatial, dtype=torch.float64, device=device, generator=None)
    kw = dict(norm=norm, gamma=0.1, max_instances=max_instances)
    for reduction in ["mean", "sum", "none"]:
        terms, grad = run(x, labels, reduction=reduction, **kw)
        ref_terms, ref_grad = reference64(x, labels, reduction=reduction, **kw)
        for name, a, b in zip(["var", "dist", "reg"], terms, ref_terms):
            assert_close(a, b, torch.float64, f"{name} {reduction}")
        assert_grad_close(grad, ref_grad, torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ignore_index", [0, None, 7, -1])
def test_ignore_index(device, ignore_index):
    labels = blob_labels(2, (19, 23), 8, seed=3, background=0).to(device)
    if ignore_index == -1:
        labels = torch.where(labels == 0, -1, labels)
    x = torch.randn(2, 3, 19, 23, dtype=torch.float64, device=device)
    terms, grad = run(x, labels, ignore_index=ignore_index, max_instances=12)
    ref_terms, ref_grad = reference64(x, labels, ignore_index=ignore_index, max_instances=12)
    for a, b in zip(terms, ref_terms):
        assert_close(a, b, torch.float64)
    assert_grad_close(grad, ref_grad, torch.float64)
    if ignore_index is not None:
        ignored = (labels == ignore_index).unsqueeze(1).expand_as(grad)
        assert bool((grad[ignored] == 0).all()), "ignored pixels get no gradient"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
def test_dtypes(device, dtype, label_dtype):
    labels = blob_labels(2, (16, 20), 5, seed=1, dtype=label_dtype).to(device)
    x = torch.randn(2, 6, 16, 20, device=device).to(dtype)
    terms, grad = run(x, labels, max_instances=6, gamma=0.1)
    ref_terms, ref_grad = reference64(x, labels.long(), max_instances=6, gamma=0.1)
    assert all(t.dtype == dtype for t in terms) and grad.dtype == dtype
    for a, b in zip(terms, ref_terms):
        assert_close(a, b, dtype)
    assert_grad_close(grad, ref_grad, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("E", [3, 16, 40, 520])
@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("push", [0.0, 0.5])
def test_half_types_with_runs_across_the_stage(dtype, E, norm, push):
    # 16-bit inputs take a segment's runs in stages and keep x - mu of their
    # first look in a scratch of 32768 values (kernels.h, staged differences
    # and stages of runs): 2048 pixels at E = 16, 816 at E = 40, 32 at E =
    # 520. Runs shorter and longer than that, across the 4096-pixel
    # segments; with the push on, and off (the unlabeled pixels then take a
    # zero gradient within the stages).
    W = 4500 if E < 100 else 700
    g = torch.Generator().manual_seed(E + norm)
    lens = [W, 1, 17, 31, 33, 600, 817, 815, 2000, 15, 16, 2049, 512, 513, 1]
    ids = torch.repeat_interleave(torch.arange(len(lens)) % 6 + 1, torch.tensor(lens))
    row = torch.cat([ids, torch.zeros(max(0, 3 * W - ids.numel()), dtype=torch.long)])[: 3 * W]
    labels = row.reshape(1, 3, W).clone()
    labels[0, 2, ::3] = 0  # scattered unlabeled pixels
    scale = min(1.0, 16 / E)  # (the terms stay within float16's range)
    x = ((torch.randn(1, E, 3, W, generator=g) + 2 * labels[:, None] / 6) * scale).to(dtype)
    kw = dict(max_instances=7, norm=norm, unlabeled_push=push, gamma=0.1)
    terms, grad = run(x, labels, **kw)
    ref_terms, ref_grad = reference64(x, labels, **kw)
    for a, b in zip(terms, ref_terms):
        assert_close(a, b, dtype)
    assert_grad_close(grad, ref_grad, dtype)
    # 16-bit inputs are computed in float32 (DESIGN §3), by the same loops in
    # the same order as float32 inputs: the results are the float32 path's
    # on the same values, rounded once, bit for bit (a staged difference
    # read from the wrong place moves the gradient by less than the
    # tolerances above allow).
    terms32, grad32 = run(x.float(), labels, **kw)
    for a, b in zip(terms, terms32):
        assert torch.equal(a, b.to(dtype))
    assert torch.equal(grad, grad32.to(dtype))


def test_bfloat16_gradient_rounds_subnormals_and_keeps_nan():
    # bfloat16 gradients are rounded to nearest even, subnormals included.
    # Where the processor has AVX512-BF16, pass 3 rounds with
    # vcvtne2ps2bf16, which flushes subnormals: its blocks with a subnormal
    # or a NaN round in software. Against the float32 path's gradient,
    # rounded here bit by bit. Image 0: values from 1e-42 to 1e-30 (gradients
    # normal and subnormal); image 1: one NaN (a NaN gradient).
    g = torch.Generator().manual_seed(11)
    scale = 10.0 ** (-42 + 12 * torch.rand(2, 16, 4, 64, generator=g))
    x = (torch.randn(2, 16, 4, 64, generator=g) * scale).to(torch.bfloat16)
    x[1, 3, 2, 5] = float("nan")
    labels = torch.ones(2, 4, 64, dtype=torch.long)
    kw = dict(max_instances=2, delta_v=0.0, gamma=0.0)
    _, grad = run(x, labels, **kw)
    _, grad32 = run(x.float(), labels, **kw)
    assert bool(((grad32 != 0) & (grad32.abs() < 1.1754944e-38)).any())  # (subnormal gradients reached)
    bits = grad32.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    expected = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF
    got = grad.view(torch.int16).to(torch.int64) & 0xFFFF
    nan = torch.isnan(grad32)
    assert bool(nan[1].all()) and not bool(nan[0].any())
    assert torch.equal(torch.isnan(grad), nan)
    assert torch.equal(got[~nan], expected[~nan])


def _layouts(x):
    """(name, tensor) pairs holding the values of x (B, E, H, W) in other layouts."""
    yield "contiguous", x
    yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    big = torch.zeros(x.shape[0], x.shape[1] * 2, x.shape[2] + 3, x.shape[3] * 2, dtype=x.dtype, device=x.device)
    big[:, ::2, 1:-2, ::2] = x
    yield "strided", big[:, ::2, 1:-2, ::2]
    yield "transposed", x.transpose(2, 3).contiguous().transpose(2, 3)
    yield "expanded", x[:1].expand(x.shape[0], -1, -1, -1) if x.shape[0] > 1 else x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layouts(device, dtype):
    labels = blob_labels(2, (15, 18), 6, seed=2).to(device)
    base = torch.randn(2, 5, 15, 18, dtype=dtype, device=device)
    label_views = [labels, labels.transpose(1, 2).contiguous().transpose(1, 2), labels[:, :, :].clone()[:, :, :]]
    for (name, x), lab in itertools.product(_layouts(base), label_views):
        terms, grad = run(x, lab, max_instances=7)
        ref_terms, ref_grad = reference64(x, lab, max_instances=7)
        for a, b in zip(terms, ref_terms):
            assert_close(a, b, dtype, name)
        assert_grad_close(grad, ref_grad, dtype, name)


@pytest.mark.parametrize("device", DEVICES)
def test_many_instances(device):
    # K = 65536 slots, a few hundred present: memory and time follow the
    # clusters present, not K^2.
    labels = blob_labels(2, (40, 40), 200, seed=4).to(device)
    labels = torch.where(labels > 0, labels * 300 + 5, 0)  # sparse ids up to ~60000
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64, device=device)
    terms, grad = run(x, labels, max_instances=65536)
    # The oracle over 65536 slots would need (B, K, K) pair tensors: compact
    # the ids first (the loss does not depend on the id values).
    compact = torch.unique(labels, return_inverse=True)[1]
    ref_terms, ref_grad = reference64(x, compact, max_instances=int(compact.max()) + 1)
    for a, b in zip(terms, ref_terms):
        assert_close(a, b, torch.float64)
    assert_grad_close(grad, ref_grad, torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("max_dim", [1, 3, 8])
@pytest.mark.parametrize("batch", [1, 3])
def test_chainer_against_reference(device, norm, max_dim, batch):
    labels = blob_labels(batch, (14, 15), 5, seed=batch + max_dim).to(device)  # some labels > max_dim
    x = torch.randn(batch, 4, 14, 15, dtype=torch.float64, device=device)
    xg = x.clone().requires_grad_(True)
    terms = chainer_loss(xg, labels, 0.5, 1.5, max_dim, norm=norm, gamma=0.1)
    grad = torch.autograd.grad(sum(terms), xg)[0]
    ref_terms, ref_grad = reference64(x, labels, norm=norm, gamma=0.1, max_instances=max_dim,
                                      normalization="chainer")
    for a, b in zip(terms, ref_terms):
        assert_close(a, b, torch.float64)
    assert_grad_close(grad, ref_grad, torch.float64)


@pytest.mark.parametrize("device", DEVICES)
def test_module_matches_function(device):
    labels = blob_labels(2, (12, 12), 4, seed=5).to(device)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64, device=device)
    module = discloss.DiscriminativeLoss(delta_v=0.3, norm=1, gamma=0.01, max_instances=5)
    terms = discloss.discriminative_loss(x, labels, 0.3, norm=1, gamma=0.01, max_instances=5)
    assert float(module(x, labels)) == pytest.approx(float(sum(terms)), rel=1e-12)
    assert "delta_v=0.3" in repr(module)


def test_default_max_instances_is_max_label_plus_one():
    labels = blob_labels(2, (10, 10), 4, seed=6)
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    a = discloss.discriminative_loss(x, labels)
    b = discloss.discriminative_loss(x, labels, max_instances=int(labels.max()) + 1)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_thread_count_does_not_change_results():
    labels = blob_labels(2, (200, 300), 30, seed=7)
    x = torch.randn(2, 8, 200, 300)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in [1, 2, 3]:
            torch.set_num_threads(n)
            results.append(run(x, labels, max_instances=40))
    finally:
        torch.set_num_threads(threads)
    for terms, grad in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(terms, results[0][0]))
        assert torch.equal(grad, results[0][1])


@pytest.mark.parametrize("device", DEVICES)
def test_single_slot_without_ignore_index(device):
    # K = 1 with no background: every pixel is one cluster.
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, device=device)
    labels = torch.zeros(2, 9, 9, dtype=torch.uint8, device=device)
    terms, grad = run(x, labels, ignore_index=None, max_instances=1, gamma=0.5)
    ref_terms, ref_grad = reference64(x, labels, ignore_index=None, max_instances=1, gamma=0.5)
    for a, b in zip(terms, ref_terms):
        assert_close(a, b, torch.float64)
    assert_grad_close(grad, ref_grad, torch.float64)
    assert float(terms[0]) > 0 and float(terms[1]) == 0


def test_backward_reuses_no_gradient_still_in_use():
    # The CPU backward recycles gradient buffers nothing else holds; one still
    # held must never be handed out again (and overwritten).
    labels = blob_labels(1, (512, 512), 6, seed=8)
    x = torch.randn(1, 8, 512, 512, requires_grad=True)  # 8 MiB: above the cache's threshold
    grads = []
    for scale in [1.0, 2.0, 3.0, 4.0]:
        terms = discloss.discriminative_loss(x, labels, max_instances=8)
        (g,) = torch.autograd.grad(scale * (terms.var + terms.dist + terms.reg), x)
        grads.append(g)
    ptrs = {g.data_ptr() for g in grads}
    assert len(ptrs) == 4
    for k in range(1, 4):
        torch.testing.assert_close(grads[k], grads[0] * (k + 1))
    # Released buffers are reused: the same address comes back.
    del grads
    terms = discloss.discriminative_loss(x, labels, max_instances=8)
    (g,) = torch.autograd.grad(sum(terms), x)
    assert g.data_ptr() in ptrs
