// launch_forward (launch.h): the kernels of the call's dtype.
#include "forward_kernels.h"

namespace fused_attn::cuda {

cudaError_t launch_forward(const ForwardParams& params, cudaStream_t stream) {
  switch (params.p.dtype) {
    case DType::Float16: return launch_forward_f16(params, stream);
    case DType::BFloat16: return launch_forward_bf16(params, stream);
    case DType::Float32: return launch_forward_f32(params, stream);
  }
  return cudaErrorInvalidConfiguration;
}

}  // namespace fused_attn::cuda
