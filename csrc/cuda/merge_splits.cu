// Split-KV's second step (params.h, Decoding): each row's out and lse from its splits' partials,
// weighted by their lse:
//   lse = log sum_s exp(lse_s);  out = sum_s exp(lse_s - lse) out_s,
// summed in split order. Splits that saw no key (lse_s = -inf) weigh 0; a row no split saw gets
// out = 0 and lse = -inf.
#include "elements.cuh"
#include "forward_kernels.h"

namespace fused_attn::cuda {
namespace {

constexpr int kWarps = 4;

// One warp per row (b, i, h), its lanes taking the output columns in turn.
template <typename T>
__global__ void merge_splits_kernel(ForwardParams params) {
  const Problem& p = params.p;
  const Decoding& d = params.decoding;
  const int64_t rows = p.batch * p.seqlen_q * p.heads_q;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;  // ((b * Lq + i) * Hq + h)
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int64_t h = row % p.heads_q, i = row / p.heads_q % p.seqlen_q, b = row / (p.heads_q * p.seqlen_q);
  const int Dv = static_cast<int>(p.head_dim_v);

  float top = -INFINITY;
  for (int64_t s = 0; s < d.splits; ++s) top = fmaxf(top, d.lse_partial[s * rows + row]);
  float total = 0.f;
  if (top != -INFINITY)
    for (int64_t s = 0; s < d.splits; ++s) total += expf(d.lse_partial[s * rows + row] - top);
  const float normaliser = total > 0.f ? 1.f / total : 0.f;
  T* out = static_cast<T*>(params.out.data) + b * params.out.batch + h * params.out.head + i * params.out.row;
  for (int col = lane; col < Dv; col += 32) {
    float sum = 0.f;
    if (top != -INFINITY)
      for (int64_t s = 0; s < d.splits; ++s)
        sum += expf(d.lse_partial[s * rows + row] - top) * d.out_partial[(s * rows + row) * Dv + col];
    out[col] = Element<T>::from_float(sum * normaliser);
  }
  if (lane == 0)
    params.lse.data[b * params.lse.batch + h * params.lse.head + i] = total > 0.f ? top + logf(total) : -INFINITY;
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
