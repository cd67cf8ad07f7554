// bit_misses on CPU: where two integer views of weights differ, and by how much.
//
// portllm/exact.py compares, per 4 Mi-element chunk, a weight's original bits with what the undo
// will compute from the merged weight; the misses are a few percent. Two parallel sweeps over
// both would be two full reads; here the first sweep reads a and b once and keeps one bit per element
// (and a count per block), and the second walks the bits, reading a and b only where they differ.
// `(b != a).nonzero()` and two gathers took four passes, one of them single-threaded.
//
// Implements torch.ops.portllm.bit_misses (schema in csrc/ops.cpp); tested against that PyTorch
// expression by tests/test_exact_undo.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace portllm {
namespace {

template <typename T>
std::tuple<at::Tensor, at::Tensor> misses(const at::Tensor& a, const at::Tensor& b) {
  const int64_t n = a.numel();
  const T* pa = a.data_ptr<T>();
  const T* pb = b.data_ptr<T>();
  constexpr int64_t kBlock = int64_t(1) << 16;  // elements per block: 1024 mask words
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  const int64_t words = (n + 63) / 64;
  // Pass 1, over a and b: one bit per element (1 = they differ), and the misses per block.
  std::vector<uint64_t> mask(static_cast<size_t>(words));
  std::vector<int64_t> count(blocks);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      int64_t c = 0;
      for (int64_t w = blk * (kBlock / 64), we = std::min(words, (blk + 1) * (kBlock / 64)); w < we; ++w) {
        const int64_t i0 = w * 64, len = std::min<int64_t>(64, n - i0);
        uint64_t m = 0;
        if (len == 64) {
          for (int j = 0; j < 64; ++j) m |= static_cast<uint64_t>(pa[i0 + j] != pb[i0 + j]) << j;
        } else {
          for (int64_t j = 0; j < len; ++j) m |= static_cast<uint64_t>(pa[i0 + j] != pb[i0 + j]) << j;
        }
        mask[w] = m;
        c += __builtin_popcountll(m);
      }
      count[blk] = c;
    }
  });
  std::vector<int64_t> start(blocks + 1, 0);
  for (int64_t k = 0; k < blocks; ++k) start[k + 1] = start[k] + count[k];
  at::Tensor loc = at::empty({start[blocks]}, a.options().dtype(at::kLong));
  at::Tensor diff = at::empty({start[blocks]}, a.options().dtype(at::kLong));
  int64_t* pl = loc.data_ptr<int64_t>();
  int64_t* pd = diff.data_ptr<int64_t>();
  // Pass 2, over the mask: a and b are read again only where an element differs.
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      int64_t o = start[blk];
      for (int64_t w = blk * (kBlock / 64), we = std::min(words, (blk + 1) * (kBlock / 64)); w < we; ++w) {
        for (uint64_t m = mask[w]; m != 0; m &= m - 1) {
          const int64_t i = w * 64 + __builtin_ctzll(m);
          pl[o] = i;
          pd[o] = static_cast<int64_t>(pa[i]) - static_cast<int64_t>(pb[i]);
          ++o;
        }
      }
    }
  });
  return {loc, diff};
}

std::tuple<at::Tensor, at::Tensor> bit_misses_cpu(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 1 && b.dim() == 1 && a.numel() == b.numel(),
              "bit_misses: a and b must be 1-D of the same length, got ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type() &&
                  (a.scalar_type() == at::kShort || a.scalar_type() == at::kInt),
              "bit_misses: a and b must both be int16 or both int32, got ", a.scalar_type(), " and ",
              b.scalar_type());
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous(), "bit_misses: a and b must be contiguous");
  if (a.scalar_type() == at::kShort) return misses<int16_t>(a, b);
  return misses<int32_t>(a, b);
}

}  // namespace

TORCH_LIBRARY_IMPL(portllm, CPU, m) { m.impl("bit_misses", &bit_misses_cpu); }

}  // namespace portllm
