// The warp-level tile products of the backward, in the mma.sync m16n8k16 accumulator layout for
// every dtype: a warp holds a 16-row stripe of a product, and lane 4 * group + t holds, of its
// 8-column tile n, elements (group, 8n + 2t + e) in acc[n][e] and (group + 8, 8n + 2t + e) in
// acc[n][2 + e], e = 0, 1. 16-bit inputs go through tensor cores (fp32 accumulation, fragments
// by ldmatrix, as in forward_mma.cuh); fp32 inputs through FMAs in the same layout (exact fp32,
// no tf32), so the kernels (backward_kernels.cuh) are written once for both.
#pragma once

#include <type_traits>

#include "elements.cuh"

namespace fused_attn::cuda::backward {

// acc (16 x 8 kTiles) += A B^T, A being the 16 rows at `a` and B the 8 kTiles rows at `b`, both
// with kDepth contiguous columns and row stride `stride` in shared memory (S = Q K^T, dP = dO V^T
// and their transposes).
template <typename T, int kDepth, int kTiles>
__device__ __forceinline__ void product_rows(float (&acc)[kTiles][4], const T* a, const T* b, int stride) {
  const int lane = threadIdx.x % 32;
  if constexpr (std::is_same_v<T, float>) {
    const int group = lane / 4, col = 2 * (lane % 4);
    for (int k = 0; k < kDepth; ++k) {
      const float a0 = a[group * stride + k], a1 = a[(group + 8) * stride + k];
      #pragma unroll
      for (int n = 0; n < kTiles; ++n) {
        const float b0 = b[(8 * n + col) * stride + k], b1 = b[(8 * n + col + 1) * stride + k];
        acc[n][0] = fmaf(a0, b0, acc[n][0]);
        acc[n][1] = fmaf(a0, b1, acc[n][1]);
        acc[n][2] = fmaf(a1, b0, acc[n][2]);
        acc[n][3] = fmaf(a1, b1, acc[n][3]);
      }
    }
  } else {
    static_assert(kTiles % 2 == 0 && kDepth % 16 == 0, "whole 16 x 16 fragments");
    for (int kk = 0; kk < kDepth; kk += 16) {
      uint32_t fragment[4];
      ptx::ldmatrix_x4(fragment, a + (lane & 15) * stride + kk + (lane >> 4) * 8);
      #pragma unroll
      for (int n = 0; n < kTiles; n += 2) {
        uint32_t b4[4];  // B fragments of column tiles n and n + 1
        ptx::ldmatrix_x4(b4, b + (8 * n + (lane & 7) + (lane >> 4) * 8) * stride + kk + ((lane >> 3) & 1) * 8);
        Element<T>::mma(acc[n], fragment, {b4[0], b4[1]});
        Element<T>::mma(acc[n + 1], fragment, {b4[2], b4[3]});
      }
    }
  }
}

// acc (16 x 8 kTiles) += A B, A being a 16 x (8 kInner) stripe this warp holds in the accumulator
// layout (P or dS; rounded to T for tensor cores), B the 8 kInner rows at `b` with 8 kTiles
// contiguous columns and row stride `stride` (dQ += dS K, dK += dS^T Q, dV += P^T dO).
template <typename T, int kInner, int kTiles>
__device__ __forceinline__ void product_held(float (&acc)[kTiles][4], const float (&a)[kInner][4], const T* b,
                                             int stride) {
  const int lane = threadIdx.x % 32;
  if constexpr (std::is_same_v<T, float>) {
    // Row group's 8 columns of tile k are spread over the lanes 4 * group + source: fetch them.
    const int col = 2 * (lane % 4);
    #pragma unroll
    for (int k = 0; k < kInner; ++k)
      for (int source = 0; source < 4; ++source) {
        const int from = (lane & ~3) | source;
        const float x0 = __shfl_sync(0xffffffffu, a[k][0], from), x1 = __shfl_sync(0xffffffffu, a[k][1], from);
        const float x2 = __shfl_sync(0xffffffffu, a[k][2], from), x3 = __shfl_sync(0xffffffffu, a[k][3], from);
        const float* row0 = b + (8 * k + 2 * source) * stride;  // rows of A's columns 2 source, 2 source + 1
        const float* row1 = row0 + stride;
        #pragma unroll
      for (int n = 0; n < kTiles; ++n) {
          const int c = 8 * n + col;
          acc[n][0] = fmaf(x1, row1[c], fmaf(x0, row0[c], acc[n][0]));
          acc[n][1] = fmaf(x1, row1[c + 1], fmaf(x0, row0[c + 1], acc[n][1]));
          acc[n][2] = fmaf(x3, row1[c], fmaf(x2, row0[c], acc[n][2]));
          acc[n][3] = fmaf(x3, row1[c + 1], fmaf(x2, row0[c + 1], acc[n][3]));
        }
      }
  } else {
    static_assert(kInner % 2 == 0 && kTiles % 2 == 0, "whole 16 x 16 fragments");
    using E = Element<T>;
    #pragma unroll
    for (int kc = 0; kc < kInner / 2; ++kc) {
      // The accumulator fragments of columns 16 kc .. 16 kc + 15 are the A fragment of those
      // columns (PTX ISA layouts: columns 2t, 2t + 1 of rows group and group + 8 in both).
      const uint32_t fragment[4] = {E::pack(a[2 * kc][0], a[2 * kc][1]), E::pack(a[2 * kc][2], a[2 * kc][3]),
                                    E::pack(a[2 * kc + 1][0], a[2 * kc + 1][1]),
                                    E::pack(a[2 * kc + 1][2], a[2 * kc + 1][3])};
      #pragma unroll
      for (int n = 0; n < kTiles; n += 2) {
        uint32_t b4[4];  // B fragments of column tiles n and n + 1, from row-major B by .trans
        ptx::ldmatrix_x4_trans(b4, b + (16 * kc + (lane & 7) + ((lane >> 3) & 1) * 8) * stride + 8 * n + (lane >> 4) * 8);
        E::mma(acc[n], fragment, {b4[0], b4[1]});
        E::mma(acc[n + 1], fragment, {b4[2], b4[3]});
      }
    }
  }
}

}  // namespace fused_attn::cuda::backward
