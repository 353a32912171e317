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
//             [sum_partials_kernel x2]]  finalize_forward_kernel
//   backward  [compact_present_kernel]  slot_coefficients_kernel  write_grad_kernel
//
// Bracketed launches depend on the path (below), the normalisation and the
// unlabeled push; compaction of the clusters present is for the paper
// normalisation only. It is its own small launch (one block per image, an
// ordered block scan over the K counts) because the push sums and every
// block of the finalize need its image's list, and a grid-wide barrier inside
// one launch would need a cooperative launch.
// A training step reads the embeddings three times (pass 1, pass 2, pass 3)
// and writes the gradient once; the unlabeled push (off by default) adds a
// read of the labels and of the unlabeled pixels' x (pass 2b, its own
// deterministic kernel rather than a part of pass 2: simpler, and the same
// result in any mode). Everything per slot is O(B*K*E).
//
// Exact ties (means of equal embeddings are bitwise equal, whatever the
// dtype and count): pass 1 sums x - p per slot, p the slot's pivot, the
// embedding of its lowest-index pixel in the image (0 where not finite, so
// an inf still sums to inf), and mean = p + S / n (a division, not a
// product with 1/n). Every path (warps, blocks, chunks, global atomics) uses
// the same pivot, so equal embeddings sum to exactly 0. Choosing the pivots
// costs one more read of the labels (first_pixel_kernel: slot lookups and an
// atomicMin per run of equal slots in a lane) and a gather of B*K*E values
// of x (gather_pivots_kernel), before pass 1.
//
// The L2 norm's range (math.h L2Range): in passes 2, 2b and 3 a pixel's norm
// from the plain sum of squares that falls outside the range is recomputed
// scaled (pixel_scaled_l2, re-reading the pixel's E values; rare), so that
// float32 norms below ~1e-19 or above ~1e19 do not become 0 or inf. The
// common path pays one comparison per pixel.
//
// With a slot map (slot_ids, num_ids from discloss::slot_map, cuda/slot_map.cu),
// passes 1-3 look a label up by binary search in its image's sorted ids
// (once per run of equal labels within a lane in passes 1-2); images whose
// ids all lie in [0, K) (num_ids = -1) keep the identity, as without a map.
//
// Paths of the two streaming passes (slot_sums_kernel), chosen by plan_slot_sums
// from the shapes alone:
//  * shared: the K slots' accumulators (K*(E+1) values) fit in shared memory
//    for every warp of a block (kSumWarps * K * (E+1) * sizeof(acc) <= 48 KiB;
//    e.g. K=64, E=16: 17 KiB). Each warp accumulates into its own rows, the
//    block adds its warps in warp order and writes its per-chunk partial; a
//    separate launch adds the chunks in chunk order (or, with one chunk per
//    image, the block writes the result itself). Deterministic, and the
//    default for such K.
//  * global atomics: K too large for shared memory and
//    torch.are_deterministic_algorithms_enabled() false. Warp-aggregated
//    atomicAdd on the zeroed global (B, K, E) rows: one atomic per group of
//    lanes that share a slot in a warp step. Not bitwise reproducible.
//  * slot ranges: K too large and deterministic algorithms requested. The
//    slots are cut into ranges that fit in shared memory; block (chunk, range,
//    image) accumulates only the pixels whose slot is in its range, as in the
//    shared path. Labels are read once per range (x still about once), so it
//    is slower than the atomics, but bitwise reproducible.
//
// Inside a warp (all paths), lane l of a tile of kTilePx = 32 * kM pixels
// owns kM consecutive pixels, which for unit-stride inputs it loads with
// 16-byte vector loads (a warp reads 32 * kM contiguous elements per channel).
// Each lane first sums its own pixels run by run in registers (labels are
// spatially coherent: the kM pixels almost always form one run), then lanes
// holding the same slot are combined with __match_any_sync and a segmented
// shuffle tree (peer_sum), and one leader per slot adds to the accumulator.
//
// The finalize (forward) is one launch for the whole batch: blocks cover
// slices of the pairs of clusters present (paper: per image; chainer: every
// slot pair of every image) plus the var and reg sums, write per-block
// partials, and the last block to finish (atomic ticket) adds the partials in
// a fixed order, applies the normalisation, weights and reduction, and writes
// the three terms. Deterministic.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../discloss.h"
#include "reduce.cuh"
#include "runtime.cuh"

namespace discloss {
namespace cuda {
namespace {

// ---- tuning constants ----------------------------------------------------------
constexpr int kM = 8;                        // consecutive pixels per lane
constexpr int64_t kTilePx = 32 * kM;         // pixels per warp tile
constexpr int kSumWarps = 4;                 // warps per block of the streaming passes
constexpr int64_t kSharedBudget = 48 * 1024;  // bytes of accumulators per block
constexpr int64_t kBlocksPerSm = 8;          // target blocks of the streaming passes
constexpr int64_t kPartialBudget = int64_t(1) << 26;  // elements of per-chunk partials
constexpr int64_t kMaxChunkPx = int64_t(1) << 30;     // keeps per-warp counts in 32 bits
constexpr int kFinalizeThreads = 256;
constexpr int kCoefThreads = 128;
constexpr int kCompactThreads = 256;
constexpr int kGradThreads = 256;
constexpr int kPushThreads = 256;
constexpr int kPushGradWidth = 4;  // gradient components a pass-3 thread holds at once for the push
constexpr int kElementwiseThreads = 256;
constexpr int64_t kMaxSlots = int64_t(1) << 30;  // slots are int32 on the device

// ---- element types ---------------------------------------------------------------
// Embeddings are loaded as their raw bits and converted to the accumulation
// type in registers: float16/bfloat16 natively, float32 accumulation.
template <typename T>
struct Elem;
template <>
struct Elem<float> {
  using acc = float;
  using bits = float;
  static __device__ __forceinline__ float to_acc(float v) { return v; }
};
template <>
struct Elem<double> {
  using acc = double;
  using bits = double;
  static __device__ __forceinline__ double to_acc(double v) { return v; }
};
template <>
struct Elem<c10::Half> {
  using acc = float;
  using bits = unsigned short;
  static __device__ __forceinline__ float to_acc(unsigned short v) { return __half2float(__ushort_as_half(v)); }
};
template <>
struct Elem<c10::BFloat16> {
  using acc = float;
  using bits = unsigned short;
  static __device__ __forceinline__ float to_acc(unsigned short v) {
    return __uint_as_float(static_cast<unsigned>(v) << 16);
  }
};

template <typename T>
__device__ __forceinline__ typename Elem<T>::acc load_elem(const T* base, int64_t i) {
  using bits = typename Elem<T>::bits;
  return Elem<T>::to_acc(__ldg(reinterpret_cast<const bits*>(base) + i));
}

// kM consecutive elements from a 16-byte aligned address.
template <typename T>
__device__ __forceinline__ void load_run(const T* p, typename Elem<T>::acc (&v)[kM]) {
  using bits = typename Elem<T>::bits;
  constexpr int kPerVector = 16 / static_cast<int>(sizeof(bits));
  static_assert(kM % kPerVector == 0, "kM must fill whole 16-byte vectors");
  const uint4* q = reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int i = 0; i < kM / kPerVector; ++i) {
    const uint4 u = __ldg(q + i);
    bits w[kPerVector];
    ::memcpy(w, &u, sizeof(u));
#pragma unroll
    for (int k = 0; k < kPerVector; ++k) v[i * kPerVector + k] = Elem<T>::to_acc(w[k]);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t hinge_direction(acc_t d, int norm) {
  // d(||v||)/dv component up to the factor folded into the pull coefficient:
  // d itself (L2, coef already holds 1/r) or sign(d) (L1).
  return norm == 2 ? d : norm_grad(d, acc_t(0), 1);
}

// ||x_p - mu||_2 recomputed scaled (math.h scaled_l2) from the pixel's E
// values at xp (stride apart) and the row mu, for the rare norm whose sum of
// squares left L2Range. Out of line, to keep the streaming loops' registers.
template <typename scalar_t>
__device__ DISCLOSS_NOINLINE typename Elem<scalar_t>::acc pixel_scaled_l2(const scalar_t* xp, int64_t stride,
                                                                     const typename Elem<scalar_t>::acc* mu,
                                                                     int64_t E) {
  using acc_t = typename Elem<scalar_t>::acc;
  return scaled_l2<acc_t>(E, [&](int64_t e) { return load_elem(xp, e * stride) - __ldg(mu + e); });
}

// A pixel's ||x_p - mu|| from its accumulated norm terms `sum`: finish_norm,
// and for L2 out of range the scaled recomputation (one comparison otherwise).
template <typename scalar_t>
__device__ __forceinline__ typename Elem<scalar_t>::acc pixel_norm(typename Elem<scalar_t>::acc sum, int norm,
                                                                   const scalar_t* xp, int64_t stride,
                                                                   const typename Elem<scalar_t>::acc* mu,
                                                                   int64_t E) {
  const typename Elem<scalar_t>::acc r = finish_norm(sum, norm);
  return norm == 2 && l2_out_of_range(r) ? pixel_scaled_l2(xp, stride, mu, E) : r;
}

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

// The op's slot map as raw pointers (both null without one).
struct SlotMapArgs {
  const int64_t* slot_ids;
  const int64_t* num_ids;
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

SumsPlan plan_slot_sums(const PixelLayout& L, int64_t K, int64_t acc_size, bool deterministic) {
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
bool vector_loads_ok(const SumsPlan& p, const PixelLayout& L, const at::Tensor& x) {
  const int64_t size = static_cast<int64_t>(x.element_size());
  const auto addr = reinterpret_cast<uintptr_t>(x.data_ptr());
  return p.unit && addr % 16 == 0 && (L.x_batch_stride * size) % 16 == 0 && (L.x_embed_stride * size) % 16 == 0;
}

// ---- passes 1 and 2: per-slot sums --------------------------------------------------

template <typename acc_t, bool kHinge>
struct PassTypes {  // pass 1: counts
  using shared_extra = unsigned;
  using global_extra = int64_t;
};
template <typename acc_t>
struct PassTypes<acc_t, true> {  // pass 2: sums of h^2
  using shared_extra = acc_t;
  using global_extra = acc_t;
};

// The slot map of one image (DESIGN §1, arbitrary ids): ids = its row of
// slot_ids and n = num_ids[b] when the op got a slot map, else n = -1; slot_of
// then gives the slot (the identity, or Chainer's 1..K), as it does for an
// image whose ids all lie in [0, K) (n = -1 there too).
struct ImageSlots {
  const int64_t* ids;
  int64_t n;
};

__device__ __forceinline__ ImageSlots image_slots(const int64_t* slot_ids, const int64_t* num_ids, int64_t b,
                                                  int64_t K) {
  if (slot_ids == nullptr) return {nullptr, -1};
  return {slot_ids + b * K, __ldg(num_ids + b)};
}

// The map from shared memory, reloaded where it is used (volatile): keeps it
// out of the registers of the streaming loops.
__device__ __forceinline__ ImageSlots load_shared_map(const ImageSlots* p) {
  const volatile ImageSlots* v = p;
  return {v->ids, v->n};
}

// Full slot code of a label: a slot in [0, K), kIgnored or kInvalid.
__device__ __forceinline__ int64_t lookup_slot(int64_t label, const LossConfig& c, const ImageSlots& m) {
  return m.n >= 0 ? mapped_slot(label, c, m.ids, m.n) : slot_of(label, c);
}

// Slot within [lo, lo + ks), or -1 (ignored, invalid, other range).
__device__ __forceinline__ int local_slot(int64_t s, int64_t lo, int64_t ks) {
  return (s >= lo && s < lo + ks) ? static_cast<int>(s - lo) : -1;
}

// Slot of one pixel's label; with a sparse map (binary search), the lookup of
// the previous pixel of the lane is reused when the label repeats (labels are
// spatially coherent).
struct SlotCache {
  int64_t label;
  int64_t slot;
  bool valid;
};

__device__ __forceinline__ int64_t cached_slot(int64_t label, const LossConfig& c, const ImageSlots& m,
                                               SlotCache& cache) {
  if (m.n < 0) return slot_of(label, c);
  if (!cache.valid || cache.label != label) cache = {label, mapped_slot(label, c, m.ids, m.n), true};
  return cache.slot;
}

// The slots of this lane's kM pixels first .. first+kM-1 (-1 past p_end) and,
// for the strided path, the offsets of their embeddings in the image;
// *unlabeled counts those of them labelled ignore_index (paper: kIgnored).
template <typename label_t>
__device__ __forceinline__ void load_lane_slots(const label_t* lab_img, const PixelLayout& L, const LossConfig& c,
                                                const ImageSlots& map, bool unit, int64_t first, int64_t p_end,
                                                int64_t lo, int64_t ks, int (&slot)[kM], int64_t (&xoff)[kM],
                                                unsigned* unlabeled) {
  SlotCache cache{0, kInvalid, false};
  unsigned unl = 0;
  if (unit) {
#pragma unroll
    for (int j = 0; j < kM; ++j) {
      const int64_t p = first + j;
      xoff[j] = p;
      slot[j] = -1;
      if (p < p_end) {
        const int64_t s = cached_slot(static_cast<int64_t>(lab_img[p]), c, map, cache);
        slot[j] = local_slot(s, lo, ks);
        unl += s == kIgnored ? 1u : 0u;
      }
    }
    *unlabeled = unl;
    return;
  }
  // Strided: walk along the innermost dim, recomputing the offsets (integer
  // divisions) only where a row ends.
  const int inner_dim = L.ndim - 1;
  const int64_t inner = L.sizes[inner_dim];
  PixelOffsets o{0, 0, 0};
  int64_t col = 0;
  if (first < p_end) {
    o = pixel_offsets(L, first);
    col = first % inner;
  }
#pragma unroll
  for (int j = 0; j < kM; ++j) {
    const int64_t p = first + j;
    xoff[j] = 0;
    slot[j] = -1;
    if (p < p_end) {
      xoff[j] = o.x;
      const int64_t s = cached_slot(static_cast<int64_t>(lab_img[o.label]), c, map, cache);
      slot[j] = local_slot(s, lo, ks);
      unl += s == kIgnored ? 1u : 0u;
      if (p + 1 < p_end) {
        if (++col < inner) {
          o.x += L.x_strides[inner_dim];
          o.label += L.label_strides[inner_dim];
        } else {
          col = 0;
          o = pixel_offsets(L, p + 1);
        }
      }
    }
  }
  *unlabeled = unl;
}

// Channel values of this lane's kM pixels (0 where the slot is -1 on the
// scalar path; the vector path loads whole runs of in-bounds pixels).
template <typename scalar_t>
__device__ __forceinline__ void load_channel(const scalar_t* xe, int64_t first, const int64_t (&xoff)[kM],
                                             const int (&slot)[kM], bool vec, bool lane_has_pixels,
                                             typename Elem<scalar_t>::acc (&v)[kM]) {
  using acc_t = typename Elem<scalar_t>::acc;
  if (vec) {
    if (lane_has_pixels) {
      load_run(xe + first, v);
    } else {
#pragma unroll
      for (int j = 0; j < kM; ++j) v[j] = acc_t(0);
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < kM; ++j) v[j] = slot[j] >= 0 ? load_elem(xe, xoff[j]) : acc_t(0);
}

__device__ __forceinline__ int run_of(unsigned run_ids, int j) { return static_cast<int>((run_ids >> (4 * j)) & 15u); }

// ---- pass 1's pivots ---------------------------------------------------------------
// first_px[b, k] = the lowest pixel index of slot k in image b (caller-filled
// with N: no pixel). Grid (x: warps over pixels, y: images, grid-stride);
// warp w takes a contiguous range of whole 32-pixel steps; a lane offers its
// pixel only where its slot differs from its previous pixel's, and of the
// lanes offering the same slot in a step only the lowest (lowest pixel)
// issues the atomicMin. The minimum does not depend on the atomics' order:
// deterministic. Reads the labels once (slot lookups as in pass 1); O(runs)
// atomics on the (B, K) rows.
template <typename label_t>
__global__ void __launch_bounds__(kElementwiseThreads)
    first_pixel_kernel(const label_t* __restrict__ labels, const PixelLayout L, const LossConfig c, bool unit,
                       const int64_t* __restrict__ slot_ids, const int64_t* __restrict__ num_ids,
                       int64_t* __restrict__ first_px) {
  const int64_t K = c.num_slots, N = L.num_pixels;
  const int lane = lane_id();
  const int64_t warps_per_block = blockDim.x >> 5;
  const int64_t warps = int64_t(gridDim.x) * warps_per_block;
  const int64_t warp = int64_t(blockIdx.x) * warps_per_block + (threadIdx.x >> 5);
  const int64_t span = ((N + 31) / 32 + warps - 1) / warps * 32;  // pixels per warp, whole steps
  const int64_t begin = warp * span, end = min(begin + span, N);
  for (int64_t b = blockIdx.y; b < L.batch; b += gridDim.y) {
    const ImageSlots map = image_slots(slot_ids, num_ids, b, K);
    const label_t* lab_img = labels + b * L.label_batch_stride;
    SlotCache cache{0, kInvalid, false};
    int64_t last = -1;
    for (int64_t base = begin; base < end; base += 32) {  // warp-uniform
      const int64_t p = base + lane;
      int64_t offer = -1;
      if (p < end) {
        const int64_t label = static_cast<int64_t>(lab_img[unit ? p : pixel_offsets(L, p).label]);
        const int64_t s = cached_slot(label, c, map, cache);
        if (s >= 0 && s < K) {
          offer = s != last ? s : -1;
          last = s;
        }
      }
      const unsigned peers = __match_any_sync(kFullMask, static_cast<unsigned long long>(offer));
      if (offer >= 0 && lane == __ffs(peers) - 1) {
        atomicMin(reinterpret_cast<unsigned long long*>(first_px + b * K + offer), static_cast<unsigned long long>(p));
      }
    }
  }
}

// pivots[b, k, e] = x[b, e, first_px[b, k]] in the accumulation type, 0
// where that is not finite (an inf then sums to inf in pass 1, as in a plain
// sum) or where the slot has no pixel (first_px = N). Reads first_px and
// B*K*E scattered values of x once; writes pivots once.
template <typename scalar_t>
__global__ void __launch_bounds__(kElementwiseThreads)
    gather_pivots_kernel(const scalar_t* __restrict__ x, const PixelLayout L, int64_t K,
                         const int64_t* __restrict__ first_px, typename Elem<scalar_t>::acc* __restrict__ pivots) {
  using acc_t = typename Elem<scalar_t>::acc;
  const int64_t E = L.embed_dim, total = L.batch * K * E;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / E, e = i - row * E, b = row / K;
    const int64_t p = first_px[row];
    acc_t v = acc_t(0);
    if (p >= 0 && p < L.num_pixels) {
      v = load_elem(x + b * L.x_batch_stride + pixel_offsets(L, p).x, e * L.x_embed_stride);
      v = v - v == acc_t(0) ? v : acc_t(0);
    }
    pivots[i] = v;
  }
}

// Passes 1 and 2 over chunk `chunk` of image `b`, slots of range `range`
// (block index = (b * ranges + range) * chunks + chunk).
//
// pass 1 (kHinge false): per slot, the sum of x - p over its pixels (p the
//   slot's pivot, centers = pivots (B, K, E)) and the pixel count. Reads
//   labels once and x once per pixel of the chunk (only tiles holding a
//   pixel of the range load x on the slot-range path), pivots through the
//   cache, once per run.
// pass 2 (kHinge true): per slot, the sum of h^2 and of d(h^2)/dx, with
//   h = [||x - mu|| - delta_v]+. Reads labels once and x twice (the second
//   read, for the gradient sum, mostly hits L1/L2 and is skipped for warp
//   tiles where every pixel lies within delta_v of its mean); reads means
//   (centers, (B, K, E)) through the cache, once per run.
//
// Writes, shared paths: the block's rows [lo, lo + ks) of the image once
// (the final means = p + S / n and counts, or hinge_grad/hinge, when plan.direct, else the
// chunk's partial); global path: atomics into the image's zeroed rows.
template <typename scalar_t, typename label_t, bool kHinge>
__global__ void __launch_bounds__(kSumWarps * 32)
    slot_sums_kernel(const scalar_t* __restrict__ x, const label_t* __restrict__ labels, const PixelLayout L,
                     const LossConfig c, const SumsPlan plan, const int64_t* __restrict__ slot_ids,
                     const int64_t* __restrict__ num_ids, const typename Elem<scalar_t>::acc* __restrict__ centers,
                     typename Elem<scalar_t>::acc* __restrict__ sums_out,
                     typename PassTypes<typename Elem<scalar_t>::acc, kHinge>::global_extra* __restrict__ extras_out,
                     int64_t extras_row, int64_t* __restrict__ unlabeled_out) {
  using acc_t = typename Elem<scalar_t>::acc;
  using shared_extra_t = typename PassTypes<acc_t, kHinge>::shared_extra;
  using global_extra_t = typename PassTypes<acc_t, kHinge>::global_extra;
  const int64_t K = c.num_slots, E = L.embed_dim, N = L.num_pixels, B = L.batch;
  const int lane = lane_id();
  const int warp = static_cast<int>(threadIdx.x >> 5);
  const int warps = static_cast<int>(blockDim.x >> 5);
  const int64_t block = blockIdx.x;
  const int64_t chunk = block % plan.chunks;
  const int64_t range = (block / plan.chunks) % plan.ranges;
  const int64_t b = block / (plan.chunks * plan.ranges);
  const int64_t p_begin = chunk * plan.chunk_px;
  const int64_t p_end = min(p_begin + plan.chunk_px, N);
  const int64_t lo = range * plan.slots_per_range;
  const int64_t ks = min(plan.slots_per_range, K - lo);
  const int64_t rows = plan.slots_per_range;  // rows allocated per warp

  DISCLOSS_DYNAMIC_SHARED(unsigned char, smem, 16);
  acc_t* shared_sums = reinterpret_cast<acc_t*>(smem);
  shared_extra_t* shared_extras = reinterpret_cast<shared_extra_t*>(shared_sums + warps * rows * E);
  // The image's slot map and the block's count of unlabeled pixels live in
  // shared memory, out of the registers of the tile loop (pass 1 spilled
  // with them in registers).
  DISCLOSS_SHARED(ImageSlots, sh_map);
  DISCLOSS_SHARED(unsigned, sh_unlabeled);  // < kMaxChunkPx per block: fits in 32 bits
  if (threadIdx.x == 0) {
    sh_map = image_slots(slot_ids, num_ids, b, K);
    sh_unlabeled = 0u;
  }
  __syncthreads();

  SlotAccumulator<acc_t, shared_extra_t, global_extra_t> acc;
  acc.embed_dim = E;
  acc.global = plan.global_atomics;
  if (plan.global_atomics) {
    acc.sums = sums_out + b * K * E;
    acc.extras = nullptr;
    acc.global_extras = extras_out + b * extras_row;
  } else {
    acc.sums = shared_sums + warp * rows * E;
    acc.extras = shared_extras + warp * rows;
    acc.global_extras = nullptr;
    for (int64_t i = threadIdx.x; i < warps * rows * E; i += blockDim.x) shared_sums[i] = acc_t(0);
    for (int64_t i = threadIdx.x; i < warps * rows; i += blockDim.x) shared_extras[i] = shared_extra_t(0);
    __syncthreads();
  }

  const scalar_t* x_img = x + b * L.x_batch_stride;
  const label_t* lab_img = labels + b * L.label_batch_stride;
  const int norm = c.norm;
  const acc_t delta_v = acc_t(c.delta_v);
  // Pass 1 counts the unlabeled pixels (once per pixel: range 0 only).
  const bool count_unlabeled = !kHinge && unlabeled_out != nullptr && range == 0;

  // Warp tiles in a fixed order per warp: warp w takes tiles w, w + warps, ...
  for (int64_t tile = p_begin + int64_t(warp) * kTilePx; tile < p_end; tile += int64_t(warps) * kTilePx) {
    const int64_t first = tile + int64_t(lane) * kM;
    int slot[kM];
    int64_t xoff[kM];
    unsigned lane_unlabeled = 0;
    load_lane_slots(lab_img, L, c, load_shared_map(&sh_map), plan.unit, first, p_end, lo, ks, slot, xoff,
                    &lane_unlabeled);
    if (count_unlabeled && lane_unlabeled != 0u) atomicAdd(&sh_unlabeled, lane_unlabeled);  // integers: any order

    // Runs of equal slots among the lane's pixels: run_ids holds, per pixel,
    // 4 bits = 1 + index of its run, 0 for no slot.
    unsigned run_ids = 0;
    int runs = 0;
    int prev = -1;
#pragma unroll
    for (int j = 0; j < kM; ++j) {
      if (slot[j] >= 0) {
        if (slot[j] != prev) ++runs;
        run_ids |= static_cast<unsigned>(runs) << (4 * j);
      }
      prev = slot[j];
    }
    const int rounds = warp_max(runs);  // warp-uniform
    if (rounds == 0) continue;

    // Round q combines every lane's q-th run: its slot and the lanes sharing it.
    int round_slot[kM];
    unsigned round_peers[kM];
#pragma unroll
    for (int q = 0; q < kM; ++q) {
      round_slot[q] = -1;
#pragma unroll
      for (int j = 0; j < kM; ++j) {
        if (run_of(run_ids, j) == q + 1) round_slot[q] = slot[j];
      }
      round_peers[q] = 0u;
      if (q < rounds) round_peers[q] = __match_any_sync(kFullMask, round_slot[q]);
    }

    // Adds each run's sum of val to its slot: to channel e, or to the extra
    // value when to_extra (a std::bool_constant) is true.
    auto flush = [&](auto to_extra, int64_t e, const acc_t(&val)[kM]) {
#pragma unroll
      for (int q = 0; q < kM; ++q) {
        if (q < rounds) {
          acc_t s = acc_t(0);
#pragma unroll
          for (int j = 0; j < kM; ++j) s += run_of(run_ids, j) == q + 1 ? val[j] : acc_t(0);
          s = peer_sum(round_peers[q], s);
          if (round_slot[q] >= 0 && is_group_leader(round_peers[q])) {
            if constexpr (decltype(to_extra)::value) {
              acc.add_extra(round_slot[q], s);
            } else {
              acc.add(round_slot[q], e, s);
            }
          }
          __syncwarp();
        }
      }
    };

    const bool lane_has_pixels = runs > 0;
    const bool vec = plan.vec && tile + kTilePx <= p_end;
    // Calls body(e, values of channel e) for e = 0 .. E-1, loading channel
    // e + 1 before body(e) runs, so that two loads per lane are in flight
    // while the warp combines the previous channel.
    auto for_each_channel = [&](auto&& body) {
      acc_t cur[kM], next[kM];
#pragma unroll
      for (int j = 0; j < kM; ++j) next[j] = acc_t(0);
      load_channel(x_img, first, xoff, slot, vec, lane_has_pixels, cur);
      for (int64_t e = 0; e < E; ++e) {
        if (e + 1 < E) load_channel(x_img + (e + 1) * L.x_embed_stride, first, xoff, slot, vec, lane_has_pixels, next);
        body(e, cur);
#pragma unroll
        for (int j = 0; j < kM; ++j) cur[j] = next[j];
      }
    };
    if constexpr (!kHinge) {
#pragma unroll
      for (int q = 0; q < kM; ++q) {
        if (q < rounds) {
          unsigned n = 0;
#pragma unroll
          for (int j = 0; j < kM; ++j) n += run_of(run_ids, j) == q + 1 ? 1u : 0u;
          n = peer_sum(round_peers[q], n);
          if (round_slot[q] >= 0 && is_group_leader(round_peers[q])) acc.add_extra(round_slot[q], n);
          __syncwarp();
        }
      }
      const acc_t* pivot_img = centers + (b * K + lo) * E;  // rows of this range
      for_each_channel([&](int64_t e, acc_t(&v)[kM]) {
        acc_t pivot = acc_t(0);
        int prev_slot = -1;
#pragma unroll
        for (int j = 0; j < kM; ++j) {
          if (slot[j] >= 0) {
            if (slot[j] != prev_slot) pivot = __ldg(pivot_img + int64_t(slot[j]) * E + e);
            v[j] -= pivot;
          }
          prev_slot = slot[j];
        }
        flush(std::false_type{}, e, v);
      });
    } else {
      const acc_t* mu_img = centers + (b * K + lo) * E;  // rows of this range
      acc_t r[kM];
#pragma unroll
      for (int j = 0; j < kM; ++j) r[j] = acc_t(0);
      for_each_channel([&](int64_t e, acc_t(&v)[kM]) {
        acc_t m = acc_t(0);
        int prev_slot = -1;
#pragma unroll
        for (int j = 0; j < kM; ++j) {
          if (slot[j] >= 0) {
            if (slot[j] != prev_slot) m = __ldg(mu_img + int64_t(slot[j]) * E + e);
            r[j] += norm_term<acc_t>(v[j] - m, norm);
          }
          prev_slot = slot[j];
        }
      });
      acc_t coef[kM];
      acc_t h2[kM];
      bool any_hinge = false;
#pragma unroll
      for (int j = 0; j < kM; ++j) {
        coef[j] = acc_t(0);
        h2[j] = acc_t(0);
        if (slot[j] >= 0) {
          const acc_t rj = pixel_norm(r[j], norm, x_img + xoff[j], L.x_embed_stride, mu_img + int64_t(slot[j]) * E, E);
          const PullHinge<acc_t> ph = pull_hinge(rj, delta_v, norm);
          coef[j] = ph.coef;
          h2[j] = ph.h * ph.h;
          any_hinge = any_hinge || ph.h != acc_t(0);  // NaN != 0: a NaN h is never skipped
        }
      }
      // Every pixel of the warp tile within delta_v of its mean: h = 0 (so
      // r is finite), h^2 = 0 and d(h^2)/dx = 0 exactly; nothing to add, and
      // no second read of x. A NaN h (h > 0 would be false) is not skipped.
      if (!__any_sync(kFullMask, any_hinge)) continue;
      flush(std::true_type{}, 0, h2);
      for_each_channel([&](int64_t e, acc_t(&v)[kM]) {
        acc_t m = acc_t(0);
        int prev_slot = -1;
#pragma unroll
        for (int j = 0; j < kM; ++j) {
          if (slot[j] >= 0) {
            if (slot[j] != prev_slot) m = __ldg(mu_img + int64_t(slot[j]) * E + e);
            v[j] = coef[j] * hinge_direction(v[j] - m, norm);
          } else {
            v[j] = acc_t(0);
          }
          prev_slot = slot[j];
        }
        flush(std::false_type{}, e, v);
      });
    }
  }

  if (count_unlabeled) {  // uniform over the block; an integer sum: the same whatever the order
    __syncthreads();
    if (threadIdx.x == 0 && sh_unlabeled != 0u) {
      atomicAdd(reinterpret_cast<unsigned long long*>(unlabeled_out + b * (K + 1)),
                static_cast<unsigned long long>(sh_unlabeled));
    }
  }

  if (plan.global_atomics) return;

  // Add the warps' rows in warp order and write them once.
  __syncthreads();
  acc_t* out_sums = sums_out + (plan.direct ? 0 : chunk * B * K * E);
  global_extra_t* out_extras = extras_out + (plan.direct ? 0 : chunk * B * extras_row);
  for (int64_t i = threadIdx.x; i < ks * E; i += blockDim.x) {
    const int64_t s = i / E, e = i - s * E;
    acc_t total = acc_t(0);
    for (int w = 0; w < warps; ++w) total += shared_sums[(w * rows + s) * E + e];
    if constexpr (!kHinge) {
      if (plan.direct) {  // the mean p + S / n (a division: equal sums over equal counts, equal means)
        uint64_t n = 0;
        for (int w = 0; w < warps; ++w) n += shared_extras[w * rows + s];
        total = n > 0 ? __ldg(centers + (b * K + lo + s) * E + e) + total / acc_t(n) : acc_t(0);
      }
    }
    out_sums[(b * K + lo + s) * E + e] = total;
  }
  for (int64_t s = threadIdx.x; s < ks; s += blockDim.x) {
    global_extra_t total = global_extra_t(0);
    for (int w = 0; w < warps; ++w) total += static_cast<global_extra_t>(shared_extras[w * rows + s]);
    out_extras[b * extras_row + lo + s] = total;
  }
}

// After pass 1 on the partial or global path: counts[b, k] = sum over chunks
// of part_counts and means[b, k, e] = pivots[b, k, e] + (sum over chunks of
// part_sums) / count (0 for an empty slot), chunks added in chunk order; all
// partials are sums of x - the same pivot, so equal embeddings give exactly
// the pivot. part_counts has rows of
// part_row counts per image ((chunks, B, K) partials: K; counts (B, K + 1)
// itself: K + 1). In place (part_sums == means, part_counts == counts,
// chunks == 1, write_counts false) on the global path. Reads the partials
// once, writes means (and counts) once; counts[:, K] is left alone.
template <typename acc_t>
__global__ void __launch_bounds__(kElementwiseThreads)
    finish_means_kernel(const acc_t* part_sums, const int64_t* part_counts, int64_t part_row, int64_t chunks,
                        int64_t B, int64_t K, int64_t E, const acc_t* __restrict__ pivots, acc_t* means,
                        int64_t* counts, bool write_counts) {
  const int64_t total = B * K * E;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / E, b = row / K, k = row - b * K;
    int64_t n = 0;
    acc_t s = acc_t(0);
    for (int64_t ch = 0; ch < chunks; ++ch) {
      n += part_counts[(ch * B + b) * part_row + k];
      s += part_sums[ch * total + i];
    }
    means[i] = n > 0 ? pivots[i] + s / acc_t(n) : acc_t(0);  // a division, not a product with 1/n
    if (write_counts && i - row * E == 0) counts[b * (K + 1) + k] = n;
  }
}

// out[i] = sum over chunks (in order) of part[ch * n + i]. Reads the partials
// once, writes out once.
template <typename acc_t>
__global__ void __launch_bounds__(kElementwiseThreads)
    sum_partials_kernel(const acc_t* __restrict__ part, int64_t chunks, int64_t n, acc_t* __restrict__ out) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    acc_t s = acc_t(0);
    for (int64_t ch = 0; ch < chunks; ++ch) s += part[ch * n + i];
    out[i] = s;
  }
}

// ---- pass 2b: the unlabeled push's sums (DESIGN §1, Variants) --------------------------
// Block item (b, chunk) of B * chunks (grid-stride): for the unlabeled pixels
// i (label == ignore_index) of the chunk and every cluster c present in image
// b, q = [delta_d - ||x_i - mu_c||]+; adds sum_i q^2 to push_out[c] and
// sum_i d(q^2)/dx_i to push_grad_out[c, :], the rows of (chunk, b)
// (caller-zeroed; the final rows when chunks == 1). Tiles of blockDim pixels:
// thread t takes pixel t for q and its coefficient, then (part, e) cells sum
// the coefficient times u over the tile's pixels j = part, part + parts, ...
// and the parts are added in part order. No atomics: bitwise reproducible.
// O(N_U * C * E) work; reads labels once, the unlabeled pixels' x once per
// cluster (from L1/L2 after the first), means through the cache.
template <typename scalar_t, typename label_t>
__global__ void __launch_bounds__(kPushThreads)
    unlabeled_push_kernel(const scalar_t* __restrict__ x, const label_t* __restrict__ labels, const PixelLayout L,
                          const LossConfig c, bool unit, int64_t chunks, int64_t chunk_px,
                          const typename Elem<scalar_t>::acc* __restrict__ means, const int* __restrict__ present,
                          const int* __restrict__ num_present, typename Elem<scalar_t>::acc* __restrict__ push_out,
                          typename Elem<scalar_t>::acc* __restrict__ push_grad_out) {
  using acc_t = typename Elem<scalar_t>::acc;
  DISCLOSS_SHARED_ARRAY(acc_t, sh_coef, kPushThreads);
  DISCLOSS_SHARED_ARRAY(int64_t, sh_xoff, kPushThreads);  // -1: not an unlabeled pixel
  DISCLOSS_SHARED_ARRAY(acc_t, sh_cells, kPushThreads);
  DISCLOSS_SHARED_ARRAY(acc_t, scratch, 32);
  const int64_t K = c.num_slots, E = L.embed_dim, N = L.num_pixels, B = L.batch;
  const int64_t threads = blockDim.x, tid = threadIdx.x;
  const int64_t parts = E <= threads ? threads / E : 1;  // parts * E <= threads when parts > 1
  const int norm = c.norm;
  const acc_t delta_d = acc_t(c.delta_d);
  for (int64_t item = blockIdx.x; item < B * chunks; item += gridDim.x) {
    const int64_t b = item / chunks, chunk = item - b * chunks;
    const int64_t C = num_present[b];
    if (C == 0) continue;  // uniform over the block
    const int* P = present + b * K;
    const int64_t p_begin = chunk * chunk_px;
    const int64_t p_end = min(p_begin + chunk_px, N);
    const scalar_t* x_img = x + b * L.x_batch_stride;
    const label_t* lab_img = labels + b * L.label_batch_stride;
    acc_t* q_out = push_out + (chunk * B + b) * K;
    acc_t* g_out = push_grad_out + (chunk * B + b) * K * E;
    for (int64_t tile = p_begin; tile < p_end; tile += threads) {
      const int64_t p = tile + tid;
      int64_t xoff = -1;
      if (p < p_end) {
        const PixelOffsets o = unit ? PixelOffsets{p, p, p} : pixel_offsets(L, p);
        if (static_cast<int64_t>(lab_img[o.label]) == c.ignore_index) xoff = o.x;
      }
      __syncthreads();  // the previous tile's readers of sh_xoff are done
      sh_xoff[tid] = xoff;
      if (!__syncthreads_or(xoff >= 0)) continue;  // no unlabeled pixel in the tile
      const int64_t count = min(threads, p_end - tile);
      for (int64_t i = 0; i < C; ++i) {
        const int64_t k = P[i];
        const acc_t* mu = means + (b * K + k) * E;
        acc_t q2 = acc_t(0), coef = acc_t(0);
        if (xoff >= 0) {
          acc_t r = acc_t(0);
          for (int64_t e = 0; e < E; ++e) {
            r += norm_term<acc_t>(load_elem(x_img, xoff + e * L.x_embed_stride) - mu[e], norm);
          }
          const PullHinge<acc_t> uq = unlabeled_hinge(pixel_norm(r, norm, x_img + xoff, L.x_embed_stride, mu, E),
                                                      delta_d, norm);
          q2 = uq.h * uq.h;
          coef = uq.coef;
        }
        sh_coef[tid] = coef;
        q2 = block_sum(q2, scratch);  // also makes sh_coef visible to the block
        if (tid == 0) q_out[k] += q2;
        for (int64_t cell = tid; cell < parts * E; cell += threads) {
          const int64_t part = cell / E, e = cell - part * E;
          const acc_t me = mu[e];
          acc_t sum = acc_t(0);
          for (int64_t j = part; j < count; j += parts) {
            const int64_t xo = sh_xoff[j];
            if (xo >= 0) sum += sh_coef[j] * hinge_direction(load_elem(x_img, xo + e * L.x_embed_stride) - me, norm);
          }
          if (parts == 1) {
            g_out[k * E + e] += sum;  // cell e is this thread's alone
          } else {
            sh_cells[cell] = sum;
          }
        }
        if (parts > 1) {
          __syncthreads();
          for (int64_t e = tid; e < E; e += threads) {
            acc_t sum = acc_t(0);
            for (int64_t part = 0; part < parts; ++part) sum += sh_cells[part * E + e];
            g_out[k * E + e] += sum;
          }
        }
        __syncthreads();  // sh_coef and sh_cells are rewritten for the next cluster
      }
    }
  }
}

// ---- compaction of the clusters present (paper normalisation) ------------------------
// One block per image: present[b, 0 .. C_b) = the slots k < K with
// counts[b, k] > 0 in increasing order, num_present[b] = C_b. counts is
// (B, K + 1) (the last column: unlabeled pixels). Reads counts once.
__global__ void __launch_bounds__(kCompactThreads)
    compact_present_kernel(const int64_t* __restrict__ counts, int64_t B, int64_t K, int* __restrict__ present,
                           int* __restrict__ num_present) {
  DISCLOSS_SHARED_ARRAY(int, scratch, 33);
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    int offset = 0;
    for (int64_t base = 0; base < K; base += blockDim.x) {
      const int64_t k = base + threadIdx.x;
      const int flag = (k < K && counts[b * (K + 1) + k] > 0) ? 1 : 0;
      int total = 0;
      const int pos = block_exclusive_scan(flag, scratch, &total);
      if (flag) present[b * K + offset + pos] = static_cast<int>(k);
      offset += total;
    }
    if (threadIdx.x == 0) num_present[b] = offset;
  }
}

// ---- finalize (forward) ------------------------------------------------------------
// Block (b, t) of B * tiles (paper), block t of tiles (chainer). Each block
// sums its share of: var (weighted hinge sums of the clusters present; chainer:
// slot totals over the batch), reg (norms of means) and dist (push hinge over
// pairs: paper, pairs (i, j > i) of image b's present clusters, rows i = t,
// t + tiles, ...; chainer, all slot pairs of all images) and, with the
// unlabeled push (push_sums not null), the push sums of the clusters present.
// It writes 4 partials; the last block adds them in block order, applies the
// weights and the reduction and writes var, dist, reg, push. Reads means,
// counts (B, K + 1), hinge and push sums through the cache (means O(C^2 E)
// times over the pairs, from L1/L2).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_forward_kernel(const LossConfig c, int64_t B, int64_t E, int64_t tiles, const acc_t* __restrict__ means,
                            const int64_t* __restrict__ counts, const acc_t* __restrict__ hinge,
                            const acc_t* __restrict__ push_sums, const int* __restrict__ present,
                            const int* __restrict__ num_present, acc_t* __restrict__ partials,
                            unsigned* __restrict__ tickets, scalar_t* __restrict__ var_out,
                            scalar_t* __restrict__ dist_out, scalar_t* __restrict__ reg_out,
                            scalar_t* __restrict__ push_out) {
  DISCLOSS_SHARED_ARRAY(acc_t, scratch, 32);
  DISCLOSS_SHARED(bool, is_last);
  const int64_t K = c.num_slots;
  const bool paper = c.normalization == Normalization::Paper;
  const int norm = c.norm;
  const acc_t delta_d = acc_t(c.delta_d);
  const int64_t t = blockIdx.x % tiles;
  const int64_t stride = tiles * blockDim.x;
  acc_t v = acc_t(0), d = acc_t(0), r = acc_t(0), u = acc_t(0);
  if (paper) {
    const int64_t b = blockIdx.x / tiles;
    const int64_t C = num_present[b];
    const int* P = present + b * K;
    const acc_t* mu = means + b * K * E;
    for (int64_t i = t * blockDim.x + threadIdx.x; i < C; i += stride) {
      const int64_t k = P[i];
      v += var_weight<acc_t>(c, C, counts[b * (K + 1) + k], 0) * hinge[b * K + k];
      if (push_sums != nullptr) u += push_sums[b * K + k];
      r += mean_distance<acc_t>(mu + k * E, nullptr, E, norm);  // ||mu_k||, range-safe
    }
    for (int64_t i = t; i < C; i += tiles) {
      const acc_t* mi = mu + int64_t(P[i]) * E;
      for (int64_t j = i + 1 + threadIdx.x; j < C; j += blockDim.x) {
        const acc_t p = push_hinge(mean_distance(mi, mu + int64_t(P[j]) * E, E, norm), delta_d);
        d += p * p;
      }
    }
  } else {
    for (int64_t k = t * blockDim.x + threadIdx.x; k < K; k += stride) {
      int64_t n = 0;
      acc_t h = acc_t(0), s = acc_t(0);
      for (int64_t b = 0; b < B; ++b) {
        n += counts[b * (K + 1) + k];
        h += hinge[b * K + k];
        for (int64_t e = 0; e < E; ++e) s += norm_term<acc_t>(means[(b * K + k) * E + e], norm);
      }
      v += var_weight<acc_t>(c, 0, 0, n) * h;
      r += finish_norm(s, norm);
    }
    for (int64_t i = t; i < B * K; i += tiles) {
      const int64_t b = i / K, k = i - b * K;
      const acc_t* mu = means + b * K * E;
      for (int64_t l = k + 1 + threadIdx.x; l < K; l += blockDim.x) {
        const acc_t p = push_hinge(mean_distance(mu + k * E, mu + l * E, E, norm), delta_d);
        d += p * p;
      }
    }
  }
  v = block_sum(v, scratch);
  d = block_sum(d, scratch);
  r = block_sum(r, scratch);
  u = block_sum(u, scratch);
  if (threadIdx.x == 0) {
    acc_t* out = partials + int64_t(blockIdx.x) * 4;
    out[0] = v;
    out[1] = d;
    out[2] = r;
    out[3] = u;
    __threadfence();  // the partials are visible before the ticket is taken
    is_last = atomicAdd(tickets, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();

  const acc_t alpha = acc_t(c.alpha), beta = acc_t(c.beta), gamma = acc_t(c.gamma);
  if (paper) {
    const bool per_image = c.reduction == Reduction::None;
    acc_t sv = acc_t(0), sd = acc_t(0), sr = acc_t(0), su = acc_t(0);
    for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
      acc_t pv = acc_t(0), pd = acc_t(0), pr = acc_t(0), pu = acc_t(0);
      for (int64_t w = 0; w < tiles; ++w) {
        const acc_t* q = partials + (b * tiles + w) * 4;
        pv += __ldcg(q);
        pd += __ldcg(q + 1);
        pr += __ldcg(q + 2);
        pu += __ldcg(q + 3);
      }
      const int64_t C = num_present[b];
      const acc_t tv = alpha * pv;
      const acc_t td = beta * dist_pair_weight<acc_t>(c, C, B) * pd;
      const acc_t tr = gamma * (reg_weight<acc_t>(c, C, B) * pr);
      // The push's weight w / (C N_U) holds unlabeled_push itself (CPU: the same).
      const acc_t tu = push_sums != nullptr ? pu * unlabeled_push_weight<acc_t>(c, C, counts[b * (K + 1) + K])
                                            : acc_t(0);
      if (per_image) {
        var_out[b] = static_cast<scalar_t>(tv);
        dist_out[b] = static_cast<scalar_t>(td);
        reg_out[b] = static_cast<scalar_t>(tr);
        push_out[b] = static_cast<scalar_t>(tu);
      } else {
        sv += tv;
        sd += td;
        sr += tr;
        su += tu;
      }
    }
    if (!per_image) {
      sv = block_sum(sv, scratch);
      sd = block_sum(sd, scratch);
      sr = block_sum(sr, scratch);
      su = block_sum(su, scratch);
      if (threadIdx.x == 0) {
        const acc_t scale = reduction_scale<acc_t>(c, B);
        var_out[0] = static_cast<scalar_t>(sv * scale);
        dist_out[0] = static_cast<scalar_t>(sd * scale);
        reg_out[0] = static_cast<scalar_t>(sr * scale);
        push_out[0] = static_cast<scalar_t>(su * scale);
      }
    }
  } else if (threadIdx.x == 0) {
    acc_t pv = acc_t(0), pd = acc_t(0), pr = acc_t(0);
    for (int64_t w = 0; w < tiles; ++w) {
      pv += __ldcg(partials + w * 4);
      pd += __ldcg(partials + w * 4 + 1);
      pr += __ldcg(partials + w * 4 + 2);
    }
    var_out[0] = static_cast<scalar_t>(alpha * pv);
    dist_out[0] = static_cast<scalar_t>(beta * dist_pair_weight<acc_t>(c, 0, B) * pd);
    reg_out[0] = static_cast<scalar_t>(gamma * reg_weight<acc_t>(c, 0, B) * pr);
    push_out[0] = static_cast<scalar_t>(acc_t(0));
  }
}

// ---- backward: per-slot coefficients --------------------------------------------------
// One block per (image, slot) row (grid-stride). For a slot with pixels:
//   var_coef = grad_var * alpha * scale * var_weight,
//   mean_coef = (-var_coef * V + push gradient + reg gradient) / n,
// the push gradient summed over the other clusters of the image (paper:
// present ones; chainer: every slot), in a fixed order: threads compute the
// pair coefficients of blockDim clusters at a time, then each (part, e) cell
// is owned by one thread. Slots without pixels get 0. With the unlabeled push
// (push_grad not null), the push's mean path -push_coef[b] * V^push joins
// mean_coef (before the division by n, like -var_coef * V), and the block of
// slot 0 of image b writes push_coef[b] = grad_push * scale * w / (C N_U),
// the weight of d(q^2)/dx for the image's unlabeled pixels. Reads means,
// counts (B, K + 1), hinge_grad_sums and push_grad_sums through the cache;
// writes var_coef, mean_coef and push_coef once.
template <typename acc_t>
__device__ __forceinline__ acc_t image_push_coef(const LossConfig& c, const acc_t* grad_push, bool per_image,
                                                 int64_t b, int64_t B, int64_t C, int64_t n_unlabeled) {
  return grad_push[per_image ? b : 0] * reduction_scale<acc_t>(c, B) *
         unlabeled_push_weight<acc_t>(c, C, n_unlabeled);
}

template <typename acc_t>
__global__ void __launch_bounds__(kCoefThreads)
    slot_coefficients_kernel(const LossConfig c, int64_t B, int64_t E, const acc_t* __restrict__ grad_var,
                             const acc_t* __restrict__ grad_dist, const acc_t* __restrict__ grad_reg,
                             const acc_t* __restrict__ grad_push, bool per_image, const acc_t* __restrict__ means,
                             const int64_t* __restrict__ counts, const acc_t* __restrict__ hinge_grad,
                             const acc_t* __restrict__ push_grad, const int* __restrict__ present,
                             const int* __restrict__ num_present, acc_t* __restrict__ var_coef, acc_t* mean_coef,
                             acc_t* __restrict__ push_coef) {
  DISCLOSS_SHARED_ARRAY(acc_t, sh_pair_coef, kCoefThreads);
  DISCLOSS_SHARED_ARRAY(int, sh_pair_slot, kCoefThreads);
  DISCLOSS_SHARED_ARRAY(acc_t, sh_push, kCoefThreads);
  DISCLOSS_SHARED(acc_t, sh_a);
  DISCLOSS_SHARED(acc_t, sh_wd);
  DISCLOSS_SHARED(acc_t, sh_wr);
  DISCLOSS_SHARED(acc_t, sh_wu);
  DISCLOSS_SHARED(acc_t, sh_reg_norm);
  const int64_t K = c.num_slots;
  const bool paper = c.normalization == Normalization::Paper;
  const int norm = c.norm;
  const acc_t delta_d = acc_t(c.delta_d);
  const acc_t scale = reduction_scale<acc_t>(c, B);
  const int64_t threads = blockDim.x;
  // Push-gradient cells: parts x E, each owned by one thread; in shared
  // memory when they fit, else (E > blockDim, parts = 1) in the output row.
  const int64_t parts = E <= threads ? threads / E : 1;
  for (int64_t row = blockIdx.x; row < B * K; row += gridDim.x) {
    const int64_t b = row / K, k = row - b * K;
    const int64_t n = counts[b * (K + 1) + k];
    acc_t* out = mean_coef + row * E;
    if (push_grad != nullptr && k == 0 && threadIdx.x == 0) {
      push_coef[b] = image_push_coef(c, grad_push, per_image, b, B, int64_t(num_present[b]), counts[b * (K + 1) + K]);
    }
    if (n == 0) {  // uniform over the block
      if (threadIdx.x == 0) var_coef[row] = acc_t(0);
      for (int64_t e = threadIdx.x; e < E; e += threads) out[e] = acc_t(0);
      continue;
    }
    const int64_t C = paper ? int64_t(num_present[b]) : K;
    const int* P = paper ? present + b * K : nullptr;
    const acc_t* mu_b = means + b * K * E;
    const acc_t* mu = mu_b + k * E;
    if (threadIdx.x == 0) {
      const int64_t gi = per_image ? b : 0;
      int64_t slot_total = 0;
      acc_t reg_norm = acc_t(0);
      if (paper) {
        reg_norm = mean_distance<acc_t>(mu, nullptr, E, norm);  // ||mu||, range-safe
      } else {
        for (int64_t bb = 0; bb < B; ++bb) {
          slot_total += counts[bb * (K + 1) + k];
          for (int64_t e = 0; e < E; ++e) reg_norm += norm_term<acc_t>(means[(bb * K + k) * E + e], norm);
        }
        reg_norm = finish_norm(reg_norm, norm);
      }
      sh_a = grad_var[gi] * acc_t(c.alpha) * scale * var_weight<acc_t>(c, C, n, slot_total);
      sh_wd = grad_dist[gi] * acc_t(c.beta) * scale * dist_pair_weight<acc_t>(c, C, B);
      sh_wr = grad_reg[gi] * acc_t(c.gamma) * scale * reg_weight<acc_t>(c, C, B);
      sh_wu = push_grad != nullptr ? image_push_coef(c, grad_push, per_image, b, B, C, counts[b * (K + 1) + K])
                                   : acc_t(0);
      sh_reg_norm = reg_norm;
    }
    __syncthreads();
    const acc_t a = sh_a, wd = sh_wd, wr = sh_wr, wu = sh_wu, reg_norm = sh_reg_norm;
    acc_t* push = E <= threads ? sh_push : out;
    for (int64_t cell = threadIdx.x; cell < parts * E; cell += threads) push[cell] = acc_t(0);
    if (wd != acc_t(0)) {
      for (int64_t base = 0; base < C; base += threads) {
        const int64_t i = base + threadIdx.x;
        acc_t coef = acc_t(0);
        int l = -1;
        if (i < C) {
          l = P ? P[i] : static_cast<int>(i);
          if (l != k) {
            const acc_t dist = mean_distance(mu, mu_b + int64_t(l) * E, E, norm);
            const acc_t p = push_hinge(dist, delta_d);
            if (p != acc_t(0)) {  // a NaN p goes on and reaches the gradient (CPU: add_push_grad)
              // d(p^2)/d mu_k = -2 p wd * d||mu_k - mu_l|| / d mu_k; the 1/r of
              // the L2 norm is folded in here (0 at r = 0; a NaN r gives NaN).
              coef = norm == 2 ? (dist != acc_t(0) ? -2 * p * wd / dist : acc_t(0)) : -2 * p * wd;
            }
          }
        }
        sh_pair_coef[threadIdx.x] = coef;
        sh_pair_slot[threadIdx.x] = l;
        __syncthreads();
        const int64_t count = min(threads, C - base);
        for (int64_t cell = threadIdx.x; cell < parts * E; cell += threads) {
          const int64_t part = cell / E, e = cell - part * E;
          const acc_t me = mu[e];
          acc_t s = push[cell];
          for (int64_t jj = part; jj < count; jj += parts) {
            const acc_t cf = sh_pair_coef[jj];
            if (cf != acc_t(0)) s += cf * hinge_direction(me - mu_b[int64_t(sh_pair_slot[jj]) * E + e], norm);
          }
          push[cell] = s;
        }
        __syncthreads();
      }
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e < E; e += threads) {
      acc_t g = -a * hinge_grad[row * E + e];
      // d(q^2)/dmu_c = -d(q^2)/dx_i, summed over the unlabeled pixels in forward.
      if (push_grad != nullptr) g -= wu * push_grad[row * E + e];
      for (int64_t part = 0; part < parts; ++part) g += push[part * E + e];
      if (paper || norm == 2) {
        g += wr * norm_grad(mu[e], reg_norm, norm);
      } else {
        g += wr * norm_grad(mu[e], acc_t(0), 1);
      }
      out[e] = g / acc_t(n);
    }
    if (threadIdx.x == 0) var_coef[row] = a;
    __syncthreads();  // shared memory is reused by the next row
  }
}

// ---- pass 3: the gradient ----------------------------------------------------------
// One thread per pixel: grad x_i = var_coef[c] * d(h_i^2)/dx_i + mean_coef[c]
// for a pixel of cluster c; with the unlabeled push (push_coef not null), for
// an unlabeled pixel of an image with C > 0 clusters,
// grad x_i = push_coef[b] * sum_c d(q_ic^2)/dx_i (kPushGradWidth components
// at a time, q recomputed per group: O(C E (E / kPushGradWidth + 1)));
// 0 for every other pixel. Reads the label once, x twice (the second read of
// the pixel's E values hits L1; C+1 times for an unlabeled pixel) and per-slot
// rows through the cache; writes each gradient element once.
template <typename scalar_t, typename label_t>
__global__ void __launch_bounds__(kGradThreads)
    write_grad_kernel(const scalar_t* __restrict__ x, const label_t* __restrict__ labels, scalar_t* __restrict__ grad,
                      const PixelLayout L, const LossConfig c, bool unit, const int64_t* __restrict__ slot_ids,
                      const int64_t* __restrict__ num_ids, const typename Elem<scalar_t>::acc* __restrict__ means,
                      const typename Elem<scalar_t>::acc* __restrict__ var_coef,
                      const typename Elem<scalar_t>::acc* __restrict__ mean_coef,
                      const typename Elem<scalar_t>::acc* __restrict__ push_coef, const int* __restrict__ present,
                      const int* __restrict__ num_present) {
  using acc_t = typename Elem<scalar_t>::acc;
  const int64_t K = c.num_slots, E = L.embed_dim, N = L.num_pixels;
  const int norm = c.norm;
  const acc_t delta_v = acc_t(c.delta_v);
  const acc_t delta_d = acc_t(c.delta_d);
  for (int64_t b = blockIdx.y; b < L.batch; b += gridDim.y) {
    const ImageSlots map = image_slots(slot_ids, num_ids, b, K);
    const int64_t C = push_coef != nullptr ? int64_t(num_present[b]) : 0;
    for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < N; p += int64_t(gridDim.x) * blockDim.x) {
      const PixelOffsets o = unit ? PixelOffsets{p, p, p} : pixel_offsets(L, p);
      const scalar_t* xp = x + b * L.x_batch_stride + o.x;
      scalar_t* gp = grad + b * L.grad_batch_stride + o.grad;
      const int64_t s = lookup_slot(static_cast<int64_t>(labels[b * L.label_batch_stride + o.label]), c, map);
      if (s == kIgnored && C > 0) {  // an unlabeled pixel under the push
        const acc_t w = push_coef[b];
        const int* P = present + b * K;
        for (int64_t e0 = 0; e0 < E; e0 += kPushGradWidth) {
          acc_t g[kPushGradWidth];
#pragma unroll
          for (int j = 0; j < kPushGradWidth; ++j) g[j] = acc_t(0);
          for (int64_t i = 0; i < C; ++i) {
            const acc_t* mu = means + (b * K + P[i]) * E;
            acc_t r = acc_t(0);
            for (int64_t e = 0; e < E; ++e) {
              r += norm_term<acc_t>(load_elem(xp, e * L.x_embed_stride) - __ldg(mu + e), norm);
            }
            const acc_t coef =
                w * unlabeled_hinge(pixel_norm(r, norm, xp, L.x_embed_stride, mu, E), delta_d, norm).coef;
#pragma unroll
            for (int j = 0; j < kPushGradWidth; ++j) {
              const int64_t e = e0 + j;
              if (e < E) g[j] += coef * hinge_direction(load_elem(xp, e * L.x_embed_stride) - __ldg(mu + e), norm);
            }
          }
#pragma unroll
          for (int j = 0; j < kPushGradWidth; ++j) {
            const int64_t e = e0 + j;
            if (e < E) gp[e * L.grad_embed_stride] = static_cast<scalar_t>(g[j]);
          }
        }
        continue;
      }
      if (s < 0) {
        for (int64_t e = 0; e < E; ++e) gp[e * L.grad_embed_stride] = static_cast<scalar_t>(acc_t(0));
        continue;
      }
      const int64_t row = b * K + s;
      const acc_t* mu = means + row * E;
      const acc_t* bc = mean_coef + row * E;
      acc_t r = acc_t(0);
      for (int64_t e = 0; e < E; ++e) r += norm_term<acc_t>(load_elem(xp, e * L.x_embed_stride) - __ldg(mu + e), norm);
      const acc_t coef =
          __ldg(var_coef + row) * pull_hinge(pixel_norm(r, norm, xp, L.x_embed_stride, mu, E), delta_v, norm).coef;
      for (int64_t e = 0; e < E; ++e) {
        const acc_t dlt = load_elem(xp, e * L.x_embed_stride) - __ldg(mu + e);
        gp[e * L.grad_embed_stride] = static_cast<scalar_t>(coef * hinge_direction(dlt, norm) + __ldg(bc + e));
      }
    }
  }
}

// ---- host side ------------------------------------------------------------------------

int64_t grid_for(int64_t n, int threads) {
  return std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, threads), int64_t(sm_count()) * 32));
}

void check_slots(const LossConfig& c) {
  TORCH_CHECK(c.num_slots <= kMaxSlots, "max_instances: the CUDA kernels support at most ", kMaxSlots,
              " slots, got ", c.num_slots);
}

// present/num_present of the paper normalisation (empty tensors for chainer).
std::pair<at::Tensor, at::Tensor> compact_present(const at::Tensor& counts, const LossConfig& c, int64_t B,
                                                  cudaStream_t stream) {
  const auto opts = counts.options().dtype(at::kInt);
  if (c.normalization != Normalization::Paper || B == 0) return {at::empty({0}, opts), at::empty({0}, opts)};
  const int64_t K = c.num_slots;
  at::Tensor present = at::empty({B, K}, opts), num_present = at::empty({B}, opts);
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(B, 65535));
  DISCLOSS_LAUNCH(compact_present_kernel, kCompactThreads, grid, kCompactThreads, 0, stream)(counts.data_ptr<int64_t>(), B, K,
                                                               present.data_ptr<int>(), num_present.data_ptr<int>());
  return {present, num_present};
}

template <typename scalar_t, typename label_t, bool kHinge>
void launch_slot_sums(const at::Tensor& x, const at::Tensor& lab, const PixelLayout& L, const LossConfig& c,
                      const SumsPlan& plan, const SlotMapArgs& map, const void* centers, void* sums_out,
                      void* extras_out, int64_t extras_row, int64_t* unlabeled_out, cudaStream_t stream) {
  using acc_t = typename Elem<scalar_t>::acc;
  using Types = PassTypes<acc_t, kHinge>;
  const int64_t blocks = plan.chunks * plan.ranges * L.batch;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "embeddings: too many pixel chunks for one launch (", blocks,
              ")");
  const size_t smem = plan.global_atomics
                          ? 0
                          : static_cast<size_t>(plan.warps * plan.slots_per_range *
                                                (L.embed_dim * int64_t(sizeof(acc_t)) +
                                                 int64_t(sizeof(typename Types::shared_extra))));
  DISCLOSS_LAUNCH(slot_sums_kernel<scalar_t, label_t, kHinge>, kSumWarps * 32, static_cast<unsigned>(blocks), plan.warps * 32, smem, stream)(
      static_cast<const scalar_t*>(x.data_ptr()), static_cast<const label_t*>(lab.data_ptr()), L, c, plan,
      map.slot_ids, map.num_ids, static_cast<const acc_t*>(centers), static_cast<acc_t*>(sums_out),
      static_cast<typename Types::global_extra*>(extras_out), extras_row, unlabeled_out);
}

// Chunks of the push sums (pass 2b): enough blocks to fill the device, at
// most kPartialBudget elements of per-chunk partials, whole tiles.
struct PushPlan {
  int64_t chunks;
  int64_t chunk_px;
};

PushPlan plan_push(const PixelLayout& L, int64_t K) {
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

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "discloss_forward_cuda", [&] {
    using acc_t = typename Elem<scalar_t>::acc;
    // pass 1
    at::Tensor part_sums, part_extras;
    if (!have_pixels) {
      means.zero_();
    } else {
      // The pivots: each slot's lowest-index pixel's embedding (exact ties, see the file comment).
      at::Tensor first_px = at::full({B, K}, N, x.options().dtype(at::kLong));
      at::Tensor pivots = at::empty({B, K, E}, acc_opts);
      dispatch_label_type(lab.scalar_type(), [&](auto label_tag) {
        using label_t = decltype(label_tag);
        const dim3 grid(static_cast<unsigned>(grid_for(N, kElementwiseThreads)),
                        static_cast<unsigned>(std::min<int64_t>(B, 65535)));
        DISCLOSS_LAUNCH(first_pixel_kernel<label_t>, kElementwiseThreads, grid, kElementwiseThreads, 0, stream)(
            static_cast<const label_t*>(lab.data_ptr()), L, c, plan.unit, map.slot_ids, map.num_ids,
            first_px.data_ptr<int64_t>());
      });
      DISCLOSS_LAUNCH(gather_pivots_kernel<scalar_t>, kElementwiseThreads, grid_for(B * K * E, kElementwiseThreads), kElementwiseThreads, 0, stream)(
          static_cast<const scalar_t*>(x.data_ptr()), L, K, first_px.data_ptr<int64_t>(), pivots.data_ptr<acc_t>());
      dispatch_label_type(lab.scalar_type(), [&](auto label_tag) {
        using label_t = decltype(label_tag);
        if (plan.global_atomics) {
          means.zero_();
          launch_slot_sums<scalar_t, label_t, false>(x, lab, L, c, plan, map, pivots.data_ptr(), means.data_ptr(),
                                                     counts.data_ptr(), K + 1, unlabeled_out, stream);
          DISCLOSS_LAUNCH(finish_means_kernel<acc_t>, kElementwiseThreads, grid_for(B * K * E, kElementwiseThreads), kElementwiseThreads, 0, stream)(
              means.data_ptr<acc_t>(), counts.data_ptr<int64_t>(), K + 1, 1, B, K, E, pivots.data_ptr<acc_t>(),
              means.data_ptr<acc_t>(), counts.data_ptr<int64_t>(), false);
        } else if (plan.direct) {
          launch_slot_sums<scalar_t, label_t, false>(x, lab, L, c, plan, map, pivots.data_ptr(), means.data_ptr(),
                                                     counts.data_ptr(), K + 1, unlabeled_out, stream);
        } else {
          part_sums = at::empty({plan.chunks, B, K, E}, acc_opts);
          part_extras = at::empty({plan.chunks, B, K}, x.options().dtype(at::kLong));
          launch_slot_sums<scalar_t, label_t, false>(x, lab, L, c, plan, map, pivots.data_ptr(),
                                                     part_sums.data_ptr(), part_extras.data_ptr(), K, unlabeled_out,
                                                     stream);
          DISCLOSS_LAUNCH(finish_means_kernel<acc_t>, kElementwiseThreads, grid_for(B * K * E, kElementwiseThreads), kElementwiseThreads, 0, stream)(
              part_sums.data_ptr<acc_t>(), part_extras.data_ptr<int64_t>(), K, plan.chunks, B, K, E,
              pivots.data_ptr<acc_t>(), means.data_ptr<acc_t>(), counts.data_ptr<int64_t>(), true);
        }
      });
    }

    // The clusters present (paper): needed by the push sums and the finalize.
    const auto present = compact_present(counts, c, B, stream);

    // pass 2
    if (!have_pixels) {
      hinge_grad.zero_();
      hinge.zero_();
    } else {
      dispatch_label_type(lab.scalar_type(), [&](auto label_tag) {
        using label_t = decltype(label_tag);
        if (plan.global_atomics) {
          hinge_grad.zero_();
          hinge.zero_();
          launch_slot_sums<scalar_t, label_t, true>(x, lab, L, c, plan, map, means.data_ptr(), hinge_grad.data_ptr(),
                                                    hinge.data_ptr(), K, nullptr, stream);
        } else if (plan.direct) {
          launch_slot_sums<scalar_t, label_t, true>(x, lab, L, c, plan, map, means.data_ptr(), hinge_grad.data_ptr(),
                                                    hinge.data_ptr(), K, nullptr, stream);
        } else {
          at::Tensor part_hinge = at::empty({plan.chunks, B, K}, acc_opts);
          launch_slot_sums<scalar_t, label_t, true>(x, lab, L, c, plan, map, means.data_ptr(), part_sums.data_ptr(),
                                                    part_hinge.data_ptr(), K, nullptr, stream);
          DISCLOSS_LAUNCH(sum_partials_kernel<acc_t>, kElementwiseThreads, grid_for(B * K * E, kElementwiseThreads), kElementwiseThreads, 0, stream)(
              part_sums.data_ptr<acc_t>(), plan.chunks, B * K * E, hinge_grad.data_ptr<acc_t>());
          DISCLOSS_LAUNCH(sum_partials_kernel<acc_t>, kElementwiseThreads, grid_for(B * K, kElementwiseThreads), kElementwiseThreads, 0, stream)(
              part_hinge.data_ptr<acc_t>(), plan.chunks, B * K, hinge.data_ptr<acc_t>());
        }
      });
    }

    // pass 2b: the unlabeled push's sums over the unlabeled pixels
    at::Tensor push_sums;
    if (with_push) {
      push_sums = at::zeros({B, K}, acc_opts);
      if (have_pixels) {
        const PushPlan pp = plan_push(L, K);
        const bool direct = pp.chunks == 1;
        at::Tensor part_push = direct ? push_sums : at::zeros({pp.chunks, B, K}, acc_opts);
        at::Tensor part_push_grad = direct ? push_grad : at::zeros({pp.chunks, B, K, E}, acc_opts);
        const bool unit = L.ndim == 1 && L.x_strides[0] == 1 && L.label_strides[0] == 1;
        const int64_t blocks = std::min<int64_t>(B * pp.chunks, int64_t(sm_count()) * 32);
        dispatch_label_type(lab.scalar_type(), [&](auto label_tag) {
          using label_t = decltype(label_tag);
          DISCLOSS_LAUNCH(unlabeled_push_kernel<scalar_t, label_t>, kPushThreads, static_cast<unsigned>(blocks), kPushThreads, 0, stream)(
              static_cast<const scalar_t*>(x.data_ptr()), static_cast<const label_t*>(lab.data_ptr()), L, c, unit,
              pp.chunks, pp.chunk_px, means.data_ptr<acc_t>(), present.first.data_ptr<int>(),
              present.second.data_ptr<int>(), part_push.data_ptr<acc_t>(), part_push_grad.data_ptr<acc_t>());
        });
        if (!direct) {
          DISCLOSS_LAUNCH(sum_partials_kernel<acc_t>, kElementwiseThreads, grid_for(B * K * E, kElementwiseThreads), kElementwiseThreads, 0, stream)(
              part_push_grad.data_ptr<acc_t>(), pp.chunks, B * K * E, push_grad.data_ptr<acc_t>());
          DISCLOSS_LAUNCH(sum_partials_kernel<acc_t>, kElementwiseThreads, grid_for(B * K, kElementwiseThreads), kElementwiseThreads, 0, stream)(
              part_push.data_ptr<acc_t>(), pp.chunks, B * K, push_sums.data_ptr<acc_t>());
        }
      }
    }

    // finalize
    const int64_t tiles = paper ? std::min<int64_t>(std::max<int64_t>(ceil_div(K, 64), 1), 64)
                                : std::min<int64_t>(std::max<int64_t>(ceil_div(B * K, 64), 1), 1024);
    const int64_t blocks = paper ? B * tiles : tiles;
    TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "embeddings: batch too large for one launch (", B, ")");
    at::Tensor partials = at::empty({blocks, 4}, acc_opts);
    at::Tensor tickets = at::zeros({1}, x.options().dtype(at::kInt));
    DISCLOSS_LAUNCH(finalize_forward_kernel<scalar_t, acc_t>, kFinalizeThreads, static_cast<unsigned>(blocks), kFinalizeThreads, 0, stream)(
        c, B, E, tiles, means.data_ptr<acc_t>(), counts.data_ptr<int64_t>(), hinge.data_ptr<acc_t>(),
        with_push ? push_sums.data_ptr<acc_t>() : nullptr, paper ? present.first.data_ptr<int>() : nullptr,
        paper ? present.second.data_ptr<int>() : nullptr, partials.data_ptr<acc_t>(),
        reinterpret_cast<unsigned*>(tickets.data_ptr<int>()), var.data_ptr<scalar_t>(), dist.data_ptr<scalar_t>(),
        reg.data_ptr<scalar_t>(), push.data_ptr<scalar_t>());
  });
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
  const int64_t B = L.batch, E = L.embed_dim, K = c.num_slots, N = L.num_pixels;
  const bool with_push = c.unlabeled_push > 0;
  const auto acc_type = accumulate_type(x.scalar_type());
  const auto acc_opts = x.options().dtype(acc_type);
  at::Tensor var_coef = at::empty({B, K}, acc_opts);
  at::Tensor mean_coef = at::empty({B, K, E}, acc_opts);
  at::Tensor push_coef = at::empty({with_push ? B : 0}, acc_opts);
  at::Tensor gv = grad_var.to(acc_type).contiguous(), gd = grad_dist.to(acc_type).contiguous(),
             gr = grad_reg.to(acc_type).contiguous(), gp = grad_push.to(acc_type).contiguous();
  at::Tensor means_c = means.contiguous(), counts_c = counts.contiguous(), hg = hinge_grad_sums.contiguous(),
             pg = push_grad_sums.contiguous();
  const SlotMapTensors map_t = slot_map_tensors(slot_ids, num_ids);
  const SlotMapArgs map = map_t.args();
  const bool unit = L.ndim == 1 && L.x_strides[0] == 1 && L.label_strides[0] == 1 && L.grad_strides[0] == 1;
  const auto present = compact_present(counts_c, c, B, stream);
  const bool paper = c.normalization == Normalization::Paper;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "discloss_backward_cuda", [&] {
    using acc_t = typename Elem<scalar_t>::acc;
    const int64_t coef_blocks = std::max<int64_t>(1, std::min<int64_t>(B * K, int64_t(sm_count()) * 32));
    DISCLOSS_LAUNCH(slot_coefficients_kernel<acc_t>, kCoefThreads, static_cast<unsigned>(coef_blocks), kCoefThreads, 0, stream)(
        c, B, E, gv.data_ptr<acc_t>(), gd.data_ptr<acc_t>(), gr.data_ptr<acc_t>(), gp.data_ptr<acc_t>(),
        c.reduction == Reduction::None, means_c.data_ptr<acc_t>(), counts_c.data_ptr<int64_t>(), hg.data_ptr<acc_t>(),
        with_push ? pg.data_ptr<acc_t>() : nullptr, paper ? present.first.data_ptr<int>() : nullptr,
        paper ? present.second.data_ptr<int>() : nullptr, var_coef.data_ptr<acc_t>(), mean_coef.data_ptr<acc_t>(),
        with_push ? push_coef.data_ptr<acc_t>() : nullptr);

    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(N, kGradThreads), 1 << 30)),
                    static_cast<unsigned>(std::min<int64_t>(B, 65535)));
    dispatch_label_type(lab.scalar_type(), [&](auto label_tag) {
      using label_t = decltype(label_tag);
      DISCLOSS_LAUNCH(write_grad_kernel<scalar_t, label_t>, kGradThreads, grid, kGradThreads, 0, stream)(
          static_cast<const scalar_t*>(x.data_ptr()), static_cast<const label_t*>(lab.data_ptr()),
          static_cast<scalar_t*>(grad.data_ptr()), L, c, unit, map.slot_ids, map.num_ids, means_c.data_ptr<acc_t>(),
          var_coef.data_ptr<acc_t>(), mean_coef.data_ptr<acc_t>(), with_push ? push_coef.data_ptr<acc_t>() : nullptr,
          paper ? present.first.data_ptr<int>() : nullptr, paper ? present.second.data_ptr<int>() : nullptr);
    });
  });
  return grad;
}

}  // namespace
}  // namespace cuda

DISCLOSS_REGISTER_KERNELS(m) {
  m.impl("forward", &cuda::forward_cuda);
  m.impl("backward", &cuda::backward_cuda);
}

}  // namespace discloss
