"""Every bad input of DESIGN §2 raises an error that names the argument."""

import pytest
import torch

import discloss
from discloss.chainer import discriminative_margin_based_clustering_loss as chainer_loss
from helpers import DEVICES

X = torch.randn(2, 3, 4, 5)
L = torch.randint(0, 3, (2, 4, 5))


@pytest.mark.parametrize(
    "x,labels,kw,match",
    [
        (X.long(), L, {}, "embeddings"),
        (X[:, :, 0, 0], L[:, 0, 0], {}, "embeddings"),  # no spatial dim
        (X[:, :0], L, {}, "embeddings"),  # E = 0
        (X, L.float(), {}, "labels"),
        (X, L.bool(), {}, "labels"),
        (X, L[:, :3], {}, "labels"),
        (X, L[:1], {}, "labels"),
        (X, L[:, None], {}, "labels"),
        ([[1.0]], L, {}, "embeddings"),
        (X, [[1]], {}, "labels"),
        (X, L, {"norm": 3}, "norm"),
        (X, L, {"reduction": "avg"}, "reduction"),
        (X, L, {"max_instances": 0}, "max_instances"),
        (X, L, {"max_instances": 2.5}, "max_instances"),
        (X, L, {"delta_v": -1.0}, "delta_v"),
        (X, L, {"delta_d": float("nan")}, "delta_d"),
        (X, L, {"alpha": float("inf")}, "alpha"),
    ],
)
def test_bad_arguments(x, labels, kw, match):
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        discloss.discriminative_loss(x, labels, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int64])
def test_label_too_large(device, dtype):
    labels = L.clone().to(dtype).to(device)
    labels[1, 2, 3] = 9
    with pytest.raises(RuntimeError, match=r"labels: found label 9.*max_instances=5"):
        discloss.discriminative_loss(X.to(device), labels, max_instances=5)


@pytest.mark.parametrize("device", DEVICES)
def test_negative_label(device):
    labels = L.clone().to(device)
    labels[0, 0, 0] = -3
    with pytest.raises(RuntimeError, match="labels: found label -3"):
        discloss.discriminative_loss(X.to(device), labels, max_instances=5)
    # ...unless it is the ignore_index
    discloss.discriminative_loss(X.to(device), labels, max_instances=5, ignore_index=-3)


def test_uint8_labels_with_large_ignore_index_do_not_wrap():
    # 300 does not exist in uint8; comparing naively would wrap to 44.
    labels = torch.full((2, 4, 5), 44, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="found label 44"):
        discloss.discriminative_loss(X, labels, max_instances=10, ignore_index=300)


def test_mismatched_devices():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU to put the two tensors on different devices")
    with pytest.raises(RuntimeError, match="labels"):
        discloss.discriminative_loss(X.cuda(), L, max_instances=5)


def test_chainer_bad_arguments():
    with pytest.raises(ValueError, match="max_embedding_dim"):
        chainer_loss(X, L, 0.5, 1.5, 0)
    with pytest.raises(ValueError, match="norm"):
        chainer_loss(X, L, 0.5, 1.5, 3, norm=0)


def test_op_checks_its_own_arguments():
    # The registered op is public too: it validates without the wrapper.
    with pytest.raises(RuntimeError, match="normalization"):
        torch.ops.discloss.forward(X, L, 3, 0.5, 1.5, 2, 1.0, 1.0, 0.001, 0, "pape", "mean")
    with pytest.raises(RuntimeError, match="reduction"):
        torch.ops.discloss.forward(X, L, 3, 0.5, 1.5, 2, 1.0, 1.0, 0.001, 0, "chainer", "none")
    out = torch.ops.discloss.forward(X, L, 3, 0.5, 1.5, 2, 1.0, 1.0, 0.001, 0, "paper", "mean")
    g = torch.ones(())
    with pytest.raises(RuntimeError, match="means"):
        torch.ops.discloss.backward(g, g, g, X, L, out[3][:, :2], out[4], out[5], 0.5, 1.5, 2, 1.0, 1.0, 0.001, 0,
                                    "paper", "mean")
    with pytest.raises(RuntimeError, match="grad_var"):
        torch.ops.discloss.backward(torch.ones(2), g, g, X, L, out[3], out[4], out[5], 0.5, 1.5, 2, 1.0, 1.0,
                                    0.001, 0, "paper", "mean")
