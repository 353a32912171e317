// discloss::forward and discloss::backward on CPU (DESIGN §3).
//
// Each image's pixels are cut into a fixed number of chunks that depends only
// on the shapes, never on the thread count; at::parallel_for runs the
// (image, chunk) tasks, each writing its own partial per-slot sums, which are
// then added in chunk order. Results are therefore the same for any number
// of threads. The partials take at most kPartialBudget elements in all.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include <unistd.h>


#include "../discloss.h"
#include "kernel_table.h"

namespace discloss {
namespace cpu {
namespace {

constexpr int64_t kMinChunkPixels = 16384;
constexpr int64_t kPartialBudget = int64_t(1) << 24;

// Every parallel region ends in a barrier, which costs a scheduler time slice
// when the cores are shared (measured: 2 threads 3x slower than 1 on a busy
// 2-core machine with one region per image). The small per-slot steps go
// parallel only when each thread gets at least this much work (~flops).
constexpr int64_t kMinParallelWork = int64_t(1) << 17;

// Grain size for items of the given cost.
int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinParallelWork / std::max<int64_t>(1, work_per_item));
}

// The instruction sets the chunk kernels are built for (kernels_*.cpp).
enum class CpuIsa { Generic = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3 };

// The best one this processor runs, capped by the environment variable
// DISCLOSS_CPU_ISA (generic, avx2, avx512 or avx512bf16) so that tests and
// benchmarks can run the others.
CpuIsa cpu_isa() {
  const char* env = std::getenv("DISCLOSS_CPU_ISA");
  const std::string cap = env != nullptr ? env : "avx512bf16";
  TORCH_CHECK(cap == "generic" || cap == "avx2" || cap == "avx512" || cap == "avx512bf16",
              "DISCLOSS_CPU_ISA: expected generic, avx2, avx512 or avx512bf16, got '", cap, "'");
  if (cap == "generic") return CpuIsa::Generic;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return CpuIsa::Generic;
  if (cap == "avx2") return CpuIsa::Avx2;
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (!avx512) return CpuIsa::Avx2;
  if (cap == "avx512" || !__builtin_cpu_supports("avx512bf16")) return CpuIsa::Avx512;
  return CpuIsa::Avx512Bf16;
#else
  return CpuIsa::Generic;
#endif
}

ChunkKernels kernels_for_isa(CpuIsa isa, ScalarKind kind) {
  if (isa == CpuIsa::Generic) return generic::chunk_kernels(kind);
  ChunkKernels k = avx2::chunk_kernels(kind);
  if (isa >= CpuIsa::Avx512) {
    // AVX-512 for the pair step only: 512-bit vectors made it 10-25% faster
    // at C = 32768, and the pixel passes slower (bfloat16's forward 16-18 ->
    // 20-22 ms at the headline configuration; benchmarks/NOTES.md).
    const ChunkKernels wide = avx512::chunk_kernels(kind);
    k.pair_rows = wide.pair_rows;
    k.pair_grads = wide.pair_grads;
  }
  if (isa == CpuIsa::Avx512Bf16 && kind == ScalarKind::BFloat16) {
    // bfloat16's pass 3 rounds its gradient with vcvtne2ps2bf16 (the same
    // bits; pass 3 0.85x as long, benchmarks/NOTES.md).
    k.write_grad = avx512bf16::chunk_kernels(kind).write_grad;
  }
  return k;
}

const ChunkKernels& chunk_kernels_for(at::ScalarType t) {
  static const CpuIsa isa = cpu_isa();
  static const ChunkKernels tables[4] = {
      kernels_for_isa(isa, ScalarKind::Half), kernels_for_isa(isa, ScalarKind::BFloat16),
      kernels_for_isa(isa, ScalarKind::Float), kernels_for_isa(isa, ScalarKind::Double)};
  switch (t) {
    case at::kHalf: return tables[0];
    case at::kBFloat16: return tables[1];
    case at::kFloat: return tables[2];
    case at::kDouble: return tables[3];
    default: TORCH_CHECK(false, "embeddings: unsupported dtype ", t);
  }
}

LabelKind label_kind(at::ScalarType t) {
  switch (t) {
    case at::kByte: return LabelKind::UInt8;
    case at::kChar: return LabelKind::Int8;
    case at::kShort: return LabelKind::Int16;
    case at::kInt: return LabelKind::Int32;
    case at::kLong: return LabelKind::Int64;
    default: TORCH_CHECK(false, "labels: unsupported dtype ", t);
  }
}

struct ChunkPlan {
  int64_t per_image;  // chunks per image
  int64_t pixels;     // pixels per chunk (the last may have fewer)
};

// partial_elems: elements of private partials each chunk needs (0 for none).
ChunkPlan plan_chunks(const PixelLayout& L, int64_t partial_elems) {
  const int64_t N = std::max<int64_t>(L.num_pixels, 1);
  int64_t per_image = (N + kMinChunkPixels - 1) / kMinChunkPixels;
  if (partial_elems > 0) {
    const int64_t cap = kPartialBudget / std::max<int64_t>(1, L.batch * partial_elems);
    per_image = std::min(per_image, std::max<int64_t>(cap, 1));
  }
  per_image = std::max<int64_t>(per_image, 1);
  return {per_image, (N + per_image - 1) / per_image};
}

// Runs fn(args) for every (image, chunk) task in parallel, args describing
// the chunk; task t = image * per_image + chunk.
template <typename Fn>
void for_each_chunk(const PixelLayout& L, const ChunkPlan& plan, const ChunkArgs& base, Fn&& fn) {
  if (L.num_pixels == 0) return;
  at::parallel_for(0, L.batch * plan.per_image, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      ChunkArgs a = base;
      a.image = t / plan.per_image;
      a.begin = (t % plan.per_image) * plan.pixels;
      a.end = std::min(a.begin + plan.pixels, L.num_pixels);
      if (a.begin < a.end) fn(t, a);
    }
  });
}

// The gradient is as large as the embeddings and written once. Into fresh
// memory, the first touch of every page costs a fault and the kernel zeroing
// the page, more than our own write (measured on 2 cores: filling a fresh
// 128 MiB tensor 52-60 ms, an existing one 4-10 ms). In a training loop the
// same size comes back every step, so backward reuses the storage of a
// gradient it returned earlier once nothing else holds it, like CUDA's
// caching allocator: at most kCachedGradients buffers of at least
// kMinCachedBytes are kept. (Transparent huge pages were tried instead: on
// this VM a huge-page fault storm was 5x slower than 4 KiB pages.)
constexpr size_t kCachedGradients = 2;
constexpr size_t kMinCachedBytes = size_t(4) << 20;

// at::empty_like(x), from the cache when a free buffer of the right size is
// there. A cached storage is free when the cache holds its only reference.
at::Tensor empty_gradient_like(const at::Tensor& x) {
  static std::mutex mutex;
  static std::vector<at::Storage> cache;  // most recently used last
  const bool dense = x.is_non_overlapping_and_dense();
  const size_t bytes = static_cast<size_t>(x.numel()) * x.element_size();
  if (!dense || bytes < kMinCachedBytes) return at::empty_like(x);
  std::lock_guard<std::mutex> lock(mutex);
  at::Storage storage;
  for (size_t i = 0; i < cache.size(); ++i) {
    if (cache[i].nbytes() == bytes && cache[i].use_count() == 1) {
      storage = cache[i];
      cache.erase(cache.begin() + static_cast<std::ptrdiff_t>(i));
      break;
    }
  }
  if (!storage) storage = at::empty_like(x).storage();
  cache.push_back(storage);
  if (cache.size() > kCachedGradients) cache.erase(cache.begin());
  return at::empty({0}, x.options()).set_(storage, 0, x.sizes(), x.strides());
}

// A chunk's scratch for the differences of its stages (kernels.h): 16-bit
// embeddings only, none for the others.
std::unique_ptr<float[]> stage_scratch_for(const at::Tensor& x) {
  return x.element_size() == 2 ? std::make_unique_for_overwrite<float[]>(kStageScratch) : nullptr;
}

// out[b, i] = sum over chunks c (in order) of partial[b, c, i].
template <typename T>
void add_partials(const T* partial, int64_t batch, int64_t per_image, int64_t row, T* out) {
  at::parallel_for(0, batch * row, grain_for(per_image), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / row, j = i % row;
      const T* p = partial + b * per_image * row + j;
      T s = 0;
      for (int64_t c = 0; c < per_image; ++c) s += p[c * row];
      out[i] = s;
    }
  });
}

// Clusters present in each image: slots with at least one pixel (counts is
// (B, K + 1), the last column the unlabeled pixels).
std::vector<std::vector<int64_t>> present_slots(const int64_t* counts, int64_t B, int64_t K) {
  std::vector<std::vector<int64_t>> present(B);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t k = 0; k < K; ++k) {
      if (counts[b * (K + 1) + k] > 0) present[b].push_back(k);
    }
  }
  return present;
}

// Sum over rows a of row_sum(a), rows evaluated in parallel, added in order.
template <typename acc_t, typename Fn>
acc_t ordered_parallel_sum(int64_t n, int64_t work_per_row, Fn&& row_sum) {
  std::vector<acc_t> rows(n);
  at::parallel_for(0, n, grain_for(work_per_row), [&](int64_t a0, int64_t a1) {
    for (int64_t a = a0; a < a1; ++a) rows[a] = row_sum(a);
  });
  acc_t s = 0;
  for (acc_t v : rows) s += v;
  return s;
}

// The per-slot slots of image b that take part in dist and reg: the present
// clusters (paper), every slot (chainer, where empty slots have mean 0).
std::vector<int64_t> all_slots(int64_t K) {
  std::vector<int64_t> s(K);
  for (int64_t k = 0; k < K; ++k) s[k] = k;
  return s;
}

// ---- the pair step of dist under L2 (paper mode): kernels.h -------------------

// Row stride of the transposed means: at least C, 16 times an odd number,
// so that the E rows a block reads fall in different L1 sets (rows 2^k
// values apart share sets; at C = 32768, E = 16 that conflict made the
// pair step 2.5x slower than at E = 8 per component).
int64_t pair_stride(int64_t C) {
  int64_t k = (C + 15) / 16;
  if (k % 2 == 0) ++k;
  return 16 * k;
}

// One image's pair step: its present clusters (sorted by the first
// component of their means when every mean is finite, with windows: a pair
// whose first components differ by more than 2 delta_d (1 + 2^-20) has
// r >= 2 delta_d after rounding, so p = 0, and is skipped; trained means
// lie far apart and most pairs go), their means transposed, the PairArgs.
// With a non-finite mean nothing is skipped (a NaN must reach the loss).
template <typename acc_t>
struct PairPlan {
  std::vector<int64_t> order;  // present slots in row order
  std::vector<int64_t> row_of;  // slot -> row (K; -1 absent)
  std::vector<acc_t> transposed;
  std::vector<int64_t> window_lo, window_hi;
  PairArgs args;

  PairPlan(const acc_t* mu, const std::vector<int64_t>& P, int64_t K, int64_t E, double delta_d) : order(P) {
    const int64_t C = static_cast<int64_t>(P.size()), stride = pair_stride(C);
    bool finite = E > 0;
    for (int64_t k : P) {
      for (int64_t e = 0; e < E; ++e) finite &= std::isfinite(mu[k * E + e]);
    }
    if (finite) {
      std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return mu[x * E] < mu[y * E]; });
    }
    row_of.assign(K, -1);
    for (int64_t i = 0; i < C; ++i) row_of[order[i]] = i;
    transposed.resize(E * stride);
    for (int64_t i = 0; i < C; ++i) {
      for (int64_t e = 0; e < E; ++e) transposed[e * stride + i] = mu[order[i] * E + e];
    }
    if (finite) {
      const acc_t bound = acc_t(2 * delta_d * (1 + 0x1p-20));
      const acc_t* first = transposed.data();  // ascending
      window_lo.resize(C);
      window_hi.resize(C);
      for (int64_t i = 0; i < C; ++i) {
        const acc_t v = first[i];
        window_lo[i] = std::partition_point(first, first + i, [&](acc_t f) { return v - f > bound; }) - first;
        window_hi[i] = std::partition_point(first + i, first + C, [&](acc_t f) { return !(f - v > bound); }) - first;
      }
    }
    args = PairArgs{mu, order.data(), C, transposed.data(), stride, E, delta_d,
                    finite ? window_lo.data() : nullptr, finite ? window_hi.data() : nullptr};
  }
};

// fn(i0, i1) over the tiles of kPairRows rows of C, in parallel. Task q takes
// tile q / 2 from the front or the back by turns, so that every thread's
// share mixes the long rows of the triangle with the short ones.
template <typename Fn>
void for_pair_tiles(int64_t C, int64_t work_per_tile, Fn&& fn) {
  const int64_t tiles = (C + kPairRows - 1) / kPairRows;
  at::parallel_for(0, tiles, grain_for(work_per_tile), [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t tile = q % 2 == 0 ? q / 2 : tiles - 1 - q / 2;
      const int64_t i0 = tile * kPairRows;
      fn(i0, std::min(C, i0 + kPairRows));
    }
  });
}

// sum over i < j of p_ij^2 over one image's present clusters (L2): rows by
// tiles in parallel, added in row order (the same bits at any thread count).
template <typename acc_t>
acc_t pair_sum_l2(const ChunkKernels& kern, const PairArgs& pairs) {
  const int64_t C = pairs.num_present;
  std::vector<acc_t> rows(C);
  for_pair_tiles(C, kPairRows * C * pairs.embed_dim / 2,
                 [&](int64_t i0, int64_t i1) { kern.pair_rows(pairs, i0, i1, rows.data() + i0); });
  acc_t s = 0;
  for (acc_t v : rows) s += v;
  return s;
}

// The tiles (block a <= block b) of the triangle of `blocks` blocks of
// pairs, in rounds in which no block appears twice: first the diagonal
// tiles, then the circle method's rounds (for an even count m of blocks,
// one a dummy when `blocks` is odd: in round r block m - 1 meets block r,
// and r + k meets r - k mod m - 1 for k = 1 .. m/2 - 1). Checked as built:
// each round's tiles disjoint, every tile once; the tiles of a round then
// write disjoint rows of the gradient and may run side by side.
std::vector<std::vector<std::pair<int64_t, int64_t>>> pair_tile_rounds(int64_t blocks) {
  std::vector<std::vector<std::pair<int64_t, int64_t>>> rounds(1);
  for (int64_t a = 0; a < blocks; ++a) rounds[0].emplace_back(a, a);
  const int64_t m = blocks + blocks % 2;
  for (int64_t r = 0; r + 1 < m; ++r) {
    auto& round = rounds.emplace_back();
    for (int64_t k = 0; k < m / 2; ++k) {
      int64_t a = k == 0 ? m - 1 : (r + k) % (m - 1), b = k == 0 ? r : (r - k + (m - 1)) % (m - 1);
      if (a >= blocks || b >= blocks) continue;  // the dummy block
      round.emplace_back(std::min(a, b), std::max(a, b));
    }
  }
  std::vector<char> tile_seen(blocks * blocks, 0), in_round(blocks, 0);
  int64_t tiles = 0;
  for (const auto& round : rounds) {
    std::fill(in_round.begin(), in_round.end(), 0);
    for (auto [a, b] : round) {
      TORCH_CHECK(!in_round[a] && (a == b || !in_round[b]) && !tile_seen[a * blocks + b],
                  "internal error: the pair step's schedule meets block ", a, " or ", b, " twice");
      in_round[a] = in_round[b] = 1;
      tile_seen[a * blocks + b] = 1;
      ++tiles;
    }
  }
  TORCH_CHECK(tiles == blocks * (blocks + 1) / 2, "internal error: the pair step's schedule has ", tiles,
              " tiles, not ", blocks * (blocks + 1) / 2);
  return rounds;
}

// grads (C x E, rows in the plan's order) += scale * the gradient of the sum
// of p_ij^2 over the pairs of one image's present clusters (L2), each pair
// formed once (kernels.h pair_grads), tiles of kPairBlock rows and columns
// by the rounds of pair_tile_rounds: the tiles of a round in parallel, the
// rounds in turn, so every row's terms are added in an order fixed by C
// alone (the same bits at any thread count), with no buffer per thread.
template <typename acc_t>
void pair_gradients(const ChunkKernels& kern, const PairArgs& pairs, double scale, acc_t* grads) {
  const int64_t C = pairs.num_present, E = pairs.embed_dim;
  for (const auto& round : pair_tile_rounds((C + kPairBlock - 1) / kPairBlock)) {
    const int64_t n = static_cast<int64_t>(round.size());
    at::parallel_for(0, n, grain_for(kPairBlock * kPairBlock * E), [&](int64_t q0, int64_t q1) {
      std::vector<acc_t> scratch(E * kPairBlock);
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t i0 = round[q].first * kPairBlock, j0 = round[q].second * kPairBlock;
        // Rows whose window ends before the columns start meet none of them.
        if (pairs.window_hi != nullptr && pairs.window_hi[std::min(C, i0 + kPairBlock) - 1] <= j0) continue;
        kern.pair_grads(pairs, i0, std::min(C, i0 + kPairBlock), j0, std::min(C, j0 + kPairBlock), scale, grads,
                        scratch.data());
      }
    });
  }
}

// ---- finalize (forward) ------------------------------------------------------
// From means, counts and hinge sums, the weighted terms: per image in paper
// mode (then reduced), batch-level in chainer mode.
template <typename acc_t>
void finalize_forward(const LossConfig& c, const ChunkKernels& kern, int64_t B, int64_t K, int64_t E,
                      const acc_t* means,
                      const int64_t* counts, const acc_t* hinge, const acc_t* push_sums,
                      const std::vector<std::vector<int64_t>>& present, at::Tensor& var, at::Tensor& dist,
                      at::Tensor& reg, at::Tensor& push) {
  const acc_t delta_d = acc_t(c.delta_d);
  std::vector<acc_t> var_b, dist_b, reg_b, push_b;
  if (c.normalization == Normalization::Paper) {
    for (int64_t b = 0; b < B; ++b) {
      const auto& P = present[b];
      const int64_t C = static_cast<int64_t>(P.size());
      const acc_t* mu = means + b * K * E;
      acc_t v = 0, r = 0, u = 0;
      if (push_sums != nullptr) {
        const acc_t wu = unlabeled_push_weight<acc_t>(c, C, counts[b * (K + 1) + K]);
        for (int64_t k : P) u += push_sums[b * K + k];
        u *= wu;
      }
      push_b.push_back(u);
      for (int64_t k : P) {
        v += var_weight<acc_t>(c, C, counts[b * (K + 1) + k], 0) * hinge[b * K + k];
        r += mean_distance<acc_t>(mu + k * E, nullptr, E, c.norm);
      }
      r *= reg_weight<acc_t>(c, C, B);
      const acc_t w = dist_pair_weight<acc_t>(c, C, B);
      const acc_t d = c.norm == 2 ? pair_sum_l2<acc_t>(kern, PairPlan<acc_t>(mu, P, K, E, c.delta_d).args)
                                  : ordered_parallel_sum<acc_t>(C, C * E, [&](int64_t i) {
        acc_t s = 0;
        for (int64_t j = i + 1; j < C; ++j) {
          const acc_t p = push_hinge(mean_distance(mu + P[i] * E, mu + P[j] * E, E, c.norm), delta_d);
          s += p * p;
        }
        return s;
      });
      var_b.push_back(acc_t(c.alpha) * v);
      dist_b.push_back(acc_t(c.beta) * w * d);
      reg_b.push_back(acc_t(c.gamma) * r);
    }
  } else {
    // Chainer: slots k = 0..K-1 over the whole batch.
    acc_t v = 0;
    for (int64_t k = 0; k < K; ++k) {
      int64_t n = 0;
      acc_t h = 0;
      for (int64_t b = 0; b < B; ++b) {
        n += counts[b * (K + 1) + k];
        h += hinge[b * K + k];
      }
      v += var_weight<acc_t>(c, 0, 0, n) * h;
    }
    const acc_t d = ordered_parallel_sum<acc_t>(K, B * K * E, [&](int64_t k) {
      acc_t s = 0;
      for (int64_t b = 0; b < B; ++b) {
        const acc_t* mu = means + b * K * E;
        for (int64_t l = k + 1; l < K; ++l) {
          const acc_t p = push_hinge(mean_distance(mu + k * E, mu + l * E, E, c.norm), delta_d);
          s += p * p;
        }
      }
      return s;
    });
    acc_t r = 0;
    for (int64_t k = 0; k < K; ++k) {
      acc_t n = 0;
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t e = 0; e < E; ++e) n += norm_term<acc_t>(means[(b * K + k) * E + e], c.norm);
      }
      r += finish_norm(n, c.norm);
    }
    var_b.push_back(acc_t(c.alpha) * v);
    dist_b.push_back(acc_t(c.beta) * dist_pair_weight<acc_t>(c, 0, B) * d);
    reg_b.push_back(acc_t(c.gamma) * reg_weight<acc_t>(c, 0, B) * r);
    push_b.push_back(acc_t(0));
  }

  const acc_t scale = reduction_scale<acc_t>(c, B);
  auto emit = [&](const std::vector<acc_t>& terms, at::Tensor& out) {
    at::Tensor t = at::empty({static_cast<int64_t>(terms.size())}, out.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    std::copy(terms.begin(), terms.end(), t.data_ptr<acc_t>());
    if (c.reduction == Reduction::None) {
      out.copy_(t);
    } else {
      acc_t s = 0;
      for (acc_t v : terms) s += v;
      out.fill_(s * scale);
    }
  };
  emit(var_b, var);
  emit(dist_b, dist);
  emit(reg_b, reg);
  emit(push_b, push);
}

// ---- finalize (backward) -----------------------------------------------------
// Per (image, slot): var_coef = the weight of d(h_i^2)/dx_i, and
// mean_coef = dL/dmu (dist, reg and the -var_coef * V mean path) / n.
//
// With the unlabeled push, also push_coef[b] = the weight of d(q^2)/dx_i for
// the unlabeled pixels of image b, and the push's mean path -w V^push_c
// joins mean_coef.
template <typename acc_t>
void finalize_backward(const LossConfig& c, const ChunkKernels& kern, int64_t B, int64_t K, int64_t E,
                       const acc_t* grad_var,
                       const acc_t* grad_dist, const acc_t* grad_reg, const acc_t* grad_push, bool per_image_grads,
                       const acc_t* means, const int64_t* counts, const acc_t* hinge_grad, const acc_t* push_grad,
                       const std::vector<std::vector<int64_t>>& present_paper, acc_t* var_coef, acc_t* mean_coef,
                       acc_t* push_coef) {
  const acc_t delta_d = acc_t(c.delta_d);
  const acc_t scale = reduction_scale<acc_t>(c, B);
  const bool paper = c.normalization == Normalization::Paper;
  const auto present = paper ? present_paper : std::vector<std::vector<int64_t>>(1, all_slots(K));
  std::vector<int64_t> slot_total(K, 0);
  std::vector<acc_t> reg_norm(K, 0);  // chainer: R_k
  for (int64_t k = 0; k < K; ++k) {
    acc_t n = 0;
    for (int64_t b = 0; b < B; ++b) {
      slot_total[k] += counts[b * (K + 1) + k];
      for (int64_t e = 0; e < E; ++e) n += norm_term<acc_t>(means[(b * K + k) * E + e], c.norm);
    }
    reg_norm[k] = finish_norm(n, c.norm);
  }

  if (push_coef != nullptr) {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t gi = per_image_grads ? b : 0;
      const int64_t C = static_cast<int64_t>(present[b].size());
      push_coef[b] = grad_push[gi] * scale * unlabeled_push_weight<acc_t>(c, C, counts[b * (K + 1) + K]);
    }
  }

  int64_t max_present = 0;
  for (const auto& P : present) max_present = std::max<int64_t>(max_present, static_cast<int64_t>(P.size()));
  // Paper mode, L2: each image's dist gradient of its present means first
  // (pair_grads, rows by tiles in parallel), added per slot below.
  const bool pair_l2 = paper && c.norm == 2;
  std::vector<std::vector<acc_t>> pair_grad(pair_l2 ? B : 0);  // rows in its plan's order
  std::vector<std::unique_ptr<PairPlan<acc_t>>> pair_plans(pair_l2 ? B : 0);
  for (int64_t b = 0; b < static_cast<int64_t>(pair_grad.size()); ++b) {
    const auto& P = present[b];
    const int64_t C = static_cast<int64_t>(P.size());
    const int64_t gi = per_image_grads ? b : 0;
    const acc_t wd = grad_dist[gi] * acc_t(c.beta) * scale * dist_pair_weight<acc_t>(c, C, B);
    if (wd == 0) continue;
    pair_grad[b].assign(C * E, acc_t(0));
    pair_plans[b] = std::make_unique<PairPlan<acc_t>>(means + b * K * E, P, K, E, c.delta_d);
    const PairArgs& pairs = pair_plans[b]->args;
    pair_gradients<acc_t>(kern, pairs, double(wd), pair_grad[b].data());
  }
  at::parallel_for(0, B * K, grain_for((max_present + 1) * E), [&](int64_t i0, int64_t i1) {
    std::vector<acc_t> g(E);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / K, k = i % K, n = counts[b * (K + 1) + k];
      acc_t* out = mean_coef + i * E;
      if (n == 0) {
        var_coef[i] = 0;
        std::fill(out, out + E, acc_t(0));
        continue;
      }
      const int64_t gi = per_image_grads ? b : 0;
      const auto& P = present[paper ? b : 0];
      const int64_t C = static_cast<int64_t>(P.size());
      const acc_t* mu_b = means + b * K * E;
      const acc_t* mu = mu_b + k * E;

      const acc_t a = grad_var[gi] * acc_t(c.alpha) * scale * var_weight<acc_t>(c, C, n, slot_total[k]);
      for (int64_t e = 0; e < E; ++e) g[e] = -a * hinge_grad[i * E + e];
      if (push_coef != nullptr) {
        // d(q^2)/dmu_c = -d(q^2)/dx_i, summed over the unlabeled pixels in forward.
        const acc_t wu = push_coef[b];
        for (int64_t e = 0; e < E; ++e) g[e] -= wu * push_grad[i * E + e];
      }

      const acc_t wd = grad_dist[gi] * acc_t(c.beta) * scale * dist_pair_weight<acc_t>(c, C, B);
      if (wd != 0 && pair_l2) {
        const acc_t* pg = pair_grad[b].data() + pair_plans[b]->row_of[k] * E;
        for (int64_t e = 0; e < E; ++e) g[e] += pg[e];
      } else if (wd != 0) {
        for (int64_t l : P) {
          if (l != k) add_push_grad(g.data(), mu, mu_b + l * E, E, delta_d, c.norm, wd);
        }
      }

      const acc_t wr = grad_reg[gi] * acc_t(c.gamma) * scale * reg_weight<acc_t>(c, C, B);
      if (paper || c.norm == 2) {
        // paper: d||mu||/dmu; chainer L2: d R_k / d mu_kb = mu_kb / R_k.
        acc_t r = paper ? 0 : reg_norm[k];
        if (paper) r = mean_distance<acc_t>(mu, nullptr, E, c.norm);
        for (int64_t e = 0; e < E; ++e) g[e] += wr * norm_grad(mu[e], r, c.norm);
      } else {
        for (int64_t e = 0; e < E; ++e) g[e] += wr * norm_grad(mu[e], acc_t(0), 1);
      }

      var_coef[i] = a;
      for (int64_t e = 0; e < E; ++e) out[e] = g[e] / acc_t(n);
    }
  });
}

// Raises for the first label a pass reported (bad[t] of task t = image *
// per_image + chunk): outside [0, K) and not ignore_index without a slot map
// or under the identity map, or missing from its image's slot_ids row.
void check_bad_labels(const std::vector<BadLabel>& bad, int64_t per_image, const LossConfig& c,
                      const int64_t* nids) {
  for (size_t t = 0; t < bad.size(); ++t) {
    if (!bad[t].found) continue;
    const int64_t b = static_cast<int64_t>(t) / per_image, v = bad[t].value;
    const std::string ignore = c.has_ignore ? "ignore_index=" + std::to_string(c.ignore_index) : std::string();
    if (nids != nullptr && nids[b] >= 0) {
      TORCH_CHECK(false, "labels: image ", b, " holds label ", v, ", which is not among its ids slot_ids[", b,
                  ", :num_ids[", b, "]=", nids[b], "]", ignore.empty() ? "" : " nor ", ignore,
                  " (slot_ids and num_ids come from slot_map of these labels)");
    }
    TORCH_CHECK(false, "labels: image ", b, " holds label ", v, "; expected values in [0, max_instances=",
                c.num_slots, ")", ignore.empty() ? "" : " or ", ignore,
                nids == nullptr ? " (the wrapper discriminative_loss maps arbitrary ids to slots)"
                                : " (num_ids[" + std::to_string(b) + "] = -1 is the identity map)");
  }
}

// ---- the slot map ------------------------------------------------------------------

// Physical memory, for check_slot_memory (0 when unknown).
double physical_memory_bytes() {
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGE_SIZE)
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  if (pages > 0 && page > 0) return double(pages) * double(page);
#endif
  return 0;
}

// One image: -1 when every label other than ignore_index lies in [0, K)
// (the identity map), else the sorted distinct ids written to ids[0 .. n),
// n returned; more than K distinct ids returns K + 1 (an error upstream).
template <typename label_t>
int64_t image_slot_map(const label_t* lab, int64_t n, int64_t stride, const LossConfig& c, int64_t* ids) {
  const int64_t K = c.num_slots;
  const bool has_ignore = c.has_ignore;
  const int64_t ignore = c.ignore_index;
  const ChunkKernels& kern = chunk_kernels_for(at::kFloat);  // the check is the same in every table
  if (!kern.labels_outside_identity(lab, label_kind(c10::CppTypeToScalarType<label_t>::value), n, stride, c)) {
    return -1;
  }
  // Distinct ids, looked up once per run of equal labels; stops past K.
  std::unordered_set<int64_t> seen;
  seen.reserve(static_cast<size_t>(std::min<int64_t>(K, 1 << 16)) * 2);
  int64_t prev = 0;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t v = int64_t(lab[j * stride]);
    if (j > 0 && v == prev) continue;
    prev = v;
    if (has_ignore && v == ignore) continue;
    if (seen.insert(v).second && static_cast<int64_t>(seen.size()) > K) return K + 1;
  }
  std::vector<int64_t> sorted(seen.begin(), seen.end());
  std::sort(sorted.begin(), sorted.end());
  std::copy(sorted.begin(), sorted.end(), ids);
  return static_cast<int64_t>(sorted.size());
}

std::tuple<at::Tensor, at::Tensor> slot_map_cpu(const at::Tensor& labels, int64_t max_instances,
                                                std::optional<int64_t> ignore_index) {
  check_slot_map_inputs(labels, max_instances);
  LossConfig c{};
  c.num_slots = max_instances;
  c.has_ignore = ignore_index.has_value();
  c.ignore_index = ignore_index.value_or(0);
  const int64_t B = labels.size(0), K = max_instances;
  check_slot_memory(c, B, 0, static_cast<int64_t>(sizeof(int64_t)), physical_memory_bytes(), "physical");
  const at::Tensor lab = B > 0 ? labels.reshape({B, -1}) : labels.reshape({0, 0});
  const int64_t N = lab.size(1), stride = lab.stride(1);
  at::Tensor slot_ids = at::zeros({B, K}, labels.options().dtype(at::kLong));
  at::Tensor num_ids = at::empty({B}, labels.options().dtype(at::kLong));
  int64_t* ids_p = slot_ids.data_ptr<int64_t>();
  int64_t* num_p = num_ids.data_ptr<int64_t>();
  AT_DISPATCH_INTEGRAL_TYPES(lab.scalar_type(), "discloss_slot_map_cpu", [&] {
    const scalar_t* base = lab.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        num_p[b] = image_slot_map(base + b * lab.stride(0), N, stride, c, ids_p + b * K);
      }
    });
  });
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(num_p[b] <= K, "labels: image ", b, " holds more than max_instances=", K, " distinct ids",
                c.has_ignore ? " other than ignore_index=" + std::to_string(c.ignore_index) : std::string(),
                "; raise max_instances to the most clusters one image holds");
  }
  return {slot_ids, num_ids};
}

// ---- the ops -------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& embeddings, const at::Tensor& labels, const std::optional<at::Tensor>& slot_ids,
    const std::optional<at::Tensor>& num_ids, int64_t max_instances, double delta_v, double delta_d, int64_t norm,
    double alpha, double beta, double gamma, double unlabeled_push, std::optional<int64_t> ignore_index,
    c10::string_view normalization, c10::string_view reduction) {
  const LossConfig c = make_config(max_instances, delta_v, delta_d, norm, alpha, beta, gamma, unlabeled_push,
                                   ignore_index, normalization, reduction);
  check_forward_inputs(embeddings, labels, slot_ids, num_ids, c);
  check_slot_memory(c, embeddings.size(0), embeddings.size(1),
                    static_cast<int64_t>(c10::elementSize(accumulate_type(embeddings.scalar_type()))),
                    physical_memory_bytes(), "physical");
  const KernelInputs in = kernel_inputs(embeddings, labels, /*with_grad=*/false);
  const at::Tensor &x = in.x, &lab = in.labels;
  const PixelLayout& L = in.layout;
  const int64_t B = L.batch, E = L.embed_dim, K = c.num_slots;
  const bool paper = c.normalization == Normalization::Paper;
  const bool with_push = c.unlabeled_push > 0;
  const auto acc_type = accumulate_type(x.scalar_type());
  const auto acc_opts = x.options().dtype(acc_type);
  const auto shape = term_shape(c, B);
  at::Tensor var = at::empty(shape, x.options()), dist = at::empty(shape, x.options()),
             reg = at::empty(shape, x.options()), push = at::empty(shape, x.options());
  at::Tensor means = at::empty({B, K, E}, acc_opts);
  at::Tensor counts = at::empty({B, K + 1}, x.options().dtype(at::kLong));
  at::Tensor hinge_grad = at::empty({B, K, E}, acc_opts);
  at::Tensor push_grad = at::zeros({B, push_rows(c), E}, acc_opts);
  at::Tensor hinge = at::empty({B, K}, acc_opts);
  const at::Tensor ids = slot_ids.has_value() ? slot_ids->contiguous() : at::Tensor();
  const at::Tensor nids = num_ids.has_value() ? num_ids->contiguous() : at::Tensor();
  if (ids.defined()) check_slot_map_values(ids, nids, K);

  const ChunkKernels& kern = chunk_kernels_for(x.scalar_type());
  const ChunkPlan plan = plan_chunks(L, K * (E + 1) * (with_push ? 2 : 1));
  const int64_t tasks = B * plan.per_image;
  at::Tensor part = at::zeros({tasks, K, E}, acc_opts);
  at::Tensor part_pivots = at::empty({tasks, K, E}, acc_opts);
  at::Tensor part_counts = at::zeros({tasks, K + 1}, x.options().dtype(at::kLong));
  std::vector<BadLabel> bad(tasks, BadLabel{false, 0});

  ChunkArgs base{};
  base.layout = &L;
  base.config = &c;
  base.x = x.data_ptr();
  base.labels = lab.data_ptr();
  base.label_kind = label_kind(lab.scalar_type());
  const int64_t* ids_p = ids.defined() ? ids.data_ptr<int64_t>() : nullptr;
  const int64_t* nids_p = nids.defined() ? nids.data_ptr<int64_t>() : nullptr;
  auto set_map = [&](ChunkArgs& a) {
    a.slot_ids = ids_p ? ids_p + a.image * K : nullptr;
    a.num_ids = nids_p ? nids_p[a.image] : -1;
  };

  // pass 1: sums and counts
  AT_DISPATCH_FLOATING_TYPES(acc_type, "discloss_forward_cpu", [&] {
    using acc_t = scalar_t;
    acc_t* part_p = part.data_ptr<acc_t>();
    int64_t* part_counts_p = part_counts.data_ptr<int64_t>();
    acc_t* pivots_p = part_pivots.data_ptr<acc_t>();
    for_each_chunk(L, plan, base, [&](int64_t t, ChunkArgs& a) {
      set_map(a);
      a.sums = part_p + t * K * E;
      a.pivots = pivots_p + t * K * E;
      a.counts = part_counts_p + t * (K + 1);
      a.unlabeled = paper ? a.counts + K : nullptr;
      a.bad = &bad[t];
      kern.cluster_sums(a);
    });
    check_bad_labels(bad, plan.per_image, c, nids_p);
    add_partials(part_counts_p, B, plan.per_image, K + 1, counts.data_ptr<int64_t>());
    acc_t* means_p = means.data_ptr<acc_t>();
    const int64_t* counts_p = counts.data_ptr<int64_t>();
    // mean = p + (sum over chunks c, in order, of n_c (p_c - p) + S_c) / n,
    // p the pivot of the slot's first chunk: exactly p when the slot's
    // embeddings are all equal. Division, not a product with 1/n, so that
    // equal sums over equal counts give equal means.
    at::parallel_for(0, B * K, grain_for(E * plan.per_image), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / K, k = i % K;
        const int64_t n = counts_p[b * (K + 1) + k];
        acc_t* mu = means_p + i * E;
        for (int64_t e = 0; e < E; ++e) mu[e] = 0;
        if (n == 0) continue;
        const acc_t* ref = nullptr;
        for (int64_t ch = 0; ch < plan.per_image; ++ch) {
          const int64_t t = b * plan.per_image + ch;
          const int64_t nc = part_counts_p[t * (K + 1) + k];
          if (nc == 0) continue;
          const acc_t* pc = pivots_p + (t * K + k) * E;
          const acc_t* sc = part_p + (t * K + k) * E;
          if (ref == nullptr) ref = pc;
          for (int64_t e = 0; e < E; ++e) mu[e] += acc_t(nc) * (pc[e] - ref[e]) + sc[e];
        }
        for (int64_t e = 0; e < E; ++e) mu[e] = ref[e] + mu[e] / acc_t(n);
      }
    });
    const auto present = paper ? present_slots(counts_p, B, K) : std::vector<std::vector<int64_t>>(B);

    // pass 2: hinge sums and their gradient sums (reusing the partials), and
    // the unlabeled push's sums
    part.zero_();
    at::Tensor part_hinge = at::zeros({tasks, K}, acc_opts);
    at::Tensor part_push = with_push ? at::zeros({tasks, K}, acc_opts) : at::Tensor();
    at::Tensor part_push_grad = with_push ? at::zeros({tasks, K, E}, acc_opts) : at::Tensor();
    acc_t* part_hinge_p = part_hinge.data_ptr<acc_t>();
    for_each_chunk(L, plan, base, [&](int64_t t, ChunkArgs& a) {
      set_map(a);
      a.means = means_p + a.image * K * E;
      a.hinge = part_hinge_p + t * K;
      a.hinge_grad = part_p + t * K * E;
      const auto stage = stage_scratch_for(x);
      a.stage_scratch = stage.get();
      std::vector<acc_t> scratch;
      if (with_push) {
        scratch.resize(static_cast<size_t>(push_scratch_elems(E, K, false)));
        a.present = present[a.image].data();
        a.num_present = static_cast<int64_t>(present[a.image].size());
        a.push = part_push.data_ptr<acc_t>() + t * K;
        a.push_grad = part_push_grad.data_ptr<acc_t>() + t * K * E;
        a.push_scratch = scratch.data();
      }
      kern.hinge_sums(a);
    });
    add_partials(part_hinge_p, B, plan.per_image, K, hinge.data_ptr<acc_t>());
    add_partials(part_p, B, plan.per_image, K * E, hinge_grad.data_ptr<acc_t>());
    at::Tensor push_sums;
    if (with_push) {
      push_sums = at::empty({B, K}, acc_opts);
      add_partials(part_push.data_ptr<acc_t>(), B, plan.per_image, K, push_sums.data_ptr<acc_t>());
      add_partials(part_push_grad.data_ptr<acc_t>(), B, plan.per_image, K * E, push_grad.data_ptr<acc_t>());
    }

    // finalize
    finalize_forward<acc_t>(c, kern, B, K, E, means_p, counts_p, hinge.data_ptr<acc_t>(),
                            with_push ? push_sums.data_ptr<acc_t>() : nullptr, present, var, dist, reg, push);
  });
  return {var, dist, reg, push, means, counts, hinge_grad, push_grad};
}

at::Tensor backward_cpu(const at::Tensor& grad_var, const at::Tensor& grad_dist, const at::Tensor& grad_reg,
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
  KernelInputs in = kernel_inputs(embeddings, labels, /*with_grad=*/false);
  in.grad = empty_gradient_like(in.x);
  make_pixel_layout(in.x, in.labels, &in.grad, &in.layout);
  const at::Tensor &x = in.x, &lab = in.labels, &grad = in.grad;
  const PixelLayout& L = in.layout;
  const int64_t B = L.batch, E = L.embed_dim, K = c.num_slots;
  const bool paper = c.normalization == Normalization::Paper;
  const bool with_push = c.unlabeled_push > 0;
  const auto acc_type = accumulate_type(x.scalar_type());
  const auto acc_opts = x.options().dtype(acc_type);
  at::Tensor var_coef = at::empty({B, K}, acc_opts);
  at::Tensor mean_coef = at::empty({B, K, E}, acc_opts);
  at::Tensor push_coef = at::zeros({B}, acc_opts);
  at::Tensor gv = grad_var.to(acc_type).contiguous(), gd = grad_dist.to(acc_type).contiguous(),
             gr = grad_reg.to(acc_type).contiguous(), gp = grad_push.to(acc_type).contiguous();
  at::Tensor means_c = means.contiguous(), counts_c = counts.contiguous(), hg = hinge_grad_sums.contiguous(),
             pg = push_grad_sums.contiguous();
  const at::Tensor ids = slot_ids.has_value() ? slot_ids->contiguous() : at::Tensor();
  const at::Tensor nids = num_ids.has_value() ? num_ids->contiguous() : at::Tensor();
  // backward trusts its saved tensors only as far as memory safety needs
  // (schema comment in schemas.h): the slot map and the counts are
  // checked as forward would have made them; labels outside the map are
  // reported by pass 3.
  if (ids.defined()) check_slot_map_values(ids, nids, K);
  check_counts_values(counts_c, L.num_pixels);
  const int64_t* ids_p = ids.defined() ? ids.data_ptr<int64_t>() : nullptr;
  const int64_t* nids_p = nids.defined() ? nids.data_ptr<int64_t>() : nullptr;
  const auto present = paper ? present_slots(counts_c.data_ptr<int64_t>(), B, K)
                             : std::vector<std::vector<int64_t>>(B);

  const ChunkKernels& kern = chunk_kernels_for(x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(acc_type, "discloss_backward_cpu", [&] {
    using acc_t = scalar_t;
    acc_t* push_coef_p = with_push ? push_coef.data_ptr<acc_t>() : nullptr;
    finalize_backward<acc_t>(c, kern, B, K, E, gv.data_ptr<acc_t>(), gd.data_ptr<acc_t>(), gr.data_ptr<acc_t>(),
                             gp.data_ptr<acc_t>(), c.reduction == Reduction::None, means_c.data_ptr<acc_t>(),
                             counts_c.data_ptr<int64_t>(), hg.data_ptr<acc_t>(),
                             with_push ? pg.data_ptr<acc_t>() : nullptr, present, var_coef.data_ptr<acc_t>(),
                             mean_coef.data_ptr<acc_t>(), push_coef_p);
    ChunkArgs base{};
    base.layout = &L;
    base.config = &c;
    base.x = x.data_ptr();
    base.labels = lab.data_ptr();
    base.label_kind = label_kind(lab.scalar_type());
    base.grad = grad.data_ptr();
    const acc_t* means_p = means_c.data_ptr<acc_t>();
    const acc_t* var_coef_p = var_coef.data_ptr<acc_t>();
    const acc_t* mean_coef_p = mean_coef.data_ptr<acc_t>();
    const ChunkPlan plan = plan_chunks(L, 0);
    std::vector<BadLabel> bad(B * plan.per_image, BadLabel{false, 0});
    for_each_chunk(L, plan, base, [&](int64_t t, ChunkArgs& a) {
      a.bad = &bad[t];
      a.slot_ids = ids_p ? ids_p + a.image * K : nullptr;
      a.num_ids = nids_p ? nids_p[a.image] : -1;
      a.means = means_p + a.image * K * E;
      a.var_coef = var_coef_p + a.image * K;
      a.mean_coef = mean_coef_p + a.image * K * E;
      const auto stage = stage_scratch_for(x);
      a.stage_scratch = stage.get();
      std::vector<acc_t> scratch;
      if (with_push) {
        scratch.resize(static_cast<size_t>(push_scratch_elems(E, K, true)));
        a.present = present[a.image].data();
        a.num_present = static_cast<int64_t>(present[a.image].size());
        a.push_coef = push_coef_p + a.image;
        a.push_scratch = scratch.data();
      }
      kern.write_grad(a);
    });
    check_bad_labels(bad, plan.per_image, c, nids_p);
  });
  return grad;
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(discloss, CPU, m) {
  m.impl("slot_map", &cpu::slot_map_cpu);
  m.impl("forward", &cpu::forward_cpu);
  m.impl("backward", &cpu::backward_cpu);
}

}  // namespace discloss
