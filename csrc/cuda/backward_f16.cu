// The backward for float16: tensor cores (mma.sync m16n8k16, fp32 accumulation), one kernel set per head-dim bucket.
#include "backward_kernels.cuh"
#include "backward_launch.h"
#include "forward_kernels.h"

namespace fused_attn::cuda {

cudaError_t launch_backward_f16(const BackwardParams& params, cudaStream_t stream) {
  switch (head_dim_bucket(params.p)) {
    case 32: return backward::launch<__half, 32>(params, stream);
    case 64: return backward::launch<__half, 64>(params, stream);
    case 128: return backward::launch<__half, 128>(params, stream);
    case 256: return backward::launch<__half, 256>(params, stream);
    default: return cudaErrorInvalidConfiguration;
  }
}

}  // namespace fused_attn::cuda
