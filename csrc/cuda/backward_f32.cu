// The backward for float32: exact fp32 on the CUDA cores (FMA, no tf32), one kernel set per head-dim bucket.
#include "backward_kernels.cuh"
#include "backward_launch.h"
#include "forward_kernels.h"

namespace fused_attn::cuda {

cudaError_t launch_backward_f32(const BackwardParams& params, cudaStream_t stream) {
  switch (head_dim_bucket(params.p)) {
    case 32: return backward::launch<float, 32>(params, stream);
    case 64: return backward::launch<float, 64>(params, stream);
    case 128: return backward::launch<float, 128>(params, stream);
    case 256: return backward::launch<float, 256>(params, stream);
    default: return cudaErrorInvalidConfiguration;
  }
}

}  // namespace fused_attn::cuda
