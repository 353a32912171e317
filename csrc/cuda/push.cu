// Pass 2b of the CUDA op: the unlabeled push's sums (DESIGN §1, Variants).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstdint>

#include "passes.h"

namespace discloss {
namespace cuda {
namespace {

// ---- pass 2b: the unlabeled push's sums (DESIGN §1, Variants) --------------------------
// Block item (b, chunk) of B * chunks (grid-stride): for the unlabeled pixels
// i (label == ignore_index) of the chunk and every cluster c present in image
// b, q = [delta_d - ||x_i - mu_c||]+; adds sum_i q^2 to push_out[c] and
// sum_i d(q^2)/dx_i to push_grad_out[c, :], the rows of (chunk, b)
// (caller-zeroed; the final rows when chunks == 1). Tiles of blockDim pixels:
// thread t takes pixel t for q and its coefficient, then (part, e) cells sum
// the coefficient times u over the tile's pixels j = part, part + parts, ...
// and the parts are added in part order. No atomics: bitwise reproducible.
//
// The tile's ball (prune, and E <= blockDim so that the centre fits in
// shared memory): the centre c of the tile's unlabeled pixels (their mean,
// (part, e) cells as above) and the radius rho (the largest distance from
// it, a block max that keeps NaN), then, blockDim clusters at a time, one
// thread per cluster tests ||c - mu|| - rho against delta_d with math.h's
// rounding margin (push_ball_test) into sh_near. A cluster ruled out has q =
// 0 for every pixel of the tile, as the exact code would compute it, so its
// terms, all +-0, are not computed and nothing is added; the survivors are
// summed exactly as before, in the same order: the sums keep their bits. The
// decision is read from shared memory after a barrier, uniform over the
// block. A tile with a NaN or inf pixel has a NaN centre or radius and
// rules out nothing. Costs per tile 2 E + C E reads (from L1/L2) and 5 + 2
// ceil(C / blockDim) barriers, against C E reads and 3 to 4 barriers per
// cluster it rules out.
//
// O(N_U * C * E) work at most; reads labels once, the unlabeled pixels' x
// once per cluster not ruled out plus twice for the ball (from L1/L2 after
// the first), means through the cache.
template <typename scalar_t, typename label_t>
__global__ void __launch_bounds__(kPushThreads)
    unlabeled_push_kernel(const scalar_t* __restrict__ x, const label_t* __restrict__ labels, const PixelLayout L,
                          const LossConfig c, bool unit, bool prune, int64_t chunks, int64_t chunk_px,
                          const typename Elem<scalar_t>::acc* __restrict__ means, const int* __restrict__ present,
                          const int* __restrict__ num_present, typename Elem<scalar_t>::acc* __restrict__ push_out,
                          typename Elem<scalar_t>::acc* __restrict__ push_grad_out) {
  using acc_t = typename Elem<scalar_t>::acc;
  DISCLOSS_SHARED_ARRAY(acc_t, sh_coef, kPushThreads);
  DISCLOSS_SHARED_ARRAY(acc_t, sh_div, kPushThreads);  // 1, or r where the coefficient overflowed
  DISCLOSS_SHARED_ARRAY(int64_t, sh_xoff, kPushThreads);  // -1: not an unlabeled pixel
  DISCLOSS_SHARED_ARRAY(acc_t, sh_cells, kPushThreads);
  DISCLOSS_SHARED_ARRAY(acc_t, scratch, 32);
  DISCLOSS_SHARED_ARRAY(acc_t, sh_centre, kPushThreads);  // the tile's ball
  DISCLOSS_SHARED_ARRAY(int, sh_near, kPushThreads);  // 0: cluster base + t ruled out for the tile
  const int64_t K = c.num_slots, E = L.embed_dim, N = L.num_pixels, B = L.batch;
  const int64_t threads = blockDim.x, tid = threadIdx.x;
  const int64_t parts = E <= threads ? threads / E : 1;  // parts * E <= threads when parts > 1
  const int norm = c.norm;
  const acc_t delta_d = acc_t(c.delta_d);
  const BallTest<acc_t> ball = push_ball_test(delta_d, E, norm);
  const bool use_ball = prune && ball.on && E <= threads;  // uniform over the block
  for (int64_t item = blockIdx.x; item < B * chunks; item += gridDim.x) {
    const int64_t b = item / chunks, chunk = item - b * chunks;
    const int64_t C = num_present[b];
    if (C == 0) continue;  // uniform over the block
    const int* P = present + b * K;
    const int64_t p_begin = chunk * chunk_px;
    const int64_t p_end = min(p_begin + chunk_px, N);
    const scalar_t* x_img = x + b * L.x_batch_stride;
    const label_t* lab_img = labels + b * L.label_batch_stride;
    acc_t* q_out = push_out + (chunk * B + b) * K;
    acc_t* g_out = push_grad_out + (chunk * B + b) * K * E;
    for (int64_t tile = p_begin; tile < p_end; tile += threads) {
      const int64_t p = tile + tid;
      int64_t xoff = -1;
      if (p < p_end) {
        const PixelOffsets o = unit ? PixelOffsets{p, p, p} : pixel_offsets(L, p);
        if (static_cast<int64_t>(lab_img[o.label]) == c.ignore_index) xoff = o.x;
      }
      __syncthreads();  // the previous tile's readers of sh_xoff are done
      sh_xoff[tid] = xoff;
      if (!__syncthreads_or(xoff >= 0)) continue;  // no unlabeled pixel in the tile
      const int64_t count = min(threads, p_end - tile);
      acc_t rho = acc_t(0);
      if (use_ball) {
        for (int64_t cell = tid; cell < parts * E; cell += threads) {
          const int64_t part = cell / E, e = cell - part * E;
          acc_t sum = acc_t(0);
          for (int64_t j = part; j < count; j += parts) {
            const int64_t xo = sh_xoff[j];
            if (xo >= 0) sum += load_elem(x_img, xo + e * L.x_embed_stride);
          }
          sh_cells[cell] = sum;
        }
        __syncthreads();
        for (int64_t e = tid; e < E; e += threads) {
          acc_t sum = acc_t(0);
          int n = 0;
          for (int64_t part = 0; part < parts; ++part) sum += sh_cells[part * E + e];
          for (int64_t j = 0; j < count; ++j) n += sh_xoff[j] >= 0 ? 1 : 0;
          sh_centre[e] = sum / acc_t(n);
        }
        __syncthreads();
        acc_t s = acc_t(0);
        if (xoff >= 0) {
          for (int64_t e = 0; e < E; ++e) {
            s += norm_term<acc_t>(load_elem(x_img, xoff + e * L.x_embed_stride) - sh_centre[e], norm);
          }
        }
        rho = block_max_nan(finish_norm(s, norm), scratch);
      }
      for (int64_t base = 0; base < C; base += threads) {
        const int64_t in_chunk = min(threads, C - base);
        if (use_ball) {
          __syncthreads();  // the previous chunk's readers of sh_near are done
          if (tid < in_chunk) {
            const acc_t* mu = means + (b * K + P[base + tid]) * E;
            acc_t s = acc_t(0);
            for (int64_t e = 0; e < E; ++e) s += norm_term<acc_t>(sh_centre[e] - mu[e], norm);
            sh_near[tid] = ball_rules_out(finish_norm(s, norm), rho, ball) ? 0 : 1;
          }
          __syncthreads();
        }
        for (int64_t i = base; i < base + in_chunk; ++i) {
          if (use_ball && sh_near[i - base] == 0) {  // uniform over the block
            if (tid == 0) DISCLOSS_COUNT_SKIPPED(PushTiles, 1);
            continue;
          }
          const int64_t k = P[i];
          const acc_t* mu = means + (b * K + k) * E;
          acc_t q2 = acc_t(0), coef = acc_t(0), div = acc_t(1);
          if (xoff >= 0) {
            acc_t r = acc_t(0);
            for (int64_t e = 0; e < E; ++e) {
              r += norm_term<acc_t>(load_elem(x_img, xoff + e * L.x_embed_stride) - mu[e], norm);
            }
            r = pixel_norm(r, norm, x_img + xoff, L.x_embed_stride, mu, E);
            const PullHinge<acc_t> uq = unlabeled_hinge(r, delta_d, norm);
            q2 = uq.h * uq.h;
            coef = uq.coef;
            // A pixel within ~1e-38 of the mean (float32) but not on it: -2q/r
            // overflows while the gradient 2q (d / r) does not (math.h
            // coef_overflowed); its terms become (-2q) * (d / r).
            if (norm == 2 && coef_overflowed(coef, r)) {
              coef = overflowed_grad(coef, uq.h, acc_t(1), acc_t(1));
              div = r;
            }
          }
          sh_coef[tid] = coef;
          sh_div[tid] = div;
          q2 = block_sum(q2, scratch);  // also makes sh_coef and sh_div visible to the block
          if (tid == 0) q_out[k] += q2;
          for (int64_t cell = tid; cell < parts * E; cell += threads) {
            const int64_t part = cell / E, e = cell - part * E;
            const acc_t me = mu[e];
            acc_t sum = acc_t(0);
            for (int64_t j = part; j < count; j += parts) {
              const int64_t xo = sh_xoff[j];
              if (xo >= 0) {
                const acc_t d = hinge_direction(load_elem(x_img, xo + e * L.x_embed_stride) - me, norm);
                sum += sh_div[j] == acc_t(1) ? sh_coef[j] * d : sh_coef[j] * (d / sh_div[j]);
              }
            }
            if (parts == 1) {
              g_out[k * E + e] += sum;  // cell e is this thread's alone
            } else {
              sh_cells[cell] = sum;
            }
          }
          if (parts > 1) {
            __syncthreads();
            for (int64_t e = tid; e < E; e += threads) {
              acc_t sum = acc_t(0);
              for (int64_t part = 0; part < parts; ++part) sum += sh_cells[part * E + e];
              g_out[k * E + e] += sum;
            }
          }
          __syncthreads();  // sh_coef, sh_div and sh_cells are rewritten for the next cluster
        }
      }
    }
  }
}
}  // namespace

void unlabeled_push_sums(const at::Tensor& x, const at::Tensor& lab, const PixelLayout& L, const LossConfig& c,
                         const at::Tensor& means, const std::pair<at::Tensor, at::Tensor>& present,
                         at::Tensor& push_sums, at::Tensor& push_grad, cudaStream_t stream) {
  const int64_t B = L.batch, E = L.embed_dim, K = c.num_slots;
  const PushPlan pp = plan_push(L, K);
  const bool direct = pp.chunks == 1;
  at::Tensor part_push = direct ? push_sums : at::zeros({pp.chunks, B, K}, push_sums.options());
  at::Tensor part_push_grad = direct ? push_grad : at::zeros({pp.chunks, B, K, E}, push_grad.options());
  const bool unit = L.ndim == 1 && L.x_strides[0] == 1 && L.label_strides[0] == 1;
  const int64_t blocks = std::min<int64_t>(B * pp.chunks, int64_t(sm_count()) * 32);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "discloss_push_sums_cuda", [&] {
    using acc_t = typename Elem<scalar_t>::acc;
    dispatch_label_type(lab.scalar_type(), [&](auto label_tag) {
      using label_t = decltype(label_tag);
      DISCLOSS_LAUNCH(unlabeled_push_kernel<scalar_t, label_t>, kPushThreads, static_cast<unsigned>(blocks),
                      kPushThreads, 0, stream)(
          static_cast<const scalar_t*>(x.data_ptr()), static_cast<const label_t*>(lab.data_ptr()), L, c, unit,
          pruning_enabled(), pp.chunks, pp.chunk_px, means.data_ptr<acc_t>(), present.first.data_ptr<int>(),
          present.second.data_ptr<int>(), part_push.data_ptr<acc_t>(), part_push_grad.data_ptr<acc_t>());
    });
  });
  if (!direct) {
    sum_partials(part_push_grad, pp.chunks, push_grad, stream);
    sum_partials(part_push, pp.chunks, push_sums, stream);
  }
}

}  // namespace cuda
}  // namespace discloss
