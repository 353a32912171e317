// cluster_embeddings' parallel search (discloss/cluster.py, search="parallel") on CPU, fused: density
// peaks, mean shift of every peak, filing of the modes, nearest assignment with one Lloyd step, the
// neighbour vote, the split of instances that hold two fine modes (split_instances), the quick-shift
// refinement with its image vote (refine="quickshift") and the numbering, one image at a time in
// plain loops. The torch-op path in cluster.py does the same in
// about 600 small operations, whose dispatch (~9 us each) costs more than their arithmetic on one
// image; it stays the path for CUDA tensors and the reference the tests hold this one to. Each step
// below is that of the function of the same name there, with the same formulas (the expanded window
// tests 2 x.c - |x|^2 >= |c|^2 - r^2 of its matrix products), so the labels differ only where a
// distance ties a threshold to within rounding.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <optional>
#include <utility>
#include <vector>

namespace discloss {
namespace cpu {
namespace {

// The options of one call; thresholds in the compute type, rounded from the caller's doubles as
// torch rounds a Python float compared with a tensor.
template <typename scalar_t>
struct SearchConfig {
  int64_t dim, search_points, density_samples, most_seeds, steps, capacity, min_size, neighbours, split_samples;
  bool join_density;
  scalar_t min_density, bandwidth_sq, peak_threshold, merge_sq, satellite_sq, satellite_ratio, bridge_ratio,
      ambiguous_sq, delta_v_sq, valley_ratio, valley_radius_sq, valley_count_ratio, split_radius_sq,
      split_peak_threshold, split_count_ratio, split_confidence, refine_density_sq, refine_link_sq;
  // refine="quickshift" (refine_density_sq > 0): each point's flat pixel index in its image, of
  // shape `spatial`.
  std::vector<int64_t> spatial;
};

// One image's points (n x dim, row-major, grouped by image in cluster.py) and their squared norms.
template <typename scalar_t>
struct Image {
  const scalar_t* x;
  const int64_t* priority;
  const int64_t* rank;
  int64_t n;
  std::vector<scalar_t> squared;
  const int64_t* pixel = nullptr;  // refine="quickshift" only: each point's flat index in the image
  const scalar_t* row(int64_t i, int64_t dim) const { return x + i * dim; }
};

template <typename scalar_t>
scalar_t dot(const scalar_t* a, const scalar_t* b, int64_t dim) {
  scalar_t s = 0;
  for (int64_t e = 0; e < dim; ++e) s += a[e] * b[e];
  return s;
}

// _density_peaks: the sampled points (rank < density_samples, in point order) that no denser
// sampled point within peak radius beats; densest first (ties: higher priority), at most
// most_seeds. Reads the sample twice (densities, then peaks) from one (sample x sample) table.
template <typename scalar_t>
std::vector<int64_t> density_peaks(const Image<scalar_t>& im, const SearchConfig<scalar_t>& c) {
  const int64_t limit = std::min(c.density_samples, c.search_points);
  std::vector<int64_t> sample;
  for (int64_t i = 0; i < im.n; ++i)
    if (im.rank[i] < limit) sample.push_back(i);
  const int64_t s = static_cast<int64_t>(sample.size());
  // product[i][j] = bandwidth^2 - |x_i - x_j|^2 = [x_i, |x_i|^2, 1] . [2 x_j, -1, bandwidth^2 - |x_j|^2],
  // cluster.py's batched product, as one matrix product (ATen's, vectorized for the machine: the
  // table is most of this step's arithmetic).
  const int64_t width = c.dim + 2;
  at::Tensor left = at::empty({s, width}, at::CPU(c10::CppTypeToScalarType<scalar_t>::value));
  at::Tensor right = at::empty({width, s}, left.options());
  scalar_t* l = left.data_ptr<scalar_t>();
  scalar_t* r = right.data_ptr<scalar_t>();
  for (int64_t j = 0; j < s; ++j) {
    const scalar_t* x = im.row(sample[j], c.dim);
    for (int64_t e = 0; e < c.dim; ++e) {
      l[j * width + e] = x[e];
      r[e * s + j] = scalar_t(2) * x[e];
    }
    l[j * width + c.dim] = im.squared[sample[j]];
    l[j * width + c.dim + 1] = scalar_t(1);
    r[c.dim * s + j] = scalar_t(-1);
    r[(c.dim + 1) * s + j] = c.bandwidth_sq - im.squared[sample[j]];
  }
  const at::Tensor table = at::mm(left, right);
  const scalar_t* product = table.data_ptr<scalar_t>();
  const scalar_t scale = static_cast<scalar_t>(im.n) / static_cast<scalar_t>(std::max<int64_t>(s, 1));
  std::vector<scalar_t> density(s);
  std::vector<char> candidate(s);
  for (int64_t i = 0; i < s; ++i) {
    int64_t inside = 0;
    for (int64_t j = 0; j < s; ++j) inside += product[i * s + j] >= 0;
    density[i] = static_cast<scalar_t>(inside) * scale;
    candidate[i] = density[i] >= c.min_density;
  }
  auto denser = [&](int64_t j, int64_t i) {  // (density, priority) of j above i's
    return density[j] > density[i] || (density[j] == density[i] && im.priority[sample[j]] > im.priority[sample[i]]);
  };
  // Each candidate's place in the (density, priority) order as a value, s for the densest down to
  // 1, 0 for the rest (as cluster.py's): i is beaten when a point within the peak radius has a
  // higher value, one branch-free maximum per row (which vectorizes; testing the pairs one by one
  // until a denser one turns up costs 10x more where peaks are many).
  std::vector<int64_t> by_density;
  for (int64_t i = 0; i < s; ++i)
    if (candidate[i]) by_density.push_back(i);
  std::sort(by_density.begin(), by_density.end(), [&](int64_t a, int64_t b) { return denser(a, b); });
  std::vector<int32_t> value(s, 0);
  for (size_t place = 0; place < by_density.size(); ++place)
    value[by_density[place]] = static_cast<int32_t>(s - static_cast<int64_t>(place));
  std::vector<int64_t> peaks;
  for (const int64_t i : by_density) {
    const scalar_t* row = product + i * s;
    int32_t highest = 0;
    for (int64_t j = 0; j < s; ++j) highest = std::max(highest, row[j] >= c.peak_threshold ? value[j] : 0);
    if (highest <= value[i]) peaks.push_back(i);  // (i itself is within the radius: highest >= value[i])
  }
  if (static_cast<int64_t>(peaks.size()) > c.most_seeds) peaks.resize(c.most_seeds);
  for (auto& p : peaks) p = sample[p];
  return peaks;
}

// The searched points (rank < search_points) in structure-of-arrays layout, so that the window
// test of a centre against all of them vectorizes.
template <typename scalar_t>
struct SearchPoints {
  int64_t n = 0;
  std::vector<scalar_t> doubled;        // (dim, n): 2 x
  std::vector<scalar_t> minus_squared;  // (n,): -|x|^2
  std::vector<int64_t> index;           // (n,): the point in the image
};

template <typename scalar_t>
SearchPoints<scalar_t> search_points(const Image<scalar_t>& im, const SearchConfig<scalar_t>& c) {
  SearchPoints<scalar_t> sp;
  for (int64_t i = 0; i < im.n; ++i)
    if (im.rank[i] < c.search_points) sp.index.push_back(i);
  sp.n = static_cast<int64_t>(sp.index.size());
  sp.doubled.resize(static_cast<size_t>(c.dim * sp.n));
  sp.minus_squared.resize(sp.n);
  for (int64_t p = 0; p < sp.n; ++p) {
    const scalar_t* x = im.row(sp.index[p], c.dim);
    for (int64_t e = 0; e < c.dim; ++e) sp.doubled[e * sp.n + p] = scalar_t(2) * x[e];
    sp.minus_squared[p] = -im.squared[sp.index[p]];
  }
  return sp;
}

// _mean_shift_many for one centre: flat-kernel mean shift over the searched points until a step
// moves it no more (a fixed point: the same window gives the same mean) or `steps` steps; returns
// the points in its final window. Window sums in double.
template <typename scalar_t>
int64_t mean_shift(const Image<scalar_t>& im, const SearchPoints<scalar_t>& sp, const SearchConfig<scalar_t>& c,
                   std::vector<scalar_t>& centre, std::vector<scalar_t>& inside) {
  std::vector<double> sums(c.dim);
  std::vector<scalar_t> shifted(c.dim);
  int64_t count = 0;
  for (int64_t step = 0;; ++step) {
    const scalar_t limit = dot(centre.data(), centre.data(), c.dim) - c.bandwidth_sq;
    std::copy(sp.minus_squared.begin(), sp.minus_squared.end(), inside.begin());
    for (int64_t e = 0; e < c.dim; ++e) {
      const scalar_t ce = centre[e];
      const scalar_t* column = sp.doubled.data() + e * sp.n;
      for (int64_t p = 0; p < sp.n; ++p) inside[p] += ce * column[p];
    }
    count = 0;
    std::fill(sums.begin(), sums.end(), 0.0);
    for (int64_t p = 0; p < sp.n; ++p) {
      if (!(inside[p] >= limit)) continue;
      ++count;
      const scalar_t* x = im.row(sp.index[p], c.dim);
      for (int64_t e = 0; e < c.dim; ++e) sums[e] += x[e];
    }
    if (step == c.steps) break;
    const double divisor = static_cast<double>(std::max<int64_t>(count, 1));
    for (int64_t e = 0; e < c.dim; ++e) shifted[e] = static_cast<scalar_t>(sums[e] / divisor);
    if (shifted == centre) break;
    centre = shifted;
  }
  return count;
}

// _valleys for one pair: the searched points within the valley radius of mode a, of mode b and of
// the probes a quarter, half and three quarters of the way from a to b; a valley when a probe has
// fewer than valley_ratio times the smaller of the modes' counts. The window test as mean_shift's.
template <typename scalar_t>
bool valley_between(const SearchPoints<scalar_t>& sp, const SearchConfig<scalar_t>& c, const scalar_t* a,
                    const scalar_t* b) {
  std::vector<scalar_t> probe(c.dim), inside(sp.n);
  auto within = [&](const scalar_t* centre) {
    const scalar_t limit = dot(centre, centre, c.dim) - c.valley_radius_sq;
    std::copy(sp.minus_squared.begin(), sp.minus_squared.end(), inside.begin());
    for (int64_t e = 0; e < c.dim; ++e) {
      const scalar_t ce = centre[e];
      const scalar_t* column = sp.doubled.data() + e * sp.n;
      for (int64_t p = 0; p < sp.n; ++p) inside[p] += ce * column[p];
    }
    int64_t count = 0;
    for (int64_t p = 0; p < sp.n; ++p) count += inside[p] >= limit;
    return static_cast<scalar_t>(count);
  };
  const scalar_t ends = std::min(within(a), within(b));
  scalar_t lowest = std::numeric_limits<scalar_t>::infinity();
  for (const scalar_t t : {scalar_t(0.25), scalar_t(0.5), scalar_t(0.75)}) {
    for (int64_t e = 0; e < c.dim; ++e) probe[e] = a[e] + t * (b[e] - a[e]);
    lowest = std::min(lowest, within(probe.data()));
  }
  return lowest < c.valley_ratio * ends;
}

// _file_modes: the modes in descending window count (ties: seed order) become instances unless an
// earlier new mode lies within delta_d (join), or with join_density within 2 delta_d and
// satellite_ratio times denser (satellite), or two earlier new modes each bridge_ratio times denser
// have the mode within the window of their segment (bridge); with join_density, a mode never joins
// (nor bridges from) an earlier mode from which a density valley separates it (valley_between,
// tested only within 2 delta_d and for counts less than valley_count_ratio apart; each pair at most
// once, when a rule would use it). The first `capacity` new modes are kept. Distances from the Gram
// matrix, as cluster.py.
template <typename scalar_t>
std::vector<std::vector<scalar_t>> file_modes(const SearchPoints<scalar_t>& sp,
                                              const std::vector<std::vector<scalar_t>>& modes,
                                              const std::vector<int64_t>& counts, const SearchConfig<scalar_t>& c) {
  const int64_t s = static_cast<int64_t>(modes.size());
  std::vector<int64_t> order(s);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return counts[a] > counts[b]; });
  std::vector<scalar_t> gram(static_cast<size_t>(s * s));
  for (int64_t i = 0; i < s; ++i)
    for (int64_t j = 0; j < s; ++j) gram[i * s + j] = dot(modes[order[i]].data(), modes[order[j]].data(), c.dim);
  auto g = [&](int64_t i, int64_t j) { return gram[i * s + j]; };
  auto distance_sq = [&](int64_t i, int64_t j) { return (g(i, i) + g(j, j)) - scalar_t(2) * g(i, j); };
  auto count = [&](int64_t i) { return static_cast<scalar_t>(counts[order[i]]); };
  auto on_bridge = [&](int64_t i, int64_t k, int64_t j) {  // mode j near the segment from mode i to mode k
    const scalar_t product = ((g(k, j) - g(i, j)) - g(i, k)) + g(i, i);
    const scalar_t along = product / std::max(distance_sq(i, k), std::numeric_limits<scalar_t>::min());
    const scalar_t off_sq = distance_sq(i, j) - along * product;
    return along > 0 && along < 1 && off_sq <= c.bandwidth_sq;
  };
  std::vector<signed char> valleys(static_cast<size_t>(s * s), -1);  // -1: not tested yet
  auto valley = [&](int64_t i, int64_t j) {  // i before j
    if (!c.join_density || !(c.valley_ratio > 0)) return false;
    signed char& known = valleys[i * s + j];
    if (known < 0)
      known = distance_sq(i, j) <= c.satellite_sq && count(i) < c.valley_count_ratio * count(j) &&
              valley_between(sp, c, modes[order[i]].data(), modes[order[j]].data());
    return known > 0;
  };
  std::vector<int64_t> found;
  std::vector<std::vector<scalar_t>> centres;
  for (int64_t j = 0; j < s && static_cast<int64_t>(centres.size()) < c.capacity; ++j) {
    bool joins = false;
    for (int64_t i : found) {
      const scalar_t d2 = distance_sq(i, j);
      joins = (d2 <= c.merge_sq ||
               (c.join_density && d2 <= c.satellite_sq && count(i) >= c.satellite_ratio * count(j))) &&
              !valley(i, j);
      if (joins) break;
    }
    if (!joins && c.join_density) {
      for (size_t a = 0; a < found.size() && !joins; ++a) {
        if (!(count(found[a]) >= c.bridge_ratio * count(j))) continue;
        for (size_t b = 0; b < found.size() && !joins; ++b)
          joins = a != b && count(found[b]) >= c.bridge_ratio * count(j) && on_bridge(found[a], found[b], j) &&
                  !valley(found[a], j) && !valley(found[b], j);
      }
    }
    if (joins) continue;
    found.push_back(j);
    centres.push_back(modes[order[j]]);
  }
  return centres;
}

// 2 x.c - |c|^2 (= |x|^2 - |x - c|^2: larger is nearer) of every point to every centre, (n, K).
template <typename scalar_t>
void closeness(const Image<scalar_t>& im, const std::vector<std::vector<scalar_t>>& centres, int64_t dim,
               std::vector<scalar_t>& out) {
  const int64_t k_count = static_cast<int64_t>(centres.size());
  std::vector<scalar_t> doubled(static_cast<size_t>(k_count * dim)), minus_squared(k_count);
  for (int64_t k = 0; k < k_count; ++k) {
    for (int64_t e = 0; e < dim; ++e) doubled[k * dim + e] = scalar_t(2) * centres[k][e];
    minus_squared[k] = -dot(centres[k].data(), centres[k].data(), dim);
  }
  out.resize(static_cast<size_t>(im.n * k_count));
  for (int64_t p = 0; p < im.n; ++p)
    for (int64_t k = 0; k < k_count; ++k) out[p * k_count + k] = dot(im.row(p, dim), &doubled[k * dim], dim) + minus_squared[k];
}

// The nearest allowed centre of point p (first of equals), -1 when none is allowed.
template <typename scalar_t>
int64_t nearest_allowed(const scalar_t* row, const std::vector<char>& allowed) {
  int64_t best = -1;
  for (int64_t k = 0; k < static_cast<int64_t>(allowed.size()); ++k)
    if (allowed[k] && (best < 0 || row[k] > row[best])) best = k;
  return best;
}

template <typename scalar_t>
std::vector<int64_t> slot_sizes(const std::vector<int64_t>& slot, int64_t k_count) {
  std::vector<int64_t> sizes(k_count, 0);
  for (int64_t s : slot)
    if (s >= 0) ++sizes[s];
  return sizes;
}

// centres[k] = the mean of the points in slot k (summed in double), for every slot that has one;
// the centres of empty slots are left as they are.
template <typename scalar_t>
void move_to_slot_means(const Image<scalar_t>& im, const std::vector<int64_t>& slot, int64_t dim,
                        std::vector<std::vector<scalar_t>>& centres) {
  const int64_t k_count = static_cast<int64_t>(centres.size());
  std::vector<double> sums(static_cast<size_t>(k_count * dim), 0.0);
  for (int64_t p = 0; p < im.n; ++p) {
    if (slot[p] < 0) continue;
    const scalar_t* x = im.row(p, dim);
    for (int64_t e = 0; e < dim; ++e) sums[slot[p] * dim + e] += x[e];
  }
  const std::vector<int64_t> sizes = slot_sizes<scalar_t>(slot, k_count);
  for (int64_t k = 0; k < k_count; ++k)
    if (sizes[k] > 0)
      for (int64_t e = 0; e < dim; ++e)
        centres[k][e] = static_cast<scalar_t>(sums[k * dim + e] / static_cast<double>(sizes[k]));
}

// _assign_to_nearest: every point to its nearest mode; modes with fewer than min_size points in
// their window or nearest to them dropped (their points to the nearest kept mode); then one Lloyd
// step (kept centres to their points' mean, every point to the nearest moved centre). Leaves
// `near` = the closeness to the moved centres, `kept` without centres left empty.
template <typename scalar_t>
void assign_to_nearest(const Image<scalar_t>& im, const SearchConfig<scalar_t>& c,
                       std::vector<std::vector<scalar_t>>& centres, std::vector<int64_t>& slot, std::vector<char>& kept,
                       std::vector<scalar_t>& near) {
  const int64_t k_count = static_cast<int64_t>(centres.size());
  const int64_t least = std::max<int64_t>(c.min_size, 1);
  closeness(im, centres, c.dim, near);
  std::vector<int64_t> in_window(k_count, 0);
  std::vector<char> all(k_count, 1);
  slot.assign(im.n, -1);
  for (int64_t p = 0; p < im.n; ++p) {
    const scalar_t* row = &near[p * k_count];
    const scalar_t edge = im.squared[p] - c.bandwidth_sq;
    for (int64_t k = 0; k < k_count; ++k) in_window[k] += row[k] >= edge;
    slot[p] = nearest_allowed(row, all);
  }
  kept.assign(k_count, 0);
  for (int64_t k = 0; k < k_count; ++k) kept[k] = in_window[k] >= least;
  std::vector<int64_t> nearest_kept(k_count, 0);
  for (int64_t s : slot)
    if (s >= 0 && kept[s]) ++nearest_kept[s];
  for (int64_t k = 0; k < k_count; ++k) kept[k] = kept[k] && nearest_kept[k] >= least;
  for (int64_t p = 0; p < im.n; ++p) slot[p] = nearest_allowed(&near[p * k_count], kept);
  // The Lloyd step.
  move_to_slot_means(im, slot, c.dim, centres);
  closeness(im, centres, c.dim, near);
  for (int64_t p = 0; p < im.n; ++p) slot[p] = nearest_allowed(&near[p * k_count], kept);
  const std::vector<int64_t> moved = slot_sizes<scalar_t>(slot, k_count);
  for (int64_t k = 0; k < k_count; ++k) kept[k] = kept[k] && moved[k] > 0;
}

// _ambiguous: the points whose nearest kept centre is not clearly nearer than the second (squared
// distance ratio >= ambiguous_sq), in point order; `near` is the closeness of every point to every
// centre (closeness()).
template <typename scalar_t>
std::vector<int64_t> ambiguous_points(const Image<scalar_t>& im, const SearchConfig<scalar_t>& c,
                                      const std::vector<char>& kept, const std::vector<scalar_t>& near) {
  const int64_t k_count = static_cast<int64_t>(kept.size());
  std::vector<int64_t> asking;
  for (int64_t p = 0; p < im.n; ++p) {
    const scalar_t* row = &near[p * k_count];
    const int64_t best = nearest_allowed(row, kept);
    if (best < 0) continue;
    scalar_t second = -std::numeric_limits<scalar_t>::infinity();
    for (int64_t k = 0; k < k_count; ++k)
      if (kept[k] && k != best) second = std::max(second, row[k]);
    const scalar_t nearest_sq = im.squared[p] - row[best];
    const scalar_t second_sq = im.squared[p] - second;
    if (std::isfinite(second_sq) && nearest_sq >= c.ambiguous_sq * second_sq) asking.push_back(p);
  }
  return asking;
}

// _neighbour_vote: a point whose nearest kept centre is not clearly nearer than the second
// (squared ratio >= ambiguous_sq) takes the slot most common among its `neighbours` nearest
// searched points (fewest slot first among equals), twice; each round reads the slots of the
// round before.
template <typename scalar_t>
void neighbour_vote(const Image<scalar_t>& im, const SearchConfig<scalar_t>& c, std::vector<int64_t>& slot,
                    std::vector<char>& kept, const std::vector<scalar_t>& near) {
  const int64_t k_count = static_cast<int64_t>(kept.size());
  const std::vector<int64_t> asking = ambiguous_points(im, c, kept, near);
  if (asking.empty()) return;
  std::vector<int64_t> reference;
  for (int64_t i = 0; i < im.n; ++i)
    if (im.rank[i] < c.search_points) reference.push_back(i);
  const int64_t r_count = static_cast<int64_t>(reference.size());
  const int64_t k = std::min<int64_t>(c.neighbours, r_count);
  std::vector<scalar_t> minus_doubled(static_cast<size_t>(r_count * c.dim));
  for (int64_t r = 0; r < r_count; ++r)
    for (int64_t e = 0; e < c.dim; ++e) minus_doubled[r * c.dim + e] = scalar_t(-2) * im.row(reference[r], c.dim)[e];
  // |r|^2 - 2 x.r ranks the reference points by distance to x.
  std::vector<int64_t> voters(asking.size() * k);
  std::vector<std::pair<scalar_t, int64_t>> distance(r_count);
  for (size_t a = 0; a < asking.size(); ++a) {
    const scalar_t* x = im.row(asking[a], c.dim);
    for (int64_t r = 0; r < r_count; ++r)
      distance[r] = {dot(x, &minus_doubled[r * c.dim], c.dim) + im.squared[reference[r]], r};
    std::partial_sort(distance.begin(), distance.begin() + k, distance.end());
    for (int64_t v = 0; v < k; ++v) voters[a * k + v] = reference[distance[v].second];
  }
  std::vector<int64_t> votes(k_count), decided(asking.size());
  for (int round = 0; round < 2; ++round) {
    for (size_t a = 0; a < asking.size(); ++a) {
      std::fill(votes.begin(), votes.end(), 0);
      for (int64_t v = 0; v < k; ++v) ++votes[std::max<int64_t>(slot[voters[a * k + v]], 0)];
      decided[a] = std::max_element(votes.begin(), votes.end()) - votes.begin();
    }
    for (size_t a = 0; a < asking.size(); ++a) slot[asking[a]] = decided[a];
  }
  const std::vector<int64_t> sizes = slot_sizes<scalar_t>(slot, k_count);
  for (int64_t s = 0; s < k_count; ++s) kept[s] = kept[s] && sizes[s] > 0;
}

// _number_instances: ids 1.. in slot order of the kept centres, and each instance's fraction of
// points within delta_v of its centre.
template <typename scalar_t>
int64_t number_instances(const Image<scalar_t>& im, const SearchConfig<scalar_t>& c,
                         const std::vector<std::vector<scalar_t>>& centres, const std::vector<int64_t>& slot,
                         const std::vector<char>& kept, int64_t* ids, float* scores) {
  const int64_t k_count = static_cast<int64_t>(kept.size());
  std::vector<int64_t> new_id(k_count, 0), totals(k_count, 0), hits(k_count, 0);
  int64_t next = 0;
  for (int64_t k = 0; k < k_count; ++k)
    if (kept[k]) new_id[k] = ++next;
  for (int64_t p = 0; p < im.n; ++p) {
    ids[p] = slot[p] >= 0 ? new_id[slot[p]] : 0;
    if (slot[p] < 0) continue;
    const scalar_t* x = im.row(p, c.dim);
    scalar_t d2 = 0;
    for (int64_t e = 0; e < c.dim; ++e) d2 += (x[e] - centres[slot[p]][e]) * (x[e] - centres[slot[p]][e]);
    ++totals[slot[p]];
    hits[slot[p]] += d2 <= c.delta_v_sq;
  }
  for (int64_t k = 0; k < k_count; ++k)
    if (kept[k])
      scores[new_id[k] - 1] =
          static_cast<float>(static_cast<scalar_t>(hits[k]) / std::max<scalar_t>(static_cast<scalar_t>(totals[k]), 1));
  return next;
}

// _split_instances, the searched instances as _split_groups picks them: those of at least the lower
// median size among the image's kept instances, with fewer than split_confidence of their points
// within delta_v of their centre and at least 2 * max(min_size, 1) searched points.
template <typename scalar_t>
std::vector<int64_t> split_candidates(const Image<scalar_t>& im, const SearchConfig<scalar_t>& c,
                                      const std::vector<std::vector<scalar_t>>& centres,
                                      const std::vector<int64_t>& slot, const std::vector<char>& kept) {
  const int64_t k_count = static_cast<int64_t>(kept.size());
  const int64_t least = std::max<int64_t>(c.min_size, 1);
  const std::vector<int64_t> sizes = slot_sizes<scalar_t>(slot, k_count);
  std::vector<int64_t> searched(k_count, 0), near(k_count, 0), kept_sizes;
  for (int64_t p = 0; p < im.n; ++p) {
    if (slot[p] < 0) continue;
    if (im.rank[p] < c.search_points) ++searched[slot[p]];
    const scalar_t* x = im.row(p, c.dim);
    const std::vector<scalar_t>& centre = centres[slot[p]];
    scalar_t d2 = 0;
    for (int64_t e = 0; e < c.dim; ++e) d2 += (x[e] - centre[e]) * (x[e] - centre[e]);
    near[slot[p]] += d2 <= c.delta_v_sq;
  }
  for (int64_t k = 0; k < k_count; ++k)
    if (kept[k]) kept_sizes.push_back(sizes[k]);
  std::vector<int64_t> candidates;
  if (kept_sizes.empty()) return candidates;
  std::sort(kept_sizes.begin(), kept_sizes.end());
  const int64_t median = kept_sizes[(kept_sizes.size() - 1) / 2];
  for (int64_t k = 0; k < k_count; ++k)
    if (kept[k] && sizes[k] >= median && searched[k] >= 2 * least &&
        static_cast<scalar_t>(near[k]) < c.split_confidence * static_cast<scalar_t>(sizes[k]))
      candidates.push_back(k);
  return candidates;
}

// _separate_modes: the fine modes in descending window count (stable); the first is kept, a later
// one when its count is at least split_count_ratio times the first's and at least max(min_size, 1),
// and it lies at least delta_v from every mode kept before it with a valley between them
// (valley_between at the fine window). Returns the kept modes' indices, densest first.
template <typename scalar_t>
std::vector<int64_t> separate_modes(const SearchPoints<scalar_t>& sp, const SearchConfig<scalar_t>& fine,
                                    const std::vector<std::vector<scalar_t>>& modes,
                                    const std::vector<int64_t>& counts) {
  const int64_t s = static_cast<int64_t>(modes.size());
  std::vector<int64_t> order(s), kept;
  if (s == 0) return kept;
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return counts[a] > counts[b]; });
  const scalar_t densest = static_cast<scalar_t>(counts[order[0]]);
  kept.push_back(order[0]);
  for (int64_t r = 1; r < s; ++r) {
    const int64_t j = order[r];
    bool keep = static_cast<scalar_t>(counts[j]) >= fine.split_count_ratio * densest &&
                counts[j] >= std::max<int64_t>(fine.min_size, 1);
    for (size_t a = 0; a < kept.size() && keep; ++a) {
      const std::vector<scalar_t>& m = modes[kept[a]];
      scalar_t d2 = 0;
      for (int64_t e = 0; e < fine.dim; ++e) d2 += (modes[j][e] - m[e]) * (modes[j][e] - m[e]);
      keep = d2 >= fine.delta_v_sq && valley_between(sp, fine, m.data(), modes[j].data());
    }
    if (keep) kept.push_back(j);
  }
  return kept;
}

// The modes of an image (or of a group of its points): mean shift from each
// density peak, with the points within the window of each mode at the end.
template <typename scalar_t>
struct ShiftedModes {
  SearchPoints<scalar_t> sp;
  std::vector<std::vector<scalar_t>> modes;
  std::vector<int64_t> counts;
};

template <typename scalar_t>
ShiftedModes<scalar_t> shifted_modes(const Image<scalar_t>& im, const SearchConfig<scalar_t>& c) {
  const std::vector<int64_t> seeds = density_peaks(im, c);
  ShiftedModes<scalar_t> out{search_points(im, c), {}, {}};
  std::vector<scalar_t> inside(out.sp.n);
  for (int64_t seed : seeds) {
    std::vector<scalar_t> centre(im.row(seed, c.dim), im.row(seed, c.dim) + c.dim);
    out.counts.push_back(mean_shift(im, out.sp, c, centre, inside));
    out.modes.push_back(std::move(centre));
  }
  return out;
}

// _split_instances: each candidate instance's searched points are searched again at the fine window
// (density peaks and mean shift as above, with split_radius_sq for bandwidth_sq); with two or more
// kept fine modes its points go to the nearest, one Lloyd step, the nearest again; the densest
// mode keeps the slot, the others take new slots after the last while fewer than `capacity`
// instances are kept. Widens `centres` and `kept`.
template <typename scalar_t>
void split_instances(const Image<scalar_t>& im, const SearchConfig<scalar_t>& c,
                     std::vector<std::vector<scalar_t>>& centres, std::vector<int64_t>& slot, std::vector<char>& kept) {
  const std::vector<int64_t> candidates = split_candidates(im, c, centres, slot, kept);
  int64_t room = c.capacity - std::count(kept.begin(), kept.end(), char(1));
  SearchConfig<scalar_t> fine = c;
  fine.bandwidth_sq = c.split_radius_sq;
  fine.peak_threshold = c.split_peak_threshold;
  fine.valley_radius_sq = c.split_radius_sq;
  for (const int64_t k : candidates) {
    // The instance's searched points as an image of their own: every one searched, the first
    // split_samples in the hashed order sampled for the density peaks.
    std::vector<int64_t> members;
    for (int64_t p = 0; p < im.n; ++p)
      if (slot[p] == k && im.rank[p] < c.search_points) members.push_back(p);
    const int64_t m = static_cast<int64_t>(members.size());
    std::vector<scalar_t> x(static_cast<size_t>(m * c.dim));
    std::vector<int64_t> priority(m), rank(m), by_priority(m);
    for (int64_t i = 0; i < m; ++i) {
      std::copy(im.row(members[i], c.dim), im.row(members[i], c.dim) + c.dim, x.begin() + i * c.dim);
      priority[i] = im.priority[members[i]];
    }
    std::iota(by_priority.begin(), by_priority.end(), 0);
    std::sort(by_priority.begin(), by_priority.end(),
              [&](int64_t a, int64_t b) { return priority[a] > priority[b]; });
    for (int64_t r = 0; r < m; ++r) rank[by_priority[r]] = r;
    Image<scalar_t> group{x.data(), priority.data(), rank.data(), m, {}};
    group.squared.resize(m);
    for (int64_t i = 0; i < m; ++i) group.squared[i] = im.squared[members[i]];
    fine.density_samples = c.split_samples;
    fine.search_points = m;
    const ShiftedModes<scalar_t> found = shifted_modes(group, fine);
    const std::vector<std::vector<scalar_t>>& modes = found.modes;
    std::vector<int64_t> chosen = separate_modes(found.sp, fine, modes, found.counts);
    if (static_cast<int64_t>(chosen.size()) > room + 1) chosen.resize(std::max<int64_t>(room, 0) + 1);
    if (chosen.size() < 2) continue;
    room -= static_cast<int64_t>(chosen.size()) - 1;
    // The instance's points (all of them) to the nearest chosen mode, one Lloyd step, the nearest
    // again.
    std::vector<std::vector<scalar_t>> fine_centres;
    for (int64_t j : chosen) fine_centres.push_back(modes[j]);
    std::vector<int64_t> mine;
    for (int64_t p = 0; p < im.n; ++p)
      if (slot[p] == k) mine.push_back(p);
    const int64_t f_count = static_cast<int64_t>(fine_centres.size());
    std::vector<int64_t> part(mine.size());
    auto nearest = [&]() {
      std::vector<scalar_t> doubled(static_cast<size_t>(f_count * c.dim)), minus_squared(f_count);
      for (int64_t f = 0; f < f_count; ++f) {
        for (int64_t e = 0; e < c.dim; ++e) doubled[f * c.dim + e] = scalar_t(2) * fine_centres[f][e];
        minus_squared[f] = -dot(fine_centres[f].data(), fine_centres[f].data(), c.dim);
      }
      for (size_t i = 0; i < mine.size(); ++i) {
        int64_t best = 0;
        scalar_t best_value = -std::numeric_limits<scalar_t>::infinity();
        for (int64_t f = 0; f < f_count; ++f) {
          const scalar_t value = dot(im.row(mine[i], c.dim), &doubled[f * c.dim], c.dim) + minus_squared[f];
          if (value > best_value) best = f, best_value = value;
        }
        part[i] = best;
      }
    };
    nearest();
    std::vector<double> sums(static_cast<size_t>(f_count * c.dim), 0.0);
    std::vector<int64_t> sizes(f_count, 0);
    for (size_t i = 0; i < mine.size(); ++i) {
      ++sizes[part[i]];
      for (int64_t e = 0; e < c.dim; ++e) sums[part[i] * c.dim + e] += im.row(mine[i], c.dim)[e];
    }
    for (int64_t f = 0; f < f_count; ++f)
      if (sizes[f] > 0)
        for (int64_t e = 0; e < c.dim; ++e)
          fine_centres[f][e] = static_cast<scalar_t>(sums[f * c.dim + e] / static_cast<double>(sizes[f]));
    nearest();
    std::vector<int64_t> target(f_count, k);
    for (int64_t f = 1; f < f_count; ++f) {
      target[f] = static_cast<int64_t>(centres.size());
      centres.push_back(fine_centres[f]);
      kept.push_back(0);
    }
    centres[k] = fine_centres[0];
    for (size_t i = 0; i < mine.size(); ++i) slot[mine[i]] = target[part[i]];
    const std::vector<int64_t> now = slot_sizes<scalar_t>(slot, static_cast<int64_t>(kept.size()));
    for (int64_t f = 0; f < f_count; ++f) kept[target[f]] = now[target[f]] > 0;
  }
}

// _quick_shift_links and _follow_parents for one image: each ambiguous point's density (the searched
// points within the density radius), its parent (the nearest searched point within the link radius
// with a strictly higher density; ties: the lower index) and, in descending density, the parent's
// slot. Without a (points x points) table: the searched points are sorted by slot, then by their
// distance to their slot's mean, so that those within a reach of a point lie in one run per slot
// (the triangle inequality: |d(r, mean) - d(x, mean)| <= d(x, r); a 1% margin for rounding): for an
// ambiguous point the link radius, mostly the two instances it lies between; for a candidate
// parent the density radius. A searched point's density is counted only when it is a candidate
// parent, nearest first until a denser one turns up (the torch path counts them all; the parents
// are the same). Every count is the window test of mean_shift with the same arithmetic per pair in
// the same order, so a point's count does not depend on the runs passed over.
template <typename scalar_t>
void follow_quick_shift(const Image<scalar_t>& im, const SearchPoints<scalar_t>& sp, const SearchConfig<scalar_t>& c,
                        const std::vector<std::vector<scalar_t>>& means, const std::vector<int64_t>& asking,
                        std::vector<int64_t>& slot) {
  const int64_t k_count = static_cast<int64_t>(means.size());
  auto distance = [&](const scalar_t* x, const std::vector<scalar_t>& m) {
    double d2 = 0;
    for (int64_t e = 0; e < c.dim; ++e) d2 += (static_cast<double>(x[e]) - m[e]) * (static_cast<double>(x[e]) - m[e]);
    return std::sqrt(d2);
  };
  // The searched points with a slot, sorted by (slot, distance to its mean), in the layout of
  // SearchPoints.
  std::vector<int64_t> sorted;
  std::vector<double> to_mean(sp.n);
  for (int64_t r = 0; r < sp.n; ++r) {
    const int64_t k = slot[sp.index[r]];
    if (k < 0) continue;
    sorted.push_back(r);
    to_mean[r] = distance(im.row(sp.index[r], c.dim), means[k]);
  }
  std::stable_sort(sorted.begin(), sorted.end(), [&](int64_t x, int64_t y) {
    const int64_t kx = slot[sp.index[x]], ky = slot[sp.index[y]];
    return kx < ky || (kx == ky && to_mean[x] < to_mean[y]);
  });
  const int64_t n = static_cast<int64_t>(sorted.size());
  std::vector<scalar_t> doubled(static_cast<size_t>(c.dim * n)), minus_squared(n);
  std::vector<double> key(n);
  std::vector<int64_t> point(n), group_start(k_count + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = sorted[i];
    for (int64_t e = 0; e < c.dim; ++e) doubled[e * n + i] = sp.doubled[e * sp.n + r];
    minus_squared[i] = sp.minus_squared[r];
    key[i] = to_mean[r];
    point[i] = sp.index[r];
    ++group_start[slot[sp.index[r]] + 1];
  }
  for (int64_t k = 0; k < k_count; ++k) group_start[k + 1] += group_start[k];
  // The runs of the sorted points that may lie within `reach` of x (a 1% margin for rounding).
  auto runs_within = [&](const scalar_t* x, double reach, std::vector<std::pair<int64_t, int64_t>>& runs) {
    reach = reach * 1.01 + 1e-3;
    runs.clear();
    for (int64_t k = 0; k < k_count; ++k) {
      if (group_start[k] == group_start[k + 1]) continue;
      const double centre = distance(x, means[k]);
      const auto first =
          std::lower_bound(key.begin() + group_start[k], key.begin() + group_start[k + 1], centre - reach);
      const auto last = std::upper_bound(first, key.begin() + group_start[k + 1], centre + reach);
      if (first < last) runs.emplace_back(first - key.begin(), last - key.begin());
    }
  };
  // 2 x.r - |r|^2 (= |x|^2 - |x - r|^2) of x to the sorted points of the runs, into `out` at their
  // places: the window test of mean_shift, the same arithmetic per pair whatever the runs.
  auto closeness_over = [&](const scalar_t* x, const std::vector<std::pair<int64_t, int64_t>>& runs,
                            std::vector<scalar_t>& out) {
    for (const auto& [first, last] : runs) {
      std::copy(minus_squared.begin() + first, minus_squared.begin() + last, out.begin() + first);
      for (int64_t e = 0; e < c.dim; ++e) {
        const scalar_t xe = x[e];
        const scalar_t* column = doubled.data() + e * n;
        for (int64_t i = first; i < last; ++i) out[i] += xe * column[i];
      }
    }
  };
  auto count_over = [&](const std::vector<std::pair<int64_t, int64_t>>& runs, const std::vector<scalar_t>& values,
                        scalar_t limit) {
    int64_t count = 0;
    for (const auto& [first, last] : runs)
      for (int64_t i = first; i < last; ++i) count += values[i] >= limit;
    return count;
  };
  const double link = std::sqrt(static_cast<double>(c.refine_link_sq));
  const double radius = std::sqrt(static_cast<double>(c.refine_density_sq));
  std::vector<std::pair<int64_t, int64_t>> runs, candidate_runs;
  std::vector<scalar_t> inside(n), candidate_inside(n);
  std::vector<int64_t> searched_density(n, -1);  // per sorted point, -1: not counted yet
  const int64_t a_count = static_cast<int64_t>(asking.size());
  std::vector<int64_t> density(a_count), parent(a_count, -1);
  std::vector<std::pair<scalar_t, int64_t>> candidates;  // (-closeness, point * n + place): nearest, then lower index
  for (int64_t a = 0; a < a_count; ++a) {
    const scalar_t* x = im.row(asking[a], c.dim);
    runs_within(x, std::max(link, radius), runs);
    closeness_over(x, runs, inside);
    density[a] = count_over(runs, inside, im.squared[asking[a]] - c.refine_density_sq);
    const scalar_t link_limit = im.squared[asking[a]] - c.refine_link_sq;
    candidates.clear();
    for (const auto& [first, last] : runs)
      for (int64_t i = first; i < last; ++i)
        if (inside[i] >= link_limit) candidates.emplace_back(-inside[i], point[i] * n + i);
    // Nearest first: most ambiguous points find a denser one among their few nearest.
    const size_t head = std::min<size_t>(candidates.size(), 16);
    std::partial_sort(candidates.begin(), candidates.begin() + head, candidates.end());
    for (size_t index = 0; index < candidates.size(); ++index) {
      if (index == head) std::sort(candidates.begin() + head, candidates.end());
      const int64_t i = candidates[index].second % n;
      if (searched_density[i] < 0) {
        const scalar_t* y = im.row(point[i], c.dim);
        runs_within(y, radius, candidate_runs);
        closeness_over(y, candidate_runs, candidate_inside);
        searched_density[i] = count_over(candidate_runs, candidate_inside, im.squared[point[i]] - c.refine_density_sq);
      }
      if (searched_density[i] > density[a]) {
        parent[a] = point[i];
        break;
      }
    }
  }
  // A parent is strictly denser than its child: in descending density, it is final when read.
  std::vector<int64_t> order(a_count);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return density[x] > density[y]; });
  for (const int64_t a : order)
    if (parent[a] >= 0) slot[asking[a]] = slot[parent[a]];
}

// _image_vote: each point whose slot differs from `before` takes the slot most common among the
// foreground pixels of its 3^d image window (itself included) when one is more common than every
// other; every point reads the slots as they were before the vote.
template <typename scalar_t>
void image_vote(const Image<scalar_t>& im, const SearchConfig<scalar_t>& c, const std::vector<int64_t>& before,
                std::vector<int64_t>& slot, int64_t k_count) {
  std::vector<int64_t> changed;
  for (int64_t p = 0; p < im.n; ++p)
    if (slot[p] != before[p]) changed.push_back(p);
  if (changed.empty()) return;
  const int64_t d = static_cast<int64_t>(c.spatial.size());
  std::vector<int64_t> strides(d, 1);
  for (int64_t axis = d - 2; axis >= 0; --axis) strides[axis] = strides[axis + 1] * (c.spatial[axis + 1] + 2);
  std::vector<int64_t> offsets{0};
  for (int64_t axis = 0; axis < d; ++axis) {
    std::vector<int64_t> wider;
    for (const int64_t o : offsets)
      for (int64_t step = -1; step <= 1; ++step) wider.push_back(o + step * strides[axis]);
    offsets.swap(wider);
  }
  auto padded_index = [&](int64_t pixel) {
    int64_t where = 0;
    for (int64_t axis = d - 1; axis >= 0; --axis) {
      where += (pixel % c.spatial[axis] + 1) * strides[axis];
      pixel /= c.spatial[axis];
    }
    return where;
  };
  std::vector<int32_t> grid(static_cast<size_t>(strides[0] * (c.spatial[0] + 2)), 0);  // slot + 1; 0: none
  for (int64_t p = 0; p < im.n; ++p) grid[padded_index(im.pixel[p])] = static_cast<int32_t>(slot[p] + 1);
  std::vector<int64_t> votes(k_count + 1), decided(changed.size());
  for (size_t i = 0; i < changed.size(); ++i) {
    std::fill(votes.begin(), votes.end(), 0);
    const int64_t centre = padded_index(im.pixel[changed[i]]);
    for (const int64_t o : offsets) ++votes[grid[centre + o]];
    votes[0] = 0;
    const int64_t winner = std::max_element(votes.begin(), votes.end()) - votes.begin();
    const bool single = std::count(votes.begin(), votes.end(), votes[winner]) == 1;
    decided[i] = single && votes[winner] > 0 ? winner - 1 : slot[changed[i]];
  }
  for (size_t i = 0; i < changed.size(); ++i) slot[changed[i]] = decided[i];
}

// _refine_quickshift: the ambiguous points against the means of the instances as they stand follow
// their quick-shift parents among the searched points (follow_quick_shift), then the points whose
// slot changed are voted on by their image windows (image_vote); `kept` loses the slots left
// empty.
template <typename scalar_t>
void refine_quickshift(const Image<scalar_t>& im, const SearchPoints<scalar_t>& sp, const SearchConfig<scalar_t>& c,
                       std::vector<int64_t>& slot, std::vector<char>& kept) {
  const int64_t k_count = static_cast<int64_t>(kept.size());
  std::vector<std::vector<scalar_t>> means(k_count, std::vector<scalar_t>(c.dim, scalar_t(0)));
  move_to_slot_means(im, slot, c.dim, means);
  std::vector<scalar_t> near;
  closeness(im, means, c.dim, near);
  const std::vector<int64_t> asking = ambiguous_points(im, c, kept, near);
  if (asking.empty()) return;
  const std::vector<int64_t> before = slot;
  follow_quick_shift(im, sp, c, means, asking, slot);
  image_vote(im, c, before, slot, k_count);
  const std::vector<int64_t> now = slot_sizes<scalar_t>(slot, k_count);
  for (int64_t k = 0; k < k_count; ++k) kept[k] = kept[k] && now[k] > 0;
}

template <typename scalar_t>
int64_t cluster_image(Image<scalar_t>& im, const SearchConfig<scalar_t>& c, int64_t* ids, float* scores) {
  im.squared.resize(im.n);
  for (int64_t p = 0; p < im.n; ++p) im.squared[p] = dot(im.row(p, c.dim), im.row(p, c.dim), c.dim);
  const ShiftedModes<scalar_t> found = shifted_modes(im, c);
  std::vector<std::vector<scalar_t>> centres = file_modes(found.sp, found.modes, found.counts, c);
  std::vector<int64_t> slot;
  std::vector<char> kept;
  std::vector<scalar_t> near;
  assign_to_nearest(im, c, centres, slot, kept, near);
  if (c.neighbours > 0) neighbour_vote(im, c, slot, kept, near);
  if (c.split_radius_sq > 0) split_instances(im, c, centres, slot, kept);
  if (c.refine_density_sq > 0) refine_quickshift(im, found.sp, c, slot, kept);
  return number_instances(im, c, centres, slot, kept, ids, scores);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cluster_parallel_cpu(
    const at::Tensor& points, const at::Tensor& points_per_image, const at::Tensor& priority, const at::Tensor& rank,
    int64_t search_points, int64_t density_samples, int64_t most_seeds, int64_t min_density, int64_t mean_shift_steps,
    int64_t max_instances, int64_t min_size, int64_t neighbour_vote_count, bool join_density, double bandwidth_sq,
    double merge_sq, double delta_v, double peak_radius, double satellite_ratio, double bridge_ratio,
    double ambiguous_ratio, double valley_ratio, double valley_radius_sq, double valley_count_ratio,
    double split_radius_sq, double split_count_ratio, int64_t split_samples, double split_confidence,
    double refine_density_sq, double refine_link_sq, const std::optional<at::Tensor>& pixel,
    at::IntArrayRef spatial) {
  TORCH_CHECK(points.dim() == 2 && (points.scalar_type() == at::kFloat || points.scalar_type() == at::kDouble),
              "points: expected a float32 or float64 tensor of shape (M, E), got ", points.scalar_type(), " of shape ",
              points.sizes());
  const int64_t m = points.size(0);
  TORCH_CHECK(points_per_image.dim() == 1 && points_per_image.scalar_type() == at::kLong,
              "points_per_image: expected an int64 tensor of shape (B,), got ", points_per_image.scalar_type(),
              " of shape ", points_per_image.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"priority", priority}, {"rank", rank}})
    TORCH_CHECK(t.dim() == 1 && t.size(0) == m && t.scalar_type() == at::kLong, name,
                ": expected an int64 tensor of shape (", m, ",) (one per point), got ", t.scalar_type(), " of shape ",
                t.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"points", points},
                                {"points_per_image", points_per_image}, {"priority", priority}, {"rank", rank}})
    TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
  TORCH_CHECK(search_points >= 1, "search_points: expected >= 1, got ", search_points);
  TORCH_CHECK(density_samples >= 1, "density_samples: expected >= 1, got ", density_samples);
  TORCH_CHECK(most_seeds >= 1, "most_seeds: expected >= 1, got ", most_seeds);
  TORCH_CHECK(mean_shift_steps >= 0, "mean_shift_steps: expected >= 0, got ", mean_shift_steps);
  TORCH_CHECK(max_instances >= 1, "max_instances: expected >= 1, got ", max_instances);
  TORCH_CHECK(min_size >= 0, "min_size: expected >= 0, got ", min_size);
  TORCH_CHECK(neighbour_vote_count >= 0, "neighbour_vote: expected >= 0, got ", neighbour_vote_count);
  TORCH_CHECK(bandwidth_sq > 0 && std::isfinite(bandwidth_sq), "bandwidth_sq: expected a finite value > 0, got ",
              bandwidth_sq);
  TORCH_CHECK(merge_sq >= 0 && std::isfinite(merge_sq), "merge_sq: expected a finite value >= 0, got ", merge_sq);
  TORCH_CHECK(delta_v > 0, "delta_v: expected > 0, got ", delta_v);
  TORCH_CHECK(valley_ratio >= 0, "valley_ratio: expected >= 0 (0: no valley test), got ", valley_ratio);
  TORCH_CHECK(valley_radius_sq > 0 && std::isfinite(valley_radius_sq),
              "valley_radius_sq: expected a finite value > 0, got ", valley_radius_sq);
  TORCH_CHECK(split_radius_sq >= 0 && std::isfinite(split_radius_sq),
              "split_radius_sq: expected a finite value >= 0 (0: no split), got ", split_radius_sq);
  TORCH_CHECK(split_count_ratio >= 0, "split_count_ratio: expected >= 0, got ", split_count_ratio);
  TORCH_CHECK(split_samples >= 1, "split_samples: expected >= 1, got ", split_samples);
  TORCH_CHECK(split_confidence >= 0, "split_confidence: expected >= 0, got ", split_confidence);
  TORCH_CHECK(refine_density_sq >= 0 && std::isfinite(refine_density_sq),
              "refine_density_sq: expected a finite value >= 0 (0: no refinement), got ", refine_density_sq);
  const bool refine = refine_density_sq > 0;
  at::Tensor pixels;
  if (refine) {
    TORCH_CHECK(refine_link_sq > 0 && std::isfinite(refine_link_sq),
                "refine_link_sq: expected a finite value > 0, got ", refine_link_sq);
    TORCH_CHECK(!spatial.empty(), "spatial: expected the images' spatial shape (at least one size), got none");
    int64_t image_size = 1;
    for (const int64_t size : spatial) {
      TORCH_CHECK(size >= 1, "spatial: expected sizes >= 1, got ", spatial);
      TORCH_CHECK(image_size <= std::numeric_limits<int32_t>::max() / (size + 2),
                  "spatial: expected an image of fewer than 2^31 pixels (padded), got ", spatial);
      image_size *= size + 2;
    }
    TORCH_CHECK(pixel.has_value() && pixel->dim() == 1 && pixel->size(0) == m && pixel->scalar_type() == at::kLong &&
                    pixel->device().is_cpu(),
                "pixel: expected a CPU int64 tensor of shape (", m, ",) (each point's flat index in its image) when ",
                "refine_density_sq > 0");
    pixels = pixel->contiguous();
    const int64_t* pixel_p = pixels.data_ptr<int64_t>();
    int64_t inside = 1;
    for (const int64_t size : spatial) inside *= size;
    for (int64_t i = 0; i < m; ++i)
      TORCH_CHECK(pixel_p[i] >= 0 && pixel_p[i] < inside, "pixel: expected flat indices in [0, ", inside,
                  ") (the images' spatial shape ", spatial, "), got ", pixel_p[i], " at point ", i);
  }
  const auto counts = points_per_image.contiguous();
  const int64_t* count_p = counts.data_ptr<int64_t>();
  const int64_t batch = counts.size(0);
  std::vector<int64_t> offset(batch + 1, 0);
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(count_p[b] >= 0, "points_per_image: expected counts >= 0, got ", count_p[b], " for image ", b);
    offset[b + 1] = offset[b] + count_p[b];
  }
  TORCH_CHECK(offset[batch] == m, "points_per_image: expected counts summing to the ", m, " points, got ",
              offset[batch]);
  const auto x = points.contiguous();
  const auto prio = priority.contiguous();
  const auto rk = rank.contiguous();
  auto ids = at::zeros({m}, points.options().dtype(at::kLong));
  auto scores = at::zeros({batch, max_instances}, points.options().dtype(at::kFloat));
  auto num_instances = at::zeros({batch}, points.options().dtype(at::kLong));
  const int64_t dim = x.size(1);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "discloss_cluster_parallel_cpu", [&] {
    SearchConfig<scalar_t> c{};
    c.dim = dim;
    c.search_points = search_points;
    c.density_samples = density_samples;
    c.most_seeds = most_seeds;
    c.steps = mean_shift_steps;
    c.capacity = max_instances;
    c.min_size = min_size;
    c.neighbours = neighbour_vote_count;
    c.join_density = join_density;
    c.min_density = static_cast<scalar_t>(min_density);
    c.bandwidth_sq = static_cast<scalar_t>(bandwidth_sq);
    c.peak_threshold = static_cast<scalar_t>((1.0 - peak_radius * peak_radius) * bandwidth_sq);
    c.merge_sq = static_cast<scalar_t>(merge_sq);
    c.satellite_sq = static_cast<scalar_t>(4.0 * merge_sq);
    c.satellite_ratio = static_cast<scalar_t>(satellite_ratio);
    c.bridge_ratio = static_cast<scalar_t>(bridge_ratio);
    c.ambiguous_sq = static_cast<scalar_t>(ambiguous_ratio * ambiguous_ratio);
    c.delta_v_sq = static_cast<scalar_t>(delta_v * delta_v);
    c.valley_ratio = static_cast<scalar_t>(valley_ratio);
    c.valley_radius_sq = static_cast<scalar_t>(valley_radius_sq);
    c.valley_count_ratio = static_cast<scalar_t>(valley_count_ratio);
    c.split_radius_sq = static_cast<scalar_t>(split_radius_sq);
    c.split_peak_threshold = static_cast<scalar_t>(split_radius_sq - delta_v * delta_v);
    c.split_count_ratio = static_cast<scalar_t>(split_count_ratio);
    c.split_samples = split_samples;
    c.split_confidence = static_cast<scalar_t>(split_confidence);
    c.refine_density_sq = static_cast<scalar_t>(refine_density_sq);
    c.refine_link_sq = static_cast<scalar_t>(refine_link_sq);
    if (refine) c.spatial.assign(spatial.begin(), spatial.end());
    const scalar_t* x_p = x.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t first, int64_t last) {
      for (int64_t b = first; b < last; ++b) {
        Image<scalar_t> im{x_p + offset[b] * dim, prio.data_ptr<int64_t>() + offset[b],
                           rk.data_ptr<int64_t>() + offset[b], count_p[b], {}};
        if (refine) im.pixel = pixels.data_ptr<int64_t>() + offset[b];
        num_instances.data_ptr<int64_t>()[b] =
            cluster_image(im, c, ids.data_ptr<int64_t>() + offset[b], scores.data_ptr<float>() + b * max_instances);
      }
    });
  });
  return {ids, scores, num_instances};
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(discloss, CPU, m) { m.impl("cluster_parallel", &cpu::cluster_parallel_cpu); }

}  // namespace discloss
