// patch_add_ on CPU: W[m, n] += B[m, r] . diag(scale) . A[r, n], in place.
//
// Memory-bound for small r: W is read once and written once, the m x n delta never exists.
// The factors are first turned into fp32 (Bs = B * scale, m x r; Af = A, r x n: factor-sized),
// then each output element is  round(W + sum_k Bs[i,k] * Af[k,j])  with the sum in fp32 and one
// rounding to W's dtype (round-to-nearest-even, as torch's own casts).
//
// Two paths: an AVX-512 micro-kernel (8 rows x 32 columns of fp32 accumulators in registers,
// chosen at run time when the CPU has AVX-512) and a portable one that also handles arbitrary
// strides. Rows are split over ATen's OpenMP pool; results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "portllm.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PORTLLM_X86_AVX512 1
#include <immintrin.h>
#endif

namespace portllm {

void check_patch_add_args(const at::Tensor& W, const at::Tensor& B, const at::Tensor& A,
                          const at::Tensor& scale) {
  TORCH_CHECK(W.dim() == 2, "patch_add_: W must be 2-D, got shape ", W.sizes());
  TORCH_CHECK(B.dim() == 2, "patch_add_: B must be 2-D, got shape ", B.sizes());
  TORCH_CHECK(A.dim() == 2, "patch_add_: A must be 2-D, got shape ", A.sizes());
  TORCH_CHECK(B.size(0) == W.size(0) && A.size(1) == W.size(1) && B.size(1) == A.size(0),
              "patch_add_: shapes do not match: W ", W.sizes(), ", B ", B.sizes(), ", A ",
              A.sizes(), " (need W [m, n], B [m, r], A [r, n])");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == B.size(1),
              "patch_add_: scale must have shape [", B.size(1), "] (one per rank), got ",
              scale.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kFloat, "patch_add_: scale must be float32, got ",
              scale.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"W", W}, {"B", B}, {"A", A}}) {
    auto dt = t.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "patch_add_: ", name,
                " has dtype ", dt, "; supported: float32, float16, bfloat16");
    TORCH_CHECK(t.device() == W.device(), "patch_add_: ", name, " is on ", t.device(),
                " but W is on ", W.device());
  }
  TORCH_CHECK(scale.device() == W.device(), "patch_add_: scale is on ", scale.device(),
              " but W is on ", W.device());
  at::assert_no_internal_overlap(W);
}

namespace {

// ---------------------------------------------------------------------------------------------
// Portable path: any strides. acc holds one block of a row in fp32.
template <typename T>
void rows_generic(T* W, int64_t sw0, int64_t sw1, const float* Bs, const float* Af, int64_t r,
                  int64_t n, int64_t i0, int64_t i1) {
  constexpr int64_t NB = 512;
  float acc[NB];
  for (int64_t i = i0; i < i1; ++i) {
    const float* b = Bs + i * r;
    for (int64_t j0 = 0; j0 < n; j0 += NB) {
      const int64_t nb = std::min(NB, n - j0);
      std::fill(acc, acc + nb, 0.f);
      for (int64_t k = 0; k < r; ++k) {
        const float bk = b[k];
        const float* a = Af + k * n + j0;
        for (int64_t j = 0; j < nb; ++j) acc[j] += bk * a[j];
      }
      T* w = W + i * sw0 + j0 * sw1;
      for (int64_t j = 0; j < nb; ++j) {
        w[j * sw1] = static_cast<T>(static_cast<float>(w[j * sw1]) + acc[j]);
      }
    }
  }
}

#ifdef PORTLLM_X86_AVX512
#define PORTLLM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c")))

PORTLLM_AVX512 inline __m512 load16(const float* p, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, p);
}
PORTLLM_AVX512 inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
PORTLLM_AVX512 inline __m512 load16(const c10::Half* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
PORTLLM_AVX512 inline void store16(float* p, __m512 v, __mmask16 m) {
  _mm512_mask_storeu_ps(p, m, v);
}
// fp32 -> bf16, round to nearest even; NaN -> 0x7FC0 (as c10::BFloat16).
PORTLLM_AVX512 inline void store16(c10::BFloat16* p, __m512 v, __mmask16 m) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff));
  __m512i res = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  res = _mm512_mask_blend_epi32(nan, res, _mm512_set1_epi32(0x7fc0));
  _mm512_mask_cvtepi32_storeu_epi16(p, m, res);
}
PORTLLM_AVX512 inline void store16(c10::Half* p, __m512 v, __mmask16 m) {
  const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  _mm256_mask_storeu_epi16(p, m, h);
}

inline __mmask16 tail_mask(int64_t cols) {
  return cols >= 16 ? __mmask16(0xFFFF) : cols <= 0 ? __mmask16(0) : __mmask16((1u << cols) - 1);
}

// RB rows x up to 32 columns: acc = Bs[rows, :] @ Af[:, cols] in registers, then W += acc.
template <int RB, typename T>
PORTLLM_AVX512 inline void micro_avx512(T* W, int64_t ldw, const float* Bs, int64_t r,
                                        const float* Af, int64_t lda, int64_t cols) {
  const __mmask16 m0 = tail_mask(cols), m1 = tail_mask(cols - 16);
  __m512 acc0[RB], acc1[RB];
#pragma GCC unroll 8
  for (int ii = 0; ii < RB; ++ii) acc0[ii] = acc1[ii] = _mm512_setzero_ps();
  for (int64_t k = 0; k < r; ++k) {
    const float* a = Af + k * lda;
    const __m512 a0 = _mm512_maskz_loadu_ps(m0, a);
    const __m512 a1 = _mm512_maskz_loadu_ps(m1, a + 16);
#pragma GCC unroll 8
    for (int ii = 0; ii < RB; ++ii) {
      const __m512 b = _mm512_set1_ps(Bs[ii * r + k]);
      acc0[ii] = _mm512_fmadd_ps(b, a0, acc0[ii]);
      acc1[ii] = _mm512_fmadd_ps(b, a1, acc1[ii]);
    }
  }
#pragma GCC unroll 8
  for (int ii = 0; ii < RB; ++ii) {
    T* w = W + ii * ldw;
    store16(w, _mm512_add_ps(load16(w, m0), acc0[ii]), m0);
    if (m1) store16(w + 16, _mm512_add_ps(load16(w + 16, m1), acc1[ii]), m1);
  }
}

template <typename T>
PORTLLM_AVX512 void rows_avx512(T* W, int64_t ldw, const float* Bs, const float* Af, int64_t r,
                                int64_t n, int64_t i0, int64_t i1) {
  constexpr int RB = 8;
  // Column block: Af[:, block] (r x nb fp32) stays in L2 while the rows stream past it.
  const int64_t budget = 256 * 1024;
  const int64_t nb = std::max<int64_t>(32, std::min<int64_t>(n, budget / (4 * r)) / 32 * 32);
  for (int64_t jb = 0; jb < n; jb += nb) {
    const int64_t je = std::min(n, jb + nb);
    for (int64_t i = i0; i < i1; i += RB) {
      const int64_t rb = std::min<int64_t>(RB, i1 - i);
      T* wrow = W + i * ldw;
      const float* brow = Bs + i * r;
      for (int64_t j = jb; j < je; j += 32) {
        const int64_t cols = std::min<int64_t>(32, je - j);
        switch (rb) {
          case 8: micro_avx512<8>(wrow + j, ldw, brow, r, Af + j, n, cols); break;
          case 7: micro_avx512<7>(wrow + j, ldw, brow, r, Af + j, n, cols); break;
          case 6: micro_avx512<6>(wrow + j, ldw, brow, r, Af + j, n, cols); break;
          case 5: micro_avx512<5>(wrow + j, ldw, brow, r, Af + j, n, cols); break;
          case 4: micro_avx512<4>(wrow + j, ldw, brow, r, Af + j, n, cols); break;
          case 3: micro_avx512<3>(wrow + j, ldw, brow, r, Af + j, n, cols); break;
          case 2: micro_avx512<2>(wrow + j, ldw, brow, r, Af + j, n, cols); break;
          default: micro_avx512<1>(wrow + j, ldw, brow, r, Af + j, n, cols); break;
        }
      }
    }
  }
}

bool has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}
#else
bool has_avx512() { return false; }
#endif  // PORTLLM_X86_AVX512

bool avx512_enabled() {
  // PORTLLM_CPU_ISA=generic forces the portable path (used by the tests to cover both paths).
  const char* env = std::getenv("PORTLLM_CPU_ISA");
  if (env && std::string(env) == "generic") return false;
  return has_avx512();
}

template <typename T>
void run(const at::Tensor& W, const at::Tensor& Bs, const at::Tensor& Af) {
  const int64_t m = W.size(0), n = W.size(1), r = Bs.size(1);
  // A size-1 dimension's stride is meaningless; make the unit-stride test see through it.
  const int64_t sw0 = m == 1 ? n : W.stride(0);
  const int64_t sw1 = n == 1 ? 1 : W.stride(1);
  T* w = W.data_ptr<T>();
  const float* bs = Bs.data_ptr<float>();
  const float* af = Af.data_ptr<float>();
  const bool vec = sw1 == 1 && avx512_enabled();
  const int64_t grain = std::max<int64_t>(8, (int64_t(1) << 16) / std::max<int64_t>(n, 1));
  at::parallel_for(0, m, grain, [&](int64_t i0, int64_t i1) {
#ifdef PORTLLM_X86_AVX512
    if (vec) return rows_avx512<T>(w, sw0, bs, af, r, n, i0, i1);
#endif
    rows_generic<T>(w, sw0, sw1, bs, af, r, n, i0, i1);
  });
}

void patch_add_cpu(at::Tensor W, const at::Tensor& B, const at::Tensor& A,
                   const at::Tensor& scale) {
  check_patch_add_args(W, B, A, scale);
  if (W.numel() == 0 || B.size(1) == 0) return;
  // A column-major W (stride(0) == 1) is the row-major problem W^T += A^T diag(s) B^T.
  const bool transposed = W.stride(1) != 1 && W.stride(0) == 1 && W.size(1) > 1;
  at::Tensor Wk = transposed ? W.t() : W;
  const at::Tensor& Bk = transposed ? A.t() : B;
  const at::Tensor& Ak = transposed ? B.t() : A;
  at::Tensor Bs = (Bk.to(at::kFloat) * scale.unsqueeze(0)).contiguous();
  at::Tensor Af = Ak.to(at::kFloat).contiguous();
  // Af may still be A's own memory; if that memory is part of W, writing W would change it.
  if (Af.is_alias_of(W)) Af = Af.clone();
  PORTLLM_DISPATCH_FLOATS(Wk.scalar_type(), "patch_add_cpu",
                                  [&] { run<scalar_t>(Wk, Bs, Af); });
}

}  // namespace

std::string cpu_isa() { return has_avx512() ? "avx512" : "generic"; }

TORCH_LIBRARY_IMPL(portllm, CPU, m) { m.impl("patch_add_", &patch_add_cpu); }

}  // namespace portllm
