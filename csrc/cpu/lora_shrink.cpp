// lora_shrink on CPU: h[t] = x[t] . A[slots[t]]^T in fp32 (0 where slots[t] < 0).
//
// One work item per (token, rank): a dot product of length n in fp32, kept in LANES independent
// partial sums (so the compiler vectorises it without reassociating) that are added in a fixed
// order at the end: deterministic, whatever the thread count. Items run in parallel
// (at::parallel_for); a decode step (a few tokens) is a few microseconds of work, so the point of
// this kernel is one call instead of the reference's per-slot gathers. From GEMM_TOKENS tokens on,
// the tokens of each slot are gathered and multiplied by ATen's fp32 GEMM instead (grouped_rows).
//
// Implements portllm.ops.lora_shrink (torch.ops.portllm.lora_shrink, CPU); tested against the
// reference by tests/test_serve_ops.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "portllm.h"

namespace portllm {
namespace {

constexpr int64_t LANES = 16;
constexpr int64_t GEMM_TOKENS = 64;

template <typename T>
float dot(const T* x, int64_t sx, const T* a, int64_t sa, int64_t n) {
  float acc[LANES] = {};
  int64_t j = 0;
  if (sx == 1 && sa == 1) {
    for (; j + LANES <= n; j += LANES)
      for (int64_t l = 0; l < LANES; ++l)
        acc[l] += static_cast<float>(x[j + l]) * static_cast<float>(a[j + l]);
  }
  for (; j < n; ++j) acc[j % LANES] += static_cast<float>(x[j * sx]) * static_cast<float>(a[j * sa]);
  float s = 0.f;
  for (int64_t l = 0; l < LANES; ++l) s += acc[l];
  return s;
}

at::Tensor lora_shrink_cpu(const at::Tensor& x_in, const at::Tensor& A_in, const at::Tensor& slots_in) {
  TORCH_CHECK(x_in.dim() == 2 && A_in.dim() == 3 && A_in.size(2) == x_in.size(1),
              "lora_shrink (cpu): need x [T, n] and A [P, R, n]");
  TORCH_CHECK(slots_in.dim() == 1 && slots_in.size(0) == x_in.size(0), "lora_shrink (cpu): slots must be [T]");
  const int64_t T = x_in.size(0), n = x_in.size(1), P = A_in.size(0), R = A_in.size(1);
  at::Tensor h = at::zeros({T, R}, x_in.options().dtype(at::kFloat));
  if (T == 0 || R == 0) return h;
  at::Tensor x = x_in, A = A_in;
  if (x.scalar_type() != A.scalar_type()) {  // one dtype for both operands (fp32 is exact)
    x = x.to(at::kFloat);
    A = A.to(at::kFloat);
  }
  const at::Tensor slots = slots_in.to(at::kLong).contiguous();
  if (T >= GEMM_TOKENS) {
    for (const auto& [p, rows] : grouped_rows(slots, P))
      h.index_copy_(0, rows, at::mm(x.index_select(0, rows).to(at::kFloat), A[p].to(at::kFloat).t()));
    return h;
  }
  const int64_t* sl = slots.data_ptr<int64_t>();
  float* hp = h.data_ptr<float>();
  PORTLLM_DISPATCH_FLOATS(x.scalar_type(), "lora_shrink_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* ap = A.data_ptr<scalar_t>();
    const int64_t sxt = x.stride(0), sxn = x.stride(1), sap = A.stride(0), sar = A.stride(1), san = A.stride(2);
    const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(n, 1));
    at::parallel_for(0, T * R, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t t = i / R, k = i % R, p = sl[t];
        if (p < 0 || p >= P) continue;
        hp[t * R + k] = dot(xp + t * sxt, sxn, ap + p * sap + k * sar, san, n);
      }
    });
  });
  return h;
}

}  // namespace

TORCH_LIBRARY_IMPL(portllm, CPU, m) { m.impl("lora_shrink", &lora_shrink_cpu); }

}  // namespace portllm
