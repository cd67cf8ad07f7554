// patch_add_ on CPU: W[m, n] += B[m, r] . diag(scale) . A[r, n], in place.
//
// Memory-bound for small r: W is read once and written once, the m x n delta never exists.
// The factors are first turned into fp32 (Bs = B * scale, m x r; Af = A, r x n: factor-sized),
// then each output element is  round(W + sum_k Bs[i,k] * Af[k,j])  with the sum in fp32 and one
// rounding to W's dtype (round-to-nearest-even, as torch's own casts).
//
// Paths, chosen per call from the CPU's features (csrc/cpu/isa.cpp; PORTLLM_CPU_ISA forces a lower one):
//   avx512bf16  bf16 factors: exact bf16 products summed in fp32 at twice the fp32 FMA rate
//               (csrc/cpu/patch_add_avx512.h); other factors: the avx512 path
//   avx512      fp32 FMAs, 8x32 register blocks (csrc/cpu/patch_add_avx512.h)
//   avx2        fp32 FMAs, 6x16 register blocks (csrc/cpu/patch_add_avx2.h)
//   generic     portable C++ that compilers vectorize (SSE2 on x86-64, NEON on aarch64); any strides
// Rows are split over ATen's OpenMP pool; no result depends on the thread count.
//
// Implements portllm.ops.patch_add_ (torch.ops.portllm.patch_add_); tested against the reference by tests/test_patch_add.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "portllm.h"

#include "cpu/isa.h"
#include "cpu/patch_add_avx2.h"
#include "cpu/patch_add_avx512.h"

namespace portllm {

namespace {

// ---------------------------------------------------------------------------------------------
// Portable path: any strides. acc holds one block of a row in fp32.
// Portable path: any strides, columns [j_begin, n). acc holds one block of a row in fp32; the
// inner loops have unit strides and no dependences, so compilers vectorize them. The sum runs in
// k order with separate multiply and add (-ffp-contract may fuse them; either is within the bound).
template <typename T>
void rows_generic(T* W, int64_t sw0, int64_t sw1, const float* Bs, const float* Af, int64_t r,
                  int64_t n, int64_t i0, int64_t i1, int64_t j_begin = 0) {
  constexpr int64_t NB = 512;
  alignas(64) float acc[NB];
  for (int64_t i = i0; i < i1; ++i) {
    const float* b = Bs + i * r;
    for (int64_t j0 = j_begin; j0 < n; j0 += NB) {
      const int64_t nb = std::min(NB, n - j0);
      std::fill(acc, acc + nb, 0.f);
      for (int64_t k = 0; k < r; ++k) {
        const float bk = b[k];
        const float* __restrict__ a = Af + k * n + j0;
        for (int64_t j = 0; j < nb; ++j) acc[j] += bk * a[j];
      }
      T* w = W + i * sw0 + j0 * sw1;
      if (sw1 == 1) {
        for (int64_t j = 0; j < nb; ++j) w[j] = static_cast<T>(static_cast<float>(w[j]) + acc[j]);
      } else {
        for (int64_t j = 0; j < nb; ++j) w[j * sw1] = static_cast<T>(static_cast<float>(w[j * sw1]) + acc[j]);
      }
    }
  }
}

// W's strides with size-1 dimensions seen through (their stride is meaningless).
std::pair<int64_t, int64_t> row_col_strides(const at::Tensor& W) {
  return {W.size(0) == 1 ? W.size(1) : W.stride(0), W.size(1) == 1 ? 1 : W.stride(1)};
}

int64_t row_grain(int64_t n) {
  return std::max<int64_t>(8, (int64_t(1) << 16) / std::max<int64_t>(n, 1));
}

// fp32 factors: Bs = B * scale (m x r), Af = A (r x n), both contiguous fp32 copies.
template <typename T>
void run_fp32(const at::Tensor& W, const at::Tensor& B, const at::Tensor& A, const at::Tensor& scale,
              Isa isa) {
  at::Tensor Bs = (B.to(at::kFloat) * scale.unsqueeze(0)).contiguous();
  // The avx2 and avx512 bf16-W kernels need NaNs with zero low 16 bits (csrc/cpu/
  // patch_add_avx2_bf16.h). Bs is our own copy; a NaN in it becomes the canonical quiet NaN (any NaN
  // is the same NaN in bf16).
  if (isa != Isa::Generic && W.scalar_type() == at::kBFloat16) Bs.masked_fill_(Bs.isnan(), std::numeric_limits<float>::quiet_NaN());
  // (Factors that alias W arrive as copies: portllm.ops.patch_add_ keeps that promise.)
  const at::Tensor Af = A.to(at::kFloat).contiguous();
  const int64_t m = W.size(0), n = W.size(1), r = Bs.size(1);
  const auto [sw0, sw1] = row_col_strides(W);
  T* w = W.data_ptr<T>();
  const float* bs = Bs.data_ptr<float>();
  const float* af = Af.data_ptr<float>();
  const bool vec = sw1 == 1;
  at::parallel_for(0, m, row_grain(n), [&](int64_t i0, int64_t i1) {
#ifdef PORTLLM_X86_AVX512
    if (vec && isa >= Isa::Avx512) return avx512::rows_fp32<T>(w, sw0, bs, af, r, n, i0, i1);
#endif
#ifdef PORTLLM_X86_AVX2
    if (vec && isa == Isa::Avx2) {
      avx2::rows_fp32<T>(w, sw0, bs, af, r, n, i0, i1);
      // The last columns (fewer than one register block): the same fp32 sums, by the portable loop.
      return rows_generic<T>(w, sw0, 1, bs, af, r, n, i0, i1, avx2::vector_columns<T>(n));
    }
#endif
    rows_generic<T>(w, sw0, sw1, bs, af, r, n, i0, i1);
  });
}

#ifdef PORTLLM_X86_AVX512
// bf16 factors on a CPU with AVX512-BF16: ranks are grouped by equal scale (one group per
// concatenated patch), each group padded to an even count with zero ranks, and the factors
// packed as bf16 pairs for vdpbf16ps. The packed copies have the factors' size.
template <typename T>
void run_bf16dot(const at::Tensor& W, const at::Tensor& B, const at::Tensor& A,
                 const at::Tensor& scale) {
  const int64_t m = W.size(0), n = W.size(1), r = B.size(1);
  const at::Tensor s = scale.contiguous();
  const float* sp = s.data_ptr<float>();
  std::vector<int64_t> dst(r), group_end;
  std::vector<float> group_scale;
  int64_t slot = 0;  // position in the padded rank list
  for (int64_t k = 0; k < r; ++k) {
    if (k > 0 && !(sp[k] == sp[k - 1])) {  // a new group starts on an even slot
      group_end.push_back((slot + 1) / 2);
      slot = (slot + 1) / 2 * 2;
    }
    if (k == 0 || !(sp[k] == sp[k - 1])) group_scale.push_back(sp[k]);
    dst[k] = slot++;
  }
  group_end.push_back((slot + 1) / 2);
  const int64_t kp = group_end.back();
  const at::Tensor idx = at::tensor(dst, at::kLong);
  at::Tensor Bpad = at::zeros({m, 2 * kp}, B.options());
  Bpad.index_copy_(1, idx, B);
  at::Tensor Apad = at::zeros({2 * kp, n}, A.options());
  Apad.index_copy_(0, idx, A);
  // [m, 2kp] bf16 -> [m, kp] int32 pairs; [2kp, n] -> [kp, n, 2] bf16 -> [kp, n] int32 pairs.
  const at::Tensor Bp = Bpad.view(at::kInt);
  // (A fresh tensor: .contiguous() may keep odd strides on size-1 dimensions, which view refuses.)
  const at::Tensor Ap = at::empty({kp, n, 2}, A.options())
                            .copy_(Apad.view({kp, 2, n}).transpose(1, 2))
                            .view(at::kInt)
                            .view({kp, n});
  const avx512::Groups g{group_end.data(), group_scale.data(), static_cast<int>(group_end.size())};
  const auto [sw0, sw1] = row_col_strides(W);
  (void)sw1;
  T* w = W.data_ptr<T>();
  const int32_t* bp = Bp.data_ptr<int32_t>();
  const int32_t* ap = Ap.data_ptr<int32_t>();
  at::parallel_for(0, m, row_grain(n), [&](int64_t i0, int64_t i1) {
    avx512::rows_bf16dot<T>(w, sw0, bp, ap, kp, n, g, i0, i1);
  });
}
#endif

void patch_add_cpu(at::Tensor W, const at::Tensor& B, const at::Tensor& A,
                   const at::Tensor& scale) {
  check_patch_add_args(W, B, A, scale);
  if (W.numel() == 0 || B.size(1) == 0) return;
  // A column-major W (stride(0) == 1) is the row-major problem W^T += A^T diag(s) B^T.
  const bool transposed = W.stride(1) != 1 && W.stride(0) == 1 && W.size(1) > 1;
  const at::Tensor Wk = transposed ? W.t() : W;
  const at::Tensor& Bk = transposed ? A.t() : B;
  const at::Tensor& Ak = transposed ? B.t() : A;
  const Isa isa = isa_for_call();
#ifdef PORTLLM_X86_AVX512
  const bool unit_cols = Wk.size(1) == 1 || Wk.stride(1) == 1;
  if (isa == Isa::Avx512Bf16 && unit_cols && Bk.scalar_type() == at::kBFloat16 &&
      Ak.scalar_type() == at::kBFloat16) {
    PORTLLM_DISPATCH_FLOATS(Wk.scalar_type(), "patch_add_cpu", [&] { run_bf16dot<scalar_t>(Wk, Bk, Ak, scale); });
    return;
  }
#endif
  PORTLLM_DISPATCH_FLOATS(Wk.scalar_type(), "patch_add_cpu", [&] { run_fp32<scalar_t>(Wk, Bk, Ak, scale, isa); });
}

}  // namespace

TORCH_LIBRARY_IMPL(portllm, CPU, m) { m.impl("patch_add_", &patch_add_cpu); }

}  // namespace portllm
