// The CUDA simulator's engine: fibers, the scheduler, barriers and warp
// collectives, shared memory, the launch limits and the launch log
// (cudasim.h says what it models and what it cannot).
#include <setjmp.h>
#include <ucontext.h>

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>

#include "cudasim.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define CUDASIM_ASAN 1
#else
#define CUDASIM_ASAN 0
#endif

namespace cudasim {
namespace {

// The hardware's limits (H100/H200, compute capability 9.0).
constexpr size_t kSharedLimit = 48 * 1024;  // static + dynamic, without cudaFuncSetAttribute
constexpr unsigned kMaxThreads = 1024;
constexpr unsigned kMaxGridYZ = 65535;
constexpr unsigned kMaxGridX = 0x7fffffffu;
#if CUDASIM_ASAN
constexpr size_t kStackBytes = 1 << 20;
#else
constexpr size_t kStackBytes = 256 << 10;
#endif

enum class State { Ready, Waiting, Done };

struct Fiber {
  ucontext_t ctx;  // the start (and, under AddressSanitizer, every switch)
  jmp_buf jb;      // where a started fiber resumes
  bool started = false;
  std::unique_ptr<char[]> stack;
  dim3 tid;
  int index = 0;  // linear thread index in the block
  State state = State::Ready;
  int shared_decls = 0;  // shared declarations executed
  // The rendezvous it waits at.
  Op op = Op::SyncThreads;
  unsigned mask = 0;
  uint64_t bits = 0;
  int arg = 0;
  int width = 32;
  const char* file = nullptr;
  int line = 0;
  uint64_t result = 0;
#if CUDASIM_ASAN
  void* fake_stack = nullptr;
#endif
};

struct SharedBlock {
  std::vector<std::pair<void*, size_t>> vars;  // the block's static declarations, in order
  size_t static_bytes = 0;
  void* dynamic = nullptr;
};

struct Launch {
  const LaunchInfo* info = nullptr;
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers;
  int threads = 0;
  int done = 0;                   // fibers that have exited
  int at_barrier = 0;             // fibers waiting at a barrier
  std::vector<int> warp_waiting;  // per warp: lanes waiting at a warp collective
  dim3 block;
  SharedBlock shared;
  ucontext_t scheduler;
  jmp_buf scheduler_jb;
  Fiber* current = nullptr;
  std::string error;
  std::mt19937_64 rng;
#if CUDASIM_ASAN
  const void* scheduler_stack = nullptr;
  size_t scheduler_stack_size = 0;
  void* scheduler_fake_stack = nullptr;
#endif
};

thread_local Launch* g_launch = nullptr;
thread_local dim3 g_block_idx;

std::mutex g_log_mutex;
std::map<std::string, int64_t>& log_map() {
  static std::map<std::string, int64_t> m;
  return m;
}

const char* op_name(Op op) {
  switch (op) {
    case Op::SyncThreads: return "__syncthreads";
    case Op::SyncThreadsOr: return "__syncthreads_or";
    case Op::SyncWarp: return "__syncwarp";
    case Op::Shfl: return "__shfl_sync";
    case Op::ShflUp: return "__shfl_up_sync";
    case Op::ShflDown: return "__shfl_down_sync";
    case Op::ShflXor: return "__shfl_xor_sync";
    case Op::Ballot: return "__ballot_sync";
    case Op::Any: return "__any_sync";
    case Op::All: return "__all_sync";
    case Op::MatchAny: return "__match_any_sync";
  }
  return "?";
}

bool is_barrier(Op op) { return op == Op::SyncThreads || op == Op::SyncThreadsOr; }

std::string base_name(const char* file) {
  std::string f = file ? file : "?";
  const auto slash = f.find_last_of('/');
  return slash == std::string::npos ? f : f.substr(slash + 1);
}

std::string where(const Fiber& f) {
  std::ostringstream s;
  s << op_name(f.op) << " at " << base_name(f.file) << ":" << f.line;
  if (!is_barrier(f.op)) s << " (mask 0x" << std::hex << f.mask << std::dec << ")";
  return s.str();
}

std::string launch_name(const LaunchInfo& info) {
  std::ostringstream s;
  s << info.kernel << " launched at " << base_name(info.file) << ":" << info.line << " with grid (" << info.grid.x
    << ", " << info.grid.y << ", " << info.grid.z << ") block (" << info.block.x << ", " << info.block.y << ", "
    << info.block.z << ") and " << info.dynamic_shared << " bytes of dynamic shared memory";
  return s.str();
}

// ---- switching ----------------------------------------------------------------------
// A fiber starts with setcontext (makecontext's stack) and switches with
// _setjmp/_longjmp: both from the C library, but the latter without
// swapcontext's signal-mask system call (14 ns against 670 ns a round trip
// here, which decides how long the CUDA tests take). Under AddressSanitizer,
// which cannot follow a longjmp onto another stack, every switch is a
// swapcontext with the sanitizer's fiber annotations.
void switch_to_scheduler(Launch& L, Fiber& f, bool exiting) {
#if CUDASIM_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f.fake_stack, L.scheduler_stack, L.scheduler_stack_size);
  swapcontext(&f.ctx, &L.scheduler);
  __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#else
  if (exiting || _setjmp(f.jb) == 0) _longjmp(L.scheduler_jb, 1);
#endif
}

void resume(Launch& L, Fiber& f) {
  L.current = &f;
#if CUDASIM_ASAN
  __sanitizer_start_switch_fiber(&L.scheduler_fake_stack, f.stack.get(), kStackBytes);
  swapcontext(&L.scheduler, &f.ctx);
  __sanitizer_finish_switch_fiber(L.scheduler_fake_stack, nullptr, nullptr);
#else
  if (_setjmp(L.scheduler_jb) == 0) {
    if (!f.started) {
      f.started = true;
      setcontext(&f.ctx);
    }
    _longjmp(f.jb, 1);
  }
#endif
  L.current = nullptr;
}

// Records the first error and parks the fiber for good: the scheduler stops
// the launch and throws from the host's stack.
[[noreturn]] void abort_fiber(Launch& L, Fiber& f, const std::string& what) {
  if (L.error.empty()) L.error = what;
  f.state = State::Done;
  ++L.done;
  switch_to_scheduler(L, f, /*exiting=*/true);
  std::abort();  // never resumed
}

void fiber_entry() {
  Launch& L = *g_launch;
  Fiber& f = *L.current;
#if CUDASIM_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &L.scheduler_stack, &L.scheduler_stack_size);
#endif
  try {
    (*L.body)();
  } catch (const std::exception& e) {
    abort_fiber(L, f, std::string("thread threw: ") + e.what());
  }
  f.state = State::Done;
  ++L.done;
  switch_to_scheduler(L, f, /*exiting=*/true);
  std::abort();
}

// ---- rendezvous -----------------------------------------------------------------------
// Completes the rendezvous f waits at when every partner waits at the same
// one; returns false while someone is missing.
bool try_complete(Launch& L, Fiber& f) {
  if (is_barrier(f.op)) {
    if (L.done > 0) {
      for (const Fiber& g : L.fibers) {
        if (g.state == State::Done) {
          abort_fiber(L, f, where(f) + ": thread " + std::to_string(g.index) +
                                " of the block has exited; a barrier must be reached by every thread");
        }
      }
    }
    if (L.at_barrier < L.threads) return false;
    uint64_t any = 0;
    for (Fiber& g : L.fibers) {
      if (g.op != f.op || g.line != f.line || std::strcmp(g.file, f.file) != 0) {
        abort_fiber(L, f, "divergent barrier: thread " + std::to_string(f.index) + " waits at " + where(f) +
                              ", thread " + std::to_string(g.index) + " at " + where(g));
      }
      any |= g.bits;
    }
    for (Fiber& g : L.fibers) {
      g.result = any;
      g.state = State::Ready;
    }
    L.at_barrier = 0;
    return true;
  }
  const int warp_base = f.index & ~31;
  // Cheap first: not all the lanes named can be here yet.
  if (L.warp_waiting[f.index >> 5] < __builtin_popcount(f.mask)) {
    if (L.done == 0) return false;
  }
  int lanes[32];
  int nlanes = 0;
  for (int l = 0; l < 32; ++l) {
    if (f.mask & (1u << l)) lanes[nlanes++] = warp_base + l;
  }
  if ((f.mask & (1u << (f.index & 31))) == 0u) {
    abort_fiber(L, f, where(f) + ": the calling lane " + std::to_string(f.index & 31) + " is not in the mask");
  }
  for (int k = 0; k < nlanes; ++k) {
    const int i = lanes[k];
    if (i >= L.threads) {
      abort_fiber(L, f, where(f) + ": the mask names lane " + std::to_string(i & 31) +
                            ", which does not exist in a block of " + std::to_string(L.threads) + " threads");
    }
    const Fiber& g = L.fibers[i];
    if (g.state == State::Done) {
      abort_fiber(L, f, where(f) + ": lane " + std::to_string(i & 31) + " named by the mask has exited");
    }
    if (g.state != State::Waiting || g.op != f.op || g.mask != f.mask || g.line != f.line ||
        std::strcmp(g.file, f.file) != 0) {
      return false;  // it may still come (or the deadlock check reports it)
    }
  }
  for (int k = 0; k < nlanes; ++k) {
    Fiber& g = L.fibers[lanes[k]];
    const int lane = lanes[k] & 31;
    const int width = g.width;
    if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
      abort_fiber(L, f, where(g) + ": width " + std::to_string(width) + " is not a power of 2 in [1, 32]");
    }
    const int seg = lane & ~(width - 1);
    int src = lane;
    switch (g.op) {
      case Op::Shfl: src = seg + (g.arg & (width - 1)); break;
      case Op::ShflUp: src = lane - g.arg >= seg ? lane - g.arg : lane; break;
      case Op::ShflDown: src = lane + g.arg < seg + width ? lane + g.arg : lane; break;
      case Op::ShflXor: src = lane ^ g.arg; src = (src & ~(width - 1)) == seg ? src : lane; break;
      default: break;
    }
    switch (g.op) {
      case Op::Shfl:
      case Op::ShflUp:
      case Op::ShflDown:
      case Op::ShflXor:
        if ((g.mask & (1u << src)) == 0u) {
          abort_fiber(L, f, where(g) + ": lane " + std::to_string(lane) + " reads lane " + std::to_string(src) +
                                ", which is not in the mask (undefined on a GPU)");
        }
        g.result = L.fibers[warp_base + src].bits;
        break;
      case Op::Ballot:
      case Op::Any:
      case Op::All: {
        unsigned votes = 0;
        for (int q = 0; q < nlanes; ++q) votes |= L.fibers[lanes[q]].bits ? 1u << (lanes[q] & 31) : 0u;
        g.result = g.op == Op::Ballot ? votes : g.op == Op::Any ? votes != 0u : votes == g.mask;
        break;
      }
      case Op::MatchAny: {
        unsigned peers = 0;
        for (int q = 0; q < nlanes; ++q) peers |= L.fibers[lanes[q]].bits == g.bits ? 1u << (lanes[q] & 31) : 0u;
        g.result = peers;
        break;
      }
      case Op::SyncWarp: g.result = 0; break;
      default: break;
    }
  }
  for (int k = 0; k < nlanes; ++k) L.fibers[lanes[k]].state = State::Ready;
  L.warp_waiting[f.index >> 5] -= nlanes;
  return true;
}

// ---- the scheduler ---------------------------------------------------------------------
int pick(Launch& L) {
  const int n = L.threads;
  const Order order = config().order;
  if (order == Order::Random) {
    int ready = 0;
    for (const Fiber& f : L.fibers) ready += f.state == State::Ready;
    if (ready == 0) return -1;
    int k = static_cast<int>(L.rng() % static_cast<uint64_t>(ready));
    for (int i = 0; i < n; ++i) {
      if (L.fibers[i].state == State::Ready && k-- == 0) return i;
    }
    return -1;
  }
  for (int j = 0; j < n; ++j) {
    const int i = order == Order::Forward ? j : n - 1 - j;
    if (L.fibers[i].state == State::Ready) return i;
  }
  return -1;
}

std::string deadlock_report(const Launch& L) {
  std::ostringstream s;
  s << "barrier or warp collective that can never complete:";
  int shown = 0;
  for (const Fiber& f : L.fibers) {
    if (f.state != State::Waiting) continue;
    if (shown++ == 8) {
      s << " ...";
      break;
    }
    s << " thread " << f.index << " waits at " << where(f) << ";";
  }
  int done = 0;
  for (const Fiber& f : L.fibers) done += f.state == State::Done;
  s << " " << done << " of " << L.threads << " threads have exited";
  return s.str();
}

void run_block(Launch& L) {
  L.done = 0;
  L.at_barrier = 0;
  std::fill(L.warp_waiting.begin(), L.warp_waiting.end(), 0);
  for (Fiber& f : L.fibers) {
    f.state = State::Ready;
    f.shared_decls = 0;
    f.started = false;
#if CUDASIM_ASAN
    // A stack abandoned by an aborted launch may hold poisoned frames.
    ASAN_UNPOISON_MEMORY_REGION(f.stack.get(), kStackBytes);
#endif
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  for (;;) {
    const int i = pick(L);
    if (i < 0) {
      bool all_done = true;
      for (const Fiber& f : L.fibers) all_done = all_done && f.state == State::Done;
      if (all_done) return;
      L.error = deadlock_report(L);
      return;
    }
    resume(L, L.fibers[i]);
    if (!L.error.empty()) return;
  }
}

void free_shared(SharedBlock& s) {
  for (auto& v : s.vars) std::free(v.first);
  s.vars.clear();
  s.static_bytes = 0;
  std::free(s.dynamic);
  s.dynamic = nullptr;
}

void check_launch(const LaunchInfo& info) {
  auto refuse = [&](const std::string& why) {
    TORCH_CHECK(false, "CUDA simulator: a GPU would refuse the launch of ", launch_name(info), ": ", why);
  };
  const uint64_t threads = uint64_t(info.block.x) * info.block.y * info.block.z;
  if (threads == 0 || info.grid.x == 0 || info.grid.y == 0 || info.grid.z == 0) refuse("an empty grid or block");
  if (threads > kMaxThreads) refuse(std::to_string(threads) + " threads per block (at most 1024)");
  if (threads > uint64_t(info.bounds)) {
    refuse(std::to_string(threads) + " threads per block, above the kernel's __launch_bounds__(" +
           std::to_string(info.bounds) + ")");
  }
  if (info.grid.x > kMaxGridX || info.grid.y > kMaxGridYZ || info.grid.z > kMaxGridYZ) {
    refuse("grid y and z are at most 65535");
  }
  if (info.dynamic_shared > kSharedLimit) refuse("more than 48 KiB of dynamic shared memory");
}

}  // namespace

Config& config() {
  static Config c;
  return c;
}

namespace {
std::atomic<int64_t> g_skipped[3];
}  // namespace

void count_skipped(Skipped what, int64_t n) { g_skipped[static_cast<int>(what)] += n; }
int64_t skipped(Skipped what) { return g_skipped[static_cast<int>(what)].load(); }
void reset_skipped() {
  for (auto& s : g_skipped) s = 0;
}

std::vector<std::pair<std::string, int64_t>> launch_log() {
  std::lock_guard<std::mutex> lock(g_log_mutex);
  return {log_map().begin(), log_map().end()};
}

void reset_launch_log() {
  std::lock_guard<std::mutex> lock(g_log_mutex);
  log_map().clear();
}

void fail(const std::string& what) {
  Launch* L = g_launch;
  if (L == nullptr || L->current == nullptr) TORCH_CHECK(false, "CUDA simulator: ", what);
  abort_fiber(*L, *L->current, what);
}

const dim3& thread_idx() { return g_launch->current->tid; }
const dim3& block_idx() { return g_block_idx; }
const dim3& block_dim() { return g_launch->info->block; }
const dim3& grid_dim() { return g_launch->info->grid; }

void* shared_alloc(size_t bytes, size_t align, const char* name) {
  Launch& L = *g_launch;
  Fiber& f = *L.current;
  const size_t n = static_cast<size_t>(f.shared_decls++);
  SharedBlock& s = L.shared;
  if (n < s.vars.size()) {
    if (s.vars[n].second != bytes) {
      fail(std::string("shared declaration '") + name + "' of " + std::to_string(bytes) +
           " bytes reached in another order by the threads of one block");
    }
    return s.vars[n].first;
  }
  s.static_bytes = (s.static_bytes + align - 1) / align * align + bytes;
  if (s.static_bytes + L.info->dynamic_shared > kSharedLimit) {
    fail("a GPU would refuse the launch: " + std::to_string(s.static_bytes) + " bytes of static shared memory (up to '" +
         name + "') + " + std::to_string(L.info->dynamic_shared) + " bytes of dynamic shared memory exceed 48 KiB");
  }
  // Exactly the declared size (AddressSanitizer sees an overflow), filled
  // with 0xff bytes: a read before the first write gives NaN or -1.
  const size_t alloc = std::max<size_t>(align, sizeof(void*));
  void* p = nullptr;
  if (posix_memalign(&p, alloc, bytes == 0 ? 1 : bytes) != 0) fail("out of memory");
  std::memset(p, 0xff, bytes);
  s.vars.emplace_back(p, bytes);
  return p;
}

void* dynamic_shared(size_t align) {
  Launch& L = *g_launch;
  if (reinterpret_cast<uintptr_t>(L.shared.dynamic) % align != 0) fail("dynamic shared memory misaligned");
  return L.shared.dynamic;
}

bool in_shared(const void* p) {
  if (g_launch == nullptr) return false;
  const Launch& L = *g_launch;
  const auto inside = [p](const void* begin, size_t bytes) {
    const auto a = reinterpret_cast<uintptr_t>(p), b = reinterpret_cast<uintptr_t>(begin);
    return a >= b && a < b + bytes;
  };
  for (const auto& v : L.shared.vars) {
    if (inside(v.first, v.second)) return true;
  }
  return L.shared.dynamic != nullptr && inside(L.shared.dynamic, L.info->dynamic_shared);
}

uint64_t rendezvous(Op op, unsigned mask, uint64_t bits, int arg, int width, const char* file, int line) {
  Launch& L = *g_launch;
  Fiber& f = *L.current;
  f.op = op;
  f.mask = mask;
  f.bits = bits;
  f.arg = arg;
  f.width = width;
  f.file = file;
  f.line = line;
  f.state = State::Waiting;
  if (is_barrier(op)) {
    ++L.at_barrier;
  } else {
    ++L.warp_waiting[f.index >> 5];
  }
  try_complete(L, f);
  // Back to the scheduler even when complete: the configured order decides
  // who runs next, so a missing barrier shows as an order-dependent result.
  switch_to_scheduler(L, f, /*exiting=*/false);
  return f.result;
}

void run_kernel(const LaunchInfo& info, const std::function<void()>& body) {
  TORCH_CHECK(g_launch == nullptr, "CUDA simulator: a kernel launched from inside a kernel");
  check_launch(info);
  {
    std::lock_guard<std::mutex> lock(g_log_mutex);
    ++log_map()[std::string(info.kernel) + "@" + base_name(info.file) + ":" + std::to_string(info.line)];
  }
  Launch L;
  L.info = &info;
  L.body = &body;
  L.block = info.block;
  L.threads = static_cast<int>(info.block.x * info.block.y * info.block.z);
  static thread_local uint64_t launches = 0;
  L.rng.seed(config().seed * 0x9e3779b97f4a7c15ull + (++launches));
  L.fibers.resize(L.threads);
  L.warp_waiting.assign((L.threads + 31) / 32, 0);
  for (int i = 0; i < L.threads; ++i) {
    Fiber& f = L.fibers[i];
    f.index = i;
    f.tid = dim3(i % info.block.x, (i / info.block.x) % info.block.y, i / (info.block.x * info.block.y));
    f.stack.reset(new char[kStackBytes]);
  }
  // Blocks in the configured order.
  const uint64_t gx = info.grid.x, gy = info.grid.y, gz = info.grid.z, blocks = gx * gy * gz;
  std::vector<uint64_t> order;
  if (config().order == Order::Random) {
    order.resize(blocks);
    for (uint64_t i = 0; i < blocks; ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), L.rng);
  }
  g_launch = &L;
  for (uint64_t j = 0; j < blocks && L.error.empty(); ++j) {
    const uint64_t i = config().order == Order::Random ? order[j] : config().order == Order::Reverse ? blocks - 1 - j : j;
    g_block_idx = dim3(static_cast<unsigned>(i % gx), static_cast<unsigned>((i / gx) % gy),
                               static_cast<unsigned>(i / (gx * gy)));
    if (info.dynamic_shared > 0) {
      if (posix_memalign(&L.shared.dynamic, 16, info.dynamic_shared) != 0) L.error = "out of memory";
      std::memset(L.shared.dynamic, 0xff, info.dynamic_shared);
    }
    if (L.error.empty()) run_block(L);
    free_shared(L.shared);
  }
  g_launch = nullptr;
  TORCH_CHECK(L.error.empty(), "CUDA simulator: ", launch_name(info), ": ", L.error);
}

}  // namespace cudasim
