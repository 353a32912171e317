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
def test_too_many_distinct_ids(device, dtype):
    # Ids are any values (DESIGN §1): 9 >= K is a cluster like any other, but
    # an image with more than K distinct ids is an error naming max_instances.
    labels = L.clone().to(dtype).to(device)
    labels[1, 2, 3] = 9
    discloss.discriminative_loss(X.to(device), labels, max_instances=3)  # image 1: ids 1, 2, 9
    labels[1, 0, 0], labels[1, 0, 1] = 1, 2  # make sure 1 and 2 are in image 1
    labels[1, 1, 1] = 7
    with pytest.raises(RuntimeError, match=r"labels: image 1 holds more than max_instances=3 distinct ids"):
        discloss.discriminative_loss(X.to(device), labels, max_instances=3)


@pytest.mark.parametrize("device", DEVICES)
def test_negative_label_is_a_cluster(device):
    labels = L.clone().to(device)
    labels[0, 0, 0] = -3
    base = discloss.discriminative_loss(X.to(device), L.to(device), max_instances=5, ignore_index=0, gamma=1.0)
    with_neg = discloss.discriminative_loss(X.to(device), labels, max_instances=5, gamma=1.0)
    assert float(with_neg.reg) != float(base.reg)  # one more cluster in image 0
    # ...unless it is the ignore_index
    discloss.discriminative_loss(X.to(device), labels, max_instances=5, ignore_index=-3)


def test_uint8_labels_with_large_ignore_index_do_not_wrap():
    # 300 does not exist in uint8; comparing naively would wrap to 44 and make
    # every pixel ignored (terms 0). Here all pixels are one cluster, id 44.
    labels = torch.full((2, 4, 5), 44, dtype=torch.uint8)
    terms = discloss.discriminative_loss(X, labels, max_instances=10, ignore_index=300, gamma=1.0)
    assert float(terms.reg) > 0 and float(terms.var) > 0
    assert float(discloss.discriminative_loss(X, labels, max_instances=10, ignore_index=44, gamma=1.0).reg) == 0.0


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
        torch.ops.discloss.forward(X, L, None, None, 3, 0.5, 1.5, 2, 1.0, 1.0, 0.001, 0.0, 0, "pape", "mean")
    with pytest.raises(RuntimeError, match="reduction"):
        torch.ops.discloss.forward(X, L, None, None, 3, 0.5, 1.5, 2, 1.0, 1.0, 0.001, 0.0, 0, "chainer", "none")
    with pytest.raises(RuntimeError, match="slot_ids, num_ids"):
        torch.ops.discloss.forward(X, L, torch.zeros(2, 3, dtype=torch.int64), None, 3, 0.5, 1.5, 2, 1.0, 1.0,
                                   0.001, 0.0, 0, "paper", "mean")
    with pytest.raises(RuntimeError, match="slot_ids"):
        torch.ops.discloss.forward(X, L, torch.zeros(2, 4, dtype=torch.int64), torch.zeros(2, dtype=torch.int64), 3,
                                   0.5, 1.5, 2, 1.0, 1.0, 0.001, 0.0, 0, "paper", "mean")
    out = torch.ops.discloss.forward(X, L, None, None, 3, 0.5, 1.5, 2, 1.0, 1.0, 0.001, 0.0, 0, "paper", "mean")
    g = torch.ones(())
    with pytest.raises(RuntimeError, match="means"):
        torch.ops.discloss.backward(g, g, g, g, X, L, None, None, out[4][:, :2], out[5], out[6], out[7], 0.5, 1.5, 2,
                                    1.0, 1.0, 0.001, 0.0, 0, "paper", "mean")
    with pytest.raises(RuntimeError, match="grad_var"):
        torch.ops.discloss.backward(torch.ones(2), g, g, g, X, L, None, None, out[4], out[5], out[6], out[7], 0.5,
                                    1.5, 2, 1.0, 1.0, 0.001, 0.0, 0, "paper", "mean")
    with pytest.raises(RuntimeError, match="push_grad_sums"):
        torch.ops.discloss.backward(g, g, g, g, X, L, None, None, out[4], out[5], out[6], out[7], 0.5, 1.5, 2, 1.0,
                                    1.0, 0.001, 1.0, 0, "paper", "mean")
