// Passes 1 and 2 of the CUDA op (DESIGN §3): the per-slot sums that give
// the means (pass 1) and the pull hinge's sums (pass 2), with the pivots of
// pass 1 and the additions of per-chunk partials.
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
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "passes.h"

namespace discloss {
namespace cuda {
namespace {

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
}  // namespace

at::Tensor slot_means(const at::Tensor& x, const at::Tensor& lab, const PixelLayout& L, const LossConfig& c,
                      const SumsPlan& plan, const SlotMapArgs& map, int64_t* unlabeled_out, at::Tensor& means,
                      at::Tensor& counts, cudaStream_t stream) {
  const int64_t B = L.batch, E = L.embed_dim, K = c.num_slots, N = L.num_pixels;
  const auto acc_opts = means.options();
  at::Tensor part_sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "discloss_slot_means_cuda", [&] {
    using acc_t = typename Elem<scalar_t>::acc;
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
    DISCLOSS_LAUNCH(gather_pivots_kernel<scalar_t>, kElementwiseThreads, grid_for(B * K * E, kElementwiseThreads),
                    kElementwiseThreads, 0, stream)(static_cast<const scalar_t*>(x.data_ptr()), L, K,
                                                    first_px.data_ptr<int64_t>(), pivots.data_ptr<acc_t>());
    dispatch_label_type(lab.scalar_type(), [&](auto label_tag) {
      using label_t = decltype(label_tag);
      if (plan.global_atomics) {
        means.zero_();
        launch_slot_sums<scalar_t, label_t, false>(x, lab, L, c, plan, map, pivots.data_ptr(), means.data_ptr(),
                                                   counts.data_ptr(), K + 1, unlabeled_out, stream);
        DISCLOSS_LAUNCH(finish_means_kernel<acc_t>, kElementwiseThreads, grid_for(B * K * E, kElementwiseThreads),
                        kElementwiseThreads, 0, stream)(means.data_ptr<acc_t>(), counts.data_ptr<int64_t>(), K + 1, 1,
                                                        B, K, E, pivots.data_ptr<acc_t>(), means.data_ptr<acc_t>(),
                                                        counts.data_ptr<int64_t>(), false);
      } else if (plan.direct) {
        launch_slot_sums<scalar_t, label_t, false>(x, lab, L, c, plan, map, pivots.data_ptr(), means.data_ptr(),
                                                   counts.data_ptr(), K + 1, unlabeled_out, stream);
      } else {
        part_sums = at::empty({plan.chunks, B, K, E}, acc_opts);
        at::Tensor part_extras = at::empty({plan.chunks, B, K}, x.options().dtype(at::kLong));
        launch_slot_sums<scalar_t, label_t, false>(x, lab, L, c, plan, map, pivots.data_ptr(), part_sums.data_ptr(),
                                                   part_extras.data_ptr(), K, unlabeled_out, stream);
        DISCLOSS_LAUNCH(finish_means_kernel<acc_t>, kElementwiseThreads, grid_for(B * K * E, kElementwiseThreads),
                        kElementwiseThreads, 0, stream)(part_sums.data_ptr<acc_t>(), part_extras.data_ptr<int64_t>(),
                                                        K, plan.chunks, B, K, E, pivots.data_ptr<acc_t>(),
                                                        means.data_ptr<acc_t>(), counts.data_ptr<int64_t>(), true);
      }
    });
  });
  return part_sums;
}

void hinge_sums(const at::Tensor& x, const at::Tensor& lab, const PixelLayout& L, const LossConfig& c,
                const SumsPlan& plan, const SlotMapArgs& map, const at::Tensor& means, at::Tensor& hinge_grad,
                at::Tensor& hinge, const at::Tensor& part_sums, cudaStream_t stream) {
  const int64_t B = L.batch, K = c.num_slots;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "discloss_hinge_sums_cuda", [&] {
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
        at::Tensor part_hinge = at::empty({plan.chunks, B, K}, hinge.options());
        launch_slot_sums<scalar_t, label_t, true>(x, lab, L, c, plan, map, means.data_ptr(), part_sums.data_ptr(),
                                                  part_hinge.data_ptr(), K, nullptr, stream);
        sum_partials(part_sums, plan.chunks, hinge_grad, stream);
        sum_partials(part_hinge, plan.chunks, hinge, stream);
      }
    });
  });
}

void sum_partials(const at::Tensor& part, int64_t chunks, at::Tensor& out, cudaStream_t stream) {
  const int64_t n = out.numel();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "discloss_sum_partials_cuda", [&] {
    DISCLOSS_LAUNCH(sum_partials_kernel<scalar_t>, kElementwiseThreads, grid_for(n, kElementwiseThreads),
                    kElementwiseThreads, 0, stream)(part.data_ptr<scalar_t>(), chunks, n, out.data_ptr<scalar_t>());
  });
}

}  // namespace cuda
}  // namespace discloss
