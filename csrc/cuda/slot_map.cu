// discloss::slot_map on CUDA (DESIGN §1, arbitrary ids): per image, the
// sorted distinct labels other than ignore_index, or the identity (-1) when
// every such label lies in [0, K). No host synchronisation; every size
// depends on shapes only (CUDA-graph capturable).
//
// Launches, in stream order:
//   outside_ids_kernel  flags the images holding a label outside [0, K)
//                       (reads labels once)
//   insert_ids_kernel   for flagged images only, inserts the distinct labels
//                       into a per-image open-addressing hash set in global
//                       memory (reads those images' labels once more)
//   at::sort            sorts each image's table row (empty entries sort last)
//   write_slot_map_kernel  writes slot_ids and num_ids
//
// The hash set: capacity a power of two >= 2K, keys int64 in global memory,
// linear probing bounded by the capacity, lock-free atomicCAS. The empty
// marker is INT64_MAX; the id INT64_MAX itself (a valid label) is recorded in
// a per-image flag instead of the table, so every int64 value is a valid id.
// Distinct ids past the capacity are dropped (no slot); the table then holds
// at least 2K ids and num_ids is capped at K anyway, so the result is only
// wrong for images that break the max_instances contract, which the Python
// wrapper rejects in eager mode. The result does not depend on the insertion
// order when an image holds at most 2K distinct ids (the table holds them all
// and is sorted).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "../discloss.h"
#include "reduce.cuh"
#include "runtime.cuh"

namespace discloss {
namespace cuda {
namespace {

constexpr int kMapThreads = 256;
constexpr int64_t kMaxId = 0x7fffffffffffffffLL;                 // INT64_MAX
constexpr unsigned long long kEmptyKey = 0x7fffffffffffffffull;  // INT64_MAX as the table's bits

// Per-image words of the map (one int64 tensor (3, B)).
enum MapWord : int { kOutside = 0, kHasMax = 1, kFilled = 2 };

__device__ __forceinline__ unsigned long long mix_bits(unsigned long long k) {  // splitmix64 finaliser
  k ^= k >> 30;
  k *= 0xbf58476d1ce4e5b9ull;
  k ^= k >> 27;
  k *= 0x94d049bb133111ebull;
  k ^= k >> 31;
  return k;
}

// Grid (x: pixel blocks, y: images, grid-stride in both). Sets
// words[kOutside * B + b] when image b holds a label other than ignore_index
// outside [0, K). Reads labels once.
template <typename label_t>
__global__ void __launch_bounds__(kMapThreads)
    outside_ids_kernel(const label_t* __restrict__ labels, int64_t B, int64_t N, int64_t K, bool has_ignore,
                       int64_t ignore_index, unsigned long long* __restrict__ words) {
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    bool outside = false;
    for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < N; p += int64_t(gridDim.x) * blockDim.x) {
      const int64_t v = static_cast<int64_t>(labels[b * N + p]);
      outside = outside || (!(v >= 0 && v < K) && !(has_ignore && v == ignore_index));
    }
    if (__syncthreads_or(outside) && threadIdx.x == 0) atomicOr(words + kOutside * B + b, 1ull);
  }
}

// Inserts key into image b's table (cap entries at table). Bounded: at most
// cap probes, and none once the table is full.
__device__ __forceinline__ void insert_id(unsigned long long key, unsigned long long* table, int64_t cap,
                                          unsigned long long* has_max, unsigned long long* filled) {
  if (key == kEmptyKey) {
    atomicOr(has_max, 1ull);
    return;
  }
  if (*reinterpret_cast<volatile unsigned long long*>(filled) >= static_cast<unsigned long long>(cap)) return;
  int64_t h = static_cast<int64_t>(mix_bits(key) & static_cast<unsigned long long>(cap - 1));
  for (int64_t probe = 0; probe < cap; ++probe) {
    const unsigned long long cur = *reinterpret_cast<volatile unsigned long long*>(table + h);
    if (cur == key) return;
    if (cur == kEmptyKey) {
      const unsigned long long prev = atomicCAS(table + h, kEmptyKey, key);
      if (prev == kEmptyKey) {
        atomicAdd(filled, 1ull);
        return;
      }
      if (prev == key) return;
    }
    h = (h + 1) & (cap - 1);
  }
}

// Grid as outside_ids_kernel. For the flagged images only, inserts every
// label other than ignore_index into the image's table (B, cap). Neighbouring
// pixels share labels: the lanes of a warp holding the same label elect one
// leader (__match_any_sync), which inserts it. Reads the flagged images'
// labels once; one atomicCAS per new id, plain loads otherwise.
template <typename label_t>
__global__ void __launch_bounds__(kMapThreads)
    insert_ids_kernel(const label_t* __restrict__ labels, int64_t B, int64_t N, bool has_ignore, int64_t ignore_index,
                      int64_t cap, unsigned long long* __restrict__ tables, unsigned long long* __restrict__ words) {
  const int lane = lane_id();
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    if (words[kOutside * B + b] == 0ull) continue;  // the identity: no table (uniform over the block)
    unsigned long long* table = tables + b * cap;
    // Warp-uniform loop: lane l takes pixel base + l.
    const int64_t warp_first = (int64_t(blockIdx.x) * blockDim.x + (threadIdx.x & ~31u));
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    for (int64_t base = warp_first; base < N; base += stride) {
      const int64_t p = base + lane;
      int64_t v = 0;
      bool take = false;
      if (p < N) {
        v = static_cast<int64_t>(labels[b * N + p]);
        take = !(has_ignore && v == ignore_index);
      }
      const unsigned active = __ballot_sync(kFullMask, take);
      if (take) {
        const unsigned long long key = static_cast<unsigned long long>(v);
        const unsigned peers = __match_any_sync(active, key);
        if (is_group_leader(peers)) insert_id(key, table, cap, words + kHasMax * B + b, words + kFilled * B + b);
      }
    }
  }
}

// One thread per (image, slot): slot_ids[b, j] = the j-th smallest distinct
// id (j < num_ids[b]) else 0; num_ids[b] = min(distinct ids, K), or -1 for an
// unflagged image. sorted is the sorted table (B, cap): its first filled
// entries are the ids other than INT64_MAX, which follows them when present.
__global__ void __launch_bounds__(kMapThreads)
    write_slot_map_kernel(const int64_t* __restrict__ sorted, const unsigned long long* __restrict__ words, int64_t B,
                          int64_t K, int64_t cap, int64_t* __restrict__ slot_ids, int64_t* __restrict__ num_ids) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < B * K; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / K, j = i - b * K;
    const bool mapped = words[kOutside * B + b] != 0ull;
    const unsigned long long f = words[kFilled * B + b];
    const int64_t filled = f < static_cast<unsigned long long>(cap) ? static_cast<int64_t>(f) : cap;
    const int64_t total = filled + (words[kHasMax * B + b] != 0ull ? 1 : 0);
    const int64_t n = total < K ? total : K;
    int64_t id = 0;
    if (mapped && j < n) id = j < filled ? sorted[b * cap + j] : kMaxId;
    slot_ids[i] = id;
    if (j == 0) num_ids[b] = mapped ? n : -1;
  }
}

std::tuple<at::Tensor, at::Tensor> slot_map_cuda(const at::Tensor& labels, int64_t max_instances,
                                                 std::optional<int64_t> ignore_index) {
  check_slot_map_inputs(labels, max_instances);
  const DeviceGuard guard(labels.device());
  LossConfig c{};
  c.num_slots = max_instances;
  c.has_ignore = ignore_index.has_value();
  c.ignore_index = ignore_index.value_or(0);
  const int64_t B = labels.size(0), K = max_instances;
  // The table (2K to 4K int64 per image) and the sort's keys and indices:
  // at most 4 x 16 bytes per slot.
  const double device_bytes = device_memory_bytes();
  check_slot_memory(c, B, 0, 16, device_bytes, "CUDA device");
  TORCH_CHECK(K <= (int64_t(1) << 30), "max_instances: the CUDA slot map supports at most 2^30 slots, got ", K);
  const auto long_opts = labels.options().dtype(at::kLong);
  at::Tensor slot_ids = at::empty({B, K}, long_opts);
  at::Tensor num_ids = at::empty({B}, long_opts);
  if (B == 0) return {slot_ids, num_ids};
  const at::Tensor lab = labels.reshape({B, -1}).contiguous();
  const int64_t N = lab.size(1);
  int64_t cap = 1;
  while (cap < 2 * K) cap <<= 1;
  cudaStream_t stream = current_stream();
  at::Tensor words = at::zeros({3, B}, long_opts);
  at::Tensor tables = at::full({B, cap}, kMaxId, long_opts);
  auto* words_p = reinterpret_cast<unsigned long long*>(words.data_ptr<int64_t>());
  auto* tables_p = reinterpret_cast<unsigned long long*>(tables.data_ptr<int64_t>());
  if (N > 0) {
    const int64_t sms = sm_count();
    const int64_t want = std::max<int64_t>(1, (sms * 8 + B - 1) / B);
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>((N + kMapThreads - 1) / kMapThreads, want)),
                    static_cast<unsigned>(std::min<int64_t>(B, 65535)));
    dispatch_label_type(lab.scalar_type(), [&](auto tag) {
      using label_t = decltype(tag);
      const label_t* lab_p = static_cast<const label_t*>(lab.data_ptr());
      DISCLOSS_LAUNCH(outside_ids_kernel<label_t>, kMapThreads, grid, kMapThreads, 0, stream)(lab_p, B, N, K, c.has_ignore, c.ignore_index,
                                                                     words_p);
      DISCLOSS_LAUNCH(insert_ids_kernel<label_t>, kMapThreads, grid, kMapThreads, 0, stream)(lab_p, B, N, c.has_ignore, c.ignore_index, cap,
                                                                    tables_p, words_p);
    });
  }
  // Sorting int64 values is deterministic whatever the algorithm (equal keys
  // are equal bits).
  const at::Tensor sorted = std::get<0>(at::sort(tables, /*dim=*/1));
  const int64_t blocks =
      std::max<int64_t>(1, std::min<int64_t>((B * K + kMapThreads - 1) / kMapThreads, int64_t(1) << 20));
  DISCLOSS_LAUNCH(write_slot_map_kernel, kMapThreads, static_cast<unsigned>(blocks), kMapThreads, 0, stream)(
      sorted.data_ptr<int64_t>(), words_p, B, K, cap, slot_ids.data_ptr<int64_t>(), num_ids.data_ptr<int64_t>());
  return {slot_ids, num_ids};
}

}  // namespace
}  // namespace cuda

DISCLOSS_REGISTER_KERNELS(m) { m.impl("slot_map", &cuda::slot_map_cuda); }

}  // namespace discloss
