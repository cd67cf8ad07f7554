// skeleton_mm on CUDA: OUT[T, N] = A[T, K] @ B with B[k, c] = W[roff[k] + coff[c]], the gather of
// W's rows or columns folded into element offsets (see kernels/skeleton_mm.py for the same scheme
// in Triton). Tiles of 64 x 64 outputs, 16 ranks staged per round in shared memory as fp32; each
// thread accumulates 4 x 4 outputs with fp32 FMAs and rounds once to the output dtype. Sorted
// indices keep the gathered elements of a tile close together.
//
// Implements portllm.ops.skeleton_mm (torch.ops.portllm.skeleton_mm); tested against the reference by tests/test_pmss_ops.py.
#include <ATen/ATen.h>

#include <string>

#include "cuda/convert.cuh"
#include "cuda/device.cuh"
#include "portllm.h"

namespace portllm {
namespace {

constexpr int TT = 64, TN = 64, TK = 16, THREADS = 256;

template <typename T>
__global__ void __launch_bounds__(THREADS)
skeleton_mm_kernel(const T* __restrict__ A,         // [T, K], strides (sa0, sa1)
                   const T* __restrict__ W,         // gathered through roff/coff
                   const int64_t* __restrict__ roff,  // [K]
                   const int64_t* __restrict__ coff,  // [N]
                   T* __restrict__ out,             // [T, N] contiguous
                   int64_t nt, int64_t K, int64_t N, int64_t sa0, int64_t sa1) {
  __shared__ float As[TK][TT];
  __shared__ float Bs[TK][TN];
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;  // outputs (ty + 16 i, tx + 16 j), i, j < 4
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * TT;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * TN;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < K; k0 += TK) {
    for (int e = tid; e < TK * TT; e += THREADS) {
      const int k = e % TK, t = e / TK;
      const int64_t gt = t0 + t, gk = k0 + k;
      As[k][t] = (gt < nt && gk < K) ? to_f32(A[gt * sa0 + gk * sa1]) : 0.f;
    }
    for (int e = tid; e < TK * TN; e += THREADS) {
      const int c = e % TN, k = e / TN;
      const int64_t gc = c0 + c, gk = k0 + k;
      Bs[k][c] = (gc < N && gk < K) ? to_f32(W[roff[gk] + coff[gc]]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < TK; ++k) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[k][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[k][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t gt = t0 + ty + 16 * i;
    if (gt >= nt) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t gc = c0 + tx + 16 * j;
      if (gc < N) out[gt * N + gc] = from_f32<T>(acc[i][j]);
    }
  }
}

at::Tensor skeleton_mm_cuda(const at::Tensor& A_in, const at::Tensor& W, const at::Tensor& idx,
                            c10::string_view kind_view) {
  const std::string kind(kind_view);
  const int64_t N = check_skeleton_mm_args(A_in, W, idx, kind);
  PORTLLM_CUDA_GUARD(W);
  const at::Tensor A = A_in.to(W.scalar_type());
  const int64_t m = W.size(0), n = W.size(1), nt = A.size(0), K = A.size(1);
  const auto opts = idx.options();
  // Element offsets of the gathered operand: B[k, c] = W[roff[k] + coff[c]].
  at::Tensor roff, coff;
  if (kind == "ct") {
    roff = idx * W.stride(1);
    coff = at::arange(m, opts) * W.stride(0);
  } else if (kind == "c") {
    roff = at::arange(m, opts) * W.stride(0);
    coff = idx * W.stride(1);
  } else {
    roff = idx * W.stride(0);
    coff = at::arange(n, opts) * W.stride(1);
  }
  at::Tensor out = at::empty({nt, N}, A.options());
  if (nt == 0 || N == 0) return out.to(A_in.scalar_type());
  const dim3 grid(static_cast<unsigned>((N + TN - 1) / TN), static_cast<unsigned>((nt + TT - 1) / TT));
  TORCH_CHECK(grid.y <= 65535, "skeleton_mm (cuda): too many rows in A (", nt, ")");
  PORTLLM_DISPATCH_FLOATS(W.scalar_type(), "skeleton_mm_cuda", [&] {
    PORTLLM_LAUNCH(grid, THREADS, 0, skeleton_mm_kernel<scalar_t>)(
        A.data_ptr<scalar_t>(), W.data_ptr<scalar_t>(), roff.data_ptr<int64_t>(),
        coff.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), nt, K, N, A.stride(0), A.stride(1));
    PORTLLM_LAUNCH_CHECK();
  });
  return out.to(A_in.scalar_type());
}

}  // namespace

PORTLLM_CUDA_IMPL("skeleton_mm", &skeleton_mm_cuda)

}  // namespace portllm
