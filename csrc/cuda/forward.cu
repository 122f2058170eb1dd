// launch_forward (launch.h): a decoding step's new tokens written into the cache, the kernels of the
// call's dtype, then split-KV's merge; and the device's
// multiprocessor count, which decoding_of sizes the splits by.
#include "forward_kernels.h"

namespace fused_attn::cuda {

namespace {

cudaError_t launch_blocks(const ForwardParams& params, cudaStream_t stream) {
  switch (params.p.dtype) {
    case DType::Float16: return launch_forward_f16(params, stream);
    case DType::BFloat16: return launch_forward_bf16(params, stream);
    case DType::Float32: return launch_forward_f32(params, stream);
  }
  return cudaErrorInvalidConfiguration;
}

}  // namespace

cudaError_t launch_forward(const ForwardParams& params, cudaStream_t stream) {
  if (params.cache.new_tokens > 0) {
    const cudaError_t error = launch_append(params, stream);
    if (error != cudaSuccess) return error;
  }
  const cudaError_t error = launch_blocks(params, stream);
  if (error != cudaSuccess || params.decoding.splits == 1) return error;
  return launch_merge_splits(params, stream);
}

int multiprocessor_count() {
  int device = 0, count = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || count < 1)
    return 1;
  return count;
}

}  // namespace fused_attn::cuda
