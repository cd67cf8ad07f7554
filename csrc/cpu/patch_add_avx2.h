// AVX2 + FMA (+ F16C) micro-kernel of patch_add_ on CPU (x86-64 with GCC or clang; chosen at run
// time, for the CPUs without AVX-512: most laptops and many servers).
//
//  rows_fp32: fp32 FMAs on Bs = B*scale (fp32, m x r) and Af (fp32, r x n), the same numerics as
//  the AVX-512 fp32 path and the reference: W + sum_k fp32(B[i,k]*s_k)*A[k,j], summed in k order
//  in fp32, one rounding to W's dtype (nearest even).
//
// fp32 and fp16 W: a 6-row x 16-column block of W lives in 12 ymm accumulators; per rank, two loads
// of Af and six broadcasts of Bs feed twelve FMAs (the 16 registers hold 12 + 2 + 1 + a spare).
// bf16 W has a kernel of its own (csrc/cpu/patch_add_avx2_bf16.h). Each W element is read once,
// added, rounded once and written once. Columns are blocked so that the factor block
// Af[:, jb:je] (r x nb fp32) stays in L2 while the rows stream past it, and W is prefetched a few
// blocks ahead so the memory traffic overlaps the FMAs.
#pragma once
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PORTLLM_X86_AVX2 1
#include <immintrin.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#define PORTLLM_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace portllm {
namespace avx2 {

// 8 elements of W as fp32 (exact widening), and back with one rounding to nearest even.
PORTLLM_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
PORTLLM_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
PORTLLM_AVX2 inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
PORTLLM_AVX2 inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
// fp32 -> bf16, round to nearest even; NaN -> 0x7FC0 (as c10::BFloat16).
PORTLLM_AVX2 inline void store8(c10::BFloat16* p, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
  // 8 x 32-bit (values < 2^16) -> 8 x 16-bit: pack within lanes, then put the two halves together.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
PORTLLM_AVX2 inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// fp32 -> bf16 for 16 consecutive elements (v0: the first 8): rounding as store8, with one pack,
// one permute and one 32-byte store for both halves.
PORTLLM_AVX2 inline __m256i round_bf16_bits(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}
PORTLLM_AVX2 inline void store16(c10::BFloat16* p, __m256 v0, __m256 v1) {
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(round_bf16_bits(v0), round_bf16_bits(v1)), 0xD8);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
}
template <typename T>
PORTLLM_AVX2 inline void store16(T* p, __m256 v0, __m256 v1) {
  store8(p, v0);
  store8(p + 8, v1);
}

// How far ahead (in columns) W is prefetched along each row.
constexpr int64_t kPrefetchCols = 256;

// RB rows x 8*NV columns of W += Bs[rows, :r] . panel[:r, 8*NV columns] (panel rows contiguous).
template <typename T, int NV>
struct Micro {
  template <int RB>
  PORTLLM_AVX2 static inline void run(T* W, int64_t ldw, const float* Bs, int64_t r, const float* P) {
#pragma GCC unroll 6
    for (int ii = 0; ii < RB; ++ii)
      _mm_prefetch(reinterpret_cast<const char*>(W + ii * ldw + kPrefetchCols), _MM_HINT_T0);
    __m256 acc[RB][NV];
#pragma GCC unroll 6
    for (int ii = 0; ii < RB; ++ii)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[ii][v] = _mm256_setzero_ps();
    for (int64_t k = 0; k < r; ++k) {
      __m256 a[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) a[v] = _mm256_loadu_ps(P + k * 8 * NV + 8 * v);
#pragma GCC unroll 6
      for (int ii = 0; ii < RB; ++ii) {
        const __m256 b = _mm256_broadcast_ss(Bs + ii * r + k);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[ii][v] = _mm256_fmadd_ps(b, a[v], acc[ii][v]);
      }
    }
#pragma GCC unroll 6
    for (int ii = 0; ii < RB; ++ii) {
      T* w = W + ii * ldw;
#pragma GCC unroll 2
      for (int v = 0; v < NV; v += 2)
        store16(w + 8 * v, _mm256_add_ps(load8(w + 8 * v), acc[ii][v]),
                _mm256_add_ps(load8(w + 8 * v + 8), acc[ii][v + 1]));
    }
  }
};

}  // namespace avx2
}  // namespace portllm
#include "cpu/patch_add_avx2_bf16.h"
namespace portllm {
namespace avx2 {

// Register blocks of the fp32 and fp16 W kernel: 6 rows x 16 columns (two vectors), 12 accumulators.
// (bf16 W: csrc/cpu/patch_add_avx2_bf16.h, also 16 columns per block.)
constexpr int kRows = 6;
constexpr int64_t kCols = 16;

template <typename T>
PORTLLM_AVX2 inline void micro_rows(int64_t rb, T* W, int64_t ldw, const float* Bs, int64_t r, const float* P) {
  using M = Micro<T, kCols / 8>;
  switch (rb) {
    case 6: return M::template run<6>(W, ldw, Bs, r, P);
    case 5: return M::template run<5>(W, ldw, Bs, r, P);
    case 4: return M::template run<4>(W, ldw, Bs, r, P);
    case 3: return M::template run<3>(W, ldw, Bs, r, P);
    case 2: return M::template run<2>(W, ldw, Bs, r, P);
    default: return M::template run<1>(W, ldw, Bs, r, P);
  }
}

// fp32 and fp16 W, rows [i0, i1) (unit column stride, row stride ldw), columns [0, n / 16 * 16).
// For each column block, Af[:, jb:je] is first copied into 16-column panels, each r x 16 contiguous
// floats: a micro-kernel then reads its factor rows sequentially (one page, prefetched by the
// hardware) instead of r rows n floats apart (r pages, r TLB entries), which halved its FMA rate.
template <typename T>
PORTLLM_AVX2 void rows_blocks(T* W, int64_t ldw, const float* Bs, const float* Af, int64_t r, int64_t n,
                              int64_t i0, int64_t i1) {
  const int64_t nv = n / kCols * kCols;
  if (nv == 0 || i1 <= i0) return;
  const int64_t nb = std::max<int64_t>(kCols, std::min<int64_t>(nv, (192 * 1024) / (4 * std::max<int64_t>(r, 1))) / kCols * kCols);
  std::vector<float> panel_buf(static_cast<size_t>(r * nb) + kCols);
  float* panels = panel_buf.data();
  for (int64_t jb = 0; jb < nv; jb += nb) {
    const int64_t je = std::min(nv, jb + nb);
    for (int64_t j = jb; j < je; j += kCols) {
      float* dst = panels + (j - jb) * r;
      for (int64_t k = 0; k < r; ++k)
        for (int64_t v = 0; v < kCols; v += 8) _mm256_storeu_ps(dst + kCols * k + v, _mm256_loadu_ps(Af + k * n + j + v));
    }
    for (int64_t i = i0; i < i1; i += kRows) {
      const int64_t rb = std::min<int64_t>(kRows, i1 - i);
      for (int64_t j = jb; j < je; j += kCols) micro_rows<T>(rb, W + i * ldw + j, ldw, Bs + i * r, r, panels + (j - jb) * r);
    }
  }
}

// Rows [i0, i1) of W. Columns past the last multiple of 16 are left to the caller (the portable
// path), which computes them with the same fp32 sums.
template <typename T>
PORTLLM_AVX2 void rows_fp32(T* W, int64_t ldw, const float* Bs, const float* Af, int64_t r, int64_t n,
                            int64_t i0, int64_t i1) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) bf16w::rows(W, ldw, Bs, Af, r, n, i0, i1);
  else rows_blocks<T>(W, ldw, Bs, Af, r, n, i0, i1);
}

// The columns rows_fp32 leaves to the portable path: those from this one on.
template <typename T>
constexpr int64_t vector_columns(int64_t n) {
  return n / kCols * kCols;
}

}  // namespace avx2
}  // namespace portllm
#endif  // x86-64
