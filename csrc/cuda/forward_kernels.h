// The forward launchers of each input dtype (forward_<dtype>.cu, one file each so they compile in
// parallel); launch_forward (forward.cu) picks one.
#pragma once

#include "launch.h"

namespace fused_attn::cuda {

cudaError_t launch_forward_f16(const ForwardParams& params, cudaStream_t stream);
cudaError_t launch_forward_bf16(const ForwardParams& params, cudaStream_t stream);
cudaError_t launch_forward_f32(const ForwardParams& params, cudaStream_t stream);
// Split-KV's merge (merge_splits.cu) of the call's dtype.
cudaError_t launch_merge_splits(const ForwardParams& params, cudaStream_t stream);
// A decoding step's new tokens written into the cache (append.cu), before the forward reads it.
cudaError_t launch_append(const ForwardParams& params, cudaStream_t stream);

// The kernels are compiled for a few head dims (both D and Dv are zero-padded up to one): the
// smallest that holds max(D, Dv), or 0 when none does.
inline int head_dim_bucket(const Problem& p) {
  const int64_t widest = p.head_dim > p.head_dim_v ? p.head_dim : p.head_dim_v;
  for (int bucket : {32, 64, 128, 256})
    if (widest <= bucket) return bucket;
  return 0;
}

}  // namespace fused_attn::cuda
