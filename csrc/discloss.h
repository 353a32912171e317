// What the CPU and CUDA implementations of the ops share on the torch side:
// parsing the op arguments into a LossConfig, checking inputs (each error
// names the argument), the pixel layout and the output shapes.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "layout.h"
#include "math.h"

namespace discloss {

LossConfig make_config(int64_t max_instances, double delta_v, double delta_d, int64_t norm, double alpha,
                       double beta, double gamma, double unlabeled_push, std::optional<int64_t> ignore_index,
                       c10::string_view normalization, c10::string_view reduction);

// Shapes, dtypes and devices of the forward inputs (and of the slot map when
// given). Label values are data: the CPU kernels check them, the Python
// wrapper checks CUDA ones. Also refuses a max_instances whose per-slot
// tensors could not fit in memory, before anything is allocated.
void check_forward_inputs(const at::Tensor& embeddings, const at::Tensor& labels,
                          const std::optional<at::Tensor>& slot_ids, const std::optional<at::Tensor>& num_ids,
                          const LossConfig& c);

// The forward inputs again, and the saved tensors and grads of backward.
void check_backward_inputs(const at::Tensor& grad_var, const at::Tensor& grad_dist, const at::Tensor& grad_reg,
                           const at::Tensor& grad_push, const at::Tensor& embeddings, const at::Tensor& labels,
                           const std::optional<at::Tensor>& slot_ids, const std::optional<at::Tensor>& num_ids,
                           const at::Tensor& means, const at::Tensor& counts, const at::Tensor& hinge_grad_sums,
                           const at::Tensor& push_grad_sums, const LossConfig& c);

// The values of a slot map on the host (CPU ops; the CUDA kernels clamp
// instead, without a synchronisation): each num_ids[b] is -1 (the identity)
// or a count in [0, K], and slot_ids[b, 0 .. num_ids[b]) strictly increases,
// which is what the binary search of math.h mapped_slot needs to stay in its
// row and to find each id once. O(B K), before any pass over the pixels;
// that every label is in its row is checked by the passes themselves.
// slot_ids (B, K) and num_ids (B,) int64, contiguous, on the CPU.
void check_slot_map_values(const at::Tensor& slot_ids, const at::Tensor& num_ids, int64_t K);

// The counts given to backward, on the host (CPU op): every count in
// [0, num_pixels] and each image's row summing to at most num_pixels, as
// forward's do, so that no sum of counts can overflow. counts (B, K + 1)
// int64, contiguous, on the CPU.
void check_counts_values(const at::Tensor& counts, int64_t num_pixels);

// Refuses (naming max_instances) per-slot tensors larger than the memory of
// the device (device_bytes; <= 0: unknown), before anything is allocated.
void check_slot_memory(const LossConfig& c, int64_t batch, int64_t embed_dim, int64_t acc_size,
                       double device_bytes, const char* device);

// labels of slot_map: an integer tensor (B, *spatial); max_instances >= 1.
void check_slot_map_inputs(const at::Tensor& labels, int64_t max_instances);

// Calls fn(label_t{}) with the C++ type of an integer label dtype.
template <typename Fn>
void dispatch_label_type(at::ScalarType t, Fn&& fn) {
  switch (t) {
    case at::kByte: return fn(uint8_t{});
    case at::kChar: return fn(int8_t{});
    case at::kShort: return fn(int16_t{});
    case at::kInt: return fn(int32_t{});
    case at::kLong: return fn(int64_t{});
    default: TORCH_CHECK(false, "labels: expected uint8, int8, int16, int32 or int64, got ", t);
  }
}

// Rows of push_grad_sums: K with the unlabeled push, 0 without.
inline int64_t push_rows(const LossConfig& c) { return c.unlabeled_push > 0 ? c.num_slots : 0; }

// Fills *layout for embeddings, labels and (backward) grad. Returns false when
// the strides leave more than kMaxSpatialDims spatial dims after coalescing;
// the caller then makes the inputs contiguous and asks again.
bool make_pixel_layout(const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor* grad,
                       PixelLayout* layout);

// What the kernels read (x, labels) and write (grad, backward only), with
// their layout: the given tensors when a PixelLayout can describe their
// strides, contiguous copies otherwise. grad is allocated like x.
struct KernelInputs {
  at::Tensor x, labels, grad;
  PixelLayout layout;
};
KernelInputs kernel_inputs(const at::Tensor& embeddings, const at::Tensor& labels, bool with_grad);

// float for float16/bfloat16/float32 embeddings, double for float64.
at::ScalarType accumulate_type(at::ScalarType embeddings_type);

// Shape of each returned term: (B,) for reduction "none", () otherwise.
std::vector<int64_t> term_shape(const LossConfig& c, int64_t batch);

}  // namespace discloss
