// How the launches split the work, from the shapes alone (no host
// synchronisation): the paths and chunks of the streaming passes (sums.cu
// says what each path does), the chunks of the push sums and the grids of
// grid-stride launches. Host code.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#include "common.cuh"

namespace discloss {
namespace cuda {

// ---- plans -----------------------------------------------------------------------

// How the streaming passes 1 and 2 split the work (see the file comment).
// Plain data, passed to the kernel by value.
struct SumsPlan {
  int64_t chunks;           // pixel chunks per image
  int64_t chunk_px;         // pixels per chunk, a multiple of kTilePx
  int64_t ranges;           // slot ranges (1 unless the slot-range path)
  int64_t slots_per_range;  // rows of accumulators per warp
  int warps;                // warps per block
  bool global_atomics;      // global-atomics path
  bool direct;              // one chunk per image: blocks write the final rows
  bool unit;                // one spatial dim, unit strides of x and labels
  bool vec;                 // unit, and x 16-byte aligned for every (image, channel)
};

inline SumsPlan plan_slot_sums(const PixelLayout& L, int64_t K, int64_t acc_size, bool deterministic) {
  SumsPlan p{};
  const int64_t N = L.num_pixels, B = L.batch, E = L.embed_dim;
  // Bytes of one slot's accumulators: E sums and an extra value (the count
  // in pass 1, 4 bytes; the sum of h^2 in pass 2, acc_size bytes).
  const int64_t row_bytes = (E + 1) * acc_size;
  p.warps = kSumWarps;
  p.ranges = 1;
  p.slots_per_range = K;
  if (int64_t(kSumWarps) * K * row_bytes > kSharedBudget) {
    if (!deterministic) {
      p.global_atomics = true;
    } else {
      while (p.warps > 1 && int64_t(p.warps) * row_bytes > kSharedBudget) p.warps /= 2;
      TORCH_CHECK(int64_t(p.warps) * row_bytes <= kSharedBudget,
                  "embeddings: with torch.use_deterministic_algorithms(True) the CUDA kernels need the ",
                  "accumulators of one slot ((E+1) values) to fit in ", kSharedBudget,
                  " bytes of shared memory; got E=", E);
      p.slots_per_range = std::min<int64_t>(K, kSharedBudget / (int64_t(p.warps) * row_bytes));
      p.ranges = ceil_div(K, p.slots_per_range);
    }
  }
  const int64_t tiles = std::max<int64_t>(ceil_div(N, kTilePx), 1);
  const int64_t target = int64_t(sm_count()) * kBlocksPerSm * (kSumWarps / p.warps);
  int64_t chunks = ceil_div(target, std::max<int64_t>(B * p.ranges, 1));
  if (!p.global_atomics) {
    // per-chunk partials: chunks * B * K * (E + 1) elements
    chunks = std::min<int64_t>(chunks, std::max<int64_t>(kPartialBudget / std::max<int64_t>(B * K * (E + 1), 1), 1));
  }
  chunks = std::max<int64_t>(chunks, ceil_div(N, kMaxChunkPx));
  chunks = std::min<int64_t>(std::max<int64_t>(chunks, 1), tiles);
  p.chunk_px = ceil_div(tiles, chunks) * kTilePx;
  p.chunks = std::max<int64_t>(ceil_div(N, p.chunk_px), 1);
  p.direct = !p.global_atomics && p.chunks == 1;
  p.unit = L.ndim == 1 && L.x_strides[0] == 1 && L.label_strides[0] == 1;
  return p;
}
// 16-byte vector loads of kM consecutive pixels need every (image, channel)
// row to start 16-byte aligned.
inline bool vector_loads_ok(const SumsPlan& p, const PixelLayout& L, const at::Tensor& x) {
  const int64_t size = static_cast<int64_t>(x.element_size());
  const auto addr = reinterpret_cast<uintptr_t>(x.data_ptr());
  return p.unit && addr % 16 == 0 && (L.x_batch_stride * size) % 16 == 0 && (L.x_embed_stride * size) % 16 == 0;
}
// Chunks of the push sums (pass 2b): enough blocks to fill the device, at
// most kPartialBudget elements of per-chunk partials, whole tiles.
struct PushPlan {
  int64_t chunks;
  int64_t chunk_px;
};

inline PushPlan plan_push(const PixelLayout& L, int64_t K) {
  const int64_t N = L.num_pixels, B = L.batch, E = L.embed_dim;
  const int64_t tiles = std::max<int64_t>(ceil_div(N, kPushThreads), 1);
  int64_t chunks = ceil_div(int64_t(sm_count()) * kBlocksPerSm, std::max<int64_t>(B, 1));
  chunks = std::min<int64_t>(chunks, std::max<int64_t>(kPartialBudget / std::max<int64_t>(B * K * (E + 1), 1), 1));
  chunks = std::min<int64_t>(std::max<int64_t>(chunks, 1), tiles);
  PushPlan p{};
  p.chunk_px = ceil_div(tiles, chunks) * kPushThreads;
  p.chunks = std::max<int64_t>(ceil_div(N, p.chunk_px), 1);
  return p;
}
// Blocks of a grid-stride launch over n items: enough to fill the device.
inline int64_t grid_for(int64_t n, int threads) {
  return std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, threads), int64_t(sm_count()) * 32));
}
}  // namespace cuda
}  // namespace discloss
