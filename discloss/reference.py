"""Pure PyTorch versions of the discriminative loss.

``discriminative_loss_reference`` is vectorized (segment sums with
``index_add``, no Python loop over instances) and implements both
normalisations of DESIGN §1. Run in float64 it is the test oracle; run in the
input dtype it is the benchmark baseline (eager and under ``torch.compile``).

``discriminative_loss_loop`` is the per-instance Python loop that public
ports use (paper normalisation only). It exists for the benchmark.

Neither validates its inputs beyond what indexing does: the public API does.
"""

from __future__ import annotations

import torch

__all__ = ["discriminative_loss_reference", "discriminative_loss_loop"]


def _scaled(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x divided by its largest component along dim (a constant for autograd; 1 where that is 0 or not finite)."""
    m = x.detach().abs().amax(dim=dim, keepdim=True)
    return x / torch.where(torch.isfinite(m) & (m > 0), m, torch.ones_like(m))


class _L2Norm(torch.autograd.Function):
    """||x||_2 along dim, for the double-backward path: tiny and huge vectors too.

    vector_norm sums squares, which under- or overflow (float32: below ~1e-19,
    above ~1e19): a zero norm, a zero gradient where the unit vector belongs,
    NaN second derivatives. Here the value is m ||x / m|| and the gradient the
    unit vector (x / m) / ||x / m||, m the largest component, both written
    with differentiable ops: the second derivative is that of the unit vector,
    exact where it is representable (it grows like 1 / ||x||).
    """

    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        ctx.save_for_backward(x)
        m = x.abs().amax(dim=dim, keepdim=True)
        m = torch.where(torch.isfinite(m) & (m > 0), m, torch.ones_like(m))
        return torch.linalg.vector_norm(x / m, ord=2, dim=dim, keepdim=True) * m

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        xs = _scaled(x, ctx.dim)
        return grad * (xs / torch.linalg.vector_norm(xs, ord=2, dim=ctx.dim, keepdim=True)), None


def _norm(x: torch.Tensor, norm: int, dim: int = -1, second_order: bool = False) -> torch.Tensor:
    # vector_norm's gradient at a zero vector is 0 for ord 1 and 2, which is
    # the subgradient the fused kernels use.
    if not second_order:
        return torch.linalg.vector_norm(x, ord=norm, dim=dim)
    # Its second derivative there is NaN (0/0), and the zero vectors here are
    # mostly masked-out entries (a mean minus itself, empty slots), so a zero
    # vector's norm is taken of a stand-in and replaced by 0: first and second
    # derivatives 0 there.
    zero = (x == 0).all(dim=dim, keepdim=True)
    safe = torch.where(zero, torch.ones_like(x), x)
    if norm == 2:
        n = _L2Norm.apply(safe, dim if dim >= 0 else x.dim() + dim)
    else:
        n = torch.linalg.vector_norm(safe, ord=norm, dim=dim, keepdim=True)
    return torch.where(zero, torch.zeros_like(n), n).squeeze(dim)


def _slots(labels: torch.Tensor, num_slots: int, ignore_index, normalization: str):
    """Map labels (B, N) int64 to cluster slots; returns (slot, valid)."""
    if normalization == "chainer":
        valid = (labels >= 1) & (labels <= num_slots)
        slot = labels - 1
    else:
        valid = torch.ones_like(labels, dtype=torch.bool)
        if ignore_index is not None:
            valid = labels != ignore_index
        slot = labels
    return torch.where(valid, slot, torch.zeros_like(slot)), valid


def discriminative_loss_reference(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    delta_v: float = 0.5,
    delta_d: float = 1.5,
    *,
    norm: int = 2,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 0.001,
    ignore_index: int | None = 0,
    max_instances: int | None = None,
    reduction: str = "mean",
    normalization: str = "paper",
    unlabeled_push: float = 0.0,
    hinge_pull: bool = True,
    second_order: bool = False,
):
    """Return the weighted (var, dist, reg) terms, computed in the input dtype,
    and the unlabeled push as a fourth term when ``unlabeled_push`` > 0.

    Labels are the slots: ids in [0, max_instances) (map other ids first).
    ``normalization="chainer"`` uses Chainer's normalisation with
    ``max_instances`` as ``max_embedding_dim`` (labels 1..K are clusters) and
    always returns scalars. ``hinge_pull=False`` pulls with ||x - mu||^2.
    ``second_order=True`` makes the norm of a zero vector twice
    differentiable (derivatives 0; slower) and, on CUDA, sums in float64
    (float32 atomic adds there flush subnormal numbers to zero): the
    double-backward path.
    """
    def nrm(v, dim=-1):
        return _norm(v, norm, dim, second_order)

    if not hinge_pull:
        delta_v = 0.0
    B, E = embeddings.shape[:2]
    x = embeddings.reshape(B, E, -1).transpose(1, 2)  # (B, N, E)
    lab = labels.reshape(B, -1).long()
    if max_instances is None:
        max_instances = int(lab.max().item()) + 1 if lab.numel() else 1
    K = int(max_instances)
    slot, valid = _slots(lab, K, ignore_index, normalization)
    dtype, device = embeddings.dtype, embeddings.device

    # Segment sums over the flattened (image, slot) index.
    seg = (torch.arange(B, device=device)[:, None] * K + slot).reshape(-1)
    valid_f = valid.reshape(-1)
    w = valid_f.to(dtype)
    # Pixels that take part in no term are replaced by 0 before any
    # arithmetic: masking by multiplication would let a NaN or inf there
    # through (NaN * 0 = NaN), into the values and, under double backward,
    # into the whole image's gradient. torch.where passes a zero gradient to
    # the replaced entries.
    xf = torch.where(valid_f[:, None], x.reshape(-1, E), 0)
    # CUDA adds float32 atomically (index_add_) in flush-to-zero mode: sums
    # of subnormal embeddings would be lost. The double-backward path is
    # discloss's own gradient there, so it sums in float64.
    exact = second_order and device.type == "cuda" and dtype != torch.float64

    def segment_sum(values, shape):
        acc = torch.float64 if exact else dtype
        return torch.zeros(shape, dtype=acc, device=device).index_add_(0, seg, values.to(acc)).to(dtype)

    counts = segment_sum(w, B * K)
    sums = segment_sum(xf, (B * K, E))
    mu = sums / counts.clamp(min=1)[:, None]  # 0 where a slot is empty

    h = torch.where(valid_f, torch.relu(nrm(xf - mu[seg]) - delta_v) ** 2, 0)
    hinge = segment_sum(h, B * K).view(B, K)
    counts = counts.view(B, K)
    mu = mu.view(B, K, E)
    present = counts > 0

    # Pairwise distances between slot means, (B, K, K).
    pair = torch.relu(2 * delta_d - nrm(mu[:, :, None, :] - mu[:, None, :, :])) ** 2

    if normalization == "chainer":
        n_slot = counts.sum(0)  # (K,)
        var = (hinge.sum(0) / n_slot.clamp(min=1)).sum() / K
        upper = torch.ones(K, K, dtype=torch.bool, device=device).triu(1)
        dist = (pair * upper).sum() / max(B * K * (K - 1) // 2, 1)
        if norm == 1:
            reg_k = mu.abs().sum(dim=(0, 2))
        else:
            reg_k = _norm(mu.transpose(0, 1).reshape(K, -1), 2, -1, second_order)
        reg = reg_k.sum() / (K * B)
        return alpha * var, beta * dist, gamma * reg

    C = present.sum(1).to(dtype)  # (B,)
    var = torch.where(present, hinge / counts.clamp(min=1), 0).sum(1) / C.clamp(min=1)
    eye = torch.eye(K, dtype=torch.bool, device=device)
    pair_mask = present[:, :, None] & present[:, None, :] & ~eye
    dist = torch.where(pair_mask, pair, 0).sum((1, 2)) / (C * (C - 1)).clamp(min=1)
    reg = torch.where(present, nrm(mu), 0).sum(1) / C.clamp(min=1)
    terms = (alpha * var, beta * dist, gamma * reg)
    if unlabeled_push > 0:
        # Every unlabeled pixel against every slot mean, (B, N, K): O(N K) memory.
        unl = (lab == ignore_index) if ignore_index is not None else torch.zeros_like(valid)
        xu = torch.where(unl[:, :, None], x, 0)  # as above: only the unlabeled pixels' values enter
        d = nrm(xu[:, :, None, :] - mu[:, None, :, :])
        q = torch.where(unl[:, :, None] & present[:, None, :], torch.relu(delta_d - d) ** 2, 0)
        n_u = unl.sum(1).to(dtype)
        push = q.sum((1, 2)) / (C * n_u).clamp(min=1)
        terms = terms + (unlabeled_push * push,)
    if reduction == "mean":
        return tuple(t.mean() for t in terms)
    if reduction == "sum":
        return tuple(t.sum() for t in terms)
    return terms


def discriminative_loss_loop(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    delta_v: float = 0.5,
    delta_d: float = 1.5,
    *,
    norm: int = 2,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 0.001,
    ignore_index: int | None = 0,
):
    """The per-image, per-instance Python loop of the common ports (mean over B).

    Unlike nyoki-mtl's and Wizaron's ports it does not return NaN on an
    image with no instance; it is here to time the loop, not to copy bugs.
    """
    B, E = embeddings.shape[:2]
    zero = embeddings.sum() * 0
    var_sum, dist_sum, reg_sum = zero, zero, zero
    for b in range(B):
        x = embeddings[b].reshape(E, -1)
        lab = labels[b].reshape(-1)
        ids = torch.unique(lab)
        if ignore_index is not None:
            ids = ids[ids != ignore_index]
        means, var = [], zero
        for i in ids:
            xi = x[:, lab == i]
            mu = xi.mean(1)
            means.append(mu)
            var = var + (torch.relu(_norm(xi - mu[:, None], norm, dim=0) - delta_v) ** 2).mean()
        C = len(means)
        if C == 0:
            continue
        mus = torch.stack(means)
        var_sum = var_sum + var / C
        reg_sum = reg_sum + _norm(mus, norm).mean()
        if C > 1:
            d = 0
            for a in range(C):
                for c in range(C):
                    if a != c:
                        d = d + torch.relu(2 * delta_d - _norm(mus[a] - mus[c], norm)) ** 2
            dist_sum = dist_sum + d / (C * (C - 1))
    return alpha * var_sum / B, beta * dist_sum / B, gamma * reg_sum / B
