// AVX2 + FMA micro-kernel of patch_add_ for a bf16 W (included by csrc/cpu/patch_add_avx2.h).
//
// The numerics are those of every CPU path: W + sum_k fp32(B[i,k]*s_k)*A[k,j], summed in k order in
// fp32, one rounding to bf16 (nearest even).
//
// Why a kernel of its own: at small r the epilogue (W to fp32, add, round to bf16, store) costs
// about as much as the FMAs. Measured on a Zen 5 core running this path (PORTLLM_CPU_ISA=avx2),
// ymm FMAs issue on two of the four vector pipes, shifts and fp32 adds only on the other two, and
// logic, blend, average and 16-bit adds on any. The old epilogue (widen, add, round with a NaN
// blend, pack, permute: 22 vector operations per 16 elements, the blend on the FMA pipes) left a
// 3 x 32 block at r = 8 at 65% of the FMA rate with W in L1; this one needs 13 and reaches 77% (a
// one-off harness):
//  * the factor panel holds each 16 columns as [8 even columns, 8 odd columns], so one 32-byte load
//    of W becomes the even columns' fp32 (shift left 16) and the odd ones' (AND the high halves);
//  * the rounding runs on 16-bit lanes of the packed pair: the truncated bf16 (one shift, one
//    blend), the dropped halves (one shift, one blend), and the carry of nearest-even from an
//    unsigned average: bit 15 of (lo + 0x7ffe + lsb + 1) >> 1 is the carry of lo + 0x7fff + lsb.
//  * no NaN test: a NaN's low 16 bits are zero wherever it comes from (a bf16 W; the factors,
//    whose NaNs the caller makes canonical; 0 * inf), and x86 arithmetic carries a NaN operand's
//    payload through, so the rounding increment never reaches a NaN's exponent.
// What is left at r = 8 is the epilogue's operations taking FMA slots: with W in L1, a block that
// only stores its sums runs at 93%, and each rounding operation costs about as much as it would
// with nothing else running. Tried without gain: the accumulators starting from W (two adds
// fewer), and the epilogue of one block run from an L1 buffer inside the next block's rank loop.
// Blocks of 16 columns, 4 or 6 rows (see rows below).
// Whole-matrix speed (4096 x 14336, 2 threads, bf16 factors): benchmarks/bench_patch_add.py.
#pragma once

namespace portllm {
namespace avx2 {
namespace bf16w {

constexpr int64_t COLS = 16;

// One 16-column panel of Af (r x n, row stride n) from column j: per k, 16 floats, the even
// columns then the odd ones. NaNs become the canonical quiet NaN (low 16 bits zero).
PORTLLM_AVX2 inline void pack_panel(float* dst, const float* Af, int64_t n, int64_t r, int64_t j) {
  const __m256i split = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  const __m256 qnan = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000));
  for (int64_t k = 0; k < r; ++k) {
    __m256 x0 = _mm256_loadu_ps(Af + k * n + j), x1 = _mm256_loadu_ps(Af + k * n + j + 8);
    x0 = _mm256_blendv_ps(x0, qnan, _mm256_cmp_ps(x0, x0, _CMP_UNORD_Q));
    x1 = _mm256_blendv_ps(x1, qnan, _mm256_cmp_ps(x1, x1, _CMP_UNORD_Q));
    const __m256 p0 = _mm256_permutevar8x32_ps(x0, split), p1 = _mm256_permutevar8x32_ps(x1, split);
    _mm256_storeu_ps(dst + 16 * k, _mm256_permute2f128_ps(p0, p1, 0x20));
    _mm256_storeu_ps(dst + 16 * k + 8, _mm256_permute2f128_ps(p0, p1, 0x31));
  }
}

// ve, vo: the fp32 values of the even and odd columns of 16 consecutive elements -> their bf16
// bits in memory order, rounded to nearest even. A NaN must have zero low 16 bits (see above).
PORTLLM_AVX2 inline __m256i round_pair(__m256 ve, __m256 vo) {
  const __m256i e = _mm256_castps_si256(ve), o = _mm256_castps_si256(vo);
  const __m256i h = _mm256_blend_epi16(_mm256_srli_epi32(e, 16), o, 0xAA);   // truncated
  const __m256i lo = _mm256_blend_epi16(e, _mm256_slli_epi32(o, 16), 0xAA);  // dropped halves
  const __m256i b = _mm256_or_si256(_mm256_and_si256(h, _mm256_set1_epi16(1)), _mm256_set1_epi16(0x7ffe));
  const __m256i carry = _mm256_srli_epi16(_mm256_avg_epu16(lo, b), 15);
  return _mm256_add_epi16(h, carry);
}

// W[p .. p+16) += (ae: even columns, ao: odd columns), one rounding.
PORTLLM_AVX2 inline void add16(c10::BFloat16* p, __m256 ae, __m256 ao) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
  const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), round_pair(_mm256_add_ps(we, ae), _mm256_add_ps(wo, ao)));
}

// ROWS rows x 16 columns of W += Bs[rows, :r] . P (the block's panel).
template <int ROWS>
PORTLLM_AVX2 inline void block(c10::BFloat16* W, int64_t ldw, const float* Bs, int64_t r, const float* P) {
#pragma GCC unroll 6
  for (int ii = 0; ii < ROWS; ++ii)
    _mm_prefetch(reinterpret_cast<const char*>(W + ii * ldw + kPrefetchCols), _MM_HINT_T0);
  __m256 acc[ROWS][2];
#pragma GCC unroll 6
  for (int ii = 0; ii < ROWS; ++ii) acc[ii][0] = acc[ii][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < r; ++k) {
    const __m256 a0 = _mm256_loadu_ps(P + 16 * k), a1 = _mm256_loadu_ps(P + 16 * k + 8);
#pragma GCC unroll 6
    for (int ii = 0; ii < ROWS; ++ii) {
      const __m256 b = _mm256_broadcast_ss(Bs + ii * r + k);
      acc[ii][0] = _mm256_fmadd_ps(b, a0, acc[ii][0]);
      acc[ii][1] = _mm256_fmadd_ps(b, a1, acc[ii][1]);
    }
  }
#pragma GCC unroll 6
  for (int ii = 0; ii < ROWS; ++ii) add16(W + ii * ldw, acc[ii][0], acc[ii][1]);
}

// Rows [i0, i1), columns [0, n / 16 * 16) of a bf16 W (unit column stride), RB rows per block.
// Bs's NaNs must be canonical (the caller's job); Af's are made so in the panels.
template <int RB>
PORTLLM_AVX2 inline void rows_rb(c10::BFloat16* W, int64_t ldw, const float* Bs, const float* Af, int64_t r,
                                 int64_t n, int64_t i0, int64_t i1) {
  const int64_t nv = n / COLS * COLS;
  if (nv == 0 || i1 <= i0) return;
  const int64_t nb = std::max<int64_t>(COLS, std::min<int64_t>(nv, (192 * 1024) / (4 * std::max<int64_t>(r, 1))) / COLS * COLS);
  std::vector<float> panel_buf(static_cast<size_t>(r * nb));
  float* panels = panel_buf.data();
  for (int64_t jb = 0; jb < nv; jb += nb) {
    const int64_t je = std::min(nv, jb + nb);
    for (int64_t j = jb; j < je; j += COLS) pack_panel(panels + (j - jb) * r, Af, n, r, j);
    for (int64_t i = i0; i < i1; i += RB) {
      const int64_t rb = std::min<int64_t>(RB, i1 - i);
      for (int64_t j = jb; j < je; j += COLS) {
        c10::BFloat16* w = W + i * ldw + j;
        const float* b = Bs + i * r;
        const float* p = panels + (j - jb) * r;
        if (rb == RB) block<RB>(w, ldw, b, r, p);
        else if (rb == 5) block<5>(w, ldw, b, r, p);
        else if (rb == 4) block<4>(w, ldw, b, r, p);
        else if (rb == 3) block<3>(w, ldw, b, r, p);
        else if (rb == 2) block<2>(w, ldw, b, r, p);
        else block<1>(w, ldw, b, r, p);
      }
    }
  }
}

// 4 x 16 blocks (8 accumulators: two FMA pipes x latency 4, the fewest that keep them busy, leaving
// registers for the epilogue) up to r = 16; 6 x 16 (12 accumulators, fewer broadcasts per FMA)
// above, where the rank loop dominates (about 5% faster at r = 64 in the same measurement).
PORTLLM_AVX2 inline void rows(c10::BFloat16* W, int64_t ldw, const float* Bs, const float* Af, int64_t r,
                              int64_t n, int64_t i0, int64_t i1) {
  if (r > 16) return rows_rb<6>(W, ldw, Bs, Af, r, n, i0, i1);
  rows_rb<4>(W, ldw, Bs, Af, r, n, i0, i1);
}

}  // namespace bf16w
}  // namespace avx2
}  // namespace portllm
