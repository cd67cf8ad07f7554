// The emulated CUDA ops (csrc/emu/cuda_emu.h): csrc/cuda's launchers and kernels built as C++ for the
// CPU and registered as torch.ops.portllm_emu.<op> on CPU tensors, with csrc/ops.cpp's schemas.
// Built only by the tests (tests/cuda_emu.py), never into portllm._C.
#include <torch/library.h>

TORCH_LIBRARY(portllm_emu, m) {
  m.def("patch_add_(Tensor(a!) W, Tensor B, Tensor A, Tensor scale) -> ()");
  m.def("skeleton_mm(Tensor A, Tensor W, Tensor idx, str kind) -> Tensor");
  m.def("lora_shrink(Tensor x, Tensor A, Tensor slots) -> Tensor");
  m.def("lora_expand_(Tensor(a!) y, Tensor h, Tensor B, Tensor scale, Tensor slots) -> ()");
}
