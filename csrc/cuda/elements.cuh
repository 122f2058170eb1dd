// The element types the kernels read and write, as one traits struct each: conversion to and from
// fp32 (round to nearest even; the backward's dtype-generic kernels use these for every type), and
// for the 16-bit ones, two floats packed into a 32-bit register of an mma fragment and the
// tensor-core product that reads them. Plus element addressing for every type.
#pragma once

#include <cstring>

#include "cuda_api.cuh"
#include "params.h"

namespace fused_attn::cuda {

template <typename T>
struct Element;

template <>
struct Element<float> {
  static __device__ __forceinline__ float to_float(float x) { return x; }
  static __device__ __forceinline__ float from_float(float x) { return x; }
};

template <>
struct Element<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  // lo in the low 16 bits (the lower column of a fragment pair), hi in the high ones.
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 pair = __floats2half2_rn(lo, hi);
    uint32_t bits;
    memcpy(&bits, &pair, sizeof(bits));
    return bits;
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    ptx::mma_m16n8k16_f16(d, a, b, d);
  }
};

template <>
struct Element<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
    uint32_t bits;
    memcpy(&bits, &pair, sizeof(bits));
    return bits;
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    ptx::mma_m16n8k16_bf16(d, a, b, d);
  }
};

// Element (b, h, row, col) of a Strided tensor of T.
template <typename T>
__device__ __forceinline__ const T* element_at(const Strided& s, int64_t b, int64_t h, int64_t row, int64_t col) {
  return static_cast<const T*>(s.data) + b * s.batch + h * s.head + row * s.row + col * s.col;
}

}  // namespace fused_attn::cuda
