// The op schemas, defined once. Kernels are registered per dispatch key in
// cpu/loss.cpp and cuda/loss.cu; fake kernels and autograd in discloss/_ops.py.
#include <torch/library.h>

#ifdef DISCLOSS_PYTHON_MODULE
#include <Python.h>

// `import discloss._C` loads this library, which runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
#endif

TORCH_LIBRARY(discloss, m) {
  // Returns the weighted (var, dist, reg) terms — shape (B,) for reduction
  // "none", () otherwise, dtype of embeddings — and what backward needs:
  // per-(image, slot) means (B, K, E) and pixel counts (B, K), and the sums of
  // d(h^2)/dx per slot (B, K, E); means and sums in float32 (float64 for
  // double embeddings). Those three are not differentiable.
  m.def(
      "forward(Tensor embeddings, Tensor labels, int max_instances, float delta_v, float delta_d, int norm, "
      "float alpha, float beta, float gamma, int? ignore_index, str normalization, str reduction) "
      "-> (Tensor var, Tensor dist, Tensor reg, Tensor means, Tensor counts, Tensor hinge_grad_sums)");
  // The gradient with respect to embeddings, from the gradients of the three terms.
  m.def(
      "backward(Tensor grad_var, Tensor grad_dist, Tensor grad_reg, Tensor embeddings, Tensor labels, "
      "Tensor means, Tensor counts, Tensor hinge_grad_sums, float delta_v, float delta_d, int norm, "
      "float alpha, float beta, float gamma, int? ignore_index, str normalization, str reduction) -> Tensor");
}
