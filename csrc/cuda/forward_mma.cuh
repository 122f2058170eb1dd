// The forward on tensor cores (fp16/bf16 inputs, fp32 accumulation), one block per 64 query rows
// of one head (decoding: of the heads of a GQA group, within a split of the keys; block_rows.cuh):
// 4 warps of 16 rows each; key blocks stream through shared memory (cp.async) and
// an online softmax keeps only the output accumulator and two floats per row in registers.
//
// Per key block and warp: S = Q K^T with mma.sync m16n8k16 (Q and K fragments by ldmatrix), the
// score variants and the softmax on S's accumulator fragments, then O += P V, where P's
// accumulator fragments, rounded to 16 bits, are exactly the A fragments of the next product
// (PTX ISA layouts: columns 2t, 2t + 1 of rows g and g + 8 in both) and V's B fragments come from
// ldmatrix.trans. Head dims are padded with zeros to kDim columns.
#pragma once

#include "block_rows.cuh"
#include "softmax.cuh"
#include "tiles.cuh"

namespace fused_attn::cuda::mma_forward {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBlockM = 16 * kWarps;

// Keys per block: fewer for the widest heads, whose accumulators already fill the registers (and
// fewer still when decoding, whose rows of several heads need more).
template <int kDim, Calls kCalls>
__host__ __device__ constexpr int block_n() { return kDim < 256 ? 64 : kCalls == Calls::Decoding ? 16 : 32; }
// Shared-memory row stride: 16 bytes of padding spreads ldmatrix rows over the banks.
template <int kDim>
__host__ __device__ constexpr int smem_stride() { return kDim + 8; }
template <typename T, int kDim, Calls kCalls>
__host__ __device__ constexpr size_t smem_bytes() {
  return sizeof(T) * smem_stride<kDim>() * (kBlockM + 2 * block_n<kDim, kCalls>());
}

// kCalls: the calls this instance serves (block_rows.cuh).
template <typename T, int kDim, Calls kCalls>
__global__ void forward_kernel(ForwardParams call) {
  constexpr bool kDecoding = kCalls == Calls::Decoding;
  constexpr int kBlockN = block_n<kDim, kCalls>(), kStride = smem_stride<kDim>();
  using E = Element<T>;
  const int b = blockIdx.z;
  const ForwardParams params = sequence_params<T>(call, b);
  const Problem& p = params.p;
  const BlockRows block = BlockRows::of_this_block<kBlockM, kCalls>(params);
  const int rows = block.count(p, kBlockM);
  if (rows <= 0) return;  // past the end of a shorter packed sequence: no rows
  const int h_kv = block.head(0) / static_cast<int>(p.heads_q / p.heads_kv);
  const int D = static_cast<int>(p.head_dim), Dv = static_cast<int>(p.head_dim_v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, group = lane / 4, t = lane % 4;
  const int row0 = warp * 16;  // the warp's first row in the block

  T* q_smem = reinterpret_cast<T*>(dynamic_shared_memory());
  T* k_smem = q_smem + kBlockM * kStride;
  T* v_smem = k_smem + kBlockN * kStride;
  auto load_keys = [&](T* smem, const Strided& s, int n0, int cols) {
    auto row_at = [&](int r) { return key_row<T>(s, params.cache, b, h_kv, n0 + r); };
    load_tile<T, kBlockN, kDim, kStride, kThreads>(smem, row_at, static_cast<int>(p.seqlen_k) - n0, cols,
                                                    static_cast<const T*>(s.data));
  };

  // This thread's rows of the block: group (r = 0) and group + 8 (r = 1) of the warp's 16.
  const int my_rows[2] = {row0 + group, row0 + group + 8};
  const int my_query[2] = {block.query(my_rows[0]), block.query(my_rows[1])};
  // Their scores' rules: decoding, each row's own head's (GQA-packed rows); else both are the
  // block's head's, and only the first is read (which keeps the dense instance's registers down).
  const HeadScores scores[2] = {HeadScores(p, b, block.head(my_rows[0])), HeadScores(p, b, block.head(my_rows[1]))};
  KeyRange keys = block.keys(params, rows);
  const bool readable = kCalls != Calls::Decoding || cache_readable(call, b, loaded_keys<kBlockN>(p, keys));
  if (!readable) keys = {0, 0};  // no key loaded; its rows get NaN
  const int first = keys.begin / kBlockN * kBlockN;

  float o[kDim / 8][4] = {};
  RowSoftmax softmax[2];

  auto query_row = [&](int r) { return element_at<T>(params.q, b, block.head(r), block.query(r), 0); };
  load_tile<T, kBlockM, kDim, kStride, kThreads>(q_smem, query_row, rows, D, static_cast<const T*>(params.q.data));
  int n0 = block.next_key_block<kBlockN, kThreads, kCalls>(scores[0], rows, first, keys.end);
  if (n0 < keys.end) load_keys(k_smem, params.k, n0, D);
  ptx::cp_async_commit();
  while (n0 < keys.end) {
    load_keys(v_smem, params.v, n0, Dv);
    ptx::cp_async_commit();
    ptx::cp_async_wait<1>();  // Q and this block's K
    __syncthreads();

    float s[kBlockN / 8][4] = {};
    #pragma unroll
    for (int kk = 0; kk < kDim; kk += 16) {
      uint32_t a[4];
      ptx::ldmatrix_x4(a, q_smem + (row0 + (lane & 15)) * kStride + kk + (lane >> 4) * 8);
      #pragma unroll
      for (int nn = 0; nn < kBlockN; nn += 16) {
        uint32_t b4[4];  // B fragments of key tiles nn and nn + 8
        ptx::ldmatrix_x4(b4, k_smem + (nn + (lane & 7) + (lane >> 4) * 8) * kStride + kk + ((lane >> 3) & 1) * 8);
        E::mma(s[nn / 8], a, {b4[0], b4[1]});
        E::mma(s[nn / 8 + 1], a, {b4[2], b4[3]});
      }
    }
    __syncthreads();  // every warp is done with K
    const int next = block.next_key_block<kBlockN, kThreads, kCalls>(scores[0], rows, n0 + kBlockN, keys.end);
    if (next < keys.end) load_keys(k_smem, params.k, next, D);
    ptx::cp_async_commit();

    // Scores, then the softmax of rows group (r = 0) and group + 8 (r = 1) of the warp.
    float block_max[2] = {-INFINITY, -INFINITY};
    #pragma unroll
    for (int n = 0; n < kBlockN / 8; ++n)
      #pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = n0 + n * 8 + 2 * t + e % 2;
        s[n][e] = scores[kDecoding ? e / 2 : 0].score(s[n][e], my_query[e / 2], j);
        block_max[e / 2] = fmaxf(block_max[e / 2], s[n][e]);
      }
    float alpha[2];
    #pragma unroll
    for (int r = 0; r < 2; ++r) {  // the row's four threads are lanes 4 * group .. 4 * group + 3
      block_max[r] = fmaxf(block_max[r], __shfl_xor_sync(0xffffffffu, block_max[r], 1));
      block_max[r] = fmaxf(block_max[r], __shfl_xor_sync(0xffffffffu, block_max[r], 2));
      alpha[r] = softmax[r].rescale(block_max[r]);
    }
    #pragma unroll
    for (int n = 0; n < kDim / 8; ++n)
      #pragma unroll
      for (int e = 0; e < 4; ++e) o[n][e] *= alpha[e / 2];
    #pragma unroll
    for (int n = 0; n < kBlockN / 8; ++n)
      #pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = n0 + n * 8 + 2 * t + e % 2;
        const float prob = softmax[e / 2].probability(s[n][e]);
        softmax[e / 2].sum += prob;  // the lse and the normaliser see every probability, dropped or not
        s[n][e] = prob * scores[kDecoding ? e / 2 : 0].dropout_factor(my_query[e / 2], j);
      }

    ptx::cp_async_wait<1>();  // this block's V
    __syncthreads();
    #pragma unroll
    for (int kc = 0; kc < kBlockN / 16; ++kc) {
      const uint32_t a[4] = {E::pack(s[2 * kc][0], s[2 * kc][1]), E::pack(s[2 * kc][2], s[2 * kc][3]),
                             E::pack(s[2 * kc + 1][0], s[2 * kc + 1][1]), E::pack(s[2 * kc + 1][2], s[2 * kc + 1][3])};
      #pragma unroll
      for (int nd = 0; nd < kDim; nd += 16) {
        uint32_t b4[4];  // B fragments of output column tiles nd and nd + 8
        ptx::ldmatrix_x4_trans(b4, v_smem + (kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kStride + nd + (lane >> 4) * 8);
        E::mma(o[nd / 8], a, {b4[0], b4[1]});
        E::mma(o[nd / 8 + 1], a, {b4[2], b4[3]});
      }
    }
    __syncthreads();  // every warp is done with V
    n0 = next;
  }
  ptx::cp_async_wait<0>();

  #pragma unroll
  for (int r = 0; r < 2; ++r) {
    float total = softmax[r].sum;
    total += __shfl_xor_sync(0xffffffffu, total, 1);
    total += __shfl_xor_sync(0xffffffffu, total, 2);
    if (my_rows[r] >= rows) continue;
    const RowOutput<T> out(params, b, block.head(my_rows[r]), my_query[r], block);
    const float normaliser = readable ? RowSoftmax::normaliser(total) : NAN;
    #pragma unroll
    for (int n = 0; n < kDim / 8; ++n)
      #pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = n * 8 + 2 * t + e;
        if (col < Dv) out.store(col, o[n][2 * r + e] * normaliser);
      }
    if (t == 0) out.store_lse(readable ? softmax[r].lse(total) : NAN);
  }
}

template <typename T, int kDim, Calls kCalls>
cudaError_t launch_instance(const ForwardParams& params, cudaStream_t stream) {
  return launch_kernel(forward_kernel<T, kDim, kCalls>, forward_grid<kBlockM>(params), dim3(kThreads),
                       smem_bytes<T, kDim, kCalls>(), stream, params);
}

template <typename T, int kDim>
cudaError_t launch(const ForwardParams& params, cudaStream_t stream) {
  switch (calls_of(params)) {
    case Calls::Dense: return launch_instance<T, kDim, Calls::Dense>(params, stream);
    case Calls::Masked: return launch_instance<T, kDim, Calls::Masked>(params, stream);
    case Calls::Decoding: return launch_instance<T, kDim, Calls::Decoding>(params, stream);
  }
  return cudaErrorInvalidConfiguration;
}

}  // namespace fused_attn::cuda::mma_forward
