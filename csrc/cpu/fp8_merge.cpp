// fp8_merge on CPU: a patch merged into a block-scaled FP8 (e4m3) weight, block by block, in one pass.
//
// Per block of bm x bn elements (the weight's own scale blocks), with nothing larger than a block held:
//   W  = float(q) * scale_inv                                        (fp32, as transformers dequantizes)
//   W' = float32(double(W) + sum_k double(Bs[i,k]) * double(A[k,j]))  (k ascending; each product is exact
//                                                                       in double, so FMA or not, the bits
//                                                                       are the reference's)
//   scale = amax > 0 ? (1/amax)*448 : 1, scale_inv' = 1 / scale     (fp32, as torch evaluates transformers'
//                                                                      Fp8Quantize: 448 / amax is rdiv)
//   q' = e4m3(clamp(W' * scale, +-448)): nearest even, or stochastic: 20 random bits from a hash of
//        (key, flat index) added below the kept mantissa bits, then truncated (E[q'] = W' * scale)
// and the retention sums (double): <Q - W, D>, |D|^2, |Q - W - D|^2 with D = W' - W, Q = float(q') *
// scale_inv'. Every output bit equals portllm.reference.fp8_merge's (tests/test_fp8.py), which is
// written from the same definition in PyTorch.
//
// Implements torch.ops.portllm.fp8_merge (schema in csrc/ops.cpp) for portllm.ops.fp8_merge.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "cpu/isa.h"

namespace portllm {
namespace {

#define PORTLLM_FP8_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define PORTLLM_FP8_AVX2 __attribute__((target("avx2,fma")))

inline uint32_t fbits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
}
inline float bitsf(uint32_t b) {
  float x;
  std::memcpy(&x, &b, 4);
  return x;
}

inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

// The value of an e4m3 code, exactly (as torch's float8_e4m3fn -> float32), without a table or a
// branch so that the loops over a block vectorize: normals are bit patterns, subnormals m * 2^-9.
inline uint32_t mask_if(bool b) { return b ? 0xFFFFFFFFu : 0u; }
inline uint32_t select(uint32_t m, uint32_t a, uint32_t b) { return (a & m) | (b & ~m); }  // m ? a : b

inline float e4m3_value(uint32_t c) {
  const uint32_t e = (c >> 3) & 15u, m = c & 7u;
  const uint32_t normal = ((e + 120u) << 23) | (m << 20);
  const uint32_t sub = fbits(static_cast<float>(static_cast<int32_t>(m)) * 0x1p-9f);
  uint32_t bits = select(mask_if(e == 0), sub, normal);
  bits = select(mask_if((c & 0x7Fu) == 0x7Fu), 0x7FC00000u, bits);  // e4m3's NaN
  return bitsf(bits | ((c & 0x80u) << 24));
}

// The e4m3 code of x (|x| <= 448, or NaN), branch-free: nearest even (STOCHASTIC false) or, with u
// (20 random bits) added below the 3 kept mantissa bits, truncated. Below 2^-6, on the subnormal grid
// of 2^-9: nearest even of |x|*512 (by the 1.5*2^23 trick, exact for |x|*512 < 8), or floor(|x|*512 + u/2^20).
// (Selects are bit masks, not branches, so that the loops over a block vectorize.)
template <bool STOCHASTIC>
inline uint32_t to_e4m3(float x, uint32_t u) {
  const uint32_t b = fbits(x);
  const uint32_t sign = (b >> 24) & 0x80u;
  const uint32_t nan = mask_if((b & 0x7FFFFFFFu) > 0x7F800000u);
  const uint32_t a0 = b & 0x7FFFFFFFu;
  const uint32_t a = select(mask_if(a0 > 0x43E00000u), 0x43E00000u, a0);  // |x| clamped to 448 (NaN: the mask below)
  const uint32_t add = STOCHASTIC ? u : 0x7FFFFu + ((a >> 20) & 1u);
  const uint32_t r = (a + add) & ~0xFFFFFu;
  const uint32_t normal = (((r >> 23) - 120u) << 3) | ((r >> 20) & 7u);
  // Subnormal: t = |x|*512 < 8; nearest even by the 1.5*2^23 trick, or floor(t + u/2^20) (truncation:
  // t >= 0), both as the reference's fp32 operations.
  const float t = bitsf(a) * 512.0f;
  const uint32_t sub = STOCHASTIC ? static_cast<uint32_t>(static_cast<int32_t>(t + static_cast<float>(u) * 0x1p-20f))
                                  : static_cast<uint32_t>(static_cast<int32_t>((t + 0x1.8p23f) - 0x1.8p23f));
  // (|x| >= 2^-6 compared as bits: a float compare here keeps GCC from vectorizing the loop)
  const uint32_t code = select(mask_if(a >= 0x3C800000u), normal, sub);
  return sign | select(nan, 0x7Fu, code);
}

struct Args {
  const uint8_t* q;
  const float* s_in;
  const float* Bs;
  const double* Ad;
  uint8_t* q_out;
  float* s_out;
  double* partial;  // [blocks, 3]
  int64_t M, N, R, bm, bn, Nb;
  int64_t ld;  // the block buffers' row stride: min(bn, N)
  uint32_t key_lo, key_hi;
};

// One block: w0 (the dequantized weight) and w1 (the merged one) are [bm, bn] buffers, acc and qv
// (the requantized row, dequantized) [bn].
template <bool STOCHASTIC>
__attribute__((always_inline)) inline void merge_block(const Args& a, int64_t ib, int64_t jb, float* w0, float* w1,
                                                       double* acc, float* qv) {
  const int64_t i0 = ib * a.bm, i1 = std::min(a.M, i0 + a.bm);
  const int64_t j0 = jb * a.bn, j1 = std::min(a.N, j0 + a.bn), w = j1 - j0;
  const float inv_old = a.s_in[ib * a.Nb + jb];
  float amax = 0.0f;
  uint32_t nan = 0;  // a NaN in the block: torch's amax is NaN, and the block keeps scale 1 (as the reference)
  for (int64_t i = i0; i < i1; ++i) {
    const uint8_t* qr = a.q + i * a.N + j0;
    float* w0r = w0 + (i - i0) * a.ld;
    float* w1r = w1 + (i - i0) * a.ld;
    // The next block's part of this row (a block reads bm rows of N apart: too many streams for the
    // hardware prefetchers).
    __builtin_prefetch(qr + a.bn);
    __builtin_prefetch(qr + a.bn + 64);
    for (int64_t j = 0; j < w; ++j) {
      w0r[j] = e4m3_value(qr[j]) * inv_old;
      acc[j] = static_cast<double>(w0r[j]);
    }
    for (int64_t k = 0; k < a.R; ++k) {
      const double bk = static_cast<double>(a.Bs[i * a.R + k]);
      const double* ar = a.Ad + k * a.N + j0;
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) acc[j] += bk * ar[j];
    }
#pragma omp simd reduction(max : amax) reduction(| : nan)
    for (int64_t j = 0; j < w; ++j) {
      w1r[j] = static_cast<float>(acc[j]);
      amax = std::max(amax, std::fabs(w1r[j]));
      nan |= static_cast<uint32_t>(w1r[j] != w1r[j]);
    }
  }
  // 448 / amax as torch computes a scalar over a tensor (and transformers' quantizer writes it):
  // the reciprocal, then times 448, two roundings.
  const float scale = (amax > 0.0f && !nan) ? (1.0f / amax) * 448.0f : 1.0f;
  const float inv = 1.0f / scale;
  double sdot = 0.0, sd2 = 0.0, sn2 = 0.0;
  for (int64_t i = i0; i < i1; ++i) {
    uint8_t* out = a.q_out + i * a.N + j0;
    const float* w0r = w0 + (i - i0) * a.ld;
    const float* w1r = w1 + (i - i0) * a.ld;
    const uint64_t row = static_cast<uint64_t>(i * a.N + j0);
    for (int64_t j = 0; j < w; ++j) {
      const float x = w1r[j] * scale;  // (clamped to +-448 by to_e4m3)
      uint32_t u = 0;
      if (STOCHASTIC) {
        const uint64_t idx = row + static_cast<uint64_t>(j);
        const uint32_t h = fmix32(static_cast<uint32_t>(idx) ^ a.key_lo);
        u = fmix32(h ^ static_cast<uint32_t>(idx >> 32) ^ a.key_hi) >> 12;
      }
      const uint32_t c = to_e4m3<STOCHASTIC>(x, u);
      out[j] = static_cast<uint8_t>(c);
      qv[j] = e4m3_value(c) * inv;
    }
    // The sums of the report, a vector of lanes at a time (their order differs between paths: the
    // sums agree to rounding, the codes and scales bit for bit).
    double dot = 0.0, d2 = 0.0, n2 = 0.0;
#pragma omp simd reduction(+ : dot, d2, n2)
    for (int64_t j = 0; j < w; ++j) {
      const double W = static_cast<double>(w0r[j]);
      const double D = static_cast<double>(w1r[j]) - W;
      const double moved = static_cast<double>(qv[j]) - W;
      dot += moved * D;
      d2 += D * D;
      n2 += (moved - D) * (moved - D);
    }
    sdot += dot;
    sd2 += d2;
    sn2 += n2;
  }
  a.s_out[ib * a.Nb + jb] = inv;
  double* p = a.partial + (ib * a.Nb + jb) * 3;
  p[0] = sdot;
  p[1] = sd2;
  p[2] = sn2;
}

template <bool STOCHASTIC>
__attribute__((always_inline)) inline void run_blocks(const Args& a, int64_t b0, int64_t b1) {
  // (a block is at most the weight: a large weight_block_size on a small weight allocates no more)
  const size_t rows = static_cast<size_t>(std::min(a.bm, a.M));
  std::vector<float> w0(rows * a.ld), w1(rows * a.ld);
  std::vector<double> acc(static_cast<size_t>(a.ld));
  std::vector<float> qv(static_cast<size_t>(a.ld));
  for (int64_t blk = b0; blk < b1; ++blk)
    merge_block<STOCHASTIC>(a, blk / a.Nb, blk % a.Nb, w0.data(), w1.data(), acc.data(), qv.data());
}

template <bool S>
PORTLLM_FP8_AVX512 void run_avx512(const Args& a, int64_t b0, int64_t b1) { run_blocks<S>(a, b0, b1); }
template <bool S>
PORTLLM_FP8_AVX2 void run_avx2(const Args& a, int64_t b0, int64_t b1) { run_blocks<S>(a, b0, b1); }
template <bool S>
void run_generic(const Args& a, int64_t b0, int64_t b1) { run_blocks<S>(a, b0, b1); }

template <bool S>
void run(Isa isa, const Args& a, int64_t b0, int64_t b1) {
  if (isa >= Isa::Avx512)
    run_avx512<S>(a, b0, b1);
  else if (isa >= Isa::Avx2)
    run_avx2<S>(a, b0, b1);
  else
    run_generic<S>(a, b0, b1);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fp8_merge_cpu(const at::Tensor& q, const at::Tensor& scale_inv,
                                                             const at::Tensor& Bs, const at::Tensor& A,
                                                             int64_t bm, int64_t bn, bool stochastic, int64_t key) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte && q.is_contiguous(),
              "fp8_merge: q must be the contiguous uint8 view of a 2-D e4m3 weight, got ", q.scalar_type(), " ",
              q.sizes());
  TORCH_CHECK(Bs.dim() == 2, "fp8_merge: Bs must be 2-D [M, r], got ", Bs.sizes());
  const int64_t M = q.size(0), N = q.size(1), R = Bs.size(1);
  TORCH_CHECK(bm > 0 && bn > 0, "fp8_merge: block sizes must be positive, got ", bm, "x", bn);
  const int64_t Mb = (M + bm - 1) / bm, Nb = (N + bn - 1) / bn;
  TORCH_CHECK(scale_inv.scalar_type() == at::kFloat && scale_inv.is_contiguous() && scale_inv.dim() == 2 &&
                  scale_inv.size(0) == Mb && scale_inv.size(1) == Nb,
              "fp8_merge: scale_inv must be contiguous float32 [", Mb, ", ", Nb, "], got ", scale_inv.scalar_type(),
              " ", scale_inv.sizes());
  TORCH_CHECK(Bs.scalar_type() == at::kFloat && Bs.is_contiguous() && Bs.dim() == 2 && Bs.size(0) == M,
              "fp8_merge: Bs must be contiguous float32 [", M, ", r], got ", Bs.scalar_type(), " ", Bs.sizes());
  TORCH_CHECK(A.scalar_type() == at::kFloat && A.dim() == 2 && A.size(0) == R && A.size(1) == N,
              "fp8_merge: A must be float32 [", R, ", ", N, "], got ", A.scalar_type(), " ", A.sizes());
  TORCH_CHECK(q.device().is_cpu() && scale_inv.device().is_cpu() && Bs.device().is_cpu() && A.device().is_cpu(),
              "fp8_merge: this kernel runs on CPU tensors");
  at::Tensor Ad = A.to(at::kDouble).contiguous();
  at::Tensor q_out = at::empty_like(q);
  at::Tensor s_out = at::empty_like(scale_inv);
  at::Tensor partial = at::empty({Mb * Nb, 3}, scale_inv.options().dtype(at::kDouble));
  const uint64_t k = static_cast<uint64_t>(key);
  Args a{q.data_ptr<uint8_t>(), scale_inv.data_ptr<float>(), Bs.data_ptr<float>(), Ad.data_ptr<double>(),
         q_out.data_ptr<uint8_t>(), s_out.data_ptr<float>(), partial.data_ptr<double>(), M, N, R, bm, bn, Nb,
         std::min(bn, N), static_cast<uint32_t>(k), static_cast<uint32_t>(k >> 32)};
  const Isa isa = isa_for_call();
  if (M > 0 && N > 0) {
    at::parallel_for(0, Mb * Nb, 1, [&](int64_t b0, int64_t b1) {
      if (stochastic)
        run<true>(isa, a, b0, b1);
      else
        run<false>(isa, a, b0, b1);
    });
  }
  // The sums in block order, whatever the threads: the same report on every machine.
  at::Tensor stats = at::zeros({3}, partial.options());
  double* st = stats.data_ptr<double>();
  const double* p = partial.data_ptr<double>();
  for (int64_t b = 0; b < Mb * Nb; ++b)
    for (int t = 0; t < 3; ++t) st[t] += p[b * 3 + t];
  return {q_out, s_out, stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(portllm, CPU, m) { m.impl("fp8_merge", &fp8_merge_cpu); }

}  // namespace portllm
