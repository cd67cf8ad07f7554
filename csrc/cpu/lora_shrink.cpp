// lora_shrink on CPU: h[t] = x[t] . A[slots[t]]^T in fp32 (0 where slots[t] < 0).
//
// Decode-sized calls (up to DIRECT_TOKENS tokens, x and A with unit stride along n, an AVX2 or AVX-512
// CPU) take a direct kernel per token (csrc/cpu/lora_decode.h): the token's slot's A read in its own
// dtype, widened in registers, four ranks' dot products at a time. Larger calls gather each slot's
// tokens (grouped_rows) and multiply them by ATen's fp32 GEMM with that slot's A: one call from
// Python, the GEMM's vector code and threads. (A direct kernel in portable C++, converting bf16 in its
// inner loop, was 2-4x slower than the GEMM from 8 tokens on; the vector one is not.)
//
// Implements portllm.ops.lora_shrink (torch.ops.portllm.lora_shrink, CPU); tested against the
// reference by tests/test_serve_ops.py (every vector path, forced with PORTLLM_CPU_ISA).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/isa.h"
#include "cpu/lora_decode.h"
#include "portllm.h"

namespace portllm {
namespace {

constexpr int64_t DIRECT_TOKENS = 16;

#if defined(PORTLLM_X86_AVX512)
bool shrink_direct(const at::Tensor& x, const at::Tensor& A, const at::Tensor& slots, at::Tensor& h) {
  const Isa isa = isa_for_call();
  const int64_t T = x.size(0), n = x.size(1), P = A.size(0), R = A.size(1);
  if (T > DIRECT_TOKENS || isa < Isa::Avx2 || (n > 1 && (x.stride(1) != 1 || A.stride(2) != 1))) return false;
  const int64_t* sl = slots.data_ptr<int64_t>();
  float* hp = h.data_ptr<float>();
  const int64_t sxt = x.stride(0), sap = A.stride(0), sar = A.stride(1);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, n * R));
  PORTLLM_DISPATCH_FLOATS(x.scalar_type(), "lora_shrink_cpu_x", [&] {
    using TX = scalar_t;
    const TX* xp = x.data_ptr<TX>();
    PORTLLM_DISPATCH_FLOATS(A.scalar_type(), "lora_shrink_cpu_a", [&] {
      const scalar_t* ap = A.data_ptr<scalar_t>();
      at::parallel_for(0, T, grain, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const int64_t p = sl[t];
          if (p < 0 || p >= P) continue;
          if (isa >= Isa::Avx512) lora_vec::shrink_row_avx512(xp + t * sxt, ap + p * sap, sar, n, R, hp + t * R);
          else lora_vec::shrink_row_avx2(xp + t * sxt, ap + p * sap, sar, n, R, hp + t * R);
        }
      });
    });
  });
  return true;
}
#else
bool shrink_direct(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&) { return false; }
#endif

at::Tensor lora_shrink_cpu(const at::Tensor& x, const at::Tensor& A, const at::Tensor& slots_in) {
  check_lora_shrink_args(x, A, slots_in);
  const int64_t T = x.size(0), P = A.size(0), R = A.size(1);
  at::Tensor h = at::zeros({T, R}, x.options().dtype(at::kFloat));
  if (T == 0 || R == 0) return h;
  const at::Tensor slots = slots_in.to(at::kLong).contiguous();
  if (shrink_direct(x, A, slots, h)) return h;
  for (const auto& [p, rows] : grouped_rows(slots, P))
    h.index_copy_(0, rows, at::mm(x.index_select(0, rows).to(at::kFloat), A[p].to(at::kFloat).t()));
  return h;
}

}  // namespace

TORCH_LIBRARY_IMPL(portllm, CPU, m) { m.impl("lora_shrink", &lora_shrink_cpu); }

}  // namespace portllm
