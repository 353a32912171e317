// The CUDA op's backward (DESIGN §3, steps 4 and 5): the per-slot
// coefficients, then pass 3 writes each gradient element once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstdint>

#include "passes.h"

namespace discloss {
namespace cuda {
namespace {

// ---- backward: per-slot coefficients --------------------------------------------------
// One block per (image, slot) row (grid-stride). For a slot with pixels:
//   var_coef = grad_var * alpha * scale * var_weight,
//   mean_coef = (-var_coef * V + push gradient + reg gradient) / n,
// the push gradient summed over the other clusters of the image (paper:
// present ones; chainer: every slot), in a fixed order: threads compute the
// pair coefficients of blockDim clusters at a time, then each (part, e) cell
// is owned by one thread. Slots without pixels get 0. With the unlabeled push
// (push_grad not null), the push's mean path -push_coef[b] * V^push joins
// mean_coef (before the division by n, like -var_coef * V), and the block of
// slot 0 of image b writes push_coef[b] = grad_push * scale * w / (C N_U),
// the weight of d(q^2)/dx for the image's unlabeled pixels. Paper, with far
// (finalize.cu pair_far_kernel) not null: a pair's distance stops at the
// component where its partial sum reaches far[b] (its hinge and
// coefficient are 0 either way, as in the finalize), so most pairs of
// means spread more than 2 delta_d apart read one or two components of the
// other mean instead of E; the pairs that go added nothing, so the row keeps
// its bits. Reads means, counts (B, K + 1), hinge_grad_sums,
// push_grad_sums and far through the cache (the other means up to C E times
// per row, from L1/L2); writes var_coef, mean_coef and push_coef once.
template <typename acc_t>
__device__ __forceinline__ acc_t image_push_coef(const LossConfig& c, const acc_t* grad_push, bool per_image,
                                                 int64_t b, int64_t B, int64_t C, int64_t n_unlabeled) {
  return grad_push[per_image ? b : 0] * reduction_scale<acc_t>(c, B) *
         unlabeled_push_weight<acc_t>(c, C, n_unlabeled);
}

template <typename acc_t>
__global__ void __launch_bounds__(kCoefThreads)
    slot_coefficients_kernel(const LossConfig c, int64_t B, int64_t E, const acc_t* __restrict__ grad_var,
                             const acc_t* __restrict__ grad_dist, const acc_t* __restrict__ grad_reg,
                             const acc_t* __restrict__ grad_push, bool per_image, const acc_t* __restrict__ means,
                             const int64_t* __restrict__ counts, const acc_t* __restrict__ hinge_grad,
                             const acc_t* __restrict__ push_grad, const int* __restrict__ present,
                             const int* __restrict__ num_present, const acc_t* __restrict__ far,
                             acc_t* __restrict__ var_coef, acc_t* mean_coef,
                             acc_t* __restrict__ push_coef) {
  DISCLOSS_SHARED_ARRAY(acc_t, sh_pair_coef, kCoefThreads);
  DISCLOSS_SHARED_ARRAY(int, sh_pair_slot, kCoefThreads);
  DISCLOSS_SHARED_ARRAY(acc_t, sh_pair_dist, kCoefThreads);
  DISCLOSS_SHARED_ARRAY(acc_t, sh_push, kCoefThreads);
  DISCLOSS_SHARED(acc_t, sh_a);
  DISCLOSS_SHARED(acc_t, sh_wd);
  DISCLOSS_SHARED(acc_t, sh_wr);
  DISCLOSS_SHARED(acc_t, sh_wu);
  DISCLOSS_SHARED(acc_t, sh_reg_norm);
  const int64_t K = c.num_slots;
  const bool paper = c.normalization == Normalization::Paper;
  const int norm = c.norm;
  const acc_t delta_d = acc_t(c.delta_d);
  const acc_t scale = reduction_scale<acc_t>(c, B);
  const int64_t threads = blockDim.x;
  // Push-gradient cells: parts x E, each owned by one thread; in shared
  // memory when they fit, else (E > blockDim, parts = 1) in the output row.
  const int64_t parts = E <= threads ? threads / E : 1;
  for (int64_t row = blockIdx.x; row < B * K; row += gridDim.x) {
    const int64_t b = row / K, k = row - b * K;
    const int64_t n = counts[b * (K + 1) + k];
    acc_t* out = mean_coef + row * E;
    if (push_grad != nullptr && k == 0 && threadIdx.x == 0) {
      push_coef[b] = image_push_coef(c, grad_push, per_image, b, B, int64_t(num_present[b]), counts[b * (K + 1) + K]);
    }
    if (n == 0) {  // uniform over the block
      if (threadIdx.x == 0) var_coef[row] = acc_t(0);
      for (int64_t e = threadIdx.x; e < E; e += threads) out[e] = acc_t(0);
      continue;
    }
    const int64_t C = paper ? int64_t(num_present[b]) : K;
    const int* P = paper ? present + b * K : nullptr;
    const acc_t* mu_b = means + b * K * E;
    const acc_t* mu = mu_b + k * E;
    const acc_t far_b = far != nullptr ? far[b] : acc_t(NAN);
    if (threadIdx.x == 0) {
      const int64_t gi = per_image ? b : 0;
      int64_t slot_total = 0;
      acc_t reg_norm = acc_t(0);
      if (paper) {
        reg_norm = mean_distance<acc_t>(mu, nullptr, E, norm);  // ||mu||, range-safe
      } else {
        for (int64_t bb = 0; bb < B; ++bb) {
          slot_total += counts[bb * (K + 1) + k];
          for (int64_t e = 0; e < E; ++e) reg_norm += norm_term<acc_t>(means[(bb * K + k) * E + e], norm);
        }
        reg_norm = finish_norm(reg_norm, norm);
      }
      sh_a = grad_var[gi] * acc_t(c.alpha) * scale * var_weight<acc_t>(c, C, n, slot_total);
      sh_wd = grad_dist[gi] * acc_t(c.beta) * scale * dist_pair_weight<acc_t>(c, C, B);
      sh_wr = grad_reg[gi] * acc_t(c.gamma) * scale * reg_weight<acc_t>(c, C, B);
      sh_wu = push_grad != nullptr ? image_push_coef(c, grad_push, per_image, b, B, C, counts[b * (K + 1) + K])
                                   : acc_t(0);
      sh_reg_norm = reg_norm;
    }
    __syncthreads();
    const acc_t a = sh_a, wd = sh_wd, wr = sh_wr, wu = sh_wu, reg_norm = sh_reg_norm;
    acc_t* push = E <= threads ? sh_push : out;
    for (int64_t cell = threadIdx.x; cell < parts * E; cell += threads) push[cell] = acc_t(0);
    if (wd != acc_t(0)) {
      for (int64_t base = 0; base < C; base += threads) {
        const int64_t i = base + threadIdx.x;
        acc_t coef = acc_t(0), dist = acc_t(0);
        int l = -1;
        if (i < C) {
          l = P ? P[i] : static_cast<int>(i);
          if (l != k) {
            dist = mean_distance_or_far(mu, mu_b + int64_t(l) * E, E, norm, far_b);
            const acc_t p = push_hinge(dist, delta_d);
            // d(p^2)/d mu_k = -2 p wd * d||mu_k - mu_l|| / d mu_k, the norm's
            // gradient taken as (mu_k - mu_l) / r per component as on CPU
            // (math.h add_push_grad): folding 1/r into the coefficient
            // overflows for means within ~1e-38 (float32) of each other. A
            // NaN p goes on and reaches the gradient.
            if (p != acc_t(0)) coef = -2 * p * wd;
          }
        }
        sh_pair_coef[threadIdx.x] = coef;
        sh_pair_slot[threadIdx.x] = l;
        sh_pair_dist[threadIdx.x] = dist;
        __syncthreads();
        const int64_t count = min(threads, C - base);
        for (int64_t cell = threadIdx.x; cell < parts * E; cell += threads) {
          const int64_t part = cell / E, e = cell - part * E;
          const acc_t me = mu[e];
          acc_t s = push[cell];
          for (int64_t jj = part; jj < count; jj += parts) {
            const acc_t cf = sh_pair_coef[jj];
            const acc_t r = sh_pair_dist[jj];
            // A pair with p = 0 at a distance that is not finite (a mean with
            // an inf or NaN component; the early exit is off then, far_b
            // NaN) still adds 0 * (mu_k - mu_l) / r: NaN in the components
            // where mu_k - mu_l is not finite, as the reference's autograd
            // and the CPU kernels give.
            if (cf != acc_t(0) || (far_b != far_b && !(r - r == acc_t(0)))) {
              s += cf * norm_grad(me - mu_b[int64_t(sh_pair_slot[jj]) * E + e], r, norm);
            }
          }
          push[cell] = s;
        }
        __syncthreads();
      }
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e < E; e += threads) {
      acc_t g = -a * hinge_grad[row * E + e];
      // d(q^2)/dmu_c = -d(q^2)/dx_i, summed over the unlabeled pixels in forward.
      if (push_grad != nullptr) g -= wu * push_grad[row * E + e];
      for (int64_t part = 0; part < parts; ++part) g += push[part * E + e];
      if (paper || norm == 2) {
        g += wr * norm_grad(mu[e], reg_norm, norm);
      } else {
        g += wr * norm_grad(mu[e], acc_t(0), 1);
      }
      out[e] = g / acc_t(n);
    }
    if (threadIdx.x == 0) var_coef[row] = a;
    __syncthreads();  // shared memory is reused by the next row
  }
}

// ---- pass 3: the gradient ----------------------------------------------------------
// One thread per pixel: grad x_i = var_coef[c] * d(h_i^2)/dx_i + mean_coef[c]
// for a pixel of cluster c; with the unlabeled push (push_coef not null), for
// an unlabeled pixel of an image with C > 0 clusters,
// grad x_i = push_coef[b] * sum_c d(q_ic^2)/dx_i (kPushGradWidth components
// at a time, q recomputed per group: O(C E (E / kPushGradWidth + 1)));
// 0 for every other pixel. A cluster whose norm terms, summed so far, reach
// math.h's push_skip_bound has q = 0 and adds nothing (its 0 * u terms are
// +-0): the thread stops its distance there and skips it, when the pixel and
// the image's means are finite (far: pair_far_bounds, NaN when a present
// mean is not; null when pruning is off), since a NaN or inf in an unread
// component would otherwise be lost. Same bits either way. Reads the label
// once, x twice (the second read of the pixel's E values hits L1; C+1 times
// for an unlabeled pixel) and per-slot rows through the cache; writes each
// gradient element once.
template <typename scalar_t, typename label_t>
__global__ void __launch_bounds__(kGradThreads)
    write_grad_kernel(const scalar_t* __restrict__ x, const label_t* __restrict__ labels, scalar_t* __restrict__ grad,
                      const PixelLayout L, const LossConfig c, bool unit, const int64_t* __restrict__ slot_ids,
                      const int64_t* __restrict__ num_ids, const typename Elem<scalar_t>::acc* __restrict__ means,
                      const typename Elem<scalar_t>::acc* __restrict__ var_coef,
                      const typename Elem<scalar_t>::acc* __restrict__ mean_coef,
                      const typename Elem<scalar_t>::acc* __restrict__ push_coef, const int* __restrict__ present,
                      const int* __restrict__ num_present, const typename Elem<scalar_t>::acc* __restrict__ far) {
  using acc_t = typename Elem<scalar_t>::acc;
  const int64_t K = c.num_slots, E = L.embed_dim, N = L.num_pixels;
  const int norm = c.norm;
  const acc_t delta_v = acc_t(c.delta_v);
  const acc_t delta_d = acc_t(c.delta_d);
  const acc_t push_bound = push_skip_bound(delta_d, norm);  // NaN: never stop
  for (int64_t b = blockIdx.y; b < L.batch; b += gridDim.y) {
    const ImageSlots map = image_slots(slot_ids, num_ids, b, K);
    const int64_t C = push_coef != nullptr ? int64_t(num_present[b]) : 0;
    for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < N; p += int64_t(gridDim.x) * blockDim.x) {
      const PixelOffsets o = unit ? PixelOffsets{p, p, p} : pixel_offsets(L, p);
      const scalar_t* xp = x + b * L.x_batch_stride + o.x;
      scalar_t* gp = grad + b * L.grad_batch_stride + o.grad;
      const int64_t s = lookup_slot(static_cast<int64_t>(labels[b * L.label_batch_stride + o.label]), c, map);
      if (s == kIgnored && C > 0) {  // an unlabeled pixel under the push
        const acc_t w = push_coef[b];
        const int* P = present + b * K;
        bool finite = far != nullptr && far[b] == far[b];  // the image's means
        for (int64_t e = 0; finite && e < E; ++e) {
          const acc_t v = load_elem(xp, e * L.x_embed_stride);
          finite = v - v == acc_t(0);
        }
        const acc_t stop = finite ? push_bound : acc_t(NAN);
        for (int64_t e0 = 0; e0 < E; e0 += kPushGradWidth) {
          acc_t g[kPushGradWidth];
#pragma unroll
          for (int j = 0; j < kPushGradWidth; ++j) g[j] = acc_t(0);
          for (int64_t i = 0; i < C; ++i) {
            const acc_t* mu = means + (b * K + P[i]) * E;
            acc_t r = acc_t(0);
            bool far_off = false;
            for (int64_t e = 0; e < E; ++e) {
              r += norm_term<acc_t>(load_elem(xp, e * L.x_embed_stride) - __ldg(mu + e), norm);
              if (r >= stop) {
                far_off = true;
                break;
              }
            }
            if (far_off) {
              if (e0 == 0) DISCLOSS_COUNT_SKIPPED(PushPixels, 1);
              continue;
            }
            const acc_t rr = pixel_norm(r, norm, xp, L.x_embed_stride, mu, E);
            const PullHinge<acc_t> uq = unlabeled_hinge(rr, delta_d, norm);
            // -2q/r overflows within ~1e-38 of the mean (float32): then
            // w * 2q (d / r) component by component (math.h coef_overflowed).
            const bool overflowed = norm == 2 && coef_overflowed(uq.coef, rr);
            const acc_t coef = w * uq.coef;
#pragma unroll
            for (int j = 0; j < kPushGradWidth; ++j) {
              const int64_t e = e0 + j;
              if (e < E) {
                const acc_t d = hinge_direction(load_elem(xp, e * L.x_embed_stride) - __ldg(mu + e), norm);
                g[j] += overflowed ? w * overflowed_grad(uq.coef, uq.h, d, rr) : coef * d;
              }
            }
          }
#pragma unroll
          for (int j = 0; j < kPushGradWidth; ++j) {
            const int64_t e = e0 + j;
            if (e < E) gp[e * L.grad_embed_stride] = static_cast<scalar_t>(g[j]);
          }
        }
        continue;
      }
      if (s < 0) {
        for (int64_t e = 0; e < E; ++e) gp[e * L.grad_embed_stride] = static_cast<scalar_t>(acc_t(0));
        continue;
      }
      const int64_t row = b * K + s;
      const acc_t* mu = means + row * E;
      const acc_t* bc = mean_coef + row * E;
      acc_t r = acc_t(0);
      for (int64_t e = 0; e < E; ++e) r += norm_term<acc_t>(load_elem(xp, e * L.x_embed_stride) - __ldg(mu + e), norm);
      const acc_t coef =
          __ldg(var_coef + row) * pull_hinge(pixel_norm(r, norm, xp, L.x_embed_stride, mu, E), delta_v, norm).coef;
      for (int64_t e = 0; e < E; ++e) {
        const acc_t dlt = load_elem(xp, e * L.x_embed_stride) - __ldg(mu + e);
        gp[e * L.grad_embed_stride] = static_cast<scalar_t>(coef * hinge_direction(dlt, norm) + __ldg(bc + e));
      }
    }
  }
}
}  // namespace

void write_gradient(const at::Tensor& x, const at::Tensor& lab, at::Tensor& grad, const PixelLayout& L,
                    const LossConfig& c, const SlotMapArgs& map, const at::Tensor& gv, const at::Tensor& gd,
                    const at::Tensor& gr, const at::Tensor& gp, const at::Tensor& means_c, const at::Tensor& counts_c,
                    const at::Tensor& hg, const at::Tensor& pg, cudaStream_t stream) {
  const int64_t B = L.batch, E = L.embed_dim, K = c.num_slots, N = L.num_pixels;
  const bool with_push = c.unlabeled_push > 0;
  const bool paper = c.normalization == Normalization::Paper;
  const auto acc_opts = means_c.options();
  at::Tensor var_coef = at::empty({B, K}, acc_opts);
  at::Tensor mean_coef = at::empty({B, K, E}, acc_opts);
  at::Tensor push_coef = at::empty({with_push ? B : 0}, acc_opts);
  const bool unit = L.ndim == 1 && L.x_strides[0] == 1 && L.label_strides[0] == 1 && L.grad_strides[0] == 1;
  const auto present = compact_present(counts_c, c, B, stream);
  const at::Tensor far = pair_far_bounds(c, B, E, means_c, present, stream);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "discloss_backward_cuda", [&] {
    using acc_t = typename Elem<scalar_t>::acc;
    const int64_t coef_blocks = std::max<int64_t>(1, std::min<int64_t>(B * K, int64_t(sm_count()) * 32));
    DISCLOSS_LAUNCH(slot_coefficients_kernel<acc_t>, kCoefThreads, static_cast<unsigned>(coef_blocks), kCoefThreads, 0, stream)(
        c, B, E, gv.data_ptr<acc_t>(), gd.data_ptr<acc_t>(), gr.data_ptr<acc_t>(), gp.data_ptr<acc_t>(),
        c.reduction == Reduction::None, means_c.data_ptr<acc_t>(), counts_c.data_ptr<int64_t>(), hg.data_ptr<acc_t>(),
        with_push ? pg.data_ptr<acc_t>() : nullptr, paper ? present.first.data_ptr<int>() : nullptr,
        paper ? present.second.data_ptr<int>() : nullptr, far.defined() ? far.data_ptr<acc_t>() : nullptr,
        var_coef.data_ptr<acc_t>(), mean_coef.data_ptr<acc_t>(),
        with_push ? push_coef.data_ptr<acc_t>() : nullptr);

    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(N, kGradThreads), 1 << 30)),
                    static_cast<unsigned>(std::min<int64_t>(B, 65535)));
    dispatch_label_type(lab.scalar_type(), [&](auto label_tag) {
      using label_t = decltype(label_tag);
      DISCLOSS_LAUNCH(write_grad_kernel<scalar_t, label_t>, kGradThreads, grid, kGradThreads, 0, stream)(
          static_cast<const scalar_t*>(x.data_ptr()), static_cast<const label_t*>(lab.data_ptr()),
          static_cast<scalar_t*>(grad.data_ptr()), L, c, unit, map.slot_ids, map.num_ids, means_c.data_ptr<acc_t>(),
          var_coef.data_ptr<acc_t>(), mean_coef.data_ptr<acc_t>(), with_push ? push_coef.data_ptr<acc_t>() : nullptr,
          paper ? present.first.data_ptr<int>() : nullptr, paper ? present.second.data_ptr<int>() : nullptr,
          far.defined() ? far.data_ptr<acc_t>() : nullptr);
    });
  });
}

}  // namespace cuda
}  // namespace discloss
