// What the CPU kernels receive: raw pointers, sizes and element strides, no torch types.
//
// The kernels are compiled once per instruction set (kernels_portable.cpp, kernels_avx2.cpp) and
// see only this header and ATen's header-only vector library; the torch binding (binding.cpp)
// turns tensors into these structs and picks the instruction set at run time.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

#include "../common/views.h"

namespace fused_attn::cpu {

// Queries per task and keys per inner step. Scratch per thread is a few tiles of this size, so
// memory stays O(L): the Lq x Lk score matrix never exists.
constexpr int64_t kBlockM = 64;
constexpr int64_t kBlockN = 64;

using fused_attn::ceil_div;
using fused_attn::DType;
using fused_attn::RowValues;
using fused_attn::Strided;

// The variants of the scores, all off by default. Query i of head (b, h) and key j are at
// distance d = j - (i + shift), shift being 0, or Lk - Lq with bottom_right (per sequence, see
// Problem::shift); their score is
//   s = softcap * tanh(scale q.k / softcap) - slope(b, h) |d| + bias(b, h, i, j)
// (softcap 0: no tanh), and key j is hidden from query i (score -inf) when d < -window_left or
// d > window_right (a bound of -1: unbounded; causal is window_right = 0) or mask(b, h, i, j) is
// false. The mask and bias are broadcast views of (B, Hq, Lq, Lk): stride 0 along broadcast dims.
struct Variants {
  int64_t window_left = -1, window_right = -1;
  bool bottom_right = false;
  float softcap = 0.f;
  const float* alibi_slopes = nullptr;  // slope(b, h) = alibi_slopes[b * slopes_batch + h * slopes_head]
  int64_t slopes_batch = 0, slopes_head = 0;
  Strided mask{nullptr, 0, 0, 0, 0};  // bool; data null: none
  Strided bias{nullptr, 0, 0, 0, 0};  // data null: none
  DType bias_dtype = DType::Float32;   // the bias's: float32, or q's dtype
  // Dropout (fused_attn/dropout.py): probability (b, h, i, j) is kept iff the first word of
  // Philox4x32-7 on counter (j, i, b * Hq + h, 0) under key dropout_seed is >= drop_threshold,
  // and kept ones are scaled by keep_scale = 1 / (1 - p). The lse is that of the undropped scores.
  // i and j count from the sequence's first row, so packed sequences draw what they would alone.
  bool dropout = false;
  uint64_t dropout_seed = 0;
  uint32_t drop_threshold = 0;
  float keep_scale = 1.f;
};

// One call. Kernels work on one sequence at a time (sequence(), below), whose view has that
// sequence's lengths in seqlen_q and seqlen_k; in the call's own Problem they are the dense
// lengths, or for packed batches the longest sequences' (they size the scratch), and for KV
// caches seqlen_k is the capacity.
struct Problem {
  DType dtype;
  int64_t batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, head_dim_v;
  float scale;
  Variants variants;
  // Packed (varlen) batches: sequence b is rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1 of q
  // and likewise of k (int32, B + 1 entries). KV caches: sequence b sees the first seqlens_k[b]
  // keys of its cache. Null otherwise.
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;
  const int32_t* seqlens_k = nullptr;
  // Key/value heads per forward task: 1, or, for decoding from K and V whose rows of a key lie side
  // by side for every head (the binding's decoding_kv_heads), all of them, so that a task reads
  // each key's rows in memory order (forward.h, decoding_step).
  int64_t kv_heads_per_task = 1;

  // Query i is aligned with key i + shift (a sequence's view: its own lengths).
  int64_t shift() const { return variants.bottom_right ? seqlen_k - seqlen_q : 0; }
};

// Tasks of one kind, listed sequence by sequence: those of sequence b are [first[b], first[b + 1]),
// so the tasks of a packed batch cover its real lengths only (the binding builds the table).
struct TaskTable {
  const int64_t* first = nullptr;  // B + 1 entries, from 0
  int64_t sequences = 0;

  int64_t count() const { return first[sequences]; }
};

// A task's sequence and its index among that sequence's tasks.
struct TaskAt {
  int64_t sequence, index;
};
inline TaskAt locate(const TaskTable& table, int64_t task) {
  const int64_t b = std::upper_bound(table.first, table.first + table.sequences + 1, task) - table.first - 1;
  return {b, task - table.first[b]};
}

// A paged KV cache (pages, page_size, Hkv, D), addressed as the Strided (pages, Hkv, page_size,
// D): key j of sequence b is row j % size of page table[b * table_stride + j / size].
struct Pages {
  const int32_t* table = nullptr;  // null: not paged
  int64_t table_stride = 0, size = 0;
};

// Split-KV decoding: a KV-cache sequence's keys cut into splits of `keys` keys (a multiple of
// kBlockN), each its own task, which leaves its rows' unnormalised output, running max and sum
// here for merge_splits to combine. Element (b, h, i, split) of the (B, Hq, Lq, count) tensors
// `max` and `sum` is at ((b * Hq + h) * Lq + i) * count + split; the output row's Dv floats of
// `acc` start at that index times Dv. keys 0: no split.
struct Splits {
  int64_t keys = 0, count = 1;
  float *acc = nullptr, *max = nullptr, *sum = nullptr;

  int64_t of(int64_t seqlen_k) const { return keys == 0 ? 1 : std::max<int64_t>(1, ceil_div(seqlen_k, keys)); }
};

struct ForwardArgs {
  Problem p;
  Strided q, k, v, out;
  RowValues lse;  // natural log, -inf on rows that see no key
  TaskTable tasks;  // query_tiling's tasks of every sequence, times its splits
  Pages pages;  // k and v of a paged KV cache
  Splits splits;
  // The backward will recompute these scores with its block products and P = exp(S - lse) against
  // this lse: the forward computes them the same way (never as the dot products of few queries,
  // whose sums run in another order), so both round every score alike.
  bool for_backward = false;
};

struct BackwardArgs {
  Problem p;
  Strided q, k, v, out, dout, dq, dk, dv;
  RowValues lse, dlse;  // as returned by the forward, and the gradient of lse
  RowValues delta;      // scratch: rowsum(dO * O) - dlse, written by the dq (or delta) pass
  // Gradient of the bias, the broadcast (B, Hq, Lq, Lk) view of a zeroed buffer of the bias's own
  // shape (stride 0 along broadcast dims, where terms are summed); data null: none. float32, or
  // the bias's 16-bit dtype where every element gets one term (no broadcast dim over size 1).
  Strided dbias;
  DType dbias_dtype;
  TaskTable query_tasks;  // per sequence: (query head, query block) pairs
  TaskTable key_tasks;    // per group of sequences (dkdv_split): (key/value head, key block) tasks
};

// Where sequence b's rows start in the (packed) tensors, and its lengths.
struct SequenceRows {
  int64_t start_q, start_k, seqlen_q, seqlen_k;
};
inline SequenceRows sequence_rows(const Problem& p, int64_t b) {
  if (p.cu_seqlens_q != nullptr)
    return {p.cu_seqlens_q[b], p.cu_seqlens_k[b], p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b],
            p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b]};
  return {0, 0, p.seqlen_q, p.seqlens_k != nullptr ? p.seqlens_k[b] : p.seqlen_k};
}

inline Strided from_row(const Strided& s, int64_t row, DType dtype) {
  const int64_t bytes = dtype == DType::Float32 ? 4 : 2;
  return {static_cast<char*>(s.data) + row * s.row * bytes, s.batch, s.head, s.row, s.col};
}
inline RowValues from_row(const RowValues& r, int64_t row) { return {r.data + row, r.batch, r.head}; }

// Sequence b of a call as a problem of its own: its lengths, and the tensors starting at its
// first rows. Kernels index the view with b and local rows (which also feed the dropout
// counters and ALiBi distances); for dense inputs it is the call itself.
inline ForwardArgs sequence(const ForwardArgs& a, int64_t b) {
  const SequenceRows r = sequence_rows(a.p, b);
  ForwardArgs s = a;
  s.p.seqlen_q = r.seqlen_q;
  s.p.seqlen_k = r.seqlen_k;
  for (Strided* t : {&s.q, &s.out}) *t = from_row(*t, r.start_q, a.p.dtype);
  for (Strided* t : {&s.k, &s.v}) *t = from_row(*t, r.start_k, a.p.dtype);  // start 0 in a KV cache
  s.lse = from_row(a.lse, r.start_q);
  return s;
}
inline BackwardArgs sequence(const BackwardArgs& a, int64_t b) {
  const SequenceRows r = sequence_rows(a.p, b);
  BackwardArgs s = a;
  s.p.seqlen_q = r.seqlen_q;
  s.p.seqlen_k = r.seqlen_k;
  for (Strided* t : {&s.q, &s.out, &s.dout, &s.dq}) *t = from_row(*t, r.start_q, a.p.dtype);
  for (Strided* t : {&s.k, &s.v, &s.dk, &s.dv}) *t = from_row(*t, r.start_k, a.p.dtype);
  for (RowValues* t : {&s.lse, &s.dlse, &s.delta}) *t = from_row(*t, r.start_q);
  return s;
}

// How the forward cuts one sequence's queries into tasks, each on one key/value head: blocks of
// up to kBlockM query rows of one query head; or, when the whole sequence fits a block (decoding,
// short packed sequences), all its rows for several query heads of the group at once, so that
// K and V are read once for them and the block is not mostly padding. With p.kv_heads_per_task > 1
// (decoding) a task takes the whole groups of that many key/value heads (their rows fit one block:
// the binding sees to it).
struct QueryTiling {
  int64_t heads;   // query heads per task
  int64_t chunks;  // tasks across the group's heads
  int64_t blocks;  // query blocks
};
inline QueryTiling query_tiling(const Problem& p, int64_t seqlen_q) {
  const int64_t group = p.heads_q / p.heads_kv;
  if (p.kv_heads_per_task > 1) return {p.kv_heads_per_task * group, 1, 1};
  const int64_t fit = seqlen_q == 0 ? 1 : std::clamp<int64_t>(kBlockM / seqlen_q, 1, group);
  const int64_t chunks = ceil_div(group, fit);
  return {ceil_div(group, chunks), chunks, ceil_div(seqlen_q, kBlockM)};  // chunks of even size
}
inline int64_t forward_tasks(const Problem& p, int64_t seqlen_q) {
  const QueryTiling tiling = query_tiling(p, seqlen_q);
  return p.heads_kv / p.kv_heads_per_task * tiling.chunks * tiling.blocks;
}
// Split-KV for KV caches: a call with few tasks (too few to keep a many-core CPU busy) cuts every
// sequence's keys into splits so that there are about kSplitTarget tasks. The split depends on
// the call alone (shapes and lengths), never on the thread count, so results stay bitwise
// independent of it.
// Splits are at least kMinSplitKeys keys of one key/value head long, so that a task's own costs
// (loading its queries, storing partials, the merge) stay small next to reading its keys; a task of
// several heads (Problem::kv_heads_per_task) reads as many times more per key, but splits shorter
// than kMinStreamKeys, each a stream of keys that starts cold, were slower (Zen 5 EPYC, 2 threads,
// Hkv = 8, 1k-4k keys: splits of 128 keys 1.2-1.3x slower than of 512 or 1024).
constexpr int64_t kSplitTarget = 64;
constexpr int64_t kMinSplitKeys = 16 * kBlockN;
constexpr int64_t kMinStreamKeys = 8 * kBlockN;
inline int64_t split_keys(int64_t tasks, int64_t longest_k, int64_t kv_heads_per_task) {
  const int64_t shortest = std::max(kMinStreamKeys, kMinSplitKeys / kv_heads_per_task);
  const int64_t wanted = std::min(ceil_div(kSplitTarget, std::max<int64_t>(tasks, 1)), longest_k / shortest);
  if (wanted <= 1) return 0;
  return ceil_div(ceil_div(longest_k, wanted), kBlockN) * kBlockN;
}

// The backward's dq (and delta) tasks: (query head, query block) pairs.
inline int64_t dq_tasks(const Problem& p, int64_t seqlen_q) { return p.heads_q * ceil_div(seqlen_q, kBlockM); }

// dK/dV tasks own (sequence, key/value head, key block) triples. With a bias gradient (dense
// inputs only) every element of dbias must have one writer too, so along a dim where the bias is
// broadcast (dbias stride 0) one task covers the whole dim, in a fixed order: the split is then 1
// along it, and key_tasks has one group of sequences (all of them) instead of one per sequence.
struct DkdvSplit {
  bool batches, heads, blocks;  // whether tasks split that dim
};
inline DkdvSplit dkdv_split(const Strided& dbias) {
  const bool owned = dbias.data != nullptr;
  return {!owned || dbias.batch != 0, !owned || dbias.head != 0, !owned || dbias.col != 0};
}
// The one-pass schedule's tasks are whole (sequence, key/value head) pairs. They own their dbias
// elements when dbias is not broadcast across such pairs, and sum each element's terms in the
// two-pass order unless keys are broadcast (a two-pass task then visits its key blocks in
// balanced_block order, a one-pass task in sequence).
inline bool one_pass_owns_dbias(const Problem& p, const Strided& dbias) {
  if (dbias.data == nullptr) return true;
  return (dbias.batch != 0 || p.batch == 1) && (dbias.head != 0 || p.heads_kv == 1) && dbias.col != 0;
}
inline int64_t dkdv_tasks(const Problem& p, const DkdvSplit& split, int64_t seqlen_k) {
  return (split.heads ? p.heads_kv : 1) * (split.blocks ? ceil_div(seqlen_k, kBlockN) : 1);
}

// FUSED_ATTN_CPU_BF16 (read at every call): the fastest bf16 products the kernels may use
// (bf16.h). Unset means amx, the fastest there is; the binding rejects other values before any
// kernel runs.
enum class Bf16Cap { amx, dot, fp32, invalid };
inline Bf16Cap bf16_cap() {
  const char* env = std::getenv("FUSED_ATTN_CPU_BF16");
  if (env == nullptr || std::strcmp(env, "amx") == 0) return Bf16Cap::amx;
  if (std::strcmp(env, "dot") == 0) return Bf16Cap::dot;
  if (std::strcmp(env, "fp32") == 0) return Bf16Cap::fp32;
  return Bf16Cap::invalid;
}

// One instruction set's kernels. Every task writes only its own rows of the outputs (dk/dv of
// a key block are summed over the query heads of its group inside the task), so results are
// bitwise independent of how tasks are spread over threads.
struct Kernels {
  const char* isa;
  // The products bf16 forwards take now (bf16.h): "amx", "avx512-bf16" or "fp32".
  const char* (*bf16_products)();
  // Whether a bf16 backward with head dims (D, Dv) takes bf16 products: then only the one-pass schedule.
  bool (*bf16_backward_takes_products)(int64_t D, int64_t Dv);
  void (*forward)(const ForwardArgs&, int64_t begin, int64_t end);  // tasks: args.tasks
  // With args.splits: out and lse of (b, h) pairs [begin, end) from their splits' partials.
  void (*merge_splits)(const ForwardArgs&, int64_t begin, int64_t end);
  // Backward, two-pass schedule (see backward.h). Pass 1, query_tasks: dq for a block of query
  // rows, also writing delta for them. Pass 2, key_tasks: dk and dv for a block of keys.
  void (*backward_dq)(const BackwardArgs&, int64_t begin, int64_t end);
  void (*backward_dkdv)(const BackwardArgs&, int64_t begin, int64_t end);
  // Backward, one-pass schedule: delta (query_tasks), then dq, dk and dv per (sequence,
  // key/value head), B * Hkv tasks. Same gradients, bit for bit, with fewer products.
  void (*backward_delta)(const BackwardArgs&, int64_t begin, int64_t end);
  void (*backward_fused)(const BackwardArgs&, int64_t begin, int64_t end);
};

const Kernels& portable_kernels();
// nullptr when this build has no such kernels (another architecture than x86-64).
const Kernels* avx2_kernels();
const Kernels* avx512_kernels();

}  // namespace fused_attn::cpu
