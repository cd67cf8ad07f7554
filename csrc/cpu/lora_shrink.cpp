// lora_shrink on CPU: h[t] = x[t] . A[slots[t]]^T in fp32 (0 where slots[t] < 0).
//
// Each slot's tokens are gathered (grouped_rows) and multiplied by ATen's fp32 GEMM with that
// slot's A: one call from Python, the GEMM's vector code and threads. A direct per-(token, rank)
// dot-product kernel was measured 2-4x slower than this from 8 tokens on (bf16 -> fp32 conversion
// in the inner loop; 4096 x 16 ranks, this machine) and level at 1 token, so there is none.
//
// Implements portllm.ops.lora_shrink (torch.ops.portllm.lora_shrink, CPU); tested against the
// reference by tests/test_serve_ops.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "portllm.h"

namespace portllm {
namespace {

at::Tensor lora_shrink_cpu(const at::Tensor& x, const at::Tensor& A, const at::Tensor& slots_in) {
  check_lora_shrink_args(x, A, slots_in);
  const int64_t T = x.size(0), P = A.size(0), R = A.size(1);
  at::Tensor h = at::zeros({T, R}, x.options().dtype(at::kFloat));
  if (T == 0 || R == 0) return h;
  const at::Tensor slots = slots_in.to(at::kLong).contiguous();
  for (const auto& [p, rows] : grouped_rows(slots, P))
    h.index_copy_(0, rows, at::mm(x.index_select(0, rows).to(at::kFloat), A[p].to(at::kFloat).t()));
  return h;
}

}  // namespace

TORCH_LIBRARY_IMPL(portllm, CPU, m) { m.impl("lora_shrink", &lora_shrink_cpu); }

}  // namespace portllm
