// lora_expand_ on CUDA: y[t] <- round(y[t] + scale[p] * (h[t] . B[p]^T)), p = slots[t], in place;
// rows with slots[t] < 0 are neither read nor written.
//
// Grid: one block column per tile of TT consecutive tokens (x), blocks of THREADS threads along the
// output columns (y). The tile's h rows (TT x R fp32) are staged in shared memory. Each thread owns
// CW consecutive output columns: with portllm.serve's slot layout (B stored [P, R, m], viewed
// [P, m, R]: unit stride along m) and y rows of unit stride, both 16-bit or both fp32, a thread reads
// 16 bytes of B per rank and of y per token (VEC, CW = 16 bytes of elements); other layouts take the
// element-wise instance (CW = 1). Each patch slot's B is read once per tile for all the tile's tokens
// that use it. Sums over k in fp32 in a fixed order, scales once, adds y in fp32 and rounds once
// (round-to-nearest-even). Not yet measured on a GPU.
//
// Implements portllm.ops.lora_expand_ (torch.ops.portllm.lora_expand_, CUDA); tested against the
// reference by tests/test_serve_ops.py (on a GPU, and on the CPU emulation: tests/test_cuda_emulated.py).
#include <ATen/ATen.h>

#include "cuda/convert.cuh"
#include "cuda/device.cuh"
#include "cuda/layout.cuh"
#include "portllm.h"

namespace portllm {
namespace {

constexpr int THREADS = 64;
constexpr int TT = 4;  // tokens per block

template <typename Y, typename F, bool VEC>
__global__ void __launch_bounds__(THREADS)
lora_expand_kernel(Y* __restrict__ y,                  // [Tn, m], strides (syt, sym)
                   const float* __restrict__ h,        // [Tn, R] contiguous
                   const F* __restrict__ B,            // [P, m, R], strides (sbp, sbm, sbr)
                   const float* __restrict__ S,        // [P]
                   const int64_t* __restrict__ slots,  // [Tn]
                   int64_t Tn, int64_t m, int64_t R, int64_t P, int64_t syt, int64_t sym, int64_t sbp,
                   int64_t sbm, int64_t sbr) {
  constexpr int CW = VEC ? 16 / static_cast<int>(sizeof(F)) : 1;
  PORTLLM_DYNAMIC_SMEM(float, hs);  // [TT, R]
  __shared__ int64_t p[TT];  // the tile's slots (-1: none); in shared memory, not a local array
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * TT;
  bool any = false;
#pragma unroll
  for (int u = 0; u < TT; ++u) {
    const int64_t q = t0 + u < Tn ? slots[t0 + u] : -1;
    any = any || (q >= 0 && q < P);
  }
  if (!any) return;  // the same for the whole block
  if (threadIdx.x < TT) {
    const int64_t q = t0 + threadIdx.x < Tn ? slots[t0 + threadIdx.x] : -1;
    p[threadIdx.x] = q < P ? q : -1;
  }
  for (int64_t e = threadIdx.x; e < TT * R; e += THREADS) {
    const int64_t t = t0 + e / R;
    hs[e] = t < Tn ? h[t * R + e % R] : 0.f;
  }
  __syncthreads();
  const int64_t j0 = (static_cast<int64_t>(blockIdx.y) * THREADS + threadIdx.x) * CW;
  if (j0 >= m) return;
  float acc[TT][CW];
#pragma unroll
  for (int u = 0; u < TT; ++u)
#pragma unroll
    for (int c = 0; c < CW; ++c) acc[u][c] = 0.f;
#pragma unroll
  for (int u = 0; u < TT; ++u) {
    bool first = p[u] >= 0;  // the tile's first token of this slot reads its B
#pragma unroll
    for (int v = 0; v < u; ++v) first = first && p[v] != p[u];
    if (!first) continue;
    const F* bp = B + p[u] * sbp + j0 * sbm;
    for (int64_t k = 0; k < R; ++k) {
      float b[CW];
      if constexpr (VEC) unpack16<F>(load_vec<uint4>(bp + k * sbr), b);
      else b[0] = to_f32(bp[k * sbr]);
#pragma unroll
      for (int v = u; v < TT; ++v) {
        if (p[v] != p[u]) continue;
        const float hk = hs[v * R + k];
#pragma unroll
        for (int c = 0; c < CW; ++c) acc[v][c] = fmaf(hk, b[c], acc[v][c]);
      }
    }
  }
#pragma unroll
  for (int u = 0; u < TT; ++u) {
    if (p[u] < 0) continue;
    const float s = S[p[u]];
    Y* py = y + (t0 + u) * syt + j0 * sym;
    if constexpr (VEC) {
      float c[CW];
#pragma unroll
      for (int e = 0; e < CW; ++e) c[e] = acc[u][e] * s;
      store_global16(py, add16<Y>(load_vec<uint4>(py), c));
    } else {
      *py = from_f32<Y>(to_f32(*py) + acc[u][0] * s);
    }
  }
}

void lora_expand_cuda(at::Tensor y, const at::Tensor& h, const at::Tensor& B, const at::Tensor& scale,
                      const at::Tensor& slots) {
  check_lora_expand_args(y, h, B, scale, slots);
  TORCH_CHECK(slots.scalar_type() == at::kLong, "lora_expand_ (cuda): slots must be int64");
  PORTLLM_CUDA_GUARD(y);
  const int64_t T = y.size(0), m = y.size(1), P = B.size(0), R = B.size(2);
  if (T == 0 || m == 0 || R == 0) return;
  const at::Tensor hk = h.contiguous(), S = scale.contiguous();
  // VEC: y and B the same width, both in 16-byte vectors along m (B's middle dimension).
  const int64_t cw = 16 / static_cast<int64_t>(B.element_size());
  const bool vec = y.element_size() == B.element_size() && vectors_along(y, 1) && vectors_along(B, 1);
  const int64_t per_block = THREADS * (vec ? cw : 1);
  const int64_t gx = (T + TT - 1) / TT, gy = (m + per_block - 1) / per_block;
  TORCH_CHECK(gx <= 2147483647 && gy <= 65535, "lora_expand_ (cuda): too many tokens or columns");
  const size_t smem = static_cast<size_t>(TT * R) * sizeof(float);
  TORCH_CHECK(smem <= 48 * 1024, "lora_expand_ (cuda): rank ", R, " too large");
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  PORTLLM_DISPATCH_FLOATS(y.scalar_type(), "lora_expand_cuda", [&] {
    using Y = scalar_t;
    PORTLLM_DISPATCH_FLOATS(B.scalar_type(), "lora_expand_cuda_b", [&] {
      auto args = [&](auto kernel) {
        PORTLLM_LAUNCH(grid, THREADS, smem, kernel)(
            y.data_ptr<Y>(), hk.data_ptr<float>(), B.data_ptr<scalar_t>(), S.data_ptr<float>(),
            slots.data_ptr<int64_t>(), T, m, R, P, y.stride(0), y.stride(1), B.stride(0), B.stride(1),
            B.stride(2));
      };
      if constexpr (sizeof(Y) == sizeof(scalar_t)) {
        if (vec) args(lora_expand_kernel<Y, scalar_t, true>);
        else args(lora_expand_kernel<Y, scalar_t, false>);
      } else {
        args(lora_expand_kernel<Y, scalar_t, false>);
      }
    });
  });
  PORTLLM_LAUNCH_CHECK();
}

}  // namespace

PORTLLM_CUDA_IMPL("lora_expand_", &lora_expand_cuda)

}  // namespace portllm
