// The one place where portllm's C++ operator schemas are defined, and the module init of portllm._C.
// Implementations register per dispatch key in csrc/cpu/*.cpp and csrc/cuda/*.cu;
// fake (meta) implementations are registered from Python (portllm/ops.py).
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "portllm.h"

TORCH_LIBRARY(portllm, m) {
  // W[m, n] += B[m, r] . diag(scale[r]) . A[r, n], in place; fp32 accumulation, one rounding.
  // scale is a float32 tensor of length r on W's device.
  m.def("patch_add_(Tensor(a!) W, Tensor B, Tensor A, Tensor scale) -> ()");
  // Products with a skeleton of W [m, n] gathered by idx (PMSS): kind "ct": A[T, r] @ W[:, idx]^T;
  // "c": A[T, m] @ W[:, idx]; "r": A[T, r] @ W[idx, :]. Result in A's dtype, fp32 accumulation.
  m.def("skeleton_mm(Tensor A, Tensor W, Tensor idx, str kind) -> Tensor");
  // Serving (portllm.serve): h[t] = x[t] . A[slots[t]]^T in fp32 [T, R], 0 where slots[t] < 0.
  m.def("lora_shrink(Tensor x, Tensor A, Tensor slots) -> Tensor");
  // y[t] <- round(y[t] + scale[p] * (h[t] . B[p]^T)), p = slots[t] >= 0, in place.
  m.def("lora_expand_(Tensor(a!) y, Tensor h, Tensor B, Tensor scale, Tensor slots) -> ()");
  // Exact undo (portllm/exact.py): the positions where a and b (1-D, int16 or int32) differ, in
  // order, and a - b there, both int64.
  m.def("bit_misses(Tensor a, Tensor b) -> (Tensor, Tensor)");
  // A patch merged into a block-scaled FP8 weight (portllm/fp8.py): q (uint8 view of e4m3) [M, N],
  // scale_inv float32 [ceil(M/bm), ceil(N/bn)], Bs = B.diag(s) float32 [M, r], A float32 [r, N];
  // returns the new codes, the new inverse scales and float64 [<Q-W, D>, |D|^2, |Q-W-D|^2].
  m.def("fp8_merge(Tensor q, Tensor scale_inv, Tensor Bs, Tensor A, int bm, int bn, bool stochastic, int key) "
        "-> (Tensor, Tensor, Tensor)");
  // A patch merged into one expert's MXFP4 weight (portllm/mxfp4.py): blocks uint8 [R, G, 16] (two e2m1
  // codes a byte), scales uint8 [R, G] (e8m0), Bs = B.diag(s) float32 [R, r], A float32 [r, 32 G]; fresh:
  // recompute every block's scale, else keep those that still fit; returns the new blocks and scales,
  // float64 [2, 3] sums (the rounding asked for, then the other) and the blocks rescaled (bool [R, G]).
  m.def("mxfp4_merge(Tensor blocks, Tensor scales, Tensor Bs, Tensor A, bool fresh, bool stochastic, int key, "
        "int first) -> (Tensor, Tensor, Tensor, Tensor)");
  // Human-readable description of what this build contains (ISA paths, CUDA, OpenMP).
  m.def("build_info() -> str", [] { return portllm::build_info(); });
  // The vector path the CPU kernels take now: the machine's best, or lower if PORTLLM_CPU_ISA says so.
  m.def("cpu_isa() -> str", [] { return portllm::cpu_isa_for_call(); });
}

namespace portllm {
std::string build_info() {
  std::string s = "cpu=" + cpu_isa_best();
#ifdef PORTLLM_WITH_CUDA
  s += " cuda=1";
#else
  s += " cuda=0";
#endif
#ifdef _OPENMP
  s += " openmp=1";
#else
  s += " openmp=0";
#endif
  return s;
}
}  // namespace portllm

// `import portllm._C` loads this library, which runs the registrations above. No Python functions
// are exported: everything is reached through torch.ops.portllm.*.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
