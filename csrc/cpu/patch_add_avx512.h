// AVX-512 micro-kernels of patch_add_ on CPU (x86-64 with GCC or clang; chosen at run time).
//
//  * rows_fp32:   fp32 FMAs on Bs = B*scale (fp32, m x r) and Af (fp32, r x n).
//  * rows_bf16dot: AVX512-BF16 dot products (vdpbf16ps) on bf16 factors: each instruction
//    multiplies two ranks' bf16 values exactly and adds both products to fp32 accumulators, at
//    twice the rate of fp32 FMAs. Ranks come in groups that share one scale (one group per
//    concatenated patch); each group is summed, then scaled in fp32 and accumulated:
//        W + sum_g s_g * (sum_{k in g} B[i,k] A[k,j])
//    vdpbf16ps and vcvtneps2bf16 treat subnormal inputs and results as zero.
//
// Both hold a block of W (8 rows x 32 columns; 6 x 64 for bf16 dots) as fp32 accumulators in
// registers, read each W element
// once, add, round once to W's dtype (nearest even) and write it once.
#pragma once
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PORTLLM_X86_AVX512 1
#include <immintrin.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#define PORTLLM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c")))
#define PORTLLM_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma,f16c")))

namespace portllm {
namespace avx512 {

inline __mmask16 tail_mask(int64_t cols) {
  return cols >= 16 ? __mmask16(0xFFFF) : cols <= 0 ? __mmask16(0) : __mmask16((1u << cols) - 1);
}

PORTLLM_AVX512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
PORTLLM_AVX512 inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
PORTLLM_AVX512 inline __m512 load16(const c10::Half* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
PORTLLM_AVX512 inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
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
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// W is streamed through once; fetching it ahead of the FMAs overlaps the memory traffic with the
// arithmetic (the hardware prefetchers alone leave the cores waiting on several row streams).
#ifndef PORTLLM_PREFETCH_COLS
#define PORTLLM_PREFETCH_COLS 256
#endif
template <int RB, typename T, int COLS = 32>
inline void prefetch_rows(const T* W, int64_t ldw) {
  constexpr int64_t lines = (COLS * sizeof(T) + 63) / 64;
#pragma GCC unroll 8
  for (int ii = 0; ii < RB; ++ii)
    for (int64_t l = 0; l < lines; ++l)
      _mm_prefetch(reinterpret_cast<const char*>(W + ii * ldw + PORTLLM_PREFETCH_COLS) + 64 * l, _MM_HINT_T0);
}

// Calls micro<rb>(...) for the row count rb in 1..RB, as a compile-time constant.
template <int RB, template <int> class Micro, typename... Args>
inline void dispatch_rows(int64_t rb, Args&&... args) {
  if constexpr (RB >= 1) {
    if (rb == RB) return Micro<RB>::run(args...);
    if constexpr (RB > 1) return dispatch_rows<RB - 1, Micro>(rb, args...);
  }
}

// ---- fp32 FMA path ----------------------------------------------------------------------------
template <typename T>
struct Fp32 {
  template <int RB>
  struct Micro {
    PORTLLM_AVX512 static inline void run(T* W, int64_t ldw, const float* Bs, int64_t r,
                                          const float* Af, int64_t lda, int64_t cols) {
      const __mmask16 m0 = tail_mask(cols), m1 = tail_mask(cols - 16);
      prefetch_rows<RB>(W, ldw);
      __m512 acc0[RB], acc1[RB];
#pragma GCC unroll 8
      for (int ii = 0; ii < RB; ++ii) acc0[ii] = acc1[ii] = _mm512_setzero_ps();
      for (int64_t k = 0; k < r; ++k) {
        const float* a = Af + k * lda;
        const __m512 a0 = _mm512_maskz_loadu_ps(m0, a), a1 = _mm512_maskz_loadu_ps(m1, a + 16);
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
  };
};

}  // namespace avx512
}  // namespace portllm
#include "cpu/patch_add_avx512_bf16w.h"
namespace portllm {
namespace avx512 {

// Rows [i0, i1) of W (unit column stride, row stride ldw). Column blocks keep the factor block
// (r x nb fp32) in L2 while the rows stream past it, copied into contiguous 32-column panels (one
// page per micro-kernel's factor reads instead of r rows n floats apart: 10-20% at r >= 16 for
// fp16 and fp32 W, measured). bf16 W has a kernel of its own (csrc/cpu/patch_add_avx512_bf16w.h).
template <typename T>
PORTLLM_AVX512 void rows_fp32(T* W, int64_t ldw, const float* Bs, const float* Af, int64_t r,
                              int64_t n, int64_t i0, int64_t i1) {
  constexpr int RB = 8;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    bf16w::rows<RB>(W, ldw, Bs, Af, r, n, i0, i1, 256 * 1024);
  } else {
    const int64_t nv = n / 32 * 32;
    if (nv > 0 && i1 > i0) {
      const int64_t nb = std::max<int64_t>(32, std::min<int64_t>(nv, (256 * 1024) / (4 * std::max<int64_t>(r, 1))) / 32 * 32);
      std::vector<float> buf(static_cast<size_t>(r * nb));
      for (int64_t jb = 0; jb < nv; jb += nb) {
        const int64_t je = std::min(nv, jb + nb);
        for (int64_t j = jb; j < je; j += 32) {
          float* dst = buf.data() + (j - jb) * r;
          for (int64_t k = 0; k < r; ++k) {
            _mm512_storeu_ps(dst + 32 * k, _mm512_loadu_ps(Af + k * n + j));
            _mm512_storeu_ps(dst + 32 * k + 16, _mm512_loadu_ps(Af + k * n + j + 16));
          }
        }
        for (int64_t i = i0; i < i1; i += RB) {
          const int64_t rb = std::min<int64_t>(RB, i1 - i);
          for (int64_t j = jb; j < je; j += 32)
            dispatch_rows<RB, Fp32<T>::template Micro>(rb, W + i * ldw + j, ldw, Bs + i * r, r,
                                                       static_cast<const float*>(buf.data() + (j - jb) * r),
                                                       int64_t(32), int64_t(32));
        }
      }
    }
    if (nv < n)
      for (int64_t i = i0; i < i1; i += RB)
        dispatch_rows<RB, Fp32<T>::template Micro>(std::min<int64_t>(RB, i1 - i), W + i * ldw + nv, ldw, Bs + i * r,
                                                   r, Af + nv, n, n - nv);
  }
}

// ---- AVX512-BF16 dot-product path -------------------------------------------------------------
// Bp: int32 [m, kp], each (B[i,2p], B[i,2p+1]) as a bf16 pair; Ap: int32 [kp, n], (A[2p,j],
// A[2p+1,j]). Pairs [gend[g-1], gend[g]) form group g, scaled by gscale[g].
struct Groups {
  const int64_t* end;
  const float* scale;
  int count;
};

// fp32 -> bf16 in one instruction (vcvtneps2bf16: nearest even; NaN stays NaN, subnormals -> 0).
PORTLLM_AVX512BF16 inline void store16_bf16cvt(c10::BFloat16* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}
template <typename T>
PORTLLM_AVX512BF16 inline void store16_fast(T* p, __m512 v, __mmask16 m) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) store16_bf16cvt(p, v, m);
  else store16(p, v, m);
}

// Accumulators: RB rows x NV vectors of 16 columns. More columns per row than the fp32 path:
// fewer broadcasts per dot product, which is what limits this loop.
constexpr int BF_NV = 4;

template <int RB, int NV>
PORTLLM_AVX512BF16 inline void dot_pairs(__m512 (&t)[RB][NV], const int32_t* Bp, int64_t kp,
                                         const int32_t* Ap, int64_t lda, int64_t p0, int64_t p1,
                                         const __mmask16 (&mk)[NV]) {
  for (int64_t p = p0; p < p1; ++p) {
    const int32_t* a = Ap + p * lda;
    __m512bh av[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) av[v] = (__m512bh)_mm512_maskz_loadu_epi32(mk[v], a + 16 * v);
#pragma GCC unroll 8
    for (int ii = 0; ii < RB; ++ii) {
      const __m512bh b = (__m512bh)_mm512_set1_epi32(Bp[ii * kp + p]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) t[ii][v] = _mm512_dpbf16_ps(t[ii][v], b, av[v]);
    }
  }
}

template <typename T, bool MULTI>
struct Bf16Dot {
  template <int RB>
  struct Micro {
    PORTLLM_AVX512BF16 static inline void run(T* W, int64_t ldw, const int32_t* Bp, int64_t kp,
                                              const int32_t* Ap, int64_t lda, int64_t cols,
                                              const Groups& g) {
      constexpr int NV = BF_NV;
      __mmask16 mk[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) mk[v] = tail_mask(cols - 16 * v);
      prefetch_rows<RB, T, 16 * NV>(W, ldw);
      __m512 acc[RB][NV];
#pragma GCC unroll 8
      for (int ii = 0; ii < RB; ++ii)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[ii][v] = _mm512_setzero_ps();
      __m512 s;
      if constexpr (!MULTI) {
        dot_pairs<RB, NV>(acc, Bp, kp, Ap, lda, 0, kp, mk);
        s = _mm512_set1_ps(g.scale[0]);
      } else {
        // Each group's sum is scaled and added to a running total kept in L1: a second set of
        // register accumulators would not fit.
        alignas(64) float total[RB][NV][16];
        int64_t p = 0;
        for (int gi = 0; gi < g.count; ++gi) {
          if (gi > 0) {
#pragma GCC unroll 8
            for (int ii = 0; ii < RB; ++ii)
#pragma GCC unroll 4
              for (int v = 0; v < NV; ++v) acc[ii][v] = _mm512_setzero_ps();
          }
          dot_pairs<RB, NV>(acc, Bp, kp, Ap, lda, p, g.end[gi], mk);
          p = g.end[gi];
          const __m512 sg = _mm512_set1_ps(g.scale[gi]);
#pragma GCC unroll 8
          for (int ii = 0; ii < RB; ++ii)
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) {
              const __m512 prev = gi == 0 ? _mm512_setzero_ps() : _mm512_load_ps(total[ii][v]);
              _mm512_store_ps(total[ii][v], _mm512_fmadd_ps(sg, acc[ii][v], prev));
            }
        }
#pragma GCC unroll 8
        for (int ii = 0; ii < RB; ++ii)
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) acc[ii][v] = _mm512_load_ps(total[ii][v]);
        s = _mm512_set1_ps(1.f);  // already scaled: 1 * acc is exact
      }
#pragma GCC unroll 8
      for (int ii = 0; ii < RB; ++ii) {
        T* w = W + ii * ldw;
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v)
          if (mk[v]) store16_fast(w + 16 * v, _mm512_fmadd_ps(s, acc[ii][v], load16(w + 16 * v, mk[v])), mk[v]);
      }
    }
  };
};

template <typename T, bool MULTI>
PORTLLM_AVX512BF16 void rows_bf16dot_impl(T* W, int64_t ldw, const int32_t* Bp, const int32_t* Ap,
                                          int64_t kp, int64_t n, const Groups& g, int64_t i0,
                                          int64_t i1) {
  constexpr int RB = 6;
  constexpr int64_t CB = 16 * BF_NV;  // columns per micro-kernel call
  const int64_t nb = std::max<int64_t>(CB, std::min<int64_t>(n, (256 * 1024) / (4 * kp)) / CB * CB);
  for (int64_t jb = 0; jb < n; jb += nb) {
    const int64_t je = std::min(n, jb + nb);
    for (int64_t i = i0; i < i1; i += RB) {
      const int64_t rb = std::min<int64_t>(RB, i1 - i);
      for (int64_t j = jb; j < je; j += CB) {
        dispatch_rows<RB, Bf16Dot<T, MULTI>::template Micro>(rb, W + i * ldw + j, ldw, Bp + i * kp, kp,
                                                             Ap + j, n, std::min<int64_t>(CB, je - j), g);
      }
    }
  }
}

template <typename T>
void rows_bf16dot(T* W, int64_t ldw, const int32_t* Bp, const int32_t* Ap, int64_t kp, int64_t n,
                  const Groups& g, int64_t i0, int64_t i1) {
  if (g.count == 1) return rows_bf16dot_impl<T, false>(W, ldw, Bp, Ap, kp, n, g, i0, i1);
  rows_bf16dot_impl<T, true>(W, ldw, Bp, Ap, kp, n, g, i0, i1);
}

}  // namespace avx512
}  // namespace portllm
#endif  // x86-64
