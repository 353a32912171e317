"""The registered ops: opcheck, gradcheck, autograd through the raw op,
torch.compile(fullgraph=True) parity."""

import pytest
import torch

import discloss
from helpers import DEVICES, blob_labels

ARGS = dict(max_instances=6, delta_v=0.5, delta_d=1.5, norm=2, alpha=1.0, beta=1.0, gamma=0.01, ignore_index=0,
            normalization="paper", reduction="mean")


def op_args(x, labels, **overrides):
    a = dict(ARGS, **overrides)
    return (x, labels, None, None, a["max_instances"], a["delta_v"], a["delta_d"], a["norm"], a["alpha"], a["beta"],
            a["gamma"], a.get("unlabeled_push", 0.0), a["ignore_index"], a["normalization"], a["reduction"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "overrides",
    [{}, {"reduction": "none", "norm": 1}, {"reduction": "sum", "ignore_index": None},
     {"normalization": "chainer", "ignore_index": None, "max_instances": 4}],
)
def test_opcheck_forward(device, overrides):
    labels = blob_labels(2, (7, 9), 4, seed=1).to(device)
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.discloss.forward.default, op_args(x, labels, **overrides))
    x32 = torch.randn(2, 3, 7, 9, device=device).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.discloss.forward.default, op_args(x32, labels.int(), **overrides))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward(device):
    labels = blob_labels(2, (7, 9), 4, seed=2).to(device)
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64, device=device)
    out = torch.ops.discloss.forward(*op_args(x, labels))
    g = torch.ones((), dtype=torch.float64, device=device)
    a = ARGS
    torch.library.opcheck(
        torch.ops.discloss.backward.default,
        (g, g * 0.5, g * 2, g * 0, x, labels, None, None, out[4], out[5], out[6], out[7], a["delta_v"], a["delta_d"],
         a["norm"], a["alpha"], a["beta"], a["gamma"], 0.0, a["ignore_index"], a["normalization"], a["reduction"]),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("normalization", ["paper", "chainer"])
def test_gradcheck(device, norm, normalization):
    # Embeddings spread wide enough that no pixel sits within ~1e-6 of a hinge
    # kink; gradcheck's finite differences would not be meaningful there.
    labels = blob_labels(2, (4, 5), 3, seed=3).to(device)
    x = (torch.randn(2, 3, 4, 5, dtype=torch.float64, device=device) * 1.3).requires_grad_(True)
    kw = dict(norm=norm, normalization=normalization, gamma=0.1, max_instances=4, reduction="none")
    if normalization == "chainer":
        kw.update(ignore_index=None, reduction="mean", max_instances=3)

    def f(x):
        return torch.ops.discloss.forward(*op_args(x, labels, **kw))[:3]

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7)


def test_raw_op_is_differentiable():
    labels = blob_labels(1, (6, 6), 3, seed=4)
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    var, dist, reg, push, means, counts, sums, push_sums = torch.ops.discloss.forward(*op_args(x, labels))
    assert var.requires_grad and not means.requires_grad and not sums.requires_grad and not push_sums.requires_grad
    (var + dist + reg).backward()
    xr = x.detach().clone().requires_grad_(True)
    sum(discloss.discriminative_loss(xr, labels, gamma=0.01, max_instances=6)).backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=0, atol=0)


def test_only_some_terms_used():
    labels = blob_labels(1, (6, 6), 3, seed=5)
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    terms = discloss.discriminative_loss(x, labels, max_instances=6)
    (g_dist,) = torch.autograd.grad(terms.dist, x, retain_graph=True)
    (g_all,) = torch.autograd.grad(sum(terms), x)
    assert not torch.equal(g_dist, g_all)
    x64 = x.detach().clone().requires_grad_(True)
    ref = discloss.reference.discriminative_loss_reference(x64, labels, max_instances=6)
    (r_dist,) = torch.autograd.grad(ref[1], x64)
    torch.testing.assert_close(g_dist, r_dist)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_matches_eager(device):
    torch._dynamo.reset()
    labels = blob_labels(2, (10, 12), 5, seed=6).to(device)
    x = torch.randn(2, 4, 10, 12, device=device)
    conv = torch.nn.Conv2d(4, 4, 1).to(device)

    def step(x, labels):
        emb = conv(x)
        terms = discloss.discriminative_loss(emb, labels, max_instances=8, norm=1)
        return terms.var + terms.dist + terms.reg

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_loss = step(x, labels)
    (eager_grad,) = torch.autograd.grad(eager_loss, conv.weight)
    comp_loss = compiled(x, labels)
    (comp_grad,) = torch.autograd.grad(comp_loss, conv.weight)
    torch.testing.assert_close(comp_loss, eager_loss)
    torch.testing.assert_close(comp_grad, eager_grad)


@pytest.mark.slow
def test_compile_inductor_fullgraph_dynamic():
    # The default backend, with a shape change (dynamic shapes) on the way.
    torch._dynamo.reset()
    def loss(x, labels):
        return sum(discloss.discriminative_loss(x, labels, max_instances=8, reduction="sum"))

    compiled = torch.compile(loss, fullgraph=True, dynamic=True)
    for size in [(9, 11), (12, 7)]:
        labels = blob_labels(2, size, 5, seed=7)
        x = torch.randn(2, 3, *size, requires_grad=True)
        eager = loss(x, labels)
        (ge,) = torch.autograd.grad(eager, x)
        comp = compiled(x, labels)
        (gc,) = torch.autograd.grad(comp, x)
        torch.testing.assert_close(comp, eager)
        torch.testing.assert_close(gc, ge)
