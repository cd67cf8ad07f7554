// Argument checks shared by every device implementation of patch_add_.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <utility>

#include "portllm.h"

namespace portllm {

void check_patch_add_args(const at::Tensor& W, const at::Tensor& B, const at::Tensor& A,
                          const at::Tensor& scale) {
  TORCH_CHECK(W.dim() == 2, "patch_add_: W must be 2-D, got shape ", W.sizes());
  TORCH_CHECK(B.dim() == 2, "patch_add_: B must be 2-D, got shape ", B.sizes());
  TORCH_CHECK(A.dim() == 2, "patch_add_: A must be 2-D, got shape ", A.sizes());
  TORCH_CHECK(B.size(0) == W.size(0) && A.size(1) == W.size(1) && B.size(1) == A.size(0),
              "patch_add_: shapes do not match: W ", W.sizes(), ", B ", B.sizes(), ", A ",
              A.sizes(), " (need W [m, n], B [m, r], A [r, n])");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == B.size(1),
              "patch_add_: scale must have shape [", B.size(1), "] (one per rank), got ",
              scale.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kFloat, "patch_add_: scale must be float32, got ",
              scale.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"W", W}, {"B", B}, {"A", A}}) {
    auto dt = t.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "patch_add_: ", name,
                " has dtype ", dt, "; supported: float32, float16, bfloat16");
    TORCH_CHECK(t.device() == W.device(), "patch_add_: ", name, " is on ", t.device(),
                " but W is on ", W.device());
  }
  TORCH_CHECK(scale.device() == W.device(), "patch_add_: scale is on ", scale.device(),
              " but W is on ", W.device());
  at::assert_no_internal_overlap(W);
}

}  // namespace portllm
