// The forward for __nv_bfloat16 inputs: tensor-core kernels (forward_mma.cuh), one per head-dim bucket.
#include "forward_kernels.h"
#include "forward_mma.cuh"

namespace fused_attn::cuda {

cudaError_t launch_forward_bf16(const ForwardParams& params, cudaStream_t stream) {
  switch (head_dim_bucket(params.p)) {
    case 32: return mma_forward::launch<__nv_bfloat16, 32>(params, stream);
    case 64: return mma_forward::launch<__nv_bfloat16, 64>(params, stream);
    case 128: return mma_forward::launch<__nv_bfloat16, 128>(params, stream);
    case 256: return mma_forward::launch<__nv_bfloat16, 256>(params, stream);
    default: return cudaErrorInvalidConfiguration;
  }
}

}  // namespace fused_attn::cuda
