// Argument parsing, input checks and pixel layouts shared by the CPU and CUDA ops.
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <cmath>

#include "discloss.h"

namespace discloss {

LossConfig make_config(int64_t max_instances, double delta_v, double delta_d, int64_t norm, double alpha,
                       double beta, double gamma, double unlabeled_push, std::optional<int64_t> ignore_index,
                       c10::string_view normalization, c10::string_view reduction) {
  TORCH_CHECK(max_instances >= 1, "max_instances: expected an integer >= 1, got ", max_instances);
  TORCH_CHECK(norm == 1 || norm == 2, "norm: expected 1 or 2, got ", norm);
  TORCH_CHECK(std::isfinite(delta_v) && delta_v >= 0, "delta_v: expected a finite value >= 0, got ", delta_v);
  TORCH_CHECK(std::isfinite(delta_d) && delta_d >= 0, "delta_d: expected a finite value >= 0, got ", delta_d);
  TORCH_CHECK(std::isfinite(alpha) && std::isfinite(beta) && std::isfinite(gamma),
              "alpha, beta, gamma: expected finite weights, got ", alpha, ", ", beta, ", ", gamma);
  TORCH_CHECK(std::isfinite(unlabeled_push) && unlabeled_push >= 0,
              "unlabeled_push: expected a finite weight >= 0, got ", unlabeled_push);
  TORCH_CHECK(unlabeled_push == 0 || ignore_index.has_value(),
              "unlabeled_push: the unlabeled pixels are those labelled ignore_index, which is None");
  LossConfig c{};
  c.num_slots = max_instances;
  c.unlabeled_push = unlabeled_push;
  c.delta_v = delta_v;
  c.delta_d = delta_d;
  c.norm = static_cast<int>(norm);
  c.alpha = alpha;
  c.beta = beta;
  c.gamma = gamma;
  c.has_ignore = ignore_index.has_value();
  c.ignore_index = ignore_index.value_or(0);
  if (normalization == "paper") {
    c.normalization = Normalization::Paper;
  } else if (normalization == "chainer") {
    c.normalization = Normalization::Chainer;
  } else {
    TORCH_CHECK(false, "normalization: expected 'paper' or 'chainer', got '", std::string(normalization), "'");
  }
  if (reduction == "mean") {
    c.reduction = Reduction::Mean;
  } else if (reduction == "sum") {
    c.reduction = Reduction::Sum;
  } else if (reduction == "none") {
    c.reduction = Reduction::None;
  } else {
    TORCH_CHECK(false, "reduction: expected 'mean', 'sum' or 'none', got '", std::string(reduction), "'");
  }
  TORCH_CHECK(c.normalization == Normalization::Paper || unlabeled_push == 0,
              "unlabeled_push: not defined for the chainer normalization; expected 0, got ", unlabeled_push);
  TORCH_CHECK(c.normalization == Normalization::Paper || c.reduction == Reduction::Mean,
              "reduction: the chainer normalization returns batch-level terms; expected 'mean', got '",
              std::string(reduction), "'");
  return c;
}

static bool is_label_type(at::ScalarType t) {
  return t == at::kByte || t == at::kChar || t == at::kShort || t == at::kInt || t == at::kLong;
}

void check_slot_map_inputs(const at::Tensor& labels, int64_t max_instances) {
  TORCH_CHECK(max_instances >= 1, "max_instances: expected an integer >= 1, got ", max_instances);
  TORCH_CHECK(is_label_type(labels.scalar_type()), "labels: expected uint8, int8, int16, int32 or int64, got ",
              labels.scalar_type());
  TORCH_CHECK(labels.dim() >= 1, "labels: expected shape (B, *spatial), got a 0-dim tensor");
}

void check_forward_inputs(const at::Tensor& embeddings, const at::Tensor& labels,
                          const std::optional<at::Tensor>& slot_ids, const std::optional<at::Tensor>& num_ids,
                          const LossConfig& c) {
  const auto t = embeddings.scalar_type();
  TORCH_CHECK(t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble,
              "embeddings: expected float16, bfloat16, float32 or float64, got ", t);
  TORCH_CHECK(embeddings.dim() >= 3,
              "embeddings: expected shape (B, E, *spatial) with at least one spatial dim, got ", embeddings.sizes());
  TORCH_CHECK(embeddings.size(1) >= 1, "embeddings: expected an embedding dim E >= 1, got shape ",
              embeddings.sizes());
  TORCH_CHECK(is_label_type(labels.scalar_type()), "labels: expected uint8, int8, int16, int32 or int64, got ",
              labels.scalar_type());
  TORCH_CHECK(labels.dim() == embeddings.dim() - 1 && labels.size(0) == embeddings.size(0) &&
                  labels.sizes().slice(1) == embeddings.sizes().slice(2),
              "labels: expected shape (B, *spatial) = ", embeddings.size(0), " x ", embeddings.sizes().slice(2),
              " to match embeddings ", embeddings.sizes(), ", got ", labels.sizes());
  TORCH_CHECK(labels.device() == embeddings.device(), "labels: expected the device of embeddings (",
              embeddings.device(), "), got ", labels.device());
  TORCH_CHECK(slot_ids.has_value() == num_ids.has_value(),
              "slot_ids, num_ids: expected both (from discloss::slot_map) or neither");
  if (slot_ids.has_value()) {
    const int64_t B = embeddings.size(0), K = c.num_slots;
    TORCH_CHECK(c.normalization == Normalization::Paper,
                "slot_ids: the chainer normalization has fixed slots (labels 1..K); expected None");
    TORCH_CHECK(slot_ids->scalar_type() == at::kLong && slot_ids->sizes() == at::IntArrayRef({B, K}),
                "slot_ids: expected int64 of shape (", B, ", ", K, "), got ", slot_ids->scalar_type(), " ",
                slot_ids->sizes());
    TORCH_CHECK(num_ids->scalar_type() == at::kLong && num_ids->sizes() == at::IntArrayRef({B}),
                "num_ids: expected int64 of shape (", B, "), got ", num_ids->scalar_type(), " ", num_ids->sizes());
    TORCH_CHECK(slot_ids->device() == embeddings.device(), "slot_ids: expected the device of embeddings (",
                embeddings.device(), "), got ", slot_ids->device());
    TORCH_CHECK(num_ids->device() == embeddings.device(), "num_ids: expected the device of embeddings (",
                embeddings.device(), "), got ", num_ids->device());
  }
}

void check_slot_memory(const LossConfig& c, int64_t batch, int64_t embed_dim, int64_t acc_size,
                       double device_bytes, const char* device) {
  // means, hinge sums, partials and (push) push sums: about 4 tensors of
  // B x K x E accumulators; the check is for a K that cannot work at all.
  // An empty batch counts as one image, so that a K too large for any image
  // is refused there too: the shapes (B, K + 1) and the products of K and E
  // that size the partials then stay far from int64 overflow.
  const double need = 4.0 * double(std::max<int64_t>(batch, 1)) * double(c.num_slots) * double(embed_dim + 1) *
                      double(acc_size);
  TORCH_CHECK(device_bytes <= 0 || need <= device_bytes, "max_instances: ", c.num_slots, " slots need about ",
              need / double(1 << 30), " GiB of per-slot tensors (4 x B x K x (E+1) accumulators with B=", batch,
              ", E=", embed_dim, "), more than the ", device_bytes / double(1 << 30), " GiB of ", device,
              " memory; max_instances is the most clusters one image may hold, not the largest id");
}

void check_backward_inputs(const at::Tensor& grad_var, const at::Tensor& grad_dist, const at::Tensor& grad_reg,
                           const at::Tensor& grad_push, const at::Tensor& embeddings, const at::Tensor& labels,
                           const std::optional<at::Tensor>& slot_ids, const std::optional<at::Tensor>& num_ids,
                           const at::Tensor& means, const at::Tensor& counts, const at::Tensor& hinge_grad_sums,
                           const at::Tensor& push_grad_sums, const LossConfig& c) {
  check_forward_inputs(embeddings, labels, slot_ids, num_ids, c);
  const int64_t B = embeddings.size(0), E = embeddings.size(1), K = c.num_slots;
  const auto acc = accumulate_type(embeddings.scalar_type());
  TORCH_CHECK(means.sizes() == at::IntArrayRef({B, K, E}) && means.scalar_type() == acc,
              "means: expected ", acc, " of shape (", B, ", ", K, ", ", E, "), got ", means.scalar_type(), " ",
              means.sizes());
  TORCH_CHECK(hinge_grad_sums.sizes() == means.sizes() && hinge_grad_sums.scalar_type() == acc,
              "hinge_grad_sums: expected ", acc, " of shape ", means.sizes(), ", got ", hinge_grad_sums.scalar_type(),
              " ", hinge_grad_sums.sizes());
  const int64_t P = push_rows(c);
  TORCH_CHECK(push_grad_sums.sizes() == at::IntArrayRef({B, P, E}) && push_grad_sums.scalar_type() == acc,
              "push_grad_sums: expected ", acc, " of shape (", B, ", ", P, ", ", E, "), got ",
              push_grad_sums.scalar_type(), " ", push_grad_sums.sizes());
  TORCH_CHECK(counts.sizes() == at::IntArrayRef({B, K + 1}) && counts.scalar_type() == at::kLong,
              "counts: expected int64 of shape (", B, ", ", K + 1, "), got ", counts.scalar_type(), " ",
              counts.sizes());
  const auto shape = term_shape(c, B);
  const std::pair<const char*, const at::Tensor*> grads[] = {
      {"grad_var", &grad_var}, {"grad_dist", &grad_dist}, {"grad_reg", &grad_reg}, {"grad_push", &grad_push}};
  for (const auto& g : grads) {
    TORCH_CHECK(g.second->sizes() == at::IntArrayRef(shape), g.first, ": expected shape ", at::IntArrayRef(shape),
                ", got ", g.second->sizes());
    TORCH_CHECK(g.second->is_floating_point(), g.first, ": expected a floating point tensor, got ",
                g.second->scalar_type());
  }
  const std::pair<const char*, const at::Tensor*> saved[] = {
      {"means", &means},         {"counts", &counts},       {"hinge_grad_sums", &hinge_grad_sums},
      {"push_grad_sums", &push_grad_sums}, {"grad_var", &grad_var}, {"grad_dist", &grad_dist},
      {"grad_reg", &grad_reg},   {"grad_push", &grad_push}};
  for (const auto& t : saved) {
    TORCH_CHECK(t.second->device() == embeddings.device(), t.first, ": expected the device of embeddings (",
                embeddings.device(), "), got ", t.second->device());
  }
}

void check_slot_map_values(const at::Tensor& slot_ids, const at::Tensor& num_ids, int64_t K) {
  const int64_t B = num_ids.size(0);
  const int64_t* ids = slot_ids.data_ptr<int64_t>();
  const int64_t* n = num_ids.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(n[b] >= -1 && n[b] <= K, "num_ids: expected -1 (the identity map) or a count in [0, max_instances=",
                K, "] per image, got num_ids[", b, "] = ", n[b], " (slot_ids and num_ids come from slot_map)");
    const int64_t* row = ids + b * K;
    for (int64_t i = 1; i < n[b]; ++i) {
      TORCH_CHECK(row[i - 1] < row[i], "slot_ids: expected each row's first num_ids[b] ids sorted and distinct, got ",
                  "slot_ids[", b, ", ", i - 1, "] = ", row[i - 1], " and slot_ids[", b, ", ", i, "] = ", row[i],
                  " (slot_ids and num_ids come from slot_map)");
    }
  }
}

void check_counts_values(const at::Tensor& counts, int64_t num_pixels) {
  const int64_t B = counts.size(0), cols = counts.size(1);
  const int64_t* p = counts.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    int64_t total = 0;
    for (int64_t k = 0; k < cols; ++k) {
      const int64_t v = p[b * cols + k];
      // total <= num_pixels before the addition and v <= num_pixels: no overflow.
      TORCH_CHECK(v >= 0 && v <= num_pixels - total, "counts: expected the pixel counts of forward (each >= 0, ",
                  "at most ", num_pixels, " pixels per image in all), got counts[", b, ", ", k, "] = ", v,
                  " after ", total, " counted in that image");
      total += v;
    }
  }
}

at::ScalarType accumulate_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::vector<int64_t> term_shape(const LossConfig& c, int64_t batch) {
  if (c.reduction == Reduction::None) return {batch};
  return {};
}

namespace {
struct Dim {
  int64_t size, x, label, grad;
};
}  // namespace

bool make_pixel_layout(const at::Tensor& embeddings, const at::Tensor& labels, const at::Tensor* grad,
                       PixelLayout* L) {
  *L = PixelLayout{};
  L->batch = embeddings.size(0);
  L->embed_dim = embeddings.size(1);
  L->x_batch_stride = embeddings.stride(0);
  L->x_embed_stride = embeddings.stride(1);
  L->label_batch_stride = labels.stride(0);
  L->grad_batch_stride = grad ? grad->stride(0) : 0;
  L->grad_embed_stride = grad ? grad->stride(1) : 0;
  L->num_pixels = 1;
  for (int64_t d = 2; d < embeddings.dim(); ++d) L->num_pixels *= embeddings.size(d);

  c10::SmallVector<Dim, kMaxSpatialDims> dims;
  if (L->num_pixels > 0) {
    for (int64_t d = 2; d < embeddings.dim(); ++d) {
      if (embeddings.size(d) == 1) continue;
      Dim cur{embeddings.size(d), embeddings.stride(d), labels.stride(d - 1), grad ? grad->stride(d) : 0};
      // Merge into the previous (outer) dim when stepping over the outer dim
      // is the same as stepping over the whole inner dim, for every operand.
      if (!dims.empty()) {
        Dim& outer = dims.back();
        if (outer.x == cur.x * cur.size && outer.label == cur.label * cur.size && outer.grad == cur.grad * cur.size) {
          outer = Dim{outer.size * cur.size, cur.x, cur.label, cur.grad};
          continue;
        }
      }
      dims.push_back(cur);
    }
  }
  if (dims.empty()) dims.push_back(Dim{L->num_pixels, 1, 1, 1});  // one pixel, or none
  if (dims.size() > static_cast<size_t>(kMaxSpatialDims)) return false;
  L->ndim = static_cast<int>(dims.size());
  for (int d = 0; d < L->ndim; ++d) {
    L->sizes[d] = dims[d].size;
    L->x_strides[d] = dims[d].x;
    L->label_strides[d] = dims[d].label;
    L->grad_strides[d] = dims[d].grad;
  }
  return true;
}

KernelInputs kernel_inputs(const at::Tensor& embeddings, const at::Tensor& labels, bool with_grad) {
  KernelInputs in{embeddings, labels, with_grad ? at::empty_like(embeddings) : at::Tensor(), PixelLayout{}};
  if (!make_pixel_layout(in.x, in.labels, with_grad ? &in.grad : nullptr, &in.layout)) {
    in.x = in.x.contiguous();
    in.labels = in.labels.contiguous();
    if (with_grad) in.grad = at::empty_like(in.x);
    make_pixel_layout(in.x, in.labels, with_grad ? &in.grad : nullptr, &in.layout);
  }
  return in;
}

}  // namespace discloss
