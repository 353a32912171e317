// Where a pixel lives in memory. The spatial dims of the embeddings, the labels
// and the gradient are coalesced (adjacent dims merged wherever all three allow
// it), so a contiguous or channels_last input has one spatial dim and any other
// strided input a few; kernels walk pixels in row-major order of those dims.
// No torch headers: CUDA kernels take this struct by value.
#pragma once

#include <cstdint>

#include "math.h"

namespace discloss {

constexpr int kMaxSpatialDims = 8;

struct PixelLayout {
  int64_t batch;       // B
  int64_t embed_dim;   // E
  int64_t num_pixels;  // N, pixels per image
  int64_t x_batch_stride, x_embed_stride;
  int64_t label_batch_stride;
  int64_t grad_batch_stride, grad_embed_stride;  // backward only
  int ndim;                                      // coalesced spatial dims, innermost last
  int64_t sizes[kMaxSpatialDims];
  int64_t x_strides[kMaxSpatialDims];
  int64_t label_strides[kMaxSpatialDims];
  int64_t grad_strides[kMaxSpatialDims];
};

// Element offsets (within one image) of linear pixel p.
struct PixelOffsets {
  int64_t x, label, grad;
};

DISCLOSS_HD PixelOffsets pixel_offsets(const PixelLayout& L, int64_t p) {
  PixelOffsets o{0, 0, 0};
  for (int d = L.ndim - 1; d >= 0; --d) {
    int64_t i = p % L.sizes[d];
    p /= L.sizes[d];
    o.x += i * L.x_strides[d];
    o.label += i * L.label_strides[d];
    o.grad += i * L.grad_strides[d];
  }
  return o;
}

}  // namespace discloss
