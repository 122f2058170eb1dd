// The variants of the scores (params.h, Variants) for one head: which keys a block of queries may
// see, and the final score of one (query, key) pair from its dot product. Both forward paths
// (and the backward, which recomputes the scores) use these, so they agree on every variant.
#pragma once

#include "cuda_api.cuh"  // first: philox.h needs its __host__ __device__
#include "params.h"
#include "../common/philox.h"

namespace fused_attn::cuda {

// A tensor's view from packed row `start` on: the rows of one packed sequence.
template <typename T>
__device__ __forceinline__ Strided from_row(const Strided& s, int64_t start) {
  return {static_cast<T*>(s.data) + start * s.row, s.batch, s.head, s.row, s.col};
}
__device__ __forceinline__ RowValues from_row(const RowValues& r, int64_t start) {
  return {r.data + start, r.batch, r.head};
}

// Where packed sequence b lies (params.h, Packed): its first rows and its lengths. The boundaries
// are clamped into the packed rows: unchecked cu_seqlens (CUDA graphs, FUSED_ATTN_HOST_CHECKS=0)
// are never followed out of the tensors.
struct SequenceRows {
  int64_t q_start, k_start, seqlen_q, seqlen_k;
};
__device__ __forceinline__ int64_t clamped(int64_t x, int64_t low, int64_t high) {
  return x < low ? low : (x > high ? high : x);
}
__device__ __forceinline__ SequenceRows sequence_rows(const Packed& packed, int b) {
  const int64_t q_start = clamped(packed.cu_seqlens_q[b], 0, packed.total_q);
  const int64_t k_start = clamped(packed.cu_seqlens_k[b], 0, packed.total_k);
  return {q_start, k_start, clamped(packed.cu_seqlens_q[b + 1], q_start, packed.total_q) - q_start,
          clamped(packed.cu_seqlens_k[b + 1], k_start, packed.total_k) - k_start};
}
// Problem p restricted to one sequence of its packed batch: the sequence's own lengths and shift.
__device__ __forceinline__ void restrict_to(Problem& p, const SequenceRows& rows, bool bottom_right) {
  p.seqlen_q = rows.seqlen_q;
  p.seqlen_k = rows.seqlen_k;
  p.variants.shift = bottom_right ? rows.seqlen_k - rows.seqlen_q : 0;
}

// The call as the blocks of batch b see it: for a KV cache, batch b's own key count and shift;
// for a packed batch, sequence b's lengths and shift, and its tensors from its first rows on (so
// the kernels index them like batch b of a dense call, whose batch stride here is 0). Blocks
// past the sequence's end have nothing to do.
template <typename T>
__device__ __forceinline__ ForwardParams sequence_params(ForwardParams params, int b) {
  if (params.cache.seqlens_k != nullptr) {
    const int64_t capacity = params.p.seqlen_k, keys = params.cache.seqlens_k[b] + params.cache.new_tokens;
    params.p.seqlen_k = keys < 0 ? 0 : (keys > capacity ? capacity : keys);
    params.p.variants.shift = params.p.seqlen_k - params.p.seqlen_q;
  }
  if (params.packed.cu_seqlens_q != nullptr) {
    const SequenceRows rows = sequence_rows(params.packed, b);
    restrict_to(params.p, rows, params.packed.bottom_right);
    params.q = from_row<T>(params.q, rows.q_start);
    params.out = from_row<T>(params.out, rows.q_start);
    params.lse = from_row(params.lse, rows.q_start);
    params.k = from_row<T>(params.k, rows.k_start);
    params.v = from_row<T>(params.v, rows.k_start);
  }
  return params;
}

// Where key j of batch b, key/value head h_kv starts in k or v (`s`): dense rows, or a cache page.
template <typename T>
__device__ __forceinline__ const T* key_row(const Strided& s, const KvCache& cache, int b, int h_kv, int j) {
  const T* base = static_cast<const T*>(s.data) + h_kv * s.head;
  if (cache.page_table == nullptr) return base + b * s.batch + j * s.row;
  const int64_t page = cache.page_table[b * cache.table_stride + j / cache.page_size];
  return base + page * s.batch + (j % cache.page_size) * s.row;
}

struct KeyRange {
  int begin, end;  // [begin, end); empty when begin >= end
};

// Whether batch b of a KV-cache call (`call`, as launched) may load its keys [loaded.begin,
// loaded.end): its length with the new tokens lies in [0, capacity] and every page holding those
// keys is a page of the cache. Lengths and pages go unchecked on the host where reading them would
// cost a sync (fused_attn/host_checks.py); a sequence failing this reads nothing, and its rows get
// NaN. Block-wide: every thread of the block calls it.
__device__ __forceinline__ bool cache_readable(const ForwardParams& call, int b, KeyRange loaded) {
  const KvCache& cache = call.cache;
  const int64_t length = cache.seqlens_k[b] + cache.new_tokens;
  int missing = length < 0 || length > call.p.seqlen_k;
  if (cache.page_table != nullptr && loaded.begin < loaded.end) {
    const int32_t* row = cache.page_table + b * cache.table_stride;
    const int64_t last = (loaded.end - 1) / cache.page_size;
    for (int64_t i = loaded.begin / cache.page_size + threadIdx.x; i <= last; i += blockDim.x)
      missing |= row[i] < 0 || row[i] >= cache.num_pages;
  }
  return !__syncthreads_or(missing);
}

// The keys a block's loop loads to see `keys`: whole blocks of kBlockN from the one holding
// keys.begin, within the sequence's seqlen_k.
template <int kBlockN>
__device__ __forceinline__ KeyRange loaded_keys(const Problem& p, KeyRange keys) {
  const int first = keys.begin / kBlockN * kBlockN;
  const int end = first + (keys.end > first ? (keys.end - first + kBlockN - 1) / kBlockN * kBlockN : 0);
  return {first, end < p.seqlen_k ? end : static_cast<int>(p.seqlen_k)};
}

// Keys that some query of [q0, q0 + rows) may see under the window: query i sees keys
// i + shift - left .. i + shift + right.
__device__ __forceinline__ KeyRange visible_keys(const Problem& p, int q0, int rows) {
  const Variants& v = p.variants;
  const int64_t begin = v.window_left < 0 ? 0 : q0 + v.shift - v.window_left;
  const int64_t end = v.window_right < 0 ? p.seqlen_k : q0 + rows + v.shift + v.window_right;
  auto clamp = [&](int64_t x) { return static_cast<int>(x < 0 ? 0 : x > p.seqlen_k ? p.seqlen_k : x); };
  return {clamp(begin), clamp(end)};
}


// The score rules of head (b, h): final scores from dot products, and dropout factors.
class HeadScores {
 public:
  __device__ HeadScores(const Problem& p, int b, int h) : p_(p), b_(b), h_(h) {
    const Variants& v = p.variants;
    slope_ = v.alibi_slopes == nullptr ? 0.f : v.alibi_slopes[b * v.slopes_batch + h * v.slopes_head];
    seed_ = v.dropout ? static_cast<uint64_t>(*v.dropout_seed) : 0;
  }

  // s = softcap * tanh(scale q.k / softcap) - slope |d| + bias, or -inf where query i may not see
  // key j: outside the sequence, the window, or the mask (rows past Lq count as hidden).
  __device__ __forceinline__ float score(float dot, int i, int j) const {
    const Variants& v = p_.variants;
    if (i >= p_.seqlen_q || j >= p_.seqlen_k) return -INFINITY;
    const int64_t distance = j - (i + v.shift);
    if ((v.window_left >= 0 && distance < -v.window_left) || (v.window_right >= 0 && distance > v.window_right))
      return -INFINITY;
    if (v.mask.data != nullptr && !*at<bool>(v.mask, i, j)) return -INFINITY;
    float s = dot * p_.scale;
    if (v.softcap > 0.f) s = v.softcap * tanhf(s / v.softcap);
    if (v.alibi_slopes != nullptr) s -= slope_ * static_cast<float>(distance < 0 ? -distance : distance);
    if (v.bias.data != nullptr) {
      const float b = bias(i, j);
      if (b <= kHidingBias) return -INFINITY;  // (common/views.h)
      s += b;
    }
    return s;
  }

  // bias(b, h, i, j), read in its own dtype (float32, or q's 16-bit one: no float32 copy of an
  // L x L bias).
  __device__ __forceinline__ float bias(int i, int j) const {
    const Strided& view = p_.variants.bias;
    switch (p_.variants.bias_dtype) {
      case DType::BFloat16: return __bfloat162float(*at<__nv_bfloat16>(view, i, j));
      case DType::Float16: return __half2float(*at<__half>(view, i, j));
      default: return *at<float>(view, i, j);
    }
  }

  // Whether the bool mask lets some query of [i0, i0 + rows) see some key of [j0, j0 + keys):
  // tiles it hides whole add nothing (p = dS = 0 throughout) and are skipped. Every thread of the
  // block calls it (one block-wide vote, each thread reading its share of the pairs, a broadcast
  // dim once); true without a mask, without a vote.
  template <int kThreads>
  __device__ __forceinline__ bool mask_shows_tile(int i0, int rows, int j0, int keys) const {
    const Strided& mask = p_.variants.mask;
    if (mask.data == nullptr) return true;
    const bool* rows_from = at<bool>(mask, i0, j0);
    if (mask.row == 0) rows = 1;
    if (mask.col == 0) keys = 1;
    bool shown = false;
    for (int pair = threadIdx.x; pair < rows * keys && !shown; pair += kThreads)
      shown = rows_from[pair / keys * mask.row + pair % keys * mask.col];
    return __syncthreads_or(shown) != 0;
  }

  // What multiplies probability (i, j) before it meets V: 1 without dropout, else keep / (1 - p).
  __device__ __forceinline__ float dropout_factor(int i, int j) const {
    const Variants& v = p_.variants;
    if (!v.dropout) return 1.f;
    const uint32_t head = static_cast<uint32_t>(b_ * p_.heads_q + h_);
    const uint32_t bits = philox_bits(seed_, static_cast<uint32_t>(j), static_cast<uint32_t>(i), head);
    return bits >= v.drop_threshold ? v.keep_scale : 0.f;
  }

 private:
  template <typename T>
  __device__ __forceinline__ const T* at(const Strided& s, int i, int j) const {
    return static_cast<const T*>(s.data) + b_ * s.batch + h_ * s.head + i * s.row + j * s.col;
  }

  const Problem& p_;
  int b_, h_;
  float slope_;
  uint64_t seed_;
};

}  // namespace fused_attn::cuda
