"""Seeded fuzzing of the op against the float64 per-instance loop: random
shapes, spatial dims, dtypes, label dtypes, strides, ignore values, ids, K,
variants and degenerate layouts; values and gradients.

CI runs FUZZ_CASES cases per device (bounded to well under a minute on CPU).
A longer hunt: ``DISCLOSS_FUZZ_CASES=5000 DISCLOSS_FUZZ_SEED=7 pytest -m fuzz``;
a failure prints the seed and case index that reproduce it.
"""

import os

import pytest
import torch

import discloss
from helpers import DEVICES, assert_close, assert_grad_close, loop_reference64, loop_terms

FUZZ_CASES = int(os.environ.get("DISCLOSS_FUZZ_CASES", "120"))
FUZZ_SEED = int(os.environ.get("DISCLOSS_FUZZ_SEED", "20261123"))

FLOATS = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
LABEL_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]
LABEL_RANGE = {
    torch.uint8: (0, 255), torch.int8: (-128, 127), torch.int16: (-2 ** 15, 2 ** 15 - 1),
    torch.int32: (-2 ** 31, 2 ** 31 - 1), torch.int64: (-2 ** 63, 2 ** 63 - 1),
}


def pick(g, seq):
    return seq[int(torch.randint(len(seq), (1,), generator=g))]


def make_case(seed):
    """One random case: (x, labels, kwargs, description)."""
    g = torch.Generator().manual_seed(seed)
    ndim = pick(g, [1, 1, 2, 2, 2, 3])
    spatial = [int(torch.randint(1, {1: 60, 2: 12, 3: 6}[ndim], (1,), generator=g)) for _ in range(ndim)]
    B = pick(g, [1, 1, 2, 3])
    E = pick(g, [1, 2, 3, 4, 8, 16])
    dtype = pick(g, FLOATS)
    ldtype = pick(g, LABEL_DTYPES)
    lo, hi = LABEL_RANGE[ldtype]
    # ids: a few distinct values of the dtype, small or extreme
    C = pick(g, [0, 1, 1, 2, 3, 5, 8])
    pool = [0, 1, 2, 3, 7, hi, lo, hi - 1, max(lo, -1), lo + 1, 100 % (hi + 1), hi // 3]
    ids = list(dict.fromkeys(int(pick(g, pool)) for _ in range(C + 2)))[: C + 1]
    layout = pick(g, ["blobs", "blobs", "random", "all-one", "all-ignore", "single-pixels"])
    n = 1
    for s in spatial:
        n *= s
    if layout == "blobs":  # runs of equal labels
        cuts = torch.randint(len(ids), (B, max(1, n // 5)), generator=g)
        lab = cuts.repeat_interleave(5, dim=1)[:, :n]
        lab = torch.cat([lab, lab[:, -1:].expand(B, n - lab.shape[1])], 1) if lab.shape[1] < n else lab
    elif layout == "random":
        lab = torch.randint(len(ids), (B, n), generator=g)
    elif layout == "all-one":
        lab = torch.zeros(B, n, dtype=torch.int64)
    elif layout == "all-ignore":
        lab = torch.full((B, n), -1, dtype=torch.int64)
    else:
        lab = torch.arange(n).repeat(B, 1) % max(len(ids), 1)
    table = torch.tensor(ids, dtype=torch.int64)
    ignore = pick(g, [None, "first", "first", "absent"])
    ignore_index = {None: None, "first": ids[0], "absent": 12345 if ldtype != torch.uint8 else -5}[ignore]
    if layout == "all-ignore":
        lab = torch.zeros(B, n, dtype=torch.int64)
        ignore_index = ids[0]
    labels = table[lab].to(ldtype).reshape(B, *spatial)
    scale = pick(g, [1.0, 1.0, 0.1, 3.0])
    x = torch.randn(B, E, *spatial, generator=g, dtype=torch.float64) * scale
    stride = pick(g, ["contiguous", "channels_last", "sliced", "transposed", "expanded"])
    if stride == "channels_last" and ndim == 2:
        x = x.contiguous(memory_format=torch.channels_last)
    elif stride == "sliced":
        x = torch.cat([x, x], 1)[:, ::2]
        labels = torch.stack([labels, labels], 1)[:, 0]
    elif stride == "transposed" and ndim >= 2:
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
        labels = labels.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif stride == "expanded":
        x = x[:, :1].expand(B, E, *spatial)  # stride 0 over E
    x = x.to(dtype)
    def clusters(b):
        lab_b = labels[b].long()
        if ignore_index is not None:
            lab_b = lab_b[lab_b != ignore_index]
        return len(torch.unique(lab_b))

    distinct = max((clusters(b) for b in range(B)), default=0)
    K = max(1, distinct + int(pick(g, [0, 0, 1, 5])))
    kw = dict(
        delta_v=pick(g, [0.0, 0.3, 0.5, 2.0]), delta_d=pick(g, [0.0, 0.5, 1.5, 4.0]), norm=pick(g, [1, 2]),
        alpha=pick(g, [1.0, 0.5]), beta=pick(g, [1.0, 2.0]), gamma=pick(g, [0.001, 0.1, 0.0]),
        ignore_index=ignore_index, max_instances=pick(g, [K, None]), reduction=pick(g, ["mean", "sum", "none"]),
        hinge_pull=pick(g, [True, True, False]),
    )
    if ignore_index is not None and pick(g, [False, True]):
        kw["unlabeled_push"] = pick(g, [0.5, 1.0])
    desc = (f"seed={seed} spatial={spatial} B={B} E={E} {dtype} labels={ldtype} ids={ids} layout={layout} "
            f"stride={stride} {kw}")
    return x, labels, kw, desc


def check_case(x, labels, kw, desc, device):
    x = x.to(device)
    labels = labels.to(device)
    xr = x.detach().clone().requires_grad_(True)
    terms = list(discloss.discriminative_loss(xr, labels, **kw))
    if len(terms) == 3:
        terms.append(torch.zeros_like(terms[0]))
    (grad,) = torch.autograd.grad(sum(t.sum() for t in terms), xr)
    loop_kw = {k: v for k, v in kw.items() if k != "max_instances"}
    ref, ref_grad = loop_reference64(x.double().cpu(), labels.cpu(), **loop_kw)
    for name, t, r in zip(("var", "dist", "reg", "push"), terms, ref):
        assert t.dtype == x.dtype, desc
        assert_close(t, r, x.dtype, f"{name}: {desc}")
    assert grad.shape == x.shape and grad.dtype == x.dtype, desc
    assert_grad_close(grad, ref_grad, x.dtype, f"grad: {desc}")


@pytest.mark.fuzz
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", range(4))
def test_fuzz(device, chunk):
    for i in range(chunk, FUZZ_CASES, 4):
        x, labels, kw, desc = make_case(FUZZ_SEED + i)
        check_case(x, labels, kw, f"case {i}: {desc}", device)


# ---- non-finite values where no term reads them, on the double-backward path -------------------------------------

NONFINITE_CASES = int(os.environ.get("DISCLOSS_FUZZ_NONFINITE_CASES", "24"))


def hvp(f, x, v):
    """Gradient and Hessian-vector product; zeros where f (or its gradient) does not depend on x at all
    (the loop returns constants for an image without clusters)."""
    x = x.detach().clone().requires_grad_(True)
    out = f(x)
    if not out.requires_grad:
        return torch.zeros_like(x), torch.zeros_like(x)
    (g,) = torch.autograd.grad(out, x, create_graph=True)
    if not g.requires_grad:
        return g.detach(), torch.zeros_like(x)
    (h,) = torch.autograd.grad((g * v).sum(), x)
    return g.detach(), h


@pytest.mark.fuzz
@pytest.mark.parametrize("chunk", range(2))
def test_fuzz_nonfinite_ignored_pixels_double_backward(chunk):
    # The fuzz cases with NaN, inf or -inf on the pixels labelled ignore_index (push off: they take part in no
    # term): the fused gradient, the gradient through the double-backward path and its Hessian-vector product
    # equal the float64 loop's with those pixels at 0, and are exactly 0 there.
    done = 0
    for i in range(chunk, 10 * NONFINITE_CASES, 2):
        if done * 2 >= NONFINITE_CASES:
            break
        x, labels, kw, desc = make_case(FUZZ_SEED + 50_000 + i)
        kw.pop("unlabeled_push", None)
        ignore = kw["ignore_index"]
        ignored = (labels.long() == ignore) if ignore is not None else torch.zeros(labels.shape, dtype=torch.bool)
        if not bool(ignored.any()):
            continue
        done += 1
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        g = torch.Generator().manual_seed(i)
        mask = ignored[:, None].expand(x.shape)
        pick_value = torch.randint(3, x.shape, generator=g)
        bad = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=torch.float64)[pick_value]
        x64 = x.double().contiguous()
        x_bad = torch.where(mask, bad, x64).to(dtype)
        x_clean = torch.where(mask, 0.0, x_bad.double())  # the same finite values, 0 where no term reads
        v = torch.randn(x.shape, generator=g, dtype=torch.float64)
        loop_kw = {k: w for k, w in kw.items() if k != "max_instances"}

        def ours(y):
            return sum(t.sum() for t in discloss.discriminative_loss(y, labels, **kw))

        def ref(y):
            return sum(t.sum() for t in loop_terms(y, labels, twice_differentiable=True, **loop_kw))

        xf = x_bad.detach().clone().requires_grad_(True)
        (fused,) = torch.autograd.grad(ours(xf), xf)
        g2, h = hvp(ours, x_bad, v.to(dtype))
        g_ref, h_ref = hvp(ref, x_clean, v)
        for name, got, want in (("fused", fused, g_ref), ("double-backward", g2, g_ref), ("hvp", h, h_ref)):
            what = f"{name}, case {i}: {desc}"
            assert bool(torch.isfinite(got).all()), what
            assert bool((got[mask] == 0).all()), what
            assert_grad_close(got, want, dtype, what)


# ---- unlabeled pixels within ~1e-40 of a cluster mean (float32: -2q/r overflows) -----------------------------------

NEAR_ZERO_CASES = int(os.environ.get("DISCLOSS_FUZZ_NEAR_ZERO_CASES", "40"))


@pytest.mark.fuzz
@pytest.mark.parametrize("chunk", range(2))
def test_fuzz_near_zero_push_distances(chunk):
    # The fuzz cases in float32 scaled to ~1e-39 (subnormal), with the unlabeled push on and each unlabeled
    # pixel moved to 0.1 x scale from a random cluster's mean: values and gradients finite and equal to the
    # float64 loop's on the same float32 values.
    done = 0
    for i in range(chunk, 10 * NEAR_ZERO_CASES, 2):
        if done * 2 >= NEAR_ZERO_CASES:
            break
        x, labels, kw, desc = make_case(FUZZ_SEED + 90_000 + i)
        ignore = kw["ignore_index"]
        if ignore is None:
            continue
        g = torch.Generator().manual_seed(i)
        x = x.double().contiguous().clone()
        lab = labels.long().reshape(labels.shape[0], -1)
        xf = x.reshape(x.shape[0], x.shape[1], -1)
        moved = 0
        for b in range(lab.shape[0]):
            ids = [int(c) for c in torch.unique(lab[b]) if int(c) != ignore]
            unlabeled = (lab[b] == ignore).nonzero().flatten().tolist()
            if not ids or not unlabeled:
                continue
            for p in unlabeled:
                c = ids[int(torch.randint(len(ids), (1,), generator=g))]
                mean = xf[b][:, lab[b] == c].mean(1)
                step = torch.randn(x.shape[1], generator=g, dtype=torch.float64)
                # 0.1 x scale from the mean (-2q/r overflows below ~1e-38), far enough above the subnormal
                # spacing (1.4e-45) that float32's rounding of the mean tilts the direction by < 1e-4
                xf[b, :, p] = mean + 0.1 * step / step.norm().clamp(min=1e-6)
                moved += 1
        if moved == 0:
            continue
        done += 1
        scale = pick(g, [1e-39, 3e-40])
        x32 = (xf.reshape(x.shape) * scale).float()
        kw["unlabeled_push"] = pick(g, [0.5, 1.0])
        what = f"case {i} (near-zero push, scale {scale}): {desc}"
        xr = x32.detach().clone().requires_grad_(True)
        terms = list(discloss.discriminative_loss(xr, labels, **kw))
        (grad,) = torch.autograd.grad(sum(t.sum() for t in terms), xr)
        loop_kw = {k: w for k, w in kw.items() if k != "max_instances"}
        ref, ref_grad = loop_reference64(x32.double(), labels, **loop_kw)
        assert all(bool(torch.isfinite(t).all()) for t in terms) and bool(torch.isfinite(grad).all()), what
        assert_close(terms[3], ref[3], torch.float32, f"push: {what}")
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-3, atol=1e-3 * (float(ref_grad.abs().max()) or 1),
                                   msg=lambda m: f"grad: {what}: {m}")
