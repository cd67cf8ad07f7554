// patch_add_ on CUDA tensor cores (WMMA, sm_80+): W[m, n] += B . diag(s) . A for a 16-bit W, on the
// design that reached the copy bandwidth on an H100 (../shared/gpu/h100-2026-11-22.md), used by
// csrc/cuda/patch_add.cu where it applies.
//
// One block of 8 warps owns a 64 x 128 tile of W; each warp a 32 x 32 part (2 x 2 fragments of
// 16 x 16). Factor tiles are staged in shared memory in their 16-bit dtype, KC ranks at a time
// (zero-padded past the rank and outside the current group), and multiplied on the tensor cores
// with fp32 accumulation: bf16 x bf16 and fp16 x fp16 products are exact in fp32.
//  * HALF factors (both bf16 or both fp16): ranks that share a scale form a group (runs of equal
//    scale, up to kMaxGroups); each group's fp32 sum is scaled once: W + sum_g s_g (sum_k B A).
//  * SPLIT (fp32 factors): the host splits B*s and A into bf16 high and low parts; the tile is
//    Bh.Ah + Bh.Al + Bl.Ah (the dropped Bl.Al is 2^-16 of a product).
// Then the accumulators go through shared memory (reusing the staging space) and each thread reads
// W 8 elements (16 bytes) at a time where W's rows allow it, adds in fp32, rounds once to nearest
// even (the hardware conversion) and writes 16 bytes. W is read once and written once.
#pragma once
#include <cstdint>
#include <cstring>

#include "cuda/convert.cuh"
#include "cuda/device.cuh"

namespace portllm {
namespace mma_path {

constexpr int BM = 64, BN = 128, KC = 32, THREADS = 256, kMaxGroups = 16;
constexpr int LDB = KC + 8;   // halves per staged B row (a multiple of 8, as WMMA needs)
constexpr int LDA = BN + 8;   // halves per staged A row
constexpr int LDC = BN + 4;   // floats per row of the accumulator tile

struct Groups {
  int n;                    // number of groups
  int k[kMaxGroups + 1];    // group g holds ranks [k[g], k[g + 1]) of the staged factors
  float s[kMaxGroups];      // its scale (1 for SPLIT, where the scale is folded into B)
};

template <typename H> __device__ __forceinline__ H hzero();
template <> __device__ __forceinline__ __nv_bfloat16 hzero() { return __float2bfloat16_rn(0.f); }
template <> __device__ __forceinline__ __half hzero() { return __float2half_rn(0.f); }

template <typename H, bool SPLIT>
struct Smem {
  static constexpr int kStage = (SPLIT ? 2 : 1) * (BM * LDB + KC * LDA) * static_cast<int>(sizeof(H));
  static constexpr int kAcc = BM * LDC * static_cast<int>(sizeof(float));
  static constexpr int kBytes = kStage > kAcc ? kStage : kAcc;
};

template <typename T, typename H, bool SPLIT, bool VEC_W>
__global__ void __launch_bounds__(THREADS)
patch_add_mma_kernel(T* __restrict__ W,         // [m, n], unit column stride, row stride sw0
                     const H* __restrict__ B,   // [m, rp] (SPLIT: high part of B*s), row stride ldb
                     const H* __restrict__ A,   // [rp, na] (SPLIT: high part of A), row stride lda
                     const H* __restrict__ Bl,  // SPLIT: low part of B*s (laid out as B)
                     const H* __restrict__ Al,  // SPLIT: low part of A (laid out as A)
                     int64_t m, int64_t n, int64_t sw0, int64_t ldb, int64_t lda, int64_t na,
                     Groups groups) {
  using namespace nvcuda;
  __shared__ __align__(128) unsigned char smem[Smem<H, SPLIT>::kBytes];
  H* Bs = reinterpret_cast<H*>(smem);
  H* As = Bs + BM * LDB;
  H* Bls = As + KC * LDA;
  H* Als = Bls + BM * LDB;
  float* Cs = reinterpret_cast<float*>(smem);

  const int tid = threadIdx.x, warp = tid / 32;
  const int wr = warp / 4, wc = warp % 4;  // the warp's 32 x 32 part: rows wr*32, columns wc*32
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * BN;
  const uint4 zero{0u, 0u, 0u, 0u};

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  for (int g = 0; g < groups.n; ++g) {
    const int k_lo = groups.k[g], k_hi = groups.k[g + 1];  // multiples of 8 (the launcher's layout)
    // Each group's sum is scaled once (HALF); SPLIT has one group of scale 1 and sums into acc.
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> part[SPLIT ? 1 : 2][SPLIT ? 1 : 2];
    if constexpr (!SPLIT) {
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(part[i][j], 0.f);
    }
    for (int k0 = k_lo; k0 < k_hi; k0 += KC) {
      __syncthreads();  // the previous chunk's fragments are loaded
      // 16-byte loads and stores: 8 ranks of a B row, 8 columns of an A row; zeros past the group
      // (its end is a multiple of 8, so a vector is wholly in or out) and past W's edge.
#pragma unroll
      for (int v = tid; v < BM * KC / 8; v += THREADS) {
        const int i = v / (KC / 8), kk = (v % (KC / 8)) * 8;
        const int64_t gi = row0 + i;
        const int gk = k0 + kk;
        const bool in = gi < m && gk < k_hi;
        store_vec<uint4>(Bs + i * LDB + kk, in ? load_vec<uint4>(B + gi * ldb + gk) : zero);
        if constexpr (SPLIT) store_vec<uint4>(Bls + i * LDB + kk, in ? load_vec<uint4>(Bl + gi * ldb + gk) : zero);
      }
#pragma unroll
      for (int v = tid; v < KC * BN / 8; v += THREADS) {
        const int kk = v / (BN / 8), j = (v % (BN / 8)) * 8;
        const int64_t gj = col0 + j;
        const int gk = k0 + kk;
        const bool in = gj < na && gk < k_hi;
        store_vec<uint4>(As + kk * LDA + j, in ? load_vec<uint4>(A + gk * lda + gj) : zero);
        if constexpr (SPLIT) store_vec<uint4>(Als + kk * LDA + j, in ? load_vec<uint4>(Al + gk * lda + gj) : zero);
      }
      __syncthreads();
#pragma unroll
      for (int ks = 0; ks < KC; ks += 16) {
        if (k0 + ks >= k_hi) break;  // a half chunk past the group (r = 16: half of every chunk) is zeros
        wmma::fragment<wmma::matrix_a, 16, 16, 16, H, wmma::row_major> a[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, H, wmma::row_major> b[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], Bs + (wr * 32 + i * 16) * LDB + ks, LDB);
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], As + ks * LDA + wc * 32 + j * 16, LDA);
        if constexpr (SPLIT) {
          // small terms first: Bh.Al + Bl.Ah, then Bh.Ah; loaded one fragment at a time
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, H, wmma::row_major> bl;
            wmma::load_matrix_sync(bl, Als + ks * LDA + wc * 32 + j * 16, LDA);
#pragma unroll
            for (int i = 0; i < 2; ++i) wmma::mma_sync(acc[i][j], a[i], bl, acc[i][j]);
          }
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, H, wmma::row_major> al;
            wmma::load_matrix_sync(al, Bls + (wr * 32 + i * 16) * LDB + ks, LDB);
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], al, b[j], acc[i][j]);
          }
#pragma unroll
          for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        } else {
#pragma unroll
          for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::mma_sync(part[i][j], a[i], b[j], part[i][j]);
        }
      }
    }
    if constexpr (!SPLIT) {
      const float s = groups.s[g];
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int t = 0; t < acc[i][j].num_elements; ++t) acc[i][j].x[t] += s * part[i][j].x[t];
    }
  }

  __syncthreads();  // the staging space becomes the accumulator tile
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(Cs + (wr * 32 + i * 16) * LDC + wc * 32 + j * 16, acc[i][j], LDC,
                              wmma::mem_row_major);
  __syncthreads();

  constexpr int PER = BM * BN / 8 / THREADS;  // 16-byte pieces of W per thread
  if constexpr (VEC_W) {  // n is a multiple of 8: a piece is wholly in W or out; all loads in flight first
    uint4 raw[PER];
#pragma unroll
    for (int u = 0; u < PER; ++u) {
      const int v = tid + u * THREADS, i = v / (BN / 8), j = (v % (BN / 8)) * 8;
      if (row0 + i < m && col0 + j < n) raw[u] = load_vec<uint4>(W + (row0 + i) * sw0 + col0 + j);
    }
#pragma unroll
    for (int u = 0; u < PER; ++u) {
      const int v = tid + u * THREADS, i = v / (BN / 8), j = (v % (BN / 8)) * 8;
      if (row0 + i >= m || col0 + j >= n) continue;
      const float4 c0 = load_vec<float4>(Cs + i * LDC + j), c1 = load_vec<float4>(Cs + i * LDC + j + 4);
      const float c[8] = {c0.x, c0.y, c0.z, c0.w, c1.x, c1.y, c1.z, c1.w};
      store_global16(W + (row0 + i) * sw0 + col0 + j, add16<T>(raw[u], c));
    }
  } else {
    for (int v = tid; v < BM * BN; v += THREADS) {
      const int i = v / BN, j = v % BN;
      const int64_t gi = row0 + i, gj = col0 + j;
      if (gi < m && gj < n) W[gi * sw0 + gj] = from_f32<T>(to_f32(W[gi * sw0 + gj]) + Cs[i * LDC + j]);
    }
  }
}

}  // namespace mma_path
}  // namespace portllm
