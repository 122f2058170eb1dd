// What one forward block works on (params.h, Decoding): its rows as (query, head) pairs, the keys
// they may see within the block's split, and where each finished row goes. Both forward paths
// use these, so GQA packing and split-KV mean the same in each.
#pragma once

#include "elements.cuh"
#include "scores.cuh"

namespace fused_attn::cuda {

// The calls a forward kernel instance serves. Each instance compiles only its own path, so one
// path's registers never cost another's occupancy (the dense instance's matter most):
//   Dense     dense and packed calls without a bool mask: one head's rows, all their keys
//   Masked    dense calls with a bool mask: the same, skipping the key blocks the mask hides
//   Decoding  KV-cache calls: GQA-packed rows and split-KV (params.decoding)
enum class Calls { Dense, Masked, Decoding };
inline Calls calls_of(const ForwardParams& params) {
  if (params.cache.seqlens_k != nullptr) return Calls::Decoding;
  return params.p.variants.mask.data != nullptr ? Calls::Masked : Calls::Dense;
}

// Grid: x = (row block, split), y = the head (or, GQA-packed, the key/value head) whose rows the
// block takes, z = batch.
template <int kBlockM>
inline dim3 forward_grid(const ForwardParams& params) {
  const Decoding& d = params.decoding;
  return dim3(static_cast<unsigned>(ceil_div(params.p.seqlen_q * d.group, kBlockM) * d.splits),
              static_cast<unsigned>(params.p.heads_q / d.group), static_cast<unsigned>(params.p.batch));
}

class BlockRows {
 public:
  // Decoding reads params.decoding; the other instances take one head's rows and all its keys,
  // their indices plain functions of the block's (a computed first row alone costs registers).
  template <int kBlockM, Calls kCalls>
  __device__ static BlockRows of_this_block(const ForwardParams& params) {
    if (kCalls != Calls::Decoding)
      return BlockRows(static_cast<int>(blockIdx.x) * kBlockM, 1, static_cast<int>(blockIdx.y), 0, false);
    const Decoding& d = params.decoding;
    const int group = static_cast<int>(d.group), splits = static_cast<int>(d.splits);
    return BlockRows(static_cast<int>(blockIdx.x) / splits * kBlockM, group, static_cast<int>(blockIdx.y) * group,
                     static_cast<int>(blockIdx.x) % splits, splits > 1);
  }

  // Row r of the block is query query(r) of head head(r) (query >= Lq: a padding row).
  __device__ __forceinline__ int query(int r) const { return (m0_ + r) / group_; }
  __device__ __forceinline__ int head(int r) const { return first_head_ + (m0_ + r) % group_; }
  __device__ __forceinline__ int split() const { return split_; }
  __device__ __forceinline__ bool is_split() const { return is_split_; }
  // How many of the block's kBlockM rows are real (<= 0: the block is past the sequence's end).
  __device__ __forceinline__ int count(const Problem& p, int block_m) const {
    const int left = static_cast<int>(p.seqlen_q) * group_ - m0_;
    return left < block_m ? left : block_m;
  }

  // The keys some of its `rows` rows may see (window), within its split's keys.
  __device__ KeyRange keys(const ForwardParams& params, int rows) const {
    const int first = query(0), last = query(rows - 1);
    KeyRange keys = visible_keys(params.p, first, last - first + 1);
    if (is_split_) {
      const Decoding& d = params.decoding;
      const int begin = static_cast<int>(split_ * d.split_keys), end = static_cast<int>(begin + d.split_keys);
      keys.begin = keys.begin > begin ? keys.begin : begin;
      keys.end = keys.end < end ? keys.end : end;
    }
    return keys;
  }

  // The first key block from n0 on (blocks of kBlockN keys, up to `end`) in which the bool mask
  // lets some row of the block see some key (HeadScores::mask_shows_tile): the blocks before it
  // are skipped, their keys never loaded. Every thread of the block calls it (a block-wide vote per
  // key block tried). Only the Masked instance votes; the others take n0 as it is. For rows of
  // one head, `scores`'s.
  template <int kBlockN, int kThreads, Calls kCalls>
  __device__ __forceinline__ int next_key_block(const HeadScores& scores, int rows, int n0, int end) const {
    if constexpr (kCalls == Calls::Masked) {
      while (n0 < end && !scores.mask_shows_tile<kThreads>(query(0), rows, n0, end - n0 < kBlockN ? end - n0 : kBlockN))
        n0 += kBlockN;
    }
    return n0;
  }

 private:
  __device__ BlockRows(int m0, int group, int first_head, int split, bool is_split)
      : m0_(m0), group_(group), first_head_(first_head), split_(split), is_split_(is_split) {}
  int m0_, group_, first_head_, split_;
  bool is_split_;
};

// Where row i of head (b, h) of a block goes: out (T) and lse, or with split-KV its split's fp32
// partials.
template <typename T>
class RowOutput {
 public:
  __device__ RowOutput(const ForwardParams& params, int b, int h, int i, const BlockRows& block) {
    if (block.is_split()) {
      const Decoding& d = params.decoding;
      const int64_t at = ((block.split() * params.p.batch + b) * params.p.seqlen_q + i) * params.p.heads_q + h;
      partial_ = d.out_partial + at * params.p.head_dim_v;
      lse_ = d.lse_partial + at;
    } else {
      out_ = static_cast<T*>(params.out.data) + b * params.out.batch + h * params.out.head + i * params.out.row;
      lse_ = params.lse.data + b * params.lse.batch + h * params.lse.head + i;
    }
  }
  __device__ __forceinline__ void store(int col, float value) const {
    if (partial_ != nullptr)
      partial_[col] = value;
    else
      out_[col] = Element<T>::from_float(value);
  }
  __device__ __forceinline__ void store_lse(float value) const { *lse_ = value; }

 private:
  T* out_ = nullptr;
  float* partial_ = nullptr;
  float* lse_ = nullptr;
};

}  // namespace fused_attn::cuda
