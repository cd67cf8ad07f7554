// grouped_rows: the tokens of each patch slot, for the CPU serving kernels' GEMM path
// (csrc/cpu/lora_shrink.cpp, lora_expand.cpp). One counting pass and one placement pass.
#include <ATen/ATen.h>

#include <utility>
#include <vector>

#include "portllm.h"

namespace portllm {

std::vector<std::pair<int64_t, at::Tensor>> grouped_rows(const at::Tensor& slots, int64_t P) {
  const int64_t T = slots.size(0);
  const int64_t* sl = slots.data_ptr<int64_t>();
  std::vector<int64_t> count(static_cast<size_t>(P), 0);
  for (int64_t t = 0; t < T; ++t)
    if (sl[t] >= 0 && sl[t] < P) ++count[static_cast<size_t>(sl[t])];
  std::vector<std::pair<int64_t, at::Tensor>> out;
  std::vector<int64_t*> fill(static_cast<size_t>(P), nullptr);
  for (int64_t p = 0; p < P; ++p) {
    if (count[static_cast<size_t>(p)] == 0) continue;
    out.emplace_back(p, at::empty({count[static_cast<size_t>(p)]}, slots.options()));
    fill[static_cast<size_t>(p)] = out.back().second.data_ptr<int64_t>();
  }
  for (int64_t t = 0; t < T; ++t)
    if (sl[t] >= 0 && sl[t] < P) *fill[static_cast<size_t>(sl[t])]++ = t;
  return out;
}

}  // namespace portllm
