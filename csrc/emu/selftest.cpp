// Kernels that show what the CUDA emulation catches (tests/test_cuda_emulated.py): a reversal through
// shared memory with and without its barrier, a 16-byte copy at a given element offset, and a
// shuffle after half the warp has exited.
#include <ATen/ATen.h>

#include "cuda/device.cuh"

namespace portllm {
namespace {

__global__ void reverse_kernel(const float* x, float* y, bool barrier) {
  __shared__ float s[256];
  s[threadIdx.x] = x[threadIdx.x];
  if (barrier) __syncthreads();
  y[threadIdx.x] = s[255 - threadIdx.x];
}

__global__ void vector_copy_kernel(const float* x, float* y) {
  store_vec<float4>(y + 4 * threadIdx.x, load_vec<float4>(x + 4 * threadIdx.x));
}

__global__ void partial_shuffle_kernel(float* x) {
  if (threadIdx.x >= 16) return;
  x[threadIdx.x] = __shfl_xor_sync(0xffffffffu, x[threadIdx.x], 1);
}

at::Tensor selftest_reverse(const at::Tensor& x, bool barrier) {
  TORCH_CHECK(x.numel() == 256 && x.is_contiguous() && x.scalar_type() == at::kFloat);
  at::Tensor s = at::full({256}, -1.f, x.options()), y = at::empty_like(x);
  // another block's leftovers in the static shared array first, as on a GPU's reused shared memory
  PORTLLM_LAUNCH(1, 256, 0, reverse_kernel)(s.data_ptr<float>(), y.data_ptr<float>(), true);
  PORTLLM_LAUNCH(1, 256, 0, reverse_kernel)(x.data_ptr<float>(), y.data_ptr<float>(), barrier);
  return y;
}

at::Tensor selftest_vector_copy(const at::Tensor& x, int64_t offset) {
  TORCH_CHECK(x.numel() >= offset + 32 && x.is_contiguous() && x.scalar_type() == at::kFloat);
  at::Tensor y = at::empty({32}, x.options());
  PORTLLM_LAUNCH(1, 8, 0, vector_copy_kernel)(x.data_ptr<float>() + offset, y.data_ptr<float>());
  return y;
}

at::Tensor selftest_partial_shuffle(const at::Tensor& x) {
  at::Tensor y = x.clone();
  PORTLLM_LAUNCH(1, 32, 0, partial_shuffle_kernel)(y.data_ptr<float>());
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(portllm_emu, m) {
  m.def("selftest_reverse(Tensor x, bool barrier) -> Tensor", &selftest_reverse);
  m.def("selftest_vector_copy(Tensor x, int offset) -> Tensor", &selftest_vector_copy);
  m.def("selftest_partial_shuffle(Tensor x) -> Tensor", &selftest_partial_shuffle);
}

}  // namespace portllm
