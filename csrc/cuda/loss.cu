// discloss::forward and discloss::backward on CUDA (DESIGN §3).
//
// Launches, in stream order (no host synchronisation anywhere: every size
// depends on shapes only, so forward and backward can be captured in a CUDA
// graph):
//
//   forward   [zero fills]  first_pixel_kernel  gather_pivots_kernel
//             pass 1 slot_sums_kernel<sums>  [finish_means_kernel]
//             [compact_present_kernel]  pass 2 slot_sums_kernel<hinge>
//             [sum_partials_kernel x2]  [pass 2b unlabeled_push_kernel
//             [sum_partials_kernel x2]]  [pair_far_kernel]
//             finalize_forward_kernel
//   backward  [compact_present_kernel  pair_far_kernel]
//             slot_coefficients_kernel  write_grad_kernel
//
// Bracketed launches depend on the path (sums.cu), the normalisation and the
// unlabeled push; compaction of the clusters present is for the paper
// normalisation only, and so is pair_far_kernel (a per-image bound where the
// pair loops may stop a pair's distance early; finalize.cu). Compaction is
// its own small launch (one block per image, an ordered block scan over the
// K counts) because the push sums and every block of the finalize need its
// image's list, and a grid-wide barrier inside one launch would need a
// cooperative launch.
// A training step reads the embeddings three times (pass 1, pass 2, pass 3)
// and writes the gradient once; the unlabeled push (off by default) adds a
// read of the labels and of the unlabeled pixels' x (pass 2b, its own
// deterministic kernel rather than a part of pass 2: simpler, and the same
// result in any mode). Everything per slot is O(B*K*E).
//
// One file per step: plan.cuh (paths and grids, from the shapes), sums.cu
// (passes 1 and 2), push.cu (pass 2b), finalize.cu (compaction, finalize),
// backward.cu (coefficients, pass 3); common.cuh holds what their kernels
// share and runtime.cuh is the seam to the CUDA runtime (or the simulator).
// This file checks the inputs, allocates the outputs and calls the steps.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include "passes.h"

namespace discloss {
namespace cuda {
namespace {

void check_slots(const LossConfig& c) {
  TORCH_CHECK(c.num_slots <= kMaxSlots, "max_instances: the CUDA kernels support at most ", kMaxSlots,
              " slots, got ", c.num_slots);
}
// The slot map of the op's optional slot_ids / num_ids (contiguous), or none.
struct SlotMapTensors {
  at::Tensor ids, nids;
  SlotMapArgs args() const {
    return {ids.defined() ? ids.data_ptr<int64_t>() : nullptr, nids.defined() ? nids.data_ptr<int64_t>() : nullptr};
  }
};

SlotMapTensors slot_map_tensors(const std::optional<at::Tensor>& slot_ids, const std::optional<at::Tensor>& num_ids) {
  SlotMapTensors m;
  if (slot_ids.has_value()) {
    m.ids = slot_ids->contiguous();
    m.nids = num_ids->contiguous();
  }
  return m;
}
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
forward_cuda(const at::Tensor& embeddings, const at::Tensor& labels, const std::optional<at::Tensor>& slot_ids,
             const std::optional<at::Tensor>& num_ids, int64_t max_instances, double delta_v, double delta_d,
             int64_t norm, double alpha, double beta, double gamma, double unlabeled_push,
             std::optional<int64_t> ignore_index, c10::string_view normalization, c10::string_view reduction) {
  const LossConfig c = make_config(max_instances, delta_v, delta_d, norm, alpha, beta, gamma, unlabeled_push,
                                   ignore_index, normalization, reduction);
  check_forward_inputs(embeddings, labels, slot_ids, num_ids, c);
  check_slots(c);
  const DeviceGuard guard(embeddings.device());
  check_slot_memory(c, embeddings.size(0), embeddings.size(1),
                    static_cast<int64_t>(c10::elementSize(accumulate_type(embeddings.scalar_type()))),
                    device_memory_bytes(), "CUDA device");
  cudaStream_t stream = current_stream();
  const KernelInputs in = kernel_inputs(embeddings, labels, /*with_grad=*/false);
  const at::Tensor &x = in.x, &lab = in.labels;
  const PixelLayout& L = in.layout;
  const int64_t B = L.batch, E = L.embed_dim, K = c.num_slots, N = L.num_pixels;
  const auto acc_type = accumulate_type(x.scalar_type());
  const auto acc_opts = x.options().dtype(acc_type);
  const auto shape = term_shape(c, B);
  const bool paper = c.normalization == Normalization::Paper;
  const bool with_push = c.unlabeled_push > 0;
  at::Tensor var = at::empty(shape, x.options()), dist = at::empty(shape, x.options()),
             reg = at::empty(shape, x.options()), push = at::empty(shape, x.options());
  at::Tensor means = at::empty({B, K, E}, acc_opts);
  // counts[:, K] (unlabeled pixels) is added to by pass 1's atomics; the
  // other columns are overwritten on every path. Zeroed whole: small.
  at::Tensor counts = at::zeros({B, K + 1}, x.options().dtype(at::kLong));
  at::Tensor hinge_grad = at::empty({B, K, E}, acc_opts);
  at::Tensor push_grad = at::zeros({B, push_rows(c), E}, acc_opts);
  at::Tensor hinge = at::empty({B, K}, acc_opts);
  if (paper && B == 0) {  // no image: the terms are empty (none) or 0
    var.zero_();
    dist.zero_();
    reg.zero_();
    push.zero_();
    return {var, dist, reg, push, means, counts, hinge_grad, push_grad};
  }
  const SlotMapTensors map_t = slot_map_tensors(slot_ids, num_ids);
  const SlotMapArgs map = map_t.args();
  // The unlabeled pixels (label == ignore_index) are counted in pass 1 (paper).
  int64_t* unlabeled_out = paper && c.has_ignore ? counts.data_ptr<int64_t>() + K : nullptr;

  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const SumsPlan plan0 = plan_slot_sums(L, K, static_cast<int64_t>(c10::elementSize(acc_type)), deterministic);
  SumsPlan plan = plan0;
  plan.vec = vector_loads_ok(plan0, L, x);
  const bool have_pixels = B > 0 && N > 0;

  // pass 1
  at::Tensor part_sums;
  if (have_pixels) {
    part_sums = slot_means(x, lab, L, c, plan, map, unlabeled_out, means, counts, stream);
  } else {
    means.zero_();
  }
  // The clusters present (paper): needed by the push sums and the finalize.
  const auto present = compact_present(counts, c, B, stream);
  // pass 2
  if (have_pixels) {
    hinge_sums(x, lab, L, c, plan, map, means, hinge_grad, hinge, part_sums, stream);
  } else {
    hinge_grad.zero_();
    hinge.zero_();
  }
  // pass 2b: the unlabeled push's sums over the unlabeled pixels
  at::Tensor push_sums;
  if (with_push) {
    push_sums = at::zeros({B, K}, acc_opts);
    if (have_pixels) unlabeled_push_sums(x, lab, L, c, means, present, push_sums, push_grad, stream);
  }
  finalize_forward(c, B, E, means, counts, hinge, push_sums, present, var, dist, reg, push, stream);
  return {var, dist, reg, push, means, counts, hinge_grad, push_grad};
}

at::Tensor backward_cuda(const at::Tensor& grad_var, const at::Tensor& grad_dist, const at::Tensor& grad_reg,
                         const at::Tensor& grad_push, const at::Tensor& embeddings, const at::Tensor& labels,
                         const std::optional<at::Tensor>& slot_ids, const std::optional<at::Tensor>& num_ids,
                         const at::Tensor& means, const at::Tensor& counts, const at::Tensor& hinge_grad_sums,
                         const at::Tensor& push_grad_sums, double delta_v, double delta_d, int64_t norm, double alpha,
                         double beta, double gamma, double unlabeled_push, std::optional<int64_t> ignore_index,
                         c10::string_view normalization, c10::string_view reduction) {
  // K from counts (B, K + 1); check_backward_inputs checks every other shape against it.
  const LossConfig c = make_config(counts.dim() == 2 ? std::max<int64_t>(counts.size(1) - 1, 1) : 1, delta_v,
                                   delta_d, norm, alpha, beta, gamma, unlabeled_push, ignore_index, normalization,
                                   reduction);
  check_backward_inputs(grad_var, grad_dist, grad_reg, grad_push, embeddings, labels, slot_ids, num_ids, means,
                        counts, hinge_grad_sums, push_grad_sums, c);
  check_slots(c);
  const DeviceGuard guard(embeddings.device());
  cudaStream_t stream = current_stream();
  const KernelInputs in = kernel_inputs(embeddings, labels, /*with_grad=*/true);
  const at::Tensor &x = in.x, &lab = in.labels, &grad = in.grad;
  const PixelLayout& L = in.layout;
  if (x.numel() == 0) return grad;
  const auto acc_type = accumulate_type(x.scalar_type());
  at::Tensor gv = grad_var.to(acc_type).contiguous(), gd = grad_dist.to(acc_type).contiguous(),
             gr = grad_reg.to(acc_type).contiguous(), gp = grad_push.to(acc_type).contiguous();
  at::Tensor means_c = means.contiguous(), counts_c = counts.contiguous(), hg = hinge_grad_sums.contiguous(),
             pg = push_grad_sums.contiguous();
  const SlotMapTensors map_t = slot_map_tensors(slot_ids, num_ids);
  const SlotMapArgs map = map_t.args();

  at::Tensor grad_out = grad;
  write_gradient(x, lab, grad_out, L, c, map, gv, gd, gr, gp, means_c, counts_c, hg, pg, stream);
  return grad;
}
}  // namespace
}  // namespace cuda

DISCLOSS_REGISTER_KERNELS(m) {
  m.impl("forward", &cuda::forward_cuda);
  m.impl("backward", &cuda::backward_cuda);
}

}  // namespace discloss
