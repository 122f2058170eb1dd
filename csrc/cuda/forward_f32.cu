// The forward for float32 inputs: exact-fp32 SIMT kernels (forward_simt.cuh), one per head-dim bucket.
#include "forward_kernels.h"
#include "forward_simt.cuh"

namespace fused_attn::cuda {

cudaError_t launch_forward_f32(const ForwardParams& params, cudaStream_t stream) {
  switch (head_dim_bucket(params.p)) {
    case 32: return simt_forward::launch<32>(params, stream);
    case 64: return simt_forward::launch<64>(params, stream);
    case 128: return simt_forward::launch<128>(params, stream);
    case 256: return simt_forward::launch<256>(params, stream);
    default: return cudaErrorInvalidConfiguration;
  }
}

}  // namespace fused_attn::cuda
