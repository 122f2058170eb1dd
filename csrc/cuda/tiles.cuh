// Global -> shared tile loads for the whole block, with cp.async where the source allows it.
#pragma once

#include "cuda_api.cuh"

namespace fused_attn::cuda {

// Copies rows [0, kRows) x columns [0, kCols) into shared memory (row stride kSmemStride
// elements), zero-filling rows >= valid_rows and columns >= valid_cols, so padded rows and head-dim
// columns contribute nothing to any product. Source row r (< valid_rows) starts at row_at(r), its
// columns contiguous. 16-byte chunks go through cp.async (the caller commits and waits); a chunk
// cut by valid_cols or misaligned in global memory is copied element by element (visible after
// the caller's next __syncthreads). `fill` is any valid global address (never read).
template <typename T, int kRows, int kCols, int kSmemStride, int kThreads, typename RowAt>
__device__ __forceinline__ void load_tile(T* smem, RowAt row_at, int valid_rows, int valid_cols, const T* fill) {
  constexpr int kChunk = 16 / static_cast<int>(sizeof(T));
  constexpr int kChunksPerRow = kCols / kChunk;
  static_assert(kCols % kChunk == 0 && kSmemStride % kChunk == 0, "rows must be whole 16-byte chunks");
  for (int index = threadIdx.x; index < kRows * kChunksPerRow; index += kThreads) {
    const int row = index / kChunksPerRow, col = index % kChunksPerRow * kChunk;
    T* to = smem + row * kSmemStride + col;
    if (row >= valid_rows || col >= valid_cols) {
      ptx::cp_async_16(to, fill, false);
      continue;
    }
    const T* from = row_at(row) + col;
    if (col + kChunk <= valid_cols && reinterpret_cast<uintptr_t>(from) % 16 == 0) {
      ptx::cp_async_16(to, from, true);
    } else {
      for (int e = 0; e < kChunk; ++e) to[e] = col + e < valid_cols ? from[e] : T{};
    }
  }
}

}  // namespace fused_attn::cuda
