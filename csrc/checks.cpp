// Argument checks shared by the device implementations of the ops.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <string>
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

int64_t check_skeleton_mm_args(const at::Tensor& A, const at::Tensor& W, const at::Tensor& idx,
                               const std::string& kind) {
  TORCH_CHECK(kind == "ct" || kind == "c" || kind == "r", "skeleton_mm: unknown kind '", kind,
              "'; choose ct, c or r");
  TORCH_CHECK(A.dim() == 2 && W.dim() == 2, "skeleton_mm: A and W must be 2-D, got ", A.sizes(),
              " and ", W.sizes());
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong, "skeleton_mm: idx must be 1-D int64");
  TORCH_CHECK(A.device() == W.device() && idx.device() == W.device(),
              "skeleton_mm: A, W and idx must be on one device");
  const int64_t r = idx.size(0), m = W.size(0), n = W.size(1);
  const int64_t need = kind == "c" ? m : r;
  TORCH_CHECK(A.size(1) == need, "skeleton_mm(", kind, "): A ", A.sizes(), " needs ", need,
              " columns for W ", W.sizes(), " and ", r, " indices");
  return kind == "ct" ? m : kind == "c" ? r : n;
}

void check_lora_shrink_args(const at::Tensor& x, const at::Tensor& A, const at::Tensor& slots) {
  TORCH_CHECK(x.dim() == 2 && A.dim() == 3 && A.size(2) == x.size(1),
              "lora_shrink: need x [T, n] and A [P, R, n], got x ", x.sizes(), ", A ", A.sizes());
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == x.size(0) &&
                  (slots.scalar_type() == at::kLong || slots.scalar_type() == at::kInt),
              "lora_shrink: slots must be int64/int32 [", x.size(0), "], got ", slots.scalar_type(), " ",
              slots.sizes());
  TORCH_CHECK(A.device() == x.device() && slots.device() == x.device(),
              "lora_shrink: x, A and slots must be on one device");
}

void check_lora_expand_args(const at::Tensor& y, const at::Tensor& h, const at::Tensor& B,
                            const at::Tensor& scale, const at::Tensor& slots) {
  TORCH_CHECK(y.dim() == 2 && h.dim() == 2 && B.dim() == 3 && B.size(1) == y.size(1) &&
                  h.size(0) == y.size(0) && h.size(1) == B.size(2),
              "lora_expand_: need y [T, m], h [T, R], B [P, m, R], got y ", y.sizes(), ", h ", h.sizes(),
              ", B ", B.sizes());
  TORCH_CHECK(h.scalar_type() == at::kFloat && scale.scalar_type() == at::kFloat &&
                  scale.numel() == B.size(0),
              "lora_expand_: h and scale must be float32, scale [P]");
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == y.size(0) &&
                  (slots.scalar_type() == at::kLong || slots.scalar_type() == at::kInt),
              "lora_expand_: slots must be int64/int32 [", y.size(0), "], got ", slots.scalar_type(), " ",
              slots.sizes());
  TORCH_CHECK(h.device() == y.device() && B.device() == y.device() && scale.device() == y.device() &&
                  slots.device() == y.device(),
              "lora_expand_: y, h, B, scale and slots must be on one device");
}

}  // namespace portllm
