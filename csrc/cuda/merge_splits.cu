// Split-KV's second step (params.h, Decoding): each row's out and lse from its splits' partials,
// weighted by their lse:
//   lse = log sum_s exp(lse_s);  out = sum_s exp(lse_s - lse) out_s,
// the output summed in split order. Splits that saw no key (lse_s = -inf) weigh 0; a row no split saw gets
// out = 0 and lse = -inf; a row one of whose splits found its sequence outside the cache (lse_s NaN,
// scores.cuh, cache_readable) gets NaN.
#include "elements.cuh"
#include "forward_kernels.h"

namespace fused_attn::cuda {
namespace {

constexpr int kWarps = 4;

__device__ __forceinline__ float warp_max(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// One warp per row (b, i, h): its lanes weigh the splits (each split's exp(lse_s - max) once, into
// shared memory), then take the output columns in turn.
template <typename T>
__global__ void merge_splits_kernel(ForwardParams params) {
  __shared__ float weights[kWarps][kMaxSplits];
  const Problem& p = params.p;
  const Decoding& d = params.decoding;
  const int64_t rows = p.batch * p.seqlen_q * p.heads_q;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;  // ((b * Lq + i) * Hq + h)
  const int lane = threadIdx.x % 32, splits = static_cast<int>(d.splits);
  if (row >= rows) return;  // the whole warp
  const int64_t h = row % p.heads_q, i = row / p.heads_q % p.seqlen_q, b = row / (p.heads_q * p.seqlen_q);
  const int Dv = static_cast<int>(p.head_dim_v);
  float* weight = weights[threadIdx.x / 32];

  float top = -INFINITY, broken = 0.f;
  for (int s = lane; s < splits; s += 32) {
    const float lse = d.lse_partial[s * rows + row];
    top = fmaxf(top, lse);
    if (isnan(lse)) broken = 1.f;
  }
  top = warp_max(top);
  broken = warp_max(broken);
  float total = 0.f;
  for (int s = lane; s < splits; s += 32) {
    weight[s] = top == -INFINITY ? 0.f : expf(d.lse_partial[s * rows + row] - top);
    total += weight[s];
  }
  total = warp_sum(total);
  __syncwarp();
  const float normaliser = broken > 0.f ? NAN : total > 0.f ? 1.f / total : 0.f;
  T* out = static_cast<T*>(params.out.data) + b * params.out.batch + h * params.out.head + i * params.out.row;
  for (int col = lane; col < Dv; col += 32) {
    float sum = 0.f;
    for (int s = 0; s < splits; ++s) sum += weight[s] * d.out_partial[(s * rows + row) * Dv + col];
    out[col] = Element<T>::from_float(sum * normaliser);
  }
  if (lane == 0)
    params.lse.data[b * params.lse.batch + h * params.lse.head + i] =
        broken > 0.f ? NAN : total > 0.f ? top + logf(total) : -INFINITY;
}

template <typename T>
cudaError_t launch(const ForwardParams& params, cudaStream_t stream) {
  const int64_t rows = params.p.batch * params.p.seqlen_q * params.p.heads_q;
  return launch_kernel(merge_splits_kernel<T>, dim3(static_cast<unsigned>(ceil_div(rows, kWarps))), dim3(32 * kWarps),
                       0, stream, params);
}

}  // namespace

cudaError_t launch_merge_splits(const ForwardParams& params, cudaStream_t stream) {
  switch (params.p.dtype) {
    case DType::Float16: return launch<__half>(params, stream);
    case DType::BFloat16: return launch<__nv_bfloat16>(params, stream);
    case DType::Float32: return launch<float>(params, stream);
  }
  return cudaErrorInvalidConfiguration;
}

}  // namespace fused_attn::cuda
