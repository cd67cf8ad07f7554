// patch_add_ on CUDA: W[m, n] += B[m, r] . diag(scale) . A[r, n], in place.
//
// A 16-bit W (unit column stride) with both factors 16-bit, or both fp32, goes to the tensor-core
// kernel (patch_add_mma.cuh). Everything else (an fp32 W, mixed factor dtypes, more than 16 scale
// groups, other strides) takes the fp32 kernel below:
//
// One block owns a BM x BN tile of W. The factor tiles are staged in shared memory as fp32
// (Bs = B * scale, As = A), in chunks of RK ranks; each thread keeps TM rows x VW consecutive columns
// of fp32 accumulators (VW = 16 bytes of W: 4 fp32 or 8 16-bit elements), then reads its W elements
// once, adds, rounds once (round-to-nearest-even) and writes them once, 16 bytes at a time where W's
// rows allow it (VEC: unit column stride, 16-byte aligned rows, n a multiple of VW); other layouts take
// the scalar instance. No atomics and a fixed summation order: the result is deterministic.
//
// A warp's threads hold consecutive 16-byte column groups, so W accesses are coalesced, As reads are
// conflict-free 16-byte shared loads and Bs reads are broadcasts (its rows padded by one float, so the
// two row groups of a 16-bit W's warp read different banks).
//
// Implements portllm.ops.patch_add_ (torch.ops.portllm.patch_add_); tested against the reference by
// tests/test_patch_add.py (on a GPU, and on the CPU emulation: tests/test_cuda_emulated.py).
#include <ATen/ATen.h>

#include "cuda/convert.cuh"
#include "cuda/device.cuh"
#include "cuda/layout.cuh"
#include "cuda/patch_add_mma.cuh"
#include "portllm.h"

namespace portllm {
namespace {

constexpr int BM = 64;   // rows of W per block
constexpr int BN = 128;  // columns of W per block
constexpr int RK = 32;   // ranks staged per shared-memory round
constexpr int THREADS = 256;

template <typename T, typename F, bool VEC>
__global__ void __launch_bounds__(THREADS)
patch_add_kernel(T* __restrict__ W,            // [m, n], strides (sw0, sw1)
                 const F* __restrict__ B,      // [m, r], strides (sb0, sb1)
                 const F* __restrict__ A,      // [r, n], strides (sa0, sa1)
                 const float* __restrict__ S,  // [r]
                 int64_t m, int64_t n, int64_t r, int64_t sw0, int64_t sw1, int64_t sb0,
                 int64_t sb1, int64_t sa0, int64_t sa1) {
  constexpr int VW = 16 / static_cast<int>(sizeof(T));  // W elements per 16 bytes
  constexpr int TC = BN / VW;                            // threads along a tile row
  constexpr int TM = BM * TC / THREADS;                  // rows per thread
  __shared__ float Bs[BM][RK + 1];
  __shared__ __align__(16) float As[RK][BN];
  const int tid = threadIdx.x;
  const int tc = tid % TC;  // columns tc*VW .. tc*VW+VW-1 of the tile
  const int tr = tid / TC;  // rows tr*TM .. tr*TM+TM-1 of the tile
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * BN;

  float acc[TM][VW];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < VW; ++j) acc[i][j] = 0.f;

  for (int64_t k0 = 0; k0 < r; k0 += RK) {
    const int kc = static_cast<int>(r - k0 < RK ? r - k0 : RK);
    for (int e = tid; e < BM * RK; e += THREADS) {
      const int i = e / RK, k = e % RK;
      const int64_t gi = row0 + i, gk = k0 + k;
      Bs[i][k] = (gi < m && k < kc) ? to_f32(B[gi * sb0 + gk * sb1]) * S[gk] : 0.f;
    }
    for (int e = tid; e < RK * BN; e += THREADS) {
      const int k = e / BN, j = e % BN;
      const int64_t gj = col0 + j, gk = k0 + k;
      As[k][j] = (gj < n && k < kc) ? to_f32(A[gk * sa0 + gj * sa1]) : 0.f;
    }
    __syncthreads();
    for (int k = 0; k < kc; ++k) {
      float a[VW];
#pragma unroll
      for (int q = 0; q < VW / 4; ++q) {
        const float4 v = load_vec<float4>(&As[k][tc * VW + 4 * q]);
        a[4 * q] = v.x;
        a[4 * q + 1] = v.y;
        a[4 * q + 2] = v.z;
        a[4 * q + 3] = v.w;
      }
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const float b = Bs[tr * TM + i][k];
#pragma unroll
        for (int j = 0; j < VW; ++j) acc[i][j] = fmaf(b, a[j], acc[i][j]);
      }
    }
    __syncthreads();
  }

  const int64_t gj = col0 + tc * VW;
  if (gj >= n) return;
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t gi = row0 + tr * TM + i;
    if (gi >= m) break;
    if constexpr (VEC) {  // n is a multiple of VW: the whole vector is in W
      T* p = W + gi * sw0 + gj;
      store_vec<uint4>(p, add16<T>(load_vec<uint4>(p), acc[i]));
    } else {
#pragma unroll
      for (int j = 0; j < VW; ++j) {
        if (gj + j < n) {
          T* p = W + gi * sw0 + (gj + j) * sw1;
          *p = from_f32<T>(to_f32(*p) + acc[i][j]);
        }
      }
    }
  }
}

template <typename T, typename F>
void launch(at::Tensor& W, const at::Tensor& B, const at::Tensor& A, const at::Tensor& S) {
  const int64_t m = W.size(0), n = W.size(1), r = B.size(1);
  const dim3 grid(static_cast<unsigned>((n + BN - 1) / BN), static_cast<unsigned>((m + BM - 1) / BM));
  TORCH_CHECK(grid.y <= 65535, "patch_add_ (cuda): W has too many rows (", m, ")");
  auto args = [&](auto kernel) {
    PORTLLM_LAUNCH(grid, THREADS, 0, kernel)(
        W.data_ptr<T>(), B.data_ptr<F>(), A.data_ptr<F>(), S.data_ptr<float>(), m, n, r,
        W.stride(0), W.stride(1), B.stride(0), B.stride(1), A.stride(0), A.stride(1));
  };
  if (vectors_along(W, 1)) args(patch_add_kernel<T, F, true>);
  else args(patch_add_kernel<T, F, false>);
  PORTLLM_LAUNCH_CHECK();
}

// Runs of equal scale (read on the host: one small copy), or false if there are more than
// mma_path::kMaxGroups (then the fp32 kernel, which scales each rank, takes the merge).
bool scale_groups(const at::Tensor& S, mma_path::Groups& g) {
  const at::Tensor s = S.to(at::kCPU);
  const float* p = s.data_ptr<float>();
  const int64_t r = s.numel();
  g.n = 0;
  for (int64_t k = 0; k < r; ++k) {
    if (k > 0 && p[k] == p[k - 1]) continue;
    if (g.n == mma_path::kMaxGroups) return false;
    g.k[g.n] = static_cast<int>(k);
    g.s[g.n] = p[k];
    ++g.n;
  }
  g.k[g.n] = static_cast<int>(r);
  return true;
}

// The factors as the tensor-core kernel stages them, 16 bytes at a time: B [m, rp] and A [rp, na]
// with unit inner strides, row strides and data 16-byte aligned, each group starting at a multiple of
// 8 ranks, zeros in the padding (na: n rounded up to 8). Factors already laid out so (a PEFT
// adapter's contiguous B [m, r] and A [r, n] with r and n multiples of 8 and one group, or groups
// on multiples of 8) are used as they are; otherwise copied (m·rp + rp·na elements, a few percent
// of W's bytes at most for ranks up to 64). `staged` takes the groups in the staged rank numbering.
struct Staged {
  at::Tensor B, A;
  int64_t na;
};

Staged stage(const at::Tensor& B, const at::Tensor& A, const mma_path::Groups& g, mma_path::Groups& staged) {
  const int64_t m = B.size(0), n = A.size(1);
  bool as_is = vectors_along(B, 1) && vectors_along(A, 1);
  staged = g;
  staged.k[0] = 0;
  for (int q = 0; q < g.n; ++q) {
    const int len = g.k[q + 1] - g.k[q];
    as_is = as_is && g.k[q] % 8 == 0 && len % 8 == 0;
    staged.k[q + 1] = staged.k[q] + (len + 7) / 8 * 8;
  }
  if (as_is) return {B, A, n};
  const int64_t rp = staged.k[g.n], na = (n + 7) / 8 * 8;
  at::Tensor Bp = at::zeros({m, rp}, B.options()), Ap = at::zeros({rp, na}, A.options());
  for (int q = 0; q < g.n; ++q) {
    const int64_t len = g.k[q + 1] - g.k[q];
    Bp.narrow(1, staged.k[q], len).copy_(B.narrow(1, g.k[q], len));
    Ap.narrow(0, staged.k[q], len).narrow(1, 0, n).copy_(A.narrow(0, g.k[q], len));
  }
  return {Bp, Ap, na};
}

template <typename T, typename H, bool SPLIT>
void launch_mma(at::Tensor& W, const Staged& hi, const Staged& lo, const mma_path::Groups& g) {
  using namespace mma_path;
  const int64_t m = W.size(0), n = W.size(1);
  const dim3 grid(static_cast<unsigned>((n + BN - 1) / BN), static_cast<unsigned>((m + BM - 1) / BM));
  TORCH_CHECK(grid.y <= 65535, "patch_add_ (cuda): W has too many rows (", m, ")");
  TORCH_CHECK(hi.B.stride(0) == lo.B.stride(0) && hi.A.stride(0) == lo.A.stride(0) && hi.na == lo.na,
              "patch_add_ (cuda): the split factors' high and low parts are laid out differently");
  auto h = [](const at::Tensor& t) { return reinterpret_cast<const H*>(t.data_ptr()); };
  auto args = [&](auto kernel) {
    PORTLLM_LAUNCH(grid, THREADS, 0, kernel)(W.data_ptr<T>(), h(hi.B), h(hi.A), h(lo.B), h(lo.A), m, n,
                                             W.stride(0), hi.B.stride(0), hi.A.stride(0), hi.na, g);
  };
  if (vectors_along(W, 1)) args(patch_add_mma_kernel<T, H, SPLIT, true>);
  else args(patch_add_mma_kernel<T, H, SPLIT, false>);
  PORTLLM_LAUNCH_CHECK();
}

// The tensor-core path (patch_add_mma.cuh): a 16-bit W with unit column stride, and both factors
// in one 16-bit dtype (group-scaled) or both fp32 (split into bf16 high and low parts of B*s and
// A). Returns false where it does not apply.
bool try_mma(at::Tensor& W, const at::Tensor& B, const at::Tensor& A, const at::Tensor& S) {
  const auto wt = W.scalar_type(), bt = B.scalar_type(), at_ = A.scalar_type();
  if ((wt != at::kBFloat16 && wt != at::kHalf) || W.stride(1) != 1 || bt != at_) return false;
  mma_path::Groups g{}, staged{};
  if (bt == at::kFloat) {
    const at::Tensor Bs = B * S.unsqueeze(0);
    const at::Tensor Bh = Bs.to(at::kBFloat16), Ah = A.to(at::kBFloat16);
    // An Inf's low part is 0, not Inf - Inf = NaN: an Inf factor merges as Inf (kernels/patch_add.py's
    // _split_bf16 does the same).
    auto low = [](const at::Tensor& x, const at::Tensor& hi) {
      return at::where(hi.isinf(), at::zeros_like(x), x - hi.to(at::kFloat)).to(at::kBFloat16);
    };
    const at::Tensor Bl = low(Bs, Bh), Al = low(A, Ah);
    g.n = 1;
    g.k[0] = 0;
    g.k[1] = static_cast<int>(B.size(1));
    g.s[0] = 1.f;
    const Staged hi = stage(Bh, Ah, g, staged), lo = stage(Bl, Al, g, staged);
    if (wt == at::kBFloat16) launch_mma<c10::BFloat16, __nv_bfloat16, true>(W, hi, lo, staged);
    else launch_mma<c10::Half, __nv_bfloat16, true>(W, hi, lo, staged);
    return true;
  }
  if (!scale_groups(S, g)) return false;
  const Staged f = stage(B, A, g, staged);
  if (bt == at::kBFloat16) {
    if (wt == at::kBFloat16) launch_mma<c10::BFloat16, __nv_bfloat16, false>(W, f, f, staged);
    else launch_mma<c10::Half, __nv_bfloat16, false>(W, f, f, staged);
  } else {
    if (wt == at::kBFloat16) launch_mma<c10::BFloat16, __half, false>(W, f, f, staged);
    else launch_mma<c10::Half, __half, false>(W, f, f, staged);
  }
  return true;
}

void patch_add_cuda(at::Tensor W, const at::Tensor& B, const at::Tensor& A,
                    const at::Tensor& scale) {
  check_patch_add_args(W, B, A, scale);
  if (W.numel() == 0 || B.size(1) == 0) return;
  PORTLLM_CUDA_GUARD(W);
  // A column-major W (stride(0) == 1) is the row-major problem W^T += A^T diag(s) B^T.
  const bool transposed = W.stride(1) != 1 && W.stride(0) == 1 && W.size(1) > 1;
  at::Tensor Wk = transposed ? W.t() : W;
  at::Tensor Bk = transposed ? A.t() : B;
  at::Tensor Ak = transposed ? B.t() : A;
  const at::Tensor S = scale.contiguous();
  if (try_mma(Wk, Bk, Ak, S)) return;
  // The fp32 kernel: both factors in one dtype (they are read in the kernel as they are, without a
  // copy); mixed factor dtypes are upcast to fp32 here, which is exact.
  if (Bk.scalar_type() != Ak.scalar_type()) {
    Bk = Bk.to(at::kFloat);
    Ak = Ak.to(at::kFloat);
  }
  PORTLLM_DISPATCH_FLOATS(Wk.scalar_type(), "patch_add_cuda", [&] {
    using T = scalar_t;
    PORTLLM_DISPATCH_FLOATS(Bk.scalar_type(), "patch_add_cuda_f", [&] {
      launch<T, scalar_t>(Wk, Bk, Ak, S);
    });
  });
}

}  // namespace

PORTLLM_CUDA_IMPL("patch_add_", &patch_add_cuda)

}  // namespace portllm
