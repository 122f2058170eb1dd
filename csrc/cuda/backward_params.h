// What the CUDA backward kernels receive (plain C++, like params.h, whose Problem and Strided it
// reuses): the forward's inputs and results, the gradients to write, and a workspace.
#pragma once

#include "params.h"

namespace fused_attn::cuda {

// dq, dk, dv and the inputs they mirror have contiguous last dims (col == 1), as in the forward.
struct BackwardParams {
  Problem p;
  Strided q, k, v, out, dout;
  Strided dq, dk, dv;  // written: every element of (B, H, L, D) once
  RowValues lse;       // the forward's, -inf on rows that see no key
  RowValues dlse;      // the gradient of lse
  RowValues delta;     // workspace (B, Hq, Lq): rowsum(dO * O) - dlse, written by the first kernel
  // float32 gradient of the bias: the broadcast (B, Hq, Lq, Lk) view of a buffer of the bias's own
  // shape, stride 0 along broadcast dims (where the kernel sums the terms); data null: none.
  // Every element is written (not accumulated), so the buffer needs no zeroing.
  Strided dbias{nullptr, 0, 0, 0, 0};
  Packed packed;  // a packed batch (params.h) when packed.cu_seqlens_q is set; then no bias
};

}  // namespace fused_attn::cuda
