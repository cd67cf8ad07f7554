// A CPU emulation of the CUDA that portllm's kernels use, so that csrc/cuda builds as C++ and its
// kernels run, where no GPU is at hand, against the reference (tests/test_cuda_emulated.py).
//
// Each block runs its threads as cooperative fibers (ucontext) on one OS thread, blocks one after
// another. A fiber runs until it reaches a barrier, so a thread may run far ahead of the others of
// its block up to the next __syncthreads: shared memory read before it is written, or overwritten
// while other threads still need it, shows as a wrong result. __syncthreads waits for every thread
// of the block that has not exited (as on sm_70+); __shfl_xor_sync exchanges through the warp's
// slots between two warp barriers and needs all 32 lanes. A pass of the scheduler in which no
// waiting thread is released is a deadlock and throws.
//
// __shared__ arrays become function statics: one copy per kernel instance, which the blocks reuse
// one at a time (so a block that reads shared memory it has not written reads the previous block's
// data, not zeros). Dynamic shared memory (PORTLLM_DYNAMIC_SMEM) is filled with 0xFF bytes (NaN)
// before each block. Vector accesses through portllm::load_vec / store_vec check their alignment.
//
// WMMA: each thread holds its warp's whole 16 x 16 tile (num_elements = 256), and mma_sync sums
// exact products of 16-bit values in fp32 in k order; element-wise fragment code, which is
// layout-free on a GPU, works unchanged. The tensor cores' own summation order is not modelled:
// results are compared within the same bounds as on a GPU.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define PORTLLM_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::portllm::emu::dynamic_smem())

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };

struct __nv_bfloat16 { uint16_t x; };
struct __half { uint16_t x; };
inline float __bfloat162float(__nv_bfloat16 h) { return static_cast<float>(c10::BFloat16(h.x, c10::BFloat16::from_bits())); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {c10::BFloat16(f).x}; }
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __half2float(__half h) { return static_cast<float>(c10::Half(h.x, c10::Half::from_bits())); }
inline __half __float2half_rn(float f) { return {c10::Half(f).x}; }

namespace portllm {
namespace emu {

struct Barrier {
  int arrived = 0;
  int64_t generation = 0;
};

struct Fiber {
  dim3 tid;
  int linear = 0;
  bool done = false;
  bool waiting = false;
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
};

struct Block {
  dim3 bid, bdim, gdim;
  std::vector<Fiber> fibers;
  int live = 0;
  Barrier bar;
  std::vector<Barrier> warp_bar;
  std::vector<int> warp_live;
  std::vector<uint64_t> xchg;  // [warps][32] shuffle slots
  std::vector<unsigned char> smem;
  const std::function<void()>* body = nullptr;
  ucontext_t sched;
  int current = 0;
  int64_t events = 0;  // barriers released, threads started or finished: a scheduler pass without any is a deadlock
  std::exception_ptr error;
};

inline Block*& block_ptr() {
  static thread_local Block* b = nullptr;
  return b;
}
inline Block& block() { return *block_ptr(); }
inline Fiber& fiber() { return block().fibers[block().current]; }
inline void* dynamic_smem() { return block().smem.data(); }

inline void check_aligned(const void* p, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0)
    throw std::runtime_error("CUDA emulation: a " + std::to_string(bytes) + "-byte access at address " +
                             std::to_string(reinterpret_cast<uintptr_t>(p)) + " is not " +
                             std::to_string(bytes) + "-byte aligned (a GPU faults here)");
}

inline void yield() {
  Block& b = block();
  swapcontext(&b.fibers[b.current].ctx, &b.sched);
}

// Waits until `members` threads (those of the group that have not exited) have arrived.
inline void wait(Barrier& bar, int members) {
  const int64_t g = bar.generation;
  if (++bar.arrived >= members) {
    bar.arrived = 0;
    ++bar.generation;
    ++block().events;
    return;
  }
  Fiber& f = fiber();
  f.waiting = true;
  while (bar.generation == g) yield();
  f.waiting = false;
}

inline int warp_of(const Fiber& f) { return f.linear / 32; }

inline void sync_warp() {
  Block& b = block();
  const int w = warp_of(fiber());
  wait(b.warp_bar[w], b.warp_live[w]);
}

inline void release_if_complete(Barrier& bar, int members) {
  if (bar.arrived > 0 && bar.arrived >= members) {
    bar.arrived = 0;
    ++bar.generation;
    ++block().events;
  }
}

inline void fiber_main() {
  Block& b = block();
  Fiber& f = b.fibers[b.current];
  try {
    (*b.body)();
  } catch (...) {
    if (!b.error) b.error = std::current_exception();
  }
  f.done = true;
  ++b.events;
  --b.live;
  const int w = warp_of(f);
  --b.warp_live[w];
  // Warp barriers serve warp-wide operations (shuffles, WMMA): a lane that exits while others of its
  // warp wait in one leaves them without all 32 lanes, undefined on a GPU.
  if (b.warp_bar[w].arrived > 0 && !b.error)
    b.error = std::make_exception_ptr(std::runtime_error(
        "CUDA emulation: a warp-wide operation (shuffle or WMMA) in warp " + std::to_string(w) +
        " without all 32 lanes: a lane exited while the others waited"));
  release_if_complete(b.bar, b.live);
  release_if_complete(b.warp_bar[w], b.warp_live[w]);
  // returns to the scheduler through uc_link
}

constexpr size_t kStack = 256 * 1024;

inline void run_block(Block& b) {
  const int n = static_cast<int>(b.bdim.x * b.bdim.y * b.bdim.z);
  const int warps = (n + 31) / 32;
  b.live = n;
  b.bar = Barrier{};
  b.warp_bar.assign(warps, Barrier{});
  b.warp_live.assign(warps, 0);
  b.xchg.assign(static_cast<size_t>(warps) * 32, 0);
  std::fill(b.smem.begin(), b.smem.end(), static_cast<unsigned char>(0xFF));
  if (static_cast<int>(b.fibers.size()) != n) b.fibers = std::vector<Fiber>(n);
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.linear = i;
    f.tid = dim3(i % b.bdim.x, (i / b.bdim.x) % b.bdim.y, i / (b.bdim.x * b.bdim.y));
    f.done = f.waiting = false;
    if (!f.stack) f.stack.reset(new char[kStack]);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = &b.sched;
    makecontext(&f.ctx, fiber_main, 0);
    ++b.warp_live[i / 32];
  }
  while (b.live > 0) {
    const int64_t before = b.events;
    for (int i = 0; i < n; ++i) {
      Fiber& f = b.fibers[i];
      if (f.done) continue;
      if (!f.waiting) ++b.events;
      b.current = i;
      swapcontext(&b.sched, &f.ctx);
      if (b.error) std::rethrow_exception(b.error);
    }
    if (b.events == before)
      throw std::runtime_error("CUDA emulation: deadlock in block (" + std::to_string(b.bid.x) + ", " +
                               std::to_string(b.bid.y) + ", " + std::to_string(b.bid.z) +
                               "): every live thread waits at a barrier that the others never reach");
  }
}

inline void run_grid(dim3 grid, dim3 bdim, size_t smem, const std::function<void()>& body) {
  const size_t threads = static_cast<size_t>(bdim.x) * bdim.y * bdim.z;
  if (threads == 0 || threads > 1024) throw std::runtime_error("CUDA emulation: " + std::to_string(threads) + " threads per block");
  if (grid.y > 65535 || grid.z > 65535) throw std::runtime_error("CUDA emulation: grid.y or grid.z above 65535");
  if (smem > 48 * 1024) throw std::runtime_error("CUDA emulation: more than 48 KB of dynamic shared memory");
  Block b;
  b.bdim = bdim;
  b.gdim = grid;
  b.body = &body;
  b.smem.resize(smem);
  Block* saved = block_ptr();
  block_ptr() = &b;
  try {
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          b.bid = dim3(x, y, z);
          run_block(b);
        }
  } catch (...) {
    block_ptr() = saved;
    throw;
  }
  block_ptr() = saved;
}

template <typename... P>
struct Launch {
  dim3 grid, bdim;
  size_t smem;
  void (*kernel)(P...);
  template <typename... A>
  void operator()(A&&... a) const {
    std::tuple<P...> args(static_cast<P>(a)...);
    const std::function<void()> body = [&] { std::apply(kernel, args); };
    run_grid(grid, bdim, smem, body);
  }
};

template <typename... P>
Launch<P...> launch(dim3 grid, dim3 bdim, size_t smem, void (*kernel)(P...)) {
  return Launch<P...>{grid, bdim, smem, kernel};
}

inline float to_float(float v) { return v; }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float to_float(__half v) { return __half2float(v); }

}  // namespace emu
}  // namespace portllm

#define threadIdx (::portllm::emu::fiber().tid)
#define blockIdx (::portllm::emu::block().bid)
#define blockDim (::portllm::emu::block().bdim)
#define gridDim (::portllm::emu::block().gdim)

inline void __syncthreads() {
  ::portllm::emu::Block& b = ::portllm::emu::block();
  ::portllm::emu::wait(b.bar, b.live);
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "CUDA emulation: shuffles of at most 8 bytes");
  namespace e = ::portllm::emu;
  e::Block& b = e::block();
  const e::Fiber& f = e::fiber();
  const int w = e::warp_of(f), lane = f.linear % 32;
  if (mask != 0xffffffffu || b.warp_live[w] != 32)
    throw std::runtime_error("CUDA emulation: __shfl_xor_sync without all 32 lanes of warp " + std::to_string(w));
  std::memcpy(&b.xchg[w * 32 + lane], &v, sizeof(T));
  e::sync_warp();
  T r;
  std::memcpy(&r, &b.xchg[w * 32 + (lane ^ lane_mask)], sizeof(T));
  e::sync_warp();
  return r;
}

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  T x[rows * cols];
};

template <typename Use, int M, int N, int K, typename T, typename L, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, V v) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = static_cast<T>(v);
}

template <typename Use, int M, int N, int K, typename T, typename L>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const T* p, unsigned ldm) {
  using Frag = fragment<Use, M, N, K, T, L>;
  ::portllm::emu::sync_warp();  // every lane of the warp takes part
  for (int i = 0; i < Frag::rows; ++i)
    for (int j = 0; j < Frag::cols; ++j)
      f.x[i * Frag::cols + j] = std::is_same_v<L, col_major> ? p[j * ldm + i] : p[i * ldm + j];
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  ::portllm::emu::sync_warp();
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) (layout == mem_row_major ? p[i * ldm + j] : p[j * ldm + i]) = f.x[i * N + j];
  ::portllm::emu::sync_warp();
}

template <int M, int N, int K, typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
                     const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.x[i * N + j];
      for (int k = 0; k < K; ++k)
        s += ::portllm::emu::to_float(a.x[i * K + k]) * ::portllm::emu::to_float(b.x[k * N + j]);
      out[i * N + j] = s;
    }
  std::memcpy(d.x, out, sizeof(out));
}

}  // namespace wmma
}  // namespace nvcuda
