"""CUDA kernels (csrc/cuda/loss.cu): every path of the streaming passes against
the float64 reference and the CPU op, CUDA-graph capture, torch.compile on
CUDA, bitwise determinism, K = 65536, 3D volumes, a bfloat16 training step,
label dtypes, layouts and degenerate images.

Skipped (reported as skipped, never passed) without a CUDA device. The rest
of the suite also runs on CUDA when one is present (helpers.DEVICES).

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
from helpers import LABEL_DTYPES, assert_close, assert_grad_close, blob_labels, reference64

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA device)"),
]

CUDA = "cuda"


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
    ref = torch.ops.discloss.forward(*op_args(x.cpu(), labels.cpu(), K, **args))
    for name, a, b in zip(["var", "dist", "reg", "push", "means", "counts", "hinge_grad_sums", "push_grad_sums"], out,
                          ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert a.device.type == "cuda", name
        if name == "counts":
            assert torch.equal(a.cpu(), b), name
        elif name in ("var", "dist", "reg", "push"):
            assert_close(a, b, dtype, name)
        else:  # per-slot sums: absolute tolerance scaled to their size
            assert_grad_close(a, b, dtype, name)
    g = [torch.rand_like(t) + 0.5 for t in out[:4]]
    rest = op_args(x, labels, K, **args)[5:]
    with deterministic(det):
        grad = torch.ops.discloss.backward(*g, x, labels, None, None, *out[4:], *rest)
    grad_cpu = torch.ops.discloss.backward(*[t.cpu() for t in g], x.cpu(), labels.cpu(), None, None, *ref[4:], *rest)
    assert grad.dtype == dtype and grad.shape == x.shape
    assert_grad_close(grad, grad_cpu, dtype)


# ---- CUDA graphs, torch.compile ----------------------------------------------------------


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
        torch.cuda.synchronize()
        ref_terms, ref_grad = oracle(new_x, new_labels, gamma=0.01, max_instances=max_instances)
        assert_close(static_loss, sum(ref_terms), torch.float32, "graph loss")
        assert_grad_close(x.grad, ref_grad, torch.float32, "graph grad")


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


@pytest.mark.parametrize("max_instances,instances", [(10, 8), (1024, 60), (65536, 300)])
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
            ref = torch.ops.discloss.forward(*op_args(x.cpu(), labels.cpu(), max_instances, reduction=reduction, **kw))
            for a, b in zip(out[:3], ref[:3]):
                assert torch.isfinite(a).all(), name
                assert_close(a, b, torch.float64, name)
            g = [torch.ones_like(t) for t in out[:4]]
            rest = op_args(x, labels, max_instances, reduction=reduction, **kw)[5:]
            grad = torch.ops.discloss.backward(*g, x, labels, None, None, *out[4:], *rest)
            grad_cpu = torch.ops.discloss.backward(*[t.cpu() for t in g], x.cpu(), labels.cpu(), None, None, *ref[4:],
                                                   *rest)
            assert torch.isfinite(grad).all(), name
            assert_grad_close(grad, grad_cpu, torch.float64, name)


@pytest.mark.parametrize("shape", [(0, 3, 5, 5), (2, 3, 0, 5), (2, 3, 1, 1)])
def test_empty_and_tiny_inputs(shape):
    x = torch.randn(*shape, device=CUDA, requires_grad=True)
    labels = torch.ones(shape[0], *shape[2:], dtype=torch.long, device=CUDA)
    for reduction in ["mean", "sum", "none"]:
        terms = discloss.discriminative_loss(x, labels, max_instances=3, reduction=reduction)
        cpu = discloss.discriminative_loss(x.detach().cpu(), labels.cpu(), max_instances=3, reduction=reduction)
        for a, b in zip(terms, cpu):
            assert a.shape == b.shape
            torch.testing.assert_close(a.cpu(), b)
        (grad,) = torch.autograd.grad(sum(t.sum() for t in terms), x, allow_unused=True)
        assert grad is None or (grad.shape == x.shape and torch.isfinite(grad).all())


@pytest.mark.parametrize("max_instances", [5, 1024])
def test_invalid_labels_are_ignored_without_validation(max_instances):
    # validate=False skips the eager check; the kernels must then stay in
    # bounds and treat a label outside [0, K) like ignore_index.
    labels = blob_labels(2, (20, 24), 4, seed=8).to(CUDA)
    bad = labels.clone()
    bad[:, :3] = max_instances + 7
    bad[:, -2:] = -5
    bad[0, 5, 5] = 2**40
    cleaned = torch.where((bad < 0) | (bad >= max_instances), 0, bad)
    x = torch.randn(2, 3, 20, 24, device=CUDA)
    terms, grad = run(x, bad, max_instances=max_instances, validate=False)
    ref_terms, ref_grad = run(x, cleaned, max_instances=max_instances)
    for a, b in zip(terms, ref_terms):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(grad, ref_grad)
    assert bool((grad[:, :, :3] == 0).all())
