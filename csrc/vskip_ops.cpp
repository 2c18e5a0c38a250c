// Operator schemas of the torch.library namespace "vskip" and the Python module
// entry point. Kernels register per dispatch key in csrc/cpu and csrc/cuda; the
// fake (meta) implementations used by torch.compile live in vskip_kernels/_native.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(vskip, m) {
  // kind int8 [B, Nk] (0 pad, 1 text, 2 visual); policy 0 dense, 1 vskip, 2 frozen.
  // Returns full_cnt [B, Mt], full_idx [B, Mt, Nt], part_cnt [B, Mt], part_idx [B, Mt, Nt], all int32.
  m.def(
      "plan_schedule(Tensor kind, int nq, int policy, bool visual_self, int block_m, int block_n)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
}

// Importing vskip_kernels._C runs the static registrations above; the module
// itself exposes nothing (the ops are reached through torch.ops.vskip).
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
