// The interface between loss.cpp (torch side) and the per-instruction-set
// copies of the chunk kernels (kernels.h). Plain types only.
#pragma once

#include <cstdint>

#include "../layout.h"
#include "../math.h"

namespace discloss {
namespace cpu {

// Storage of the 16-bit float types, converted by hand in kernels.h.
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

enum class ScalarKind { Half, BFloat16, Float, Double };
enum class LabelKind { UInt8, Int8, Int16, Int32, Int64 };

// First label found outside what the paper mode accepts.
struct BadLabel {
  bool found;
  int64_t value;
};

// One chunk [begin, end) of the pixels of one image. The per-slot arrays are
// those of this image (sums, counts, hinge, hinge_grad, push, push_grad: this
// chunk's private partials; means, var_coef, mean_coef: the image's finished
// values), all K x E (or K) row-major in the accumulation type: float,
// double for double.
struct ChunkArgs {
  const PixelLayout* layout;
  const LossConfig* config;
  const void* x;
  const void* labels;
  LabelKind label_kind;
  void* grad;
  int64_t image, begin, end;
  void* sums;     // pass 1: sums of x - pivot
  void* pivots;   // pass 1: per slot, its first pixel in the chunk (K x E)
  int64_t* counts;
  BadLabel* bad;
  const void* means;
  void* hinge;
  void* hinge_grad;
  const void* var_coef;
  const void* mean_coef;
  // Slot map of the image (math.h mapped_slot): null for none (labels are
  // the slots, checked), num_ids < 0 for the identity.
  const int64_t* slot_ids;
  int64_t num_ids;
  // Unlabeled push (DESIGN §1), off when push is null (pass 2) or
  // push_coef is null (pass 3): the image's clusters present, the partial
  // sums of q^2 (K) and of d(q^2)/dx (K x E) over the unlabeled pixels, and
  // the per-image coefficient of d(q^2)/dx in the gradient (pass 3).
  const int64_t* present;
  int64_t num_present;
  int64_t* unlabeled;  // pass 1: count of pixels labelled ignore_index (paper)
  void* push;
  void* push_grad;
  const void* push_coef;
  // With the push, the chunk's scratch of push_scratch_elems values of the
  // accumulation type (kernels.h).
  void* push_scratch;
  // 16-bit types, passes 2 and 3: the stages' differences, kStageScratch
  // floats (kernels.h, stages of runs).
  float* stage_scratch;
};

// The stages' scratch (kernels.h: kStageValues plus a line per row).
constexpr int64_t kStageScratch = 32768 + 16 * 64;

// Unlabeled pixels gathered at a time for the push (kernels.h), and the
// row stride of their E components: 16 times an odd number, so that the
// rows of one column fall in different L1 sets.
constexpr int64_t kPushBlock = 512;
constexpr int64_t kPushStride = kPushBlock + 16;

// The push's scratch: the gathered pixels U (E x kPushStride), their
// squared norms and norms (2 x kPushStride), the means' squared norms and
// norms (2 x K), a centre (E), a flag and an index per cluster (2 x K, as
// int32), the means by component (E x K) and a sum per cluster (K), and in
// pass 3 the gradient accumulators (E x kPushStride), then a block's
// coefficients (K x kPushCoefLanes) and its clusters' means by component
// (E x K).
constexpr int64_t kPushCoefLanes = 16;  // kPushLanes of float, the most of any type
constexpr int64_t push_scratch_elems(int64_t E, int64_t K, bool pass3) {
  return (E + 2) * kPushStride + 5 * K + E + E * K + (pass3 ? E * kPushStride + K * kPushCoefLanes + E * K : 0);
}

// The pair step of dist under L2 (paper mode) for one image: its present
// clusters' means, also transposed (E rows of C, for vector lanes across
// clusters), all in the accumulation type.
struct PairArgs {
  const void* means;         // the image's K x E means
  const int64_t* present;    // its C present slots (ascending, or by the first component of their means)
  int64_t num_present;       // C
  const void* transposed;    // E rows: transposed[e * stride + i] = means[present[i] * E + e]
  int64_t stride;            // >= C; 16 times an odd number: the E rows fall in different L1 sets
  int64_t embed_dim;
  double delta_d;
  // Null: every pair. Else row i meets only columns [window_lo[i],
  // window_hi[i]): the others are farther than 2 delta_d apart in their
  // first component (present is then sorted by it), so their hinge is 0.
  const int64_t* window_lo;
  const int64_t* window_hi;
};

// Rows of the pair step per call of pair_rows (kernels.h).
constexpr int64_t kPairRows = 16;
// Columns one row meets at a time (one L1-sized block of the transposed
// means), and the side of pair_grads' tiles.
constexpr int64_t kPairBlock = 128;

struct ChunkKernels {
  void (*cluster_sums)(const ChunkArgs&);  // pass 1
  void (*hinge_sums)(const ChunkArgs&);    // pass 2
  void (*write_grad)(const ChunkArgs&);    // pass 3
  // pair_rows: rows [i0, i1) of the present clusters, i1 - i0 <= kPairRows,
  // i0 a multiple of it: out[i - i0] = sum over j > i of p_ij^2.
  // pair_grads: the tile of rows [i0, i1) and columns [j0, j1), each at
  // most kPairBlock long, rows before columns or the two the same: for each
  // pair i < j of it, grads[i * E + e] += scale * d(p_ij^2)/dmu_i[e] and
  // grads[j * E + e] += scale * d(p_ij^2)/dmu_j[e] (rows in the plan's
  // order); scratch holds E * kPairBlock values. Accumulation type throughout.
  void (*pair_rows)(const PairArgs&, int64_t i0, int64_t i1, void* out);
  void (*pair_grads)(const PairArgs&, int64_t i0, int64_t i1, int64_t j0, int64_t j1, double scale, void* grads,
                     void* scratch);
  // The slot map's first look at an image (loss.cpp slot_map_cpu): nonzero
  // when one of its n labels (stride apart) is neither in [0, K) nor
  // ignore_index, i.e. the identity map does not serve. Here and not in
  // loss.cpp so that it is compiled per ISA: the baseline one has no 64-bit
  // vector compare.
  int64_t (*labels_outside_identity)(const void* labels, LabelKind kind, int64_t n, int64_t stride,
                                     const LossConfig& c);
};

namespace generic {
ChunkKernels chunk_kernels(ScalarKind kind);
}
namespace avx2 {
ChunkKernels chunk_kernels(ScalarKind kind);
}
namespace avx512 {
ChunkKernels chunk_kernels(ScalarKind kind);
}
namespace avx512bf16 {
ChunkKernels chunk_kernels(ScalarKind kind);
}

}  // namespace cpu
}  // namespace discloss
