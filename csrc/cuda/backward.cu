// launch_backward (backward_launch.h): the kernels of the call's dtype.
#include "backward_launch.h"

namespace fused_attn::cuda {

cudaError_t launch_backward(const BackwardParams& params, cudaStream_t stream) {
  switch (params.p.dtype) {
    case DType::Float16: return launch_backward_f16(params, stream);
    case DType::BFloat16: return launch_backward_bf16(params, stream);
    case DType::Float32: return launch_backward_f32(params, stream);
  }
  return cudaErrorInvalidConfiguration;
}

}  // namespace fused_attn::cuda
