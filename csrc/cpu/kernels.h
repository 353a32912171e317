// The three streaming passes of DESIGN §3 over a chunk of pixels of one image,
// on raw pointers. This header is compiled four times (kernels_default.cpp,
// kernels_avx2.cpp, kernels_avx512.cpp, kernels_avx512bf16.cpp) with
// different instruction sets, each copy in its own namespace, and loss.cpp
// picks among them at run time. It must
// therefore not pull in torch headers or call library templates that may be
// compiled out of line (their code would be compiled for AVX2 in one copy and
// could be picked by the linker for another).
//
// Pixels are processed in segments of at most kTile pixels that are contiguous
// along the innermost spatial dim; within a segment, runs of equal labels are
// processed together (labels are spatially coherent), so the inner loops run
// over contiguous pixels with one mean held in a register and vectorize.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "../layout.h"
#include "../math.h"
#include "kernel_table.h"

#ifndef DISCLOSS_CPU_ISA
#error "define DISCLOSS_CPU_ISA to the namespace of this instruction set"
#endif

namespace discloss {
namespace cpu {
namespace DISCLOSS_CPU_ISA {

// 4096 pixels x E planes per segment: long enough for the hardware prefetcher
// to stream every plane (measured 1.4x faster than 256 at E = 16), small
// enough that the segment is still in L2 for its second look.
constexpr int64_t kTile = 4096;

// ---- element conversions (no c10 here, see above) -------------------------

static inline float to_acc(Half v) {
  const uint32_t sign = uint32_t(v.bits & 0x8000u) << 16;
  const uint32_t exp = (v.bits >> 10) & 0x1fu;
  const uint32_t mant = v.bits & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24
    const float f = float(mant) * (1.0f / 16777216.0f);
    return sign ? -f : f;
  }
  const uint32_t bits = exp == 31 ? (sign | 0x7f800000u | (mant << 13)) : (sign | ((exp + 112u) << 23) | (mant << 13));
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
static inline float to_acc(BFloat16 v) {
  const uint32_t bits = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
static inline float to_acc(float v) { return v; }
static inline double to_acc(double v) { return v; }

// Round to nearest even, as c10::Half / c10::BFloat16 do.
static inline Half from_acc(float f, Half*) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  uint32_t a = x & 0x7fffffffu;
  if (a >= 0x7f800000u) return {uint16_t(sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u))};
  if (a >= 0x477ff000u) return {uint16_t(sign | 0x7c00u)};  // rounds past 65504
  if (a < 0x38800000u) {                                    // half subnormal or zero
    float af;
    std::memcpy(&af, &a, sizeof af);
    return {uint16_t(sign | uint16_t(__builtin_nearbyintf(af * 16777216.0f)))};
  }
  a += 0xc8000fffu + ((a >> 13) & 1u);  // rebias exponent, round the dropped 13 bits
  return {uint16_t(sign | (a >> 13))};
}
static inline BFloat16 from_acc(float f, BFloat16*) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  // (Written branch-free, NaN tested as f != f: GCC's vector code for the
  // gradient's store is a float compare and a blend, not an unsigned
  // compare built from three integer operations.)
  const uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (x >> 16) | 0x40u;
  return {uint16_t(f != f ? quiet_nan : rounded)};
}
static inline float from_acc(float f, float*) { return f; }
static inline double from_acc(double f, double*) { return f; }

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// ---- segments and runs ----------------------------------------------------

// Calls fn(offsets, len) for consecutive segments of pixels [p0, p1) that are
// contiguous along the innermost coalesced dim, each at most kTile long.
template <typename Fn>
static inline void for_each_segment(const PixelLayout& L, int64_t p0, int64_t p1, Fn&& fn) {
  const int64_t inner = L.sizes[L.ndim - 1];
  int64_t p = p0;
  while (p < p1) {
    const int64_t col = p % inner;
    int64_t len = inner - col;
    if (len > p1 - p) len = p1 - p;
    if (len > kTile) len = kTile;
    fn(pixel_offsets(L, p), len);
    p += len;
  }
}

// A run of equal labels within a segment: pixels [start, end) and their slot.
struct SlotRun {
  int32_t start, end;
  int64_t slot;
};

// Labels compared per step of run_end (bytes): 4 AVX2 compares, one branch.
constexpr int64_t kRunScanBytes = 128;
// How far ahead (bytes) the label scan prefetches: the hardware's stream
// prefetcher stops at each 4 KiB page. The address is formed as an integer
// (it may lie past the labels' end, where a prefetch does nothing).
constexpr int64_t kLabelAhead = 4096;
static inline void prefetch_ahead(const void* p, int64_t bytes) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) + uintptr_t(bytes)));
}

#if defined(__SSE2__)
// Labels as bytes: lanes of one label are equal exactly when all its bytes
// are, so the first byte that differs from v's pattern lies in the first
// label that differs, whatever the label type. kRunScanBytes at a time.
// (GCC's target pragma does not define __AVX2__: the AVX2 and AVX-512
// copies say so themselves.)
#if defined(DISCLOSS_CPU_AVX2)
using LabelBytes = __m256i;
static inline LabelBytes label_load(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
static inline LabelBytes label_eq(LabelBytes a, LabelBytes b) { return _mm256_cmpeq_epi8(a, b); }
static inline LabelBytes label_and(LabelBytes a, LabelBytes b) { return _mm256_and_si256(a, b); }
static inline uint32_t label_mask(LabelBytes a) { return uint32_t(_mm256_movemask_epi8(a)); }
#else
using LabelBytes = __m128i;
static inline LabelBytes label_load(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }
static inline LabelBytes label_eq(LabelBytes a, LabelBytes b) { return _mm_cmpeq_epi8(a, b); }
static inline LabelBytes label_and(LabelBytes a, LabelBytes b) { return _mm_and_si128(a, b); }
static inline uint32_t label_mask(LabelBytes a) { return uint32_t(_mm_movemask_epi8(a)) | 0xffff0000u; }
#endif
constexpr int64_t kLabelVec = int64_t(sizeof(LabelBytes));
constexpr int64_t kLabelVecs = kRunScanBytes / kLabelVec;

// v's bytes repeated over a vector.
template <typename label_t>
static inline LabelBytes label_pattern(label_t v) {
  unsigned char bytes[kLabelVec];
  for (int64_t i = 0; i < kLabelVec; i += int64_t(sizeof(label_t))) std::memcpy(bytes + i, &v, sizeof v);
  return label_load(bytes);
}

// The first j' >= j with lab[j'] != v, or len, for contiguous labels.
template <typename label_t>
static inline int64_t contiguous_run_end(const label_t* lab, int64_t j, int64_t len, label_t v) {
  constexpr int64_t kPer = kLabelVec / int64_t(sizeof(label_t));  // labels per vector
  const LabelBytes pat = label_pattern(v);
  while (j + kLabelVecs * kPer <= len) {
    prefetch_ahead(lab + j, kLabelAhead);
    prefetch_ahead(lab + j, kLabelAhead + 64);
    LabelBytes eq[kLabelVecs];
    for (int64_t i = 0; i < kLabelVecs; ++i) eq[i] = label_eq(label_load(lab + j + i * kPer), pat);
    LabelBytes all = eq[0];
    for (int64_t i = 1; i < kLabelVecs; ++i) all = label_and(all, eq[i]);
    if (label_mask(all) != 0xffffffffu) {
      for (int64_t i = 0;; ++i, j += kPer) {
        const uint32_t differ = ~label_mask(eq[i]);
        if (differ) return j + int64_t(__builtin_ctz(differ)) / int64_t(sizeof(label_t));
      }
    }
    j += kLabelVecs * kPer;
  }
  while (j + kPer <= len) {
    const uint32_t differ = ~label_mask(label_eq(label_load(lab + j), pat));
    if (differ) return j + int64_t(__builtin_ctz(differ)) / int64_t(sizeof(label_t));
    j += kPer;
  }
  while (j < len && lab[j] == v) ++j;
  return j;
}
#endif

// The end of a run of label v that goes on at position j: the first j' >= j
// with lab[j'] != v, or len. Labels come in long runs (instances are
// spatially coherent), so contiguous ones (kUnit) are compared kRunScanBytes
// at a time: a long run costs a vector compare per 32 bytes of labels and no
// per-pixel store, and the label that ends it is found from the compare's
// mask. A strided loop would need a gather per vector: scalar.
template <bool kUnit, typename label_t>
static inline int64_t run_end(const label_t* lab, int64_t stride, int64_t j, int64_t len, label_t v) {
#if defined(__SSE2__)
  if (kUnit) return contiguous_run_end(lab, j, len, v);
#else
  if (kUnit) {
    constexpr int64_t kW = kRunScanBytes / int64_t(sizeof(label_t));
    while (j + kW <= len) {
      prefetch_ahead(lab + j, kLabelAhead);
      prefetch_ahead(lab + j, kLabelAhead + 64);
      int differ = 0;
#pragma omp simd reduction(| : differ)
      for (int64_t u = 0; u < kW; ++u) differ |= int(lab[j + u] != v);
      if (differ) break;
      j += kW;
    }
  }
#endif
  while (j < len && lab[kUnit ? j : j * stride] == v) ++j;
  return j;
}

// Calls fn(start, end, label) for each maximal run of equal labels in
// lab[0 .. len) (strided by stride unless kUnit), in order.
template <bool kUnit, typename label_t, typename Fn>
static inline void for_each_label_run(const label_t* lab, int64_t stride, int64_t len, Fn&& fn) {
  for (int64_t s = 0; s < len;) {
    if (kUnit) prefetch_ahead(lab + s, kLabelAhead);
    const label_t v = lab[kUnit ? s : s * stride];
    const int64_t t = run_end<kUnit>(lab, stride, s + 1, len, v);
    fn(s, t, int64_t(v));
    s = t;
  }
}

// The runs of a segment's labels with their slots (math.h slot_of, or
// mapped_slot under a slot map: ids, n_ids >= 0), each label mapped once per
// run; returns their count (<= len). Invalid labels get kInvalid (no
// cluster); the first one is reported through *bad when bad is not null.
// Adjacent runs hold different labels, hence different cluster slots.
template <bool kUnit, typename label_t>
static inline int64_t label_runs(const label_t* lab, int64_t stride, int64_t len, const LossConfig& c,
                                 const int64_t* ids, int64_t n_ids, SlotRun* runs, BadLabel* bad) {
  const bool mapped = ids != nullptr && n_ids >= 0 && c.normalization != Normalization::Chainer;
  int64_t n = 0;
  for_each_label_run<kUnit>(lab, stride, len, [&](int64_t s, int64_t t, int64_t v) {
    const int64_t slot = mapped ? mapped_slot(v, c, ids, n_ids) : slot_of(v, c);
    if (slot == kInvalid && bad && !bad->found) *bad = {true, v};
    runs[n++] = {int32_t(s), int32_t(t), slot};
  });
  return n;
}

// Calls fn(lab, unit) with the labels of a chunk's image at offset, typed.
template <typename Fn>
static inline auto with_labels(LabelKind kind, const void* labels, int64_t offset, Fn&& fn) {
  switch (kind) {
    case LabelKind::UInt8: return fn(static_cast<const uint8_t*>(labels) + offset);
    case LabelKind::Int8: return fn(static_cast<const int8_t*>(labels) + offset);
    case LabelKind::Int16: return fn(static_cast<const int16_t*>(labels) + offset);
    case LabelKind::Int32: return fn(static_cast<const int32_t*>(labels) + offset);
    case LabelKind::Int64: break;
  }
  return fn(static_cast<const int64_t*>(labels) + offset);
}

// The runs of the segment of len labels at offset (a stride apart) of the chunk's labels.
static inline int64_t segment_runs(const ChunkArgs& a, int64_t offset, int64_t stride, int64_t len, SlotRun* runs,
                                   BadLabel* bad) {
  return with_labels(a.label_kind, a.labels, offset, [&](const auto* lab) {
    return stride == 1 ? label_runs<true>(lab, stride, len, *a.config, a.slot_ids, a.num_ids, runs, bad)
                       : label_runs<false>(lab, stride, len, *a.config, a.slot_ids, a.num_ids, runs, bad);
  });
}

// Calls fn(start, end, slot) for each run of a cluster (slot >= 0).
template <typename Fn>
static inline void for_each_cluster_run(const SlotRun* runs, int64_t n, Fn&& fn) {
  for (int64_t r = 0; r < n; ++r) {
    if (runs[r].slot >= 0) fn(int64_t(runs[r].start), int64_t(runs[r].end), runs[r].slot);
  }
}

// Pixels of a segment whose slot is kIgnored (label == ignore_index).
static inline int64_t count_unlabeled(const SlotRun* runs, int64_t n) {
  int64_t count = 0;
  for (int64_t r = 0; r < n; ++r) count += runs[r].slot == kIgnored ? runs[r].end - runs[r].start : 0;
  return count;
}

// Strides of the innermost spatial dim; kUnit makes them the constant 1 so
// that the pixel loops vectorize (NCHW-like layouts).
template <bool kUnit>
struct InnerStride {
  int64_t x, grad;
  int64_t xs() const { return kUnit ? 1 : x; }
  int64_t gs() const { return kUnit ? 1 : grad; }
};

// ---- the gradient's lines, fetched ahead of the runs ---------------------------
// Pass 3 (unstaged types: float, double) writes E gradient planes a run at
// a time; each store that finds its line out of cache waits for the line
// to be read first, and the hardware's prefetchers do not run ahead of E
// interleaved write streams that advance ~100 bytes at a time (perf puts
// half of the gradient loop's samples on its store). So pass 3 keeps a
// cursor kGradAhead bytes ahead of its runs in every plane and asks for
// each line once as the runs reach it. It is a read prefetch (prefetcht0):
// a line no other core holds arrives exclusive, so the store needs no
// second request. (prefetchw, with the PRFCHW target, measured no faster;
// the same cursor for the planes of x, in every pass, no faster either:
// the reads stream well enough.) Staged types write each plane as a stream
// and take no cursor: there its bursts of E prefetches per line of
// progress stalled the runs' loop (perf: a fifth of pass 3's samples;
// without it, pass 3 0.97x).
#ifndef DISCLOSS_GRAD_AHEAD
#define DISCLOSS_GRAD_AHEAD 512
#endif
constexpr int64_t kGradAhead = DISCLOSS_GRAD_AHEAD;
template <typename T>
struct GradAhead {
  T* p;           // the segment's first pixel in plane 0
  int64_t plane;  // elements between planes
  int64_t E;      // planes (0: none, for strided layouts)
  int64_t next;   // bytes from p (in each plane) asked for up to
  GradAhead(T* p0, int64_t plane_, int64_t E_) : p(p0), plane(plane_), E(E_), next(0) {}
  // The runs reached pixel j: lines up to j + kGradAhead bytes on.
  void reach(int64_t j) {
    const int64_t target = j * int64_t(sizeof(T)) + kGradAhead;
    for (; next < target; next += 64) {
      for (int64_t e = 0; e < E; ++e) {  // (an integer address: it may lie past the gradient's end)
        __builtin_prefetch(reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(p + e * plane) + uintptr_t(next)), 0, 3);
      }
    }
  }
};

// ---- padded runs -----------------------------------------------------------
// A run of contiguous pixels [s, t) is computed over [s, tp), tp = s +
// (t - s) rounded up to kRunBlock, where that stays within the segment
// (len): the vector loops then never take a scalar tail (a run of ~50 pixels
// otherwise spends about as long in its tail as in its vectors). Pixels [t,
// tp) belong to later runs of the segment: what is computed for them is
// discarded (sums: masked lanes), or overwritten (norms and coefficients in
// the scratch; the gradient, which the runs write in order and the push
// after them).
constexpr int64_t kRunBlock = 16;
template <bool kUnit>
static inline int64_t padded_end(int64_t s, int64_t t, int64_t len) {
  const int64_t tp = s + (t - s + kRunBlock - 1) / kRunBlock * kRunBlock;
  return kUnit && tp <= len ? tp : t;
}

// ---- sums over a run, planes four at a time --------------------------------
// out[e] += sum over j in [s, t) of term(to_acc(x_e[j]) - m[e], j), for the
// E planes x_e = x + e * plane. Each sum is kept in kSumLanes lanes (one
// 32-byte vector), pixel j of the run in lane (j - s) % kSumLanes, and the
// lanes are added pairwise at the end: an order fixed by the run alone. One
// sum per loop is a chain of dependent vector adds (latency-bound: about 4
// cycles per vector); four planes per loop run four chains side by side.
// Each plane's sum is formed in the same order as alone, so the result does
// not depend on the grouping. The lanes are plain arrays, not an OpenMP
// reduction: GCC kept those reductions' lanes on the stack, a store per
// sum per step. When tp (padded_end) reaches a whole step past the last
// one, the tail is one masked step (lanes past t keep their sum; the same
// bits as pixel by pixel), else pixel by pixel.
template <typename acc_t>
constexpr int64_t kSumLanes = 32 / int64_t(sizeof(acc_t));

template <typename acc_t>
static inline acc_t lane_total(acc_t* a) {
  for (int64_t w = kSumLanes<acc_t> / 2; w >= 1; w /= 2) {
    for (int64_t u = 0; u < w; ++u) a[u] += a[u + w];
  }
  return a[0];
}

// to_acc(v) - m, or v already a difference (kDiff false: staged).
template <bool kDiff, typename scalar_t, typename acc_t>
static inline acc_t diff_of(scalar_t v, acc_t m) {
  return kDiff ? to_acc(v) - m : to_acc(v);
}

// kSumLanes contiguous bfloat16 values widened to float at once (AVX2: one
// vpmovzxwd from memory and one shift). Written per lane, as to_acc in
// plane_sums' lane loops, GCC's SLP vectorizer split the widening into
// 128-bit halves: two loads, widenings, shifts, subtractions and adds per 8
// values of a plane (perf: pass 1 of bfloat16 took about twice a plain read
// of its planes). The same values, so the same bits.
template <typename scalar_t, bool kUnit, bool kDiff>
constexpr bool kWidenBlock = std::is_same_v<scalar_t, BFloat16> && kUnit && kDiff;

static inline void widen_block(const BFloat16* p, float* out) {
#if defined(DISCLOSS_CPU_AVX2)
  static_assert(kSumLanes<float> == 8);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  _mm256_storeu_ps(out, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
#else
  for (int64_t u = 0; u < kSumLanes<float>; ++u) out[u] = to_acc(p[u]);
#endif
}

template <typename scalar_t, bool kUnit, bool kDiff = true, typename Term>
static inline void plane_sums(const scalar_t* x, int64_t plane, int64_t E, const InnerStride<kUnit>& in,
                              const typename AccOf<scalar_t>::type* m, int64_t s, int64_t t, int64_t tp,
                              typename AccOf<scalar_t>::type* out, Term term) {
  using acc_t = typename AccOf<scalar_t>::type;
  constexpr int64_t V = kSumLanes<acc_t>;
  const bool masked_tail = (t - s) % V != 0 && tp >= s + (t - s + V - 1) / V * V;
  int64_t e = 0;
  for (; e + 4 <= E; e += 4) {
    const scalar_t* x0 = x + e * plane;
    const scalar_t* x1 = x0 + plane;
    const scalar_t* x2 = x1 + plane;
    const scalar_t* x3 = x2 + plane;
    const acc_t m0 = m[e], m1 = m[e + 1], m2 = m[e + 2], m3 = m[e + 3];
    acc_t a0[V] = {}, a1[V] = {}, a2[V] = {}, a3[V] = {};
    acc_t c0[V], c1[V], c2[V], c3[V];  // (kWidenBlock: a step's values)
    auto widen_step = [&](int64_t j) {
      if constexpr (kWidenBlock<scalar_t, kUnit, kDiff>) {
        widen_block(x0 + j, c0);
        widen_block(x1 + j, c1);
        widen_block(x2 + j, c2);
        widen_block(x3 + j, c3);
      }
    };
    int64_t j = s;
    if constexpr (kWidenBlock<scalar_t, kUnit, kDiff>) {
      for (; j + V <= t; j += V) {
        widen_step(j);
#pragma omp simd
        for (int64_t u = 0; u < V; ++u) {
          a0[u] += term(c0[u] - m0, j + u);
          a1[u] += term(c1[u] - m1, j + u);
          a2[u] += term(c2[u] - m2, j + u);
          a3[u] += term(c3[u] - m3, j + u);
        }
      }
    }
    for (; j + V <= t; j += V) {
#pragma omp simd
      for (int64_t u = 0; u < V; ++u) {
        a0[u] += term(diff_of<kDiff>(x0[(j + u) * in.xs()], m0), j + u);
        a1[u] += term(diff_of<kDiff>(x1[(j + u) * in.xs()], m1), j + u);
        a2[u] += term(diff_of<kDiff>(x2[(j + u) * in.xs()], m2), j + u);
        a3[u] += term(diff_of<kDiff>(x3[(j + u) * in.xs()], m3), j + u);
      }
    }
    if (masked_tail && kWidenBlock<scalar_t, kUnit, kDiff>) {
      const int64_t n = t - j;
      widen_step(j);
#pragma omp simd
      for (int64_t u = 0; u < V; ++u) {
        const acc_t b0 = a0[u] + term(c0[u] - m0, j + u);
        const acc_t b1 = a1[u] + term(c1[u] - m1, j + u);
        const acc_t b2 = a2[u] + term(c2[u] - m2, j + u);
        const acc_t b3 = a3[u] + term(c3[u] - m3, j + u);
        a0[u] = u < n ? b0 : a0[u];
        a1[u] = u < n ? b1 : a1[u];
        a2[u] = u < n ? b2 : a2[u];
        a3[u] = u < n ? b3 : a3[u];
      }
    } else if (masked_tail) {
      const int64_t n = t - j;
#pragma omp simd
      for (int64_t u = 0; u < V; ++u) {  // (a + term, then the select: contracts as the loop above)
        const acc_t b0 = a0[u] + term(diff_of<kDiff>(x0[(j + u) * in.xs()], m0), j + u);
        const acc_t b1 = a1[u] + term(diff_of<kDiff>(x1[(j + u) * in.xs()], m1), j + u);
        const acc_t b2 = a2[u] + term(diff_of<kDiff>(x2[(j + u) * in.xs()], m2), j + u);
        const acc_t b3 = a3[u] + term(diff_of<kDiff>(x3[(j + u) * in.xs()], m3), j + u);
        a0[u] = u < n ? b0 : a0[u];
        a1[u] = u < n ? b1 : a1[u];
        a2[u] = u < n ? b2 : a2[u];
        a3[u] = u < n ? b3 : a3[u];
      }
    } else {
      for (int64_t u = 0; j < t; ++j, ++u) {
        a0[u] += term(diff_of<kDiff>(x0[j * in.xs()], m0), j);
        a1[u] += term(diff_of<kDiff>(x1[j * in.xs()], m1), j);
        a2[u] += term(diff_of<kDiff>(x2[j * in.xs()], m2), j);
        a3[u] += term(diff_of<kDiff>(x3[j * in.xs()], m3), j);
      }
    }
    out[e] += lane_total(a0);
    out[e + 1] += lane_total(a1);
    out[e + 2] += lane_total(a2);
    out[e + 3] += lane_total(a3);
  }
  for (; e < E; ++e) {
    const scalar_t* xe = x + e * plane;
    const acc_t me = m[e];
    acc_t a[V] = {};
    int64_t j = s;
    if constexpr (kWidenBlock<scalar_t, kUnit, kDiff>) {
      for (; j + V <= t; j += V) {
        acc_t c[V];
        widen_block(xe + j, c);
#pragma omp simd
        for (int64_t u = 0; u < V; ++u) a[u] += term(c[u] - me, j + u);
      }
    }
    for (; j + V <= t; j += V) {
#pragma omp simd
      for (int64_t u = 0; u < V; ++u) a[u] += term(diff_of<kDiff>(xe[(j + u) * in.xs()], me), j + u);
    }
    if (masked_tail && kWidenBlock<scalar_t, kUnit, kDiff>) {
      const int64_t n = t - j;
      acc_t c[V];
      if constexpr (kWidenBlock<scalar_t, kUnit, kDiff>) widen_block(xe + j, c);
#pragma omp simd
      for (int64_t u = 0; u < V; ++u) {
        const acc_t b = a[u] + term(c[u] - me, j + u);
        a[u] = u < n ? b : a[u];
      }
    } else if (masked_tail) {
      const int64_t n = t - j;
#pragma omp simd
      for (int64_t u = 0; u < V; ++u) {
        const acc_t b = a[u] + term(diff_of<kDiff>(xe[(j + u) * in.xs()], me), j + u);
        a[u] = u < n ? b : a[u];
      }
    } else {
      for (int64_t u = 0; j < t; ++j, ++u) a[u] += term(diff_of<kDiff>(xe[j * in.xs()], me), j);
    }
    out[e] += lane_total(a);
  }
}

// ---- the L2 norm's range (math.h L2Range) -------------------------------------
// r[s .. t) hold ||x_j - mu|| from sums of squares; where one came out of
// range (underflow, overflow), recompute it scaled. One vectorized check;
// the recomputation is for the rare pixel that needs it.
template <typename scalar_t, bool kUnit>
static inline void fix_l2_range(const scalar_t* x, const PixelLayout& L,
                                const PixelOffsets& o, const InnerStride<kUnit>& in,
                                const typename AccOf<scalar_t>::type* mu, int64_t s, int64_t t,
                                typename AccOf<scalar_t>::type* r) {
  using acc_t = typename AccOf<scalar_t>::type;
  int any = 0;
#pragma omp simd reduction(| : any)
  for (int64_t j = s; j < t; ++j) any |= l2_out_of_range(r[j]) ? 1 : 0;
  if (!any) return;
  for (int64_t j = s; j < t; ++j) {
    if (!l2_out_of_range(r[j])) continue;
    r[j] = scaled_l2<acc_t>(L.embed_dim, [&](int64_t e) {
      return to_acc(x[o.x + e * L.x_embed_stride + j * in.xs()]) - mu[e];
    });
  }
}

// r[s .. t): accumulated norm terms -> norms (L2: sqrt, then the range fix).
template <typename scalar_t, int kNorm, bool kUnit>
static inline void finish_norms(const scalar_t* x, const PixelLayout& L,
                                const PixelOffsets& o, const InnerStride<kUnit>& in,
                                const typename AccOf<scalar_t>::type* mu, int64_t s, int64_t t,
                                typename AccOf<scalar_t>::type* r) {
  if (kNorm == 1) return;
#pragma omp simd
  for (int64_t j = s; j < t; ++j) r[j] = std::sqrt(r[j]);
  fix_l2_range<scalar_t, kUnit>(x, L, o, in, mu, s, t, r);
}

// ---- staged differences (16-bit types) ---------------------------------------
// A bfloat16 or half value costs a widening and a shift per 8 to convert.
// Where a run's pixels are looked at twice, the first look (the norms) can
// keep d = to_acc(x) - mu, in the accumulation type, in a scratch D (the
// chunk's stage_scratch, in L2), and the second read d from there: the same
// d, so the same bits, without converting x again. D holds rows of
// stage_pixels(E) pixels, one per plane, within kStageAlloc values: 2048
// pixels at E = 16, so that each plane is read 4 KiB at a time (stages of
// 512 pixels, D in L1, took 1.14x as long; of 4096, no faster than 2048).
constexpr int64_t kStageValues = 32768;  // 128 KiB of float
template <typename scalar_t>
constexpr bool kStaged = sizeof(scalar_t) == 2;
// Pixels a stage holds: a whole number of kRunBlock (0: E too large to stage).
// Its rows lie a cache line further apart (stage_stride): rows 2 KiB apart
// would fall in 2 of the L1's 64 sets, eight rows to a set.
constexpr int64_t kStagePadRows = 64;
static inline int64_t stage_pixels(int64_t E) {
  const int64_t px = kStageValues / E / kRunBlock * kRunBlock;
  return E <= kStagePadRows ? px : std::max<int64_t>(px - kRunBlock, 0);
}
static inline int64_t stage_stride(int64_t E) { return stage_pixels(E) + kRunBlock; }
constexpr int64_t kStageAlloc = kStageValues + kRunBlock * kStagePadRows;
static_assert(kStageAlloc == kStageScratch, "kernel_table.h: the stages' scratch");

// r[j] (+)= the norm terms of planes x0 .. x0 + (kPlanes - 1) plane for
// j in [s, t), added in plane order; kFirst starts from 0 instead of r (no
// zeroed r needed, no memset per run). kStage: D[p * ds + j - s] = the
// difference of plane p.
template <int64_t kPlanes, bool kFirst, int kNorm, bool kStage, typename scalar_t, bool kUnit>
static inline void add_norm_terms(const scalar_t* x0, int64_t plane, const InnerStride<kUnit>& in,
                                  const typename AccOf<scalar_t>::type* m, int64_t s, int64_t t,
                                  typename AccOf<scalar_t>::type* r, typename AccOf<scalar_t>::type* D,
                                  int64_t ds) {
  using acc_t = typename AccOf<scalar_t>::type;
#pragma omp simd
  for (int64_t j = s; j < t; ++j) {
    // (0 + term, not term: the compiler may contract a sum of products to
    // FMAs, and which product it fuses must not change with kFirst.)
    acc_t v = kFirst ? acc_t(0) : r[j];
    for (int64_t p = 0; p < kPlanes; ++p) {
      const acc_t d = to_acc(x0[p * plane + j * in.xs()]) - m[p];
      if (kStage) D[p * ds + j - s] = d;
      v += norm_term<acc_t>(d, kNorm);
    }
    r[j] = v;
  }
}

// r[s .. t) = ||x_j - mu|| for the pixels of a run (L2: with the range fix).
// Four planes per loop: r[j] is loaded and stored once per four terms,
// added in the same order as one plane at a time. (16-bit types take
// stage_norms, below, which also keeps the differences.)
template <typename scalar_t, int kNorm, bool kUnit>
static inline void run_norms(const scalar_t* x, const PixelLayout& L,
                             const PixelOffsets& o, const InnerStride<kUnit>& in,
                             const typename AccOf<scalar_t>::type* mu, int64_t s, int64_t t,
                             typename AccOf<scalar_t>::type* r) {
  const int64_t E = L.embed_dim, plane = L.x_embed_stride;
  const scalar_t* xe = x + o.x;
  int64_t e = 0;
  if (E >= 4) {
    add_norm_terms<4, true, kNorm, false>(xe, plane, in, mu, s, t, r, nullptr, 0);
    for (e = 4; e + 4 <= E; e += 4) {
      add_norm_terms<4, false, kNorm, false>(xe + e * plane, plane, in, mu + e, s, t, r, nullptr, 0);
    }
  } else {
    add_norm_terms<1, true, kNorm, false>(xe, plane, in, mu, s, t, r, nullptr, 0);
    e = 1;
  }
  for (; e < E; ++e) {
    add_norm_terms<1, false, kNorm, false>(xe + e * plane, plane, in, mu + e, s, t, r, nullptr, 0);
  }
  finish_norms<scalar_t, kNorm, kUnit>(x, L, o, in, mu, s, t, r);
}

// The pixels j in [s, t) whose L2 coefficient scale * hinge_of(r_j).coef
// overflowed (math.h coef_overflowed; scale = 1, or the push weight of pass
// 3, which can overflow a finite coefficient or be 0 against an infinite
// one): add(j, e, v) receives their gradient components, computed as
// scale * overflowed_grad, and their coef becomes 0 so that the vector loop
// that follows adds nothing for them. Only the rare pixel takes this path.
template <typename scalar_t, bool kUnit, typename HingeOf, typename Add>
static inline void fix_overflowed_coefs(const scalar_t* x, const PixelLayout& L, const PixelOffsets& o,
                                        const InnerStride<kUnit>& in, const typename AccOf<scalar_t>::type* mu,
                                        int64_t s, int64_t t, const typename AccOf<scalar_t>::type* r,
                                        typename AccOf<scalar_t>::type* coef, HingeOf hinge_of,
                                        typename AccOf<scalar_t>::type scale, Add add) {
  using acc_t = typename AccOf<scalar_t>::type;
  for (int64_t j = s; j < t; ++j) {
    if (!coef_overflowed(coef[j], r[j])) continue;
    const PullHinge<acc_t> ph = hinge_of(r[j]);
    for (int64_t e = 0; e < L.embed_dim; ++e) {
      const acc_t d = to_acc(x[o.x + e * L.x_embed_stride + j * in.xs()]) - mu[e];
      add(j, e, scale * overflowed_grad(ph.coef, ph.h, d, r[j]));
    }
    coef[j] = 0;
  }
}

// With r[s .. t) = ||x_j - mu|| (run_norms): (h_j, coef_j) = hinge_of(r_j),
// grad[e] += sum_j coef_j u_je (u = x - mu for L2, its sign for L1), and the
// sum of h_j^2 returned. tp: padded_end (coef past t is read, then masked).
template <typename scalar_t, int kNorm, bool kUnit, typename HingeOf>
static inline typename AccOf<scalar_t>::type hinge_sums_of_norms(const scalar_t* x, const PixelLayout& L,
                                                                 const PixelOffsets& o, const InnerStride<kUnit>& in,
                                                                 const typename AccOf<scalar_t>::type* mu, int64_t s,
                                                                 int64_t t, int64_t tp,
                                                                 const typename AccOf<scalar_t>::type* r,
                                                                 typename AccOf<scalar_t>::type* coef,
                                                                 HingeOf hinge_of,
                                                                 typename AccOf<scalar_t>::type* grad,
                                                                 const typename AccOf<scalar_t>::type* D = nullptr,
                                                                 int64_t ds = 0) {
  using acc_t = typename AccOf<scalar_t>::type;
  acc_t h2 = 0;
  int overflow = 0;
#pragma omp simd reduction(+ : h2) reduction(| : overflow)
  for (int64_t j = s; j < t; ++j) {
    const PullHinge<acc_t> ph = hinge_of(r[j]);
    h2 += ph.h * ph.h;
    coef[j] = ph.coef;
    overflow |= coef_overflowed(ph.coef, r[j]) ? 1 : 0;
  }
  if (kNorm == 2 && overflow) {
    fix_overflowed_coefs<scalar_t, kUnit>(x, L, o, in, mu, s, t, r, coef, hinge_of, acc_t(1),
                                          [&](int64_t, int64_t e, acc_t v) { grad[e] += v; });
  }
  if (D != nullptr) {  // (staged: the differences of pixels s .. tp in D's rows, from 0)
    plane_sums<acc_t, true, false>(D, ds, L.embed_dim, InnerStride<true>{1, 1}, mu, 0, t - s, tp - s, grad,
                                   [&](acc_t d, int64_t j) {
                                     return coef[s + j] * (kNorm == 2 ? d : norm_grad(d, acc_t(0), 1));
                                   });
    return h2;
  }
  plane_sums<scalar_t, kUnit>(x + o.x, L.x_embed_stride, L.embed_dim, in, mu, s, t, tp, grad, [&](acc_t d, int64_t j) {
    return coef[j] * (kNorm == 2 ? d : norm_grad(d, acc_t(0), 1));
  });
  return h2;
}

// ---- stages of runs (16-bit types) -------------------------------------------
// The pixels of a segment's planes at one position share their cache sets
// (planes a multiple of 4 KiB apart), so E planes read or written a run
// at a time evict one another's lines, and the prefetchers' lines, before
// the next run uses them. Passes 2 and 3 therefore stage runs together:
// a piece [s, tp) of a run of slot k takes the columns c .. c + (tp - s)
// of r, coef and D, and the stage's norms are summed four planes at a time
// across its pieces (stage_norms), then used piece by piece (pass 2) or a
// plane at a time across the pieces (pass 3): each plane is a stream. Each
// pixel's terms are summed in the order of run_norms: the same bits.
struct StagePiece {
  int64_t s, t, tp, k, c;  // k < 0: no cluster (pass 3 writes zeros over [s, t))
};
constexpr int64_t kMaxPieces = 64;

// The offsets of the segment's pixel s, as the segment's pixel 0.
template <bool kUnit>
static inline PixelOffsets offsets_from(const PixelOffsets& o, int64_t s, const InnerStride<kUnit>& in) {
  return PixelOffsets{o.x + s * in.xs(), o.label, o.grad + s * in.gs()};
}

// add_norm_terms of planes e0 .. e0 + kPlanes - 1 for every piece with k >= 0.
template <int64_t kPlanes, bool kFirst, int kNorm, typename scalar_t, bool kUnit>
static inline void stage_norm_terms(const scalar_t* x, const PixelLayout& L, const PixelOffsets& o,
                                    const InnerStride<kUnit>& in, const typename AccOf<scalar_t>::type* means,
                                    const StagePiece* pieces, int64_t np, int64_t e0,
                                    typename AccOf<scalar_t>::type* r, typename AccOf<scalar_t>::type* D,
                                    int64_t ds) {
  const int64_t E = L.embed_dim, plane = L.x_embed_stride;
  for (int64_t i = 0; i < np; ++i) {
    const StagePiece& q = pieces[i];
    if (q.k < 0) continue;
    add_norm_terms<kPlanes, kFirst, kNorm, true>(x + o.x + e0 * plane + q.s * in.xs(), plane, in,
                                                 means + q.k * E + e0, 0, q.tp - q.s, r + q.c, D + e0 * ds + q.c, ds);
  }
}

// r[c .. c + tp - s) = the norms of every piece with k >= 0 (as run_norms:
// the same planes in groups of four), D[e * ds + c ..] their differences.
template <typename scalar_t, int kNorm, bool kUnit>
static inline void stage_norms(const scalar_t* x, const PixelLayout& L, const PixelOffsets& o,
                               const InnerStride<kUnit>& in, const typename AccOf<scalar_t>::type* means,
                               const StagePiece* pieces, int64_t np, typename AccOf<scalar_t>::type* r,
                               typename AccOf<scalar_t>::type* D, int64_t ds) {
  const int64_t E = L.embed_dim;
  int64_t e = 0;
  if (E >= 4) {
    stage_norm_terms<4, true, kNorm>(x, L, o, in, means, pieces, np, 0, r, D, ds);
    for (e = 4; e + 4 <= E; e += 4) stage_norm_terms<4, false, kNorm>(x, L, o, in, means, pieces, np, e, r, D, ds);
  } else {
    stage_norm_terms<1, true, kNorm>(x, L, o, in, means, pieces, np, 0, r, D, ds);
    e = 1;
  }
  for (; e < E; ++e) stage_norm_terms<1, false, kNorm>(x, L, o, in, means, pieces, np, e, r, D, ds);
  for (int64_t i = 0; i < np; ++i) {
    const StagePiece& q = pieces[i];
    if (q.k < 0) continue;
    finish_norms<scalar_t, kNorm, kUnit>(x, L, offsets_from(o, q.s, in), in, means + q.k * E, 0, q.tp - q.s, r + q.c);
  }
}

// ---- the unlabeled push: gathered pixels against the clusters ------------------
// Every unlabeled pixel meets every cluster present, O(N_U C E): the one term
// of the loss that is not a stream. The unlabeled pixels of a segment are
// gathered, kPushBlock at a time, into U (E rows of kPushStride values of
// the accumulation type), so that scattered pixels cost what coherent ones
// do; kPushLanes of them meet kPushGroup means at once, held in registers
// over the components. A (cluster, lanes) block whose every pixel lies at
// least delta_d from the mean has q = 0 throughout and adds nothing: it is
// skipped, the common case once training has pushed the unlabeled pixels
// away. Under L2 three cheaper tests decide that first (below); a group of
// means they cannot rule out gets its norm terms summed exactly as
// run_norms does, and the blocks among them with a pixel within delta_d
// take the exact code of the pull, on U.

template <typename acc_t>
constexpr int64_t kPushLanes = 64 / int64_t(sizeof(acc_t));  // one cache line
constexpr int kPushGroup = 4;

// The exact test's bound (push_skip_bound) and the three tests' margins
// (push_tests) are in math.h, shared with the CUDA push.

// The positions at[0 .. n) as stretches of consecutive ones: stretch i is
// u in [first[i], first[i + 1]), at position at[first[i]] + u - first[i];
// first[count] = n. Returns their count (unlabeled regions are coherent in
// most label maps: few stretches; scattered pixels: about one per pixel).
static inline int64_t position_stretches(const int32_t* at, int64_t n, int32_t* first) {
  int64_t count = 0;
  for (int64_t u = 0; u < n; ++u) {
    first[count] = int32_t(u);
    count += u == 0 || at[u] != at[u - 1] + 1 ? 1 : 0;
  }
  first[count] = int32_t(n);
  return count;
}

// U[e * kPushStride + u] = x_e at segment position at[u], u < n; the lanes
// up to the next multiple of kPushLanes are zeroed (computed, never used).
// Rows E and E + 1 of U: the pixels' squared norms and norms (the tests).
template <typename scalar_t, bool kUnit>
static inline void gather_pixels(const scalar_t* x, const PixelLayout& L,
                                 const PixelOffsets& o, const InnerStride<kUnit>& in,
                                 const int32_t* at, int64_t n, typename AccOf<scalar_t>::type* U) {
  using acc_t = typename AccOf<scalar_t>::type;
  constexpr int64_t kL = kPushLanes<acc_t>;
  const int64_t padded = (n + kL - 1) / kL * kL;
  acc_t* sq = U + L.embed_dim * kPushStride;
  for (int64_t u = 0; u < padded; ++u) sq[u] = 0;
  int32_t first[kPushBlock + 1];
  const int64_t stretches = kUnit ? position_stretches(at, n, first) : 0;
  for (int64_t e = 0; e < L.embed_dim; ++e) {
    const scalar_t* xe = x + o.x + e * L.x_embed_stride;
    acc_t* ue = U + e * kPushStride;
    if (kUnit && stretches * 4 <= n) {  // (contiguous copies where the stretches are long enough)
      for (int64_t i = 0; i < stretches; ++i) {
        const int64_t u0 = first[i], len = first[i + 1] - u0;
        const scalar_t* src = xe + at[u0];
        acc_t* dst = ue + u0;
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) dst[j] = to_acc(src[j]);
      }
    } else {
      for (int64_t u = 0; u < n; ++u) ue[u] = to_acc(xe[at[u] * in.xs()]);
    }
    for (int64_t u = n; u < padded; ++u) ue[u] = 0;
#pragma omp simd
    for (int64_t u = 0; u < padded; ++u) sq[u] += ue[u] * ue[u];
  }
  acc_t* norm = sq + kPushStride;
#pragma omp simd
  for (int64_t u = 0; u < padded; ++u) norm[u] = std::sqrt(sq[u]);
}

// acc[g][v] += term(x, mu[g][e]) over the components e in order, x the
// component of pixel u0 + v of U, for kPushGroup means and kPushLanes
// pixels: 2 kPushGroup vector accumulators, each component loaded once.
template <typename acc_t, typename Term>
static inline void group_sums(const acc_t* U, int64_t E, int64_t u0, const acc_t* const* mu, Term term,
                              acc_t (*acc)[kPushLanes<acc_t>]) {
  constexpr int64_t kL = kPushLanes<acc_t>;
  for (int64_t e = 0; e < E; ++e) {
    const acc_t* col = U + e * kPushStride + u0;
#pragma GCC unroll 4
    for (int g = 0; g < kPushGroup; ++g) {
      const acc_t me = mu[g][e];
#pragma omp simd
      for (int64_t v = 0; v < kL; ++v) acc[g][v] += term(col[v], me);
    }
  }
}

// Bit g set when the norm test cannot rule out one of the first nv pixels
// (norms nx) against mean g (norm nm[g]).
template <typename acc_t>
static inline unsigned push_norms_near(const acc_t* nx, int64_t nv, const acc_t* nm, PushTests<acc_t> test) {
  constexpr int64_t kL = kPushLanes<acc_t>;
  unsigned mask = 0;
  for (int g = 0; g < kPushGroup; ++g) {
    int near = 0;
    if (nv == kL) {
#pragma omp simd reduction(| : near)
      for (int64_t v = 0; v < kL; ++v) {
        const acc_t t = std::fabs(nx[v] - nm[g]) - test.kappa * (nx[v] + nm[g]);
        near |= int(t < test.norm_bound) | int(t != t);
      }
    } else {
      for (int64_t v = 0; v < nv; ++v) {
        const acc_t t = std::fabs(nx[v] - nm[g]) - test.kappa * (nx[v] + nm[g]);
        near |= int(t < test.norm_bound) | int(t != t);
      }
    }
    mask |= near ? 1u << g : 0u;
  }
  return mask;
}

// The lanes' ball: centre[e] = the mean of the first nv pixels from u0 of
// U; returns rho, the largest of their distances from it as computed.
template <typename acc_t>
static inline acc_t lanes_ball(const acc_t* U, int64_t E, int64_t u0, int64_t nv, acc_t* centre) {
  constexpr int64_t kL = kPushLanes<acc_t>;
  acc_t d2[kL] = {};
  for (int64_t e = 0; e < E; ++e) {
    const acc_t* col = U + e * kPushStride + u0;
    acc_t s = 0;
    for (int64_t v = 0; v < nv; ++v) s += col[v];
    const acc_t c = s / acc_t(nv);
    centre[e] = c;
#pragma omp simd
    for (int64_t v = 0; v < kL; ++v) d2[v] += (col[v] - c) * (col[v] - c);
  }
  acc_t rho2 = 0;
  for (int64_t v = 0; v < nv; ++v) rho2 = d2[v] > rho2 || d2[v] != d2[v] ? d2[v] : rho2;
  return std::sqrt(rho2);
}

// Bit g set when the Gram test cannot rule out pixel u0 + v (v < nv) of U
// against mu[g] (norms sq_mu[g]), for kPushGroup means and kPushLanes pixels.
template <typename acc_t>
static inline unsigned push_gram_near(const acc_t* U, int64_t E, int64_t u0, int64_t nv, const acc_t* const* mu,
                                      const acc_t* sq_mu, PushTests<acc_t> test) {
  constexpr int64_t kL = kPushLanes<acc_t>;
  constexpr acc_t kMax = sizeof(acc_t) == 4 ? acc_t(3.4028234663852886e+38) : acc_t(1.7976931348623157e+308);
  acc_t acc[kPushGroup][kL] = {};
  group_sums(U, E, u0, mu, [](acc_t xe, acc_t me) { return me * xe; }, acc);
  const acc_t* sq = U + E * kPushStride + u0;
  unsigned mask = 0;
  for (int g = 0; g < kPushGroup; ++g) {
    int near = 0;  // (a < b, a != a, a > b: forms that vectorize)
    if (nv == kL) {
#pragma omp simd reduction(| : near)
      for (int64_t v = 0; v < kL; ++v) {
        const acc_t t = (sq[v] + sq_mu[g]) * test.keep - 2 * acc[g][v];
        near |= int(t < test.gram_bound) | int(t != t) | int(t > kMax);
      }
    } else {
      for (int64_t v = 0; v < nv; ++v) {
        const acc_t t = (sq[v] + sq_mu[g]) * test.keep - 2 * acc[g][v];
        near |= int(t < test.gram_bound) | int(t != t) | int(t > kMax);
      }
    }
    mask |= near ? 1u << g : 0u;
  }
  return mask;
}

// d[g][v] = the norm terms of pixel u0 + v of U against mu[g], summed over
// the components in order, for kPushGroup means and kPushLanes pixels;
// returns bit g set when one of the first nv pixels has !(d[g][v] >=
// bound) (NaN included). Fixed trip counts: the sums stay in registers and
// the test is a few vector compares.
template <typename acc_t, int kNorm>
static inline unsigned push_norm_terms(const acc_t* U, int64_t E, int64_t u0, const acc_t* const* mu,
                                       int64_t nv, acc_t bound, acc_t (*d)[kPushLanes<acc_t>]) {
  constexpr int64_t kL = kPushLanes<acc_t>;
  acc_t acc[kPushGroup][kL] = {};
  group_sums(U, E, u0, mu, [](acc_t xe, acc_t me) { return norm_term<acc_t>(xe - me, kNorm); }, acc);
  unsigned mask = 0;
  for (int g = 0; g < kPushGroup; ++g) {
    // (written so that it vectorizes: a < b and a != a, not !(a >= b))
    int near = 0;
    if (nv == kL) {
#pragma omp simd reduction(| : near)
      for (int64_t v = 0; v < kL; ++v) near |= int(acc[g][v] < bound) | int(acc[g][v] != acc[g][v]);
    } else {
      for (int64_t v = 0; v < nv; ++v) near |= int(!(acc[g][v] >= bound));
    }
    mask |= near ? 1u << g : 0u;
#pragma omp simd
    for (int64_t v = 0; v < kL; ++v) d[g][v] = acc[g][v];
  }
  return mask;
}

// The clusters 0 .. C - 1 in order: cand[i] = i; their count.
static inline int64_t all_candidates(int64_t C, int32_t* cand) {
  for (int64_t i = 0; i < C; ++i) cand[i] = int32_t(i);
  return C;
}

// The clusters (norms nm[0 .. C)) that the norm test may not rule out for
// every one of a block's nv pixels (norms nx), in order, in cand; their
// count. One test per cluster from the block's smallest and largest norms
// instead of one per pixel: a cluster is out when all the pixels' norms lie
// on one side of its norm and the test as push_norms_near computes it, at
// the nearest of them, clears its bound by a further kappa (nx_max + nm).
// The computed test is within 3u (nx + nm) of the exact one, which grows
// away from nm on either side, and kappa = 4 (E + 2) u is at least 12u: so
// every pixel's computed test clears the bound, and push_norms_near rules
// the cluster out too. The blocks' results are the same, with fewer tests.
// A pixel with a NaN or infinite norm keeps every cluster (the test fails).
template <typename acc_t>
static inline int64_t push_candidates(const acc_t* nx, int64_t nv, const acc_t* nm, int64_t C,
                                      PushTests<acc_t> test, int32_t* far, int32_t* cand) {
  acc_t lo = nx[0], hi = nx[0];
  bool finite = true;
  for (int64_t v = 0; v < nv; ++v) {
    finite = finite && nx[v] - nx[v] == acc_t(0);
    lo = nx[v] < lo ? nx[v] : lo;
    hi = nx[v] > hi ? nx[v] : hi;
  }
  if (!finite) return all_candidates(C, cand);
  const acc_t kappa = test.kappa, bound = test.norm_bound;
#pragma omp simd
  for (int64_t i = 0; i < C; ++i) {
    const acc_t m = nm[i], w = kappa * (hi + m);
    const acc_t above = std::fabs(lo - m) - kappa * (lo + m) - w;  // every pixel at or above m
    const acc_t below = std::fabs(hi - m) - kappa * (hi + m) - w;  // every pixel at or below m
    far[i] = int32_t(int(lo >= m) & int(above >= bound)) | int32_t(int(hi <= m) & int(below >= bound));
  }
  int64_t n = 0;
  for (int64_t i = 0; i < C; ++i) {
    cand[n] = int32_t(i);
    n += far[i] ? 0 : 1;
  }
  return n;
}

// The candidates cand[0 .. nc) that the ball test does not rule out, in
// order; their count. A cluster is out when its mean lies far from the
// lanes' ball (centre, rho): ||c - mu|| - rho - kappa (||c - mu|| + rho) >=
// the norm test's bound (NaN: kept). The distances for all C clusters at
// once, the clusters across the vector lanes (means by component:
// by_comp[e * C + i]), each summed over the components in order.
template <typename acc_t>
static inline int64_t ball_candidates(const acc_t* centre, acc_t rho, const acc_t* by_comp, int64_t E, int64_t C,
                                      PushTests<acc_t> test, acc_t* sq, int32_t* near, int32_t* cand, int64_t nc) {
  for (int64_t i = 0; i < C; ++i) sq[i] = 0;
  for (int64_t e = 0; e < E; ++e) {
    const acc_t c = centre[e];
    const acc_t* me = by_comp + e * C;
#pragma omp simd
    for (int64_t i = 0; i < C; ++i) sq[i] += (c - me[i]) * (c - me[i]);
  }
  const acc_t kappa = test.kappa, bound = test.norm_bound;
#pragma omp simd
  for (int64_t i = 0; i < C; ++i) {
    const acc_t dc = std::sqrt(sq[i]);
    const acc_t t = dc - rho - kappa * (dc + rho);
    near[i] = !(t >= bound) ? 1 : 0;
  }
  int64_t n = 0;
  for (int64_t j = 0; j < nc; ++j) {
    cand[n] = cand[j];
    n += near[cand[j]];
  }
  return n;
}

// For the n pixels in U (the push scratch, filled by gather_pixels): calls
// fn(k, mu, u0, u1) for each (cluster k present, lanes [u0, u1)) block with
// a pixel that may lie within delta_d of the mean mu, r[u0 .. u1) its
// pixels' norms (L2: with the range fix), clusters in present order for
// each block of lanes.
template <typename acc_t, int kNorm, typename Fn>
static inline void for_each_push_block(const ChunkArgs& a, const PixelLayout& LU, acc_t* U, int64_t n,
                                       acc_t* r, Fn&& fn) {
  constexpr int64_t kL = kPushLanes<acc_t>;
  const int64_t E = LU.embed_dim, C = a.num_present;
  const acc_t* means = static_cast<const acc_t*>(a.means);
  const acc_t bound = push_skip_bound(acc_t(a.config->delta_d), kNorm);
  const PushTests<acc_t> tests = push_tests(bound, E, kNorm);
  const acc_t* norm_x = U + (E + 1) * kPushStride;
  acc_t* sq_mu = U + (E + 2) * kPushStride;  // the scratch after U and its norms
  acc_t* norm_mu = sq_mu + a.config->num_slots;
  if (tests.on) {
    for (int64_t pi = 0; pi < C; ++pi) {
      const acc_t* m = means + a.present[pi] * E;
      acc_t s = 0;
      for (int64_t e = 0; e < E; ++e) s += m[e] * m[e];
      sq_mu[pi] = s;
      norm_mu[pi] = std::sqrt(s);
    }
  }
  acc_t* centre = norm_mu + a.config->num_slots;
  int32_t* far = reinterpret_cast<int32_t*>(centre + E);  // (K values of acc_t hold K int32)
  int32_t* cand = reinterpret_cast<int32_t*>(centre + E + a.config->num_slots);
  acc_t* by_comp = centre + E + 2 * a.config->num_slots;  // E rows of C: the means by component
  acc_t* ball_sq = by_comp + E * a.config->num_slots;
  if (tests.on) {
    for (int64_t i = 0; i < C; ++i) {
      for (int64_t e = 0; e < E; ++e) by_comp[e * C + i] = means[a.present[i] * E + e];
    }
  }
  const InnerStride<true> in{1, 1};
  acc_t d[kPushGroup][kL];
  for (int64_t u0 = 0; u0 < n; u0 += kL) {
    const int64_t u1 = n < u0 + kL ? n : u0 + kL;
    int64_t nc = tests.on ? push_candidates<acc_t>(norm_x + u0, u1 - u0, norm_mu, C, tests, far, cand)
                          : all_candidates(C, cand);
    if (tests.on && nc > 0) {  // (the lanes' ball only for a block with candidates left)
      const acc_t rho = lanes_ball(U, E, u0, u1 - u0, centre);
      nc = ball_candidates<acc_t>(centre, rho, by_comp, E, C, tests, ball_sq, far, cand, nc);
    }
    for (int64_t ci = 0; ci < nc; ci += kPushGroup) {
      const acc_t* mu[kPushGroup];
      acc_t sq_g[kPushGroup], norm_g[kPushGroup];
      for (int g = 0; g < kPushGroup; ++g) {
        const int64_t i = cand[ci + g < nc ? ci + g : nc - 1];
        mu[g] = means + a.present[i] * E;
        sq_g[g] = sq_mu[i];
        norm_g[g] = norm_mu[i];
      }
      if (tests.on) {  // (the ball test was made for the whole block: ball_candidates)
        if (push_norms_near<acc_t>(norm_x + u0, u1 - u0, norm_g, tests) == 0) continue;
        if (push_gram_near<acc_t>(U, E, u0, u1 - u0, mu, sq_g, tests) == 0) continue;
      }
      const unsigned near = push_norm_terms<acc_t, kNorm>(U, E, u0, mu, u1 - u0, bound, d);
      if (near == 0) continue;
      for (int g = 0; g < kPushGroup && ci + g < nc; ++g) {
        if (!(near >> g & 1u)) continue;
        for (int64_t v = 0; v < u1 - u0; ++v) r[u0 + v] = d[g][v];
        finish_norms<acc_t, kNorm, true>(U, LU, PixelOffsets{0, 0, 0}, in, mu[g], u0, u1, r);
        fn(a.present[cand[ci + g]], mu[g], u0, u1);
      }
    }
  }
}

// The layout of U for the code written for pixels: components kPushStride apart.
static inline PixelLayout gathered_layout(const PixelLayout& L) {
  PixelLayout LU = L;
  LU.x_embed_stride = kPushStride;
  return LU;
}

// ---- the push's gradient sums over a whole block of lanes (float, L2) --------
// For one cluster and a full block of 16 lanes, each component's sum is the
// 16 terms c_v (u_v - mu_e) taken as two halves of 8 added lane by lane,
// then across the 8 lanes; eight components at a time, by a transposition
// of their eight vectors (14 shuffles and 7 adds for eight sums, where a
// reduction per component takes 6 operations for one).
typedef float Vec8f __attribute__((vector_size(32)));
typedef int Vec8i __attribute__((vector_size(32)));

// (The helpers take and give vectors by reference: by value, the copy
// compiled without AVX would warn that their ABI differs from AVX's.)
static inline void load8(const float* p, Vec8f& v) { std::memcpy(&v, p, sizeof v); }

// out lane v: c0[v] (ue[v] - m) + c1[v] (ue[8 + v] - m).
static inline void block_terms(const float* ue, float m, const Vec8f& c0, const Vec8f& c1, Vec8f& out) {
  Vec8f a, b;
  load8(ue, a);
  load8(ue + 8, b);
  out = c0 * (a - m) + c1 * (b - m);
}

// out lane p: the sum of the 8 lanes of v[p], added in a fixed order.
static inline void lane_sums8(const Vec8f* v, Vec8f& out) {
  const Vec8i lo = {0, 8, 1, 9, 4, 12, 5, 13}, hi = {2, 10, 3, 11, 6, 14, 7, 15};
  Vec8f pair[4];
  for (int i = 0; i < 4; ++i) {
    pair[i] = __builtin_shuffle(v[2 * i], v[2 * i + 1], lo) + __builtin_shuffle(v[2 * i], v[2 * i + 1], hi);
  }
  const Vec8i lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
  const Vec8f quad0 = __builtin_shuffle(pair[0], pair[1], lo2) + __builtin_shuffle(pair[0], pair[1], hi2);
  const Vec8f quad1 = __builtin_shuffle(pair[2], pair[3], lo2) + __builtin_shuffle(pair[2], pair[3], hi2);
  const Vec8i lo3 = {0, 1, 2, 3, 8, 9, 10, 11}, hi3 = {4, 5, 6, 7, 12, 13, 14, 15};
  out = __builtin_shuffle(quad0, quad1, lo3) + __builtin_shuffle(quad0, quad1, hi3);
}

// The push's pass 2 for one cluster (mean mu) and the full block of lanes
// [u0, u0 + 16) of U, r their norms: as hinge_sums_of_norms (h^2 summed and
// returned, coef and the rare overflowed coefficient alike), the gradient
// sums by lane_sums8.
template <typename HingeOf>
static inline float push_block_sums(const float* U, const PixelLayout& LU, const float* mu, int64_t u0, const float* r,
                                    float* coef, HingeOf hinge_of, float* grad) {
  constexpr int64_t kL = kPushLanes<float>;
  static_assert(kL == 16, "a block is two vectors of 8");
  const int64_t E = LU.embed_dim;
  float h2 = 0;
  int overflow = 0;
#pragma omp simd reduction(+ : h2) reduction(| : overflow)
  for (int64_t j = u0; j < u0 + kL; ++j) {
    const PullHinge<float> ph = hinge_of(r[j]);
    h2 += ph.h * ph.h;
    coef[j] = ph.coef;
    overflow |= coef_overflowed(ph.coef, r[j]) ? 1 : 0;
  }
  if (overflow) {
    fix_overflowed_coefs<float, true>(U, LU, PixelOffsets{0, 0, 0}, InnerStride<true>{1, 1}, mu, u0, u0 + kL, r,
                                      coef, hinge_of, 1.0f, [&](int64_t, int64_t e, float v) { grad[e] += v; });
  }
  Vec8f c0, c1, sums;
  load8(coef + u0, c0);
  load8(coef + u0 + 8, c1);
  int64_t e = 0;
  for (; e + 8 <= E; e += 8) {
    Vec8f v[8];
    for (int p = 0; p < 8; ++p) block_terms(U + (e + p) * kPushStride + u0, mu[e + p], c0, c1, v[p]);
    lane_sums8(v, sums);
    for (int p = 0; p < 8; ++p) grad[e + p] += sums[p];
  }
  if (e < E) {
    Vec8f v[8] = {};
    for (int p = 0; e + p < E; ++p) block_terms(U + (e + p) * kPushStride + u0, mu[e + p], c0, c1, v[p]);
    lane_sums8(v, sums);
    for (int p = 0; e + p < E; ++p) grad[e + p] += sums[p];
  }
  return h2;
}

// Pass 2: the push's sums of q^2 and of d(q^2)/dx over the n pixels in U.
template <typename acc_t, int kNorm>
static void push_sums(const ChunkArgs& a, acc_t* U, int64_t n, acc_t* r, acc_t* coef) {
  const PixelLayout LU = gathered_layout(*a.layout);
  const int64_t E = LU.embed_dim;
  const acc_t delta_d = acc_t(a.config->delta_d);
  acc_t* push = static_cast<acc_t*>(a.push);
  acc_t* push_grad = static_cast<acc_t*>(a.push_grad);
  for_each_push_block<acc_t, kNorm>(a, LU, U, n, r, [&](int64_t k, const acc_t* mu, int64_t u0, int64_t u1) {
    auto hinge_of = [&](acc_t rj) { return unlabeled_hinge(rj, delta_d, kNorm); };
    if constexpr (std::is_same_v<acc_t, float> && kNorm == 2) {
      if (u1 - u0 == kPushLanes<float>) {
        push[k] += push_block_sums(U, LU, mu, u0, r, coef, hinge_of, push_grad + k * E);
        return;
      }
    }
    push[k] += hinge_sums_of_norms<acc_t, kNorm, true>(U, LU, PixelOffsets{0, 0, 0}, InnerStride<true>{1, 1}, mu, u0,
                                                        u1, u1, r, coef, hinge_of, push_grad + k * E);
  });
}

// buf[(e + p) * kPushStride + block + v] += sum over the kept clusters i,
// in order, of cw[i][v] * (U[e + p][block + v] - mt[e + p][i]), for kP
// components from e: push_grads' sums of a block of lanes (kV vectors of kW).
template <int kP, typename Vec, int64_t kV, int64_t kW, typename acc_t>
static inline void add_kept_planes(const acc_t* U, acc_t* buf, const acc_t* cw, const acc_t* mt, int64_t e,
                                   int64_t K, int64_t block, int64_t kept) {
  Vec sum[kP][kV], u[kP][kV];
  for (int p = 0; p < kP; ++p) {
    for (int64_t h = 0; h < kV; ++h) {
      std::memcpy(&sum[p][h], buf + (e + p) * kPushStride + block + h * kW, sizeof(Vec));
      std::memcpy(&u[p][h], U + (e + p) * kPushStride + block + h * kW, sizeof(Vec));
    }
  }
  for (int64_t i = 0; i < kept; ++i) {
    Vec c[kV];
    for (int64_t h = 0; h < kV; ++h) std::memcpy(&c[h], cw + i * kPushCoefLanes + h * kW, sizeof(Vec));
    for (int p = 0; p < kP; ++p) {
      const acc_t m = mt[(e + p) * K + i];
      for (int64_t h = 0; h < kV; ++h) sum[p][h] += c[h] * (u[p][h] - m);
    }
  }
  for (int p = 0; p < kP; ++p) {
    for (int64_t h = 0; h < kV; ++h) std::memcpy(buf + (e + p) * kPushStride + block + h * kW, &sum[p][h], sizeof(Vec));
  }
}

// Pass 3: buf[e * kPushStride + u] = w * sum over the clusters of d(q^2)/dx_e
// for the n pixels in U (clusters in present order for each pixel). A block
// of lanes meets its clusters one at a time (for_each_push_block); their
// coefficients and means are kept (cw: K rows of kPushCoefLanes, mt: E rows
// of K) and added when the block is done, four components at a time over
// all its clusters, the lanes' sums held in registers: each term added in the
// same order as cluster by cluster, so the same bits, with each component
// of U and of the sums loaded once per block instead of once per cluster.
template <typename acc_t, int kNorm>
static void push_grads(const ChunkArgs& a, acc_t* U, int64_t n, acc_t w, acc_t* r, acc_t* coef, acc_t* buf) {
  constexpr int64_t kL = kPushLanes<acc_t>;
  static_assert(kL <= kPushCoefLanes, "the coefficient rows hold a block of lanes");
  const PixelLayout LU = gathered_layout(*a.layout);
  const int64_t E = LU.embed_dim, K = a.config->num_slots;
  const acc_t delta_d = acc_t(a.config->delta_d);
  const InnerStride<true> in{1, 1};
  acc_t* cw = buf + E * kPushStride;
  acc_t* mt = cw + K * kPushCoefLanes;
  const int64_t padded = (n + kL - 1) / kL * kL;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t u = 0; u < padded; ++u) buf[e * kPushStride + u] = 0;
  }
  int64_t block = -1, kept = 0;  // the block being met (its u0), its clusters kept
  auto add_kept = [&]() {
    if (kept == 0) return;
    if constexpr (kNorm == 2) {
      // The block's lanes in GCC vectors of 32 bytes, four components at a
      // time: eight chains of FMAs side by side (an array with omp simd was
      // kept on the stack, a store and a load per cluster; one component at
      // a time waits on the FMA's latency).
      typedef acc_t Vec __attribute__((vector_size(32)));
      constexpr int64_t kW = 32 / int64_t(sizeof(acc_t)), kV = kL / kW;
      int64_t e = 0;
      for (; e + 4 <= E; e += 4) add_kept_planes<4, Vec, kV, kW>(U, buf, cw, mt, e, K, block, kept);
      for (; e < E; ++e) add_kept_planes<1, Vec, kV, kW>(U, buf, cw, mt, e, K, block, kept);
    } else {
      for (int64_t e = 0; e < E; ++e) {
        const acc_t* ue = U + e * kPushStride + block;
        acc_t* be = buf + e * kPushStride + block;
        for (int64_t i = 0; i < kept; ++i) {
          const acc_t m = mt[e * K + i];
          const acc_t* c = cw + i * kPushCoefLanes;
#pragma omp simd
          for (int64_t v = 0; v < kL; ++v) be[v] += c[v] * norm_grad(ue[v] - m, acc_t(0), 1);
        }
      }
    }
    kept = 0;
  };
  for_each_push_block<acc_t, kNorm>(a, LU, U, n, r, [&](int64_t, const acc_t* mu, int64_t u0, int64_t u1) {
    if (u0 != block) {
      add_kept();
      block = u0;
    }
    int overflow = 0;
#pragma omp simd reduction(| : overflow)
    for (int64_t u = u0; u < u1; ++u) {
      coef[u] = w * unlabeled_hinge(r[u], delta_d, kNorm).coef;
      overflow |= coef_overflowed(coef[u], r[u]) ? 1 : 0;
    }
    if (kNorm == 2 && overflow) {  // (rare) these go in now, after the terms of the clusters before
      add_kept();
      fix_overflowed_coefs<acc_t, true>(
          U, LU, PixelOffsets{0, 0, 0}, in, mu, u0, u1, r, coef,
          [&](acc_t rj) { return unlabeled_hinge(rj, delta_d, kNorm); }, w,
          [&](int64_t u, int64_t e, acc_t v) { buf[e * kPushStride + u] += v; });
    }
    acc_t* c = cw + kept * kPushCoefLanes;
    for (int64_t v = 0; v < kL; ++v) c[v] = v < u1 - u0 ? coef[u0 + v] : acc_t(0);
    for (int64_t e = 0; e < E; ++e) mt[e * K + kept] = mu[e];
    ++kept;
  });
  add_kept();
}

// Positions of a segment's unlabeled pixels (slot kIgnored), ascending; their count.
static inline int64_t unlabeled_positions(const SlotRun* runs, int64_t n, int32_t* at) {
  int64_t count = 0;
  for (int64_t r = 0; r < n; ++r) {
    if (runs[r].slot != kIgnored) continue;
    for (int32_t j = runs[r].start; j < runs[r].end; ++j) at[count++] = j;
  }
  return count;
}

// ---- pass 1: per-slot sums of x and counts ---------------------------------
// Reads each embedding of the chunk once; writes the chunk's K x E partial
// sums and K counts (caller-zeroed, private to this chunk). The sums are of
// x - p, p (the pivot) being the first pixel of the slot in the chunk, so
// that equal embeddings sum to exactly 0 and give exactly equal means
// (loss.cpp combines the chunks), whatever the dtype and the count.
template <typename scalar_t, bool kUnit>
static void cluster_sums_impl(const ChunkArgs& a) {
  using acc_t = typename AccOf<scalar_t>::type;
  const PixelLayout& L = *a.layout;
  const int64_t E = L.embed_dim;
  const scalar_t* x = static_cast<const scalar_t*>(a.x) + a.image * L.x_batch_stride;
  acc_t* sums = static_cast<acc_t*>(a.sums);
  acc_t* pivots = static_cast<acc_t*>(a.pivots);
  const InnerStride<kUnit> in{L.x_strides[L.ndim - 1], 0};
  SlotRun runs[kTile];
  for_each_segment(L, a.begin, a.end, [&](PixelOffsets o, int64_t len) {
    const int64_t nr =
        segment_runs(a, a.image * L.label_batch_stride + o.label, L.label_strides[L.ndim - 1], len, runs, a.bad);
    if (a.unlabeled) *a.unlabeled += count_unlabeled(runs, nr);
    for_each_cluster_run(runs, nr, [&](int64_t s, int64_t t, int64_t k) {
      if (a.counts[k] == 0) {  // the slot's first pixel in this chunk is its pivot (0 if not finite,
                               // so that an inf sums to inf as in a plain sum)
        for (int64_t e = 0; e < E; ++e) {
          const acc_t v = to_acc(x[o.x + e * L.x_embed_stride + s * in.xs()]);
          pivots[k * E + e] = v - v == acc_t(0) ? v : acc_t(0);
        }
      }
      a.counts[k] += t - s;
    });
    // Four planes at a time across the segment's runs, so that each plane is
    // read as a stream (stages of runs, below): each run's sum of each plane
    // as before, added to its slot in run order, so the same bits.
    for (int64_t e0 = 0; e0 < E; e0 += 4) {
      const int64_t ne = std::min<int64_t>(4, E - e0);
      for_each_cluster_run(runs, nr, [&](int64_t s, int64_t t, int64_t k) {
        plane_sums<scalar_t, kUnit>(x + o.x + e0 * L.x_embed_stride, L.x_embed_stride, ne, in, pivots + k * E + e0, s,
                                    t, padded_end<kUnit>(s, t, len), sums + k * E + e0,
                                    [](acc_t d, int64_t) { return d; });
      });
    }
  });
}

// ---- pass 2: per-slot sums of h^2 and of d(h^2)/dx --------------------------
// Reads each embedding of the chunk once from memory (the second look at a
// segment, kTile x E values, hits cache); writes the chunk's K partial hinge sums and K x E partial
// gradient sums.
template <typename scalar_t, int kNorm, bool kUnit>
static void hinge_sums_impl(const ChunkArgs& a) {
  using acc_t = typename AccOf<scalar_t>::type;
  const PixelLayout& L = *a.layout;
  const int64_t E = L.embed_dim;
  const scalar_t* x = static_cast<const scalar_t*>(a.x) + a.image * L.x_batch_stride;
  const acc_t* means = static_cast<const acc_t*>(a.means);
  acc_t* hinge = static_cast<acc_t*>(a.hinge);
  acc_t* hinge_grad = static_cast<acc_t*>(a.hinge_grad);
  const acc_t delta_v = acc_t(a.config->delta_v);
  const InnerStride<kUnit> in{L.x_strides[L.ndim - 1], 0};
  SlotRun runs[kTile];
  acc_t r[kTile];
  acc_t coef[kTile] = {};  // (read past a run's end, then masked: never uninitialized)
  acc_t* D = kStaged<scalar_t> ? reinterpret_cast<acc_t*>(a.stage_scratch) : nullptr;  // (kStageAlloc values)
  // 16-bit types: runs of up to stage_cap padded pixels in stages (above),
  // a longer run alone, unstaged (its sum lanes would live across stages).
  const int64_t stage_cap = kStaged<scalar_t> ? std::min(stage_pixels(E), kTile) : 0;
  const int64_t ds = stage_stride(E);
  StagePiece pieces[kMaxPieces];
  int64_t np = 0, cols = 0;
  auto hinge_of = [&](acc_t rj) { return pull_hinge(rj, delta_v, kNorm); };
  for_each_segment(L, a.begin, a.end, [&](PixelOffsets o, int64_t len) {
    const int64_t nr =
        segment_runs(a, a.image * L.label_batch_stride + o.label, L.label_strides[L.ndim - 1], len, runs, nullptr);
    auto flush = [&]() {
      stage_norms<scalar_t, kNorm, kUnit>(x, L, o, in, means, pieces, np, r, D, ds);
      for (int64_t i = 0; i < np; ++i) {  // (in run order: each slot's sums added as run by run)
        const StagePiece& q = pieces[i];
        hinge[q.k] += hinge_sums_of_norms<scalar_t, kNorm, kUnit>(x, L, offsets_from(o, q.s, in), in,
                                                                  means + q.k * E, 0, q.t - q.s, q.tp - q.s, r + q.c,
                                                                  coef + q.c, hinge_of, hinge_grad + q.k * E, D + q.c,
                                                                  ds);
      }
      np = cols = 0;
    };
    for_each_cluster_run(runs, nr, [&](int64_t s, int64_t t, int64_t k) {
      const int64_t tp = padded_end<kUnit>(s, t, len);
      if (tp - s <= stage_cap) {
        if (np == kMaxPieces || cols + (tp - s) > stage_cap) flush();
        pieces[np++] = StagePiece{s, t, tp, k, cols};
        cols += tp - s;
        return;
      }
      if (np > 0) flush();
      run_norms<scalar_t, kNorm, kUnit>(x, L, o, in, means + k * E, s, tp, r);
      hinge[k] += hinge_sums_of_norms<scalar_t, kNorm, kUnit>(x, L, o, in, means + k * E, s, t, tp, r, coef, hinge_of,
                                                              hinge_grad + k * E);
    });
    if (np > 0) flush();
    if (a.push == nullptr || a.num_present == 0) return;
    acc_t* U = static_cast<acc_t*>(a.push_scratch);
    int32_t at[kTile];
    const int64_t nu = unlabeled_positions(runs, nr, at);
    for (int64_t b0 = 0; b0 < nu; b0 += kPushBlock) {
      const int64_t n = nu - b0 < kPushBlock ? nu - b0 : kPushBlock;
      gather_pixels<scalar_t, kUnit>(x, L, o, in, at + b0, n, U);
      push_sums<acc_t, kNorm>(a, U, n, r, coef);
    }
  });
}

#if defined(DISCLOSS_CPU_BF16)
// plane_grad for bfloat16 from staged differences d (L2): 16 values per
// vcvtne2ps2bf16, which rounds to nearest even as from_acc does but flushes
// subnormal inputs to zero and keeps a NaN's payload; a block of 16 with a
// NaN or a subnormal (one vfpclassps test per 8) takes from_acc instead.
// The same FMA as the loop in plane_grad, so the same bits.
static inline void bf16_plane_grad(const float* d, float be, const float* coef, int64_t n, BFloat16* ge) {
  constexpr int kNanOrSubnormal = 0x01 | 0x20 | 0x80;  // quiet NaN, subnormal, signalling NaN
  const __m256 vb = _mm256_set1_ps(be);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256 g0 = _mm256_fmadd_ps(_mm256_loadu_ps(coef + j), _mm256_loadu_ps(d + j), vb);
    const __m256 g1 = _mm256_fmadd_ps(_mm256_loadu_ps(coef + j + 8), _mm256_loadu_ps(d + j + 8), vb);
    if ((_mm256_fpclass_ps_mask(g0, kNanOrSubnormal) | _mm256_fpclass_ps_mask(g1, kNanOrSubnormal)) == 0) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(ge + j), reinterpret_cast<__m256i>(_mm256_cvtne2ps_pbh(g1, g0)));
      continue;
    }
    for (int64_t u = j; u < j + 16; ++u) ge[u] = from_acc(__builtin_fmaf(coef[u], d[u], be), ge);
  }
  for (; j < n; ++j) ge[j] = from_acc(__builtin_fmaf(coef[j], d[j], be), ge);
}
#endif

// ge[j] = from_acc(coef[j] * u_j + be), j in [0, n): u_j = d_j (L2) or its
// sign (L1), d_j = diff_of<kDiff>(xe[j], m) (kDiff false: xe holds the
// differences, staged). kUnitX, kUnitG: unit strides.
template <int kNorm, bool kDiff, bool kUnitX, bool kUnitG, typename src_t, typename scalar_t>
static inline void plane_grad(const src_t* xe, int64_t xs, typename AccOf<scalar_t>::type m,
                              typename AccOf<scalar_t>::type be, const typename AccOf<scalar_t>::type* coef, int64_t n,
                              scalar_t* ge, int64_t gs) {
  using acc_t = typename AccOf<scalar_t>::type;
#if defined(DISCLOSS_CPU_BF16)
  if constexpr (std::is_same_v<scalar_t, BFloat16> && kNorm == 2 && !kDiff && kUnitX && kUnitG) {
    bf16_plane_grad(xe, be, coef, n, ge);
    return;
  }
#endif
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const acc_t d = diff_of<kDiff>(xe[j * (kUnitX ? 1 : xs)], m);
    const acc_t u = kNorm == 2 ? d : norm_grad(d, acc_t(0), 1);
    ge[j * (kUnitG ? 1 : gs)] = from_acc(coef[j] * u + be, static_cast<scalar_t*>(nullptr));
  }
}

// ---- pass 3: the gradient ----------------------------------------------------
// grad x_i = var_coef[c] * d(h_i^2)/dx_i + mean_coef[c]; 0 for ignored
// pixels, or with the push w * sum_c d(q_ic^2)/dx_i for the unlabeled ones
// (gathered after the segment's runs). Reads each embedding once from
// memory and writes each gradient element once.
template <typename scalar_t, int kNorm, bool kUnit>
static void write_grad_impl(const ChunkArgs& a) {
  using acc_t = typename AccOf<scalar_t>::type;
  const PixelLayout& L = *a.layout;
  const int64_t E = L.embed_dim;
  const scalar_t* x = static_cast<const scalar_t*>(a.x) + a.image * L.x_batch_stride;
  scalar_t* grad = static_cast<scalar_t*>(a.grad) + a.image * L.grad_batch_stride;
  const acc_t* means = static_cast<const acc_t*>(a.means);
  const acc_t* var_coef = static_cast<const acc_t*>(a.var_coef);
  const acc_t* mean_coef = static_cast<const acc_t*>(a.mean_coef);
  const acc_t* push_coef = static_cast<const acc_t*>(a.push_coef);
  const acc_t delta_v = acc_t(a.config->delta_v);
  const InnerStride<kUnit> in{L.x_strides[L.ndim - 1], L.grad_strides[L.ndim - 1]};
  SlotRun runs[kTile];
  acc_t r[kTile];
  acc_t coef[kTile];
  const bool with_push = push_coef != nullptr && a.num_present > 0;
  acc_t* D = kStaged<scalar_t> ? reinterpret_cast<acc_t*>(a.stage_scratch) : nullptr;  // (kStageAlloc values)
  // 16-bit types: in stages of stage_cap columns (above), a run cut where a
  // stage is full (its pixels are independent); pieces with k < 0 write
  // zeros. The pieces' gradient is written in run order, so that what a
  // padded piece writes past its run is written again by the piece after it.
  const int64_t stage_cap = kStaged<scalar_t> ? std::min(stage_pixels(E), kTile) : 0;
  const int64_t ds = stage_stride(E);
  StagePiece pieces[kMaxPieces];
  int64_t np = 0, cols = 0;
  auto zero_grad = [&](scalar_t* ge, int64_t s, int64_t t) {  // (ignored pixels)
    for (int64_t j = s; j < t; ++j) ge[j * in.gs()] = from_acc(acc_t(0), static_cast<scalar_t*>(nullptr));
  };
  acc_t* U = static_cast<acc_t*>(a.push_scratch);
  acc_t* push_buf = U + push_scratch_elems(L.embed_dim, a.config->num_slots, false);
  for_each_segment(L, a.begin, a.end, [&](PixelOffsets o, int64_t len) {
    const int64_t nr =
        segment_runs(a, a.image * L.label_batch_stride + o.label, L.label_strides[L.ndim - 1], len, runs, a.bad);
    GradAhead<scalar_t> ahead(grad + o.grad, L.grad_embed_stride, kUnit && stage_cap == 0 ? E : 0);
    auto flush = [&]() {
      stage_norms<scalar_t, kNorm, kUnit>(x, L, o, in, means, pieces, np, r, D, ds);
      for (int64_t i = 0; i < np; ++i) {
        const StagePiece& q = pieces[i];
        if (q.k < 0) continue;
        const acc_t av = var_coef[q.k];
#pragma omp simd
        for (int64_t j = q.c; j < q.c + (q.tp - q.s); ++j) coef[j] = av * pull_hinge(r[j], delta_v, kNorm).coef;
      }
      for (int64_t e = 0; e < E; ++e) {
        scalar_t* ge = grad + o.grad + e * L.grad_embed_stride;
        for (int64_t i = 0; i < np; ++i) {
          const StagePiece& q = pieces[i];
          if (q.k < 0) {
            zero_grad(ge, q.s, q.t);
          } else {
            plane_grad<kNorm, false, true, kUnit>(D + e * ds + q.c, 1, acc_t(0), mean_coef[q.k * E + e], coef + q.c,
                                                  q.tp - q.s, ge + q.s * in.gs(), in.gs());
          }
        }
      }
      np = cols = 0;
    };
    for (int64_t ri = 0; ri < nr; ++ri) {
      const int64_t s = runs[ri].start, t = runs[ri].end, k = runs[ri].slot;
      ahead.reach(t);
      if (k == kIgnored && with_push) continue;  // below
      const int64_t tp = padded_end<kUnit>(s, t, len);  // (the gradient past t: written again by its own run)
      if (stage_cap > 0) {
        if (k < 0) {
          if (np == kMaxPieces) flush();
          pieces[np++] = StagePiece{s, t, t, k, cols};
          continue;
        }
        for (int64_t sb = s; sb < tp;) {
          if (np == kMaxPieces || cols == stage_cap) flush();
          const int64_t se = std::min(tp, sb + (stage_cap - cols));
          pieces[np++] = StagePiece{sb, se, se, k, cols};
          cols += se - sb;
          sb = se;
        }
        continue;
      }
      if (k < 0) {
        for (int64_t e = 0; e < E; ++e) {
          scalar_t* ge = grad + o.grad + e * L.grad_embed_stride;
          zero_grad(ge, s, t);
        }
        continue;
      }
      const acc_t* mu = means + k * E;
      const acc_t* b = mean_coef + k * E;
      const acc_t av = var_coef[k];
      run_norms<scalar_t, kNorm, kUnit>(x, L, o, in, mu, s, tp, r);
#pragma omp simd
      for (int64_t j = s; j < tp; ++j) coef[j] = av * pull_hinge(r[j], delta_v, kNorm).coef;
      for (int64_t e = 0; e < E; ++e) {
        scalar_t* ge = grad + o.grad + e * L.grad_embed_stride + s * in.gs();
        plane_grad<kNorm, true, kUnit, kUnit>(x + o.x + e * L.x_embed_stride + s * in.xs(), in.xs(), mu[e], b[e],
                                              coef + s, tp - s, ge, in.gs());
      }
    }
    if (np > 0) flush();
    if (!with_push) return;
    int32_t at[kTile];
    const int64_t nu = unlabeled_positions(runs, nr, at);
    for (int64_t b0 = 0; b0 < nu; b0 += kPushBlock) {
      const int64_t n = nu - b0 < kPushBlock ? nu - b0 : kPushBlock;
      gather_pixels<scalar_t, kUnit>(x, L, o, in, at + b0, n, U);
      push_grads<acc_t, kNorm>(a, U, n, push_coef[0], r, coef, push_buf);
      int32_t first[kPushBlock + 1];
      const int64_t stretches = kUnit ? position_stretches(at + b0, n, first) : 0;
      for (int64_t e = 0; e < E; ++e) {
        scalar_t* ge = grad + o.grad + e * L.grad_embed_stride;
        const acc_t* be = push_buf + e * kPushStride;
        if (kUnit && stretches * 4 <= n) {
          for (int64_t i = 0; i < stretches; ++i) {
            const int64_t u0 = first[i], len = first[i + 1] - u0;
            scalar_t* dst = ge + at[b0 + u0];
#pragma omp simd
            for (int64_t j = 0; j < len; ++j) dst[j] = from_acc(be[u0 + j], static_cast<scalar_t*>(nullptr));
          }
        } else {
          for (int64_t u = 0; u < n; ++u) ge[at[b0 + u] * in.gs()] = from_acc(be[u], static_cast<scalar_t*>(nullptr));
        }
      }
    }
  });
}

// ---- entry points --------------------------------------------------------------

template <typename scalar_t>
static void cluster_sums(const ChunkArgs& a) {
  const PixelLayout& L = *a.layout;
  if (L.x_strides[L.ndim - 1] == 1) return cluster_sums_impl<scalar_t, true>(a);
  return cluster_sums_impl<scalar_t, false>(a);
}

template <typename scalar_t>
static void hinge_sums(const ChunkArgs& a) {
  const PixelLayout& L = *a.layout;
  const bool unit = L.x_strides[L.ndim - 1] == 1;
  if (a.config->norm == 1) return unit ? hinge_sums_impl<scalar_t, 1, true>(a) : hinge_sums_impl<scalar_t, 1, false>(a);
  return unit ? hinge_sums_impl<scalar_t, 2, true>(a) : hinge_sums_impl<scalar_t, 2, false>(a);
}

template <typename scalar_t>
static void write_grad(const ChunkArgs& a) {
  const PixelLayout& L = *a.layout;
  const bool unit = L.x_strides[L.ndim - 1] == 1 && L.grad_strides[L.ndim - 1] == 1;
  if (a.config->norm == 1) return unit ? write_grad_impl<scalar_t, 1, true>(a) : write_grad_impl<scalar_t, 1, false>(a);
  return unit ? write_grad_impl<scalar_t, 2, true>(a) : write_grad_impl<scalar_t, 2, false>(a);
}

// ---- the pair step of dist under L2 (paper mode) ------------------------------
// With many clusters the O(C^2 E) pair work dominates (one 64^3 volume, E =
// 16, C = 10648 blocks: over a second at 2 threads, the pixel passes a few
// ms). One mean meets kPairBlock others at a time, one per vector lane: the
// lanes' squared distances accumulate over the components, unscaled and in
// the order mean_distance sums them first, then the hinge.
// A pair whose distance leaves the range where that sum is exact to
// rounding (l2_out_of_range; the pair of a mean with itself too), or whose
// gradient weight is not finite, is redone by mean_distance /
// add_push_grad. A row's result depends on the means alone: the same bits
// at any thread count.

// d2[v] = ||m - mean v||^2 for the kLanes means of tj (columns of the
// transposed means, row stride `stride`), component by component, the
// lanes' sums held in registers over the components.
template <int64_t kLanes, typename acc_t>
static inline void squared_distance_lanes(const acc_t* m, const acc_t* tj, int64_t stride, int64_t E, acc_t* d2) {
  acc_t acc[kLanes] = {};
  for (int64_t e = 0; e < E; ++e) {
    const acc_t me = m[e];
    const acc_t* col = tj + e * stride;
#pragma omp simd
    for (int64_t v = 0; v < kLanes; ++v) {
      const acc_t d = me - col[v];
      acc[v] += d * d;
    }
  }
  for (int64_t v = 0; v < kLanes; ++v) d2[v] = acc[v];
}

// The same for n means: 64 lanes at a time (several vectors of sums, so
// several chains of dependent adds side by side: one vector's chain waits
// out the add's latency at every component), then 16, then one. Each sum
// runs over the components in order whatever its lane: the same bits.
template <typename acc_t>
static inline void squared_distances(const acc_t* m, const acc_t* tj, int64_t stride, int64_t E, int64_t n,
                                     acc_t* d2) {
  int64_t u0 = 0;
  for (; u0 + 64 <= n; u0 += 64) squared_distance_lanes<64>(m, tj + u0, stride, E, d2 + u0);
  for (; u0 + 16 <= n; u0 += 16) squared_distance_lanes<16>(m, tj + u0, stride, E, d2 + u0);
  for (int64_t u = u0; u < n; ++u) {
    acc_t acc = 0;
    for (int64_t e = 0; e < E; ++e) {
      const acc_t d = m[e] - tj[e * stride + u];
      acc += d * d;
    }
    d2[u] = acc;
  }
}

// Rows [i0, i1) (at most kPairRows, i0 a multiple of it) meet each block of
// kPairBlock columns in turn, so that the block stays in L1 while the rows
// use it: the transposed means (E C values, 2 MiB at C = 32768) are read
// once per tile of rows, not once per row. Row i meets the columns j > i
// (upper: the sum) or every j (the gradient), within its window when there
// is one; fn(i, j, n) gets each row's columns [j, j + n) of each block, in
// block order.
template <typename Fn>
static void for_each_pair_block(const PairArgs& a, int64_t i0, int64_t i1, bool upper, Fn&& fn) {
  int64_t lo[kPairRows], hi[kPairRows], begin = a.num_present, end = 0;
  for (int64_t i = i0; i < i1; ++i) {
    int64_t& l = lo[i - i0];
    int64_t& h = hi[i - i0];
    l = upper ? i + 1 : 0;
    h = a.num_present;
    if (a.window_lo != nullptr) {
      l = std::max(l, a.window_lo[i]);
      h = a.window_hi[i];
    }
    if (l < h) {
      begin = std::min(begin, l);
      end = std::max(end, h);
    }
  }
  for (int64_t j0 = begin; j0 < end; j0 += kPairBlock) {
    const int64_t j1 = std::min(j0 + kPairBlock, end);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t j = std::max(j0, lo[i - i0]), n = std::min(j1, hi[i - i0]) - j;
      if (n > 0) fn(i, j, n);
    }
  }
}

// out[i - i0] = sum over j > i of p_ij^2, rows [i0, i1).
template <typename acc_t>
static void pair_rows(const PairArgs& a, int64_t i0, int64_t i1, void* out) {
  const int64_t E = a.embed_dim;
  const acc_t* mu = static_cast<const acc_t*>(a.means);
  const acc_t* t = static_cast<const acc_t*>(a.transposed);
  const acc_t delta_d = acc_t(a.delta_d);
  acc_t* row_sum = static_cast<acc_t*>(out);
  unsigned char redo_pair[kPairBlock];
  acc_t d2[kPairBlock];
  for (int64_t i = i0; i < i1; ++i) row_sum[i - i0] = 0;
  for_each_pair_block(a, i0, i1, true, [&](int64_t i, int64_t j, int64_t n) {
    const acc_t* m = mu + a.present[i] * E;
    squared_distances(m, t + j, a.stride, E, n, d2);
    acc_t s = 0;
    int redo = 0;
#pragma omp simd reduction(+ : s) reduction(| : redo)
    for (int64_t u = 0; u < n; ++u) {
      const acc_t r = std::sqrt(d2[u]);
      const bool out_of_range = l2_out_of_range(r);
      const acc_t p = out_of_range ? acc_t(0) : push_hinge(r, delta_d);
      redo_pair[u] = out_of_range;
      redo |= int(out_of_range);
      s += p * p;
    }
    if (redo) {
      for (int64_t u = 0; u < n; ++u) {
        if (!redo_pair[u]) continue;
        const acc_t p = push_hinge(mean_distance(m, mu + a.present[j + u] * E, E, 2), delta_d);
        s += p * p;
      }
    }
    row_sum[i - i0] += s;
  });
}

// The gradient of the pairs of one tile, both ends of each pair at once:
// rows i in [i0, i1) meet the columns j in [j0, j1) with j > i (within i's
// window when there is one). grads (C x E, rows in the plan's order) gets,
// for each such pair, scale * d(p_ij^2)/dmu_i in row i and its negative in
// row j: each pair's distance is formed once, where a whole row of pairs
// formed it twice. A row's own terms are summed per row and added when the
// row is done; the terms of the columns gather in scratch (col, E x
// kPairBlock, from the caller: no allocation here, see the top of this file)
// and are added when the tile is done. The caller runs tiles whose rows and columns
// are disjoint side by side (loss.cpp pair_gradients), in an order fixed
// by C alone: the same bits at any thread count.
template <typename acc_t>
static void pair_grads(const PairArgs& a, int64_t i0, int64_t i1, int64_t j0, int64_t j1, double scale_d,
                       void* grads_v, void* scratch) {
  const int64_t E = a.embed_dim;
  const acc_t* mu = static_cast<const acc_t*>(a.means);
  const acc_t* t = static_cast<const acc_t*>(a.transposed);
  const acc_t delta_d = acc_t(a.delta_d), scale = acc_t(scale_d);
  acc_t* grads = static_cast<acc_t*>(grads_v);
  acc_t w[kPairBlock], d2[kPairBlock];
  unsigned char redo_pair[kPairBlock];
  acc_t* col = static_cast<acc_t*>(scratch);  // col[e * kPairBlock + (j - j0)]
  for (int64_t k = 0; k < E * kPairBlock; ++k) col[k] = 0;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t lo = std::max(j0, i + 1);
    const int64_t hi = a.window_hi != nullptr ? std::min(j1, a.window_hi[i]) : j1;
    const int64_t n = hi - lo;
    if (n <= 0) continue;
    const acc_t* tj = t + lo;
    const acc_t* m = mu + a.present[i] * E;
    acc_t* g = grads + i * E;
    squared_distances(m, tj, a.stride, E, n, d2);
    int redo = 0;
#pragma omp simd reduction(| : redo)
    for (int64_t u = 0; u < n; ++u) {
      // d(p^2)/dmu_i = -2 p (mu_i - mu_j) / r: wu, the weight of mu_i - mu_j.
      const acc_t r = std::sqrt(d2[u]);
      const acc_t wu = -2 * push_hinge(r, delta_d) * scale / r;
      const bool out_of_range = l2_out_of_range(r) || !(wu - wu == acc_t(0));
      w[u] = out_of_range ? acc_t(0) : wu;
      redo_pair[u] = out_of_range;
      redo |= int(out_of_range);
    }
    for (int64_t e = 0; e < E; ++e) {
      const acc_t me = m[e];
      const acc_t* ce = tj + e * a.stride;
      acc_t* be = col + e * kPairBlock + (lo - j0);
      acc_t s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t u = 0; u < n; ++u) {
        const acc_t d = me - ce[u];
        s += w[u] * d;
        be[u] -= w[u] * d;
      }
      g[e] += s;
    }
    if (redo) {
      for (int64_t u = 0; u < n; ++u) {
        if (!redo_pair[u]) continue;
        const acc_t* mj = mu + a.present[lo + u] * E;
        add_push_grad(g, m, mj, E, delta_d, 2, scale);
        add_push_grad(grads + (lo + u) * E, mj, m, E, delta_d, 2, scale);
      }
    }
  }
  for (int64_t j = j0; j < j1; ++j) {
    acc_t* g = grads + j * E;
    for (int64_t e = 0; e < E; ++e) g[e] += col[e * kPairBlock + (j - j0)];
  }
}

// ---- the slot map's check -------------------------------------------------------
// One vector loop over the labels (kUnit: contiguous; a run-time stride
// would need a gather per vector, so that copy stays scalar).
template <bool kUnit, typename label_t>
static inline int64_t outside_identity(const label_t* lab, int64_t n, int64_t stride, const LossConfig& c) {
  const int64_t K = c.num_slots;
  const bool has_ignore = c.has_ignore;
  const int64_t ignore = c.ignore_index;
  const auto out_of_identity = [&](int64_t v) {
    return int64_t(!((v >= 0) & (v < K)) & !(has_ignore & (v == ignore)));
  };
  int64_t outside = 0;
  int64_t j = 0;
  if (kUnit) {  // a line of labels per step, the line kLabelAhead bytes on prefetched
    constexpr int64_t kW = 64 / int64_t(sizeof(label_t));
    for (; j + kW <= n; j += kW) {
      prefetch_ahead(lab + j, kLabelAhead);
#pragma omp simd reduction(| : outside)
      for (int64_t u = 0; u < kW; ++u) outside |= out_of_identity(int64_t(lab[j + u]));
    }
  }
#pragma omp simd reduction(| : outside)
  for (int64_t i = j; i < n; ++i) outside |= out_of_identity(int64_t(lab[kUnit ? i : i * stride]));
  return outside;
}

static int64_t labels_outside_identity(const void* labels, LabelKind kind, int64_t n, int64_t stride,
                                       const LossConfig& c) {
  return with_labels(kind, labels, 0, [&](const auto* lab) {
    return stride == 1 ? outside_identity<true>(lab, n, stride, c) : outside_identity<false>(lab, n, stride, c);
  });
}

template <typename scalar_t>
static ChunkKernels kernels_for() {
  using acc_t = typename AccOf<scalar_t>::type;
  return {&cluster_sums<scalar_t>, &hinge_sums<scalar_t>, &write_grad<scalar_t>, &pair_rows<acc_t>,
          &pair_grads<acc_t>, &labels_outside_identity};
}

ChunkKernels chunk_kernels(ScalarKind kind) {
  switch (kind) {
    case ScalarKind::Half: return kernels_for<Half>();
    case ScalarKind::BFloat16: return kernels_for<BFloat16>();
    case ScalarKind::Float: return kernels_for<float>();
    case ScalarKind::Double: return kernels_for<double>();
  }
  return kernels_for<float>();
}

}  // namespace DISCLOSS_CPU_ISA
}  // namespace cpu
}  // namespace discloss
