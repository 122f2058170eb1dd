// What the CPU kernels receive: raw pointers, sizes and element strides, no torch types.
//
// The kernels are compiled once per instruction set (kernels_portable.cpp, kernels_avx2.cpp) and
// see only this header and ATen's header-only vector library; the torch binding (binding.cpp)
// turns tensors into these structs and picks the instruction set at run time.
#pragma once

#include <cstdint>

namespace fused_attn::cpu {

// Queries per task and keys per inner step. Scratch per thread is a few tiles of this size, so
// memory stays O(L): the Lq x Lk score matrix never exists.
constexpr int64_t kBlockM = 64;
constexpr int64_t kBlockN = 64;

enum class DType { Float32, BFloat16, Float16 };

// A (B, H, L, D) tensor: element pointer and element strides, any layout (the common
// sequence-major (B, L, H, D) view is read in place).
struct Strided {
  void* data;
  int64_t batch, head, row, col;
};

// The variants of the scores, all off by default. Query i of head (b, h) and key j are at
// distance d = j - (i + shift); their score is
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
  Strided bias{nullptr, 0, 0, 0, 0};  // float32; data null: none
  // Dropout (fused_attn/dropout.py): probability (b, h, i, j) is kept iff the first word of
  // Philox4x32-7 on counter (j, i, b * Hq + h, 0) under key dropout_seed is >= drop_threshold,
  // and kept ones are scaled by keep_scale = 1 / (1 - p). The lse is that of the undropped scores.
  bool dropout = false;
  uint64_t dropout_seed = 0;
  uint32_t drop_threshold = 0;
  float keep_scale = 1.f;
};

struct Problem {
  DType dtype;
  int64_t batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, head_dim_v;
  float scale;
  Variants variants;
};

struct ForwardArgs {
  Problem p;
  Strided q, k, v, out;
  float* lse;  // (B, Hq, Lq) contiguous, natural log, -inf on rows that see no key
};

struct BackwardArgs {
  Problem p;
  Strided q, k, v, out, dout, dq, dk, dv;
  const float* lse;   // (B, Hq, Lq) contiguous, as returned by the forward
  const float* dlse;  // (B, Hq, Lq) contiguous gradient of lse
  float* delta;       // (B, Hq, Lq) scratch: rowsum(dO * O) - dlse, written by the dq pass
  // float32 gradient of the bias, the broadcast (B, Hq, Lq, Lk) view of a zeroed buffer of the
  // bias's own shape (stride 0 along broadcast dims, where terms are summed); data null: none.
  Strided dbias;
};

// Task counts: the binding runs tasks [0, n) in parallel; each kernel call gets a range.
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t forward_tasks(const Problem& p) { return p.batch * p.heads_q * ceil_div(p.seqlen_q, kBlockM); }
inline int64_t dq_tasks(const Problem& p) { return forward_tasks(p); }
// dK/dV tasks own (batch, key/value head, key block) triples. With a bias gradient every element
// of dbias must have one writer too, so along a dim where the bias is broadcast (dbias stride 0)
// one task covers the whole dim, in a fixed order: the split is then 1 along it.
struct DkdvSplit {
  int64_t batches, heads, blocks;
};
inline DkdvSplit dkdv_split(const Problem& p, const Strided& dbias) {
  const bool owned = dbias.data != nullptr;
  return {owned && dbias.batch == 0 ? 1 : p.batch, owned && dbias.head == 0 ? 1 : p.heads_kv,
          owned && dbias.col == 0 ? 1 : ceil_div(p.seqlen_k, kBlockN)};
}
inline int64_t dkdv_tasks(const Problem& p, const Strided& dbias) {
  const DkdvSplit split = dkdv_split(p, dbias);
  return split.batches * split.heads * split.blocks;
}
inline int64_t fused_tasks(const Problem& p) { return p.batch * p.heads_kv; }

// One instruction set's kernels. Every task writes only its own rows of the outputs (dk/dv of
// a key block are summed over the query heads of its group inside the task), so results are
// bitwise independent of how tasks are spread over threads.
struct Kernels {
  const char* isa;
  void (*forward)(const ForwardArgs&, int64_t begin, int64_t end);
  // Backward, two-pass schedule (see backward.h). Pass 1, dq_tasks: dq for a block of query
  // rows, also writing delta for them. Pass 2, dkdv_tasks: dk and dv for a block of keys.
  void (*backward_dq)(const BackwardArgs&, int64_t begin, int64_t end);
  void (*backward_dkdv)(const BackwardArgs&, int64_t begin, int64_t end);
  // Backward, one-pass schedule: delta (dq_tasks), then dq, dk and dv per (batch, key/value
  // head) (fused_tasks). Same gradients, bit for bit, with fewer products.
  void (*backward_delta)(const BackwardArgs&, int64_t begin, int64_t end);
  void (*backward_fused)(const BackwardArgs&, int64_t begin, int64_t end);
};

const Kernels& portable_kernels();
// nullptr when this build has no AVX2 kernels (non-x86 or a compiler without target pragmas).
const Kernels* avx2_kernels();

}  // namespace fused_attn::cpu
