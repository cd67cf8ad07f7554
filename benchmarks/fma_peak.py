"""The fp32 FMA rate of a CPU vector path, measured: independent FMA chains on every thread, built
once with the compiler at hand (torch.utils.cpp_extension.load_inline). Used by bench_patch_add.py
for the FMA floor of a merge: 2·m·n·r flops at this rate."""

from __future__ import annotations

import time

_SRC = r"""
#include <immintrin.h>
#include <torch/extension.h>
#include <omp.h>
#define CHAINS 12
__attribute__((target("avx2,fma"))) static float run_avx2(long iters) {
  __m256 a[CHAINS]; const __m256 b = _mm256_set1_ps(1.0000001f), c = _mm256_set1_ps(1e-7f);
  for (int i = 0; i < CHAINS; ++i) a[i] = _mm256_set1_ps(float(i));
  for (long t = 0; t < iters; ++t) {
#pragma GCC unroll 12
    for (int i = 0; i < CHAINS; ++i) a[i] = _mm256_fmadd_ps(a[i], b, c);
  }
  float v[8], s = 0; for (int i = 0; i < CHAINS; ++i) { _mm256_storeu_ps(v, a[i]); s += v[0]; } return s;
}
__attribute__((target("avx512f"))) static float run_avx512(long iters) {
  __m512 a[CHAINS]; const __m512 b = _mm512_set1_ps(1.0000001f), c = _mm512_set1_ps(1e-7f);
  for (int i = 0; i < CHAINS; ++i) a[i] = _mm512_set1_ps(float(i));
  for (long t = 0; t < iters; ++t) {
#pragma GCC unroll 12
    for (int i = 0; i < CHAINS; ++i) a[i] = _mm512_fmadd_ps(a[i], b, c);
  }
  float s = 0; for (int i = 0; i < CHAINS; ++i) s += _mm512_reduce_add_ps(a[i]); return s;
}
static float run_generic(long iters) {  // what the compiler makes of plain C++ (SSE2 on x86-64)
  float a[CHAINS * 4]; for (int i = 0; i < CHAINS * 4; ++i) a[i] = float(i);
  for (long t = 0; t < iters; ++t)
    for (int i = 0; i < CHAINS * 4; ++i) a[i] = a[i] * 1.0000001f + 1e-7f;
  float s = 0; for (int i = 0; i < CHAINS * 4; ++i) s += a[i]; return s;
}
// flops per second with `threads` threads, each running `iters` rounds of CHAINS vector FMAs
double fma_rate(std::string isa, long iters, int threads) {
  const int lanes = isa == "avx2" ? 8 : isa == "generic" ? 4 : 16;
  double t0 = omp_get_wtime(); volatile float sink = 0;
#pragma omp parallel num_threads(threads)
  { float s = isa == "avx2" ? run_avx2(iters) : isa == "generic" ? run_generic(iters) : run_avx512(iters); sink = sink + s; }
  double t = omp_get_wtime() - t0;
  return 2.0 * lanes * CHAINS * double(iters) * threads / t;
}
"""
_mod = None


def peak_gflops(isa: str, threads: int) -> float:
    """Best of 5 measurements of the fp32 FMA rate (GFLOP/s) of the path ``isa`` on ``threads``
    threads (avx512bf16's fp32 rate is avx512's)."""
    global _mod
    if _mod is None:
        from torch.utils.cpp_extension import load_inline

        _mod = load_inline("portllm_fma_peak", cpp_sources=_SRC, functions=["fma_rate"],
                           extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    isa = "avx512" if isa == "avx512bf16" else isa
    best = 0.0
    for _ in range(5):
        best = max(best, _mod.fma_rate(isa, 20_000_000, threads))
        time.sleep(0.01)
    return best / 1e9
