"""The compute-sanitizer case of scripts/gpu_check.sh: every CUDA kernel path on
small inputs, forward and backward: shared/direct, shared/partial, global
atomics, slot ranges (deterministic), the chainer wrapper, strided,
channels-last and misaligned inputs, float16/float64, sparse ids (the slot
map), the unlabeled push, and, with validation off, more than K distinct ids
and labels outside [0, K) given to the raw op (the kernels must stay in
bounds). Small on purpose: racecheck and initcheck slow each launch a lot.

    python scripts/gpu_sanitizer_case.py [DTYPE ...]   (default: float32 float16 float64)
"""

import sys

import torch
import discloss

dev = "cuda"
g = torch.Generator().manual_seed(0)


def labels(batch, spatial, n, scale=1):
    lab = torch.randint(0, n + 1, (batch, *[(s + 3) // 4 for s in spatial]), generator=g)
    for d, s in enumerate(spatial):  # blocky, spatially coherent maps
        lab = lab.repeat_interleave(4, dim=d + 1).narrow(d + 1, 0, s)
    return (lab * scale).to(dev)


def step(x, lab, det=False, **kw):
    torch.use_deterministic_algorithms(det)
    x = x.detach().clone().requires_grad_(True)
    terms = discloss.discriminative_loss(x, lab, validate=False, **kw)
    sum(t.sum() for t in terms).backward()
    torch.cuda.synchronize()
    assert all(torch.isfinite(t).all() for t in terms) and torch.isfinite(x.grad).all()


DTYPES = [getattr(torch, name) for name in (sys.argv[1:] or ["float32", "float16", "float64"])]

for dtype in DTYPES:
    x = torch.randn(2, 5, 12, 20, device=dev).to(dtype)
    step(x, labels(2, (12, 20), 4), max_instances=6)                      # shared, direct
    x = torch.randn(2, 6, 40, 44, device=dev).to(dtype)
    lab = labels(2, (40, 44), 6)
    step(x, lab, max_instances=8, norm=1)                                # shared, partial
    step(x, lab * 50, max_instances=1024, reduction="none")              # global atomics
    step(x, lab * 50, det=True, max_instances=1024)                      # slot ranges
    step(x[..., ::2], lab[..., ::2], max_instances=8)                    # strided
    step(x.contiguous(memory_format=torch.channels_last), lab, max_instances=8)
    flat = torch.zeros(x.numel() + 1, device=dev, dtype=dtype)
    flat[1:] = x.reshape(-1)
    step(flat[1:].view(x.shape), lab, max_instances=8)                   # misaligned
    bad = lab.clone()
    bad[:, :4] = 5000
    bad[:, -3:] = -7
    step(x, bad, max_instances=8)                                        # invalid labels
    step(x, bad, det=True, max_instances=1024)
    step(x, lab, max_instances=8, unlabeled_push=0.5)                    # unlabeled push, shared paths
    step(x, lab * 50, max_instances=1024, unlabeled_push=0.5, hinge_pull=False)  # push, global atomics
    step(x, lab * 50, det=True, max_instances=1024, unlabeled_push=0.5)  # push, slot ranges
    step(x, lab * 2**40 - 3, max_instances=8, unlabeled_push=0.5)        # sparse ids (slot map)
    many = torch.randint(1, 10**6, tuple(lab.shape), generator=g).to(dev)
    step(x, many, max_instances=8)                                       # > 2K distinct ids, no validation
    # The raw op without a slot map: labels outside [0, K) get no slot.
    cfg = (0.5, 1.5, 2, 1.0, 1.0, 0.001, 0.5, 0, "paper", "mean")
    out = torch.ops.discloss.forward(x, bad, None, None, 8, *cfg)
    torch.ops.discloss.backward(*[torch.ones_like(t) for t in out[:4]], x, bad, None, None, *out[4:], *cfg)
    torch.cuda.synchronize()
vol = torch.randn(1, 3, 9, 10, 11, device=dev)
step(vol, labels(1, (9, 10, 11), 5), max_instances=65536)               # 3D, K = 65536
x = torch.randn(2, 4, 24, 28, device=dev, requires_grad=True)
terms = discloss.chainer.discriminative_margin_based_clustering_loss(x, labels(2, (24, 28), 5), 0.5, 1.5, 6)
sum(terms).backward()
torch.cuda.synchronize()
print("sanitizer case: ok")
