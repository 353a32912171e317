"""Fake (meta) kernels and autograd for the ops defined in csrc/schemas.h.

With these, ``torch.ops.discloss.forward`` is differentiable, traceable by
``torch.compile(fullgraph=True)`` and passes ``torch.library.opcheck``.

Double backward: ``discloss::backward`` is a fused kernel with no derivative
of its own. When a graph is created through the gradient
(``create_graph=True``: Hessian-vector products, gradient penalties), the
gradient is instead recomputed by differentiating the pure-PyTorch
reference (``discloss.reference``, same math, same slots) with autograd, so
that its own derivative is exact. That path costs what the reference costs
(O(N E) memory per term, O(N K E) with the unlabeled push); the fused
backward serves every other call.
"""

import torch

from . import _C  # noqa: F401  (loading the library registers the ops)
from .reference import discriminative_loss_reference


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_devices(embeddings, **tensors):
    """Every tensor argument on the device of embeddings, each named when not.

    The fake kernels are also the Meta kernels: the dispatcher picks them when
    any argument is a meta tensor, CPU embeddings included, and their empty
    outputs on the embeddings' device would come back as the result
    (uninitialised memory). The real kernels check devices themselves.
    """
    for name, t in tensors.items():
        if t is not None and t.device != embeddings.device:
            raise RuntimeError(f"{name}: expected the device of embeddings ({embeddings.device}), got {t.device}")


@torch.library.register_fake("discloss::slot_map")
def _slot_map_fake(labels, max_instances, ignore_index):
    B = labels.shape[0]
    return (labels.new_empty((B, max_instances), dtype=torch.int64), labels.new_empty((B,), dtype=torch.int64))


@torch.library.register_fake("discloss::forward")
def _forward_fake(embeddings, labels, slot_ids, num_ids, max_instances, delta_v, delta_d, norm, alpha, beta, gamma,
                  unlabeled_push, ignore_index, normalization, reduction):
    _check_devices(embeddings, labels=labels, slot_ids=slot_ids, num_ids=num_ids)
    B, E = embeddings.shape[0], embeddings.shape[1]
    K = max_instances
    shape = (B,) if reduction == "none" else ()
    acc = _accumulate_dtype(embeddings.dtype)
    return (
        embeddings.new_empty(shape),
        embeddings.new_empty(shape),
        embeddings.new_empty(shape),
        embeddings.new_empty(shape),
        embeddings.new_empty((B, K, E), dtype=acc),
        embeddings.new_empty((B, K + 1), dtype=torch.int64),
        embeddings.new_empty((B, K, E), dtype=acc),
        embeddings.new_empty((B, K if unlabeled_push > 0 else 0, E), dtype=acc),
    )


@torch.library.register_fake("discloss::backward")
def _backward_fake(grad_var, grad_dist, grad_reg, grad_push, embeddings, labels, slot_ids, num_ids, means, counts,
                   hinge_grad_sums, push_grad_sums, delta_v, delta_d, norm, alpha, beta, gamma, unlabeled_push,
                   ignore_index, normalization, reduction):
    _check_devices(embeddings, grad_var=grad_var, grad_dist=grad_dist, grad_reg=grad_reg, grad_push=grad_push,
                   labels=labels, slot_ids=slot_ids, num_ids=num_ids, means=means, counts=counts,
                   hinge_grad_sums=hinge_grad_sums, push_grad_sums=push_grad_sums)
    return torch.empty_like(embeddings)


def _setup_context(ctx, inputs, output):
    (embeddings, labels, slot_ids, num_ids, _max_instances, delta_v, delta_d, norm, alpha, beta, gamma,
     unlabeled_push, ignore_index, normalization, reduction) = inputs
    _var, _dist, _reg, _push, means, counts, hinge_grad_sums, push_grad_sums = output
    ctx.save_for_backward(embeddings, labels, slot_ids, num_ids, means, counts, hinge_grad_sums, push_grad_sums)
    ctx.config = (delta_v, delta_d, norm, alpha, beta, gamma, unlabeled_push, ignore_index, normalization, reduction)
    ctx.mark_non_differentiable(means, counts, hinge_grad_sums, push_grad_sums)


def slot_labels(labels, slot_ids, num_ids, max_instances, ignore_index):
    """Each pixel's slot under the slot map (math.h mapped_slot), -1 for none; int64, shape of labels."""
    B, K = labels.shape[0], max_instances
    lab = labels.reshape(B, -1).long()
    n = num_ids.reshape(B, 1)
    dense = torch.where((lab >= 0) & (lab < K), lab, -1)
    pad = torch.iinfo(torch.int64).max  # keeps each row sorted past its num_ids entries
    table = torch.where(torch.arange(K, device=lab.device) < n, slot_ids, pad)
    pos = torch.searchsorted(table, lab)
    found = (table.gather(1, pos.clamp(max=K - 1)) == lab) & (pos < n)
    slots = torch.where(n < 0, dense, torch.where(found, pos, -1))
    if ignore_index is not None:
        slots = torch.where(lab == ignore_index, -1, slots)
    return slots.reshape(labels.shape)


def _differentiable_gradient(ctx, grads, embeddings, labels, slot_ids, num_ids, max_instances):
    delta_v, delta_d, norm, alpha, beta, gamma, unlabeled_push, ignore_index, normalization, reduction = ctx.config
    if normalization == "paper":
        if slot_ids is None:
            slots = slot_labels(labels, torch.zeros(labels.shape[0], max_instances, dtype=torch.int64,
                                                    device=labels.device),
                                torch.full((labels.shape[0],), -1, device=labels.device), max_instances, ignore_index)
        else:
            slots = slot_labels(labels, slot_ids, num_ids, max_instances, ignore_index)
        ignore = -1
    else:
        slots, ignore = labels, ignore_index
    with torch.enable_grad():
        terms = discriminative_loss_reference(
            embeddings, slots, delta_v, delta_d, norm=norm, alpha=alpha, beta=beta, gamma=gamma,
            ignore_index=ignore, max_instances=max_instances, reduction=reduction, normalization=normalization,
            unlabeled_push=unlabeled_push, second_order=True,
        )
        total = sum((g.to(t.dtype) * t).sum() for g, t in zip(grads, terms))
        (grad,) = torch.autograd.grad(total, embeddings, create_graph=True)
    return grad


def _backward(ctx, grad_var, grad_dist, grad_reg, grad_push, *_grads_of_saved):
    embeddings, labels, slot_ids, num_ids, means, counts, hinge_grad_sums, push_grad_sums = ctx.saved_tensors
    grad = None
    grads = (grad_var, grad_dist, grad_reg, grad_push)
    if ctx.needs_input_grad[0]:
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # create_graph=True: a gradient that is itself differentiable.
            grad = _differentiable_gradient(ctx, grads, embeddings, labels, slot_ids, num_ids, means.shape[1])
        else:
            grad = torch.ops.discloss.backward(
                grad_var, grad_dist, grad_reg, grad_push, embeddings, labels, slot_ids, num_ids, means, counts,
                hinge_grad_sums, push_grad_sums, *ctx.config
            )
    return (grad,) + (None,) * 14


torch.library.register_autograd("discloss::forward", _backward, setup_context=_setup_context)


@torch.library.register_fake("discloss::cluster_parallel")
def _cluster_parallel_fake(points, points_per_image, priority, rank, search_points, density_samples, most_seeds,
                           min_density, mean_shift_steps, max_instances, min_size, neighbour_vote, join_density,
                           bandwidth_sq, merge_sq, delta_v, peak_radius, satellite_ratio, bridge_ratio,
                           ambiguous_ratio, valley_ratio, valley_radius_sq, valley_count_ratio, split_radius_sq=0.0,
                           split_count_ratio=0.3, split_samples=256,
                           split_confidence=0.5, refine_density_sq=0.0, refine_link_sq=0.0, pixel=None, spatial=()):
    _check_devices(points, points_per_image=points_per_image, priority=priority, rank=rank, pixel=pixel)
    B = points_per_image.shape[0]
    return (points.new_empty((points.shape[0],), dtype=torch.int64),
            points.new_empty((B, max_instances), dtype=torch.float32),
            points.new_empty((B,), dtype=torch.int64))
