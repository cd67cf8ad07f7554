// AVX-512 fp32-FMA micro-kernel of patch_add_ for a bf16 W (included by csrc/cpu/patch_add_avx512.h;
// used by the avx512 path, and by the avx512bf16 path when the factors are not bf16, as PEFT saves
// them in fp32).
//
// The same design as the AVX2 one (csrc/cpu/patch_add_avx2_bf16.h), on 512-bit vectors: factor
// panels packed per 32 columns as [16 even columns, 16 odd columns], so one 64-byte load of W
// becomes two fp32 vectors with one shift and one AND; the rounding to nearest even runs on the
// 16-bit lanes of the packed pair (one vpternlogd makes 0x7ffe + lsb); NaNs need no blend because
// their low 16 bits are zero (the caller makes Bs's NaNs canonical, pack_panel Af's). The sums, and
// so the results, are bit for bit those of the masked kernel it replaces (Fp32<T>::Micro reading
// Af in place, which still does the last n % 32 columns); measured on 4096 x 14336, 2 threads (a
// one-off harness; the benchmark suite's figures are in the README), it took r=8 from 4.8 to
// 3.6 ms, r=16 from 7.7 to 4.9 ms and r=64 from 22.6 to 16.6 ms.
#pragma once

namespace portllm {
namespace avx512 {
namespace bf16w {

constexpr int64_t COLS = 32;

// One 32-column panel of Af (r x n, row stride n) from column j: per k, the 16 even columns then
// the 16 odd ones. NaNs become the canonical quiet NaN (low 16 bits zero).
PORTLLM_AVX512 inline void pack_panel(float* dst, const float* Af, int64_t n, int64_t r, int64_t j) {
  const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i od = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  const __m512 qnan = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fc00000));
  for (int64_t k = 0; k < r; ++k) {
    __m512 x0 = _mm512_loadu_ps(Af + k * n + j), x1 = _mm512_loadu_ps(Af + k * n + j + 16);
    x0 = _mm512_mask_mov_ps(x0, _mm512_cmp_ps_mask(x0, x0, _CMP_UNORD_Q), qnan);
    x1 = _mm512_mask_mov_ps(x1, _mm512_cmp_ps_mask(x1, x1, _CMP_UNORD_Q), qnan);
    _mm512_storeu_ps(dst + 32 * k, _mm512_permutex2var_ps(x0, ev, x1));
    _mm512_storeu_ps(dst + 32 * k + 16, _mm512_permutex2var_ps(x0, od, x1));
  }
}
// ve, vo: fp32 values of the even and odd columns of 32 consecutive elements -> their bf16 bits
// in memory order, rounded to nearest even (see csrc/cpu/patch_add_avx2_bf16.h for the carry).
PORTLLM_AVX512 inline __m512i round_pair(__m512 ve, __m512 vo) {
  const __m512i e = _mm512_castps_si512(ve), o = _mm512_castps_si512(vo);
  const __mmask32 odd = 0xAAAAAAAAu;
  const __m512i h = _mm512_mask_blend_epi16(odd, _mm512_srli_epi32(e, 16), o);
  const __m512i lo = _mm512_mask_blend_epi16(odd, e, _mm512_slli_epi32(o, 16));
  const __m512i b = _mm512_ternarylogic_epi32(h, _mm512_set1_epi16(1), _mm512_set1_epi16(0x7ffe), 0xEA);  // (h & 1) | 0x7ffe
  const __m512i carry = _mm512_srli_epi16(_mm512_avg_epu16(lo, b), 15);
  return _mm512_add_epi16(h, carry);
}
// RB rows x 32 columns of W += Bs[rows, :r] . P (the block's panel), one rounding.
template <int RB>
struct Micro {
  PORTLLM_AVX512 static inline void run(c10::BFloat16* W, int64_t ldw, const float* Bs, int64_t r, const float* P) {
    prefetch_rows<RB, c10::BFloat16, 32>(W, ldw);
    __m512 acc0[RB], acc1[RB];
#pragma GCC unroll 16
    for (int ii = 0; ii < RB; ++ii) acc0[ii] = acc1[ii] = _mm512_setzero_ps();
    for (int64_t k = 0; k < r; ++k) {
      const __m512 a0 = _mm512_loadu_ps(P + 32 * k), a1 = _mm512_loadu_ps(P + 32 * k + 16);
#pragma GCC unroll 16
      for (int ii = 0; ii < RB; ++ii) {
        const __m512 b = _mm512_set1_ps(Bs[ii * r + k]);
        acc0[ii] = _mm512_fmadd_ps(b, a0, acc0[ii]);
        acc1[ii] = _mm512_fmadd_ps(b, a1, acc1[ii]);
      }
    }
    const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
#pragma GCC unroll 16
    for (int ii = 0; ii < RB; ++ii) {
      c10::BFloat16* w = W + ii * ldw;
      const __m512i x = _mm512_loadu_si512(w);
      const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)), wo = _mm512_castsi512_ps(_mm512_and_si512(x, high));
      _mm512_storeu_si512(w, round_pair(_mm512_add_ps(we, acc0[ii]), _mm512_add_ps(wo, acc1[ii])));
    }
  }
};
// Rows [i0, i1) of a bf16 W (unit column stride): full 32-column blocks from packed panels, the
// last n % 32 columns by the masked kernel. Column blocks keep the panels (r x nb fp32) in L2.
template <int RB>
PORTLLM_AVX512 void rows(c10::BFloat16* W, int64_t ldw, const float* Bs, const float* Af, int64_t r, int64_t n,
                         int64_t i0, int64_t i1, int64_t panel_bytes) {
  const int64_t nv = n / COLS * COLS;
  if (nv > 0 && i1 > i0) {
    const int64_t nb = std::max<int64_t>(COLS, std::min<int64_t>(nv, panel_bytes / (4 * std::max<int64_t>(r, 1))) / COLS * COLS);
    std::vector<float> buf(static_cast<size_t>(r * nb));
    for (int64_t jb = 0; jb < nv; jb += nb) {
      const int64_t je = std::min(nv, jb + nb);
      for (int64_t j = jb; j < je; j += COLS) pack_panel(buf.data() + (j - jb) * r, Af, n, r, j);
      for (int64_t i = i0; i < i1; i += RB) {
        const int64_t rb = std::min<int64_t>(RB, i1 - i);
        for (int64_t j = jb; j < je; j += COLS)
          dispatch_rows<RB, Micro>(rb, W + i * ldw + j, ldw, Bs + i * r, r, buf.data() + (j - jb) * r);
      }
    }
  }
  if (nv < n)
    for (int64_t i = i0; i < i1; i += 8)
      dispatch_rows<8, Fp32<c10::BFloat16>::template Micro>(std::min<int64_t>(8, i1 - i), W + i * ldw + nv, ldw, Bs + i * r, r,
                                                           Af + nv, n, n - nv);
}
}  // namespace bf16w
}  // namespace avx512
}  // namespace portllm
