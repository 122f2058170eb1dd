// The backward for bfloat16: tensor cores (mma.sync m16n8k16, fp32 accumulation), one kernel set per head-dim bucket.
#include "backward_kernels.cuh"
#include "backward_launch.h"
#include "forward_kernels.h"

namespace fused_attn::cuda {

cudaError_t launch_backward_bf16(const BackwardParams& params, cudaStream_t stream) {
  switch (head_dim_bucket(params.p)) {
    case 32: return backward::launch<__nv_bfloat16, 32>(params, stream);
    case 64: return backward::launch<__nv_bfloat16, 64>(params, stream);
    case 128: return backward::launch<__nv_bfloat16, 128>(params, stream);
    case 256: return backward::launch<__nv_bfloat16, 256>(params, stream);
    default: return cudaErrorInvalidConfiguration;
  }
}

}  // namespace fused_attn::cuda
