// The host entry points of the CUDA kernels: plain C++ plus the CUDA runtime's types, so the
// torch binding calls them without seeing any kernel code. In the emulated build
// (FUSED_ATTN_EMULATOR, tests/cuda_emulator/) the same names come from the emulator.
#pragma once

#ifdef FUSED_ATTN_EMULATOR
#include "fused_attn_emulator.h"
#else
#include <cuda_runtime_api.h>
#endif

#include <algorithm>

#include "params.h"

namespace fused_attn::cuda {

// Largest head dim (D and Dv) the kernels take.
constexpr int64_t kMaxHeadDim = 256;

// out and lse for every (b, h, i) of p (of a packed call: every row of every sequence; rows after
// the last sequence are not written): an asynchronous launch on `stream`; returns the launch's
// error (cudaSuccess when queued). Expects a checked call: 1 <= D, Dv <= kMaxHeadDim, Lq, Lk >= 1
// (packed: the longest sequences, and valid cu_seqlens), q, k, v and out with contiguous last dims.
// With params.decoding.splits > 1 it also merges the splits (merge_splits.cu).
cudaError_t launch_forward(const ForwardParams& params, cudaStream_t stream);

// The current device's streaming multiprocessors (1 if the runtime cannot say).
int multiprocessor_count();

// How a KV-cache call's forward is cut (params.h, Decoding; p.seqlen_k is the cache capacity). The
// query heads of a group share blocks. The keys are split when the call has fewer than
// kBlocksPerMultiprocessor blocks (of about kSplitRows rows) per multiprocessor, into splits of at
// least kMinSplitKeys keys, a multiple of every kernel's key block, and at most kMaxSplits of
// them. `forced` > 0 asks for that many splits instead (as far as whole key blocks and
// kMaxSplits allow).
constexpr int64_t kSplitRows = 64, kBlocksPerMultiprocessor = 4, kMinSplitKeys = 256, kSplitKeysMultiple = 64,
                  kMaxSplits = 64;
inline Decoding decoding_of(const Problem& p, int64_t forced, int multiprocessors) {
  Decoding d;
  d.group = p.heads_q / p.heads_kv;
  const int64_t blocks = ceil_div(p.seqlen_q * d.group, kSplitRows) * p.heads_kv * p.batch;
  int64_t wanted = ceil_div(kBlocksPerMultiprocessor * multiprocessors, blocks);
  wanted = std::min(forced > 0 ? forced : std::min(wanted, p.seqlen_k / kMinSplitKeys), kMaxSplits);
  if (wanted <= 1) return d;
  d.split_keys = ceil_div(ceil_div(p.seqlen_k, wanted), kSplitKeysMultiple) * kSplitKeysMultiple;
  d.splits = ceil_div(p.seqlen_k, d.split_keys);
  return d;
}

}  // namespace fused_attn::cuda
