"""Fake (meta) kernels and autograd for the ops defined in csrc/discloss.cpp.

With these, ``torch.ops.discloss.forward`` is differentiable, traceable by
``torch.compile(fullgraph=True)`` and passes ``torch.library.opcheck``.
"""

import torch

from . import _C  # noqa: F401  (loading the library registers the ops)


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("discloss::slot_map")
def _slot_map_fake(labels, max_instances, ignore_index):
    B = labels.shape[0]
    return (labels.new_empty((B, max_instances), dtype=torch.int64), labels.new_empty((B,), dtype=torch.int64))


@torch.library.register_fake("discloss::forward")
def _forward_fake(embeddings, labels, slot_ids, num_ids, max_instances, delta_v, delta_d, norm, alpha, beta, gamma,
                  unlabeled_push, ignore_index, normalization, reduction):
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
    return torch.empty_like(embeddings)


def _setup_context(ctx, inputs, output):
    (embeddings, labels, slot_ids, num_ids, _max_instances, delta_v, delta_d, norm, alpha, beta, gamma,
     unlabeled_push, ignore_index, normalization, reduction) = inputs
    _var, _dist, _reg, _push, means, counts, hinge_grad_sums, push_grad_sums = output
    ctx.save_for_backward(embeddings, labels, slot_ids, num_ids, means, counts, hinge_grad_sums, push_grad_sums)
    ctx.config = (delta_v, delta_d, norm, alpha, beta, gamma, unlabeled_push, ignore_index, normalization, reduction)
    ctx.mark_non_differentiable(means, counts, hinge_grad_sums, push_grad_sums)


def _backward(ctx, grad_var, grad_dist, grad_reg, grad_push, *_grads_of_saved):
    embeddings, labels, slot_ids, num_ids, means, counts, hinge_grad_sums, push_grad_sums = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = torch.ops.discloss.backward(
            grad_var, grad_dist, grad_reg, grad_push, embeddings, labels, slot_ids, num_ids, means, counts,
            hinge_grad_sums, push_grad_sums, *ctx.config
        )
    return (grad,) + (None,) * 14


torch.library.register_autograd("discloss::forward", _backward, setup_context=_setup_context)
