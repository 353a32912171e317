// The op schemas, defined once: registered as discloss::* by discloss.cpp and,
// for the CUDA simulator's test build, as discloss_cudasim::* (tests/cudasim).
#pragma once

#include <torch/library.h>

namespace discloss {

inline void define_ops(torch::Library& m) {
  // The slot map of arbitrary ids (DESIGN §1): per image, the distinct labels
  // other than ignore_index, sorted, in slot_ids[b, 0 .. num_ids[b]) (the rest
  // 0), the slot of a label being its position there; num_ids[b] = -1 when
  // every such label lies in [0, max_instances) (the identity: slot = label).
  // More than max_instances distinct ids in an image: an error on CPU; on
  // CUDA the extra ids are dropped (no cluster) and the Python wrapper checks
  // in eager mode. slot_ids (B, K) int64, num_ids (B,) int64.
  m.def("slot_map(Tensor labels, int max_instances, int? ignore_index) -> (Tensor slot_ids, Tensor num_ids)");
  // Returns the weighted (var, dist, reg, push) terms — shape (B,) for
  // reduction "none", () otherwise, dtype of embeddings; push is the
  // unlabeled push, 0 when unlabeled_push is 0 — and what backward needs:
  // per-(image, slot) means (B, K, E), pixel counts (B, K + 1) whose last
  // column counts the unlabeled pixels (label == ignore_index; paper
  // normalisation), the sums of d(h^2)/dx per slot (B, K, E) and of the
  // push's d(q^2)/dx over the unlabeled pixels per cluster (B, K, E), or
  // (B, 0, E) when unlabeled_push is 0; means and sums in float32 (float64
  // for double embeddings). Those four are not differentiable. slot_ids and
  // num_ids come from slot_map (paper normalisation); without them the
  // labels are the slots and must lie in [0, max_instances). Like the labels
  // they are untrusted input (DESIGN §7): num_ids[b] in [-1, K], the first
  // num_ids[b] ids of each row sorted and distinct, every label other than
  // ignore_index among them; on CPU anything else is an error naming the
  // argument, on CUDA the kernels clamp without a host synchronisation.
  // Every tensor argument must be on the device of embeddings (a meta tensor
  // beside CPU ones included: the fake kernel refuses it).
  m.def(
      "forward(Tensor embeddings, Tensor labels, Tensor? slot_ids, Tensor? num_ids, int max_instances, "
      "float delta_v, float delta_d, int norm, float alpha, float beta, float gamma, float unlabeled_push, "
      "int? ignore_index, str normalization, str reduction) "
      "-> (Tensor var, Tensor dist, Tensor reg, Tensor push, Tensor means, Tensor counts, Tensor hinge_grad_sums, "
      "Tensor push_grad_sums)");
  // The gradient with respect to embeddings, from the gradients of the four
  // terms. What it trusts: that means, counts, hinge_grad_sums and
  // push_grad_sums are what forward returned for these embeddings, labels,
  // slot map and options. It cannot tell (checking would cost forward's two
  // passes again) and checks instead what memory safety needs: every shape,
  // dtype and device (each error names the argument; K is counts' second dim
  // minus 1), the labels and the slot map as forward does (CPU: an error
  // for num_ids[b] outside [-1, K], an unsorted row, a label outside the
  // map; CUDA: clamped in the kernels), and on CPU that the counts are
  // non-negative and sum to at most the pixels of their image. Saved
  // tensors of another call that pass these checks give a gradient that is
  // meaningless but computed within bounds, never uninitialised memory.
  m.def(
      "backward(Tensor grad_var, Tensor grad_dist, Tensor grad_reg, Tensor grad_push, Tensor embeddings, "
      "Tensor labels, Tensor? slot_ids, Tensor? num_ids, Tensor means, Tensor counts, Tensor hinge_grad_sums, "
      "Tensor push_grad_sums, float delta_v, float delta_d, int norm, float alpha, float beta, float gamma, "
      "float unlabeled_push, int? ignore_index, str normalization, str reduction) -> Tensor");
  // cluster_embeddings' parallel search (discloss/cluster.py, search="parallel"), fused; CPU only
  // (CUDA tensors take cluster.py's torch-op path, which this equals up to rounding at thresholds).
  // points (M, E) float32/float64, grouped by image, points_per_image[b] of them in image b;
  // priority (M,) the hashed seed order and rank (M,) each point's rank in its image by it. The
  // modes are searched on the points of rank < search_points, the density peaks on those of rank <
  // density_samples. Returns ids (M,) int64 (1.. per image, 0 for none), scores (B, max_instances)
  // float32 (instance k of image b at column k - 1, zero past its count) and num_instances (B,).
  // split_radius_sq > 0: split_instances (cluster.py's _split_instances) with that fine window, the
  // least count ratio, sample size and confidence of its constants; 0 (the default): no split.
  // refine_density_sq > 0: refine="quickshift" (cluster.py's _refine_quickshift) with that density
  // radius and the link radius refine_link_sq; pixel (M,) int64 each point's flat index in its image
  // of shape spatial (checked); 0 (the default): no refinement.
  m.def(
      "cluster_parallel(Tensor points, Tensor points_per_image, Tensor priority, Tensor rank, int search_points, "
      "int density_samples, int most_seeds, int min_density, int mean_shift_steps, int max_instances, int min_size, "
      "int neighbour_vote, bool join_density, float bandwidth_sq, float merge_sq, float delta_v, float peak_radius, "
      "float satellite_ratio, float bridge_ratio, float ambiguous_ratio, float valley_ratio, float valley_radius_sq, "
      "float valley_count_ratio, float split_radius_sq=0.0, float split_count_ratio=0.3, int split_samples=256, "
      "float split_confidence=0.5, float refine_density_sq=0.0, float refine_link_sq=0.0, Tensor? pixel=None, "
      "int[] spatial=[]) "
      "-> (Tensor ids, Tensor scores, Tensor num_instances)");
}

}  // namespace discloss
