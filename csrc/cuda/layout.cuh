// Host-side layout test shared by csrc/cuda's launchers: whether a tensor can be read and written in
// 16-byte vectors along one dimension (the kernels' VEC template instances).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

namespace portllm {

// Unit stride along `dim`, that dimension and every other stride (of dimensions longer than 1) a
// multiple of 16 bytes' worth of elements, and the data 16-byte aligned.
inline bool vectors_along(const at::Tensor& t, int64_t dim) {
  const int64_t vw = 16 / static_cast<int64_t>(t.element_size());
  if (t.stride(dim) != 1 || t.size(dim) % vw != 0 || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t d = 0; d < t.dim(); ++d)
    if (d != dim && t.size(d) > 1 && t.stride(d) % vw != 0) return false;
  return true;
}

}  // namespace portllm
