"""Hostile and careless calls of the raw ops (and of the public wrappers),
run by tests/test_hostile.py in subprocesses under glibc's heap checks.

Each case is (name, call, expect): ``call()`` makes one call; ``expect`` is
either a regular expression the error message must match from its start
(so the error names the argument first), or a function that checks the
returned value against an independent expectation (a float64 loop, a value
worked out by hand) and raises AssertionError when it differs.

Case names are "<op>/<argument>/<what>"; test_hostile.py checks that every
argument of the three raw ops has at least one case.

Run as ``python hostile_worker.py NAME...``: for each case it prints a line
``START name`` before the call, then one JSON line with the outcome and a
digest of the returned tensors. The parent runs the cases twice, with two
different MALLOC_PERTURB_ bytes: a digest that changes with the byte means
the op returned memory it never wrote.
"""

import hashlib
import json
import math
import re
import sys

import torch

import discloss
from discloss.chainer import discriminative_margin_based_clustering_loss as chainer_loss
from helpers import loop_reference64, loop_terms

I64_MAX, I64_MIN = 2 ** 63 - 1, -2 ** 63
FWD = torch.ops.discloss.forward
BWD = torch.ops.discloss.backward
SLOT_MAP = torch.ops.discloss.slot_map

FWD_ARGS = ["embeddings", "labels", "slot_ids", "num_ids", "max_instances", "delta_v", "delta_d", "norm", "alpha",
            "beta", "gamma", "unlabeled_push", "ignore_index", "normalization", "reduction"]
BWD_ARGS = ["grad_var", "grad_dist", "grad_reg", "grad_push", "embeddings", "labels", "slot_ids", "num_ids", "means",
            "counts", "hinge_grad_sums", "push_grad_sums", "delta_v", "delta_d", "norm", "alpha", "beta", "gamma",
            "unlabeled_push", "ignore_index", "normalization", "reduction"]
CONFIG = dict(delta_v=0.5, delta_d=1.5, norm=2, alpha=1.0, beta=1.0, gamma=0.001, unlabeled_push=0.0,
              ignore_index=0, normalization="paper", reduction="mean")
K = 3


def embeddings(dtype=torch.float64):
    return torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)


def labels():
    # arbitrary ids: image 0 holds 5, 9 and 2^40, image 1 holds 5 and 7; 0 is the background
    return torch.tensor([[5, 5, 0, 9, 9, 2 ** 40, 2 ** 40], [7, 7, 7, 0, 0, 5, 5]])


def slot_map(lab=None):
    return SLOT_MAP(labels() if lab is None else lab, K, 0)


def fwd_args(**over):
    slot_ids, num_ids = slot_map()
    a = dict(CONFIG, embeddings=embeddings(), labels=labels(), slot_ids=slot_ids, num_ids=num_ids, max_instances=K)
    a.update(over)
    return a


def fwd(**over):
    a = fwd_args(**over)
    return FWD(*[a[n] for n in FWD_ARGS])


def bwd_args(push=0.0, **over):
    f = fwd_args(unlabeled_push=push)
    out = FWD(*[f[n] for n in FWD_ARGS])
    one = torch.ones((), dtype=torch.float64)
    a = dict(f, grad_var=one, grad_dist=one, grad_reg=one, grad_push=one, means=out[4], counts=out[5],
             hinge_grad_sums=out[6], push_grad_sums=out[7])
    del a["max_instances"]
    a.update(over)
    return a


def bwd(push=0.0, **over):
    a = bwd_args(push, **over)
    return BWD(*[a[n] for n in BWD_ARGS])


def expected_terms(x, lab, **kw):
    """The float64 loop's four terms and gradient of their sum (clusters: distinct ids)."""
    return loop_reference64(x, lab, **kw)


def close(actual, expected, what, rtol=1e-12, atol=1e-14):
    torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


def terms_match(**kw):
    """Checks forward's four terms against the float64 loop on the base data."""
    def check(out):
        ref, _ = expected_terms(embeddings(), labels(), **kw)
        for name, t, r in zip(("var", "dist", "reg", "push"), out[:4], ref):
            close(t, r, name)
    return check


def grad_matches(**kw):
    """Checks backward's gradient (all four grads 1) against the float64 loop on the base data."""
    def check(grad):
        _, ref = expected_terms(embeddings(), labels(), **kw)
        close(grad, ref, "grad")
    return check


def finite_and_zero_on_background(grad):
    # Saved tensors of another call: a meaningless gradient, but written
    # everywhere, finite, and 0 on the background (ignore_index, push off).
    assert grad.shape == embeddings().shape and grad.dtype == torch.float64
    assert bool(torch.isfinite(grad).all()), grad
    background = (labels() == 0)[:, None, :].expand_as(grad)
    assert bool((grad[background] == 0).all()), grad


def nan_on_clusters(grad):
    background = (labels() == 0)[:, None, :].expand_as(grad)
    assert bool(grad[~background].isnan().all()) and bool((grad[background] == 0).all()), grad


def unsorted(t):
    t = t.clone()
    t[0, :3] = t[0, :3].flip(0)
    return t


def duplicated(t):
    t = t.clone()
    t[0, 1] = t[0, 0]
    return t


def with_value(t, index, value):
    t = t.clone()
    t[index] = value
    return t


def meta(t):
    return t.to("meta")


def transposed_copy(t):
    # the same values, strides (1, rows): not contiguous
    return t.t().contiguous().t()


def slot_map_matches(lab, max_instances, ignore_index):
    """Checks slot_map against distinct ids worked out with torch.unique, row by row."""
    def check(out):
        slot_ids, num_ids = out
        B = lab.shape[0]
        assert slot_ids.shape == (B, max_instances) and num_ids.shape == (B,)
        for b in range(B):
            ids = torch.unique(lab[b].reshape(-1).long())
            if ignore_index is not None:
                ids = ids[ids != ignore_index]
            if bool(((ids >= 0) & (ids < max_instances)).all()):
                assert int(num_ids[b]) == -1, (b, num_ids)
            else:
                n = len(ids)
                assert int(num_ids[b]) == n, (b, num_ids)
                assert slot_ids[b, :n].tolist() == ids.tolist(), (b, slot_ids)
                assert slot_ids[b, n:].tolist() == [0] * (max_instances - n)
    return check


def zero_terms(out):
    for t in out[:4]:
        assert t.shape == () and float(t) == 0.0, t


def public_matches(x, lab, **kw):
    def check(out):
        ref, _ = loop_reference64(x, lab, **{k: v for k, v in kw.items() if k != "max_instances"})
        for t, r in zip(out, ref):
            close(t, r, "term")
    return check


def build_cases():
    x, lab = embeddings(), labels()
    sid, nid = slot_map()
    nan, inf = float("nan"), float("inf")
    c = []

    def add(name, call, expect):
        c.append((name, call, expect))

    # ---- slot_map(labels, max_instances, ignore_index) ----
    add("slot_map/labels/float", lambda: SLOT_MAP(lab.double(), K, 0), "labels: ")
    add("slot_map/labels/bool", lambda: SLOT_MAP(lab > 0, K, 0), "labels: ")
    add("slot_map/labels/0-dim", lambda: SLOT_MAP(torch.tensor(5), K, 0), "labels: ")
    add("slot_map/labels/too-many-ids", lambda: SLOT_MAP(lab, 1, 0), "labels: image 0 holds more than")
    add("slot_map/labels/meta", lambda: SLOT_MAP(meta(lab), K, 0), _meta_slot_map)
    add("slot_map/labels/transposed", lambda: SLOT_MAP(transposed_copy(lab), K, 0), slot_map_matches(lab, K, 0))
    add("slot_map/labels/int8-negative", lambda: SLOT_MAP(torch.tensor([[-128, 127, -1, 0]], dtype=torch.int8), 4, 0),
        slot_map_matches(torch.tensor([[-128, 127, -1, 0]]), 4, 0))
    add("slot_map/labels/empty-batch", lambda: SLOT_MAP(lab[:0], K, 0), slot_map_matches(lab[:0], K, 0))
    add("slot_map/labels/no-pixels", lambda: SLOT_MAP(lab[:, :0], K, 0), slot_map_matches(lab[:, :0], K, 0))
    add("slot_map/labels/extreme-ids", lambda: SLOT_MAP(torch.tensor([[I64_MIN, I64_MAX, 0, I64_MIN]]), 3, None),
        slot_map_matches(torch.tensor([[I64_MIN, I64_MAX, 0, I64_MIN]]), 3, None))
    add("slot_map/max_instances/zero", lambda: SLOT_MAP(lab, 0, 0), "max_instances: ")
    add("slot_map/max_instances/negative", lambda: SLOT_MAP(lab, -5, 0), "max_instances: ")
    add("slot_map/max_instances/2^62", lambda: SLOT_MAP(lab, 2 ** 62, 0), "max_instances: ")
    add("slot_map/max_instances/int64-max", lambda: SLOT_MAP(lab, I64_MAX, 0), "max_instances: ")
    add("slot_map/ignore_index/none", lambda: SLOT_MAP(lab, 4, None), slot_map_matches(lab, 4, None))
    add("slot_map/ignore_index/outside-uint8", lambda: SLOT_MAP(lab.clamp(max=200).to(torch.uint8), 4, 300),
        slot_map_matches(lab.clamp(max=200), 4, None))
    add("slot_map/ignore_index/int64-min", lambda: SLOT_MAP(lab, 4, I64_MIN), slot_map_matches(lab, 4, None))

    # ---- forward(embeddings, labels, slot_ids, num_ids, max_instances, ...) ----
    add("forward/embeddings/int", lambda: fwd(embeddings=x.long()), "embeddings: ")
    add("forward/embeddings/complex", lambda: fwd(embeddings=x.to(torch.complex128)), "embeddings: ")
    add("forward/embeddings/no-spatial-dim", lambda: fwd(embeddings=x[:, :, 0]), "embeddings: ")
    add("forward/embeddings/E=0", lambda: fwd(embeddings=x[:, :0]), "embeddings: ")
    add("forward/embeddings/meta", lambda: fwd(embeddings=meta(x)), "labels: expected the device of embeddings")
    add("forward/embeddings/expanded", lambda: fwd(embeddings=x[:, :1].expand(2, 3, 7)), _check_expanded)
    add("forward/embeddings/empty-batch", lambda: fwd(embeddings=x[:0], labels=lab[:0], slot_ids=sid[:0],
                                                      num_ids=nid[:0]), zero_terms)
    add("forward/embeddings/no-pixels", lambda: fwd(embeddings=x[:, :, :0], labels=lab[:, :0],
                                                    num_ids=torch.full((2,), -1)), zero_terms)
    add("forward/embeddings/reference", lambda: fwd(), terms_match())
    add("forward/labels/expanded", lambda: fwd(labels=lab[:, :1].expand(2, 7), slot_ids=None, num_ids=None,
                                               max_instances=8), _check_expanded_labels)
    add("forward/labels/float", lambda: fwd(labels=lab.double()), "labels: ")
    add("forward/labels/bool", lambda: fwd(labels=lab > 0), "labels: ")
    add("forward/labels/wrong-shape", lambda: fwd(labels=lab[:, :6]), "labels: ")
    add("forward/labels/meta", lambda: fwd(labels=meta(lab)), "labels: expected the device of embeddings")
    add("forward/labels/not-in-row", lambda: fwd(labels=with_value(lab, (0, 0), 11)),
        r"labels: image 0 holds label 11, which is not among its ids slot_ids\[0")
    add("forward/labels/no-map-out-of-range", lambda: fwd(slot_ids=None, num_ids=None),
        r"labels: image 0 holds label 5; expected values in \[0, max_instances=3\)")
    add("forward/labels/no-map-negative", lambda: fwd(slot_ids=None, num_ids=None,
                                                      labels=torch.full((2, 7), -4)), r"labels: image 0 holds label -4")
    add("forward/labels/identity-map-out-of-range", lambda: fwd(num_ids=torch.tensor([-1, 2])),
        r"labels: image 0 holds label 5; expected")
    add("forward/slot_ids/missing", lambda: fwd(slot_ids=None), "slot_ids, num_ids: ")
    add("forward/slot_ids/int32", lambda: fwd(slot_ids=sid.int()), "slot_ids: ")
    add("forward/slot_ids/wrong-shape", lambda: fwd(slot_ids=sid[:, :2]), "slot_ids: ")
    add("forward/slot_ids/meta", lambda: fwd(slot_ids=meta(sid)), "slot_ids: expected the device of embeddings")
    add("forward/slot_ids/unsorted", lambda: fwd(slot_ids=unsorted(sid)), r"slot_ids: expected each row's first")
    add("forward/slot_ids/duplicate", lambda: fwd(slot_ids=duplicated(sid)), r"slot_ids: expected each row's first")
    add("forward/slot_ids/chainer", lambda: fwd(normalization="chainer"), "slot_ids: ")
    add("forward/slot_ids/extra-id", lambda: fwd(slot_ids=torch.tensor([[5, 9, 2 ** 40], [5, 6, 7]]),
                                                 num_ids=torch.tensor([3, 3])), terms_match())
    add("forward/slot_ids/padding-ignored", lambda: fwd(slot_ids=with_value(sid, (1, 2), I64_MIN)), terms_match())
    add("forward/slot_ids/transposed", lambda: fwd(slot_ids=transposed_copy(sid)), terms_match())
    add("forward/num_ids/missing", lambda: fwd(num_ids=None), "slot_ids, num_ids: ")
    add("forward/num_ids/issue-example", lambda: _issue_example(), r"num_ids: .*num_ids\[0\] = 4")
    add("forward/num_ids/past-K", lambda: fwd(num_ids=torch.tensor([3, 4])), r"num_ids: .*num_ids\[1\] = 4")
    add("forward/num_ids/int64-max", lambda: fwd(num_ids=torch.tensor([I64_MAX, 2])), "num_ids: ")
    add("forward/num_ids/minus-2", lambda: fwd(num_ids=torch.tensor([3, -2])), "num_ids: ")
    add("forward/num_ids/int64-min", lambda: fwd(num_ids=torch.tensor([I64_MIN, 2])), "num_ids: ")
    add("forward/num_ids/too-small", lambda: fwd(num_ids=torch.tensor([2, 2])),
        r"labels: image 0 holds label 1099511627776, which is not among")
    add("forward/num_ids/zero-all-ignored", lambda: fwd(labels=torch.zeros(2, 7, dtype=torch.int64),
                                                        num_ids=torch.tensor([0, 0])), zero_terms)
    add("forward/num_ids/float", lambda: fwd(num_ids=nid.double()), "num_ids: ")
    add("forward/num_ids/wrong-shape", lambda: fwd(num_ids=nid[:1]), "num_ids: ")
    add("forward/num_ids/meta", lambda: fwd(num_ids=meta(nid)), "num_ids: expected the device of embeddings")
    add("forward/max_instances/zero", lambda: fwd(max_instances=0, slot_ids=None, num_ids=None), "max_instances: ")
    add("forward/max_instances/negative", lambda: fwd(max_instances=-1), "max_instances: ")
    add("forward/max_instances/2^62", lambda: fwd(max_instances=2 ** 62, slot_ids=None, num_ids=None),
        "max_instances: ")
    add("forward/max_instances/int64-max", lambda: fwd(max_instances=I64_MAX, slot_ids=None, num_ids=None),
        "max_instances: ")
    add("forward/max_instances/int64-max-empty-batch",
        lambda: fwd(max_instances=I64_MAX, embeddings=x[:0], labels=lab[:0], slot_ids=None, num_ids=None),
        "max_instances: ")
    add("forward/max_instances/mismatch", lambda: fwd(max_instances=4), "slot_ids: ")
    for arg in ("delta_v", "delta_d"):
        add(f"forward/{arg}/negative", lambda arg=arg: fwd(**{arg: -1.0}), f"{arg}: ")
        add(f"forward/{arg}/nan", lambda arg=arg: fwd(**{arg: nan}), f"{arg}: ")
        add(f"forward/{arg}/inf", lambda arg=arg: fwd(**{arg: inf}), f"{arg}: ")
    for arg in ("alpha", "beta", "gamma"):
        add(f"forward/{arg}/nan", lambda arg=arg: fwd(**{arg: nan}), "alpha, beta, gamma: ")
        add(f"forward/{arg}/inf", lambda arg=arg: fwd(**{arg: -inf}), "alpha, beta, gamma: ")
        add(f"forward/{arg}/negative", lambda arg=arg: fwd(**{arg: -0.5}), terms_match(**{arg: -0.5}))
    add("forward/norm/zero", lambda: fwd(norm=0), "norm: ")
    add("forward/norm/three", lambda: fwd(norm=3), "norm: ")
    add("forward/norm/int64-min", lambda: fwd(norm=I64_MIN), "norm: ")
    add("forward/norm/one", lambda: fwd(norm=1), terms_match(norm=1))
    add("forward/unlabeled_push/negative", lambda: fwd(unlabeled_push=-1.0), "unlabeled_push: ")
    add("forward/unlabeled_push/nan", lambda: fwd(unlabeled_push=nan), "unlabeled_push: ")
    add("forward/unlabeled_push/inf", lambda: fwd(unlabeled_push=inf), "unlabeled_push: ")
    add("forward/unlabeled_push/no-ignore-index", lambda: fwd(unlabeled_push=1.0, ignore_index=None),
        "unlabeled_push: ")
    add("forward/unlabeled_push/chainer", lambda: fwd(unlabeled_push=1.0, normalization="chainer", slot_ids=None,
                                                      num_ids=None), "unlabeled_push: ")
    add("forward/unlabeled_push/on", lambda: fwd(unlabeled_push=0.7), terms_match(unlabeled_push=0.7))
    add("forward/ignore_index/other-than-the-map", lambda: fwd(ignore_index=9),
        r"labels: image 0 holds label 0, which is not among its ids slot_ids\[0, :num_ids\[0\]=3\] nor ignore_index=9")
    add("forward/ignore_index/int64-min", lambda: fwd(ignore_index=I64_MIN, slot_ids=SLOT_MAP(lab, 4, None)[0],
                                                      num_ids=SLOT_MAP(lab, 4, None)[1], max_instances=4),
        terms_match(ignore_index=None))
    add("forward/ignore_index/none", lambda: fwd(ignore_index=None, slot_ids=SLOT_MAP(lab, 4, None)[0],
                                                 num_ids=SLOT_MAP(lab, 4, None)[1], max_instances=4),
        terms_match(ignore_index=None))
    add("forward/normalization/empty", lambda: fwd(normalization=""), "normalization: ")
    add("forward/normalization/upper", lambda: fwd(normalization="PAPER"), "normalization: ")
    add("forward/reduction/avg", lambda: fwd(reduction="avg"), "reduction: ")
    add("forward/reduction/chainer-none", lambda: fwd(reduction="none", normalization="chainer", slot_ids=None,
                                                      num_ids=None), "reduction: ")
    add("forward/reduction/none", lambda: fwd(reduction="none"), terms_match(reduction="none"))

    # ---- backward(grad_var, grad_dist, grad_reg, grad_push, embeddings, labels, slot_ids, num_ids,
    #               means, counts, hinge_grad_sums, push_grad_sums, ...) ----
    add("backward/embeddings/reference", lambda: bwd(), grad_matches())
    add("backward/unlabeled_push/reference", lambda: bwd(push=0.7, unlabeled_push=0.7),
        grad_matches(unlabeled_push=0.7))
    for arg in ("grad_var", "grad_dist", "grad_reg", "grad_push"):
        add(f"backward/{arg}/shape", lambda arg=arg: bwd(**{arg: torch.ones(2, dtype=torch.float64)}), f"{arg}: ")
        add(f"backward/{arg}/int", lambda arg=arg: bwd(**{arg: torch.ones((), dtype=torch.int64)}), f"{arg}: ")
        add(f"backward/{arg}/meta", lambda arg=arg: bwd(**{arg: meta(torch.ones((), dtype=torch.float64))}),
            f"{arg}: expected the device of embeddings")
    add("backward/grad_var/nan", lambda: bwd(grad_var=torch.tensor(nan, dtype=torch.float64)), nan_on_clusters)
    add("backward/grad_dist/zero-others-one", lambda: bwd(grad_var=torch.zeros((), dtype=torch.float64),
                                                          grad_reg=torch.zeros((), dtype=torch.float64)),
        grad_matches(alpha=0.0, gamma=0.0))
    xe = x[:, :1].expand(2, 3, 7)  # stride 0 over E
    add("backward/embeddings/expanded", lambda: bwd(embeddings=xe, **_saved_of(xe)), _check_expanded_grad)
    add("backward/embeddings/float32", lambda: bwd(embeddings=x.float()), "means: ")
    add("backward/embeddings/more-pixels", lambda: bwd(embeddings=torch.cat([x, x], 2)), "labels: ")
    add("backward/embeddings/meta", lambda: bwd(embeddings=meta(x)), "grad_var: expected the device of embeddings")
    add("backward/embeddings/int", lambda: bwd(embeddings=x.long()), "embeddings: ")
    add("backward/labels/not-in-row", lambda: bwd(labels=with_value(lab, (1, 6), 11)),
        r"labels: image 1 holds label 11, which is not among")
    add("backward/labels/no-map-out-of-range", lambda: bwd(slot_ids=None, num_ids=None),
        r"labels: image 0 holds label 5; expected")
    add("backward/labels/float", lambda: bwd(labels=lab.float()), "labels: ")
    add("backward/labels/meta", lambda: bwd(labels=meta(lab)), "labels: expected the device of embeddings")
    other = [[5, 9, 9, 9, 9, 0, 0], [0, 7, 5, 7, 5, 7, 0]]  # other pixels in the same clusters
    add("backward/labels/other-clusters", lambda: bwd(labels=torch.tensor(other)),
        finite_and_zero_on_background_of(other))
    add("backward/slot_ids/unsorted", lambda: bwd(slot_ids=unsorted(sid)), "slot_ids: ")
    add("backward/slot_ids/duplicate", lambda: bwd(slot_ids=duplicated(sid)), "slot_ids: ")
    add("backward/slot_ids/missing", lambda: bwd(slot_ids=None), "slot_ids, num_ids: ")
    add("backward/slot_ids/meta", lambda: bwd(slot_ids=meta(sid)), "slot_ids: expected the device of embeddings")
    add("backward/num_ids/past-K", lambda: bwd(num_ids=torch.tensor([4, 2])), r"num_ids: .*num_ids\[0\] = 4")
    add("backward/num_ids/int64-min", lambda: bwd(num_ids=torch.tensor([3, I64_MIN])), "num_ids: ")
    add("backward/num_ids/meta", lambda: bwd(num_ids=meta(nid)), "num_ids: expected the device of embeddings")
    add("backward/means/shape", lambda: bwd(means=torch.zeros(2, 2, 3, dtype=torch.float64)), "means: ")
    add("backward/means/float32", lambda: bwd(means=torch.zeros(2, K, 3)), "means: ")
    add("backward/means/meta", lambda: bwd(means=meta(torch.zeros(2, K, 3, dtype=torch.float64))),
        "means: expected the device of embeddings")
    add("backward/means/other-call", lambda: bwd(**_saved_of(2 * x + 1)), finite_and_zero_on_background)
    add("backward/means/nan", lambda: bwd(means=torch.full((2, K, 3), nan, dtype=torch.float64)), nan_on_clusters)
    # K is counts' second dim minus 1: the first tensor whose shape disagrees is named
    add("backward/counts/shape-K", lambda: bwd(counts=torch.zeros(2, K + 2, dtype=torch.int64)),
        "(slot_ids|means|counts): ")
    add("backward/counts/shape-K-no-map", lambda: bwd(slot_ids=None, num_ids=None,
                                                      counts=torch.zeros(2, K + 2, dtype=torch.int64)), "means: ")
    add("backward/counts/1-dim", lambda: bwd(counts=torch.zeros(2, dtype=torch.int64)), "(slot_ids|means|counts): ")
    add("backward/counts/int32", lambda: bwd(counts=bwd_args()["counts"].int()), "counts: ")
    add("backward/counts/meta", lambda: bwd(counts=meta(bwd_args()["counts"])),
        "counts: expected the device of embeddings")
    add("backward/counts/negative", lambda: bwd(counts=with_value(bwd_args()["counts"], (1, 0), -3)),
        r"counts: .*counts\[1, 0\] = -3")
    add("backward/counts/2^62", lambda: bwd(counts=with_value(bwd_args()["counts"], (0, 1), 2 ** 62)),
        r"counts: .*counts\[0, 1\] = 4611686018427387904")
    add("backward/counts/int64-min", lambda: bwd(counts=with_value(bwd_args()["counts"], (0, 0), I64_MIN)),
        "counts: ")
    add("backward/counts/row-sum-past-N", lambda: bwd(counts=torch.tensor([[3, 3, 0, 2], [2, 3, 0, 2]])),
        r"counts: .*counts\[0, 3\] = 2 after 6")
    add("backward/counts/zeros", lambda: bwd(counts=torch.zeros(2, K + 1, dtype=torch.int64)),
        lambda g: close(g, torch.zeros_like(g), "grad", rtol=0, atol=0))
    add("backward/hinge_grad_sums/shape", lambda: bwd(hinge_grad_sums=torch.zeros(2, K, 2, dtype=torch.float64)),
        "hinge_grad_sums: ")
    add("backward/hinge_grad_sums/float32", lambda: bwd(hinge_grad_sums=torch.zeros(2, K, 3)), "hinge_grad_sums: ")
    add("backward/hinge_grad_sums/meta",
        lambda: bwd(hinge_grad_sums=meta(torch.zeros(2, K, 3, dtype=torch.float64))),
        "hinge_grad_sums: expected the device of embeddings")
    add("backward/push_grad_sums/rows-without-push", lambda: bwd(push=0.0, unlabeled_push=0.5),
        "push_grad_sums: ")
    add("backward/push_grad_sums/rows-with-push-off", lambda: bwd(push=0.5, unlabeled_push=0.0),
        "push_grad_sums: ")
    add("backward/push_grad_sums/meta", lambda: bwd(push_grad_sums=meta(torch.zeros(2, 0, 3, dtype=torch.float64))),
        "push_grad_sums: expected the device of embeddings")
    add("backward/delta_v/nan", lambda: bwd(delta_v=nan), "delta_v: ")
    add("backward/delta_d/negative", lambda: bwd(delta_d=-1.0), "delta_d: ")
    add("backward/norm/three", lambda: bwd(norm=3), "norm: ")
    add("backward/alpha/inf", lambda: bwd(alpha=inf), "alpha, beta, gamma: ")
    add("backward/beta/nan", lambda: bwd(beta=nan), "alpha, beta, gamma: ")
    add("backward/gamma/inf", lambda: bwd(gamma=-inf), "alpha, beta, gamma: ")
    add("backward/unlabeled_push/negative", lambda: bwd(unlabeled_push=-1.0), "unlabeled_push: ")
    add("backward/ignore_index/none-with-push", lambda: bwd(push=0.5, unlabeled_push=0.5, ignore_index=None),
        "unlabeled_push: ")
    add("backward/ignore_index/other-than-the-map", lambda: bwd(ignore_index=5),
        r"labels: image 0 holds label 0, which is not among")
    add("backward/normalization/bad", lambda: bwd(normalization="chainers"), "normalization: ")
    add("backward/reduction/bad", lambda: bwd(reduction="max"), "reduction: ")
    add("backward/reduction/none-with-scalar-grads", lambda: bwd(reduction="none"), "grad_var: ")

    # ---- the public wrappers, with a meta tensor beside CPU ones ----
    add("public/labels/meta", lambda: discloss.discriminative_loss(x, meta(lab), max_instances=4),
        "labels: expected the device of embeddings")
    add("public/labels/meta-inferred-K", lambda: discloss.discriminative_loss(x, meta(lab)),
        "labels: expected the device of embeddings")
    add("public/embeddings/meta", lambda: discloss.discriminative_loss(meta(x), lab, max_instances=4),
        "labels: expected the device of embeddings")
    add("public/module/meta", lambda: discloss.DiscriminativeLoss(max_instances=4)(x, meta(lab)),
        "labels: expected the device of embeddings")
    add("public/chainer/meta", lambda: chainer_loss(x, meta(lab), 0.5, 1.5, 3), "labels: expected the device")
    add("public/labels/reference", lambda: discloss.discriminative_loss(x, lab, max_instances=3, unlabeled_push=0.3),
        public_matches(x, lab, unlabeled_push=0.3))
    return c


def finite_and_zero_on_background_of(lab_values):
    lab2 = torch.tensor(lab_values)

    def check(grad):
        assert bool(torch.isfinite(grad).all()), grad
        background = (lab2 == 0)[:, None, :].expand_as(grad)
        assert bool((grad[background] == 0).all()), grad
    return check


def _saved_of(y):
    """forward's saved tensors for embeddings y (same shape): another call's."""
    out = fwd(embeddings=y)
    return dict(means=out[4], counts=out[5], hinge_grad_sums=out[6], push_grad_sums=out[7])


def _check_expanded(out):
    # stride 0 over E: every component of a pixel is x[:, 0]; against the loop on a contiguous copy
    xe = embeddings()[:, :1].expand(2, 3, 7).contiguous()
    ref, _ = loop_reference64(xe, labels())
    for name, t, r in zip(("var", "dist", "reg", "push"), out[:4], ref):
        close(t, r, name)


def _check_expanded_labels(out):
    # stride 0 over the pixels: every pixel of image b holds labels()[b, 0] (5 and 7 < K = 8: no map needed)
    ref, _ = loop_reference64(embeddings(), labels()[:, :1].expand(2, 7).contiguous())
    for name, t, r in zip(("var", "dist", "reg", "push"), out[:4], ref):
        close(t, r, name)


def _check_expanded_grad(grad):
    xe = embeddings()[:, :1].expand(2, 3, 7).contiguous()
    _, ref = loop_reference64(xe, labels())
    close(grad, ref, "grad")


def _issue_example():
    # issue 20's case: num_ids [4, 2] with max_instances 2 (a read past the row; SIGABRT or garbage before)
    x = torch.randn(2, 2, 6, dtype=torch.float64)
    lab = torch.tensor([[5, 7, 11, 11, 5, 7], [9, 11, 9, 11, 9, 11]])
    return FWD(x, lab, torch.tensor([[5, 7], [9, 11]]), torch.tensor([4, 2]), 2, .5, 1.5, 2, 1., 1., .001, 0., 0,
               "paper", "none")


def _meta_slot_map(out):
    slot_ids, num_ids = out
    assert slot_ids.is_meta and num_ids.is_meta, out
    assert slot_ids.shape == (2, K) and num_ids.shape == (2,), out


def digest(value):
    """sha256 of the bytes of every tensor in value (meta tensors: their shape only)."""
    h = hashlib.sha256()
    items = value if isinstance(value, (tuple, list)) else [value]
    for t in items:
        if isinstance(t, torch.Tensor):
            h.update(str((t.dtype, tuple(t.shape))).encode())
            if not t.is_meta:
                h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run(name, call, expect):
    try:
        value = call()
    except Exception as error:  # noqa: BLE001 (every error is compared with the expectation)
        message = str(error)
        if isinstance(expect, str) and re.match(expect, message):
            return {"ok": True, "digest": "error"}
        return {"ok": False, "detail": f"raised {type(error).__name__}: {message[:400]}; expected "
                                       + (f"an error matching {expect!r}" if isinstance(expect, str) else "a result")}
    if isinstance(expect, str):
        return {"ok": False, "detail": f"returned instead of raising an error matching {expect!r}: {value!r:.300}"}
    try:
        expect(value)
    except AssertionError as error:
        return {"ok": False, "detail": f"wrong result: {str(error)[:600]}"}
    return {"ok": True, "digest": digest(value)}


CASES = None


def cases():
    global CASES
    if CASES is None:
        CASES = {name: (call, expect) for name, call, expect in build_cases()}
    return CASES


def main(names):
    torch.manual_seed(0)
    table = cases()
    for name in names:
        print(f"START {name}", flush=True)
        call, expect = table[name]
        print(json.dumps(dict(run(name, call, expect), name=name)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
