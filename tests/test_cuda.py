"""CUDA kernels (csrc/cuda/loss.cu): every path of the streaming passes against
the float64 reference and the CPU op, CUDA-graph capture, torch.compile on
CUDA, bitwise determinism, K = 65536, 3D volumes, a bfloat16 training step,
label dtypes, layouts and degenerate images.

On a GPU they run on it; without one they run on the CUDA simulator
(tests/cudasim: the same CUDA sources compiled as plain C++, executed on the
CPU; see cudasim_device.py), where a comparison with "the CPU op" means
discloss's own CPU kernels (cpu_reference). What needs real hardware (CUDA
graphs, inductor's CUDA code) skips there and says why.

Which kernel path a shape takes (see the comment at the top of loss.cu):
  shared/direct   one warp tile (<= 256 pixels) per image: one chunk
  shared/partial  larger images: per-chunk partials added in chunk order
  global atomics  4 * K * (E + 1) * 4 bytes > 48 KiB (e.g. K = 1024, E = 16)
  slot ranges     the same K under torch.use_deterministic_algorithms(True)
"""

import contextlib

import pytest
import torch

import discloss
from discloss.chainer import discriminative_margin_based_clustering_loss as chainer_loss
from cudasim_device import DEVICE as CUDA
from cudasim_device import cuda_device  # noqa: F401 (autouse: every test here runs the CUDA kernels)
from cudasim_device import ON_SIMULATOR, sync
from cudasim_device import to_cpu_reference as cpu_reference
from helpers import (LABEL_DTYPES, assert_close, assert_grad_close, blob_labels, loop_reference64, reference64,
                     tolerances)

pytestmark = [pytest.mark.cuda]
needs_gpu = pytest.mark.skipif(ON_SIMULATOR, reason="needs an NVIDIA GPU: not expressible on the CUDA simulator")
# K = 65536 on the simulator: B*K per-slot rows, each with block barriers in
# the coefficients step, take minutes; the K = 1024 cases take the same paths.
huge_k = pytest.mark.skipif(ON_SIMULATOR, reason="K = 65536 takes minutes on the CUDA simulator; K = 1024 "
                            "reaches the same kernel paths there")




@contextlib.contextmanager
def deterministic(enabled=True):
    prev, prev_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def run(x, labels, **kw):
    """Fused terms and d(sum of terms)/dx."""
    x = x.detach().clone().requires_grad_(True)
    terms = discloss.discriminative_loss(x, labels, **kw)
    grad = torch.autograd.grad(sum(t.sum() for t in terms), x)[0]
    return [t.detach() for t in terms], grad


def oracle(x, labels, **kw):
    """reference64 on CPU (its index_add_ has no deterministic CUDA kernel)."""
    return reference64(x.detach().cpu(), labels.cpu(), **kw)


def check_against_reference(x, labels, dtype=None, **kw):
    dtype = dtype or x.dtype
    terms, grad = run(x, labels, **kw)
    ref_terms, ref_grad = oracle(x, labels, **kw)
    for name, a, b in zip(["var", "dist", "reg"], terms, ref_terms):
        assert torch.isfinite(a).all(), name
        assert_close(a, b, dtype, name)
    assert torch.isfinite(grad).all()
    assert_grad_close(grad, ref_grad, dtype)
    return terms, grad


def assert_slot_sums_close(actual, expected, x, counts, what, delta_d):
    """Per-slot sums (means, or the sums of d(h^2)/dx and d(q^2)/dx over a
    slot's pixels) of two implementations that add in different orders. Each
    summand is at most 4 max|x| + 2 delta_d in size, so rounding may leave an
    error of about (pixels summed) * (that bound) * eps whatever the sum is:
    a sum that cancels to ~0 (the unhinged pull's sum of 2 (x - mu)) is all
    rounding. The absolute tolerance is rtol times that error scale."""
    tol = tolerances(x.dtype)
    bound = 4 * float(x.detach().abs().max()) + 2 * delta_d
    pixels = 1 if what == "means" else max(int(counts.max()), 1)
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=tol["rtol"],
                               atol=max(tol["atol"], tol["rtol"] * pixels * bound), msg=lambda m: f"{what}: {m}")


def op_args(x, labels, max_instances, *, norm=2, ignore_index=0, normalization="paper", reduction="mean", gamma=0.01):
    return (x, labels, None, None, max_instances, 0.5, 1.5, norm, 1.0, 1.0, gamma, 0.0, ignore_index, normalization,
            reduction)


# ---- every path against the float64 reference --------------------------------------

PATHS = [
    # name, batch, E, spatial, instances, max_instances
    ("shared-direct", 3, 5, (12, 20), 6, 9),
    ("shared-partial", 2, 6, (64, 64), 7, 10),
    ("shared-partial-odd", 2, 3, (37, 41), 5, 6),  # not 16-byte aligned per channel: scalar loads
    ("global-or-ranges", 2, 16, (48, 40), 40, 1024),
]


@pytest.mark.parametrize("name,batch,E,spatial,instances,max_instances", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("det", [False, True])
def test_paths_against_reference(name, batch, E, spatial, instances, max_instances, dtype, norm, det):
    labels = blob_labels(batch, spatial, instances, seed=instances).to(CUDA)
    if max_instances > 256:  # spread the ids over the slots
        labels = torch.where(labels > 0, labels * (max_instances // (instances + 1)), 0)
    x = torch.randn(batch, E, *spatial, dtype=dtype, device=CUDA)
    with deterministic(det):
        for reduction in ["mean", "sum", "none"]:
            check_against_reference(x, labels, norm=norm, gamma=0.1, max_instances=max_instances, reduction=reduction)


@pytest.mark.parametrize("det", [False, True])
@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("max_dim", [3, 700])
def test_chainer_against_reference(det, norm, max_dim):
    labels = blob_labels(2, (40, 36), 30, seed=max_dim).to(CUDA)
    if max_dim > 30:
        labels = torch.where(labels > 0, labels * 20, 0)
    x = torch.randn(2, 8, 40, 36, dtype=torch.float64, device=CUDA)
    with deterministic(det):
        xg = x.clone().requires_grad_(True)
        terms = chainer_loss(xg, labels, 0.5, 1.5, max_dim, norm=norm, gamma=0.1)
        grad = torch.autograd.grad(sum(terms), xg)[0]
    ref_terms, ref_grad = oracle(x, labels, norm=norm, gamma=0.1, max_instances=max_dim, ignore_index=None,
                                 normalization="chainer")
    for a, b in zip(terms, ref_terms):
        assert_close(a, b, torch.float64)
    assert_grad_close(grad, ref_grad, torch.float64)


# ---- the CUDA op against the CPU op ------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "kw",
    [dict(max_instances=9), dict(max_instances=9, norm=1, reduction="none", ignore_index=None),
     dict(max_instances=1024, reduction="sum"), dict(max_instances=7, normalization="chainer", ignore_index=None)],
)
@pytest.mark.parametrize("det", [False, True])
def test_cuda_op_matches_cpu_op(dtype, kw, det):
    K = kw["max_instances"]
    labels = blob_labels(2, (33, 50), 8, seed=K).to(CUDA)
    if K > 256:
        labels = torch.where(labels > 0, labels * 100, 0)
    x = torch.randn(2, 16, 33, 50, dtype=dtype, device=CUDA)
    args = dict(kw)
    K = args.pop("max_instances")
    with deterministic(det):
        out = torch.ops.discloss.forward(*op_args(x, labels, K, **args))
    ref = cpu_reference(torch.ops.discloss.forward, *op_args(x, labels, K, **args))
    for name, a, b in zip(["var", "dist", "reg", "push", "means", "counts", "hinge_grad_sums", "push_grad_sums"], out,
                          ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert a.device.type == CUDA, name
        if name == "counts":
            assert torch.equal(a.cpu(), b), name
        elif name in ("var", "dist", "reg", "push"):
            assert_close(a, b, dtype, name)
        else:
            assert_slot_sums_close(a, b, x, ref[5], name, delta_d=1.5)
    g = [torch.rand_like(t) + 0.5 for t in out[:4]]
    rest = op_args(x, labels, K, **args)[5:]
    with deterministic(det):
        grad = torch.ops.discloss.backward(*g, x, labels, None, None, *out[4:], *rest)
    grad_cpu = cpu_reference(torch.ops.discloss.backward, *g, x, labels, None, None, *ref[4:], *rest)
    assert grad.dtype == dtype and grad.shape == x.shape
    assert_grad_close(grad, grad_cpu, dtype)


# ---- CUDA graphs, torch.compile ----------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("max_instances", [12, 2048])
def test_cuda_graph_capture_and_replay(max_instances):
    loss_fn = discloss.DiscriminativeLoss(max_instances=max_instances, gamma=0.01)
    B, E, H, W = 2, 8, 40, 48
    x = torch.randn(B, E, H, W, device=CUDA, requires_grad=True)
    labels = blob_labels(B, (H, W), 9, seed=1).to(CUDA)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the graph
        for _ in range(2):
            x.grad = None
            loss_fn(x, labels).backward()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        static_loss = loss_fn(x, labels)
        static_loss.backward()

    for seed in [2, 3]:
        new_x = torch.randn(B, E, H, W, device=CUDA, generator=torch.Generator(CUDA).manual_seed(seed))
        new_labels = blob_labels(B, (H, W), 5 + seed, seed=seed).to(CUDA)
        with torch.no_grad():
            x.copy_(new_x)
        labels.copy_(new_labels)
        graph.replay()
        sync()
        ref_terms, ref_grad = oracle(new_x, new_labels, gamma=0.01, max_instances=max_instances)
        assert_close(static_loss, sum(ref_terms), torch.float32, "graph loss")
        assert_grad_close(x.grad, ref_grad, torch.float32, "graph grad")


@needs_gpu
def test_compile_fullgraph_inductor_on_cuda():
    torch._dynamo.reset()
    labels = blob_labels(2, (24, 28), 6, seed=6).to(CUDA)
    inp = torch.randn(2, 4, 24, 28, device=CUDA)
    conv = torch.nn.Conv2d(4, 8, 3, padding=1).to(CUDA)

    def step(inp, labels):
        terms = discloss.discriminative_loss(conv(inp), labels, max_instances=8, gamma=0.01)
        return terms.var + terms.dist + terms.reg

    compiled = torch.compile(step, fullgraph=True)
    eager = step(inp, labels)
    (eager_grad,) = torch.autograd.grad(eager, conv.weight)
    for _ in range(2):
        comp = compiled(inp, labels)
        (comp_grad,) = torch.autograd.grad(comp, conv.weight)
        torch.testing.assert_close(comp, eager, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(comp_grad, eager_grad, rtol=1e-4, atol=1e-5)


# ---- determinism ------------------------------------------------------------------------


@pytest.mark.parametrize("max_instances,instances", [(10, 8), (1024, 60), pytest.param(65536, 300, marks=huge_k)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_bitwise(max_instances, instances, dtype):
    labels = blob_labels(3, (96, 80), instances, seed=9).to(CUDA)
    if max_instances > 256:
        labels = torch.where(labels > 0, labels * (max_instances // (instances + 1)), 0)
    x = torch.randn(3, 16, 96, 80, device=CUDA).to(dtype)
    args = op_args(x, labels, max_instances)
    g = [torch.full((), v, dtype=dtype, device=CUDA) for v in (1.0, 0.7, 1.3, 0.0)]

    def once():
        out = torch.ops.discloss.forward(*args)
        grad = torch.ops.discloss.backward(*g, x, labels, None, None, *out[4:], *args[5:])
        return [t.clone() for t in out] + [grad]

    with deterministic(True):
        first = once()
        for _ in range(2):
            again = once()
            for i, (a, b) in enumerate(zip(first, again)):
                assert torch.equal(a, b), f"output {i} differs between runs"
    # The default path (atomics for large K) agrees to rounding.
    default = once()
    for a, b in zip(first, default):
        if a.is_floating_point():
            assert_grad_close(b, a, a.dtype, "default vs deterministic")
        else:
            assert torch.equal(a, b)


# ---- K = 65536, 3D volumes ------------------------------------------------------------------


@pytest.mark.parametrize("det", [False, True])
@pytest.mark.parametrize("instances", [50, 800])
@huge_k
def test_k65536(det, instances):
    # Sparse ids up to ~65500; the oracle runs on the compacted ids (the loss
    # does not depend on the id values), which keeps its (B, K, K) pairs small.
    B, H, W = 2, 96, 96
    labels = blob_labels(B, (H, W), instances, seed=instances).to(CUDA)
    labels = torch.where(labels > 0, labels * (65535 // instances), 0)
    assert int(labels.max()) < 65536
    x = torch.randn(B, 4, H, W, dtype=torch.float64, device=CUDA)
    with deterministic(det):
        terms, grad = run(x, labels, max_instances=65536)
    compact = torch.unique(labels, return_inverse=True)[1]
    ref_terms, ref_grad = oracle(x, compact, max_instances=int(compact.max()) + 1)
    for a, b in zip(terms, ref_terms):
        assert_close(a, b, torch.float64)
    assert_grad_close(grad, ref_grad, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d", "strided"])
def test_3d_volumes(dtype, layout):
    B, E, D, H, W = 2, 5, 14, 18, 16
    labels = blob_labels(B, (D, H, W), 12, seed=12).to(CUDA)
    x = torch.randn(B, E, D, H, W, dtype=dtype, device=CUDA)
    if layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    elif layout == "strided":
        x = torch.randn(B, E, D, H, 2 * W, dtype=dtype, device=CUDA)[..., ::2]
    for norm in [1, 2]:
        check_against_reference(x, labels, norm=norm, gamma=0.1, max_instances=16, reduction="none")


# ---- dtypes, layouts -----------------------------------------------------------------------


@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("max_instances", [6, 1024])
def test_label_and_embedding_dtypes(label_dtype, dtype, max_instances):
    labels = blob_labels(2, (40, 48), 5, seed=1)
    if max_instances > 100:
        labels = torch.where(labels > 0, labels * 20, 0)  # ids up to 100: fit in int8
    labels = labels.to(label_dtype).to(CUDA)
    x = torch.randn(2, 16, 40, 48, device=CUDA).to(dtype)
    terms, grad = run(x, labels, max_instances=max_instances, gamma=0.1)
    assert all(t.dtype == dtype for t in terms) and grad.dtype == dtype
    ref_terms, ref_grad = oracle(x, labels.long(), max_instances=max_instances, gamma=0.1)
    for a, b in zip(terms, ref_terms):
        assert_close(a, b, dtype)
    assert_grad_close(grad, ref_grad, dtype)


def _layouts(x):
    yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    big = torch.zeros(x.shape[0], x.shape[1] * 2, x.shape[2] + 3, x.shape[3] * 2, dtype=x.dtype, device=x.device)
    big[:, ::2, 1:-2, ::2] = x
    yield "strided", big[:, ::2, 1:-2, ::2]
    yield "transposed", x.transpose(2, 3).contiguous().transpose(2, 3)
    flat = torch.zeros(x.numel() + 1, dtype=x.dtype, device=x.device)
    flat[1:] = x.reshape(-1)
    yield "misaligned", flat[1:].view(x.shape)  # unit strides, data pointer off 16-byte alignment


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("max_instances", [9, 1024])
def test_layouts(dtype, max_instances):
    labels = blob_labels(2, (32, 40), 8, seed=2)
    if max_instances > 100:
        labels = torch.where(labels > 0, labels * 100, 0)
    labels = labels.to(CUDA)
    base = torch.randn(2, 16, 32, 40, device=CUDA).to(dtype)
    expected_terms, expected_grad = oracle(base, labels, max_instances=max_instances)
    for lab in [labels, labels.transpose(1, 2).contiguous().transpose(1, 2)]:
        for name, x in _layouts(base):
            terms, grad = run(x, lab, max_instances=max_instances)
            for a, b in zip(terms, expected_terms):
                assert_close(a, b, dtype, name)
            assert grad.shape == x.shape and grad.stride() == torch.empty_like(x).stride(), name
            assert_grad_close(grad, expected_grad, dtype, name)


# ---- bfloat16 training step -------------------------------------------------------------------


def test_bfloat16_training_step():
    torch.manual_seed(0)
    labels = blob_labels(4, (32, 32), 6, seed=3).to(CUDA)
    # Inputs that carry the instance (a random code per label, plus noise),
    # so that a 1x1 network can learn to separate the instances.
    codes = torch.randn(8, 3, generator=torch.Generator().manual_seed(4)).to(CUDA)
    inp = (codes[labels].permute(0, 3, 1, 2) + 0.1 * torch.randn(4, 3, 32, 32, device=CUDA)).to(torch.bfloat16)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 1), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 1))
    model = model.to(CUDA, torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = discloss.DiscriminativeLoss(max_instances=8)

    emb = model(inp).detach()
    terms, grad = run(emb, labels, max_instances=8)
    ref_terms, ref_grad = oracle(emb, labels, max_instances=8)
    for a, b in zip(terms, ref_terms):
        assert_close(a, b, torch.bfloat16)
    assert_grad_close(grad, ref_grad, torch.bfloat16)

    losses = []
    for _ in range(40):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(inp), labels)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses  # about 3.3 -> 0.04 on the CPU op


# ---- degenerate images, invalid labels ---------------------------------------------------------


@pytest.mark.parametrize("max_instances", [4, 2048])
@pytest.mark.parametrize("normalization", ["paper", "chainer"])
def test_degenerate_images_finite(max_instances, normalization):
    kw = dict(normalization=normalization)
    if normalization == "chainer":
        kw.update(ignore_index=None)
    cases = {
        "no instance": torch.zeros(2, 9, 11, dtype=torch.long),
        "one instance": torch.ones(2, 9, 11, dtype=torch.long),
        "one pixel each": torch.arange(99).reshape(1, 9, 11) % 3 * (torch.arange(99).reshape(1, 9, 11) < 3),
        "mixed": torch.stack([torch.zeros(9, 11, dtype=torch.long), torch.ones(9, 11, dtype=torch.long)]),
    }
    for name, labels in cases.items():
        labels = labels.to(CUDA)
        x = torch.randn(labels.shape[0], 3, 9, 11, dtype=torch.float64, device=CUDA)
        for reduction in ["mean"] if normalization == "chainer" else ["mean", "none"]:
            out = torch.ops.discloss.forward(*op_args(x, labels, max_instances, reduction=reduction, **kw))
            ref = cpu_reference(torch.ops.discloss.forward, *op_args(x, labels, max_instances, reduction=reduction, **kw))
            for a, b in zip(out[:3], ref[:3]):
                assert torch.isfinite(a).all(), name
                assert_close(a, b, torch.float64, name)
            g = [torch.ones_like(t) for t in out[:4]]
            rest = op_args(x, labels, max_instances, reduction=reduction, **kw)[5:]
            grad = torch.ops.discloss.backward(*g, x, labels, None, None, *out[4:], *rest)
            grad_cpu = cpu_reference(torch.ops.discloss.backward, *g, x, labels, None, None, *ref[4:], *rest)
            assert torch.isfinite(grad).all(), name
            assert_grad_close(grad, grad_cpu, torch.float64, name)


@pytest.mark.parametrize("shape", [(0, 3, 5, 5), (2, 3, 0, 5), (2, 3, 1, 1)])
def test_empty_and_tiny_inputs(shape):
    x = torch.randn(*shape, device=CUDA, requires_grad=True)
    labels = torch.ones(shape[0], *shape[2:], dtype=torch.long, device=CUDA)
    for reduction in ["mean", "sum", "none"]:
        terms = discloss.discriminative_loss(x, labels, max_instances=3, reduction=reduction)
        cpu = cpu_reference(discloss.discriminative_loss, x.detach(), labels, max_instances=3, reduction=reduction)
        for a, b in zip(terms, cpu):
            assert a.shape == b.shape
            torch.testing.assert_close(a.cpu(), b)
        (grad,) = torch.autograd.grad(sum(t.sum() for t in terms), x, allow_unused=True)
        assert grad is None or (grad.shape == x.shape and torch.isfinite(grad).all())


@pytest.mark.parametrize("max_instances", [5, 1024])
def test_more_than_k_ids_without_validation_keep_the_k_smallest(max_instances):
    # validate=False skips the eager check of max_instances. Labels outside
    # [0, K) are ids like any other (the slot map); an image with more than K
    # distinct ids keeps its K smallest (slot_map.cu: the table holds every id
    # up to 2K of them, sorted), the others belong to no cluster, and the
    # kernels stay in bounds. (This test was written before arbitrary ids,
    # expecting ids outside [0, K) to be ignored; it first ran on the
    # simulator, which showed that expectation out of date.)
    labels = blob_labels(2, (20, 24), 4, seed=8).to(CUDA)
    bad = labels.clone()
    bad[:, :3] = max_instances + 7
    bad[:, -2:] = -5
    bad[0, 5, 5] = 2**40
    kept = bad.clone()
    for b in range(bad.shape[0]):
        ids = torch.unique(bad[b][bad[b] != 0])[:max_instances]
        kept[b] = torch.where(torch.isin(bad[b], ids), bad[b], 0)
    x = torch.randn(2, 3, 20, 24, device=CUDA)
    terms, grad = run(x, bad, max_instances=max_instances, validate=False)
    ref_terms, ref_grad = loop_reference64(x.double().cpu(), kept.cpu())  # any ids: the per-instance loop
    for name, a, b in zip(["var", "dist", "reg"], terms, ref_terms):
        assert_close(a, b, torch.float32, name)
    assert_grad_close(grad, ref_grad, torch.float32)
    if max_instances == 5:  # 12 and 2**40 are dropped in image 0: no gradient there
        assert bool((grad[0, :, 5, 5] == 0).all())


# ---- arbitrary ids: the slot map on CUDA -------------------------------------------------------

INT64_MAX, INT64_MIN = 2**63 - 1, -(2**63)


def _sparse_label_maps():
    """(name, labels (CPU), max_instances, ignore_index) covering the identity,
    sparse ids of every sign and size, and the extreme int64 values."""
    dense = blob_labels(3, (20, 24), 6, seed=11)
    ids = torch.tensor([0, 7, 2**40, -1, INT64_MAX, INT64_MIN, 123456789], dtype=torch.int64)
    sparse = ids[dense]
    mixed = torch.stack([dense[0], sparse[1], torch.zeros_like(dense[2])])  # identity, sparse, empty
    yield "identity", dense, 8, 0
    yield "sparse", sparse, 8, 0
    yield "sparse-exact-k", sparse, 6, 0
    yield "mixed", mixed, 8, 0
    yield "ignore-none", sparse, 8, None
    yield "ignore-minus-one", sparse, 8, -1
    yield "ignore-int64-max", sparse, 8, INT64_MAX
    yield "large-k", sparse * 3, 1024, 0
    yield "one-pixel-images", torch.tensor([[5], [0], [-3]]), 2, 0


@pytest.mark.parametrize("case", list(_sparse_label_maps()), ids=lambda c: c[0])
@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
def test_slot_map_matches_cpu(case, label_dtype):
    _, labels, K, ignore = case
    if label_dtype != torch.int64:
        info = torch.iinfo(label_dtype)
        labels = labels.clamp(info.min, info.max).to(label_dtype)  # collisions are fine: the same on both
        if ignore is not None and not info.min <= ignore <= info.max:
            ignore = 0
    cpu_ids, cpu_n = cpu_reference(torch.ops.discloss.slot_map, labels, K, ignore)
    ids, n = torch.ops.discloss.slot_map(labels.to(CUDA), K, ignore)
    assert ids.device.type == CUDA and ids.dtype == torch.int64 and ids.shape == (labels.shape[0], K)
    assert torch.equal(n.cpu(), cpu_n)
    assert torch.equal(ids.cpu(), cpu_ids)


def test_slot_map_strided_labels_and_empty_batch():
    labels = blob_labels(2, (30, 26), 5, seed=3) * 1000 - 7
    strided = labels.to(CUDA).transpose(1, 2)  # not contiguous
    ids, n = torch.ops.discloss.slot_map(strided, 6, 0)
    cpu_ids, cpu_n = cpu_reference(torch.ops.discloss.slot_map, labels.transpose(1, 2), 6, 0)
    assert torch.equal(ids.cpu(), cpu_ids) and torch.equal(n.cpu(), cpu_n)
    ids, n = torch.ops.discloss.slot_map(torch.zeros(0, 4, 4, dtype=torch.long, device=CUDA), 3, 0)
    assert ids.shape == (0, 3) and n.shape == (0,)


@pytest.mark.parametrize("distinct", [9, 40, 5000])
def test_slot_map_more_than_k_ids_stays_in_bounds(distinct):
    # More than K distinct ids (the eager check in the wrapper rejects this;
    # the op itself must stay in bounds): at most K ids, sorted, all present
    # in the image; past 2K ids the table is full and the rest are dropped.
    K = 8
    g = torch.Generator().manual_seed(distinct)
    labels = (torch.randint(0, distinct, (2, 64, 80), generator=g) * 7919 + 3).to(CUDA)
    ids, n = torch.ops.discloss.slot_map(labels, K, 0)
    sync()
    assert n.tolist() == [K, K]
    for b in range(2):
        row = ids[b].cpu()
        assert bool((row[1:] > row[:-1]).all())
        assert bool(torch.isin(row, labels[b].cpu()).all())
    if distinct <= 2 * K:  # every id in the table: exactly the K smallest
        for b in range(2):
            assert ids[b].cpu().tolist() == torch.unique(labels[b].cpu())[:K].tolist()


def _op_args_full(x, labels, K, ids=None, n=None, *, delta_v=0.5, delta_d=1.5, norm=2, gamma=0.01, push=0.0,
                  ignore_index=0, reduction="mean"):
    return (x, labels, ids, n, K, delta_v, delta_d, norm, 1.0, 1.0, gamma, push, ignore_index, "paper", reduction)


def _compare_op_with_cpu(x, labels, K, det, **kw):
    """forward and backward of the CUDA op against the CPU op, both given the
    CPU slot map (and the CUDA slot map agreeing with it)."""
    ignore = kw.get("ignore_index", 0)
    cpu_ids, cpu_n = cpu_reference(torch.ops.discloss.slot_map, labels, K, ignore)
    ids, n = torch.ops.discloss.slot_map(labels, K, ignore)
    assert torch.equal(ids.cpu(), cpu_ids) and torch.equal(n.cpu(), cpu_n)
    dtype = x.dtype
    with deterministic(det):
        out = torch.ops.discloss.forward(*_op_args_full(x, labels, K, ids, n, **kw))
    ref = cpu_reference(torch.ops.discloss.forward, *_op_args_full(x, labels, K, cpu_ids, cpu_n, **kw))
    names = ["var", "dist", "reg", "push", "means", "counts", "hinge_grad_sums", "push_grad_sums"]
    for name, a, b in zip(names, out, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if name == "counts":
            assert torch.equal(a.cpu(), b), name
        elif name in ("var", "dist", "reg", "push"):
            assert_close(a, b, dtype, name)
        else:
            assert_slot_sums_close(a, b, x, ref[5], name, delta_d=kw.get("delta_d", 1.5))
    g = [torch.rand_like(t) + 0.5 for t in out[:4]]
    rest = _op_args_full(x, labels, K, **kw)[5:]
    with deterministic(det):
        grad = torch.ops.discloss.backward(*g, x, labels, ids, n, *out[4:], *rest)
    grad_cpu = cpu_reference(torch.ops.discloss.backward, *g, x, labels, cpu_ids, cpu_n, *ref[4:], *rest)
    assert grad.dtype == dtype and grad.shape == x.shape
    assert_grad_close(grad, grad_cpu, dtype)
    return out, grad


SPARSE_PATHS = [
    # name, batch, E, spatial, instances, max_instances
    ("shared-direct", 3, 5, (12, 20), 6, 9),
    ("shared-partial", 2, 6, (64, 64), 7, 10),
    ("strided-3d", 2, 3, (9, 14, 11), 5, 6),
    ("global-or-ranges", 2, 16, (48, 40), 40, 1024),
]


@pytest.mark.parametrize("name,batch,E,spatial,instances,max_instances", SPARSE_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("det", [False, True])
def test_sparse_ids_op_matches_cpu(name, batch, E, spatial, instances, max_instances, dtype, det):
    dense = blob_labels(batch, spatial, instances, seed=instances)
    spread = torch.randperm(10**6, generator=torch.Generator().manual_seed(1))[:instances] * 9_000_000_000 - 2**40
    table = torch.cat([torch.zeros(1, dtype=torch.long), spread])  # 0 stays background
    labels = table[dense].to(CUDA)
    x = torch.randn(batch, E, *spatial, dtype=dtype, device=CUDA)
    if name == "strided-3d":
        x = x.transpose(2, 4)
        labels = labels.transpose(1, 3)
    for norm in [1, 2]:
        _compare_op_with_cpu(x, labels, max_instances, det, norm=norm, reduction="none")
    _compare_op_with_cpu(x, labels, max_instances, det, reduction="sum", push=0.7)


# ---- the unlabeled push and the unhinged pull ----------------------------------------------------


@pytest.mark.parametrize("name,batch,E,spatial,instances,max_instances", SPARSE_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("det", [False, True])
@pytest.mark.parametrize("norm", [1, 2])
def test_push_and_unhinged_pull_match_cpu_op(name, batch, E, spatial, instances, max_instances, dtype, det, norm):
    labels = blob_labels(batch, spatial, instances, seed=instances + 1).to(CUDA)
    if max_instances > 256:
        labels = torch.where(labels > 0, labels * (max_instances // (instances + 1)), 0)
    x = torch.randn(batch, E, *spatial, dtype=dtype, device=CUDA) * 0.7
    delta_d = 0.6 * E  # most unlabeled pixels lie within delta_d of some mean (L1 and L2)
    for reduction in ["mean", "sum", "none"]:
        out, _ = _compare_op_with_cpu(x, labels, max_instances, det, norm=norm, push=1.3, delta_d=delta_d,
                                      reduction=reduction)
        assert float(out[3].abs().sum()) > 0  # the push takes part
        assert out[5][:, -1].tolist() == (labels == 0).flatten(1).sum(1).tolist()  # unlabeled pixel counts
    _compare_op_with_cpu(x, labels, max_instances, det, norm=norm, delta_v=0.0)  # unhinged pull
    _compare_op_with_cpu(x, labels, max_instances, det, norm=norm, delta_v=0.0, push=0.4, ignore_index=3)


def test_push_against_loop_on_cuda():
    from helpers import loop_reference64

    labels = blob_labels(2, (30, 34), 6, seed=5)
    x = torch.randn(2, 4, 30, 34, dtype=torch.float64) * 0.6
    for kw in [dict(unlabeled_push=1.0), dict(unlabeled_push=0.5, hinge_pull=False, norm=1, reduction="none")]:
        xg = x.to(CUDA).requires_grad_(True)
        terms = discloss.discriminative_loss(xg, labels.to(CUDA), delta_d=1.2, max_instances=8, **kw)
        grad = torch.autograd.grad(sum(t.sum() for t in terms), xg)[0]
        ref, ref_grad = loop_reference64(x, labels, delta_d=1.2, **kw)
        for a, b in zip(terms, ref):
            assert_close(a, b, torch.float64)
        assert_grad_close(grad, ref_grad, torch.float64)


@pytest.mark.parametrize("max_instances", [10, 1024])
def test_deterministic_bitwise_with_push_and_sparse_ids(max_instances):
    dense = blob_labels(3, (96, 80), 8, seed=4)
    labels = torch.where(dense > 0, dense * 2**41 + 5, 0).to(CUDA)
    x = torch.randn(3, 16, 96, 80, device=CUDA)
    g = [torch.full((), v, device=CUDA) for v in (1.0, 0.7, 1.3, 0.9)]

    def once():
        ids, n = torch.ops.discloss.slot_map(labels, max_instances, 0)
        args = _op_args_full(x, labels, max_instances, ids, n, push=0.8, delta_d=1.0)
        out = torch.ops.discloss.forward(*args)
        grad = torch.ops.discloss.backward(*g, x, labels, ids, n, *out[4:], *args[5:])
        return [ids, n] + [t.clone() for t in out] + [grad]

    with deterministic(True):
        first = once()
        for _ in range(2):
            for i, (a, b) in enumerate(zip(first, once())):
                assert torch.equal(a, b), f"output {i} differs between runs"


# ---- non-finite inputs and out-of-contract labels ------------------------------------------------


@pytest.mark.parametrize("max_instances", [4, 1024])
@pytest.mark.parametrize("norm", [1, 2])
def test_nan_is_not_hidden_by_the_tile_skip(max_instances, norm):
    # Every pixel sits on its mean (h = 0: pass 2 may skip the warp tile)
    # except one NaN pixel: var, its cluster's mean and the gradient of the
    # cluster must be NaN, as in plain PyTorch and on the CPU.
    labels = torch.ones(1, 16, 32, dtype=torch.long, device=CUDA)
    labels[:, 8:] = 2
    x = torch.zeros(1, 3, 16, 32, device=CUDA)
    x[:, :, 8:] = 5.0
    x[0, 1, 3, 7] = float("nan")
    for det in [False, True]:
        with deterministic(det):
            terms, grad = run(x, labels, max_instances=max_instances, norm=norm, delta_d=10.0)
        ref, ref_grad = cpu_reference(run, x, labels, max_instances=max_instances, norm=norm, delta_d=10.0)
        assert all(torch.isnan(t) for t in terms)  # var, dist, reg
        assert torch.isnan(grad[:, :, :8]).all()
        torch.testing.assert_close(grad.cpu(), ref_grad, equal_nan=True)
        for a, b in zip(terms, ref):
            torch.testing.assert_close(a.cpu(), b, equal_nan=True)


def test_nan_among_unlabeled_pixels_reaches_the_push():
    labels = blob_labels(2, (24, 24), 4, seed=2).to(CUDA)
    x = torch.randn(2, 3, 24, 24, device=CUDA)
    unl = (labels[0] == 0).nonzero()[0]
    x[0, 0, unl[0], unl[1]] = float("nan")
    xg = x.clone().requires_grad_(True)
    t = discloss.discriminative_loss(xg, labels, unlabeled_push=1.0, delta_d=100.0, reduction="none")
    assert torch.isnan(t.push[0]) and torch.isfinite(t.push[1])
    assert torch.isfinite(t.var).all() and torch.isfinite(t.dist).all() and torch.isfinite(t.reg).all()
    (g,) = torch.autograd.grad(t.push.sum(), xg)
    assert torch.isnan(g[0, :, unl[0], unl[1]]).all() and torch.isfinite(g[1]).all()


@pytest.mark.parametrize("max_instances", [3, 1024])
def test_more_than_k_ids_without_validation_stays_in_bounds(max_instances):
    # validate=False skips the eager check; with more than K distinct ids the
    # extra ids get no slot. Nothing may read or write out of bounds (run this
    # under compute-sanitizer: scripts/gpu_check.sh); the result is finite.
    g = torch.Generator().manual_seed(0)
    labels = (torch.randint(0, 4 * max_instances + 50, (2, 40, 44), generator=g) * 1_000_003).to(CUDA)
    labels[:, :5] = 0
    x = torch.randn(2, 4, 40, 44, device=CUDA)
    terms, grad = run(x, labels, max_instances=max_instances, validate=False, unlabeled_push=0.5)
    sync()
    assert all(torch.isfinite(t).all() for t in terms) and torch.isfinite(grad).all()
    with pytest.raises(RuntimeError, match="max_instances"):
        discloss.discriminative_loss(x, labels, max_instances=max_instances)


# ---- exact ties and the L2 norm's range on every path (issue 13) ------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("max_instances", [3, 1024])  # shared; global atomics (det: slot ranges)
@pytest.mark.parametrize("pixels", [50, 200_001])  # one chunk (direct); per-chunk partials
@pytest.mark.parametrize("det", [False, True])
def test_equal_embeddings_give_bitwise_equal_means(dtype, max_instances, pixels, det):
    # Clusters of pixels - 1 and 1 pixels, every embedding the same value:
    # both means are exactly that value (pass 1 sums x - pivot), var = 0, and
    # the dist gradient is the subgradient 0 (a 1-ulp difference of the means
    # would give the single pixel a gradient of order 1 instead of reg's).
    value = 0.1
    x = torch.full((1, 3, pixels), value, dtype=dtype, device=CUDA)
    labels = torch.ones(1, pixels, dtype=torch.long, device=CUDA)
    labels[0, -1] = 2
    with deterministic(det):
        out = torch.ops.discloss.forward(*op_args(x, labels, max_instances, gamma=0.001))
        (var, dist, reg), g = run(x, labels, max_instances=max_instances)
    means = out[4]
    stored = x[0, :, 0].to(means.dtype)
    assert torch.equal(means[0, 1], stored) and torch.equal(means[0, 2], stored)
    assert float(var) == 0.0
    assert float(dist) == pytest.approx(9.0)
    unit = 1.0 / 3 ** 0.5
    torch.testing.assert_close(g[0, :, -1].double().cpu(), torch.full((3,), unit * 0.001 / 2, dtype=torch.float64),
                               rtol=1e-2, atol=0)


@pytest.mark.parametrize("max_instances", [3, 1024])
def test_equal_embeddings_with_sparse_ids_and_strided_layout(max_instances):
    # The slot map's lookups pick the pivots (first_pixel_kernel) and a
    # strided 2D layout: still bitwise equal means.
    x = torch.full((1, 40, 60, 3), -3.3, device=CUDA).permute(0, 3, 1, 2)  # channels last
    labels = torch.full((1, 40, 60), 1_000_003, dtype=torch.long, device=CUDA)
    labels[0, 17, 23] = 7
    for det in [False, True]:
        with deterministic(det):
            (var, dist, reg), g = run(x, labels, max_instances=max_instances)
        assert float(var) == 0.0
        unit = -1.0 / 3 ** 0.5
        torch.testing.assert_close(g[0, :, 17, 23].double().cpu(),
                                   torch.full((3,), unit * 0.001 / 2, dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.mark.parametrize("scale", [1e-30, 1e-38, 1e30])
@pytest.mark.parametrize("max_instances", [4, 1024])
@pytest.mark.parametrize("det", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_float32_norm_range_on_every_path(scale, max_instances, det, layout):
    # Pass 2's pull, pass 3's pull and the finalize's reg with tiny or huge
    # float32 norms, against the float64 loop.
    from helpers import loop_reference64

    g = torch.Generator().manual_seed(3)
    labels = blob_labels(1, (20, 24), 4, seed=3)
    base = torch.randn(1, 3, 20, 24, generator=g, dtype=torch.float64)
    x = (base * scale).float()
    kw = dict(delta_v=0.0, delta_d=0.0, gamma=1.0)
    xc = x.to(CUDA) if layout == "contiguous" else x.to(CUDA).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    with deterministic(det):
        (var, dist, reg), grad = run(xc, labels.to(CUDA), max_instances=max_instances, **kw)
    ref, ref_grad = loop_reference64(x.double(), labels, **kw)
    assert float(reg) > 0 and torch.isfinite(reg)
    torch.testing.assert_close(reg.double().cpu(), ref[2], rtol=1e-5, atol=0)
    if scale < 1:
        torch.testing.assert_close(var.double().cpu(), ref[0], rtol=1e-4, atol=1e-44)
    torch.testing.assert_close(grad.double().cpu(), ref_grad, rtol=1e-4, atol=1e-6 * float(ref_grad.abs().max()))


@pytest.mark.parametrize("max_instances", [3, 1024])
@pytest.mark.parametrize("det", [False, True])
def test_float32_norm_range_in_the_unlabeled_push(max_instances, det):
    # Pass 2b's and pass 3's push norms (tiny distances between unlabeled
    # pixels and means) against the float64 loop.
    from helpers import loop_reference64

    labels = torch.tensor([[1, 1, 2, 2, 0, 0]])
    x = torch.tensor([[[1e-21, 3e-21, -2e-21, -4e-21, 5e-22, 7e-21]]], dtype=torch.float32)
    kw = dict(delta_v=0.0, delta_d=1e-20, gamma=0.0, unlabeled_push=1.0)
    with deterministic(det):
        terms, grad = run(x.to(CUDA), labels.to(CUDA), max_instances=max_instances, **kw)
    ref, ref_grad = loop_reference64(x.double(), labels, **kw)
    for t, r in zip(terms, ref):
        assert float(r) > 0 or float(t) == 0
        torch.testing.assert_close(t.double().cpu(), r, rtol=1e-4, atol=4 * 2.0 ** -149)
    torch.testing.assert_close(grad.double().cpu(), ref_grad, rtol=1e-4, atol=1e-4 * float(ref_grad.abs().max()))


# ---- launch limits -------------------------------------------------------------------------------

# Accumulators of exactly 48 KiB (4 warps * K * (E + 1) values): slot_sums_kernel's
# static shared memory must still fit beside them. The deterministic rows take
# the slot-range path with K beyond the shared path's reach.
@pytest.mark.parametrize(
    "dtype,E,K,det",
    [(torch.float32, 15, 192, False), (torch.float32, 31, 96, False), (torch.float32, 47, 64, False),
     (torch.float32, 2, 1024, False), (torch.float32, 3, 768, False), (torch.float64, 2, 512, False),
     (torch.float32, 15, 400, True), (torch.float64, 5, 700, True)],
)
def test_shared_memory_at_the_48k_limit(dtype, E, K, det):
    g = torch.Generator().manual_seed(K + E)
    labels = torch.randint(0, K, (1, 2, 160), generator=g)
    labels[:, :, :40] = labels[:, :, :1]  # one long run, then scattered ids
    x = torch.randn(1, E, 2, 160, dtype=dtype, generator=g).to(CUDA)
    with deterministic(det):
        check_against_reference(x, labels.to(CUDA), max_instances=K, gamma=0.1)


# ---- the simulator: every launch site, and the schedule orders -------------------------------------


@pytest.mark.skipif(not ON_SIMULATOR, reason="counts launches on the CUDA simulator (on a GPU the other tests run them)")
def test_every_launch_site_runs_on_the_simulator():
    # One small case per path of the planner (sm_count 2): shared/direct (one
    # tile per image), shared/partial, global atomics, slot ranges
    # (deterministic), the push (one chunk and per-chunk partials), the
    # Chainer normalisation, sparse ids (the slot map's hash table).
    import cudasim_device

    cudasim_device.reset_launch_log()
    cases = [
        (dict(max_instances=8), (1, 3, 10, 12), False),
        (dict(max_instances=8, unlabeled_push=1.0), (2, 3, 40, 48), False),
        (dict(max_instances=1024), (2, 16, 20, 24), False),
        (dict(max_instances=1024, unlabeled_push=0.5), (2, 16, 20, 24), True),
    ]
    for kw, shape, det in cases:
        labels = blob_labels(shape[0], shape[2:], 6, seed=1)
        if kw["max_instances"] > 256:
            labels = torch.where(labels > 0, labels * 97 + 2**40, 0)  # sparse ids: the slot map's hash table
        x = torch.randn(*shape, dtype=torch.float64)
        with deterministic(det):
            terms, grad = run(x, labels, gamma=0.1, **kw)
        loop_kw = {k: v for k, v in kw.items() if k != "max_instances"}
        ref_terms, ref_grad = loop_reference64(x, labels, gamma=0.1, **loop_kw)
        for a, b in zip(terms, ref_terms):
            assert_close(a, b, torch.float64)
        assert_grad_close(grad, ref_grad, torch.float64)
    with deterministic(False):
        x = torch.randn(2, 4, 30, 30, dtype=torch.float64, requires_grad=True)
        terms = chainer_loss(x, blob_labels(2, (30, 30), 5, seed=2), 0.5, 1.5, 6)
        torch.autograd.grad(sum(terms), x)
    expected, ran = cudasim_device.launch_sites_in_sources(), cudasim_device.launch_sites_run()
    missing = {site: n - ran[site] for site, n in expected.items() if ran[site] < n}
    assert not missing, f"launch sites that did not run: {missing}"


@pytest.mark.skipif(not ON_SIMULATOR, reason="schedule orders are the CUDA simulator's")
@pytest.mark.parametrize("max_instances,push", [(9, 0.0), (1024, 1.0)])
def test_deterministic_mode_is_bitwise_equal_in_every_schedule_order(max_instances, push):
    # Blocks and threads forward, reversed and in two seeded random orders:
    # deterministic mode must not depend on the order (a missing barrier or
    # an order-dependent reduction would show here).
    import cudasim_device

    labels = blob_labels(2, (36, 40), 7, seed=3)
    if max_instances > 256:
        labels = torch.where(labels > 0, labels * 131, 0)
    x = torch.randn(2, 5, 36, 40)
    args = op_args(x, labels, max_instances)
    args = args[:11] + (push,) + args[12:]
    g = [torch.full((), v) for v in (1.0, 0.7, 1.3, 0.9)]
    results = {}
    for order, seed in [("forward", 0), ("reverse", 0), ("random", 1), ("random", 2)]:
        cudasim_device.configure(2, order, seed)
        with deterministic(True):
            out = torch.ops.discloss.forward(*args)
            grad = torch.ops.discloss.backward(*g, x, labels, None, None, *out[4:], *args[5:])
        results[(order, seed)] = [t.clone() for t in out] + [grad]
    first = results[("forward", 0)]
    for key, res in results.items():
        for i, (a, b) in enumerate(zip(first, res)):
            assert torch.equal(a, b), f"output {i} differs in order {key}"
    ref_terms, ref_grad = oracle(x, labels, gamma=0.01, max_instances=max_instances, unlabeled_push=push)
    for a, b in zip(first[:3], ref_terms):
        assert_close(a, b, torch.float32)


# ---- raw-op contracts (DESIGN §7) ----------------------------------------------------------------


def test_untrusted_slot_maps_stay_in_bounds():
    # The CUDA kernels clamp num_ids to the row's K ids without a host
    # synchronisation (the CPU kernels reject such maps): counts past the
    # row, unsorted rows, duplicates and negative counts give wrong slots,
    # never an access out of bounds (AddressSanitizer would see one on the
    # simulator: make test-cudasim-asan) nor a non-finite result.
    x = torch.randn(2, 2, 6, dtype=torch.float64)
    labels = torch.tensor([[5, 7, 11, 11, 5, 7], [9, 11, 9, 11, 9, 11]])
    maps = [([[5, 7], [9, 11]], [4, 2]), ([[7, 5], [11, 9]], [2, 2]), ([[5, 5], [9, 9]], [2, 2]),
            ([[5, 7], [9, 11]], [-5, 2**40])]
    for ids, n in maps:
        ids, n = torch.tensor(ids).to(CUDA), torch.tensor(n).to(CUDA)
        args = (x.to(CUDA), labels.to(CUDA), ids, n, 2, 0.5, 1.5, 2, 1.0, 1.0, 0.001, 0.0, 0, "paper", "none")
        out = torch.ops.discloss.forward(*args)
        g = [torch.ones_like(t) for t in out[:4]]
        grad = torch.ops.discloss.backward(*g, *args[:4], *out[4:], *args[5:])
        sync()
        counts = out[5].cpu()
        assert bool((counts >= 0).all()) and bool((counts[:, :2].sum(1) <= 6).all()), (ids, n, counts)
        for t in list(out[:4]) + [grad]:
            assert torch.isfinite(t).all(), (ids, n)
