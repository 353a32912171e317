// Kernels that check the CUDA simulator itself (tests/test_cudasim.py): that
// each intrinsic gives what a GPU gives, and that each check it claims fails
// where it should (a divergent barrier or collective, an exited lane, the
// launch limits, a misaligned vector load, a missing barrier as an
// order-dependent result), and the flush of subnormals by float atomics in
// global memory. Registered as discloss_cudasim::selftest.
#include "cudasim.h"
// (cudasim.h first: it defines the CUDA language for what follows)
#include "../../csrc/cuda/runtime.cuh"
#include "../../csrc/cuda/reduce.cuh"

namespace discloss {
namespace cuda {
namespace {

constexpr int kThreads = 64;

// out[lane * 8 + k]: the k-th collective's result in lane `lane` of warp 0;
// the inputs are lane-dependent so that every result is distinct.
__global__ void __launch_bounds__(kThreads) collectives_kernel(int64_t* out) {
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const unsigned full = 0xffffffffu;
  int64_t r[8];
  r[0] = __shfl_down_sync(full, lane * 10, 3);
  r[1] = __shfl_up_sync(full, lane * 10, 5);
  r[2] = __shfl_xor_sync(full, lane * 10, 6);
  r[3] = __shfl_sync(full, lane * 10, 7);
  r[4] = __ballot_sync(full, lane % 3 == 0);
  r[5] = __match_any_sync(full, static_cast<unsigned long long>(lane / 4));
  r[6] = __any_sync(full, lane == 17) + 2 * __all_sync(full, lane < 31);
  // A partial mask: the even lanes only.
  r[7] = -1;
  if (lane % 2 == 0) r[7] = __match_any_sync(0x55555555u, lane % 8);
  if (threadIdx.x < 32) {
    for (int k = 0; k < 8; ++k) out[lane * 8 + k] = r[k];
  }
}

__global__ void __launch_bounds__(kThreads) divergent_barrier_kernel(int64_t*) {
  if (threadIdx.x < 32) __syncthreads();
}

__global__ void __launch_bounds__(kThreads) divergent_shuffle_kernel(int64_t* out) {
  if ((threadIdx.x & 31u) < 16) out[threadIdx.x] = __shfl_sync(0xffffffffu, 1, 0);
}

__global__ void __launch_bounds__(kThreads) exited_lane_kernel(int64_t* out) {
  if ((threadIdx.x & 31u) == 31) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1, 1);
}

__global__ void __launch_bounds__(kThreads) big_shared_kernel(int64_t* out) {
  DISCLOSS_SHARED_ARRAY(int64_t, big, 5 * 1024);  // 40 KiB, + 16 KiB dynamic
  DISCLOSS_DYNAMIC_SHARED(int64_t, dyn, 16);
  big[threadIdx.x] = dyn[0];
  out[0] = big[0];
}

__global__ void __launch_bounds__(kThreads) misaligned_kernel(int64_t* out) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(reinterpret_cast<const char*>(out) + 4));
  out[0] = v.x;
}

// A block sum through shared memory; without the barrier between the writes
// and thread 0's reads, what thread 0 sees depends on the schedule.
template <bool kBarrier>
__global__ void __launch_bounds__(kThreads) block_sum_kernel(int64_t* out) {
  DISCLOSS_SHARED_ARRAY(int64_t, vals, kThreads);
  vals[threadIdx.x] = threadIdx.x + 1;
  if (kBarrier) __syncthreads();
  if (threadIdx.x == 0) {
    int64_t s = 0;
    for (int i = 0; i < kThreads; ++i) s += vals[i];
    out[blockIdx.x] = s;
  }
}

// Float atomics and subnormal numbers: two adds of 1e-40 into global memory
// (a GPU flushes them: 0), into shared memory (kept: 2e-40) and into global
// memory through discloss's atomic_add_keep_subnormals (kept: 2e-40). out[k]:
// the bits of each result.
__global__ void __launch_bounds__(kThreads) float_atomics_kernel(int64_t* out) {
  DISCLOSS_SHARED(float, sh);
  float* global_plain = reinterpret_cast<float*>(out + 8);
  float* global_kept = reinterpret_cast<float*>(out + 9);
  if (threadIdx.x == 0) {
    sh = 0.0f;
    *global_plain = 0.0f;
    *global_kept = 0.0f;
  }
  __syncthreads();
  if (threadIdx.x < 2) {
    atomicAdd(global_plain, 1e-40f);
    atomicAdd(&sh, 1e-40f);
    atomic_add_keep_subnormals(global_kept, 1e-40f);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    out[0] = __float_as_uint(*global_plain);
    out[1] = __float_as_uint(sh);
    out[2] = __float_as_uint(*global_kept);
  }
}

at::Tensor selftest(c10::string_view name) {
  at::Tensor out = at::zeros({kThreads * 8}, at::kLong);
  int64_t* p = out.data_ptr<int64_t>();
  cudaStream_t s = current_stream();
  if (name == "collectives") {
    DISCLOSS_LAUNCH(collectives_kernel, kThreads, 1, kThreads, 0, s)(p);
  } else if (name == "divergent_barrier") {
    DISCLOSS_LAUNCH(divergent_barrier_kernel, kThreads, 1, kThreads, 0, s)(p);
  } else if (name == "divergent_shuffle") {
    DISCLOSS_LAUNCH(divergent_shuffle_kernel, kThreads, 1, kThreads, 0, s)(p);
  } else if (name == "exited_lane") {
    DISCLOSS_LAUNCH(exited_lane_kernel, kThreads, 1, kThreads, 0, s)(p);
  } else if (name == "shared_over_48k") {
    DISCLOSS_LAUNCH(big_shared_kernel, kThreads, 1, kThreads, 16 * 1024, s)(p);
  } else if (name == "block_over_bounds") {
    DISCLOSS_LAUNCH(collectives_kernel, kThreads, 1, 2 * kThreads, 0, s)(p);
  } else if (name == "grid_y_over_65535") {
    DISCLOSS_LAUNCH(collectives_kernel, kThreads, dim3(1, 70000), kThreads, 0, s)(p);
  } else if (name == "misaligned_vector_load") {
    DISCLOSS_LAUNCH(misaligned_kernel, kThreads, 1, kThreads, 0, s)(p);
  } else if (name == "float_atomics") {
    DISCLOSS_LAUNCH(float_atomics_kernel, kThreads, 1, kThreads, 0, s)(p);
  } else if (name == "block_sum") {
    DISCLOSS_LAUNCH(block_sum_kernel<true>, kThreads, 4, kThreads, 0, s)(p);
  } else if (name == "block_sum_missing_barrier") {
    DISCLOSS_LAUNCH(block_sum_kernel<false>, kThreads, 4, kThreads, 0, s)(p);
  } else {
    TORCH_CHECK(false, "selftest: unknown case '", name, "'");
  }
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace discloss

TORCH_LIBRARY_FRAGMENT(discloss_cudasim, m) { m.def("selftest(str name) -> Tensor", &discloss::cuda::selftest); }
