// lora_shrink on CUDA: h[t] = x[t] . A[slots[t]]^T in fp32 (h zero-filled; rows with slots[t] < 0
// are skipped).
//
// One block per tile of TT consecutive tokens, one warp per rank (WARPS ranks per block, more blocks
// along y for larger ranks). Within a tile, each patch slot's A row is read once for all the tile's
// tokens that use it (the first token of the slot does the work; the others are skipped), so a
// prefill's tokens of one patch share the factor reads. The warp's lanes stride over n 16 bytes at a
// time (VEC: x and A with unit stride along n, rows 16-byte aligned, n a multiple of the vector)
// or one element at a time (other layouts), multiply in fp32 and reduce with shuffles. A decode-sized
// design (few tokens, each a dot product per rank); not yet measured on a GPU.
//
// Implements portllm.ops.lora_shrink (torch.ops.portllm.lora_shrink, CUDA); tested against the
// reference by tests/test_serve_ops.py (on a GPU, and on the CPU emulation: tests/test_cuda_emulated.py).
#include <ATen/ATen.h>

#include "cuda/convert.cuh"
#include "cuda/device.cuh"
#include "cuda/layout.cuh"
#include "portllm.h"

namespace portllm {
namespace {

constexpr int WARPS = 4;
constexpr int TT = 4;  // tokens per block

template <typename T, bool VEC>
__global__ void __launch_bounds__(WARPS * 32)
lora_shrink_kernel(const T* __restrict__ x,           // [Tn, n], strides (sxt, sxn)
                   const T* __restrict__ A,           // [P, R, n], strides (sap, sar, san)
                   const int64_t* __restrict__ slots,  // [Tn]
                   float* __restrict__ h,             // [Tn, R] contiguous, zero-filled
                   int64_t Tn, int64_t n, int64_t R, int64_t P, int64_t sxt, int64_t sxn, int64_t sap,
                   int64_t sar, int64_t san) {
  constexpr int VW = VEC ? 16 / static_cast<int>(sizeof(T)) : 1;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * TT;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int64_t p[TT];
#pragma unroll
  for (int u = 0; u < TT; ++u) {
    p[u] = t0 + u < Tn ? slots[t0 + u] : -1;
    if (p[u] >= P) p[u] = -1;
  }
  for (int64_t k = static_cast<int64_t>(blockIdx.y) * WARPS + warp; k < R;
       k += static_cast<int64_t>(gridDim.y) * WARPS) {
    float acc[TT];
#pragma unroll
    for (int u = 0; u < TT; ++u) acc[u] = 0.f;
#pragma unroll
    for (int u = 0; u < TT; ++u) {
      bool first = p[u] >= 0;  // the tile's first token of this slot reads its A row
#pragma unroll
      for (int v = 0; v < u; ++v) first = first && p[v] != p[u];
      if (!first) continue;
      const T* ar = A + p[u] * sap + k * sar;
      for (int64_t j = static_cast<int64_t>(lane) * VW; j < n; j += 32 * VW) {
        float a[VW];
        if constexpr (VEC) unpack16<T>(load_vec<uint4>(ar + j), a);
        else a[0] = to_f32(ar[j * san]);
#pragma unroll
        for (int v = u; v < TT; ++v) {
          if (p[v] != p[u]) continue;
          float xv[VW];
          if constexpr (VEC) unpack16<T>(load_vec<uint4>(x + (t0 + v) * sxt + j), xv);
          else xv[0] = to_f32(x[(t0 + v) * sxt + j * sxn]);
#pragma unroll
          for (int e = 0; e < VW; ++e) acc[v] = fmaf(xv[e], a[e], acc[v]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < TT; ++u) {
      float s = acc[u];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
      if (lane == 0 && p[u] >= 0) h[(t0 + u) * R + k] = s;
    }
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
  const int64_t ry = (R + WARPS - 1) / WARPS, tx = (T + TT - 1) / TT;
  TORCH_CHECK(tx <= 2147483647 && ry <= 65535, "lora_shrink (cuda): too many tokens or ranks");
  const dim3 grid(static_cast<unsigned>(tx), static_cast<unsigned>(ry));
  const bool vec = vectors_along(xk, 1) && vectors_along(Ak, 2);  // 16-byte vectors along n
  const int64_t* s = slots.data_ptr<int64_t>();
  PORTLLM_DISPATCH_FLOATS(xk.scalar_type(), "lora_shrink_cuda", [&] {
    auto args = [&](auto kernel) {
      PORTLLM_LAUNCH(grid, WARPS * 32, 0, kernel)(
          xk.data_ptr<scalar_t>(), Ak.data_ptr<scalar_t>(), s, h.data_ptr<float>(), T, n, R, P,
          xk.stride(0), xk.stride(1), Ak.stride(0), Ak.stride(1), Ak.stride(2));
    };
    if (vec) args(lora_shrink_kernel<scalar_t, true>);
    else args(lora_shrink_kernel<scalar_t, false>);
  });
  PORTLLM_LAUNCH_CHECK();
  return h;
}

}  // namespace

PORTLLM_CUDA_IMPL("lora_shrink", &lora_shrink_cuda)

}  // namespace portllm
