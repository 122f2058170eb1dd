// Backward, without atomics, in one of two schedules that give bitwise identical gradients
// (every element is accumulated from the same terms in the same order):
//
//   two passes, for few (sequence, key/value head) pairs:
//     pass 1, per (sequence, query head, query block): delta = rowsum(dO * O) - dlse, then
//             dQ = sum over key blocks of dS K;
//     pass 2, per (sequence, key/value head, key block): dV = sum P^T dO and dK = sum dS^T Q over
//             the query heads of the group and their query blocks, in a fixed order;
//   one pass, when there are enough (sequence, key/value head) pairs to keep every thread busy:
//     per (sequence, query head, query block): delta only; then per (sequence, key/value head):
//     pass 2 for each key block in turn, also adding dS K to the group's dQ, so S and dP are
//     computed once instead of twice (5 block products instead of 7).
//
// with P = exp(S - lse) recomputed from the saved lse (S the final scores of scores.h), dP = dO V^T
// and dS = P * (dP - delta) * scale (under dropout dP is dO V^T times the keep factors, and dV
// sums the dropped P), times 1 - tanh^2 under a softcap (the chain rule through
// softcap * tanh(x / softcap)); hidden keys have S = -inf, so P = dS = 0 there. Pass 1 works on
// S^T (queries as columns, like the forward); pass 2 on S (keys as columns), so each pass packs
// its fixed operand transposed once per task. Every task works inside one sequence (params.h,
// sequence): packed sequences are never padded. bf16 with the bf16 products (bf16.h) takes the five
// products of the key-block backward on them and always the one-pass schedule.
// Included by kernels.h inside namespace fused_attn::cpu::FUSED_ATTN_ISA.

// lse as the backward uses it: rows that saw no key have lse = -inf; +inf makes every
// p = exp(s - lse) exactly 0 there, so their gradients are 0 instead of NaN.
inline float backward_lse(float lse) { return lse == -kInf ? kInf : lse; }

// The gradient of the final scores, P * (dP - delta): also the bias gradient.
inline Vec score_grad(Vec prob, Vec dp, Vec delta) { return prob * (dp - delta); }

// dS, the gradient of q.k, from the final scores': through the softcap (tanh null without one)
// and the scale.
inline Vec qk_grad(Vec score_grad, const float* tanh, Vec scale) {
  if (tanh != nullptr) {
    const Vec th = Vec::loadu(tanh);
    score_grad = score_grad * (Vec(1.f) - th * th);
  }
  return score_grad * scale;
}

// delta_i = sum_c dO_ic O_ic - dlse_i for rows [q0, q0 + rows) of (b, h), into args.delta.
// Rows are read as fp32 a chunk at a time (fp32_tile: in place, or converted and zero-padded to
// whole vectors) and dotted kVec lanes at a time: O(L Dv) per call, a visible share of calls with
// little work per row (a narrow window).
template <typename T>
void compute_delta(const BackwardArgs& args, int64_t b, int64_t h, int64_t q0, int64_t rows) {
  const T* dout = at_row<T>(args.dout, b, h, q0);
  const T* out = at_row<T>(args.out, b, h, q0);
  const float* dlse = args.dlse.at(b, h, q0);
  float* delta = args.delta.at(b, h, q0);
  constexpr int64_t kChunk = 256;  // the largest head dim fused_attn takes, in one chunk
  alignas(64) float dout_chunk[kChunk], out_chunk[kChunk];
  for (int64_t i = 0; i < rows; ++i) {
    Vec dot_product(0.f);
    for (int64_t c0 = 0; c0 < args.p.head_dim_v; c0 += kChunk) {
      const int64_t n = std::min(kChunk, args.p.head_dim_v - c0), padded = round_up(n, kVec);
      const T* dout_at = dout + i * args.dout.row + c0 * args.dout.col;
      const T* out_at = out + i * args.out.row + c0 * args.out.col;
      const Rows d = fp32_tile(dout_chunk, padded, dout_at, 0, args.dout.col, 1, n);
      const Rows o = fp32_tile(out_chunk, padded, out_at, 0, args.out.col, 1, n);
      for (int64_t c = 0; c < padded; c += kVec)
        dot_product = at::vec::fmadd(Vec::loadu(d.data + c), Vec::loadu(o.data + c), dot_product);
    }
    delta[i] = lane_sum(dot_product) - dlse[i];
  }
}

// The (query head, query block) of a dq or delta task of a sequence.
struct DqBlock {
  int64_t h, q0, rows;
};
inline DqBlock dq_block(const Problem& p, int64_t index) {
  const int64_t blocks = ceil_div(p.seqlen_q, kBlockM);
  const int64_t q0 = balanced_block(index % blocks, blocks) * kBlockM;
  return {index / blocks, q0, std::min(kBlockM, p.seqlen_q - q0)};
}

template <typename T>
void backward_dq_typed(const BackwardArgs& args, int64_t begin, int64_t end) {
  const int64_t D = args.p.head_dim, Dv = args.p.head_dim_v;
  const int64_t Dp = round_up(D, kVec), Dvp = round_up(Dv, kVec);
  const int64_t BM = kBlockM, BN = kBlockN;
  Scratch scratch(Scratch::size_of({D * BM, Dv * BM, BN * Dp, BN * Dvp, BN * BM, BN * BM, BN * BM, BM * Dp, BM, BM}));
  float* qt = scratch.take(D * BM);    // Q^T (D x BM)
  float* dot = scratch.take(Dv * BM);  // dO^T (Dv x BM)
  float* kb = scratch.take(BN * Dp);   // key block, rows
  float* vb = scratch.take(BN * Dvp);  // value block, rows
  float* st = scratch.take(BN * BM);   // S^T, then P^T, then dS^T
  float* dpt = scratch.take(BN * BM);  // dP^T
  float* tanh_t = scratch.take(BN * BM);  // tanh of the softcap, S^T's layout
  float* tanh = args.p.variants.softcap > 0.f ? tanh_t : nullptr;
  float* dq = scratch.take(BM * Dp);   // dQ rows
  float* lse = scratch.take(BM);
  float* delta = scratch.take(BM);

  const int64_t group = args.p.heads_q / args.p.heads_kv;
  const Vec scale(args.p.scale);
  for (int64_t task = begin; task < end; ++task) {
    const TaskAt at = locate(args.query_tasks, task);
    const int64_t b = at.sequence;
    const BackwardArgs s = sequence(args, b);
    const Problem& p = s.p;
    const auto [h, q0, rows] = dq_block(p, at.index);
    const int64_t hk = h / group;

    // kb and vb (kBlockN >= kBlockM rows) stage the rows until the key loop uses them.
    static_assert(kBlockN >= kBlockM);
    load_transposed(qt, BM, at_row<T>(s.q, b, h, q0), s.q.row, s.q.col, rows, D, kb);
    load_transposed(dot, BM, at_row<T>(s.dout, b, h, q0), s.dout.row, s.dout.col, rows, Dv, vb);
    compute_delta<T>(s, b, h, q0, rows);
    // Padding columns get lse = +inf, so p = 0 there.
    for (int64_t i = 0; i < BM; ++i) {
      lse[i] = i < rows ? backward_lse(*s.lse.at(b, h, q0 + i)) : kInf;
      delta[i] = i < rows ? *s.delta.at(b, h, q0 + i) : 0.f;
    }
    fill(dq, rows * Dp, 0.f);

    const Range visible = visible_keys(p, q0, rows);
    for (int64_t k0 = visible.begin; k0 < visible.end; k0 += BN) {
      const int64_t keys = std::min(BN, visible.end - k0);
      if (mask_hides_tile(p, b, h, q0, rows, k0, keys)) continue;  // p = dS = 0 there
      const Rows kr = fp32_rows<T>(kb, Dp, s.k, Pages{}, b, hk, k0, keys, D);
      const Rows vr = fp32_rows<T>(vb, Dvp, s.v, Pages{}, b, hk, k0, keys, Dv);
      const ScoreTile st_tile{st, 1, BM, b, h, q0, rows, k0, keys};
      // A tile that the window cuts is computed only where some query sees some key, as in the
      // forward (tile.h, banded products); dP^T is left 0 where S^T = -inf.
      const bool edge = window_cuts(p, st_tile);
      const Band band{p, q0, k0};
      if (edge) {
        gemm_banded_columns(keys, BM, D, kr.data, kr.ld, 1, qt, BM, st, BM, kEdgeKeys, band.queries_seeing(), -kInf);
        gemm_banded_columns(keys, BM, Dv, vr.data, vr.ld, 1, dot, BM, dpt, BM, kEdgeKeys, band.queries_seeing(), 0.f);
      } else {
        gemm(keys, BM, D, kr.data, kr.ld, 1, qt, BM, st, BM, false);      // K Q^T
        gemm(keys, BM, Dv, vr.data, vr.ld, 1, dot, BM, dpt, BM, false);  // dP^T = V dO^T
      }
      finish_scores(p, st_tile, keys * BM, tanh);  // S^T
      if (p.variants.dropout) apply_dropout(p, {dpt, 1, BM, b, h, q0, rows, k0, keys});
      // P^T = exp(S^T - lse), then dS^T, queries along columns
      for (int64_t j = 0; j < keys; ++j) {
        float* s = st + j * BM;
        const float* dp = dpt + j * BM;
        for (int64_t c = 0; c < BM; c += kVec) {
          const Vec prob = probability_exp<T>(Vec::loadu(s + c) - Vec::loadu(lse + c));
          const Vec grad = score_grad(prob, Vec::loadu(dp + c), Vec::loadu(delta + c));
          qk_grad(grad, tanh ? tanh + j * BM + c : nullptr, scale).store(s + c);
        }
      }
      if (edge)
        gemm_banded_depth(rows, Dp, keys, st, 1, BM, kr.data, kr.ld, dq, Dp, band.keys_seen());
      else
        gemm(rows, Dp, keys, st, 1, BM, kr.data, kr.ld, dq, Dp, true);  // dQ += dS K, dS read from dS^T
    }
    store_rows(at_row_mut<T>(s.dq, b, h, q0), s.dq.row, s.dq.col, dq, Dp, rows, D);
  }
}

// The tiles of one key block's backward, carved out of a thread's scratch.
struct KeyBlockScratch {
  float *kt, *vt, *kb, *qb, *dob, *s, *dp, *tanh, *dbias, *dk, *dv;

  static int64_t floats(int64_t D, int64_t Dv) {
    const int64_t Dp = round_up(D, kVec), Dvp = round_up(Dv, kVec);
    return Scratch::size_of({D * kBlockN, Dv * kBlockN, kBlockN * Dp, kBlockM * Dp, kBlockM * Dvp,
                             kBlockM * kBlockN, kBlockM * kBlockN, kBlockM * kBlockN, kBlockM * kBlockN,
                             kBlockN * Dp, kBlockN * Dvp});
  }
  KeyBlockScratch(Scratch& scratch, int64_t D, int64_t Dv) {
    const int64_t Dp = round_up(D, kVec), Dvp = round_up(Dv, kVec);
    kt = scratch.take(D * kBlockN);     // K^T (D x BN): key j is column j
    vt = scratch.take(Dv * kBlockN);    // V^T (Dv x BN)
    kb = scratch.take(kBlockN * Dp);    // K rows, for dQ += dS K
    qb = scratch.take(kBlockM * Dp);    // query block, rows
    dob = scratch.take(kBlockM * Dvp);  // dO block, rows
    s = scratch.take(kBlockM * kBlockN);   // S, then P
    dp = scratch.take(kBlockM * kBlockN);  // dP, then dS
    tanh = scratch.take(kBlockM * kBlockN);  // tanh of the softcap, S's layout
    dbias = scratch.take(kBlockM * kBlockN);  // the bias gradient of the tile, S's layout
    dk = scratch.take(kBlockN * Dp);
    dv = scratch.take(kBlockN * Dvp);
  }
};

// dbias(b, h, q0 + i, k0 + j) += grad(i, j) for one (rows x keys) tile in S's layout, dbias stored
// as G: float32, or the bias's 16-bit dtype where this is each element's one term (0 + grad,
// rounded once). Along broadcast dims dbias has stride 0, so the terms of one element are summed
// in the order the task visits them; the task split (params.h, dkdv_split) gives every element
// one writer.
template <typename G>
inline void add_bias_grad(const Strided& dbias, const float* grad, int64_t b, int64_t h, int64_t q0, int64_t rows,
                          int64_t k0, int64_t keys) {
  G* base = at_row_mut<G>(dbias, b, h, q0) + k0 * dbias.col;
  for (int64_t i = 0; i < rows; ++i) {
    G* row = base + i * dbias.row;
    const float* g = grad + i * kBlockN;
    int64_t j = 0;
    if (dbias.col == 1) {
      if constexpr (std::is_same_v<G, float>) {
        for (; j + kVec <= keys; j += kVec) (Vec::loadu(row + j) + Vec::loadu(g + j)).store(row + j);
      } else {
        float sum[kBlockN];
        load_scaled(sum, row, keys, 1.f);
        for (int64_t c = 0; c < keys; ++c) sum[c] += g[c];
        store_scaled(row, sum, keys, 1.f);
        continue;
      }
    }
    for (; j < keys; ++j) row[j * dbias.col] = static_cast<G>(static_cast<float>(row[j * dbias.col]) + g[j]);
  }
}

// The key block's fixed operands for the bf16 products: K^T and V^T packed (zero past the
// block's keys), and K packed (keys padded to even) when dQ is summed here too.
inline void pack_key_block(const BackwardArgs& args, int64_t b, int64_t hk, int64_t k0, int64_t keys, bool with_k,
                           const Bf16BackwardBuffers& bf16) {
  const int64_t D = args.p.head_dim, Dv = args.p.head_dim_v;
  const Bf16Products& products = bf16.products;
  const Bf16Rows k = bf16_rows(bf16.k_rows, args.k, Pages{}, b, hk, k0, keys, D, true);
  products.pack_transposed(k.data, k.ld, keys, D, kBlockN, bf16.transpose_staging, bf16.kt_packed);
  if (with_k) products.pack_columns(k.data, k.ld, round_up(keys, 2), D, bf16.k_packed);
  const Bf16Rows v = bf16_rows(bf16.k_rows, args.v, Pages{}, b, hk, k0, keys, Dv, false);
  products.pack_transposed(v.data, v.ld, keys, Dv, kBlockN, bf16.transpose_staging, bf16.vt_packed);
}

// The one-pass schedule's operands from the query side of dV += P^T dO and dK += dS^T Q: dO and Q of
// every query head of a (sequence, kv head)'s group, all rows (padded to even) in chunks `depth`
// rows deep, packed once per task, where the two-pass schedule's key-block tasks pack each query
// block again for every key block that meets it.
class PackedQueries {
 public:
  const int64_t depth;

  PackedQueries(int64_t group, int64_t seqlen_q, int64_t D, int64_t Dv)
      : depth(round_up(seqlen_q, 2)),
        D_(D),
        Dv_(Dv),
        scratch_(Scratch::size_of({Scratch::halves(group * depth * D), Scratch::halves(group * depth * Dv)})),
        q_(scratch_.take_halves(group * depth * D)),
        dout_(scratch_.take_halves(group * depth * Dv)) {}

  // Packs the query blocks of (b, hk)'s group, through bf16's row buffers.
  void pack(const BackwardArgs& s, int64_t b, int64_t hk, const Bf16BackwardBuffers& bf16) {
    const int64_t group = s.p.heads_q / s.p.heads_kv;
    for (int64_t g = 0; g < group; ++g)
      for (int64_t q0 = 0; q0 < s.p.seqlen_q; q0 += kBlockM) {
        const int64_t h = hk * group + g, rows = std::min(kBlockM, s.p.seqlen_q - q0), rows_even = round_up(rows, 2);
        const Bf16Rows q_rows = bf16_rows(bf16.q_rows, s.q, Pages{}, b, h, q0, rows, D_, true);
        bf16.products.pack_columns(q_rows.data, q_rows.ld, rows_even, D_, q(g), depth, q0);
        const Bf16Rows do_rows = bf16_rows(bf16.do_rows, s.dout, Pages{}, b, h, q0, rows, Dv_, true);
        bf16.products.pack_columns(do_rows.data, do_rows.ld, rows_even, Dv_, dout(g), depth, q0);
      }
  }
  Bf16* q(int64_t g) const { return q_ + g * depth * D_; }
  Bf16* dout(int64_t g) const { return dout_ + g * depth * Dv_; }

 private:
  const int64_t D_, Dv_;
  Scratch scratch_;
  Bf16* const q_;
  Bf16* const dout_;
};

// Pass 2 for one key block [k0, k0 + keys) of (b, hk): dK and dV summed over the group's query
// heads and the query blocks that see the block. With dq != nullptr (the one-pass schedule) also
// dQ += dS K for those rows, dq being the group's (G x Lq x Dp) fp32 accumulator.
// bf16: the bf16 products (bf16.h; bf16 inputs only), with P and dS rounded to bf16, taking dO and
// Q from `queries` where the task packed them.
template <typename T>
void key_block_backward(const BackwardArgs& args, int64_t b, int64_t hk, int64_t k0, const KeyBlockScratch& t,
                        float* dq, const Bf16BackwardBuffers* bf16, const PackedQueries* queries) {
  const Problem& p = args.p;
  const int64_t D = p.head_dim, Dv = p.head_dim_v;
  const int64_t Dp = round_up(D, kVec), Dvp = round_up(Dv, kVec);
  const int64_t BM = kBlockM, BN = kBlockN;
  const int64_t group = p.heads_q / p.heads_kv;
  const Vec scale(p.scale);
  const int64_t keys = std::min(BN, p.seqlen_k - k0);

  if (bf16 != nullptr) {
    pack_key_block(args, b, hk, k0, keys, dq != nullptr, *bf16);
  } else {
    // dk and dv stage the rows until they are zeroed below.
    load_transposed(t.kt, BN, at_row<T>(args.k, b, hk, k0), args.k.row, args.k.col, keys, D, t.dk);
    load_transposed(t.vt, BN, at_row<T>(args.v, b, hk, k0), args.v.row, args.v.col, keys, Dv, t.dv);
  }
  // K rows for dQ += dS K (fp32 products), in place where they can be read so.
  const Rows kr = dq != nullptr && bf16 == nullptr ? fp32_rows<T>(t.kb, Dp, args.k, Pages{}, b, hk, k0, keys, D)
                                                   : Rows{t.kb, Dp};
  fill(t.dk, keys * Dp, 0.f);
  fill(t.dv, keys * Dvp, 0.f);
  float* tanh = p.variants.softcap > 0.f ? t.tanh : nullptr;
  // Queries outside the window of every key of the block contribute nothing. The query blocks start
  // at an even row, as the pairs of rows of a task's PackedQueries do (a row before the first
  // visible one sees no key of the block: P = dS = 0 there).
  const Range visible = visible_queries(p, k0, keys);

  for (int64_t g = 0; g < group; ++g) {
    const int64_t h = hk * group + g;
    for (int64_t q0 = visible.begin / 2 * 2; q0 < visible.end; q0 += BM) {
      const int64_t rows = std::min(BM, visible.end - q0);
      if (mask_hides_tile(p, b, h, q0, rows, k0, keys)) continue;  // p = dS = 0 there
      const float* lse = args.lse.at(b, h, q0);
      const float* delta = args.delta.at(b, h, q0);
      const ScoreTile s_tile{t.s, BN, 1, b, h, q0, rows, k0, keys};
      // A tile that the window cuts is computed only where some query sees some key (tile.h and
      // bf16.h, banded products): the keys each row tile may see, the queries each may be seen by.
      // Elsewhere S = -inf, so P = dS = 0 there, and dP is left 0.
      const bool edge = window_cuts(p, s_tile);
      const Band band{p, q0, k0};
      Bf16Rows q_rows{}, do_rows{};
      Rows qr{t.qb, Dp}, dor{t.dob, Dvp};  // the fp32 products' Q and dO rows
      if (bf16 != nullptr) {
        const Bf16Products& products = bf16->products;
        q_rows = bf16_rows(bf16->q_rows, args.q, Pages{}, b, h, q0, rows, D, true);
        do_rows = bf16_rows(bf16->do_rows, args.dout, Pages{}, b, h, q0, rows, Dv, true);
        products.gemm_banded_columns(edge, rows, BN, D, q_rows.data, q_rows.ld, bf16->kt_packed, t.s, BN,
                                     band.keys_seen(), -kInf);  // Q K^T
        products.gemm_banded_columns(edge, rows, BN, Dv, do_rows.data, do_rows.ld, bf16->vt_packed, t.dp, BN,
                                     band.keys_seen(), 0.f);  // dP = dO V^T
      } else {
        qr = fp32_rows<T>(t.qb, Dp, args.q, Pages{}, b, h, q0, rows, D);
        dor = fp32_rows<T>(t.dob, Dvp, args.dout, Pages{}, b, h, q0, rows, Dv);
        if (edge) {
          gemm_banded_columns(rows, BN, D, qr.data, qr.ld, 1, t.kt, BN, t.s, BN, kEdgeKeys, band.keys_seen(), -kInf);
          gemm_banded_columns(rows, BN, Dv, dor.data, dor.ld, 1, t.vt, BN, t.dp, BN, kEdgeKeys, band.keys_seen(), 0.f);
        } else {
          gemm(rows, BN, D, qr.data, qr.ld, 1, t.kt, BN, t.s, BN, false);      // Q K^T
          gemm(rows, BN, Dv, dor.data, dor.ld, 1, t.vt, BN, t.dp, BN, false);  // dP = dO V^T
        }
      }
      finish_scores(p, s_tile, rows * BN, tanh);  // S
      if (p.variants.dropout) apply_dropout(p, {t.dp, BN, 1, b, h, q0, rows, k0, keys});
      // P = exp(S - lse), then dS, keys along columns. Columns past the block's end (zero
      // padding of K^T) hold junk that the products below never read (they stop at `keys`). On an
      // edge, each row works only on the vectors that hold keys it may see, P = dS = 0 on the rest.
      for (int64_t i = 0; i < rows; ++i) {
        const Vec lse_i(backward_lse(lse[i]));
        const Vec delta_i(delta[i]);
        float* si = t.s + i * BN;
        float* dpi = t.dp + i * BN;
        int64_t lo = 0, hi = BN;
        if (edge) {
          const auto [first, last] = band.keys_seen()(i, 1);
          std::tie(lo, hi) = whole_units(first, last, BN, kVec);
          auto zero_outside = [&](float* row) {
            fill(row, lo, 0.f);
            fill(row + hi, BN - hi, 0.f);
          };
          zero_outside(si);
          zero_outside(dpi);
          if (args.dbias.data != nullptr) zero_outside(t.dbias + i * BN);
        }
        for (int64_t c = lo; c < hi; c += kVec) {
          const Vec prob = probability_exp<T>(Vec::loadu(si + c) - lse_i);
          prob.store(si + c);
          const Vec grad = score_grad(prob, Vec::loadu(dpi + c), delta_i);
          if (args.dbias.data != nullptr) grad.store(t.dbias + i * BN + c);
          qk_grad(grad, tanh ? tanh + i * BN + c : nullptr, scale).store(dpi + c);
        }
      }
      if (args.dbias.data != nullptr) {
        switch (args.dbias_dtype) {
          case DType::Float32: add_bias_grad<float>(args.dbias, t.dbias, b, h, q0, rows, k0, keys); break;
          case DType::BFloat16: add_bias_grad<c10::BFloat16>(args.dbias, t.dbias, b, h, q0, rows, k0, keys); break;
          case DType::Float16: add_bias_grad<c10::Half>(args.dbias, t.dbias, b, h, q0, rows, k0, keys); break;
        }
      }
      if (p.variants.dropout) apply_dropout(p, s_tile);  // P -> the dropped P, for dV
      float* dq_rows = dq == nullptr ? nullptr : dq + (g * p.seqlen_q + q0) * Dp;
      if (bf16 != nullptr) {  // P and dS rounded to bf16, transposed for dV and dK (rows padded to even)
        const Bf16Products& products = bf16->products;
        const int64_t rows_even = round_up(rows, 2);
        // dO and Q packed: rows [q0, q0 + rows_even) of the task's, or this block's alone.
        const Bf16 *do_packed = bf16->do_packed, *q_packed = bf16->q_packed;
        int64_t depth = rows_even, first = 0;
        if (queries != nullptr) {
          do_packed = queries->dout(g);
          q_packed = queries->q(g);
          depth = queries->depth;
          first = q0;
        } else {
          products.pack_columns(do_rows.data, do_rows.ld, rows_even, Dv, bf16->do_packed);
          products.pack_columns(q_rows.data, q_rows.ld, rows_even, D, bf16->q_packed);
        }
        round_rows(t.s, rows, rows_even, BN, bf16->staging);
        transpose_bf16(bf16->staging, BN, rows_even, keys, bf16->transposed, rows_even);
        // On an edge tile P and dS are zero outside the band, and the products sum over the band alone.
        products.gemm_banded_depth(edge, keys, Dv, rows_even, bf16->transposed, rows_even, do_packed, t.dv, Dvp, true,
                                   band.queries_seeing(), depth, first);  // dV += P^T dO
        round_rows(t.dp, rows, rows_even, BN, bf16->staging);
        transpose_bf16(bf16->staging, BN, rows_even, keys, bf16->transposed, rows_even);
        products.gemm_banded_depth(edge, keys, D, rows_even, bf16->transposed, rows_even, q_packed, t.dk, Dp, true,
                                   band.queries_seeing(), depth, first);  // dK += dS^T Q
        if (dq != nullptr) {  // dQ += dS K, over the keys padded to even
          if (keys % 2 == 1)
            for (int64_t i = 0; i < rows; ++i) bf16->staging[i * BN + keys] = Bf16(0.f);
          products.gemm_banded_depth(edge, rows, D, round_up(keys, 2), bf16->staging, BN, bf16->k_packed, dq_rows, Dp,
                                     true, band.keys_seen());
        }
      } else if (edge) {
        gemm_banded_depth(keys, Dvp, rows, t.s, 1, BN, dor.data, dor.ld, t.dv, Dvp, band.queries_seeing());
        gemm_banded_depth(keys, Dp, rows, t.dp, 1, BN, qr.data, qr.ld, t.dk, Dp, band.queries_seeing());
        if (dq != nullptr) gemm_banded_depth(rows, Dp, keys, t.dp, BN, 1, kr.data, kr.ld, dq_rows, Dp, band.keys_seen());
      } else {
        gemm(keys, Dvp, rows, t.s, 1, BN, dor.data, dor.ld, t.dv, Dvp, true);  // dV += P^T dO
        gemm(keys, Dp, rows, t.dp, 1, BN, qr.data, qr.ld, t.dk, Dp, true);     // dK += dS^T Q
        if (dq != nullptr) gemm(rows, Dp, keys, t.dp, BN, 1, kr.data, kr.ld, dq_rows, Dp, true);  // dQ += dS K
      }
    }
  }
  store_rows(at_row_mut<T>(args.dk, b, hk, k0), args.dk.row, args.dk.col, t.dk, Dp, keys, D);
  store_rows(at_row_mut<T>(args.dv, b, hk, k0), args.dv.row, args.dv.col, t.dv, Dvp, keys, Dv);
}

// The bf16 products' buffers when a bf16 backward takes them (bf16.h bf16_backward_kind), else none.
template <typename T>
std::unique_ptr<Bf16BackwardBuffers> bf16_backward_buffers(const Problem& p) {
  if constexpr (std::is_same_v<T, Bf16>) {
    const Bf16Kind kind = bf16_backward_kind(p.head_dim, p.head_dim_v);
    if (kind != Bf16Kind::none)
      return std::make_unique<Bf16BackwardBuffers>(kind, p.head_dim, p.head_dim_v, kBlockM, kBlockN);
  }
  return nullptr;
}

template <typename T>
void backward_dkdv_typed(const BackwardArgs& args, int64_t begin, int64_t end) {
  const Problem& all = args.p;
  Scratch scratch(KeyBlockScratch::floats(all.head_dim, all.head_dim_v));
  const KeyBlockScratch tiles(scratch, all.head_dim, all.head_dim_v);
  const std::unique_ptr<Bf16BackwardBuffers> bf16 = bf16_backward_buffers<T>(all);
  // A task is one (sequence, head, block) triple, or all of them along the dims dkdv_split does
  // not split (those where the bias gradient is broadcast; then inputs are dense, every sequence
  // of the same length, and key_tasks has a single group, of all sequences).
  const DkdvSplit split = dkdv_split(args.dbias);
  for (int64_t task = begin; task < end; ++task) {
    const TaskAt at = locate(args.key_tasks, task);
    const Range batches = split.batches ? Range{at.sequence, at.sequence + 1} : Range{0, all.batch};
    for (int64_t b = batches.begin; b < batches.end; ++b) {
      const BackwardArgs s = sequence(args, b);
      const int64_t blocks = ceil_div(s.p.seqlen_k, kBlockN);
      const int64_t split_blocks = split.blocks ? blocks : 1;
      const Range heads = split.heads ? Range{at.index / split_blocks, at.index / split_blocks + 1}
                                      : Range{0, all.heads_kv};
      const Range block_ids = split.blocks ? Range{at.index % blocks, at.index % blocks + 1} : Range{0, blocks};
      for (int64_t hk = heads.begin; hk < heads.end; ++hk)
        for (int64_t block = block_ids.begin; block < block_ids.end; ++block)
          key_block_backward<T>(s, b, hk, balanced_block(block, blocks) * kBlockN, tiles, nullptr, bf16.get(), nullptr);
    }
  }
  if (bf16) bf16->products.release();
}

// One-pass schedule, first step: delta for a block of query rows (tasks as in pass 1).
template <typename T>
void backward_delta_typed(const BackwardArgs& args, int64_t begin, int64_t end) {
  for (int64_t task = begin; task < end; ++task) {
    const TaskAt at = locate(args.query_tasks, task);
    const BackwardArgs s = sequence(args, at.sequence);
    const DqBlock block = dq_block(s.p, at.index);
    compute_delta<T>(s, at.sequence, block.h, block.q0, block.rows);
  }
}

// One-pass schedule, second step: per (sequence, key/value head), every key block in turn.
template <typename T>
void backward_fused_typed(const BackwardArgs& args, int64_t begin, int64_t end) {
  const Problem& all = args.p;
  const int64_t Dp = round_up(all.head_dim, kVec);
  const int64_t group = all.heads_q / all.heads_kv;
  // The group's dQ rows in fp32; the longest sequence's fit.
  Scratch scratch(KeyBlockScratch::floats(all.head_dim, all.head_dim_v) + Scratch::size_of({group * all.seqlen_q * Dp}));
  const KeyBlockScratch tiles(scratch, all.head_dim, all.head_dim_v);
  float* dq = scratch.take(group * all.seqlen_q * Dp);
  const std::unique_ptr<Bf16BackwardBuffers> bf16 = bf16_backward_buffers<T>(all);
  const std::unique_ptr<PackedQueries> queries =
      bf16 ? std::make_unique<PackedQueries>(group, all.seqlen_q, all.head_dim, all.head_dim_v) : nullptr;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / all.heads_kv, hk = task % all.heads_kv;
    const BackwardArgs s = sequence(args, b);
    const Problem& p = s.p;
    fill(dq, group * p.seqlen_q * Dp, 0.f);
    if (queries) queries->pack(s, b, hk, *bf16);
    for (int64_t k0 = 0; k0 < p.seqlen_k; k0 += kBlockN)
      key_block_backward<T>(s, b, hk, k0, tiles, dq, bf16.get(), queries.get());
    for (int64_t g = 0; g < group; ++g)
      store_rows(at_row_mut<T>(s.dq, b, hk * group + g, 0), s.dq.row, s.dq.col, dq + g * p.seqlen_q * Dp, Dp,
                 p.seqlen_q, p.head_dim);
  }
  if (bf16) bf16->products.release();
}

void backward_dq(const BackwardArgs& args, int64_t begin, int64_t end) {
  switch (args.p.dtype) {
    case DType::Float32: return backward_dq_typed<float>(args, begin, end);
    case DType::BFloat16: return backward_dq_typed<c10::BFloat16>(args, begin, end);
    case DType::Float16: return backward_dq_typed<c10::Half>(args, begin, end);
  }
}

void backward_dkdv(const BackwardArgs& args, int64_t begin, int64_t end) {
  switch (args.p.dtype) {
    case DType::Float32: return backward_dkdv_typed<float>(args, begin, end);
    case DType::BFloat16: return backward_dkdv_typed<c10::BFloat16>(args, begin, end);
    case DType::Float16: return backward_dkdv_typed<c10::Half>(args, begin, end);
  }
}

void backward_delta(const BackwardArgs& args, int64_t begin, int64_t end) {
  switch (args.p.dtype) {
    case DType::Float32: return backward_delta_typed<float>(args, begin, end);
    case DType::BFloat16: return backward_delta_typed<c10::BFloat16>(args, begin, end);
    case DType::Float16: return backward_delta_typed<c10::Half>(args, begin, end);
  }
}

void backward_fused(const BackwardArgs& args, int64_t begin, int64_t end) {
  switch (args.p.dtype) {
    case DType::Float32: return backward_fused_typed<float>(args, begin, end);
    case DType::BFloat16: return backward_fused_typed<c10::BFloat16>(args, begin, end);
    case DType::Float16: return backward_fused_typed<c10::Half>(args, begin, end);
  }
}
