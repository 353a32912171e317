// Warp and block reductions, and the per-warp privatized per-slot
// accumulators of the streaming passes (cuda/loss.cu).
//
// Every reduction here adds in an order that depends only on which lanes take
// part (that is, on the labels), never on timing, so the results are bitwise
// reproducible run to run. Only SlotAccumulator in global mode (float atomics
// on global memory) is not; loss.cu uses that mode only when
// torch.are_deterministic_algorithms_enabled() is false.
//
// Every warp-level function must be called by all 32 lanes of the warp
// (converged, full mask); blocks have a multiple of 32 threads.
#pragma once

#include <cstdint>

namespace discloss {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x & 31u); }

// Sum over the 32 lanes of the warp (a shfl_down tree); valid in lane 0.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(kFullMask, v, offset);
  return v;
}

// Maximum over the warp, valid in every lane.
__device__ __forceinline__ int warp_max(int v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const int other = __shfl_xor_sync(kFullMask, v, offset);
    v = other > v ? other : v;
  }
  return v;
}

// True in the lowest lane of `peers` (a lane set that contains this lane).
__device__ __forceinline__ bool is_group_leader(unsigned peers) {
  return (peers & ((1u << lane_id()) - 1u)) == 0u;
}

// Segmented warp sum for arbitrary groups of lanes: `peers` is this lane's
// group (as returned by __match_any_sync on a key; every lane belongs to
// exactly one group). Returns the sum of v over the group in the group's
// lowest lane (is_group_leader); other lanes get partial sums.
//
// A binary tree within each group: in round t every lane still active adds
// the value of its next active peer, then the lanes whose rank among the
// group has bit t set retire. ceil(log2(largest group)) rounds; one group
// spanning the warp (the common case: neighbouring pixels share a label)
// takes the plain shfl_down tree instead.
template <typename T>
__device__ __forceinline__ T peer_sum(unsigned peers, T v) {
  if (__all_sync(kFullMask, peers == kFullMask)) return warp_sum(v);
  const int lane = lane_id();
  unsigned rank = static_cast<unsigned>(__popc(peers & ((1u << lane) - 1u)));
  // Peers above this lane. For lane 31, 2u << 31 wraps to 0 and the mask is 0.
  unsigned higher = peers & ~((2u << lane) - 1u);
  while (__any_sync(kFullMask, higher != 0u)) {
    const int next = __ffs(static_cast<int>(higher)) - 1;  // -1: none left
    const T other = __shfl_sync(kFullMask, v, next >= 0 ? next : lane);
    if (next >= 0) v += other;
    higher &= ~__ballot_sync(kFullMask, (rank & 1u) != 0u);
    rank >>= 1;
  }
  return v;
}

// Sum over the block in a fixed order (warp trees, then warp totals in warp
// order); valid in thread 0. `scratch` holds 32 elements. Every thread of the
// block must call it; it synchronises the block twice.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  const int warp = static_cast<int>(threadIdx.x >> 5);
  const int warps = static_cast<int>((blockDim.x + 31u) >> 5);
  v = warp_sum(v);
  if (lane_id() == 0) scratch[warp] = v;
  __syncthreads();
  T total = T(0);
  if (threadIdx.x == 0) {
    for (int w = 0; w < warps; ++w) total += scratch[w];
  }
  __syncthreads();
  return total;
}

// Maximum over the block, valid in every thread; NaN when any thread's v is
// NaN (a max that dropped it would let the push's ball skip a NaN pixel).
// `scratch` holds 32 elements. Every thread of the block must call it; it
// synchronises the block twice.
template <typename T>
__device__ __forceinline__ T block_max_nan(T v, T* scratch) {
  const int warp = static_cast<int>(threadIdx.x >> 5);
  const int warps = static_cast<int>((blockDim.x + 31u) >> 5);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const T other = __shfl_xor_sync(kFullMask, v, offset);
    v = (other > v || other != other) ? other : v;
  }
  if (lane_id() == 0) scratch[warp] = v;
  __syncthreads();
  T m = scratch[0];
  for (int w = 1; w < warps; ++w) m = (scratch[w] > m || scratch[w] != scratch[w]) ? scratch[w] : m;
  __syncthreads();  // scratch is reused
  return m;
}

// Exclusive prefix sum of v over the threads of the block, in thread order;
// *total receives the block's sum in every thread. `scratch` holds 33 ints.
// Every thread must call it; it synchronises the block three times.
__device__ __forceinline__ int block_exclusive_scan(int v, int* scratch, int* total) {
  const int lane = lane_id();
  const int warp = static_cast<int>(threadIdx.x >> 5);
  const int warps = static_cast<int>((blockDim.x + 31u) >> 5);
  int inclusive = v;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int other = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == 31) scratch[warp] = inclusive;
  __syncthreads();
  if (threadIdx.x == 0) {
    int running = 0;
    for (int w = 0; w < warps; ++w) {
      const int t = scratch[w];
      scratch[w] = running;
      running += t;
    }
    scratch[32] = running;
  }
  __syncthreads();
  const int exclusive = scratch[warp] + inclusive - v;
  *total = scratch[32];
  __syncthreads();
  return exclusive;
}

// A float atomic add into global memory that keeps subnormal numbers.
// NVIDIA GPUs add float32 atomically in global memory in flush-to-zero mode,
// whatever -ftz says (shared-memory float atomics, the CPU path and every
// other addition here keep subnormals): embeddings around 1e-38 would lose
// their sums. Where a flush could show at float32's precision, |v| < 2^-102
// (2^24 times the smallest normal number), the add is a compare-and-swap
// loop of IEEE additions instead; above it, a flushed operand or result is
// smaller than half an ulp of v. Embeddings of ordinary size never loop.
// Seen on an H200, 2026-11-29: test_float32_norm_range_on_every_path at
// 1e-38, global path, reg 0.4% off before this. float64 atomics do not flush.
__device__ __forceinline__ void atomic_add_keep_subnormals(float* p, float v) {
  if (!(fabsf(v) < 0x1p-102f)) {  // NaN and inf too
    atomicAdd(p, v);
    return;
  }
  if (v == 0.0f) return;
  unsigned* bits = reinterpret_cast<unsigned*>(p);
  unsigned seen = *bits;
  unsigned expected;
  do {
    expected = seen;
    seen = atomicCAS(bits, expected, __float_as_uint(__uint_as_float(expected) + v));
  } while (seen != expected);
}
__device__ __forceinline__ void atomic_add_keep_subnormals(double* p, double v) { atomicAdd(p, v); }

// Per-slot accumulators of one warp: rows of E sums and one extra value (a
// pixel count, or a sum of h^2) per slot.
//
// Shared mode: the warp's private rows in shared memory. Only group leaders
// of one warp-collective step write, each to a different slot, and the caller
// puts __syncwarp() between steps, so plain read-modify-writes suffice and the
// order of additions is fixed (deterministic).
// Global mode: float/integer atomics straight into the image's global rows
// (zeroed by the caller; floats through atomic_add_keep_subnormals). Not
// deterministic for floats.
template <typename acc_t, typename shared_extra_t, typename global_extra_t>
struct SlotAccumulator {
  acc_t* sums;                 // shared: this warp's rows; global: the image's rows
  shared_extra_t* extras;      // shared mode
  global_extra_t* global_extras;  // global mode
  int64_t embed_dim;
  bool global;

  __device__ __forceinline__ void add(int slot, int64_t e, acc_t v) const {
    acc_t* p = sums + static_cast<int64_t>(slot) * embed_dim + e;
    if (global) {
      atomic_add_keep_subnormals(p, v);
    } else {
      *p += v;
    }
  }

  template <typename T>
  __device__ __forceinline__ void add_extra(int slot, T v) const {
    if (global) {
      atomic_add_extra(global_extras + slot, v);
    } else {
      extras[slot] += static_cast<shared_extra_t>(v);
    }
  }

 private:
  __device__ __forceinline__ static void atomic_add_extra(int64_t* p, unsigned v) {
    atomicAdd(reinterpret_cast<unsigned long long*>(p), static_cast<unsigned long long>(v));
  }
  __device__ __forceinline__ static void atomic_add_extra(float* p, float v) { atomic_add_keep_subnormals(p, v); }
  __device__ __forceinline__ static void atomic_add_extra(double* p, double v) { atomicAdd(p, v); }
};

}  // namespace cuda
}  // namespace discloss
