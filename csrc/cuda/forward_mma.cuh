// The forward on tensor cores (fp16/bf16 inputs, fp32 accumulation), one block per 64 query rows
// of one head: 4 warps of 16 rows each; key blocks stream through shared memory (cp.async) and
// an online softmax keeps only the output accumulator and two floats per row in registers.
//
// Per key block and warp: S = Q K^T with mma.sync m16n8k16 (Q and K fragments by ldmatrix), the
// score variants and the softmax on S's accumulator fragments, then O += P V, where P's
// accumulator fragments, rounded to 16 bits, are exactly the A fragments of the next product
// (PTX ISA layouts: columns 2t, 2t + 1 of rows g and g + 8 in both) and V's B fragments come from
// ldmatrix.trans. Head dims are padded with zeros to kDim columns.
#pragma once

#include "elements.cuh"
#include "scores.cuh"
#include "softmax.cuh"
#include "tiles.cuh"

namespace fused_attn::cuda::mma_forward {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBlockM = 16 * kWarps;

// Keys per block: fewer for the widest heads, whose accumulators already fill the registers.
template <int kDim>
__host__ __device__ constexpr int block_n() { return kDim >= 256 ? 32 : 64; }
// Shared-memory row stride: 16 bytes of padding spreads ldmatrix rows over the banks.
template <int kDim>
__host__ __device__ constexpr int smem_stride() { return kDim + 8; }
template <typename T, int kDim>
__host__ __device__ constexpr size_t smem_bytes() { return sizeof(T) * smem_stride<kDim>() * (kBlockM + 2 * block_n<kDim>()); }

template <typename T, int kDim>
__global__ void forward_kernel(ForwardParams call) {
  constexpr int kBlockN = block_n<kDim>(), kStride = smem_stride<kDim>();
  using E = Element<T>;
  const int q0 = blockIdx.x * kBlockM, h = blockIdx.y, b = blockIdx.z;
  const ForwardParams params = sequence_params<T>(call, b);
  const Problem& p = params.p;
  if (q0 >= p.seqlen_q) return;  // past the end of a shorter packed sequence: no rows
  const int h_kv = h / (p.heads_q / p.heads_kv);
  const int D = static_cast<int>(p.head_dim), Dv = static_cast<int>(p.head_dim_v);
  const int Lq = static_cast<int>(p.seqlen_q);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, group = lane / 4, t = lane % 4;
  const int row0 = warp * 16;  // the warp's first row in the block

  T* q_smem = reinterpret_cast<T*>(dynamic_shared_memory());
  T* k_smem = q_smem + kBlockM * kStride;
  T* v_smem = k_smem + kBlockN * kStride;
  const T* q = element_at<T>(params.q, b, h, q0, 0);
  auto load_keys = [&](T* smem, const Strided& s, int n0, int cols) {
    auto row_at = [&](int r) { return key_row<T>(s, params.cache, b, h_kv, n0 + r); };
    load_tile<T, kBlockN, kDim, kStride, kThreads>(smem, row_at, static_cast<int>(p.seqlen_k) - n0, cols,
                                                    static_cast<const T*>(s.data));
  };

  const HeadScores scores(p, b, h);
  const int rows = Lq - q0 < kBlockM ? Lq - q0 : kBlockM;
  const KeyRange keys = visible_keys(p, q0, rows);
  const int first = keys.begin / kBlockN * kBlockN;

  float o[kDim / 8][4] = {};
  RowSoftmax softmax[2];  // rows group and group + 8 of the warp's 16

  auto query_row = [&](int r) { return q + r * params.q.row; };
  load_tile<T, kBlockM, kDim, kStride, kThreads>(q_smem, query_row, Lq - q0, D, q);
  if (first < keys.end) load_keys(k_smem, params.k, first, D);
  ptx::cp_async_commit();
  for (int n0 = first; n0 < keys.end; n0 += kBlockN) {
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
    if (n0 + kBlockN < keys.end) load_keys(k_smem, params.k, n0 + kBlockN, D);
    ptx::cp_async_commit();

    // Scores, then the softmax of rows group (r = 0) and group + 8 (r = 1) of the warp.
    float block_max[2] = {-INFINITY, -INFINITY};
    #pragma unroll
    for (int n = 0; n < kBlockN / 8; ++n)
      #pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = q0 + row0 + group + 8 * (e / 2), j = n0 + n * 8 + 2 * t + e % 2;
        s[n][e] = scores.score(s[n][e], i, j);
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
        const int i = q0 + row0 + group + 8 * (e / 2), j = n0 + n * 8 + 2 * t + e % 2;
        const float prob = softmax[e / 2].probability(s[n][e]);
        softmax[e / 2].sum += prob;  // the lse and the normaliser see every probability, dropped or not
        s[n][e] = prob * scores.dropout_factor(i, j);
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
  }
  ptx::cp_async_wait<0>();

  #pragma unroll
  for (int r = 0; r < 2; ++r) {
    float total = softmax[r].sum;
    total += __shfl_xor_sync(0xffffffffu, total, 1);
    total += __shfl_xor_sync(0xffffffffu, total, 2);
    const int i = q0 + row0 + group + 8 * r;
    if (i >= Lq) continue;
    const float normaliser = RowSoftmax::normaliser(total);
    T* out = static_cast<T*>(params.out.data) + b * params.out.batch + h * params.out.head + i * params.out.row;
    #pragma unroll
    for (int n = 0; n < kDim / 8; ++n)
      #pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = n * 8 + 2 * t + e;
        if (col < Dv) out[col] = E::from_float(o[n][2 * r + e] * normaliser);
      }
    if (t == 0) params.lse.data[b * params.lse.batch + h * params.lse.head + i] = softmax[r].lse(total);
  }
}

template <typename T, int kDim>
cudaError_t launch(const ForwardParams& params, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(params.p.seqlen_q, kBlockM)), static_cast<unsigned>(params.p.heads_q),
                  static_cast<unsigned>(params.p.batch));
  return launch_kernel(forward_kernel<T, kDim>, grid, dim3(kThreads), smem_bytes<T, kDim>(), stream, params);
}

}  // namespace fused_attn::cuda::mma_forward
