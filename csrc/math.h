// The per-element and per-instance math of the discriminative loss, shared by
// the CPU and CUDA kernels. No torch headers here: the CPU kernels include this
// file in translation units compiled for different instruction sets, so every
// function has internal linkage on the host (static) to keep those copies apart.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DISCLOSS_HD __host__ __device__ __forceinline__
#else
#define DISCLOSS_HD static inline
#endif

namespace discloss {

enum class Normalization : int { Paper = 0, Chainer = 1 };
enum class Reduction : int { None = 0, Mean = 1, Sum = 2 };

// Slot codes for a pixel's label.
constexpr int64_t kIgnored = -1;  // ignore_index (the unlabeled pixels of the push), or out of Chainer's 1..K
constexpr int64_t kInvalid = -2;  // a label with no slot: the paper mode without a slot map rejects it

// Everything a kernel needs to know about the loss; plain data so that it can
// be passed by value to a CUDA kernel.
struct LossConfig {
  int64_t num_slots;  // K
  double delta_v;
  double delta_d;
  int norm;  // 1 or 2
  double alpha;
  double beta;
  double gamma;
  double unlabeled_push;  // w of the unlabeled push (paper normalisation, needs ignore_index); 0 = off
  bool has_ignore;
  int64_t ignore_index;
  Normalization normalization;
  Reduction reduction;
};

// Cluster slot of a label. Paper: the label itself; Chainer: label-1 for
// labels 1..K. Kernels treat kInvalid like kIgnored, so no label can make them
// read or write out of bounds; the CPU path additionally reports it.
DISCLOSS_HD int64_t slot_of(int64_t label, const LossConfig& c) {
  if (c.normalization == Normalization::Chainer) {
    return (label >= 1 && label <= c.num_slots) ? label - 1 : kIgnored;
  }
  if (c.has_ignore && label == c.ignore_index) return kIgnored;
  return (label >= 0 && label < c.num_slots) ? label : kInvalid;
}

// Slot of a label under a slot map (DESIGN §1, arbitrary ids): ids[0 .. n)
// are the distinct ids of the image other than ignore_index, sorted; the
// slot is the id's position, found by binary search. n < 0 means the identity
// map (every id of the image lies in [0, K)). Ids not in the table get
// kInvalid, which the kernels treat as "no cluster", so no label can make
// them read or write out of bounds.
DISCLOSS_HD int64_t mapped_slot(int64_t label, const LossConfig& c, const int64_t* ids, int64_t n) {
  if (c.has_ignore && label == c.ignore_index) return kIgnored;
  if (n < 0) return (label >= 0 && label < c.num_slots) ? label : kInvalid;
  int64_t lo = 0, hi = n;  // first position with ids[pos] >= label
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (ids[mid] < label) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return (lo < n && ids[lo] == label) ? lo : kInvalid;
}

// Hinges propagate NaN: [z]+ is written as (z < 0 ? 0 : z), which keeps a
// NaN z (std::max and fmax would turn it into 0 and hide a diverging network).
template <typename acc_t>
DISCLOSS_HD acc_t hinge(acc_t z) {
  return z < acc_t(0) ? acc_t(0) : z;
}

// ||v|| is accumulated component by component: add_norm_term per component,
// then finish_norm.
template <typename acc_t>
DISCLOSS_HD acc_t norm_term(acc_t d, int norm) {
  return norm == 1 ? (d < 0 ? -d : d) : d * d;
}

template <typename acc_t>
DISCLOSS_HD acc_t finish_norm(acc_t acc, int norm) {
  return norm == 1 ? acc : std::sqrt(acc);
}

// Component of the gradient of ||v|| given the component d and r = ||v||.
// 0 at the zero vector (torch.linalg.vector_norm's subgradient); NaN in, NaN out.
template <typename acc_t>
DISCLOSS_HD acc_t norm_grad(acc_t d, acc_t r, int norm) {
  if (norm == 1) return d > 0 ? acc_t(1) : (d < 0 ? acc_t(-1) : (d == acc_t(0) ? acc_t(0) : d));
  return r == acc_t(0) ? acc_t(0) : d / r;
}

// Pull hinge of a pixel: h = [r - delta_v]+ with r = ||x - mu||. Its
// gradient d(h^2)/dx = coef * u where u = d (L2) or sign(d) (L1), so that the
// per-component work is one multiply.
template <typename acc_t>
struct PullHinge {
  acc_t h;
  acc_t coef;
};

template <typename acc_t>
DISCLOSS_HD PullHinge<acc_t> pull_hinge(acc_t r, acc_t delta_v, int norm) {
  // Branch-free so that the CPU loops over pixels vectorize; delta_v >= 0,
  // so h > 0 implies r > 0 and the division is safe where it is selected.
  // A NaN r gives a NaN h and coef.
  const acc_t h = hinge(r - delta_v);
  const acc_t coef = norm == 1 ? 2 * h : 2 * h / (r > 0 ? r : acc_t(1));
  return {h, coef};
}

// Unlabeled push of a pixel and a cluster mean: q = [delta_d - r]+ with
// r = ||x - mu||; d(q^2)/dx = coef * u (u as for the pull) and
// d(q^2)/dmu = -coef * u, coef = -2 q / r (L2) or -2 q (L1), 0 at r = 0.
template <typename acc_t>
DISCLOSS_HD PullHinge<acc_t> unlabeled_hinge(acc_t r, acc_t delta_d, int norm) {
  const acc_t q = hinge(delta_d - r);
  const acc_t coef = norm == 1 ? -2 * q : (r == acc_t(0) ? acc_t(0) : -2 * q / r);
  return {q, coef};
}

// Under L2 both pixel hinges have d(h^2)/dx = coef * d with coef = +-2h / r
// (dh/dr = +-1). The push's h does not vanish with r, so for a pixel within
// about 1e-38 of a mean (float32; 1e-308 in float64) but not on it, -2q/r
// overflows although the gradient, of magnitude 2q, is finite. The kernels
// test each coefficient (a vectorized OR) and compute such a pixel's
// gradient component by component as overflowed_grad: the unit vector d / r
// first, then the factor. A NaN coefficient from a NaN r is left alone.
template <typename acc_t>
DISCLOSS_HD bool coef_overflowed(acc_t coef, acc_t r) {
  return !(coef - coef == acc_t(0)) && r - r == acc_t(0);
}

// Component of d(h^2)/dx for a pixel whose coef (the hinge's, before any
// weight) overflowed: +-2h (d / r), the sign that of coef.
template <typename acc_t>
DISCLOSS_HD acc_t overflowed_grad(acc_t coef, acc_t h, acc_t d, acc_t r) {
  return (coef < acc_t(0) ? -2 * h : 2 * h) * (d / r);
}

// Push hinge of a pair of means: p = [2 delta_d - ||m||]+, term p^2, and
// d(p^2)/dm = push_coef * norm_grad(m).
template <typename acc_t>
DISCLOSS_HD acc_t push_hinge(acc_t dist, acc_t delta_d) {
  return hinge(2 * delta_d - dist);
}

// ---- normalisation weights (DESIGN §1) -----------------------------------
// Each returns the factor that multiplies one instance's (or pair's) raw term.

// var: weight of sum_{i in c} h_i^2 for one (image, slot).
//   paper:   1 / (C_b * n_c)
//   chainer: 1 / (K * max(sum_b n_kb, 1))
template <typename acc_t>
DISCLOSS_HD acc_t var_weight(const LossConfig& c, int64_t present_b, int64_t n, int64_t n_slot_total) {
  if (c.normalization == Normalization::Chainer) {
    return acc_t(1) / (acc_t(c.num_slots) * acc_t(n_slot_total > 0 ? n_slot_total : 1));
  }
  return (present_b > 0 && n > 0) ? acc_t(1) / (acc_t(present_b) * acc_t(n)) : acc_t(0);
}

// dist: weight of p^2 for one unordered pair.
//   paper:   2 / (C (C-1))   (the paper sums ordered pairs)
//   chainer: 1 / max(B K (K-1) / 2, 1)
template <typename acc_t>
DISCLOSS_HD acc_t dist_pair_weight(const LossConfig& c, int64_t present_b, int64_t batch) {
  if (c.normalization == Normalization::Chainer) {
    int64_t pairs = batch * c.num_slots * (c.num_slots - 1) / 2;
    return acc_t(1) / acc_t(pairs > 1 ? pairs : 1);
  }
  return present_b > 1 ? acc_t(2) / (acc_t(present_b) * acc_t(present_b - 1)) : acc_t(0);
}

// reg: weight of ||mu_c|| (paper) or of R_k (chainer).
//   paper:   1 / C_b
//   chainer: 1 / (K B)
template <typename acc_t>
DISCLOSS_HD acc_t reg_weight(const LossConfig& c, int64_t present_b, int64_t batch) {
  if (c.normalization == Normalization::Chainer) {
    return batch > 0 ? acc_t(1) / (acc_t(c.num_slots) * acc_t(batch)) : acc_t(0);
  }
  return present_b > 0 ? acc_t(1) / acc_t(present_b) : acc_t(0);
}

// unlabeled push: weight of sum_{i in U} q_ic^2 for one cluster c of an image
// with C clusters and n_u unlabeled pixels: w / (C n_u), 0 when either is 0.
template <typename acc_t>
DISCLOSS_HD acc_t unlabeled_push_weight(const LossConfig& c, int64_t present_b, int64_t n_u) {
  return (present_b > 0 && n_u > 0) ? acc_t(c.unlabeled_push) / (acc_t(present_b) * acc_t(n_u)) : acc_t(0);
}

// Factor the reduction applies to per-image terms (paper mode); Chainer's
// terms are already batch-level scalars.
template <typename acc_t>
DISCLOSS_HD acc_t reduction_scale(const LossConfig& c, int64_t batch) {
  if (c.normalization == Normalization::Paper && c.reduction == Reduction::Mean) {
    return acc_t(1) / acc_t(batch > 0 ? batch : 1);
  }
  return acc_t(1);
}

// ---- the range of the L2 norm ------------------------------------------------
// sqrt(sum of squares) loses a vector whose squares under- or overflow (in
// float32, norms below ~1e-19 come out 0 and above ~1e19 inf). Norms
// outside [lo, hi] are recomputed scaled by the largest component, as torch
// does; inside, the plain sum is exact to rounding (the largest square is a
// normal number and the smaller ones' loss is below the rounding error).
template <typename acc_t>
struct L2Range;
template <>
struct L2Range<float> {
  static constexpr float lo = 0x1p-50f, hi = 0x1p50f;
};
template <>
struct L2Range<double> {
  static constexpr double lo = 0x1p-450, hi = 0x1p450;
};

template <typename acc_t>
DISCLOSS_HD bool l2_out_of_range(acc_t r) {
  return r < L2Range<acc_t>::lo || r > L2Range<acc_t>::hi;  // false for NaN: it stays NaN
}

// ||v||_2 of component(0 .. E-1), scaled: max|v| * ||v / max|v|||.
template <typename acc_t, typename Component>
DISCLOSS_HD acc_t scaled_l2(int64_t E, Component component) {
  acc_t m = 0;
  for (int64_t e = 0; e < E; ++e) {
    const acc_t v = component(e);
    const acc_t a = v < 0 ? -v : v;
    if (!(a <= m)) m = a;  // NaN wins
  }
  if (m == acc_t(0) || !(m < acc_t(INFINITY))) return m;  // 0, inf or NaN
  acc_t acc = 0;
  for (int64_t e = 0; e < E; ++e) {
    const acc_t q = component(e) / m;
    acc += q * q;
  }
  return m * std::sqrt(acc);
}

// ---- pairs of means -------------------------------------------------------

// ||a - b|| over E components (strided by 1); ||a|| when b is null. With
// a bound far (pair_far_bound), +inf as soon as the norm terms summed so
// far reach it, the rest unread: the full sum, a sum of non-negative
// terms, would be at least as large, so the hinge [2 delta_d - r]+ is 0
// either way. The sums are those of the full computation in the same
// order, so a pair that does not stop early gets the same bits. far = NaN
// never stops. Only for means known to be finite: a NaN in an unread
// component would be lost.
template <typename acc_t>
DISCLOSS_HD acc_t mean_distance_or_far(const acc_t* a, const acc_t* b, int64_t E, int norm, acc_t far) {
  acc_t acc = 0;
  for (int64_t e = 0; e < E; ++e) {
    acc += norm_term<acc_t>(b ? a[e] - b[e] : a[e], norm);
    if (acc >= far) return acc_t(INFINITY);
  }
  const acc_t r = finish_norm(acc, norm);
  if (norm == 2 && l2_out_of_range(r)) {
    return scaled_l2<acc_t>(E, [&](int64_t e) { return b ? a[e] - b[e] : a[e]; });
  }
  return r;
}

template <typename acc_t>
DISCLOSS_HD acc_t mean_distance(const acc_t* a, const acc_t* b, int64_t E, int norm) {
  return mean_distance_or_far(a, b, E, norm, acc_t(NAN));
}

// grad[e] += scale * d(p^2)/d a[e] for the push hinge between means a and b.
template <typename acc_t>
DISCLOSS_HD void add_push_grad(acc_t* grad, const acc_t* a, const acc_t* b, int64_t E, acc_t delta_d,
                               int norm, acc_t scale) {
  acc_t r = mean_distance(a, b, E, norm);
  acc_t p = push_hinge(r, delta_d);
  if (p == acc_t(0)) return;  // a NaN p goes on and reaches the gradient
  acc_t coef = -2 * p * scale;
  for (int64_t e = 0; e < E; ++e) grad[e] += coef * norm_grad(a[e] - b[e], r, norm);
}

// ---- bounds that rule out zero hinge terms ------------------------------------
// The unlabeled push and the pairs of dist are hinges that vanish beyond a
// distance; the kernels skip work whose every term would be 0 by tests
// whose margins cover the rounding of both the test and the exact sums.
// A term the tests cannot rule out is computed exactly as before.

// Summed norm terms at or above this bound give q = 0. L1: the sum is r,
// and r >= delta_d makes delta_d - r <= 0 exactly. L2: the sum is r^2, and
// r^2 >= fl(delta_d^2) (1 + 2^-20) > delta_d^2 makes the correctly rounded
// sqrt >= delta_d; the range fix only refines an r that overflowed, and
// then the true r is also >= delta_d (the bound is finite). NaN (never
// skip) where delta_d^2 is not a normal number.
template <typename acc_t>
DISCLOSS_HD acc_t push_skip_bound(acc_t delta_d, int norm) {
  if (norm == 1) return delta_d;
  const acc_t b = delta_d * delta_d * (acc_t(1) + acc_t(1) / acc_t(1 << 20));
  const bool normal = b >= acc_t(1e-30) && b - b == acc_t(0);
  return normal ? b : acc_t(NAN);
}

// The CPU push (cpu/kernels.h) has three tests under L2 that rule out
// (cluster, lanes) blocks before the norm terms are summed, each a lower
// bound on ||x - mu|| with a rounding margin kappa = 4(E + 2)u, u the unit
// roundoff (at least twice what the sums below can be off by). First the
// norms: ||x - mu|| >= | ||x|| - ||mu|| |, a few operations per pair,
// decisive when pixels and means differ in norm. Then the lanes' ball
// (centre c, radius rho): ||x - mu|| >= ||c - mu|| - rho, E operations per
// mean for all the lanes, decisive when the lanes' pixels lie together (an
// unlabeled object) away from the mean. Then the Gram test, one FMA per
// component and pair, decisive whenever the block is out of reach. A block
// that passes all three is summed exactly and skipped or not by its sums:
// the tests only save work. (The CUDA push uses the ball alone, per tile:
// push_ball_test.)
//
// The Gram test: with S = ||x||^2 + ||mu||^2 and dot = x.mu as
// computed (components in order, each sum off by at most gamma_E S in
// total), t = S * keep - 2 dot <= (true r^2)(1 + u) when keep = 1 - 4(E +
// 2)u, u the unit roundoff; the exact sum of run_norms is at least (true
// r^2)(1 - gamma_E). So t >= bound (1 + 4(E + 2)u), t finite, implies that
// sum >= bound: the block would be skipped by the exact test too.
//
// The norm test: ||x|| and ||mu|| as computed are each within (E / 2 + 2)u
// of the truth (relative), so t = | ||x|| - ||mu|| | - kappa (||x|| + ||mu||)
// <= the true difference; t >= sqrt(bound (1 + kappa)) (1 + kappa) makes
// the true r^2 >= bound (1 + kappa), the Gram test's bound. The ball test
// has the same form with ||c - mu|| and rho (each a sum of E squares).
// All three are off when the margin is not small or the exact test is off.
template <typename acc_t>
struct PushTests {
  acc_t keep, gram_bound;   // Gram test
  acc_t kappa, norm_bound;  // norm test
  bool on;                  // off under L1, or when the margin is not small or the exact test is off
};
template <typename acc_t>
DISCLOSS_HD PushTests<acc_t> push_tests(acc_t exact_bound, int64_t E, int norm) {
  const acc_t u = sizeof(acc_t) == 4 ? acc_t(5.9604644775390625e-08) : acc_t(1.1102230246251565e-16);
  const acc_t kappa = acc_t(4) * acc_t(E + 2) * u;
  if (norm != 2 || !(kappa < acc_t(0.25)) || exact_bound != exact_bound) return {0, 0, 0, 0, false};
  const acc_t gram_bound = exact_bound * (acc_t(1) + kappa);
  return {acc_t(1) - kappa, gram_bound, kappa, std::sqrt(gram_bound) * (acc_t(1) + kappa), true};
}

// The ball test of the CUDA push, L1 and L2: a set of pixels within rho of
// a centre c (rho and dc = ||c - mu|| as computed) lies at least delta_d
// from mu, so that every q is 0 as the exact code computes it, when
// dc - rho - kappa (dc + rho) >= bound. L2: push_tests' norm test bound
// and margin (above). L1: dc and rho as computed are within (E + 1)u of
// the truth (relative), so the test makes the true distance >= delta_d (1 +
// kappa)^2 / (1 + kappa) and the exact sum, off by at most gamma_E, >=
// delta_d. Off (on = false) when the margin is not small or delta_d is not
// a normal number (below 1e-30, rounding is no longer relative). A NaN or
// inf in dc or rho fails the test.
template <typename acc_t>
struct BallTest {
  acc_t kappa, bound;
  bool on;
};
template <typename acc_t>
DISCLOSS_HD BallTest<acc_t> push_ball_test(acc_t delta_d, int64_t E, int norm) {
  if (norm == 2) {
    const PushTests<acc_t> t = push_tests(push_skip_bound(delta_d, 2), E, 2);
    return {t.kappa, t.norm_bound, t.on};
  }
  const acc_t u = sizeof(acc_t) == 4 ? acc_t(5.9604644775390625e-08) : acc_t(1.1102230246251565e-16);
  const acc_t kappa = acc_t(4) * acc_t(E + 2) * u;
  const bool on = kappa < acc_t(0.25) && delta_d >= acc_t(1e-30) && delta_d - delta_d == acc_t(0);
  return {kappa, delta_d * (acc_t(1) + kappa) * (acc_t(1) + kappa), on};
}
template <typename acc_t>
DISCLOSS_HD bool ball_rules_out(acc_t dc, acc_t rho, const BallTest<acc_t>& t) {
  return t.on && dc - rho - t.kappa * (dc + rho) >= t.bound;
}

// Pairs of means: norm terms summed (in component order) to at least this
// make ||a - b|| >= 2 delta_d as mean_distance computes it, so p = 0
// (mean_distance_or_far). L1: the sum is r, and 2 delta_d - r <= 0
// exactly. L2: push_skip_bound's argument with 2 delta_d, times (1 +
// kappa) (push_tests' Gram bound) so that the range fix, which recomputes
// an out-of-range r scaled, also lands at or above 2 delta_d. NaN: never.
template <typename acc_t>
DISCLOSS_HD acc_t pair_far_bound(acc_t delta_d, int64_t E, int norm) {
  if (norm == 1) return acc_t(2) * delta_d;
  const PushTests<acc_t> t = push_tests(push_skip_bound(acc_t(2) * delta_d, 2), E, 2);
  return t.on ? t.gram_bound : acc_t(NAN);
}

}  // namespace discloss
