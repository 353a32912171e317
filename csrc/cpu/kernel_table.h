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
// those of this image (sums, counts, hinge, hinge_grad: this chunk's private
// partials; means, var_coef, mean_coef: the image's finished values), all
// K x E (or K) row-major in the accumulation type: float, double for double.
struct ChunkArgs {
  const PixelLayout* layout;
  const LossConfig* config;
  const void* x;
  const void* labels;
  LabelKind label_kind;
  void* grad;
  int64_t image, begin, end;
  void* sums;
  int64_t* counts;
  BadLabel* bad;
  const void* means;
  void* hinge;
  void* hinge_grad;
  const void* var_coef;
  const void* mean_coef;
};

struct ChunkKernels {
  void (*cluster_sums)(const ChunkArgs&);  // pass 1
  void (*hinge_sums)(const ChunkArgs&);    // pass 2
  void (*write_grad)(const ChunkArgs&);    // pass 3
};

namespace generic {
ChunkKernels chunk_kernels(ScalarKind kind);
}
namespace avx2 {
ChunkKernels chunk_kernels(ScalarKind kind);
}

}  // namespace cpu
}  // namespace discloss
