// A CPU emulator of the CUDA subset that csrc/cuda/ kernels use, so CI runs those kernels without
// a GPU. csrc/cuda/cuda_api.cuh includes this header instead of the CUDA headers when
// FUSED_ATTN_EMULATOR is defined; kernels then compile as plain C++ (g++ -x c++).
//
// Execution model: launch_kernel runs the grid's blocks one after another; inside a block every
// CUDA thread is a fiber (ucontext) that runs until it reaches __syncthreads or a warp collective
// (shuffle, __syncwarp, ldmatrix, mma), where it waits for the others (threads run in index order
// in even blocks, in reverse order in odd ones, so reads that miss a barrier show). The last thread to arrive
// computes the collective for all, as the PTX ISA defines it (fragment layouts included), so
// divergent collectives, deadlocks, misaligned ldmatrix/cp.async addresses and too much shared
// memory are reported as launch errors. __shared__ arrays are static: blocks never run at the
// same time, so one copy serves every block. cp.async copies happen at cp_async_wait, the latest
// moment the ISA allows, so a kernel that reads before waiting sees stale data.
// 16-bit floats are stored as their bits and converted with round-to-nearest-even, exactly.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

using std::isinf;
using std::isnan;

// ---- Runtime types -------------------------------------------------------------------------

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidConfiguration = 9, cudaErrorLaunchFailure = 719 };
using cudaStream_t = struct CUstream_st*;  // ignored by the emulator

// The error's name; for launch failures also what the emulator caught.
const char* cudaGetErrorString(cudaError_t error);

// The emulated device: device 0, with kMultiprocessors streaming multiprocessors, few enough that
// small test calls are cut the way long ones are on a GPU (split-KV).
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device);

struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
struct uint2 { unsigned x, y; };
struct uint4 { unsigned x, y, z, w; };
struct int4 { int x, y, z, w; };

// ---- 16-bit floats -------------------------------------------------------------------------

namespace fused_attn_emulator {

template <typename To, typename From>
inline To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

// IEEE binary16, round to nearest even, subnormals and overflow to infinity included.
inline uint16_t float_to_half_bits(float value) {
  const uint32_t x = bit_cast<uint32_t>(value);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t magnitude = x & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return sign | 0x7e00u;  // NaN
  if (magnitude >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to infinity
  if (magnitude >= 0x38800000u) {                       // a normal half (>= 2^-14)
    const uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);  // 13 bits dropped, ties to even
    return sign | static_cast<uint16_t>((rounded - 0x38000000u) >> 13);     // exponent bias 127 -> 15
  }
  // Subnormal: a multiple of 2^-24; the scaling is exact and nearbyint rounds ties to even.
  return sign | static_cast<uint16_t>(std::nearbyint(bit_cast<float>(magnitude) * 16777216.0f));
}
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  if (exponent == 0) {
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return bit_cast<float>(sign | 0x7f800000u | (mantissa << 13));
  return bit_cast<float>(sign | ((exponent + 112) << 23) | (mantissa << 13));
}
// bfloat16: the high half of a float, rounded to nearest even.
inline uint16_t float_to_bfloat16_bits(float value) {
  const uint32_t x = bit_cast<uint32_t>(value);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
inline float bfloat16_bits_to_float(uint16_t b) { return bit_cast<float>(static_cast<uint32_t>(b) << 16); }

}  // namespace fused_attn_emulator

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half2 {
  __half x, y;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline __half __float2half_rn(float f) { return {fused_attn_emulator::float_to_half_bits(f)}; }
inline float __half2float(__half h) { return fused_attn_emulator::half_bits_to_float(h.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {fused_attn_emulator::float_to_bfloat16_bits(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return fused_attn_emulator::bfloat16_bits_to_float(b.bits); }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)}; }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 b) { return {__bfloat162float(b.x), __bfloat162float(b.y)}; }

// ---- Threads, barriers and warp collectives -----------------------------------------------

namespace fused_attn_emulator {

struct ThreadPosition {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
// The running CUDA thread's coordinates (valid inside a kernel only).
const ThreadPosition& position();

void sync_threads();
int sync_threads_or(int predicate);  // nonzero when some thread's predicate is
void sync_warp(unsigned mask);
uint32_t shuffle(unsigned mask, uint32_t value, int lane_or_mask, bool xor_lanes);

// Runs body once per CUDA thread of every block of the grid; returns the launch's error.
cudaError_t run_grid(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body);
char* dynamic_shared_memory();

// Warp-level PTX (see csrc/cuda/cuda_api.cuh for the layouts).
void mma_m16n8k16(bool bf16, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]);
void ldmatrix(uint32_t* r, int matrices, bool transpose, const void* smem_row);
void cp_async_16(void* smem, const void* gmem, bool in_bounds);
void cp_async_commit();
void cp_async_wait(int pending);

// Shared memory per block on the smallest supported GPU (sm_80: 163 KiB).
constexpr size_t kMaxSharedMemory = 163 * 1024;
constexpr int kMultiprocessors = 4;

}  // namespace fused_attn_emulator

#define threadIdx (::fused_attn_emulator::position().thread_idx)
#define blockIdx (::fused_attn_emulator::position().block_idx)
#define blockDim (::fused_attn_emulator::position().block_dim)
#define gridDim (::fused_attn_emulator::position().grid_dim)

inline void __syncthreads() { fused_attn_emulator::sync_threads(); }
inline int __syncthreads_or(int predicate) { return fused_attn_emulator::sync_threads_or(predicate); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { fused_attn_emulator::sync_warp(mask); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  return fused_attn_emulator::bit_cast<T>(
      fused_attn_emulator::shuffle(mask, fused_attn_emulator::bit_cast<uint32_t>(value), lane_mask, true));
}
template <typename T>
inline T __shfl_sync(unsigned mask, T value, int source_lane) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  return fused_attn_emulator::bit_cast<T>(
      fused_attn_emulator::shuffle(mask, fused_attn_emulator::bit_cast<uint32_t>(value), source_lane, false));
}

// ---- The names csrc/cuda/cuda_api.cuh provides on the GPU -----------------------------------

namespace fused_attn::cuda {

inline char* dynamic_shared_memory() { return fused_attn_emulator::dynamic_shared_memory(); }

template <typename Kernel, typename... Args>
cudaError_t launch_kernel(Kernel kernel, dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t, Args... args) {
  return fused_attn_emulator::run_grid(grid, block, smem_bytes, [&] { kernel(args...); });
}

namespace ptx {

inline void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  fused_attn_emulator::mma_m16n8k16(false, d, a, b, c);
}
inline void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  fused_attn_emulator::mma_m16n8k16(true, d, a, b, c);
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) { fused_attn_emulator::ldmatrix(r, 4, false, smem_row); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  fused_attn_emulator::ldmatrix(r, 4, true, smem_row);
}
inline void ldmatrix_x2(uint32_t (&r)[2], const void* smem_row) { fused_attn_emulator::ldmatrix(r, 2, false, smem_row); }
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem_row) {
  fused_attn_emulator::ldmatrix(r, 2, true, smem_row);
}
inline void cp_async_16(void* smem, const void* gmem, bool in_bounds) {
  fused_attn_emulator::cp_async_16(smem, gmem, in_bounds);
}
inline void cp_async_commit() { fused_attn_emulator::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
  fused_attn_emulator::cp_async_wait(N);
}

}  // namespace ptx
}  // namespace fused_attn::cuda
