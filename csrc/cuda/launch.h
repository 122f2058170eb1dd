// The host entry points of the CUDA kernels: plain C++ plus the CUDA runtime's types, so the
// torch binding calls them without seeing any kernel code. In the emulated build
// (FUSED_ATTN_EMULATOR, tests/cuda_emulator/) the same names come from the emulator.
#pragma once

#ifdef FUSED_ATTN_EMULATOR
#include "fused_attn_emulator.h"
#else
#include <cuda_runtime_api.h>
#endif

#include "params.h"

namespace fused_attn::cuda {

// Largest head dim (D and Dv) the kernels take.
constexpr int64_t kMaxHeadDim = 256;

// out and lse for every (b, h, i) of p (of a packed call: every row of every sequence; rows after
// the last sequence are not written): an asynchronous launch on `stream`; returns the launch's
// error (cudaSuccess when queued). Expects a checked call: 1 <= D, Dv <= kMaxHeadDim, Lq, Lk >= 1
// (packed: the longest sequences, and valid cu_seqlens), q, k, v and out with contiguous last dims.
cudaError_t launch_forward(const ForwardParams& params, cudaStream_t stream);

}  // namespace fused_attn::cuda
