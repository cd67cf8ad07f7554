// Shared declarations of portllm's C++ extension.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <string>
#include <utility>
#include <vector>

namespace portllm {
// Checks shared by every device implementation of patch_add_: ranks, shapes, dtypes, devices.
void check_patch_add_args(const at::Tensor& W, const at::Tensor& B, const at::Tensor& A,
                          const at::Tensor& scale);
// Checks of skeleton_mm's arguments; returns the output's column count.
int64_t check_skeleton_mm_args(const at::Tensor& A, const at::Tensor& W, const at::Tensor& idx,
                               const std::string& kind);
// Checks of the serving ops' arguments (every device): shapes, dtypes, one device.
void check_lora_shrink_args(const at::Tensor& x, const at::Tensor& A, const at::Tensor& slots);
void check_lora_expand_args(const at::Tensor& y, const at::Tensor& h, const at::Tensor& B,
                            const at::Tensor& scale, const at::Tensor& slots);
// The widest CPU vector path this machine runs: "avx512bf16", "avx512", "avx2" or "generic".
std::string cpu_isa_best();
// The path the CPU kernels take now: cpu_isa_best(), or a lower one named by PORTLLM_CPU_ISA.
std::string cpu_isa_for_call();
std::string build_info();
// The token rows of each patch slot in use, slot by slot: [(p, int64 row indices)]. slots [T] int64
// on the CPU; negative entries (no patch) and entries >= P are left out.
std::vector<std::pair<int64_t, at::Tensor>> grouped_rows(const at::Tensor& slots, int64_t P);
}  // namespace portllm

// Dispatch over the dtypes portllm's kernels take: float32, float16, bfloat16 (no double).
#define PORTLLM_DISPATCH_FLOATS(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                  \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)     \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
