// The CUDA op's small steps after the streaming passes: the compaction of
// the clusters present (paper normalisation) and the finalize (forward).
//
// The finalize (forward) is one launch for the whole batch: blocks cover
// slices of the pairs of clusters present (paper: per image; chainer: every
// slot pair of every image) plus the var and reg sums, write per-block
// partials, and the last block to finish (atomic ticket) adds the partials in
// a fixed order, applies the normalisation, weights and reduction, and writes
// the three terms. Deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "passes.h"

namespace discloss {
namespace cuda {
namespace {

// ---- compaction of the clusters present (paper normalisation) ------------------------
// One block per image: present[b, 0 .. C_b) = the slots k < K with
// counts[b, k] > 0 in increasing order, num_present[b] = C_b. counts is
// (B, K + 1) (the last column: unlabeled pixels). Reads counts once.
__global__ void __launch_bounds__(kCompactThreads)
    compact_present_kernel(const int64_t* __restrict__ counts, int64_t B, int64_t K, int* __restrict__ present,
                           int* __restrict__ num_present) {
  DISCLOSS_SHARED_ARRAY(int, scratch, 33);
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    int offset = 0;
    for (int64_t base = 0; base < K; base += blockDim.x) {
      const int64_t k = base + threadIdx.x;
      const int flag = (k < K && counts[b * (K + 1) + k] > 0) ? 1 : 0;
      int total = 0;
      const int pos = block_exclusive_scan(flag, scratch, &total);
      if (flag) present[b * K + offset + pos] = static_cast<int>(k);
      offset += total;
    }
    if (threadIdx.x == 0) num_present[b] = offset;
  }
}

// ---- the pairs' early exit (paper normalisation) -------------------------------------
// One block per image (grid-stride): far[b] = math.h pair_far_bound when
// every component of every present mean of image b is finite, else NaN.
// The pair loops of the finalize and of the backward coefficients stop a
// pair's distance once its partial sum reaches far[b] (mean_distance_or_far):
// with a non-finite mean somewhere, a NaN in a component not read would be
// lost, so nothing stops early. Reads the present means once; writes far.
template <typename acc_t>
__global__ void __launch_bounds__(kCompactThreads)
    pair_far_kernel(const acc_t* __restrict__ means, const int* __restrict__ present,
                    const int* __restrict__ num_present, int64_t B, int64_t K, int64_t E, acc_t bound,
                    acc_t* __restrict__ far) {
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const int64_t C = num_present[b];
    bool finite = true;
    for (int64_t idx = threadIdx.x; idx < C * E; idx += blockDim.x) {
      const int64_t i = idx / E, e = idx - i * E;
      const acc_t v = means[(b * K + present[b * K + i]) * E + e];
      finite = finite && v - v == acc_t(0);
    }
    const bool any_non_finite = __syncthreads_or(!finite);
    if (threadIdx.x == 0) far[b] = any_non_finite ? acc_t(NAN) : bound;
  }
}

// ---- finalize (forward) ------------------------------------------------------------
// Block (b, t) of B * tiles (paper), block t of tiles (chainer). Each block
// sums its share of: var (weighted hinge sums of the clusters present; chainer:
// slot totals over the batch), reg (norms of means) and dist (push hinge over
// pairs: paper, pairs (i, j > i) of image b's present clusters, rows i = t,
// t + tiles, ...; chainer, all slot pairs of all images) and, with the
// unlabeled push (push_sums not null), the push sums of the clusters present.
// It writes 4 partials; the last block adds them in block order, applies the
// weights and the reduction and writes var, dist, reg, push. Paper, with
// far (pair_far_kernel) not null: a pair's distance stops at the component
// where its partial sum reaches far[b], a pair whose hinge is 0 either way,
// so d gets the same bits (the pairs that go would add +0); for means
// spread more than 2 delta_d apart most pairs read one or two components
// instead of E. A data-dependent trip count per thread, no barrier inside:
// deterministic. Reads means, counts (B, K + 1), hinge and push sums and
// far through the cache (means up to O(C^2 E) times over the pairs, from
// L1/L2).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_forward_kernel(const LossConfig c, int64_t B, int64_t E, int64_t tiles, const acc_t* __restrict__ means,
                            const int64_t* __restrict__ counts, const acc_t* __restrict__ hinge,
                            const acc_t* __restrict__ push_sums, const int* __restrict__ present,
                            const int* __restrict__ num_present, const acc_t* __restrict__ far,
                            acc_t* __restrict__ partials,
                            unsigned* __restrict__ tickets, scalar_t* __restrict__ var_out,
                            scalar_t* __restrict__ dist_out, scalar_t* __restrict__ reg_out,
                            scalar_t* __restrict__ push_out) {
  DISCLOSS_SHARED_ARRAY(acc_t, scratch, 32);
  DISCLOSS_SHARED(bool, is_last);
  const int64_t K = c.num_slots;
  const bool paper = c.normalization == Normalization::Paper;
  const int norm = c.norm;
  const acc_t delta_d = acc_t(c.delta_d);
  const int64_t t = blockIdx.x % tiles;
  const int64_t stride = tiles * blockDim.x;
  acc_t v = acc_t(0), d = acc_t(0), r = acc_t(0), u = acc_t(0);
  if (paper) {
    const int64_t b = blockIdx.x / tiles;
    const int64_t C = num_present[b];
    const int* P = present + b * K;
    const acc_t* mu = means + b * K * E;
    for (int64_t i = t * blockDim.x + threadIdx.x; i < C; i += stride) {
      const int64_t k = P[i];
      v += var_weight<acc_t>(c, C, counts[b * (K + 1) + k], 0) * hinge[b * K + k];
      if (push_sums != nullptr) u += push_sums[b * K + k];
      r += mean_distance<acc_t>(mu + k * E, nullptr, E, norm);  // ||mu_k||, range-safe
    }
    const acc_t far_b = far != nullptr ? far[b] : acc_t(NAN);
    for (int64_t i = t; i < C; i += tiles) {
      const acc_t* mi = mu + int64_t(P[i]) * E;
      for (int64_t j = i + 1 + threadIdx.x; j < C; j += blockDim.x) {
        const acc_t r = mean_distance_or_far(mi, mu + int64_t(P[j]) * E, E, norm, far_b);
        if (r == acc_t(INFINITY) && far_b == far_b) DISCLOSS_COUNT_SKIPPED(Pairs, 1);
        const acc_t p = push_hinge(r, delta_d);
        d += p * p;
      }
    }
  } else {
    for (int64_t k = t * blockDim.x + threadIdx.x; k < K; k += stride) {
      int64_t n = 0;
      acc_t h = acc_t(0), s = acc_t(0);
      for (int64_t b = 0; b < B; ++b) {
        n += counts[b * (K + 1) + k];
        h += hinge[b * K + k];
        for (int64_t e = 0; e < E; ++e) s += norm_term<acc_t>(means[(b * K + k) * E + e], norm);
      }
      v += var_weight<acc_t>(c, 0, 0, n) * h;
      r += finish_norm(s, norm);
    }
    for (int64_t i = t; i < B * K; i += tiles) {
      const int64_t b = i / K, k = i - b * K;
      const acc_t* mu = means + b * K * E;
      for (int64_t l = k + 1 + threadIdx.x; l < K; l += blockDim.x) {
        const acc_t p = push_hinge(mean_distance(mu + k * E, mu + l * E, E, norm), delta_d);
        d += p * p;
      }
    }
  }
  v = block_sum(v, scratch);
  d = block_sum(d, scratch);
  r = block_sum(r, scratch);
  u = block_sum(u, scratch);
  if (threadIdx.x == 0) {
    acc_t* out = partials + int64_t(blockIdx.x) * 4;
    out[0] = v;
    out[1] = d;
    out[2] = r;
    out[3] = u;
    __threadfence();  // the partials are visible before the ticket is taken
    is_last = atomicAdd(tickets, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();

  const acc_t alpha = acc_t(c.alpha), beta = acc_t(c.beta), gamma = acc_t(c.gamma);
  if (paper) {
    const bool per_image = c.reduction == Reduction::None;
    acc_t sv = acc_t(0), sd = acc_t(0), sr = acc_t(0), su = acc_t(0);
    for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
      acc_t pv = acc_t(0), pd = acc_t(0), pr = acc_t(0), pu = acc_t(0);
      for (int64_t w = 0; w < tiles; ++w) {
        const acc_t* q = partials + (b * tiles + w) * 4;
        pv += __ldcg(q);
        pd += __ldcg(q + 1);
        pr += __ldcg(q + 2);
        pu += __ldcg(q + 3);
      }
      const int64_t C = num_present[b];
      const acc_t tv = alpha * pv;
      const acc_t td = beta * dist_pair_weight<acc_t>(c, C, B) * pd;
      const acc_t tr = gamma * (reg_weight<acc_t>(c, C, B) * pr);
      // The push's weight w / (C N_U) holds unlabeled_push itself (CPU: the same).
      const acc_t tu = push_sums != nullptr ? pu * unlabeled_push_weight<acc_t>(c, C, counts[b * (K + 1) + K])
                                            : acc_t(0);
      if (per_image) {
        var_out[b] = static_cast<scalar_t>(tv);
        dist_out[b] = static_cast<scalar_t>(td);
        reg_out[b] = static_cast<scalar_t>(tr);
        push_out[b] = static_cast<scalar_t>(tu);
      } else {
        sv += tv;
        sd += td;
        sr += tr;
        su += tu;
      }
    }
    if (!per_image) {
      sv = block_sum(sv, scratch);
      sd = block_sum(sd, scratch);
      sr = block_sum(sr, scratch);
      su = block_sum(su, scratch);
      if (threadIdx.x == 0) {
        const acc_t scale = reduction_scale<acc_t>(c, B);
        var_out[0] = static_cast<scalar_t>(sv * scale);
        dist_out[0] = static_cast<scalar_t>(sd * scale);
        reg_out[0] = static_cast<scalar_t>(sr * scale);
        push_out[0] = static_cast<scalar_t>(su * scale);
      }
    }
  } else if (threadIdx.x == 0) {
    acc_t pv = acc_t(0), pd = acc_t(0), pr = acc_t(0);
    for (int64_t w = 0; w < tiles; ++w) {
      pv += __ldcg(partials + w * 4);
      pd += __ldcg(partials + w * 4 + 1);
      pr += __ldcg(partials + w * 4 + 2);
    }
    var_out[0] = static_cast<scalar_t>(alpha * pv);
    dist_out[0] = static_cast<scalar_t>(beta * dist_pair_weight<acc_t>(c, 0, B) * pd);
    reg_out[0] = static_cast<scalar_t>(gamma * reg_weight<acc_t>(c, 0, B) * pr);
    push_out[0] = static_cast<scalar_t>(acc_t(0));
  }
}
}  // namespace

// far (B,) for the pair loops (paper, pruning on and B > 0), else undefined.
at::Tensor pair_far_bounds(const LossConfig& c, int64_t B, int64_t E, const at::Tensor& means,
                           const std::pair<at::Tensor, at::Tensor>& present, cudaStream_t stream) {
  if (c.normalization != Normalization::Paper || B == 0 || !pruning_enabled()) return at::Tensor();
  at::Tensor far = at::empty({B}, means.options());
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(B, 65535));
  AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "discloss_pair_far_cuda", [&] {
    DISCLOSS_LAUNCH(pair_far_kernel<scalar_t>, kCompactThreads, grid, kCompactThreads, 0, stream)(
        means.data_ptr<scalar_t>(), present.first.data_ptr<int>(), present.second.data_ptr<int>(), B,
        c.num_slots, E, pair_far_bound<scalar_t>(scalar_t(c.delta_d), E, c.norm), far.data_ptr<scalar_t>());
  });
  return far;
}

// present/num_present of the paper normalisation (empty tensors for chainer).
std::pair<at::Tensor, at::Tensor> compact_present(const at::Tensor& counts, const LossConfig& c, int64_t B,
                                                  cudaStream_t stream) {
  const auto opts = counts.options().dtype(at::kInt);
  if (c.normalization != Normalization::Paper || B == 0) return {at::empty({0}, opts), at::empty({0}, opts)};
  const int64_t K = c.num_slots;
  at::Tensor present = at::empty({B, K}, opts), num_present = at::empty({B}, opts);
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(B, 65535));
  DISCLOSS_LAUNCH(compact_present_kernel, kCompactThreads, grid, kCompactThreads, 0, stream)(counts.data_ptr<int64_t>(), B, K,
                                                               present.data_ptr<int>(), num_present.data_ptr<int>());
  return {present, num_present};
}

void finalize_forward(const LossConfig& c, int64_t B, int64_t E, const at::Tensor& means, const at::Tensor& counts,
                      const at::Tensor& hinge, const at::Tensor& push_sums,
                      const std::pair<at::Tensor, at::Tensor>& present, at::Tensor& var, at::Tensor& dist,
                      at::Tensor& reg, at::Tensor& push, cudaStream_t stream) {
  const int64_t K = c.num_slots;
  const bool paper = c.normalization == Normalization::Paper;
  const bool with_push = push_sums.defined();
  const int64_t tiles = paper ? std::min<int64_t>(std::max<int64_t>(ceil_div(K, 64), 1), 64)
                              : std::min<int64_t>(std::max<int64_t>(ceil_div(B * K, 64), 1), 1024);
  const int64_t blocks = paper ? B * tiles : tiles;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "embeddings: batch too large for one launch (", B, ")");
  at::Tensor partials = at::empty({blocks, 4}, means.options());
  at::Tensor tickets = at::zeros({1}, counts.options().dtype(at::kInt));
  const at::Tensor far = pair_far_bounds(c, B, E, means, present, stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, var.scalar_type(), "discloss_finalize_cuda", [&] {
    using acc_t = typename Elem<scalar_t>::acc;
    DISCLOSS_LAUNCH(finalize_forward_kernel<scalar_t, acc_t>, kFinalizeThreads, static_cast<unsigned>(blocks),
                    kFinalizeThreads, 0, stream)(
        c, B, E, tiles, means.data_ptr<acc_t>(), counts.data_ptr<int64_t>(), hinge.data_ptr<acc_t>(),
        with_push ? push_sums.data_ptr<acc_t>() : nullptr, paper ? present.first.data_ptr<int>() : nullptr,
        paper ? present.second.data_ptr<int>() : nullptr, far.defined() ? far.data_ptr<acc_t>() : nullptr,
        partials.data_ptr<acc_t>(),
        reinterpret_cast<unsigned*>(tickets.data_ptr<int>()), var.data_ptr<scalar_t>(), dist.data_ptr<scalar_t>(),
        reg.data_ptr<scalar_t>(), push.data_ptr<scalar_t>());
  });
}

}  // namespace cuda
}  // namespace discloss
