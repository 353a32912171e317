// The one seam between the CUDA launchers and the CUDA runtime (DESIGN §6).
// Every launch, device property, stream, device guard, shared-memory
// declaration and op registration of csrc/cuda goes through here, so that the
// same sources also compile as plain C++ for the CUDA simulator
// (tests/cudasim, test-only): there DISCLOSS_CUDA_SIM is defined by
// tests/cudasim/cudasim.h, included first, and each of these is the
// simulator's CPU version. In the CUDA build they are thin wrappers.
//
//   DISCLOSS_LAUNCH(kernel, bounds, grid, block, smem, stream)(args...)
//       kernel<<<grid, block, smem, stream>>>(args...) and the launch check;
//       bounds is the kernel's __launch_bounds__ (the simulator refuses a
//       block larger than it, as the GPU does).
//   DISCLOSS_SHARED(type, name)             __shared__ type name;
//   DISCLOSS_SHARED_ARRAY(type, name, n)    __shared__ type name[n];
//   DISCLOSS_DYNAMIC_SHARED(type, name, a)  extern __shared__ __align__(a) type name[];
//   DISCLOSS_NOINLINE                       __noinline__
//   DISCLOSS_REGISTER_KERNELS(m) { ... }    TORCH_LIBRARY_IMPL(discloss, CUDA, m)
//   sm_count(), device_memory_bytes(), current_stream(), DeviceGuard
//   pruning_enabled()                       true: the kernels skip work whose
//       terms are all 0 (math.h, bounds); the simulator can switch it off so
//       that the tests compare both results bitwise
//   DISCLOSS_COUNT_SKIPPED(what, n)         nothing; on the simulator, adds n
//       to its counter `what` (PushTiles, Pairs), so that the tests see the
//       skipping happen
#pragma once

#ifndef DISCLOSS_CUDA_SIM
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstddef>
#include <utility>

namespace discloss {
namespace cuda {

// Where a launch is written, for the simulator's errors and launch log.
struct LaunchSite {
  const char* text;  // the launch's arguments as written; the kernel's name comes first
  const char* file;
  int line;
};

#ifndef DISCLOSS_CUDA_SIM

inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
inline double device_memory_bytes() {
  return static_cast<double>(at::cuda::getCurrentDeviceProperties()->totalGlobalMem);
}
inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }
using DeviceGuard = c10::cuda::CUDAGuard;
inline bool pruning_enabled() { return true; }
#define DISCLOSS_COUNT_SKIPPED(what, n) ((void)0)

template <typename... Params>
struct Launch {
  void (*kernel)(Params...);
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  template <typename... Args>
  void operator()(Args&&... args) const {
    kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

template <typename... Params>
Launch<Params...> launch_at(LaunchSite, void (*kernel)(Params...), int /*bounds*/, dim3 grid, dim3 block,
                            size_t smem, cudaStream_t stream) {
  return {kernel, grid, block, smem, stream};
}

#define DISCLOSS_SHARED(type, name) __shared__ type name
#define DISCLOSS_SHARED_ARRAY(type, name, n) __shared__ type name[n]
#define DISCLOSS_DYNAMIC_SHARED(type, name, align) extern __shared__ __align__(align) type name[]
#define DISCLOSS_NOINLINE __noinline__
#define DISCLOSS_REGISTER_KERNELS(m) TORCH_LIBRARY_IMPL(discloss, CUDA, m)

#else  // the CUDA simulator

inline int sm_count() { return ::cudasim::config().sm_count; }
inline double device_memory_bytes() { return ::cudasim::config().total_memory; }
inline cudaStream_t current_stream() { return nullptr; }
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
inline bool pruning_enabled() { return ::cudasim::config().prune; }
#define DISCLOSS_COUNT_SKIPPED(what, n) ::cudasim::count_skipped(::cudasim::Skipped::what, (n))

template <typename... Params>
struct Launch {
  void (*kernel)(Params...);
  ::cudasim::LaunchInfo info;
  std::string name;
  template <typename... Args>
  void operator()(Args&&... args) {
    // Copied once, like the kernel's parameter buffer; each thread gets its
    // own copies of the parameters.
    const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
    info.kernel = name.c_str();
    ::cudasim::run_kernel(info, [&] { std::apply(kernel, params); });
  }
};

inline std::string kernel_name(const char* text) {
  std::string s(text);
  const auto end = s.find_first_of("<,( ");
  return end == std::string::npos ? s : s.substr(0, end);
}

template <typename... Params>
Launch<Params...> launch_at(LaunchSite site, void (*kernel)(Params...), int bounds, dim3 grid, dim3 block,
                            size_t smem, cudaStream_t) {
  return {kernel, {nullptr, site.file, site.line, bounds, grid, block, smem}, kernel_name(site.text)};
}

#define DISCLOSS_SHARED(type, name) type& name = ::cudasim::shared_var<type>(#name)
#define DISCLOSS_SHARED_ARRAY(type, name, n) type(&name)[n] = ::cudasim::shared_var<type[n]>(#name)
#define DISCLOSS_DYNAMIC_SHARED(type, name, align) type* name = static_cast<type*>(::cudasim::dynamic_shared(align))
#define DISCLOSS_NOINLINE __attribute__((noinline))
#define DISCLOSS_REGISTER_KERNELS(m) TORCH_LIBRARY_IMPL(discloss_cudasim, CPU, m)

#endif

#define DISCLOSS_LAUNCH(...) \
  ::discloss::cuda::launch_at(::discloss::cuda::LaunchSite{#__VA_ARGS__, __FILE__, __LINE__}, __VA_ARGS__)

}  // namespace cuda
}  // namespace discloss
