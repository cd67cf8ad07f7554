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
// 2^e for |e| <= 1022, from its bits (the library's ldexp is a call of tens of cycles, per block)
inline double pow2(int e) {
  const uint64_t bits = static_cast<uint64_t>(e + 1023) << 52;
  double x;
  std::memcpy(&x, &bits, 8);
  return x;
}

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

// The e2m1 grid by integer compares on the bits of |x| (a double >= 0: its bits order as its values). A
// float compare keeps GCC from vectorizing a loop (it may trap), a table costs a gather per lane; the codes
// are int32 (AVX2 has no int64 <-> double conversions).
inline int64_t dbits(double x) {
  int64_t b;
  std::memcpy(&b, &x, 8);
  return b;
}
// The midpoints .25, .75, 1.25, 1.75, 2.5, 3.5, 5 (nearest, ties to the even code: the compares at .25,
// 1.25, 2.5, 5 are strict, at .75, 1.75, 3.5 not) and the grid points 0, .5, 1, 1.5, 2, 3, 4, 6.
constexpr int64_t kB[7] = {0x3FD0000000000000, 0x3FE8000000000000, 0x3FF4000000000000, 0x3FFC000000000000,
                           0x4004000000000000, 0x400C000000000000, 0x4014000000000000};
constexpr int64_t kG[8] = {0, 0x3FE0000000000000, 0x3FF0000000000000, 0x3FF8000000000000,
                           0x4000000000000000, 0x4008000000000000, 0x4010000000000000, 0x4018000000000000};
// Twice the grid's value at magnitude code m (0, 1, 2, 3, 4, 6, 8, 12), and twice 1 / (the next value -
// this one) (4, 4, 4, 4, 2, 2, 1, 0: 0 at the top, where nothing rounds up)
inline int32_t grid2(int32_t m) { return m + (m >= 5) + (m >= 6) + 3 * (m >= 7); }  // (std::min would branch)
inline int32_t inv_step2(int32_t m) { return 4 - ((m >> 2) << 1) - (m >= 6) - (m >= 7); }  // (m >> 2: m >= 4)

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
__attribute__((always_inline)) inline void merge_row(const Args& a, int64_t i, float* w0, float* w1) {
  const uint8_t* in = a.blocks + i * a.G * 16;
  const uint8_t* sc = a.scales + i * a.G;
  for (int64_t g = 0; g < a.G; ++g) {
    const float s = static_cast<float>(pow2(static_cast<int>(sc[g]) - 127));  // (2^-127 for byte 0: exact, subnormal)
    const uint8_t* bytes = in + g * 16;
    float* w = w0 + g * kGroup;
    float even[16], odd[16];
#pragma omp simd
    for (int j = 0; j < 16; ++j) {  // (arithmetic, not a table: a table is a gather per lane)
      const int32_t lo = bytes[j] & 15, hi = bytes[j] >> 4;
      // (every product exact in fp32; code 8 is -0)
      even[j] = static_cast<float>(1 - 2 * (lo >> 3)) * (0.5f * static_cast<float>(grid2(lo & 7))) * s;
      odd[j] = static_cast<float>(1 - 2 * (hi >> 3)) * (0.5f * static_cast<float>(grid2(hi & 7))) * s;
    }
    for (int j = 0; j < 16; ++j) {
      w[2 * j] = even[j];
      w[2 * j + 1] = odd[j];
    }
  }
  // W' a block (32 elements) at a time, its sums held in registers across the r products (k ascending,
  // as the reference), not in a row-long array loaded and stored again for every k
  const float* bs = a.Bs + i * a.r;
  for (int64_t j0 = 0; j0 < a.K; j0 += kGroup) {
    double t[kGroup];
#pragma omp simd
    for (int j = 0; j < kGroup; ++j) t[j] = static_cast<double>(w0[j0 + j]);
    for (int64_t k = 0; k < a.r; ++k) {
      const double bk = static_cast<double>(bs[k]);
      const double* ar = a.Ad + k * a.K + j0;
#pragma omp simd
      for (int j = 0; j < kGroup; ++j) t[j] += bk * ar[j];
    }
#pragma omp simd
    for (int j = 0; j < kGroup; ++j) w1[j0 + j] = static_cast<float>(t[j]);
  }
  double sums[2][3] = {{0, 0, 0}, {0, 0, 0}};
  const uint64_t row = a.first + static_cast<uint64_t>(i * a.K);
  for (int64_t g = 0; g < a.G; ++g) {
    const float* x1 = w1 + g * kGroup;
    // amax on the bits of |x| (ordered as the values; a NaN's bits are above every number's, so a NaN
    // anywhere makes amax NaN, as the reference's: its byte is fresh_byte(NaN) and the block clips)
    int32_t top = 0;
#pragma omp simd reduction(max : top)
    for (int j = 0; j < kGroup; ++j) {
      uint32_t b;
      std::memcpy(&b, &x1[j], 4);
      top = std::max(top, static_cast<int32_t>(b & 0x7FFFFFFFu));
    }
    float am;
    std::memcpy(&am, &top, 4);
    uint8_t byte = fresh_byte(am);
    bool clip = false;
    if (!a.fresh) {
      const uint8_t old = sc[g];
      clip = !(static_cast<double>(am) * pow2(127 - static_cast<int>(old)) < 7.0);
      if (!clip) byte = old;
    }
    a.clipped[i * a.G + g] = clip;
    a.scales_out[i * a.G + g] = byte;
    const double up = pow2(127 - static_cast<int>(byte)), down = pow2(static_cast<int>(byte) - 127);
    const float* x0 = w0 + g * kGroup;
    const uint64_t base = row + static_cast<uint64_t>(g * kGroup);
    // Both roundings' codes and values, then both sums, then the packed bytes: loops of integer compares
    // and arithmetic (no table, no float compare, no branch), so that GCC vectorizes them.
    int32_t cn[kGroup], cs[kGroup];
    double qn[kGroup], qs[kGroup];
#pragma omp simd
    for (int j = 0; j < kGroup; ++j) {
      uint32_t bits;
      std::memcpy(&bits, &x1[j], 4);
      const int32_t neg = static_cast<int32_t>(bits >> 31);
      const double ax = std::fabs(static_cast<double>(x1[j]) * up);
      const int64_t b = dbits(ax);  // (|x| >= 0: its bits order as its values)
      const int32_t mn = (b > kB[0]) + (b >= kB[1]) + (b > kB[2]) + (b >= kB[3]) + (b > kB[4]) + (b >= kB[5]) +
                         (b > kB[6]);
      const uint64_t idx = base + static_cast<uint64_t>(j);
      const uint32_t h = fmix32(static_cast<uint32_t>(idx) ^ a.key_lo);
      const uint32_t u = fmix32(h ^ static_cast<uint32_t>(idx >> 32) ^ a.key_hi) >> 12;
      const int32_t low = (b >= kG[1]) + (b >= kG[2]) + (b >= kG[3]) + (b >= kG[4]) + (b >= kG[5]) + (b >= kG[6]) +
                          (b >= kG[7]);
      // up with probability floor(2^20 (|x| - g) / step) / 2^20: floor(y) + u >= 2^20 is y >= 2^20 - u
      // (u an integer); (|x| - g) / step is exact (a power-of-two step) and >= 0, 0 at the top of the grid
      const double y = (ax - 0.5 * static_cast<double>(grid2(low))) * (0.5 * static_cast<double>(inv_step2(low))) *
                       1048576.0;
      // (at the top, y = 0 < 2^20 - u: no guard needed, and a guard here is a branch that stops GCC vectorizing)
      const int32_t ms = low + (dbits(y) >= dbits(static_cast<double>(static_cast<int32_t>(1048576u - u))));
      const int32_t sign = neg << 3;
      cn[j] = mn | sign;
      cs[j] = ms | sign;
      const double sgn = static_cast<double>(1 - 2 * neg);
      qn[j] = sgn * (0.5 * static_cast<double>(grid2(mn))) * down;  // (exact: the values as dequantized, -0 too)
      qs[j] = sgn * (0.5 * static_cast<double>(grid2(ms))) * down;
    }
    double sums_n[3], sums_s[3];
    double dn = 0, d2 = 0, nn = 0, ds = 0, ns = 0;
#pragma omp simd reduction(+ : dn, d2, nn, ds, ns)
    for (int j = 0; j < kGroup; ++j) {
      const double W = static_cast<double>(x0[j]);
      const double D = static_cast<double>(x1[j]) - W;
      const double mn = qn[j] - W, ms = qs[j] - W;
      dn += mn * D;
      nn += (mn - D) * (mn - D);
      ds += ms * D;
      ns += (ms - D) * (ms - D);
      d2 += D * D;
    }
    sums_n[0] = dn;
    sums_n[1] = d2;
    sums_n[2] = nn;
    sums_s[0] = ds;
    sums_s[1] = d2;
    sums_s[2] = ns;
    const double* first_sums = STOCHASTIC ? sums_s : sums_n;
    const double* other_sums = STOCHASTIC ? sums_n : sums_s;
    for (int c = 0; c < 3; ++c) {
      sums[0][c] += first_sums[c];
      sums[1][c] += other_sums[c];
    }
    const int32_t* written = STOCHASTIC ? cs : cn;
    uint8_t* out = a.blocks_out + (i * a.G + g) * 16;
    for (int j = 0; j < 16; ++j) out[j] = static_cast<uint8_t>(written[2 * j] | (written[2 * j + 1] << 4));
  }
  double* p = a.partial + i * 6;
  for (int t = 0; t < 2; ++t)
    for (int c = 0; c < 3; ++c) p[t * 3 + c] = sums[t][c];
}

template <bool STOCHASTIC>
__attribute__((always_inline)) inline void run_rows(const Args& a, int64_t i0, int64_t i1) {
  std::vector<float> w0(static_cast<size_t>(a.K)), w1(static_cast<size_t>(a.K));
  for (int64_t i = i0; i < i1; ++i) merge_row<STOCHASTIC>(a, i, w0.data(), w1.data());
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
