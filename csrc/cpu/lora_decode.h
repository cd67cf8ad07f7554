// Decode-sized serving kernels on CPU (few tokens, each with its own patch slot): one token's
// lora_shrink row h = A x and one token's lora_expand_ row y += s (B h), with AVX-512 or AVX2 vectors
// (csrc/cpu/patch_add_avx512.h's and patch_add_avx2.h's loads and round-to-nearest-even stores).
// 16-bit operands are widened exactly to fp32 in registers (no fp32 copy of a factor per call), the
// products and sums are fp32 FMAs:
//  * shrink_row: four ranks at a time, each an fp32 vector of partial dot products along n, summed
//    across its lanes at the end (x and A with unit stride along n);
//  * expand_row: 128 (AVX-512) or 64 (AVX2) output columns at a time held in registers, rank by rank
//    (B with unit stride along m, portllm.serve's and the vLLM backend's slot layout), then
//    y + s * acc rounded once (y with unit stride).
// Used by csrc/cpu/lora_shrink.cpp and lora_expand.cpp below their GEMM crossovers; the generic path
// (PORTLLM_CPU_ISA=generic, other CPUs, other strides) is each file's own.
#pragma once
#include "cpu/patch_add_avx2.h"
#include "cpu/patch_add_avx512.h"

#if defined(PORTLLM_X86_AVX512)
namespace portllm {
namespace lora_vec {

template <typename TX, typename TA>
PORTLLM_AVX512 void shrink_row_avx512(const TX* x, const TA* A, int64_t sar, int64_t n, int64_t R, float* h) {
  int64_t k = 0;
  for (; k + 4 <= R; k += 4) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const TA* r0 = A + k * sar;
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 m = avx512::tail_mask(n - j);
      const __m512 xv = avx512::load16(x + j, m);
      a0 = _mm512_fmadd_ps(xv, avx512::load16(r0 + j, m), a0);
      a1 = _mm512_fmadd_ps(xv, avx512::load16(r0 + sar + j, m), a1);
      a2 = _mm512_fmadd_ps(xv, avx512::load16(r0 + 2 * sar + j, m), a2);
      a3 = _mm512_fmadd_ps(xv, avx512::load16(r0 + 3 * sar + j, m), a3);
    }
    h[k] = _mm512_reduce_add_ps(a0);
    h[k + 1] = _mm512_reduce_add_ps(a1);
    h[k + 2] = _mm512_reduce_add_ps(a2);
    h[k + 3] = _mm512_reduce_add_ps(a3);
  }
  for (; k < R; ++k) {
    __m512 a = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 m = avx512::tail_mask(n - j);
      a = _mm512_fmadd_ps(avx512::load16(x + j, m), avx512::load16(A + k * sar + j, m), a);
    }
    h[k] = _mm512_reduce_add_ps(a);
  }
}

template <typename Y, typename F>
PORTLLM_AVX512 void expand_row_avx512(Y* y, const float* h, const F* B, int64_t sbr, float s, int64_t R,
                                      int64_t ncols) {
  constexpr int NV = 8;
  const __m512 sv = _mm512_set1_ps(s);
  for (int64_t c = 0; c < ncols; c += 16 * NV) {
    __mmask16 m[NV];
    __m512 acc[NV];
    for (int q = 0; q < NV; ++q) {
      m[q] = avx512::tail_mask(ncols - c - 16 * q);
      acc[q] = _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < R; ++k) {
      const __m512 hk = _mm512_set1_ps(h[k]);
      const F* bk = B + k * sbr + c;
      for (int q = 0; q < NV; ++q) acc[q] = _mm512_fmadd_ps(hk, avx512::load16(bk + 16 * q, m[q]), acc[q]);
    }
    for (int q = 0; q < NV; ++q) {
      if (!m[q]) break;
      Y* yq = y + c + 16 * q;
      avx512::store16(yq, _mm512_fmadd_ps(acc[q], sv, avx512::load16(yq, m[q])), m[q]);
    }
  }
}

template <typename T>
PORTLLM_AVX2 inline __m256 load8_tail(const T* p, int64_t count) {
  if (count >= 8) return avx2::load8(p);
  alignas(32) T tmp[8] = {};
  for (int64_t e = 0; e < count; ++e) tmp[e] = p[e];
  return avx2::load8(tmp);
}

PORTLLM_AVX2 inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

template <typename TX, typename TA>
PORTLLM_AVX2 void shrink_row_avx2(const TX* x, const TA* A, int64_t sar, int64_t n, int64_t R, float* h) {
  for (int64_t k = 0; k < R; k += 4) {
    const int nk = static_cast<int>(std::min<int64_t>(4, R - k));
    __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t j = 0; j < n; j += 8) {
      const __m256 xv = load8_tail(x + j, n - j);
      for (int q = 0; q < nk; ++q) a[q] = _mm256_fmadd_ps(xv, load8_tail(A + (k + q) * sar + j, n - j), a[q]);
    }
    for (int q = 0; q < nk; ++q) h[k + q] = hsum8(a[q]);
  }
}

template <typename Y, typename F>
PORTLLM_AVX2 void expand_row_avx2(Y* y, const float* h, const F* B, int64_t sbr, float s, int64_t R,
                                  int64_t ncols) {
  constexpr int NV = 8;
  const __m256 sv = _mm256_set1_ps(s);
  for (int64_t c = 0; c < ncols; c += 8 * NV) {
    const int nv = static_cast<int>(std::min<int64_t>(NV, (ncols - c + 7) / 8));
    __m256 acc[NV];
    for (int q = 0; q < NV; ++q) acc[q] = _mm256_setzero_ps();
    for (int64_t k = 0; k < R; ++k) {
      const __m256 hk = _mm256_set1_ps(h[k]);
      const F* bk = B + k * sbr + c;
      for (int q = 0; q < nv; ++q) acc[q] = _mm256_fmadd_ps(hk, load8_tail(bk + 8 * q, ncols - c - 8 * q), acc[q]);
    }
    for (int q = 0; q < nv; ++q) {
      Y* yq = y + c + 8 * q;
      const int64_t count = std::min<int64_t>(8, ncols - c - 8 * q);
      const __m256 out = _mm256_fmadd_ps(acc[q], sv, load8_tail(yq, count));
      if (count == 8) {
        avx2::store8(yq, out);
      } else {
        alignas(32) Y tmp[8];
        avx2::store8(tmp, out);
        for (int64_t e = 0; e < count; ++e) yq[e] = tmp[e];
      }
    }
  }
}

}  // namespace lora_vec
}  // namespace portllm
#endif
