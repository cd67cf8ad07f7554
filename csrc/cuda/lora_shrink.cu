// lora_shrink on CUDA: h[t] = x[t] . A[slots[t]]^T in fp32 (h zero-filled; rows with slots[t] < 0
// are skipped).
//
// One block per token, one warp per rank (WARPS ranks per block, more blocks along y for larger
// ranks): the warp's lanes stride over n (consecutive lanes, consecutive elements: coalesced when
// x and A have unit stride along n), multiply in fp32 and reduce with shuffles. A decode-sized
// design (few tokens, each a dot product per rank); not yet measured on a GPU.
//
// Implements portllm.ops.lora_shrink (torch.ops.portllm.lora_shrink, CUDA); tested against the
// reference by tests/test_serve_ops.py.
#include <ATen/ATen.h>

#include "cuda/convert.cuh"
#include "cuda/device.cuh"
#include "portllm.h"

namespace portllm {
namespace {

constexpr int WARPS = 4;

template <typename T>
__global__ void __launch_bounds__(WARPS * 32)
lora_shrink_kernel(const T* __restrict__ x,           // [T, n], strides (sxt, sxn)
                   const T* __restrict__ A,           // [P, R, n], strides (sap, sar, san)
                   const int64_t* __restrict__ slots,  // [T]
                   float* __restrict__ h,             // [T, R] contiguous, zero-filled
                   int64_t n, int64_t R, int64_t P, int64_t sxt, int64_t sxn, int64_t sap,
                   int64_t sar, int64_t san) {
  const int64_t t = blockIdx.x;
  const int64_t p = slots[t];
  if (p < 0 || p >= P) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* xr = x + t * sxt;
  for (int64_t k = static_cast<int64_t>(blockIdx.y) * WARPS + warp; k < R;
       k += static_cast<int64_t>(gridDim.y) * WARPS) {
    const T* ar = A + p * sap + k * sar;
    float acc = 0.f;
#pragma unroll 4
    for (int64_t j = lane; j < n; j += 32) acc = fmaf(to_f32(xr[j * sxn]), to_f32(ar[j * san]), acc);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) h[t * R + k] = acc;
  }
}

at::Tensor lora_shrink_cuda(const at::Tensor& x, const at::Tensor& A, const at::Tensor& slots) {
  check_lora_shrink_args(x, A, slots);
  TORCH_CHECK(slots.scalar_type() == at::kLong, "lora_shrink (cuda): slots must be int64");
  PORTLLM_CUDA_GUARD(x);
  const int64_t T = x.size(0), n = x.size(1), P = A.size(0), R = A.size(1);
  at::Tensor h = at::zeros({T, R}, x.options().dtype(at::kFloat));
  if (T == 0 || R == 0) return h;
  // One dtype for both operands; mixed dtypes are upcast to fp32 (exact).
  at::Tensor xk = x, Ak = A;
  if (x.scalar_type() != A.scalar_type()) {
    xk = x.to(at::kFloat);
    Ak = A.to(at::kFloat);
  }
  const int64_t ry = (R + WARPS - 1) / WARPS;
  TORCH_CHECK(T <= 2147483647 && ry <= 65535, "lora_shrink (cuda): too many tokens or ranks");
  const dim3 grid(static_cast<unsigned>(T), static_cast<unsigned>(ry));
  PORTLLM_DISPATCH_FLOATS(xk.scalar_type(), "lora_shrink_cuda", [&] {
    PORTLLM_LAUNCH(grid, WARPS * 32, 0, lora_shrink_kernel<scalar_t>)(
        xk.data_ptr<scalar_t>(), Ak.data_ptr<scalar_t>(), slots.data_ptr<int64_t>(),
        h.data_ptr<float>(), n, R, P, xk.stride(0), xk.stride(1), Ak.stride(0), Ak.stride(1),
        Ak.stride(2));
  });
  PORTLLM_LAUNCH_CHECK();
  return h;
}

}  // namespace

PORTLLM_CUDA_IMPL("lora_shrink", &lora_shrink_cuda)

}  // namespace portllm
