// fp32 <-> storage dtype conversions for device code: exact widening, round-to-nearest-even
// narrowing (what torch's own casts do). c10's types are bit-compatible with CUDA's.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cuda/device.cuh"

namespace portllm {

template <typename T> __device__ __forceinline__ float to_f32(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_f32(c10::BFloat16 v) {
  return __bfloat162float(*reinterpret_cast<const __nv_bfloat16*>(&v));
}
template <> __device__ __forceinline__ float to_f32(c10::Half v) {
  return __half2float(*reinterpret_cast<const __half*>(&v));
}

template <typename T> __device__ __forceinline__ T from_f32(float v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ c10::BFloat16 from_f32(float v) {
  __nv_bfloat16 h = __float2bfloat16_rn(v);
  return *reinterpret_cast<c10::BFloat16*>(&h);
}
template <> __device__ __forceinline__ c10::Half from_f32(float v) {
  __half h = __float2half_rn(v);
  return *reinterpret_cast<c10::Half*>(&h);
}

}  // namespace portllm
