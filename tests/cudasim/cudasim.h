// The CUDA simulator: what csrc/cuda/*.cu use of the CUDA language, as plain
// C++ that runs each kernel launch on the CPU (test-only; never shipped).
//
// Model (DESIGN §6): the blocks of a launch run one at a time; the threads of
// a block are cooperative fibers (ucontext) that run until they reach a
// barrier or a warp collective, where they wait for their partners. Every
// thread named by a collective's mask (every thread of the block for
// __syncthreads) must arrive at the same call; a barrier or collective that
// cannot complete (a divergent call, a lane that exited) is an error naming
// the kernel, the launch site and the call, never a hang. Atomics are plain
// read-modify-writes (no two fibers run at once). Shared memory is
// allocated per block at exactly the declared size (filled with 0xff bytes,
// so a read before any write gives NaN / -1) and the launch limits of the
// hardware are enforced. The order in which blocks and fibers run is chosen
// by configure(): forward, reverse or seeded random, so a missing barrier
// shows as a result that depends on the order.
//
// What it cannot show: races between truly concurrent threads, memory
// ordering, the numerics of the hardware (FMA contraction, fast math) and
// speed.
//
// Include this before csrc/cuda/runtime.cuh (the simulator's translation
// units do: tests/cudasim/*_sim.cpp). The system and torch headers come
// first: the macros below (__device__, __shared__, ...) would otherwise
// rewrite glibc's own attributes.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define DISCLOSS_CUDA_SIM 1

namespace cudasim {

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

struct __half {
  unsigned short bits;
};

using cudaStream_t = struct StreamTag*;

// ---- configuration and the launch log --------------------------------------------
enum class Order : int { Forward = 0, Reverse = 1, Random = 2 };

struct Config {
  int sm_count = 2;                          // multiProcessorCount the launchers see
  double total_memory = 8.0 * (1ull << 30);  // totalGlobalMem the launchers see
  Order order = Order::Forward;              // of the blocks and of the fibers
  uint64_t seed = 0;                         // of the random order
  bool prune = true;                         // pruning_enabled() the launchers see
};
Config& config();

// Work the kernels skipped (DISCLOSS_COUNT_SKIPPED): (tile, cluster) pairs
// of the unlabeled push, pairs of means of dist, (pixel, cluster) pairs of
// the push's gradient (pass 3).
enum class Skipped : int { PushTiles = 0, Pairs = 1, PushPixels = 2 };
void count_skipped(Skipped what, int64_t n);
int64_t skipped(Skipped what);
void reset_skipped();

// "kernel@file:line" -> launches since the last reset.
std::vector<std::pair<std::string, int64_t>> launch_log();
void reset_launch_log();

// ---- the engine ---------------------------------------------------------------------
struct LaunchInfo {
  const char* kernel;  // name, as written at the launch site
  const char* file;
  int line;
  int bounds;  // the kernel's __launch_bounds__
  dim3 grid, block;
  size_t dynamic_shared;
};

// Runs body() as every thread of every block of the launch; throws a
// c10::Error (naming the launch) for a launch a GPU would refuse or a
// barrier/collective that cannot complete.
void run_kernel(const LaunchInfo& info, const std::function<void()>& body);

// The calling fiber's indices.
const dim3& thread_idx();
const dim3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

// Shared memory of the current block: the n-th declaration a thread executes
// gets the block's n-th allocation (made by the first thread to get there).
void* shared_alloc(size_t bytes, size_t align, const char* name);
void* dynamic_shared(size_t align);
// Whether p points into the current block's shared memory.
bool in_shared(const void* p);

// Kinds of rendezvous.
enum class Op : int {
  SyncThreads,
  SyncThreadsOr,
  SyncWarp,
  Shfl,
  ShflUp,
  ShflDown,
  ShflXor,
  Ballot,
  Any,
  All,
  MatchAny
};

// Waits until every thread the op names arrives; returns this thread's
// result: the value bits it receives (shuffles), the lane mask (ballot,
// match_any) or a 0/1 predicate (any, all, syncthreads_or).
uint64_t rendezvous(Op op, unsigned mask, uint64_t bits, int arg, int width, const char* file, int line);

[[noreturn]] void fail(const std::string& what);

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "collectives carry at most 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

template <typename T>
T& shared_var(const char* name) {
  static_assert(std::is_trivially_default_constructible_v<std::remove_all_extents_t<T>>,
                "shared memory holds trivial types");
  return *static_cast<T*>(shared_alloc(sizeof(T), alignof(T), name));
}

// ---- intrinsics ----------------------------------------------------------------------
inline void syncthreads(const char* file, int line) { rendezvous(Op::SyncThreads, 0, 0, 0, 32, file, line); }
inline int syncthreads_or(int pred, const char* file, int line) {
  return static_cast<int>(rendezvous(Op::SyncThreadsOr, 0, pred != 0, 0, 32, file, line));
}
inline void syncwarp(unsigned mask, const char* file, int line) {
  rendezvous(Op::SyncWarp, mask, 0, 0, 32, file, line);
}
template <typename T>
T shfl(Op op, unsigned mask, T v, int arg, int width, const char* file, int line) {
  return from_bits<T>(rendezvous(op, mask, to_bits(v), arg, width, file, line));
}
inline unsigned ballot(unsigned mask, int pred, const char* file, int line) {
  return static_cast<unsigned>(rendezvous(Op::Ballot, mask, pred != 0, 0, 32, file, line));
}
inline int vote(Op op, unsigned mask, int pred, const char* file, int line) {
  return static_cast<int>(rendezvous(op, mask, pred != 0, 0, 32, file, line));
}
template <typename T>
unsigned match_any(unsigned mask, T v, const char* file, int line) {
  static_assert(std::is_integral_v<T> && (sizeof(T) == 4 || sizeof(T) == 8), "__match_any_sync: 32/64-bit ints");
  return static_cast<unsigned>(rendezvous(Op::MatchAny, mask, to_bits(v), 0, 32, file, line));
}

// Loads through the read-only / L2 path: plain loads, with the alignment a
// GPU requires of the type (a misaligned vector load faults there).
template <typename T>
T ldg(const T* p, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) {
    fail(std::string(what) + ": misaligned load of " + std::to_string(sizeof(T)) + " bytes");
  }
  return *p;
}

}  // namespace cudasim

// ---- the CUDA language, spelled for g++ ----------------------------------------------
using cudasim::__half;
using cudasim::cudaStream_t;
using cudasim::dim3;
using cudasim::uint4;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

#define threadIdx (::cudasim::thread_idx())
#define blockIdx (::cudasim::block_idx())
#define blockDim (::cudasim::block_dim())
#define gridDim (::cudasim::grid_dim())

#define __syncthreads() ::cudasim::syncthreads(__FILE__, __LINE__)
#define __syncthreads_or(pred) ::cudasim::syncthreads_or((pred), __FILE__, __LINE__)
#define __syncwarp(...) ::cudasim::syncwarp(::cudasim::detail_mask(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_sync(mask, v, src, ...) \
  ::cudasim::shfl(::cudasim::Op::Shfl, (mask), (v), (src), ::cudasim::detail_width(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_up_sync(mask, v, d, ...) \
  ::cudasim::shfl(::cudasim::Op::ShflUp, (mask), (v), (d), ::cudasim::detail_width(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_down_sync(mask, v, d, ...) \
  ::cudasim::shfl(::cudasim::Op::ShflDown, (mask), (v), (d), ::cudasim::detail_width(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_xor_sync(mask, v, d, ...) \
  ::cudasim::shfl(::cudasim::Op::ShflXor, (mask), (v), (d), ::cudasim::detail_width(__VA_ARGS__), __FILE__, __LINE__)
#define __ballot_sync(mask, pred) ::cudasim::ballot((mask), (pred), __FILE__, __LINE__)
#define __any_sync(mask, pred) ::cudasim::vote(::cudasim::Op::Any, (mask), (pred), __FILE__, __LINE__)
#define __all_sync(mask, pred) ::cudasim::vote(::cudasim::Op::All, (mask), (pred), __FILE__, __LINE__)
#define __match_any_sync(mask, v) ::cudasim::match_any((mask), (v), __FILE__, __LINE__)
#define __ldg(p) ::cudasim::ldg((p), "__ldg")
#define __ldcg(p) ::cudasim::ldg((p), "__ldcg")

namespace cudasim {
constexpr unsigned detail_mask(unsigned mask = 0xffffffffu) { return mask; }
constexpr int detail_width(int width = 32) { return width; }
}  // namespace cudasim

// Blocks run one after another and fibers switch only at rendezvous points,
// so every write is visible to every later read: a fence has nothing to do.
inline void __threadfence() {}

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline __half __ushort_as_half(unsigned short v) { return __half{v}; }
inline float __half2float(__half h) { return c10::detail::fp16_ieee_to_fp32_value(h.bits); }
inline float __uint_as_float(unsigned v) { return cudasim::from_bits<float>(v); }
inline unsigned __float_as_uint(float v) { return static_cast<unsigned>(cudasim::to_bits(v)); }

template <typename A, typename B>
constexpr std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <typename A, typename B>
constexpr std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}

// Atomics: the fibers of a launch never run at the same time.
template <typename T>
T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
// A GPU adds float32 atomically in global memory in flush-to-zero mode
// (subnormal operands and result become zero), whatever -ftz says; in shared
// memory it keeps subnormals. Modelled here, so that code which relies on
// subnormal sums fails on the simulator as it does on a GPU (found on an
// H200, 2026-11-29).
inline float atomicAdd(float* p, float v) {
  const auto flush = [](float f) { return std::fpclassify(f) == FP_SUBNORMAL ? std::copysign(0.0f, f) : f; };
  const float old = *p;
  *p = cudasim::in_shared(p) ? old + v : flush(flush(old) + flush(v));
  return old;
}
template <typename T>
T atomicMin(T* p, T v) {
  const T old = *p;
  *p = v < old ? v : old;
  return old;
}
template <typename T>
T atomicOr(T* p, T v) {
  const T old = *p;
  *p = old | v;
  return old;
}
template <typename T>
T atomicCAS(T* p, T expected, T desired) {
  const T old = *p;
  if (old == expected) *p = desired;
  return old;
}
