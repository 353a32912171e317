// The launchers of the CUDA op's passes, one file each (DESIGN §3), called in
// stream order by loss.cu. Each dispatches on the embeddings' dtype (and the
// labels') itself; none synchronises with the host.
#pragma once

#include <ATen/ATen.h>

#include <utility>

#include "plan.cuh"

namespace discloss {
namespace cuda {

// sums.cu, pass 1: means (B, K, E) = each slot's pivot + (sum of x - pivot) /
// count and counts[:, :K] (B, K + 1); adds the unlabeled pixels to
// unlabeled_out[b * (K + 1)] when not null. Returns the per-chunk partial
// sums (chunks, B, K, E) on the partial path (pass 2 reuses them), else an
// undefined tensor.
at::Tensor slot_means(const at::Tensor& x, const at::Tensor& lab, const PixelLayout& L, const LossConfig& c,
                      const SumsPlan& plan, const SlotMapArgs& map, int64_t* unlabeled_out, at::Tensor& means,
                      at::Tensor& counts, cudaStream_t stream);

// sums.cu, pass 2: per slot, hinge (B, K) = sum of h^2 and hinge_grad
// (B, K, E) = sum of d(h^2)/dx. part_sums: slot_means' partials.
void hinge_sums(const at::Tensor& x, const at::Tensor& lab, const PixelLayout& L, const LossConfig& c,
                const SumsPlan& plan, const SlotMapArgs& map, const at::Tensor& means, at::Tensor& hinge_grad,
                at::Tensor& hinge, const at::Tensor& part_sums, cudaStream_t stream);

// sums.cu: out = the sum over chunks, in chunk order, of part (chunks, *out).
void sum_partials(const at::Tensor& part, int64_t chunks, at::Tensor& out, cudaStream_t stream);

// push.cu, pass 2b: the unlabeled push's sums over the unlabeled pixels, per
// cluster present: push_sums (B, K) of q^2 and push_grad (B, K, E) of
// d(q^2)/dx (both zeroed by the caller).
void unlabeled_push_sums(const at::Tensor& x, const at::Tensor& lab, const PixelLayout& L, const LossConfig& c,
                         const at::Tensor& means, const std::pair<at::Tensor, at::Tensor>& present,
                         at::Tensor& push_sums, at::Tensor& push_grad, cudaStream_t stream);

// finalize.cu: the clusters present, (present (B, K) int32, num_present (B,))
// for the paper normalisation; empty tensors for chainer.
std::pair<at::Tensor, at::Tensor> compact_present(const at::Tensor& counts, const LossConfig& c, int64_t B,
                                                  cudaStream_t stream);

// finalize.cu: far (B,), where the pair loops may stop a pair's distance
// (math.h pair_far_bound; NaN for an image with a non-finite mean), for the
// paper normalisation with pruning on; undefined otherwise (no early exit).
at::Tensor pair_far_bounds(const LossConfig& c, int64_t B, int64_t E, const at::Tensor& means,
                           const std::pair<at::Tensor, at::Tensor>& present, cudaStream_t stream);

// finalize.cu: the weighted, reduced terms var, dist, reg, push (push_sums
// undefined without the push).
void finalize_forward(const LossConfig& c, int64_t B, int64_t E, const at::Tensor& means, const at::Tensor& counts,
                      const at::Tensor& hinge, const at::Tensor& push_sums,
                      const std::pair<at::Tensor, at::Tensor>& present, at::Tensor& var, at::Tensor& dist,
                      at::Tensor& reg, at::Tensor& push, cudaStream_t stream);

// backward.cu: the per-slot coefficients, then pass 3 writes grad (g* are the
// four terms' incoming gradients in the accumulation type).
void write_gradient(const at::Tensor& x, const at::Tensor& lab, at::Tensor& grad, const PixelLayout& L,
                    const LossConfig& c, const SlotMapArgs& map, const at::Tensor& gv, const at::Tensor& gd,
                    const at::Tensor& gr, const at::Tensor& gp, const at::Tensor& means, const at::Tensor& counts,
                    const at::Tensor& hinge_grad, const at::Tensor& push_grad, cudaStream_t stream);

}  // namespace cuda
}  // namespace discloss
