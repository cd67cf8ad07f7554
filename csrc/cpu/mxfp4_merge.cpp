// mxfp4_merge on CPU: a patch merged into one expert's MXFP4 weight, row by row, in one pass.
//
// Per row of K = 32 G elements (G blocks, each with an e8m0 scale byte b: 2^(b - 127)):
//   W  = e2m1(code) * 2^(b - 127)                                    (exact in fp32)
//   W' = float32(double(W) + sum_k double(Bs[i,k]) * double(A[k,j]))  (k ascending; each product is exact
//                                                                      in double, so FMA or not, the bits
//                                                                      are the reference's)
//   the block's byte: fresh = the exponent field of fl32(amax / 6) rounded up to a power of two on its
//     bits; reuse keeps b unless some |W'| >= 7 * 2^(b - 127) (then fresh, and the block is "clipped")
//   x = double(W') * 2^(127 - byte) to e2m1, saturating at 6: nearest with ties to the even code, or
//     stochastic: up from the grid point below with probability floor(2^20 (|x| - g) / step) / 2^20,
//     against 20 random bits from a hash of (key, first + i K + j); the sign bit is W''s
// and the retention sums (double) for both roundings, the one asked for written. Every output bit
// equals portllm.reference.mxfp4_merge's (tests/test_mxfp4.py), written from the same definition
// (portllm/mxfp4.py) in PyTorch; the sums agree to rounding (their order differs).
//
// Implements torch.ops.portllm.mxfp4_merge (schema in csrc/ops.cpp) for portllm.ops.mxfp4_merge.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu/isa.h"

namespace portllm {
namespace {

#define PORTLLM_MX_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define PORTLLM_MX_AVX2 __attribute__((target("avx2,fma")))

constexpr int kGroup = 32;
constexpr double kGrid[9] = {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 6.0};

inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

// The format's scale byte for a block whose largest |W'| is amax (fp32): fl32(amax / 6) rounded up to a
// power of two on its bits (a NaN amax takes the same arithmetic as the reference's int64 bits).
inline uint8_t fresh_byte(float amax) {
  const float d = amax / 6.0f;
  uint32_t b;
  std::memcpy(&b, &d, 4);
  const int64_t bits = static_cast<int64_t>(static_cast<int32_t>(b));
  return static_cast<uint8_t>(((bits + 0x7FFFFF) & 0x7F800000) >> 23);
}

// |x| (already divided by its block's scale) to the e2m1 magnitude code 0..7, nearest, ties to the
// even code (so the comparisons at .25, 1.25, 2.5, 5 are strict and at .75, 1.75, 3.5 are not).
inline int nearest_code(double a) {
  return (a > 0.25) + (a >= 0.75) + (a > 1.25) + (a >= 1.75) + (a > 2.5) + (a >= 3.5) + (a > 5.0);
}

inline int stochastic_code(double a, uint32_t u) {
  const int low = (a >= 0.5) + (a >= 1.0) + (a >= 1.5) + (a >= 2.0) + (a >= 3.0) + (a >= 4.0) + (a >= 6.0);
  if (low == 7) return 7;
  const double t = std::floor((a - kGrid[low]) / (kGrid[low + 1] - kGrid[low]) * 1048576.0);
  return low + (static_cast<int64_t>(t) + static_cast<int64_t>(u) >= 1048576);
}

struct Args {
  const uint8_t* blocks;
  const uint8_t* scales;
  const float* Bs;
  const double* Ad;
  uint8_t* blocks_out;
  uint8_t* scales_out;
  bool* clipped;
  double* partial;  // [R, 6]: the sums of the rounding asked for, then the other's
  int64_t R, G, K, r;
  bool fresh;
  uint64_t first;
  uint32_t key_lo, key_hi;
};

template <bool STOCHASTIC>
__attribute__((always_inline)) inline void merge_row(const Args& a, int64_t i, double* acc, float* w0, float* w1) {
  const uint8_t* in = a.blocks + i * a.G * 16;
  const uint8_t* sc = a.scales + i * a.G;
  for (int64_t g = 0; g < a.G; ++g) {
    const double s = std::ldexp(1.0, static_cast<int>(sc[g]) - 127);
    for (int j = 0; j < 16; ++j) {
      const uint8_t byte = in[g * 16 + j];
      for (int h = 0; h < 2; ++h) {
        const int c = h ? byte >> 4 : byte & 15;
        const double v = (c & 8) ? -kGrid[c & 7] : kGrid[c & 7];
        w0[g * kGroup + 2 * j + h] = static_cast<float>(v * s);
      }
    }
  }
  for (int64_t j = 0; j < a.K; ++j) acc[j] = static_cast<double>(w0[j]);
  for (int64_t k = 0; k < a.r; ++k) {
    const double bk = static_cast<double>(a.Bs[i * a.r + k]);
    const double* ar = a.Ad + k * a.K;
#pragma omp simd
    for (int64_t j = 0; j < a.K; ++j) acc[j] += bk * ar[j];
  }
  for (int64_t j = 0; j < a.K; ++j) w1[j] = static_cast<float>(acc[j]);
  double sums[2][3] = {{0, 0, 0}, {0, 0, 0}};
  const uint64_t row = a.first + static_cast<uint64_t>(i * a.K);
  for (int64_t g = 0; g < a.G; ++g) {
    const float* x1 = w1 + g * kGroup;
    float amax = 0.0f;
    bool nan = false;
    for (int j = 0; j < kGroup; ++j) {
      amax = std::max(amax, std::fabs(x1[j]));
      nan |= x1[j] != x1[j];
    }
    // (a NaN anywhere: the reference's amax is NaN, so its byte is fresh_byte(NaN) and the block clips)
    const float am = nan ? std::numeric_limits<float>::quiet_NaN() : amax;
    uint8_t byte = fresh_byte(am);
    bool clip = false;
    if (!a.fresh) {
      const uint8_t old = sc[g];
      clip = !(static_cast<double>(am) * std::ldexp(1.0, 127 - static_cast<int>(old)) < 7.0);
      if (!clip) byte = old;
    }
    a.clipped[i * a.G + g] = clip;
    a.scales_out[i * a.G + g] = byte;
    const double up = std::ldexp(1.0, 127 - static_cast<int>(byte)), down = std::ldexp(1.0, static_cast<int>(byte) - 127);
    uint8_t* out = a.blocks_out + (i * a.G + g) * 16;
    for (int j = 0; j < kGroup; ++j) {
      const float xf = x1[j];
      const double x = static_cast<double>(xf) * up, ax = std::fabs(x);
      const int sign = std::signbit(xf) ? 8 : 0;
      const uint64_t idx = row + static_cast<uint64_t>(g * kGroup + j);
      const uint32_t h = fmix32(static_cast<uint32_t>(idx) ^ a.key_lo);
      const uint32_t u = fmix32(h ^ static_cast<uint32_t>(idx >> 32) ^ a.key_hi) >> 12;
      const int cn = nearest_code(ax) | sign, cs = stochastic_code(ax, u) | sign;
      const int written = STOCHASTIC ? cs : cn, other = STOCHASTIC ? cn : cs;
      if (j & 1)
        out[j >> 1] = static_cast<uint8_t>(out[j >> 1] | (written << 4));
      else
        out[j >> 1] = static_cast<uint8_t>(written);
      const double W = static_cast<double>(w0[g * kGroup + j]);
      const double D = static_cast<double>(xf) - W;
      const int codes[2] = {written, other};
      for (int t = 0; t < 2; ++t) {
        const double q = ((codes[t] & 8) ? -kGrid[codes[t] & 7] : kGrid[codes[t] & 7]) * down;
        const double moved = static_cast<double>(static_cast<float>(q)) - W;
        sums[t][0] += moved * D;
        sums[t][1] += D * D;
        sums[t][2] += (moved - D) * (moved - D);
      }
    }
  }
  double* p = a.partial + i * 6;
  for (int t = 0; t < 2; ++t)
    for (int c = 0; c < 3; ++c) p[t * 3 + c] = sums[t][c];
}

template <bool STOCHASTIC>
__attribute__((always_inline)) inline void run_rows(const Args& a, int64_t i0, int64_t i1) {
  std::vector<double> acc(static_cast<size_t>(a.K));
  std::vector<float> w0(static_cast<size_t>(a.K)), w1(static_cast<size_t>(a.K));
  for (int64_t i = i0; i < i1; ++i) merge_row<STOCHASTIC>(a, i, acc.data(), w0.data(), w1.data());
}

template <bool S>
PORTLLM_MX_AVX512 void run_avx512(const Args& a, int64_t i0, int64_t i1) { run_rows<S>(a, i0, i1); }
template <bool S>
PORTLLM_MX_AVX2 void run_avx2(const Args& a, int64_t i0, int64_t i1) { run_rows<S>(a, i0, i1); }
template <bool S>
void run_generic(const Args& a, int64_t i0, int64_t i1) { run_rows<S>(a, i0, i1); }

template <bool S>
void run(Isa isa, const Args& a, int64_t i0, int64_t i1) {
  if (isa >= Isa::Avx512)
    run_avx512<S>(a, i0, i1);
  else if (isa >= Isa::Avx2)
    run_avx2<S>(a, i0, i1);
  else
    run_generic<S>(a, i0, i1);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mxfp4_merge_cpu(const at::Tensor& blocks,
                                                                           const at::Tensor& scales,
                                                                           const at::Tensor& Bs, const at::Tensor& A,
                                                                           bool fresh, bool stochastic, int64_t key,
                                                                           int64_t first) {
  TORCH_CHECK(blocks.dim() == 3 && blocks.scalar_type() == at::kByte && blocks.is_contiguous() && blocks.size(2) == 16,
              "mxfp4_merge: blocks must be contiguous uint8 [R, G, 16], got ", blocks.scalar_type(), " ",
              blocks.sizes());
  const int64_t R = blocks.size(0), G = blocks.size(1), K = G * kGroup;
  TORCH_CHECK(scales.scalar_type() == at::kByte && scales.is_contiguous() && scales.dim() == 2 && scales.size(0) == R &&
                  scales.size(1) == G,
              "mxfp4_merge: scales must be contiguous uint8 [", R, ", ", G, "], got ", scales.scalar_type(), " ",
              scales.sizes());
  TORCH_CHECK(Bs.scalar_type() == at::kFloat && Bs.is_contiguous() && Bs.dim() == 2 && Bs.size(0) == R,
              "mxfp4_merge: Bs must be contiguous float32 [", R, ", r], got ", Bs.scalar_type(), " ", Bs.sizes());
  const int64_t r = Bs.size(1);
  TORCH_CHECK(A.scalar_type() == at::kFloat && A.dim() == 2 && A.size(0) == r && A.size(1) == K,
              "mxfp4_merge: A must be float32 [", r, ", ", K, "], got ", A.scalar_type(), " ", A.sizes());
  TORCH_CHECK(blocks.device().is_cpu() && scales.device().is_cpu() && Bs.device().is_cpu() && A.device().is_cpu(),
              "mxfp4_merge: this kernel runs on CPU tensors");
  TORCH_CHECK(first >= 0, "mxfp4_merge: first must be >= 0, got ", first);
  at::Tensor Ad = A.to(at::kDouble).contiguous();
  at::Tensor blocks_out = at::empty_like(blocks);
  at::Tensor scales_out = at::empty_like(scales);
  at::Tensor clipped = at::empty({R, G}, scales.options().dtype(at::kBool));
  at::Tensor partial = at::empty({R, 6}, Bs.options().dtype(at::kDouble));
  const uint64_t k = static_cast<uint64_t>(key);
  Args a{blocks.data_ptr<uint8_t>(), scales.data_ptr<uint8_t>(), Bs.data_ptr<float>(), Ad.data_ptr<double>(),
         blocks_out.data_ptr<uint8_t>(), scales_out.data_ptr<uint8_t>(), clipped.data_ptr<bool>(),
         partial.data_ptr<double>(), R, G, K, r, fresh, static_cast<uint64_t>(first),
         static_cast<uint32_t>(k), static_cast<uint32_t>(k >> 32)};
  const Isa isa = isa_for_call();
  if (R > 0 && G > 0) {
    at::parallel_for(0, R, 16, [&](int64_t i0, int64_t i1) {
      if (stochastic)
        run<true>(isa, a, i0, i1);
      else
        run<false>(isa, a, i0, i1);
    });
  }
  // The sums in row order, whatever the threads: the same report on every machine.
  at::Tensor sums = at::zeros({2, 3}, partial.options());
  double* st = sums.data_ptr<double>();
  const double* p = partial.data_ptr<double>();
  for (int64_t i = 0; i < R; ++i)
    for (int t = 0; t < 6; ++t) st[t] += p[i * 6 + t];
  return {blocks_out, scales_out, sums, clipped};
}

}  // namespace

TORCH_LIBRARY_IMPL(portllm, CPU, m) { m.impl("mxfp4_merge", &mxfp4_merge_cpu); }

}  // namespace portllm
