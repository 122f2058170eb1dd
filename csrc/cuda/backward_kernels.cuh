// The backward kernels, written once for every dtype (products in backward_products.cuh):
//
//   delta:  delta_i = rowsum(dO * O)_i - dlse_i, one warp per query row;
//   dq:     one block per (query block, head): dQ = sum over visible key blocks of dS K;
//   dk/dv:  one block per (key block, key/value head): dV = sum P^T dO and dK = sum dS^T Q over
//           the query heads of its group and their visible query blocks, in a fixed order (head
//           dim 256: dK and dV in two launches, as their accumulators do not fit together);
//   dbias:  one block per tile of the bias gradient in the bias's own shape, summing P (dP - delta)
//           over every (batch, head, row, column) that tile is broadcast to.
//
// with P = exp(S - lse) recomputed from the forward's lse (S the final scores, scores.cuh),
// dP = dO V^T (times the dropout factors), dS = P (dP - delta) times d S / d(q.k) (the scale, and
// 1 - tanh^2 under a softcap), and dV summing the dropped P (P times the dropout factors). The lse
// term: d lse / d S = P, hence the - dlse in delta. Every output element has one writer, and
// every sum runs in a fixed order: no atomics, and the gradients are bitwise reproducible. Fully
// masked rows (lse = -inf) get P = 0, so zero gradients.
#pragma once

#include "backward_params.h"
#include "backward_products.cuh"
#include "elements.cuh"
#include "scores.cuh"
#include "tiles.cuh"

namespace fused_attn::cuda::backward {

// Block shapes per dtype and head-dim bucket (both D and Dv are zero-padded to kDim). A block's
// warps own 16 rows each (queries in dq and dbias, keys in dk/dv) and stream the other operand
// kStream rows at a time; the widest heads stream fewer rows, as their accumulators fill the
// registers, and fp32 tiles take twice the shared memory (at most ~135 KiB, under sm_80's 163).
template <typename T, int kDim>
struct Tiles {
  static constexpr bool kExact = std::is_same_v<T, float>;
  static constexpr int kWarps = kExact && kDim >= 256 ? 2 : 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRows = 16 * kWarps;
  static constexpr int kStream = kDim >= 256 || (kExact && kDim >= 128) ? 32 : 64;
  // dk/dv hold two accumulators (dK and dV) where the others hold one: fewer streamed queries.
  static constexpr int kQueryStream = kDim >= 128 ? 32 : kStream;
  // Row stride in shared memory: whole 16-byte chunks, rows spread over the banks.
  static constexpr int kStride = kDim + (kExact ? 4 : 8);
  // Two owned tiles (kRows rows) and two streamed ones, then (dk/dv) lse and delta of the
  // streamed rows; the dbias kernel reuses the memory for its kRows x (kStream + 1) sums.
  static constexpr size_t kOperandBytes = sizeof(T) * kStride * 2 * (kRows + kStream);
  static constexpr size_t kStatBytes = sizeof(float) * 2 * kStream;
  static constexpr size_t kSumBytes = sizeof(float) * kRows * (kStream + 1);
  static constexpr size_t kSmemBytes = kOperandBytes + (kStatBytes > kSumBytes ? kStatBytes : kSumBytes);
};

// lse as the backward uses it: rows that saw no key have lse = -inf; +inf makes every
// P = exp(S - lse) exactly 0 there, so their gradients are 0 instead of NaN.
__device__ __forceinline__ float backward_lse(float lse) { return lse == -INFINITY ? INFINITY : lse; }

// Queries that may see some key of [k0, k0 + keys) under the window (visible_keys solved for i).
__device__ __forceinline__ KeyRange visible_queries(const Problem& p, int k0, int keys) {
  const Variants& v = p.variants;
  const int64_t begin = v.window_right < 0 ? 0 : k0 - v.shift - v.window_right;
  const int64_t end = v.window_left < 0 ? p.seqlen_q : k0 + keys - v.shift + v.window_left;
  auto clamp = [&](int64_t x) { return static_cast<int>(x < 0 ? 0 : x > p.seqlen_q ? p.seqlen_q : x); };
  return {clamp(begin), clamp(end)};
}

// What one (query i, key j) pair of a head contributes, from its dot products q.k and dO.v.
struct PairGradient {
  float prob;        // P as dV sees it: times the dropout factor
  float score_grad;  // d loss / d S = P (dP - delta), dP times the dropout factor: the bias gradient
  float dot_grad;    // d loss / d(q.k): score_grad times the scale (and 1 - tanh^2 under a softcap)
};
__device__ __forceinline__ PairGradient pair_gradient(const HeadScores& scores, const Problem& p, float dot, float dp,
                                                      int i, int j, float lse, float delta) {
  const float s = scores.score(dot, i, j);
  if (s == -INFINITY) return {0.f, 0.f, 0.f};  // hidden: P = 0 (no dropout bits needed)
  const float prob = expf(s - lse);
  const float keep = scores.dropout_factor(i, j);
  const float grad = prob * (dp * keep - delta);
  float chain = p.scale;  // d(softcap tanh(scale x / softcap)) / dx = scale (1 - tanh^2)
  if (p.variants.softcap > 0.f) {
    const float th = tanhf(dot * p.scale / p.variants.softcap);
    chain *= 1.f - th * th;
  }
  return {prob * keep, grad, grad * chain};
}

template <typename T>
__device__ __forceinline__ T* row_at(const Strided& s, int64_t b, int64_t h, int64_t i) {
  return static_cast<T*>(s.data) + b * s.batch + h * s.head + i * s.row;
}
__device__ __forceinline__ float row_value(const RowValues& r, int64_t b, int64_t h, int64_t i) {
  return r.data[b * r.batch + h * r.head + i];
}

// Rows [r0, r0 + kCount) of head (b, h) of a (B, H, L, D) tensor into shared memory (load_tile:
// zeros past `valid_rows` rows and `cols` columns; the caller commits and waits).
template <typename T, int kCount, int kDim, int kStride, int kThreads>
__device__ __forceinline__ void load_rows(T* smem, const Strided& s, int b, int h, int r0, int valid_rows, int cols) {
  const T* first = row_at<T>(s, b, h, r0);
  auto row = [&](int r) { return first + r * s.row; };
  load_tile<T, kCount, kDim, kStride, kThreads>(smem, row, valid_rows, cols, first);
}

// Writes this warp's 16 x kDim stripe held in the accumulator layout: rows row0 + group (+ 8)
// of (b, h) that are < valid_rows, columns < cols.
template <typename T, int kTiles>
__device__ __forceinline__ void store_stripe(const Strided& s, int b, int h, int row0, int valid_rows, int cols,
                                             const float (&acc)[kTiles][4]) {
  const int lane = threadIdx.x % 32, group = lane / 4, t = lane % 4;
  #pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = row0 + group + 8 * r;
    if (i >= valid_rows) continue;
    T* row = row_at<T>(s, b, h, i);
    #pragma unroll
    for (int n = 0; n < kTiles; ++n)
      for (int e = 0; e < 2; ++e) {
        const int col = 8 * n + 2 * t + e;
        if (col < cols) row[col] = Element<T>::from_float(acc[n][2 * r + e]);
      }
  }
}

// The call as the blocks of batch b see it (scores.cuh, sequence_params): for a packed batch,
// sequence b's lengths and shift, and every tensor from the sequence's first rows on.
template <typename T>
__device__ __forceinline__ BackwardParams sequence_params(BackwardParams params, int b) {
  if (params.packed.cu_seqlens_q == nullptr) return params;
  const SequenceRows rows = sequence_rows(params.packed, b);
  restrict_to(params.p, rows, params.packed.bottom_right);
  params.q = from_row<T>(params.q, rows.q_start);
  params.out = from_row<T>(params.out, rows.q_start);
  params.dout = from_row<T>(params.dout, rows.q_start);
  params.dq = from_row<T>(params.dq, rows.q_start);
  params.k = from_row<T>(params.k, rows.k_start);
  params.v = from_row<T>(params.v, rows.k_start);
  params.dk = from_row<T>(params.dk, rows.k_start);
  params.dv = from_row<T>(params.dv, rows.k_start);
  params.lse = from_row(params.lse, rows.q_start);
  params.dlse = from_row(params.dlse, rows.q_start);
  params.delta = from_row(params.delta, rows.q_start);
  return params;
}
// Batch b as a kernel that indexes the call's own tensors sees it: the problem restricted to the
// sequence, and the sequence's first query and key rows (0 for a dense call). The dk/dv kernel,
// at the register limit, uses this rather than sequence_params: two ints live, not moved pointers.
struct SequenceStart {
  Problem p;
  int q_row, k_row;
};
__device__ __forceinline__ SequenceStart sequence_start(const BackwardParams& params, int b) {
  SequenceStart start{params.p, 0, 0};
  if (params.packed.cu_seqlens_q != nullptr) {
    const SequenceRows rows = sequence_rows(params.packed, b);
    restrict_to(start.p, rows, params.packed.bottom_right);
    start.q_row = static_cast<int>(rows.q_start);
    start.k_row = static_cast<int>(rows.k_start);
  }
  return start;
}

constexpr int kDeltaWarps = 4;
constexpr int kDeltaRows = 16;  // query rows per delta block

template <typename T>
__global__ void delta_kernel(BackwardParams call) {
  const int h = blockIdx.y, b = blockIdx.z, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const BackwardParams params = sequence_params<T>(call, b);
  const Problem& p = params.p;
  for (int r = warp; r < kDeltaRows; r += kDeltaWarps) {
    const int i = blockIdx.x * kDeltaRows + r;
    if (i >= p.seqlen_q) break;  // the whole warp leaves together
    const T* out = row_at<T>(params.out, b, h, i);
    const T* dout = row_at<T>(params.dout, b, h, i);
    float sum = 0.f;
    for (int c = lane; c < p.head_dim_v; c += 32)
      sum = fmaf(Element<T>::to_float(dout[c]), Element<T>::to_float(out[c]), sum);
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == 0)
      params.delta.data[b * params.delta.batch + h * params.delta.head + i] = sum - row_value(params.dlse, b, h, i);
  }
}

// kMasked: the instance for calls with a bool mask, which skips the key blocks it hides from
// every row of the block (HeadScores::mask_shows_tile); the other one keeps its registers.
template <typename T, int kDim, bool kMasked>
__global__ void dq_kernel(BackwardParams call) {
  using Shape = Tiles<T, kDim>;
  constexpr int kRows = Shape::kRows, kStream = Shape::kStream, kStride = Shape::kStride;
  const int q0 = blockIdx.x * kRows, h = blockIdx.y, b = blockIdx.z;
  const BackwardParams params = sequence_params<T>(call, b);
  const Problem& p = params.p;
  if (q0 >= p.seqlen_q) return;  // past the end of a shorter packed sequence: no rows
  const int hk = h / (p.heads_q / p.heads_kv);
  const int Lq = static_cast<int>(p.seqlen_q), Lk = static_cast<int>(p.seqlen_k);
  const int D = static_cast<int>(p.head_dim), Dv = static_cast<int>(p.head_dim_v);
  const int lane = threadIdx.x % 32, group = lane / 4, t = lane % 4;
  const int row0 = threadIdx.x / 32 * 16;  // the warp's first row in the block

  T* q_smem = reinterpret_cast<T*>(dynamic_shared_memory());
  T* do_smem = q_smem + kRows * kStride;
  T* k_smem = do_smem + kRows * kStride;
  T* v_smem = k_smem + kStream * kStride;
  load_rows<T, kRows, kDim, kStride, Shape::kThreads>(q_smem, params.q, b, h, q0, Lq - q0, D);
  load_rows<T, kRows, kDim, kStride, Shape::kThreads>(do_smem, params.dout, b, h, q0, Lq - q0, Dv);

  float lse[2], delta[2];  // of rows group and group + 8 of the warp's stripe
  #pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = q0 + row0 + group + 8 * r;
    lse[r] = i < Lq ? backward_lse(row_value(params.lse, b, h, i)) : INFINITY;
    delta[r] = i < Lq ? row_value(params.delta, b, h, i) : 0.f;
  }
  const HeadScores scores(p, b, h);
  const KeyRange keys = visible_keys(p, q0, Lq - q0 < kRows ? Lq - q0 : kRows);

  float dq[kDim / 8][4] = {};
  for (int n0 = keys.begin / kStream * kStream; n0 < keys.end; n0 += kStream) {
    if (kMasked &&
        !scores.mask_shows_tile<Shape::kThreads>(q0, kRows < Lq - q0 ? kRows : Lq - q0, n0, kStream < Lk - n0 ? kStream : Lk - n0))
      continue;
    load_rows<T, kStream, kDim, kStride, Shape::kThreads>(k_smem, params.k, b, hk, n0, Lk - n0, D);
    load_rows<T, kStream, kDim, kStride, Shape::kThreads>(v_smem, params.v, b, hk, n0, Lk - n0, Dv);
    ptx::cp_async_commit();
    ptx::cp_async_wait<0>();
    __syncthreads();

    float s[kStream / 8][4] = {}, dp[kStream / 8][4] = {};
    product_rows<T, kDim>(s, q_smem + row0 * kStride, k_smem, kStride);     // Q K^T
    product_rows<T, kDim>(dp, do_smem + row0 * kStride, v_smem, kStride);  // dO V^T
    #pragma unroll
    for (int n = 0; n < kStream / 8; ++n)
      for (int e = 0; e < 4; ++e) {
        const int i = q0 + row0 + group + 8 * (e / 2), j = n0 + 8 * n + 2 * t + e % 2;
        s[n][e] = pair_gradient(scores, p, s[n][e], dp[n][e], i, j, lse[e / 2], delta[e / 2]).dot_grad;
      }
    product_held<T>(dq, s, k_smem, kStride);  // dQ += dS K
    __syncthreads();  // every warp is done with K and V
  }
  ptx::cp_async_wait<0>();  // Q and dO, when no key block was visible
  store_stripe<T>(params.dq, b, h, q0 + row0, Lq, D, dq);
}

// What a dk/dv block computes: both gradients, or one of them (for the widest heads, whose dK and
// dV accumulators do not fit the registers together: two launches then, each recomputing S).
enum class KeyGradients { Both, Keys, Values };

// kMasked: as dq_kernel's, skipping the query blocks a bool mask hides, except in fp32's widest
// kernels, which have no registers to spare for the vote (they compute p = 0 there instead).
template <typename T, int kDim, KeyGradients kWhich, bool kMasked>
__global__ void dkdv_kernel(BackwardParams params) {
  using Shape = Tiles<T, kDim>;
  constexpr bool kKeys = kWhich != KeyGradients::Values, kValues = kWhich != KeyGradients::Keys;
  constexpr int kRows = Shape::kRows, kStream = Shape::kQueryStream, kStride = Shape::kStride;
  constexpr bool kSkipHidden = kMasked && (sizeof(T) == 2 || kDim < 128);
  const int n0 = blockIdx.x * kRows, hk = blockIdx.y, b = blockIdx.z;
  const SequenceStart start = sequence_start(params, b);  // rows below are local to the sequence
  const Problem& p = start.p;
  if (n0 >= p.seqlen_k) return;  // past the end of a shorter packed sequence: no keys
  const int group_size = static_cast<int>(p.heads_q / p.heads_kv);
  const int Lq = static_cast<int>(p.seqlen_q), Lk = static_cast<int>(p.seqlen_k);
  const int D = static_cast<int>(p.head_dim), Dv = static_cast<int>(p.head_dim_v);
  const int lane = threadIdx.x % 32, group = lane / 4, t = lane % 4;
  const int row0 = threadIdx.x / 32 * 16;  // the warp's first key in the block

  T* k_smem = reinterpret_cast<T*>(dynamic_shared_memory());
  T* v_smem = k_smem + kRows * kStride;
  T* q_smem = v_smem + kRows * kStride;
  T* do_smem = q_smem + kStream * kStride;
  float* lse_smem = reinterpret_cast<float*>(do_smem + kStream * kStride);
  float* delta_smem = lse_smem + kStream;
  load_rows<T, kRows, kDim, kStride, Shape::kThreads>(k_smem, params.k, b, hk, start.k_row + n0, Lk - n0, D);
  load_rows<T, kRows, kDim, kStride, Shape::kThreads>(v_smem, params.v, b, hk, start.k_row + n0, Lk - n0, Dv);
  const KeyRange queries = visible_queries(p, n0, Lk - n0 < kRows ? Lk - n0 : kRows);

  float dk[kKeys ? kDim / 8 : 1][4] = {}, dv[kValues ? kDim / 8 : 1][4] = {};
  for (int g = 0; g < group_size; ++g) {
    const int h = hk * group_size + g;
    const HeadScores scores(p, b, h);
    for (int m0 = queries.begin / kStream * kStream; m0 < queries.end; m0 += kStream) {
      if (kSkipHidden &&
          !scores.mask_shows_tile<Shape::kThreads>(m0, kStream < Lq - m0 ? kStream : Lq - m0, n0, kRows < Lk - n0 ? kRows : Lk - n0))
        continue;
      load_rows<T, kStream, kDim, kStride, Shape::kThreads>(q_smem, params.q, b, h, start.q_row + m0, Lq - m0, D);
      load_rows<T, kStream, kDim, kStride, Shape::kThreads>(do_smem, params.dout, b, h, start.q_row + m0, Lq - m0, Dv);
      for (int r = threadIdx.x; r < kStream; r += Shape::kThreads) {
        const int i = m0 + r;
        lse_smem[r] = i < Lq ? backward_lse(row_value(params.lse, b, h, start.q_row + i)) : INFINITY;
        delta_smem[r] = i < Lq ? row_value(params.delta, b, h, start.q_row + i) : 0.f;
      }
      ptx::cp_async_commit();
      ptx::cp_async_wait<0>();
      __syncthreads();

      float st[kStream / 8][4] = {}, dpt[kStream / 8][4] = {};  // S^T and dP^T: keys are rows here
      product_rows<T, kDim>(st, k_smem + row0 * kStride, q_smem, kStride);    // K Q^T
      if constexpr (kKeys) product_rows<T, kDim>(dpt, v_smem + row0 * kStride, do_smem, kStride);  // V dO^T
      #pragma unroll
      for (int n = 0; n < kStream / 8; ++n)
        for (int e = 0; e < 4; ++e) {
          const int j = n0 + row0 + group + 8 * (e / 2), r = 8 * n + 2 * t + e % 2;
          const PairGradient grad = pair_gradient(scores, p, st[n][e], dpt[n][e], m0 + r, j, lse_smem[r], delta_smem[r]);
          st[n][e] = grad.prob;
          dpt[n][e] = grad.dot_grad;
        }
      if constexpr (kValues) product_held<T>(dv, st, do_smem, kStride);  // dV += P^T dO
      if constexpr (kKeys) product_held<T>(dk, dpt, q_smem, kStride);    // dK += dS^T Q
      __syncthreads();  // every warp is done with this query block
    }
  }
  ptx::cp_async_wait<0>();  // K and V, when no query block was visible
  const int first = start.k_row + n0 + row0, end = start.k_row + Lk;  // the warp's rows, in packed rows
  if constexpr (kKeys) store_stripe<T>(params.dk, b, hk, first, end, D, dk);
  if constexpr (kValues) store_stripe<T>(params.dv, b, hk, first, end, Dv, dv);
}

// Which dims of (B, Hq, Lq, Lk) the bias gradient is broadcast along (stride 0): a dbias block
// owns one index (or one tile) of every other dim and sums over these.
struct BiasOwnership {
  bool batch, head, rows, cols;  // true: the gradient has this dim (a block owns part of it)
};
__host__ __device__ __forceinline__ BiasOwnership bias_ownership(const Strided& dbias) {
  return {dbias.batch != 0, dbias.head != 0, dbias.row != 0, dbias.col != 0};
}

template <typename T, int kDim>
__global__ void dbias_kernel(BackwardParams params) {
  using Shape = Tiles<T, kDim>;
  constexpr int kRows = Shape::kRows, kStream = Shape::kStream, kStride = Shape::kStride;
  const Problem& p = params.p;
  const BiasOwnership own = bias_ownership(params.dbias);
  const int B = static_cast<int>(p.batch), Hq = static_cast<int>(p.heads_q);
  const int Lq = static_cast<int>(p.seqlen_q), Lk = static_cast<int>(p.seqlen_k);
  const int D = static_cast<int>(p.head_dim), Dv = static_cast<int>(p.head_dim_v);
  const int group_size = Hq / static_cast<int>(p.heads_kv);
  const int lane = threadIdx.x % 32, group = lane / 4, t = lane % 4;
  const int row0 = threadIdx.x / 32 * 16;
  // This block's part of the gradient, and what it sums over: every index of a broadcast dim.
  const int own_heads = own.head ? Hq : 1;
  // blockIdx.x: (batch, head) member and row tile (x has room for B * Hq * tiles), y: column tile.
  const int row_tiles = own.rows ? (Lq + kRows - 1) / kRows : 1;
  const int member = static_cast<int>(blockIdx.x) / row_tiles, row_tile = static_cast<int>(blockIdx.x) % row_tiles;
  const int b_own = own.batch ? member / own_heads : 0;
  const int h_own = own.head ? member % own_heads : 0;
  const int m_first = own.rows ? row_tile * kRows : 0, m_end = own.rows ? m_first + 1 : Lq;
  const int n_first = own.cols ? blockIdx.y * kStream : 0, n_end = own.cols ? n_first + 1 : Lk;

  T* q_smem = reinterpret_cast<T*>(dynamic_shared_memory());
  T* do_smem = q_smem + kRows * kStride;
  T* k_smem = do_smem + kRows * kStride;
  T* v_smem = k_smem + kStream * kStride;

  float sum[kStream / 8][4] = {};  // the score gradients of every (b, h, row block, key block) visited
  for (int b = own.batch ? b_own : 0; b < (own.batch ? b_own + 1 : B); ++b)
    for (int h = own.head ? h_own : 0; h < (own.head ? h_own + 1 : Hq); ++h) {
      const int hk = h / group_size;
      const HeadScores scores(p, b, h);
      for (int m0 = m_first; m0 < m_end; m0 += kRows) {
        const KeyRange keys = visible_keys(p, m0, Lq - m0 < kRows ? Lq - m0 : kRows);
        float lse[2], delta[2];
        #pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int i = m0 + row0 + group + 8 * r;
          lse[r] = i < Lq ? backward_lse(row_value(params.lse, b, h, i)) : INFINITY;
          delta[r] = i < Lq ? row_value(params.delta, b, h, i) : 0.f;
        }
        bool rows_loaded = false;
        for (int n0 = n_first; n0 < n_end; n0 += kStream) {
          if (n0 >= keys.end || n0 + kStream <= keys.begin) continue;  // nothing visible: zero terms
          __syncthreads();  // every warp is done with the previous tiles
          if (!rows_loaded) {
            load_rows<T, kRows, kDim, kStride, Shape::kThreads>(q_smem, params.q, b, h, m0, Lq - m0, D);
            load_rows<T, kRows, kDim, kStride, Shape::kThreads>(do_smem, params.dout, b, h, m0, Lq - m0, Dv);
            rows_loaded = true;
          }
          load_rows<T, kStream, kDim, kStride, Shape::kThreads>(k_smem, params.k, b, hk, n0, Lk - n0, D);
          load_rows<T, kStream, kDim, kStride, Shape::kThreads>(v_smem, params.v, b, hk, n0, Lk - n0, Dv);
          ptx::cp_async_commit();
          ptx::cp_async_wait<0>();
          __syncthreads();

          float s[kStream / 8][4] = {}, dp[kStream / 8][4] = {};
          product_rows<T, kDim>(s, q_smem + row0 * kStride, k_smem, kStride);
          product_rows<T, kDim>(dp, do_smem + row0 * kStride, v_smem, kStride);
          #pragma unroll
          for (int n = 0; n < kStream / 8; ++n)
            for (int e = 0; e < 4; ++e) {
              const int i = m0 + row0 + group + 8 * (e / 2), j = n0 + 8 * n + 2 * t + e % 2;
              sum[n][e] += pair_gradient(scores, p, s[n][e], dp[n][e], i, j, lse[e / 2], delta[e / 2]).score_grad;
            }
        }
      }
    }

  // The block's kRows x kStream sums, then each owned element sums its broadcast rows/columns.
  __syncthreads();
  constexpr int kSumStride = kStream + 1;
  float* sums = reinterpret_cast<float*>(dynamic_shared_memory());
  #pragma unroll
  for (int n = 0; n < kStream / 8; ++n)
    for (int e = 0; e < 4; ++e) sums[(row0 + group + 8 * (e / 2)) * kSumStride + 8 * n + 2 * t + e % 2] = sum[n][e];
  __syncthreads();
  const int out_rows = own.rows ? kRows : 1, out_cols = own.cols ? kStream : 1;
  for (int index = threadIdx.x; index < out_rows * out_cols; index += Shape::kThreads) {
    const int r = index / out_cols, c = index % out_cols;
    const int i = m_first + r, j = n_first + c;
    if (i >= Lq || j >= Lk) continue;
    float total = 0.f;
    for (int rr = own.rows ? r : 0; rr < (own.rows ? r + 1 : kRows); ++rr)
      for (int cc = own.cols ? c : 0; cc < (own.cols ? c + 1 : kStream); ++cc) total += sums[rr * kSumStride + cc];
    const Strided& g = params.dbias;
    static_cast<float*>(g.data)[b_own * g.batch + h_own * g.head + i * g.row + j * g.col] = total;
  }
}

// The dq and dk/dv kernels of one instance (kMasked: dq_kernel's).
template <typename T, int kDim, bool kMasked>
cudaError_t launch_gradients(const BackwardParams& params, cudaStream_t stream) {
  using Shape = Tiles<T, kDim>;
  const Problem& p = params.p;
  const unsigned B = static_cast<unsigned>(p.batch), Hq = static_cast<unsigned>(p.heads_q);
  const unsigned Hkv = static_cast<unsigned>(p.heads_kv);
  auto blocks = [](int64_t n, int64_t size) { return static_cast<unsigned>(ceil_div(n, size)); };
  cudaError_t error = launch_kernel(dq_kernel<T, kDim, kMasked>, dim3(blocks(p.seqlen_q, Shape::kRows), Hq, B),
                                    dim3(Shape::kThreads), Shape::kSmemBytes, stream, params);
  if (error != cudaSuccess) return error;
  const dim3 key_blocks(blocks(p.seqlen_k, Shape::kRows), Hkv, B);
  if constexpr (kDim >= 256) {
    error = launch_kernel(dkdv_kernel<T, kDim, KeyGradients::Keys, kMasked>, key_blocks, dim3(Shape::kThreads),
                          Shape::kSmemBytes, stream, params);
    if (error != cudaSuccess) return error;
    return launch_kernel(dkdv_kernel<T, kDim, KeyGradients::Values, kMasked>, key_blocks, dim3(Shape::kThreads),
                         Shape::kSmemBytes, stream, params);
  } else {
    return launch_kernel(dkdv_kernel<T, kDim, KeyGradients::Both, kMasked>, key_blocks, dim3(Shape::kThreads),
                         Shape::kSmemBytes, stream, params);
  }
}

template <typename T, int kDim>
cudaError_t launch(const BackwardParams& params, cudaStream_t stream) {
  using Shape = Tiles<T, kDim>;
  const Problem& p = params.p;
  const unsigned B = static_cast<unsigned>(p.batch), Hq = static_cast<unsigned>(p.heads_q);
  auto blocks = [](int64_t n, int64_t size) { return static_cast<unsigned>(ceil_div(n, size)); };
  cudaError_t error = launch_kernel(delta_kernel<T>, dim3(blocks(p.seqlen_q, kDeltaRows), Hq, B),
                                    dim3(32 * kDeltaWarps), 0, stream, params);
  if (error != cudaSuccess) return error;
  error = p.variants.mask.data != nullptr ? launch_gradients<T, kDim, true>(params, stream)
                                          : launch_gradients<T, kDim, false>(params, stream);
  if (error != cudaSuccess || params.dbias.data == nullptr) return error;
  const BiasOwnership own = bias_ownership(params.dbias);
  const dim3 grid((own.rows ? blocks(p.seqlen_q, Shape::kRows) : 1) * (own.batch ? B : 1) * (own.head ? Hq : 1),
                  own.cols ? blocks(p.seqlen_k, Shape::kStream) : 1);
  return launch_kernel(dbias_kernel<T, kDim>, grid, dim3(Shape::kThreads), Shape::kSmemBytes, stream, params);
}

}  // namespace fused_attn::cuda::backward
