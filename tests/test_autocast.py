"""The op under torch.autocast (discloss/_autocast.py): float16 and bfloat16
embeddings run in float32, the terms are float32, the gradient comes back in
the embeddings' dtype; float32 and float64 are untouched; outside autocast
half precision runs as it is. Values and gradients against the float64
reference. CUDA cases skip without a GPU."""

import pytest
import torch

import discloss
from discloss.chainer import discriminative_margin_based_clustering_loss as chainer_loss
from discloss.reference import discriminative_loss_reference
from helpers import assert_close, assert_grad_close, blob_labels, reference64

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA device)")

# What autocast runs in on each device: bfloat16 on CPU, float16 and bfloat16 on CUDA.
AUTOCAST_CASES = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bfloat16"),
    pytest.param("cuda", torch.float16, id="cuda-float16", marks=[pytest.mark.cuda, needs_cuda]),
    pytest.param("cuda", torch.bfloat16, id="cuda-bfloat16", marks=[pytest.mark.cuda, needs_cuda]),
]
K = 6


def embeddings_and_labels(device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (1.5 * torch.randn(3, 5, 12, 10, generator=g, dtype=torch.float64)).to(dtype).to(device)
    labels = blob_labels(3, (12, 10), K - 1, seed=seed).to(device)
    return x, labels


def fused(x, labels, loss=discloss.discriminative_loss, **kw):
    x = x.detach().clone().requires_grad_(True)
    terms = loss(x, labels, **kw)
    (grad,) = torch.autograd.grad(sum(t.sum() for t in terms), x)
    return terms, grad


@pytest.mark.parametrize("device,dtype", AUTOCAST_CASES)
@pytest.mark.parametrize("norm", [1, 2])
def test_half_precision_runs_in_float32_under_autocast(device, dtype, norm):
    x, labels = embeddings_and_labels(device, dtype)
    with torch.autocast(device_type=device, dtype=dtype):
        terms, grad = fused(x, labels, norm=norm, gamma=0.1, max_instances=K)
    assert [t.dtype for t in terms] == [torch.float32] * 3
    assert grad.dtype == dtype
    # The op reads float32 copies of the half-precision values, exactly: so
    # the terms are as close to the float64 reference on those values as a
    # float32 computation is, and the gradient as close as its dtype allows.
    ref_terms, ref_grad = reference64(x.cpu(), labels.cpu(), norm=norm, gamma=0.1)
    for name, term, ref in zip(("var", "dist", "reg"), terms, ref_terms):
        assert float(ref) > 0
        assert_close(term, ref, torch.float32, name)
    assert_grad_close(grad, ref_grad, dtype)


@pytest.mark.parametrize("device,dtype", AUTOCAST_CASES)
def test_raw_op_and_chainer_drop_in_run_in_float32_under_autocast(device, dtype):
    x, labels = embeddings_and_labels(device, dtype, seed=1)
    with torch.autocast(device_type=device, dtype=dtype):
        raw = torch.ops.discloss.forward(x, labels, None, None, K, 0.5, 1.5, 2, 1.0, 1.0, 0.1, 0.0, 0, "paper",
                                         "none")
        chainer_terms, chainer_grad = fused(x, labels, loss=chainer_loss, delta_v=0.5, delta_d=1.5,
                                            max_embedding_dim=K - 1)
    ref_none = discriminative_loss_reference(x.cpu().double(), labels.cpu(), gamma=0.1, reduction="none")
    for name, term, ref in zip(("var", "dist", "reg"), raw[:3], ref_none):
        assert term.dtype == torch.float32 and term.shape == (3,)
        assert_close(term, ref, torch.float32, name)
    ref_chainer, ref_chainer_grad = reference64(x.cpu(), labels.cpu(), normalization="chainer", max_instances=K - 1,
                                              norm=1)
    for name, term, ref in zip(("var", "dist", "reg"), chainer_terms, ref_chainer):
        assert term.dtype == torch.float32
        assert_close(term, ref, torch.float32, f"chainer {name}")
    assert chainer_grad.dtype == dtype
    assert_grad_close(chainer_grad, ref_chainer_grad, dtype, "chainer grad")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, needs_cuda])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_and_float64_are_left_alone_under_autocast(device, dtype):
    x, labels = embeddings_and_labels(device, dtype, seed=2)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        terms, grad = fused(x, labels, max_instances=K)
    assert [t.dtype for t in terms] == [dtype] * 3 and grad.dtype == dtype
    ref_terms, ref_grad = reference64(x.cpu(), labels.cpu())
    for name, term, ref in zip(("var", "dist", "reg"), terms, ref_terms):
        assert_close(term, ref, dtype, name)
    assert_grad_close(grad, ref_grad, dtype)


@pytest.mark.parametrize("device,dtype", AUTOCAST_CASES)
def test_half_precision_stays_half_outside_autocast(device, dtype):
    # Outside autocast, or with it disabled around the call, the op reads
    # half precision as it is and returns terms in that dtype.
    x, labels = embeddings_and_labels(device, dtype, seed=3)
    ref_terms, ref_grad = reference64(x.cpu(), labels.cpu())
    outside = fused(x, labels, max_instances=K)
    with torch.autocast(device_type=device, dtype=dtype):
        with torch.autocast(device_type=device, enabled=False):
            disabled = fused(x, labels, max_instances=K)
    for terms, grad in (outside, disabled):
        assert [t.dtype for t in terms] == [dtype] * 3 and grad.dtype == dtype
        for name, term, ref in zip(("var", "dist", "reg"), terms, ref_terms):
            assert_close(term, ref, dtype, name)
        assert_grad_close(grad, ref_grad, dtype)


@pytest.mark.parametrize("device,dtype", AUTOCAST_CASES)
def test_mixed_precision_training_step(device, dtype):
    # A network under autocast emits half-precision embeddings; the loss is
    # float32 and the parameter gradients equal those through the float64
    # reference loss on the same embeddings, to the embeddings' precision.
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                  torch.nn.Conv2d(8, 4, 1)).to(device)
    images = torch.randn(2, 3, 16, 16, device=device)
    labels = blob_labels(2, (16, 16), 5, seed=4).to(device)

    def parameter_grads(loss_of_embeddings):
        network.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=dtype):
            embeddings = network(images)
            loss = loss_of_embeddings(embeddings)
        loss.backward()
        return embeddings.dtype, loss.dtype, [p.grad.clone() for p in network.parameters()]

    def reference_loss(embeddings):
        with torch.autocast(device_type=device, enabled=False):
            return sum(discriminative_loss_reference(embeddings.double(), labels, gamma=0.1))

    emb_dtype, loss_dtype, grads = parameter_grads(
        lambda e: sum(discloss.discriminative_loss(e, labels, gamma=0.1, max_instances=6)))
    _, _, ref_grads = parameter_grads(reference_loss)
    assert emb_dtype == dtype and loss_dtype == torch.float32
    for grad, ref in zip(grads, ref_grads):
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
        assert_grad_close(grad, ref, dtype, "parameter grad")


def test_compiled_under_autocast_matches_the_reference():
    # The autocast kernel is traced like the rest: fullgraph, float32 terms.
    x, labels = embeddings_and_labels("cpu", torch.bfloat16, seed=5)

    def terms_under_autocast(x, labels):
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            return discloss.discriminative_loss(x, labels, gamma=0.1, max_instances=K)

    compiled = torch.compile(terms_under_autocast, fullgraph=True, backend="aot_eager")
    leaf = x.detach().clone().requires_grad_(True)
    terms = compiled(leaf, labels)
    (grad,) = torch.autograd.grad(sum(terms), leaf)
    ref_terms, ref_grad = reference64(x, labels, gamma=0.1)
    assert [t.dtype for t in terms] == [torch.float32] * 3 and grad.dtype == torch.bfloat16
    for name, term, ref in zip(("var", "dist", "reg"), terms, ref_terms):
        assert_close(term, ref, torch.float32, name)
    assert_grad_close(grad, ref_grad, torch.bfloat16)
