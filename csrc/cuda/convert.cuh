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

// The 16 / sizeof(T) elements of a 16-byte vector, widened to fp32 (exact).
template <typename T>
__device__ __forceinline__ void unpack16(const uint4& w, float* out) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    if constexpr (sizeof(T) == 4) {
      out[q] = __uint_as_float(words[q]);
    } else {
      out[2 * q] = to_f32(T(static_cast<uint16_t>(words[q] & 0xFFFFu), T::from_bits()));
      out[2 * q + 1] = to_f32(T(static_cast<uint16_t>(words[q] >> 16), T::from_bits()));
    }
  }
}

// Two 16-bit values packed in a word (low half first), each plus its fp32 addend, rounded once.
template <typename T>
__device__ __forceinline__ uint32_t add2(uint32_t w, float c0, float c1) {
  const T lo(static_cast<uint16_t>(w & 0xFFFFu), T::from_bits());
  const T hi(static_cast<uint16_t>(w >> 16), T::from_bits());
  return static_cast<uint32_t>(from_f32<T>(to_f32(lo) + c0).x) |
         (static_cast<uint32_t>(from_f32<T>(to_f32(hi) + c1).x) << 16);
}

// 16 bytes of W (16 / sizeof(T) elements) plus c[0 .. 16 / sizeof(T)), each rounded once to nearest
// even: the epilogue of the merges, in registers (no local array to spill through).
template <typename T>
__device__ __forceinline__ uint4 add16(uint4 w, const float* c) {
  if constexpr (sizeof(T) == 4) {
    w.x = __float_as_uint(__uint_as_float(w.x) + c[0]);
    w.y = __float_as_uint(__uint_as_float(w.y) + c[1]);
    w.z = __float_as_uint(__uint_as_float(w.z) + c[2]);
    w.w = __float_as_uint(__uint_as_float(w.w) + c[3]);
  } else {
    w.x = add2<T>(w.x, c[0], c[1]);
    w.y = add2<T>(w.y, c[2], c[3]);
    w.z = add2<T>(w.z, c[4], c[5]);
    w.w = add2<T>(w.w, c[6], c[7]);
  }
  return w;
}

}  // namespace portllm
