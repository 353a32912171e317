// What the CUDA kernels of csrc/cuda share: tuning constants, the element
// types and their loads, a pixel's norm, and the slot lookups.
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
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

#include "../discloss.h"
#include "reduce.cuh"
#include "runtime.cuh"

namespace discloss {
namespace cuda {

// ---- tuning constants ----------------------------------------------------------
constexpr int kM = 8;                        // consecutive pixels per lane
constexpr int64_t kTilePx = 32 * kM;         // pixels per warp tile
constexpr int kSumWarps = 4;                 // warps per block of the streaming passes
// A launch may use 48 KiB of shared memory, static and dynamic together
// (more needs an opt-in attribute); slot_sums_kernel's static part (its
// image's slot map and unlabeled count) is reserved from that.
constexpr int64_t kSharedLimit = 48 * 1024;
constexpr int64_t kSumsStaticShared = 64;
constexpr int64_t kSharedBudget = kSharedLimit - kSumsStaticShared;  // bytes of accumulators per block
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

// The op's slot map as raw pointers (both null without one).
struct SlotMapArgs {
  const int64_t* slot_ids;
  const int64_t* num_ids;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The slot map of one image (DESIGN §1, arbitrary ids): ids = its row of
// slot_ids and n = num_ids[b] when the op got a slot map, else n = -1; slot_of
// then gives the slot (the identity, or Chainer's 1..K), as it does for an
// image whose ids all lie in [0, K) (n = -1 there too).
struct ImageSlots {
  const int64_t* ids;
  int64_t n;
};
static_assert(sizeof(ImageSlots) + sizeof(unsigned) + alignof(ImageSlots) <= kSumsStaticShared,
              "kSumsStaticShared must hold slot_sums_kernel's static shared memory");

__device__ __forceinline__ ImageSlots image_slots(const int64_t* slot_ids, const int64_t* num_ids, int64_t b,
                                                  int64_t K) {
  if (slot_ids == nullptr) return {nullptr, -1};
  // num_ids is untrusted input (DESIGN §7), and checking it on the host would
  // cost a synchronisation: the search never looks past the row's K ids. An
  // unsorted or inconsistent row then gives wrong slots, never an access out
  // of bounds (the CPU kernels reject such a map).
  const int64_t n = __ldg(num_ids + b);
  return {slot_ids + b * K, n < K ? n : K};
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

}  // namespace cuda
}  // namespace discloss
