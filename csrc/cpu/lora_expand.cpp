// lora_expand_ on CPU: y[t] <- round(y[t] + scale[p] * (h[t] . B[p]^T)), p = slots[t], in place;
// rows with slots[t] < 0 are neither read nor written.
//
// One work item per (token, block of COLS output columns). On an AVX2 or AVX-512 CPU with B and y of
// unit stride along m, the block's columns are held in vector registers 64 or 128 at a time
// (csrc/cpu/lora_decode.h); otherwise an fp32 row accumulator on the stack,
// filled rank by rank (acc[j] += h[k] * B[p, j, k]: with portllm.serve's slot layout, B stored
// [P, R, m], the inner loop reads consecutive addresses and vectorises), then scaled once, added
// to y in fp32 and rounded once (c10's conversions round to nearest even). Fixed order per
// element: deterministic, whatever the thread count. From GEMM_TOKENS tokens on, each slot's
// tokens are gathered and multiplied by ATen's fp32 GEMM instead (grouped_rows).
//
// Implements portllm.ops.lora_expand_ (torch.ops.portllm.lora_expand_, CPU); tested against the
// reference by tests/test_serve_ops.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/isa.h"
#include "cpu/lora_decode.h"
#include "portllm.h"

namespace portllm {
namespace {

constexpr int64_t COLS = 1024;
constexpr int64_t GEMM_TOKENS = 384;  // measured crossover: 4096 and 14336 columns, r=16, this machine

template <typename Y, typename F>
void expand_block(Y* y, int64_t sym, const float* h, const F* b, int64_t sbm, int64_t sbr, float s,
                  int64_t R, int64_t ncols, Isa isa) {
#if defined(PORTLLM_X86_AVX512)
  if (sbm == 1 && sym == 1 && isa >= Isa::Avx2) {  // columns in registers (csrc/cpu/lora_decode.h)
    if (isa >= Isa::Avx512) lora_vec::expand_row_avx512(y, h, b, sbr, s, R, ncols);
    else lora_vec::expand_row_avx2(y, h, b, sbr, s, R, ncols);
    return;
  }
#endif
  (void)isa;
  float acc[COLS];
  for (int64_t j = 0; j < ncols; ++j) acc[j] = 0.f;
  for (int64_t k = 0; k < R; ++k) {
    const float hk = h[k];
    const F* bk = b + k * sbr;
    if (sbm == 1) {
      for (int64_t j = 0; j < ncols; ++j) acc[j] += hk * static_cast<float>(bk[j]);
    } else {
      for (int64_t j = 0; j < ncols; ++j) acc[j] += hk * static_cast<float>(bk[j * sbm]);
    }
  }
  for (int64_t j = 0; j < ncols; ++j) {
    Y* p = y + j * sym;
    *p = static_cast<Y>(static_cast<float>(*p) + acc[j] * s);
  }
}

void lora_expand_cpu(at::Tensor y, const at::Tensor& h_in, const at::Tensor& B, const at::Tensor& scale_in,
                     const at::Tensor& slots_in) {
  check_lora_expand_args(y, h_in, B, scale_in, slots_in);
  const int64_t T = y.size(0), m = y.size(1), P = B.size(0), R = B.size(2);
  if (T == 0 || m == 0 || R == 0) return;
  const at::Tensor h = h_in.contiguous(), scale = scale_in.contiguous();
  const at::Tensor slots = slots_in.to(at::kLong).contiguous();
  if (T >= GEMM_TOKENS) {
    for (const auto& [p, rows] : grouped_rows(slots, P)) {
      at::Tensor delta = at::mm(h.index_select(0, rows), B[p].to(at::kFloat).t()).mul_(scale[p]);
      y.index_copy_(0, rows, y.index_select(0, rows).to(at::kFloat).add_(delta).to(y.scalar_type()));
    }
    return;
  }
  const int64_t* sl = slots.data_ptr<int64_t>();
  const float* hp = h.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  const int64_t blocks = (m + COLS - 1) / COLS;
  const Isa isa = isa_for_call();
  PORTLLM_DISPATCH_FLOATS(y.scalar_type(), "lora_expand_cpu", [&] {
    using Y = scalar_t;
    Y* yp = y.data_ptr<Y>();
    const int64_t syt = y.stride(0), sym = y.stride(1);
    PORTLLM_DISPATCH_FLOATS(B.scalar_type(), "lora_expand_cpu_b", [&] {
      const scalar_t* bp = B.data_ptr<scalar_t>();
      const int64_t sbp = B.stride(0), sbm = B.stride(1), sbr = B.stride(2);
      const int64_t grain = std::max<int64_t>(1, 16 / std::max<int64_t>(R / 16, 1));
      at::parallel_for(0, T * blocks, grain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t t = i / blocks, c0 = (i % blocks) * COLS, p = sl[t];
          if (p < 0 || p >= P) continue;
          expand_block<Y, scalar_t>(yp + t * syt + c0 * sym, sym, hp + t * R, bp + p * sbp + c0 * sbm, sbm, sbr,
                                    sp[p], R, std::min(COLS, m - c0), isa);
        }
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(portllm, CPU, m) { m.impl("lora_expand_", &lora_expand_cpu); }

}  // namespace portllm
