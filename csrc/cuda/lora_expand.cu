// lora_expand_ on CUDA: y[t] <- round(y[t] + scale[p] * (h[t] . B[p]^T)), p = slots[t], in place;
// rows with slots[t] < 0 are neither read nor written.
//
// Grid: one block column per token (x), blocks of THREADS output columns (y). The token's h row
// (R fp32 values) is staged in shared memory; each thread owns one output column j, sums
// h[k] * B[p, j, k] over k in fp32 in a fixed order, scales once, adds y in fp32 and rounds once
// (round-to-nearest-even). With portllm.serve's slot layout (B stored [P, R, m], viewed [P, m, R])
// consecutive threads read consecutive B elements. Not yet measured on a GPU.
//
// Implements portllm.ops.lora_expand_ (torch.ops.portllm.lora_expand_, CUDA); tested against the
// reference by tests/test_serve_ops.py.
#include <ATen/ATen.h>

#include "cuda/convert.cuh"
#include "cuda/device.cuh"
#include "portllm.h"

namespace portllm {
namespace {

constexpr int THREADS = 256;

template <typename Y, typename F>
__global__ void __launch_bounds__(THREADS)
lora_expand_kernel(Y* __restrict__ y,                  // [T, m], strides (syt, sym)
                   const float* __restrict__ h,        // [T, R] contiguous
                   const F* __restrict__ B,            // [P, m, R], strides (sbp, sbm, sbr)
                   const float* __restrict__ S,        // [P]
                   const int64_t* __restrict__ slots,  // [T]
                   int64_t m, int64_t R, int64_t P, int64_t syt, int64_t sym, int64_t sbp,
                   int64_t sbm, int64_t sbr) {
  PORTLLM_DYNAMIC_SMEM(float, hs);  // [R]
  const int64_t t = blockIdx.x;
  const int64_t p = slots[t];
  if (p < 0 || p >= P) return;  // the same for the whole block
  for (int64_t k = threadIdx.x; k < R; k += THREADS) hs[k] = h[t * R + k];
  __syncthreads();
  const int64_t j = static_cast<int64_t>(blockIdx.y) * THREADS + threadIdx.x;
  if (j >= m) return;
  const F* br = B + p * sbp + j * sbm;
  float acc = 0.f;
  for (int64_t k = 0; k < R; ++k) acc = fmaf(hs[k], to_f32(br[k * sbr]), acc);
  Y* py = y + t * syt + j * sym;
  *py = from_f32<Y>(to_f32(*py) + acc * S[p]);
}

void lora_expand_cuda(at::Tensor y, const at::Tensor& h, const at::Tensor& B, const at::Tensor& scale,
                      const at::Tensor& slots) {
  check_lora_expand_args(y, h, B, scale, slots);
  TORCH_CHECK(slots.scalar_type() == at::kLong, "lora_expand_ (cuda): slots must be int64");
  PORTLLM_CUDA_GUARD(y);
  const int64_t T = y.size(0), m = y.size(1), P = B.size(0), R = B.size(2);
  if (T == 0 || m == 0 || R == 0) return;
  const at::Tensor hk = h.contiguous(), S = scale.contiguous();
  const int64_t gy = (m + THREADS - 1) / THREADS;
  TORCH_CHECK(T <= 2147483647 && gy <= 65535, "lora_expand_ (cuda): too many tokens or columns");
  const size_t smem = static_cast<size_t>(R) * sizeof(float);
  TORCH_CHECK(smem <= 48 * 1024, "lora_expand_ (cuda): rank ", R, " too large");
  const dim3 grid(static_cast<unsigned>(T), static_cast<unsigned>(gy));
  PORTLLM_DISPATCH_FLOATS(y.scalar_type(), "lora_expand_cuda", [&] {
    using Y = scalar_t;
    PORTLLM_DISPATCH_FLOATS(B.scalar_type(), "lora_expand_cuda_b", [&] {
      PORTLLM_LAUNCH(grid, THREADS, smem, lora_expand_kernel<Y, scalar_t>)(
          y.data_ptr<Y>(), hk.data_ptr<float>(), B.data_ptr<scalar_t>(), S.data_ptr<float>(),
          slots.data_ptr<int64_t>(), m, R, P, y.stride(0), y.stride(1), B.stride(0), B.stride(1),
          B.stride(2));
    });
  });
  PORTLLM_LAUNCH_CHECK();
}

}  // namespace

PORTLLM_CUDA_IMPL("lora_expand_", &lora_expand_cuda)

}  // namespace portllm
