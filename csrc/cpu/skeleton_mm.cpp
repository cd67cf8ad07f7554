// skeleton_mm on CPU: the gathered block of W is small (m x r or r x n), so gathering it with
// index_select and handing the product to ATen's GEMM (oneDNN/MKL, fp32 accumulation) is the
// fastest way on a CPU; the transient copy is freed at once and never stored.
//
// Implements portllm.ops.skeleton_mm (torch.ops.portllm.skeleton_mm); tested against the reference by tests/test_pmss_ops.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "portllm.h"

namespace portllm {
namespace {

at::Tensor skeleton_mm_cpu(const at::Tensor& A, const at::Tensor& W, const at::Tensor& idx,
                           c10::string_view kind_view) {
  const std::string kind(kind_view);
  check_skeleton_mm_args(A, W, idx, kind);
  if (kind == "ct") return at::mm(A, W.index_select(1, idx).t().to(A.scalar_type()));
  if (kind == "c") return at::mm(A, W.index_select(1, idx).to(A.scalar_type()));
  return at::mm(A, W.index_select(0, idx).to(A.scalar_type()));
}

}  // namespace

TORCH_LIBRARY_IMPL(portllm, CPU, m) { m.impl("skeleton_mm", &skeleton_mm_cpu); }

}  // namespace portllm
