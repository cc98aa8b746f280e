// Registers the private CUDA ops of meancache (conventions.md §2): schemas in a fragment of the `meancache`
// namespace, whose public ops Python defines (meancache/ops.py), and CUDA implementations. Loading the library
// (`import meancache._C`) runs these static registrations; nothing needs a GPU to load.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

// A fragment, never TORCH_LIBRARY: Python owns the namespace, and two definitions of one namespace are an error.
// (a!) / (b!) mark the in-place ring writes, so the dispatcher, functionalization and opcheck see the mutation.
TORCH_LIBRARY_FRAGMENT(meancache, m) {
  m.def(
      "_skip_step_cuda(Tensor x, Tensor(a!) xs, Tensor(b!) vs, int slot_start, int slot_last, int slot_write, "
      "float inv_d, float dt) -> Tensor");
  m.def("_compute_step_cuda(Tensor x, Tensor v, Tensor(a!) xs, Tensor(b!) vs, int slot_write, float dt) -> Tensor");
  m.def(
      "_estimate_cuda(Tensor x, Tensor(a!) xs, Tensor(b!) vs, int slot_start, int slot_last, int slot_write, "
      "float inv_d, float dt, float out_scale, ScalarType out_dtype) -> Tensor");
  // vc is only read (no alias annotation); v_slots index vc when given, else vs.
  m.def(
      "_weighted_step_cuda(Tensor x, Tensor(a!) xs, Tensor(b!) vs, Tensor? vc, int[] v_slots, float[] v_weights, "
      "int x_slot, float x_weight, int slot_write, float dt, float out_scale, ScalarType out_dtype, bool euler) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(meancache, CUDA, m) {
  m.impl("_skip_step_cuda", &meancache::skip_step_cuda);
  m.impl("_compute_step_cuda", &meancache::compute_step_cuda);
  m.impl("_estimate_cuda", &meancache::estimate_cuda);
  m.impl("_weighted_step_cuda", &meancache::weighted_step_cuda);
}

// Python needs a PyInit__C to import the .so as meancache._C; the module itself is empty (the ops live in
// torch.ops.meancache). Limited-API calls only, so one abi3 build serves every CPython >= 3.10.
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",     // m_name
      nullptr,  // m_doc
      -1,       // m_size: no per-module state
      nullptr,  // m_methods
  };
  return PyModule_Create(&module_def);
}
}
