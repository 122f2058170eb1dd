// The online softmax of one query row, key block after key block: the running maximum of its
// scores and the running sum of exp(score - maximum). Rows that have seen no key yet (maximum
// -inf) give probability 0 and finish with out = 0 and lse = -inf, never NaN.
#pragma once

#include "cuda_api.cuh"

namespace fused_attn::cuda {

struct RowSoftmax {
  float max = -INFINITY;
  float sum = 0.f;  // this thread's share of the row's sum (threads of a row add theirs at the end)

  // Takes a block's maximum (over the whole row); returns the factor by which everything summed
  // so far (the sum and the output accumulator) must be rescaled.
  __device__ __forceinline__ float rescale(float block_max) {
    const float next = fmaxf(max, block_max);
    const float alpha = next == -INFINITY ? 1.f : expf(max - next);  // expf(-inf) = 0 for a first block
    max = next;
    sum *= alpha;
    return alpha;
  }
  __device__ __forceinline__ float probability(float score) const {
    return max == -INFINITY ? 0.f : expf(score - max);
  }
  // Given the row's total sum: lse (natural log) and the factor that normalises the output.
  __device__ __forceinline__ float lse(float total) const { return total > 0.f ? max + logf(total) : -INFINITY; }
  __device__ __forceinline__ static float normaliser(float total) { return total > 0.f ? 1.f / total : 0.f; }
};

}  // namespace fused_attn::cuda
