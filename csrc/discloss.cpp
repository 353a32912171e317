// The discloss library: its op schemas (schemas.h). Kernels are registered per dispatch key in
// cpu/loss.cpp and cuda/loss.cu; fake kernels and autograd in discloss/_ops.py.
#include <torch/library.h>

#include "schemas.h"

#ifdef DISCLOSS_PYTHON_MODULE
#include <Python.h>

// `import discloss._C` loads this library, which runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
#endif

TORCH_LIBRARY(discloss, m) { discloss::define_ops(m); }
