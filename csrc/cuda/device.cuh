// What every CUDA source of portllm includes first: the CUDA headers and the few macros through
// which its launchers launch kernels, guard devices and register ops. Compiled with
// PORTLLM_CUDA_EMULATE (tests/cuda_emu.py), the same sources build as C++ for the CPU: kernels run
// on csrc/emu/cuda_emu.h's emulated blocks and register as torch.ops.portllm_emu.<op> on CPU tensors,
// so every CUDA kernel is run and compared with the reference where no GPU is at hand.
#pragma once
#ifdef PORTLLM_CUDA_EMULATE
#include <torch/library.h>

#include "emu/cuda_emu.h"

#define PORTLLM_LAUNCH(grid, block, smem, ...) ::portllm::emu::launch(grid, block, smem, __VA_ARGS__)
#define PORTLLM_CUDA_GUARD(t) ((void)0)
#define PORTLLM_LAUNCH_CHECK() ((void)0)
#define PORTLLM_CUDA_IMPL(op, fn) \
  TORCH_LIBRARY_IMPL(portllm_emu, CPU, m) { m.impl(op, fn); }
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#define PORTLLM_LAUNCH(grid, block, smem, ...) \
  __VA_ARGS__<<<grid, block, smem, c10::cuda::getCurrentCUDAStream()>>>
#define PORTLLM_CUDA_GUARD(t) const c10::cuda::CUDAGuard portllm_device_guard_((t).device())
// The block's dynamic shared memory (the launch's third argument) as a `type*` named `name`.
#define PORTLLM_DYNAMIC_SMEM(type, name)                                \
  extern __shared__ __align__(16) unsigned char portllm_dynamic_smem_[]; \
  type* name = reinterpret_cast<type*>(portllm_dynamic_smem_)
#define PORTLLM_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#define PORTLLM_CUDA_IMPL(op, fn) \
  TORCH_LIBRARY_IMPL(portllm, CUDA, m) { m.impl(op, fn); }
#endif

#include <cstdint>
#include <cstring>

namespace portllm {

// 16-byte global and shared accesses (LDG.128 / STG.128 / LDS.128). The address must be 16-byte
// aligned: a GPU faults otherwise, and the emulation throws, naming the address.
template <typename V>
__device__ __forceinline__ V load_vec(const void* p) {
#ifdef PORTLLM_CUDA_EMULATE
  ::portllm::emu::check_aligned(p, sizeof(V));
#endif
  return *reinterpret_cast<const V*>(p);
}
template <typename V>
__device__ __forceinline__ void store_vec(void* p, const V& v) {
#ifdef PORTLLM_CUDA_EMULATE
  ::portllm::emu::check_aligned(p, sizeof(V));
#endif
  *reinterpret_cast<V*>(p) = v;
}

// A 16-byte store to global memory as one STG.128 whatever the compiler made of the value's four
// words (a plain uint4 assignment was split into four 4-byte stores in the merge's epilogue).
__device__ __forceinline__ void store_global16(void* p, const uint4& v) {
#ifdef PORTLLM_CUDA_EMULATE
  store_vec<uint4>(p, v);
#else
  __stwb(reinterpret_cast<uint4*>(p), v);
#endif
}

}  // namespace portllm
