// The forward in exact fp32 on the CUDA cores (FMA, no tf32), for float32 inputs: one block per
// 32 query rows of one head (decoding: of the heads of a GQA group, within a split of the keys;
// block_rows.cuh), 4 threads per row. Each thread scores 8 of a block's 32 keys and
// accumulates a quarter of the row's output columns; the row's probabilities meet V through a
// small shared tile. Same streaming structure as forward_mma.cuh.
#pragma once

#include "block_rows.cuh"
#include "softmax.cuh"
#include "tiles.cuh"

namespace fused_attn::cuda::simt_forward {

constexpr int kThreadsPerRow = 4;
constexpr int kBlockM = 32;
constexpr int kBlockN = 32;
constexpr int kThreads = kThreadsPerRow * kBlockM;
constexpr int kProbStride = kBlockN + 1;

template <int kDim>
__host__ __device__ constexpr int smem_stride() { return kDim + 4; }  // whole 16-byte chunks, rows on different banks
template <int kDim>
__host__ __device__ constexpr size_t smem_bytes() {
  return sizeof(float) * (smem_stride<kDim>() * (kBlockM + 2 * kBlockN) + kBlockM * kProbStride);
}

// kCalls: the calls this instance serves (block_rows.cuh).
template <int kDim, Calls kCalls>
__global__ void forward_kernel(ForwardParams call) {
  constexpr int kStride = smem_stride<kDim>();
  const int b = blockIdx.z;
  const ForwardParams params = sequence_params<float>(call, b);
  const Problem& p = params.p;
  const BlockRows block = BlockRows::of_this_block<kBlockM, kCalls>(params);
  const int rows = block.count(p, kBlockM);
  if (rows <= 0) return;  // past the end of a shorter packed sequence: no rows
  const int h_kv = block.head(0) / static_cast<int>(p.heads_q / p.heads_kv);
  const int D = static_cast<int>(p.head_dim), Dv = static_cast<int>(p.head_dim_v);
  const int row = threadIdx.x / kThreadsPerRow, part = threadIdx.x % kThreadsPerRow;  // keys / columns part + 4u

  float* q_smem = reinterpret_cast<float*>(dynamic_shared_memory());
  float* k_smem = q_smem + kBlockM * kStride;
  float* v_smem = k_smem + kBlockN * kStride;
  float* p_smem = v_smem + kBlockN * kStride;
  auto load_keys = [&](float* smem, const Strided& s, int n0, int cols) {
    auto row_at = [&](int r) { return key_row<float>(s, params.cache, b, h_kv, n0 + r); };
    load_tile<float, kBlockN, kDim, kStride, kThreads>(smem, row_at, static_cast<int>(p.seqlen_k) - n0, cols,
                                                        static_cast<const float*>(s.data));
  };

  const int i = block.query(row);
  const HeadScores scores(p, b, block.head(row));
  KeyRange keys = block.keys(params, rows);
  const bool readable = kCalls != Calls::Decoding || cache_readable(call, b, loaded_keys<kBlockN>(p, keys));
  if (!readable) keys = {0, 0};  // no key loaded; its rows get NaN
  const int first = keys.begin / kBlockN * kBlockN;

  float o[kDim / kThreadsPerRow] = {};
  RowSoftmax softmax;

  auto query_row = [&](int r) { return element_at<float>(params.q, b, block.head(r), block.query(r), 0); };
  load_tile<float, kBlockM, kDim, kStride, kThreads>(q_smem, query_row, rows, D, static_cast<const float*>(params.q.data));
  int n0 = block.next_key_block<kBlockN, kThreads, kCalls>(scores, rows, first, keys.end);
  if (n0 < keys.end) load_keys(k_smem, params.k, n0, D);
  ptx::cp_async_commit();
  while (n0 < keys.end) {
    load_keys(v_smem, params.v, n0, Dv);
    ptx::cp_async_commit();
    ptx::cp_async_wait<1>();  // Q and this block's K
    __syncthreads();

    float s[kBlockN / kThreadsPerRow];
    float block_max = -INFINITY;
    #pragma unroll
    for (int u = 0; u < kBlockN / kThreadsPerRow; ++u) {
      const int key = part + kThreadsPerRow * u;
      float dot = 0.f;
      for (int d = 0; d < kDim; ++d) dot = fmaf(q_smem[row * kStride + d], k_smem[key * kStride + d], dot);
      s[u] = scores.score(dot, i, n0 + key);
      block_max = fmaxf(block_max, s[u]);
    }
    __syncthreads();  // every thread is done with K
    const int next = block.next_key_block<kBlockN, kThreads, kCalls>(scores, rows, n0 + kBlockN, keys.end);
    if (next < keys.end) load_keys(k_smem, params.k, next, D);
    ptx::cp_async_commit();

    block_max = fmaxf(block_max, __shfl_xor_sync(0xffffffffu, block_max, 1));
    block_max = fmaxf(block_max, __shfl_xor_sync(0xffffffffu, block_max, 2));
    const float alpha = softmax.rescale(block_max);
    #pragma unroll
    for (float& x : o) x *= alpha;
    #pragma unroll
    for (int u = 0; u < kBlockN / kThreadsPerRow; ++u) {
      const int key = part + kThreadsPerRow * u;
      const float prob = softmax.probability(s[u]);
      softmax.sum += prob;  // the lse and the normaliser see every probability, dropped or not
      p_smem[row * kProbStride + key] = prob * scores.dropout_factor(i, n0 + key);
    }

    ptx::cp_async_wait<1>();  // this block's V
    __syncthreads();          // also publishes the probabilities
    for (int key = 0; key < kBlockN; ++key) {
      const float prob = p_smem[row * kProbStride + key];
      #pragma unroll
      for (int u = 0; u < kDim / kThreadsPerRow; ++u)
        o[u] = fmaf(prob, v_smem[key * kStride + part + kThreadsPerRow * u], o[u]);
    }
    __syncthreads();  // every thread is done with V and the probabilities
    n0 = next;
  }
  ptx::cp_async_wait<0>();

  float total = softmax.sum;
  total += __shfl_xor_sync(0xffffffffu, total, 1);
  total += __shfl_xor_sync(0xffffffffu, total, 2);
  if (row >= rows) return;
  const RowOutput<float> out(params, b, block.head(row), i, block);
  const float normaliser = readable ? RowSoftmax::normaliser(total) : NAN;
  #pragma unroll
  for (int u = 0; u < kDim / kThreadsPerRow; ++u) {
    const int col = part + kThreadsPerRow * u;
    if (col < Dv) out.store(col, o[u] * normaliser);
  }
  if (part == 0) out.store_lse(readable ? softmax.lse(total) : NAN);
}

template <int kDim>
cudaError_t launch(const ForwardParams& params, cudaStream_t stream) {
  auto instance = [&](auto kernel) {
    return launch_kernel(kernel, forward_grid<kBlockM>(params), dim3(kThreads), smem_bytes<kDim>(), stream, params);
  };
  switch (calls_of(params)) {
    case Calls::Dense: return instance(forward_kernel<kDim, Calls::Dense>);
    case Calls::Masked: return instance(forward_kernel<kDim, Calls::Masked>);
    case Calls::Decoding: return instance(forward_kernel<kDim, Calls::Decoding>);
  }
  return cudaErrorInvalidConfiguration;
}

}  // namespace fused_attn::cuda::simt_forward
