// The host entry point of the CUDA backward (the forward's is in launch.h), and the per-dtype
// launchers it picks from (backward_<dtype>.cu, one file each so they compile in parallel).
#pragma once

#include "backward_params.h"
#include "launch.h"

namespace fused_attn::cuda {

// dq, dk, dv (and dbias when params.dbias.data is set) for a checked dense or packed call: asynchronous
// launches on `stream`, in order: delta, dq, dk/dv, dbias. Returns the first launch error
// (cudaSuccess when all are queued). Same expectations as launch_forward; no atomics, so the
// gradients are bitwise reproducible.
cudaError_t launch_backward(const BackwardParams& params, cudaStream_t stream);

cudaError_t launch_backward_f16(const BackwardParams& params, cudaStream_t stream);
cudaError_t launch_backward_bf16(const BackwardParams& params, cudaStream_t stream);
cudaError_t launch_backward_f32(const BackwardParams& params, cudaStream_t stream);

}  // namespace fused_attn::cuda
