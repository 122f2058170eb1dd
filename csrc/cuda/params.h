// What the CUDA kernels receive: raw device pointers, sizes and element strides, no torch and no
// CUDA types, so the torch binding (binding.cpp) and the kernels (forward*.cu) share it, and the
// emulated build (tests/cuda_emulator/) compiles it unchanged. Naming follows csrc/cpu/params.h.
#pragma once

#include <cstdint>

#include "../common/views.h"

namespace fused_attn::cuda {

using fused_attn::ceil_div;
using fused_attn::DType;
using fused_attn::RowValues;
using fused_attn::Strided;

// The variants of the scores, all off by default. Query i of head (b, h) and key j are at
// distance d = j - (i + shift), shift being 0, or Lk - Lq for bottom-right alignment; their score is
//   s = softcap * tanh(scale q.k / softcap) - slope(b, h) |d| + bias(b, h, i, j)
// (softcap 0: no tanh), and key j is hidden from query i (score -inf) when d < -window_left or
// d > window_right (a bound of -1: unbounded; causal is window_right = 0) or mask(b, h, i, j) is
// false. The mask and bias are broadcast views of (B, Hq, Lq, Lk): stride 0 along broadcast dims.
struct Variants {
  int64_t window_left = -1, window_right = -1;
  int64_t shift = 0;
  float softcap = 0.f;
  const float* alibi_slopes = nullptr;  // slope(b, h) = alibi_slopes[b * slopes_batch + h * slopes_head]
  int64_t slopes_batch = 0, slopes_head = 0;
  Strided mask{nullptr, 0, 0, 0, 0};  // bool; data null: none
  Strided bias{nullptr, 0, 0, 0, 0};  // data null: none
  DType bias_dtype = DType::Float32;   // the bias's: float32, or q's dtype
  // Dropout (fused_attn/dropout.py): probability (b, h, i, j) is kept iff the first word of
  // Philox4x32-7 on counter (j, i, b * Hq + h, 0) under key *dropout_seed is >= drop_threshold,
  // and kept ones are scaled by keep_scale = 1 / (1 - p). The lse is that of the undropped scores.
  // The key is read on the device (one int64 in device memory), so no host sync is needed.
  bool dropout = false;
  const int64_t* dropout_seed = nullptr;
  uint32_t drop_threshold = 0;
  float keep_scale = 1.f;
};

// The sizes of one call: of every sequence of a dense call; the longest ones of a packed call
// (Packed below), which size the grid.
struct Problem {
  DType dtype;
  int64_t batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, head_dim_v;
  float scale;
  Variants variants;
};

// Decoding against a KV cache (seqlens_k null: a dense call). Batch b sees the first
// seqlens_k[b] (+ new_tokens) keys of its cache (int32, device), aligned bottom-right. Lengths and
// pages may be unchecked on the host: a sequence whose length lies outside [0, capacity] or whose
// pages are not all pages of the cache reads nothing and gets NaN rows (scores.cuh,
// cache_readable), and new tokens are never written outside the cache;
// Problem::seqlen_k is then the capacity. Paged caches (page_table not null) are addressed as the
// Strided (pages, Hkv, page_size, D): key j of batch b is row j % page_size of page
// page_table[b * table_stride + j / page_size].
// A decoding step's new tokens (new_tokens > 0): k_new and v_new, Strided (B, Hkv, new_tokens, D)
// and (.., Dv), are first written into the cache (append.cu) at positions seqlens_k[b] ..
// seqlens_k[b] + new_tokens - 1, and batch b then sees seqlens_k[b] + new_tokens keys.
struct KvCache {
  const int32_t* seqlens_k = nullptr;
  const int32_t* page_table = nullptr;
  int64_t table_stride = 0, page_size = 0, num_pages = 0;
  int64_t new_tokens = 0;
  Strided k_new{nullptr, 0, 0, 0, 0}, v_new{nullptr, 0, 0, 0, 0};
};

// Packed (varlen) batches (cu_seqlens_q null: a dense call). Sequence b is rows
// cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1 of q, out and lse, and rows cu_seqlens_k[b] ..
// cu_seqlens_k[b + 1] - 1 of k and v (int32, B + 1 entries, read on the device: no host sync).
// The tensors are then Strided with batch stride 0 (row values: (Hq, total_q), batch 0), and
// Problem::seqlen_q/k are the longest sequences. Each sequence is its own problem: local
// positions for the window, ALiBi and the dropout counters (batch index b), and a shift of
// Lk - Lq of its own lengths when bottom_right.
struct Packed {
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;
  int64_t total_q = 0, total_k = 0;  // the packed rows, into which boundaries are clamped (scores.cuh)
  bool bottom_right = false;
};

// How the forward's blocks cut a call (launch.h, decoding_of, sets it for KV-cache calls; dense
// and packed calls keep the defaults). A block's rows are (query, head) pairs of one key/value
// head's GQA group, query-major: row m of the group's Lq * group rows is query m / group of head
// h_kv * group + m % group, so decoding reads each cached key once per group, not once per head.
// With splits > 1 (split-KV) the keys are cut too: split s reads keys [s * split_keys,
// (s + 1) * split_keys) and writes its rows normalised, with their lse, in fp32 to out_partial
// (splits, B, Lq, Hq, Dv) and lse_partial (splits, B, Lq, Hq), which merge_splits.cu combines.
struct Decoding {
  int64_t group = 1;  // query heads whose rows share a block: 1, or Hq / Hkv
  int64_t splits = 1, split_keys = 0;
  float* out_partial = nullptr;
  float* lse_partial = nullptr;
};

struct ForwardParams {
  Problem p;
  Strided q, k, v, out;
  RowValues lse;  // natural log, -inf on rows that see no key
  KvCache cache;  // k and v are a KV cache when cache.seqlens_k is set
  Packed packed;  // a packed batch when packed.cu_seqlens_q is set (never with a cache)
  Decoding decoding;
};

}  // namespace fused_attn::cuda
