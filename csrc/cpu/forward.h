// Forward: out = softmax(S) V and lse, S the scores of scale * Q K^T (scores.h). A task is a
// block of up to kBlockM query rows of one sequence and key/value head (params.h, query_tiling):
// one query head's rows, or all rows of several heads of the group when the sequence is short
// (decoding from a (B, L, Hkv, D) cache: of every key/value head).
//
// Scores are computed transposed, S^T = K Q^T (then scaled), so that each query is a column: the
// online softmax then runs along columns with one vector holding kVec queries' running max and
// sum, and Q^T is packed once per task while K and V are read block by block as rows (through
// the page table of a paged KV cache). bf16 with the bf16 products (bf16.h: AMX tiles or AVX512-BF16
// dot products) computes S itself, a query per row, because the products take the bf16 P they
// multiply with V as row-major A: S = Q K^T from K^T packed once per thread (PackedKeys), steps of
// up to 512 keys, a row softmax, P rounded to bf16. Decoding (few queries, no backward to follow)
// computes S too, as dot products along D (decoding_step).
// Included by kernels.h inside namespace fused_attn::cpu::FUSED_ATTN_ISA.

// One step of the online softmax's running max, per lane: m' = max(m, block max); the shift that
// exp() subtracts, 0 while nothing is visible (m' = -inf), which keeps exp() at 0 instead of
// exp(-inf + inf) = NaN; and alpha = exp(m - m'), the rescale of what came before.
struct MaxStep {
  Vec max, shift, alpha;
};
inline MaxStep max_step(Vec old_max, Vec block_max) {
  const Vec new_max = at::vec::maximum(old_max, block_max);
  const Vec shift = Vec::blendv(new_max, Vec(0.f), new_max == Vec(-kInf));
  return {new_max, shift, exp(old_max - shift)};
}

// max over keys [lo, hi) of the kVec columns of S^T (keys x cols) at st: four maxima in flight, as
// each step of at::vec::maximum waits on the last (NaN-propagating: ~5 cycles), and one chain made
// this loop ~6% of a forward. The maximum is exact, so the order does not change it.
inline Vec column_max(const float* st, int64_t cols, int64_t lo, int64_t hi) {
  Vec m[4] = {Vec(-kInf), Vec(-kInf), Vec(-kInf), Vec(-kInf)};
  int64_t j = lo;
  for (; j + 4 <= hi; j += 4)
    for (int r = 0; r < 4; ++r) m[r] = at::vec::maximum(m[r], Vec::loadu(st + (j + r) * cols));
  for (; j < hi; ++j) m[0] = at::vec::maximum(m[0], Vec::loadu(st + j * cols));
  return at::vec::maximum(at::vec::maximum(m[0], m[1]), at::vec::maximum(m[2], m[3]));
}

// Online softmax over one key block, for the `cols` query columns of S^T (keys x cols), of
// inputs of type T (probability_exp):
//   m' = max(m, max_j s_j);  p_j = exp(s_j - m');  l' = l exp(m - m') + sum_j p_j.
// S^T is overwritten with P^T, and alpha = exp(m - m') is left for rescaling the accumulator.
// A column with nothing visible yet keeps m = -inf (max_step). With a band (a tile the window cuts), each kVec columns
// work only on the keys some of them may see, and set P = 0 on the rest (hidden: exp(-inf)).
template <typename T>
void softmax_update(float* st, int64_t keys, int64_t cols, float* row_max, float* row_sum, float* alpha,
                    const Band* band = nullptr) {
  for (int64_t c = 0; c < cols; c += kVec) {
    int64_t lo = 0, hi = keys;
    if (band != nullptr) {
      const auto [first, last] = band->keys_seen()(c, kVec);
      lo = std::clamp<int64_t>(first, 0, keys);
      hi = std::clamp<int64_t>(last, lo, keys);
      for (int64_t j = 0; j < lo; ++j) Vec(0.f).store(st + j * cols + c);
      for (int64_t j = hi; j < keys; ++j) Vec(0.f).store(st + j * cols + c);
    }
    const MaxStep step = max_step(Vec::loadu(row_max + c), column_max(st + c, cols, lo, hi));
    Vec sum(0.f);
    for (int64_t j = lo; j < hi; ++j) {
      const Vec prob = probability_exp<T>(Vec::loadu(st + j * cols + c) - step.shift);
      prob.store(st + j * cols + c);
      sum = sum + prob;
    }
    at::vec::fmadd(Vec::loadu(row_sum + c), step.alpha, sum).store(row_sum + c);
    step.max.store(row_max + c);
    step.alpha.store(alpha + c);
  }
}

// The query rows of one forward task: heads h0 .. h0 + heads - 1, rows [q0, q0 + rows) of each;
// head g's rows are the columns [g * rows, (g + 1) * rows) of the task's S^T. They are those of
// key/value heads hk .. hk + kv_heads - 1 (more than one: Problem::kv_heads_per_task, decoding).
struct QueryBlock {
  int64_t hk, h0, heads, q0, rows, kv_heads;
};
inline QueryBlock query_block(const Problem& p, int64_t index) {
  const QueryTiling tiling = query_tiling(p, p.seqlen_q);
  const int64_t group = p.heads_q / p.heads_kv, kv_heads = p.kv_heads_per_task;
  const int64_t per_head = tiling.chunks * tiling.blocks, hk = index / per_head * kv_heads;
  const int64_t chunk = index % per_head / tiling.blocks;
  const int64_t q0 = balanced_block(index % tiling.blocks, tiling.blocks) * kBlockM;
  const int64_t h0 = hk * group + chunk * tiling.heads;
  const int64_t heads = std::min(tiling.heads, (hk + kv_heads) * group - h0);
  return {hk, h0, heads, q0, std::min(kBlockM, p.seqlen_q - q0), kv_heads};
}

// Whether the mask hides keys [k0, k0 + keys) from every query of the block: then the key block
// adds nothing to the block's rows (p = 0 throughout) and is skipped.
inline bool masked_for_every_head(const Problem& p, int64_t b, const QueryBlock& block, int64_t k0, int64_t keys) {
  for (int64_t g = 0; g < block.heads; ++g)
    if (!mask_hides_tile(p, b, block.h0 + g, block.q0, block.rows, k0, keys)) return false;
  return true;
}

// The keys of a step [k0, k0 + keys) that it computes (k0 a multiple of kBf16ChunkN): whole chunks of
// kBf16ChunkN keys that the mask hides from every query of the block are cut from both ends, as a
// padding mask's hidden suffix is. Empty when every chunk is hidden (a step of the fp32 products,
// kBlockN keys, is one chunk).
static_assert(kBlockN == kBf16ChunkN, "an fp32 step is one chunk of unmasked_chunks");
inline Range unmasked_chunks(const Problem& p, int64_t b, const QueryBlock& block, int64_t k0, int64_t keys) {
  Range used{k0, k0 + keys};
  if (p.variants.mask.data == nullptr) return used;
  while (used.begin < used.end &&
         masked_for_every_head(p, b, block, used.begin, std::min(kBf16ChunkN, used.end - used.begin)))
    used.begin = std::min(used.begin + kBf16ChunkN, used.end);
  while (used.end - used.begin > kBf16ChunkN) {  // the first chunk left is visible: cut from the end
    const int64_t last = used.begin + (used.end - 1 - used.begin) / kBf16ChunkN * kBf16ChunkN;  // the last chunk's first key
    if (!masked_for_every_head(p, b, block, last, used.end - last)) break;
    used.end = last;
  }
  return used;
}

// A split task's rows: the unnormalised output (acc, rows of ld floats), running max and sum.
inline void store_partials(const ForwardArgs& args, int64_t b, const QueryBlock& block, int64_t split,
                           const float* acc, int64_t ld, const float* row_max, const float* row_sum) {
  const Splits& splits = args.splits;
  const int64_t Dv = args.p.head_dim_v;
  for (int64_t g = 0; g < block.heads; ++g)
    for (int64_t i = 0; i < block.rows; ++i) {
      const int64_t col = g * block.rows + i;
      const int64_t at = ((b * args.p.heads_q + block.h0 + g) * args.p.seqlen_q + block.q0 + i) * splits.count + split;
      splits.max[at] = row_max[col];
      splits.sum[at] = row_sum[col];
      std::copy(acc + col * ld, acc + col * ld + Dv, splits.acc + at * Dv);
    }
}

// Q^T of the block (D x ld), zero in the columns past its queries: the rows converted into `rows`
// (cols x D), then transposed by load_transposed (which reads them in place), so Q is read once
// along its rows instead of once per column.
template <typename T>
void load_queries_t(float* qt, int64_t ld, float* rows, const Strided& q, int64_t b, const QueryBlock& block,
                    int64_t D) {
  const int64_t cols = block.heads * block.rows;
  for (int64_t g = 0; g < block.heads; ++g)
    load_tile(rows + g * block.rows * D, D, at_row<T>(q, b, block.h0 + g, block.q0), q.row, q.col, block.rows, D);
  load_transposed<float>(qt, ld, rows, D, 1, cols, D, nullptr);
}

// Q of the block as rows (at least kVec x D) for decoding's scores: row c is the block's query c
// (head g's rows at [g * rows, (g + 1) * rows)), and rows past its queries are zero. In fp32 for
// FloatDots; in bf16, as they are, for Bf16Dots (T = TQ = Bf16).
template <typename T, typename TQ>
void load_query_rows(TQ* qr, const Strided& q, int64_t b, const QueryBlock& block, int64_t D) {
  for (int64_t g = 0; g < block.heads; ++g) {
    TQ* rows = qr + g * block.rows * D;
    if constexpr (std::is_same_v<TQ, float>) {
      load_tile(rows, D, at_row<T>(q, b, block.h0 + g, block.q0), q.row, q.col, block.rows, D);
    } else {
      for (int64_t i = 0; i < block.rows; ++i) {
        const T* src = at_row<T>(q, b, block.h0 + g, block.q0 + i);
        for (int64_t d = 0; d < D; ++d) rows[i * D + d] = static_cast<float>(src[d * q.col]);  // exact for bf16
      }
    }
  }
  const int64_t cols = block.heads * block.rows;
  if (cols < kVec) std::fill(qr + cols * D, qr + kVec * D, TQ(0.f));
}

// The block's query rows in bf16 (cols x D, unscaled: the scale is applied to the fp32 scores),
// head g's rows at [g * rows, (g + 1) * rows), for the bf16 products: one head's rows where they lie
// when bf16_rows can read them in place, else gathered into dst.
inline Bf16Rows query_rows(Bf16* dst, const Strided& q, int64_t b, const QueryBlock& block, int64_t D) {
  if (block.heads == 1) return bf16_rows(dst, q, Pages{}, b, block.h0, block.q0, block.rows, D, false);
  for (int64_t g = 0; g < block.heads; ++g)
    for (int64_t i = 0; i < block.rows; ++i) {
      const Bf16* src = at_row<Bf16>(q, b, block.h0 + g, block.q0 + i);
      Bf16* row = dst + (g * block.rows + i) * D;
      for (int64_t d = 0; d < D; ++d) row[d] = src[d * q.col];
    }
  return {dst, D};
}

// K^T and V of one (sequence, key/value head), packed for the bf16 products block by block (bn keys)
// and kept while a thread's consecutive tasks share them (tasks run through a head's query blocks in
// turn), so each key is packed once per thread instead of once per query block. The blocks lie back
// to back in one layout, so a run of keys across a block boundary is one operand of each product: a
// window's keys are one step of the forward wherever they start. A sequence whose packed keys would
// pass kMaxBytes keeps one block at a time, and a run must then stay inside a block (whole()).
class PackedKeys {
 public:
  // Keys [k0, k0 + n) as the products read them (k0 a multiple of kBf16ChunkN): K^T in chunks of
  // kBf16ChunkN keys from kt on, each D deep (the sequence's last chunk narrower, its keys padded to 16
  // with zero columns); V as Bf16Products::gemm's packed B with packed_depth = depth, first = first.
  struct Run {
    const Bf16* kt;
    const Bf16* v;
    int64_t depth, first;
  };
  static constexpr int64_t kMaxBytes = int64_t{16} << 20;

  PackedKeys(const Bf16Products& products, int64_t D, int64_t Dv, int64_t bn, int64_t seqlen_k)
      : products_(products),
        D_(D), Dv_(Dv), bn_(bn),
        whole_(2 * seqlen_k * (D + Dv) <= kMaxBytes),
        slots_(whole_ ? std::max<int64_t>(1, ceil_div(seqlen_k, bn)) : 1),
        depth_(slots_ * bn),
        scratch_(Scratch::size_of({Scratch::halves(bn * std::max(D, Dv)), Scratch::halves(D * bn),
                                   Scratch::halves(depth_ * D), Scratch::halves(depth_ * Dv), 2 * slots_})),
        rows_(scratch_.take_halves(bn * std::max(D, Dv))),
        staging_(scratch_.take_halves(D * bn)),
        kt_(scratch_.take_halves(depth_ * D)),
        v_(scratch_.take_halves(depth_ * Dv)),
        owner_(reinterpret_cast<int64_t*>(scratch_.take(2 * slots_))) {
    std::fill(owner_, owner_ + slots_, int64_t{-1});
  }

  // Whether every block stays packed, so that runs may cross block boundaries.
  bool whole() const { return whole_; }

  // Keys [k0, k0 + n) of (b, hk) of the sequence view s, packing the blocks that hold them (a
  // block's keys up to the sequence's own end: the layout's rows past it are never read).
  Run get(const ForwardArgs& s, int64_t b, int64_t hk, int64_t k0, int64_t n) {
    if (b != b_ || hk != hk_) {
      std::fill(owner_, owner_ + slots_, int64_t{-1});
      b_ = b;
      hk_ = hk;
    }
    for (int64_t block = k0 / bn_; block * bn_ < k0 + n; ++block) pack(s, b, hk, block);
    const int64_t first = whole_ ? k0 : k0 % bn_;  // k0's place in the layout
    return {kt_ + first * D_, v_, depth_, first};
  }

 private:
  void pack(const ForwardArgs& s, int64_t b, int64_t hk, int64_t block) {
    const int64_t slot = whole_ ? block : 0, k0 = block * bn_, at = slot * bn_;
    if (owner_[slot] == k0) return;
    const int64_t keys = std::min(bn_, s.p.seqlen_k - k0);
    const Bf16Rows k_rows = bf16_rows(rows_, s.k, s.pages, b, hk, k0, keys, D_, false);
    products_.pack_transposed(k_rows.data, k_rows.ld, keys, D_, round_up(keys, 16), staging_, kt_ + at * D_);
    const Bf16Rows v_rows = bf16_rows(rows_, s.v, s.pages, b, hk, k0, keys, Dv_, true);
    products_.pack_columns(v_rows.data, v_rows.ld, round_up(keys, 2), Dv_, v_, depth_, at);
    owner_[slot] = k0;
  }

  const Bf16Products& products_;
  const int64_t D_, Dv_, bn_;
  const bool whole_;
  const int64_t slots_, depth_;  // blocks kept, and the keys they hold
  Scratch scratch_;
  Bf16* const rows_;     // K or V rows that cannot be read in place
  Bf16* const staging_;  // K^T before packing
  Bf16* const kt_;       // K^T of the kept blocks, packed: chunk of key k at kt_ + k * D_
  Bf16* const v_;        // V of the kept blocks, packed: column chunk c0 at v_ + c0 * depth_
  int64_t* const owner_;  // the first key of each slot's block, -1: none
  int64_t b_ = -1, hk_ = -1;
};

// Online softmax over one key block for the rows of S (rows x ld, keys along rows; the bf16
// products' and decoding's orientation), scores mul * S of inputs of type T: the same update as
// softmax_update, one query per row, keys past `keys` (up to a whole pair of vectors) hidden. P
// goes to `rounded` in bf16 (same ld) when it is given, else stays in S as fp32 (for dropout,
// which is applied before rounding, and for decoding's fp32 P V). The
// per-row state is updated kVec rows at a time (rows <= kBlockM). With a band (a tile the window
// cuts), each row works only on the pairs of vectors that hold keys it may see, and sets P = 0 on
// the rest (hidden, so exp(-inf) = 0 there anyway): a band of 257 keys spans 320 of a 64-row block.
// The bf16 products run only on CPUs with AVX512-BF16 (bf16_kind): P is rounded with
// vcvtne2ps2bf16, one instruction for 32 values (decoding passes no `rounded`: the function holds
// no other bf16 instruction, so it runs on any AVX-512 CPU).
template <typename T>
FUSED_ATTN_BF16_DOTS inline void softmax_update_rows(float* s, int64_t ld, int64_t rows, int64_t keys, float* row_max,
                                                     float* row_sum, float* alpha, float mul, Bf16* rounded,
                                                     const Band* band) {
  const int64_t padded = round_up(keys, 2 * kVec);
  const Vec scale(mul);
  float block_max[kBlockM] = {}, shift[kBlockM] = {}, block_sum[kBlockM] = {};  // rows past `rows`: unused
  // The keys row i works on: [lo, hi), whole pairs of vectors.
  int64_t lo[kBlockM], hi[kBlockM];
  for (int64_t i = 0; i < rows; ++i) {
    lo[i] = 0;
    hi[i] = padded;
    if (band != nullptr) {
      const auto [first, last] = band->keys_seen()(i, 1);
      std::tie(lo[i], hi[i]) = whole_units(first, last, padded, 2 * kVec);
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    float* row = s + i * ld;
    fill(row + keys, padded - keys, -kInf);
    // Two maxima in flight: each step of at::vec::maximum waits on the last (NaN-propagating).
    Vec m0(-kInf), m1(-kInf);
    for (int64_t j = lo[i]; j < hi[i]; j += 2 * kVec) {
      m0 = at::vec::maximum(m0, Vec::loadu(row + j));
      m1 = at::vec::maximum(m1, Vec::loadu(row + j + kVec));
    }
    block_max[i] = lane_max(at::vec::maximum(m0, m1)) * mul;
  }
  for (int64_t i = 0; i < rows; i += kVec) {
    const MaxStep step = max_step(Vec::loadu(row_max + i), Vec::loadu(block_max + i));
    step.shift.store(shift + i);
    step.alpha.store(alpha + i);
    step.max.store(row_max + i);
  }
  for (int64_t i = 0; i < rows; ++i) {
    float* row = s + i * ld;
    if (rounded != nullptr) {
      std::fill(rounded + i * ld, rounded + i * ld + lo[i], Bf16(0.f));
      std::fill(rounded + i * ld + hi[i], rounded + i * ld + padded, Bf16(0.f));
    } else {
      fill(row, lo[i], 0.f);
      fill(row + hi[i], padded - hi[i], 0.f);
    }
    const Vec row_shift(shift[i]);
    Vec sum(0.f);
    for (int64_t j = lo[i]; j < hi[i]; j += 2 * kVec) {
      const Vec p0 = probability_exp<T>(at::vec::fmsub(Vec::loadu(row + j), scale, row_shift));
      const Vec p1 = probability_exp<T>(at::vec::fmsub(Vec::loadu(row + j + kVec), scale, row_shift));
      sum = sum + p0 + p1;
      if (rounded != nullptr) {
#if defined(CPU_CAPABILITY_AVX512)
        _mm512_storeu_si512(rounded + i * ld + j, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(p1, p0)));
#else
        at::vec::convert_from_float<Bf16>(p0, p1).store(rounded + i * ld + j);
#endif
      } else {
        p0.store(row + j);
        p1.store(row + j + kVec);
      }
    }
    block_sum[i] = lane_sum(sum);
  }
  for (int64_t i = 0; i < rows; i += kVec)
    at::vec::fmadd(Vec::loadu(row_sum + i), Vec::loadu(alpha + i), Vec::loadu(block_sum + i)).store(row_sum + i);
}

// The row softmax of a step's unscaled S (rows x ld, a query per row: the bf16 products' and
// decoding's), keys [k0, k0 + keys) of the block's rows, head g's tile head_tile(g): the variants
// placed (place_scores), then softmax_update_rows, with `rounded` and `band` as it takes them. The
// softmax applies the scale itself where no variant adds to the scaled scores (masks and windows
// only set -inf) and the scale is positive, so that the largest raw score is the largest scaled
// one and no hidden key's -inf is multiplied by 0; else S is scaled (and capped) first.
template <typename T, typename HeadTile>
void row_softmax_step(const Problem& p, const QueryBlock& block, HeadTile head_tile, float* s, int64_t ld, int64_t keys,
                      float* row_max, float* row_sum, float* alpha, Bf16* rounded, const Band* band) {
  const Variants& v = p.variants;
  const int64_t cols = block.heads * block.rows;
  const bool scale_in_softmax =
      p.scale > 0.f && v.softcap == 0.f && v.alibi_slopes == nullptr && v.bias.data == nullptr;
  if (!scale_in_softmax)
    for (int64_t i = 0; i < cols; ++i) cap_scores(p, s + i * ld, round_up(keys, kVec), nullptr);
  for (int64_t g = 0; g < block.heads; ++g) place_scores(p, head_tile(g));
  softmax_update_rows<T>(s, ld, cols, keys, row_max, row_sum, alpha, scale_in_softmax ? p.scale : 1.f, rounded, band);
}

// One step of a forward task on the bf16 products, keys [k0, k0 + keys) (k0 a multiple of kBf16ChunkN), in
// S's orientation (a query per row, which the row-major bf16 P that the products take as A needs):
// S = Q K^T from the packed keys, its row softmax (row_softmax_step); then P rounded to bf16 and
// acc = alpha * acc + P V, which the task's first step writes as acc = P V (acc is zero before it:
// the same value, and a window's rows, which take one step, skip a pass over acc).
inline void bf16_key_step(const Problem& p, const ForwardArgs& s, int64_t b, const QueryBlock& block,
                          const Bf16Rows& q_rows, int64_t k0, int64_t keys, PackedKeys& packed, const Bf16Buffers& bf16,
                          float* st, int64_t ld, float* acc, int64_t ld_acc, float* row_max, float* row_sum,
                          float* alpha, bool first_step) {
  const int64_t D = p.head_dim, Dv = p.head_dim_v, cols = block.heads * block.rows;
  const PackedKeys::Run kv = packed.get(s, b, block.hk, k0, keys);
  // S over the chunks that hold the keys, as they were packed (the sequence's last one narrower);
  // the softmax hides the columns past `keys`. P V over the keys padded to even (a zero column of P).
  const int64_t width = std::min(round_up(keys, kBf16ChunkN), round_up(p.seqlen_k - k0, 16));
  auto head_tile = [&](int64_t g) {
    return ScoreTile{st + g * block.rows * ld, ld, 1, b, block.h0 + g, block.q0, block.rows, k0, keys};
  };
  // Where the window cuts the tile (a diagonal, a band's edges), the products take only the keys
  // that the rows of each of their row tiles may see; place_scores hides the scores they skip.
  const bool edge = block.heads == 1 && window_cuts(p, head_tile(0));
  const Band band{p, block.q0, k0};
  bf16.products.gemm_banded_columns(edge, cols, width, D, q_rows.data, q_rows.ld, kv.kt, st, ld, band.keys_seen(),
                                    -kInf);
  const Variants& v = p.variants;
  row_softmax_step<Bf16>(p, block, head_tile, st, ld, keys, row_max, row_sum, alpha, v.dropout ? nullptr : bf16.p,
                         edge ? &band : nullptr);
  if (v.dropout) {
    for (int64_t g = 0; g < block.heads; ++g) apply_dropout(p, head_tile(g));
    for (int64_t i = 0; i < cols; ++i) at::vec::convert(st + i * ld, bf16.p + i * ld, round_up(keys, 2 * kVec));
  }
  // (on an edge, P is zero outside the keys the rows see)
  bf16.products.gemm_banded_depth(edge, cols, Dv, round_up(keys, 2), bf16.p, ld, kv.v, first_step ? acc : bf16.pv,
                                  first_step ? ld_acc : Dv, false, band.keys_seen(), kv.depth, kv.first);
  if (first_step) return;
  for (int64_t i = 0; i < cols; ++i) {
    const Vec a(alpha[i]);
    for (int64_t c = 0; c < Dv; c += kVec)
      at::vec::fmadd(Vec::loadu(acc + i * ld_acc + c), a, Vec::loadu(bf16.pv + i * Dv + c)).store(acc + i * ld_acc + c);
  }
}

// acc = alpha * acc for the accumulator's rows (ld floats apart) whose alpha is not 1.
inline void rescale_rows(float* acc, int64_t ld, int64_t rows, const float* alpha) {
  for (int64_t i = 0; i < rows; ++i) {
    if (alpha[i] == 1.f) continue;
    const Vec a(alpha[i]);
    for (int64_t c = 0; c < ld; c += kVec) (Vec::loadu(acc + i * ld + c) * a).store(acc + i * ld + c);
  }
}

// Keys per step of a decoding task: a step's scores for every query, then its softmax and P V.
constexpr int64_t kDecodingKeys = 64;

// A decoding task's query rows (load_query_rows): fp32 ones for FloatDots, or bf16 ones for the
// AVX512-BF16 dot products (Bf16Dots: bf16 inputs on a CPU that has them, D a whole number of their
// steps), each with the other null.
struct DecodingQueries {
  const float* floats;
  const Bf16* bf16;
};

// S (cols x lds, a query per row) = Q K^T of keys [k0, k0 + keys) of a decoding step, of the keys
// the task sees, which end at `end`: dot products along D that read each key row once while the
// rows of later keys are asked for (tile.h): scores_of_few_queries for one key/value head (its rows
// in place, or converted or gathered into kb), kv_head_scores for several, key by key in memory
// order (every head's rows of a key side by side, in place: binding.cpp, decoding_kv_heads).
template <typename T>
void decoding_scores(const ForwardArgs& s, int64_t b, const QueryBlock& block, const DecodingQueries& q, int64_t k0,
                     int64_t keys, int64_t end, float* st, int64_t lds, float* kb) {
  const int64_t D = s.p.head_dim, Dv = s.p.head_dim_v, cols = block.heads * block.rows;
  if (block.kv_heads > 1) {
    // (each key's values are asked for as its scores are computed)
    const RowsAhead ahead{row_stream<T>(s.k, s.pages, b, block.hk, k0 + kKeysAheadInOrder, end, block.kv_heads * D),
                          row_stream<T>(s.v, s.pages, b, block.hk, k0, end, block.kv_heads * Dv)};
    const T* k = key_row<T>(s.k, s.pages, b, block.hk, k0);
    const int64_t per_head = cols / block.kv_heads;
    if (q.floats != nullptr) {
      scores_of_kv_heads<FloatDots<T>>(keys, D, k, s.k.row, s.k.head, block.kv_heads, q.floats, per_head, st, lds,
                                       ahead);
    } else {
#if defined(CPU_CAPABILITY_AVX512)
      scores_of_kv_heads<Bf16Dots>(keys, D, reinterpret_cast<const Bf16*>(k), s.k.row, s.k.head, block.kv_heads,
                                   q.bf16, per_head, st, lds, ahead);
#endif
    }
    return;
  }
  const RowsAhead ahead{row_stream<T>(s.k, s.pages, b, block.hk, k0 + kKeysAhead, end, D),
                        row_stream<T>(s.v, s.pages, b, block.hk, k0, end, Dv)};
  if (q.floats != nullptr) {
    with_key_rows<T>(kb, round_up(D, kVec), s.k, s.pages, b, block.hk, k0, keys, D, [&](const auto* k, int64_t ldk) {
      using Key = std::remove_const_t<std::remove_pointer_t<decltype(k)>>;
      scores_of_few_queries<FloatDots<Key>>(keys, D, k, ldk, q.floats, cols, st, lds, ahead);
    });
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    const Bf16Rows k = bf16_rows(reinterpret_cast<Bf16*>(kb), s.k, s.pages, b, block.hk, k0, keys, D, false);
    scores_of_few_queries<Bf16Dots>(keys, D, k.data, k.ld, q.bf16, cols, st, lds, ahead);
#endif
  }
}

// One step of a decoding task (forward_typed: few queries, no backward follows), keys
// [k0, k0 + keys) of those it sees, which end at `end`: S (decoding_scores); its row softmax
// (row_softmax_step); then acc = alpha * acc + P V in fp32, key/value head by head. kb and vb take
// key and value rows that cannot be read in place.
template <typename T>
void decoding_step(const ForwardArgs& s, int64_t b, const QueryBlock& block, const DecodingQueries& q, int64_t k0,
                   int64_t keys, int64_t end, float* st, int64_t lds, float* kb, float* vb, float* acc, int64_t ld_acc,
                   float* row_max, float* row_sum, float* alpha) {
  const Problem& p = s.p;
  const int64_t Dv = p.head_dim_v, cols = block.heads * block.rows;
  const int64_t per_head = cols / block.kv_heads;  // query rows per key/value head
  decoding_scores<T>(s, b, block, q, k0, keys, end, st, lds, kb);
  auto head_tile = [&](int64_t g) {
    return ScoreTile{st + g * block.rows * lds, lds, 1, b, block.h0 + g, block.q0, block.rows, k0, keys};
  };
  row_softmax_step<T>(p, block, head_tile, st, lds, keys, row_max, row_sum, alpha, nullptr, nullptr);
  if (p.variants.dropout)
    for (int64_t g = 0; g < block.heads; ++g) apply_dropout(p, head_tile(g));
  rescale_rows(acc, ld_acc, cols, alpha);
  for (int64_t h = 0; h < block.kv_heads; ++h) {
    const int64_t row = h * per_head;
    with_key_rows<T>(vb, ld_acc, s.v, s.pages, b, block.hk + h, k0, keys, Dv, [&](const auto* v, int64_t ldv) {
      gemm(per_head, ld_acc, keys, st + row * lds, lds, 1, v, ldv, acc + row * ld_acc, ld_acc, true);
    });
  }
}

template <typename T>
void forward_typed(const ForwardArgs& args, int64_t begin, int64_t end) {
  const int64_t D = args.p.head_dim, Dv = args.p.head_dim_v;
  const int64_t Dp = round_up(D, kVec), Dvp = round_up(Dv, kVec);
  // bf16 inputs on a CPU with bf16 products (bf16.h): both products from these bf16 buffers, made
  // when a task first takes them (a decoding call's tasks never do).
  Bf16Kind kind = Bf16Kind::none;
  if constexpr (std::is_same_v<T, Bf16>) kind = bf16_forward_kind(D, Dv);
  const bool products = kind != Bf16Kind::none;
  const int64_t BM = kBlockM, BN = products ? kBf16BlockN : kBlockN;
  std::unique_ptr<Bf16Buffers> bf16;
  std::unique_ptr<PackedKeys> packed_keys;
  // Decoding's scores as AVX512-BF16 dot products (Bf16Dots), which read bf16 keys as they are.
  const bool bf16_dots = kind != Bf16Kind::none && D % 32 == 0;
  static_assert(kDecodingKeys <= kBf16ChunkN && kDecodingKeys % (2 * kVec) == 0,
                "a decoding step fits the scratch tiles, its S rows hold whole pairs of vectors, and it is one chunk");
  Scratch scratch(Scratch::size_of({D * BM, BN * Dp, BN * Dvp, BN * BM, BM * Dvp, BM, BM, BM}));
  float* qt = scratch.take(D * BM);     // Q^T (D x ld): the block's query rows as columns
                                        // (or, decoding, Q: load_query_rows)
  float* kb = scratch.take(BN * Dp);    // key block, rows
  float* vb = scratch.take(BN * Dvp);   // value block, rows
  float* st = scratch.take(BN * BM);    // S^T, then P^T (keys x ld); S, then P, with the bf16 products or decoding
  float* acc = scratch.take(BM * Dvp);  // unnormalised output rows, one per query column
  float* row_max = scratch.take(BM);
  float* row_sum = scratch.take(BM);
  float* alpha = scratch.take(BM);

  for (int64_t task = begin; task < end; ++task) {
    const TaskAt at = locate(args.tasks, task);
    const int64_t b = at.sequence;
    const ForwardArgs s = sequence(args, b);
    const Problem& p = s.p;
    const int64_t splits = args.splits.of(p.seqlen_k), split = at.index % splits;
    const QueryBlock block = query_block(p, at.index / splits);
    const int64_t rows = block.rows, cols = block.heads * rows, ld = round_up(cols, kVec);
    // The score tile of head g of the block, in S^T.
    auto head_tile = [&](int64_t g, int64_t k0, int64_t keys) {
      return ScoreTile{st + g * rows, 1, ld, b, block.h0 + g, block.q0, rows, k0, keys};
    };

    // Decoding: few queries per block (per key/value head), whose scores are dot products
    // (decoding_step), unless a backward follows (ForwardArgs::for_backward). (A block of several
    // key/value heads always is: binding.cpp, decoding_kv_heads.)
    const bool few = !args.for_backward && cols / block.kv_heads <= kVec && D % kVec == 0;
    const bool tiles = products && !few;  // the bf16 products
    Bf16Rows q_rows{};
    DecodingQueries decoding{};
    if (few && bf16_dots) {
      load_query_rows<T>(reinterpret_cast<Bf16*>(qt), s.q, b, block, D);
      decoding.bf16 = reinterpret_cast<const Bf16*>(qt);
    } else if (few) {
      load_query_rows<T>(qt, s.q, b, block, D);
      decoding.floats = qt;
    } else if (tiles) {
      if (bf16 == nullptr) {
        bf16 = std::make_unique<Bf16Buffers>(kind, D, Dv, BM, BN);
        packed_keys = std::make_unique<PackedKeys>(bf16->products, D, Dv, BN, args.p.seqlen_k);
      }
      q_rows = query_rows(bf16->q_rows, s.q, b, block, D);
    } else {
      load_queries_t<T>(qt, ld, kb, s.q, b, block, D);  // kb: free until the key loop
    }
    fill(row_max, ld, -kInf);
    fill(row_sum, ld, 0.f);
    fill(acc, cols * Dvp, 0.f);

    Range visible = visible_keys(p, block.q0, rows);  // the same rows for every head
    if (args.splits.keys != 0) {
      visible.begin = std::max(visible.begin, split * args.splits.keys);
      visible.end = std::min(visible.end, (split + 1) * args.splits.keys);
    }
    // The bf16 products start at a chunk of packed keys (the keys before the first visible one are
    // hidden by the window), and their steps stay inside a packed block unless all are kept.
    if (tiles) visible.begin = visible.begin / kBf16ChunkN * kBf16ChunkN;
    // Decoding's steps end where a page of a paged cache does, so that they read their keys in place.
    auto step_end = [&](int64_t k0) {
      if (few) return k0 + rows_in_run(s.pages, k0, std::min(k0 + kDecodingKeys, visible.end));
      return std::min(tiles && !packed_keys->whole() ? (k0 / BN + 1) * BN : k0 + BN, visible.end);
    };
    bool first_step = true;
    for (int64_t k0 = visible.begin; k0 < visible.end; k0 = step_end(k0)) {
      const int64_t keys = step_end(k0) - k0;
      // A step of the fp32 products or of decoding is one chunk: it is computed whole or skipped.
      const Range used = unmasked_chunks(p, b, block, k0, keys);
      if (used.begin == used.end) continue;
      if (few) {
        decoding_step<T>(s, b, block, decoding, k0, keys, visible.end, st, kDecodingKeys, kb, vb, acc, Dvp, row_max,
                         row_sum, alpha);
        continue;
      }
      if (tiles) {
        bf16_key_step(p, s, b, block, q_rows, used.begin, used.end - used.begin, *packed_keys, *bf16, st, BN, acc, Dvp,
                      row_max, row_sum, alpha, first_step);
        first_step = false;
        continue;
      }
      // A tile that the window cuts is computed only where some query sees some key (tile.h,
      // banded products): a diagonal tile would cost twice its useful work.
      const bool edge = block.heads == 1 && window_cuts(p, head_tile(0, k0, keys));
      const Band band{p, block.q0, k0};
      // S^T = K Q^T, scaled by cap_scores
      const Rows kr = fp32_rows<T>(kb, Dp, s.k, s.pages, b, block.hk, k0, keys, D);
      if (edge)  // for each kEdgeKeys keys, the queries that may see one of them; -inf elsewhere
        gemm_banded_columns(keys, ld, D, kr.data, kr.ld, 1, qt, ld, st, ld, kEdgeKeys, band.queries_seeing(), -kInf);
      else
        gemm(keys, ld, D, kr.data, kr.ld, 1, qt, ld, st, ld, false);
      cap_scores(p, st, keys * ld, nullptr);
      for (int64_t g = 0; g < block.heads; ++g) place_scores(p, head_tile(g, k0, keys));
      softmax_update<T>(st, keys, ld, row_max, row_sum, alpha, edge ? &band : nullptr);
      if (p.variants.dropout)
        for (int64_t g = 0; g < block.heads; ++g) apply_dropout(p, head_tile(g, k0, keys));
      // acc = alpha * acc + P V, with P read from P^T
      rescale_rows(acc, Dvp, cols, alpha);
      const Rows vr = fp32_rows<T>(vb, Dvp, s.v, s.pages, b, block.hk, k0, keys, Dv);
      if (edge)  // for each kMR queries, the keys they may see
        gemm_banded_depth(cols, Dvp, keys, st, 1, ld, vr.data, vr.ld, acc, Dvp, band.keys_seen());
      else
        gemm(cols, Dvp, keys, st, 1, ld, vr.data, vr.ld, acc, Dvp, true);
    }

    if (args.splits.keys != 0) {
      store_partials(args, b, block, split, acc, Dvp, row_max, row_sum);
      continue;
    }
    // out = acc / l and lse = m + log l; rows that saw no key get out = 0 and lse = -inf.
    for (int64_t i = 0; i < cols; ++i) {
      const bool empty = row_sum[i] == 0.f;
      row_max[i] = empty ? -kInf : row_max[i] + std::log(row_sum[i]);  // reused as the lse
      alpha[i] = empty ? 0.f : 1.f / row_sum[i];                        // reused as the normaliser
    }
    for (int64_t g = 0; g < block.heads; ++g) {
      const int64_t h = block.h0 + g;
      std::copy(row_max + g * rows, row_max + (g + 1) * rows, s.lse.at(b, h, block.q0));
      store_rows(at_row_mut<T>(s.out, b, h, block.q0), s.out.row, s.out.col, acc + g * rows * Dvp, Dvp, rows, Dv,
                 alpha + g * rows);
    }
  }
  if (bf16) bf16->products.release();
}

// Split-KV: the output of (b, h), row i, from its splits' partials, merged by their maxima:
//   m = max_s m_s;  l = sum_s l_s exp(m_s - m);  out = sum_s acc_s exp(m_s - m) / l;  lse = m + log l,
// summed in split order. Rows no split saw get out = 0 and lse = -inf.
template <typename T>
void merge_splits_typed(const ForwardArgs& args, int64_t begin, int64_t end) {
  const Splits& splits = args.splits;
  const int64_t Lq = args.p.seqlen_q, Dv = args.p.head_dim_v;
  Scratch scratch(Scratch::size_of({Dv}));
  float* row = scratch.take(Dv);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / args.p.heads_q, h = task % args.p.heads_q;
    const ForwardArgs s = sequence(args, b);
    const int64_t count = splits.of(s.p.seqlen_k);
    for (int64_t i = 0; i < Lq; ++i) {
      const int64_t first = ((b * args.p.heads_q + h) * Lq + i) * splits.count;
      float m = -kInf;
      for (int64_t split = 0; split < count; ++split) m = std::max(m, splits.max[first + split]);
      float l = 0.f;
      fill(row, Dv, 0.f);
      if (m != -kInf) {
        for (int64_t split = 0; split < count; ++split) {
          const float weight = std::exp(splits.max[first + split] - m);  // 0 for a split that saw no key
          l += splits.sum[first + split] * weight;
          const float* acc = splits.acc + (first + split) * Dv;
          for (int64_t c = 0; c < Dv; ++c) row[c] += acc[c] * weight;
        }
      }
      *s.lse.at(b, h, i) = m == -kInf ? -kInf : m + std::log(l);
      const float normaliser = m == -kInf ? 0.f : 1.f / l;
      store_rows(at_row_mut<T>(s.out, b, h, i), s.out.row, s.out.col, row, Dv, 1, Dv, &normaliser);
    }
  }
}

void forward(const ForwardArgs& args, int64_t begin, int64_t end) {
  switch (args.p.dtype) {
    case DType::Float32: return forward_typed<float>(args, begin, end);
    case DType::BFloat16: return forward_typed<c10::BFloat16>(args, begin, end);
    case DType::Float16: return forward_typed<c10::Half>(args, begin, end);
  }
}

void merge_splits(const ForwardArgs& args, int64_t begin, int64_t end) {
  switch (args.p.dtype) {
    case DType::Float32: return merge_splits_typed<float>(args, begin, end);
    case DType::BFloat16: return merge_splits_typed<c10::BFloat16>(args, begin, end);
    case DType::Float16: return merge_splits_typed<c10::Half>(args, begin, end);
  }
}
