// Forward: out = softmax(S) V and lse, S the scores of scale * Q K^T (scores.h), one block of
// kBlockM queries per task.
//
// Scores are computed transposed, S^T = K (scale Q)^T, so that each query is a column: the
// online softmax then runs along columns with one vector holding kVec queries' running max and
// sum, and Q^T is packed once per task while K and V are read block by block as rows.
// Included by kernels.h inside namespace fused_attn::cpu::FUSED_ATTN_ISA.

// Online softmax over one key block, for every query column of S^T (keys x kBlockM):
//   m' = max(m, max_j s_j);  p_j = exp(s_j - m');  l' = l exp(m - m') + sum_j p_j.
// S^T is overwritten with P^T, and alpha = exp(m - m') is left for rescaling the accumulator.
// A column with nothing visible yet keeps m = -inf; using 0 in its place keeps exp() at 0
// instead of exp(-inf + inf) = NaN.
inline void softmax_update(float* st, int64_t keys, float* row_max, float* row_sum, float* alpha) {
  for (int64_t c = 0; c < kBlockM; c += kVec) {
    Vec block_max(-kInf);
    for (int64_t j = 0; j < keys; ++j) block_max = at::vec::maximum(block_max, Vec::loadu(st + j * kBlockM + c));
    const Vec old_max = Vec::loadu(row_max + c);
    const Vec new_max = at::vec::maximum(old_max, block_max);
    const Vec shift = Vec::blendv(new_max, Vec(0.f), new_max == Vec(-kInf));
    Vec sum(0.f);
    for (int64_t j = 0; j < keys; ++j) {
      const Vec prob = exp(Vec::loadu(st + j * kBlockM + c) - shift);
      prob.store(st + j * kBlockM + c);
      sum = sum + prob;
    }
    const Vec rescale = exp(old_max - shift);
    at::vec::fmadd(Vec::loadu(row_sum + c), rescale, sum).store(row_sum + c);
    new_max.store(row_max + c);
    rescale.store(alpha + c);
  }
}

template <typename T>
void forward_typed(const ForwardArgs& args, int64_t begin, int64_t end) {
  const Problem& p = args.p;
  const int64_t D = p.head_dim, Dv = p.head_dim_v;
  const int64_t Dp = round_up(D, kVec), Dvp = round_up(Dv, kVec);
  const int64_t BM = kBlockM, BN = kBlockN;
  Scratch scratch(Scratch::size_of({D * BM, BN * Dp, BN * Dvp, BN * BM, BM * Dvp, BM, BM, BM}));
  float* qt = scratch.take(D * BM);     // scale * Q^T, (D x BM): query i is column i
  float* kb = scratch.take(BN * Dp);    // key block, rows
  float* vb = scratch.take(BN * Dvp);   // value block, rows
  float* st = scratch.take(BN * BM);    // S^T, then P^T
  float* acc = scratch.take(BM * Dvp);  // unnormalised output rows
  float* row_max = scratch.take(BM);
  float* row_sum = scratch.take(BM);
  float* alpha = scratch.take(BM);

  const int64_t blocks = ceil_div(p.seqlen_q, BM);
  const int64_t group = p.heads_q / p.heads_kv;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t bh = task / blocks, b = bh / p.heads_q, h = bh % p.heads_q, hk = h / group;
    const int64_t q0 = balanced_block(task % blocks, blocks) * BM;
    const int64_t rows = std::min(BM, p.seqlen_q - q0);

    load_tile(qt, BM, at_row<T>(args.q, b, h, q0), args.q.col, args.q.row, D, rows, p.scale);
    fill(row_max, BM, -kInf);
    fill(row_sum, BM, 0.f);
    fill(acc, rows * Dvp, 0.f);

    const Range visible = visible_keys(p, q0, rows);
    for (int64_t k0 = visible.begin; k0 < visible.end; k0 += BN) {
      const int64_t keys = std::min(BN, visible.end - k0);
      load_tile(kb, Dp, at_row<T>(args.k, b, hk, k0), args.k.row, args.k.col, keys, D);
      load_tile(vb, Dvp, at_row<T>(args.v, b, hk, k0), args.v.row, args.v.col, keys, Dv);
      // S^T = K (scale Q)^T
      gemm(keys, BM, D, kb, Dp, 1, qt, BM, st, BM, false);
      finish_scores(p, {st, keys * BM, 1, BM, b, h, q0, rows, k0, keys}, 1.f, nullptr);
      softmax_update(st, keys, row_max, row_sum, alpha);
      if (p.variants.dropout) apply_dropout(p, {st, keys * BM, 1, BM, b, h, q0, rows, k0, keys});
      // acc = alpha * acc + P V, with P read from P^T
      for (int64_t i = 0; i < rows; ++i) {
        if (alpha[i] == 1.f) continue;
        const Vec a(alpha[i]);
        for (int64_t c = 0; c < Dvp; c += kVec) (Vec::loadu(acc + i * Dvp + c) * a).store(acc + i * Dvp + c);
      }
      gemm(rows, Dvp, keys, st, 1, BM, vb, Dvp, acc, Dvp, true);
    }

    // out = acc / l and lse = m + log l; rows that saw no key get out = 0 and lse = -inf.
    float* lse = args.lse + (b * p.heads_q + h) * p.seqlen_q + q0;
    for (int64_t i = 0; i < rows; ++i) {
      const bool empty = row_sum[i] == 0.f;
      lse[i] = empty ? -kInf : row_max[i] + std::log(row_sum[i]);
      alpha[i] = empty ? 0.f : 1.f / row_sum[i];  // reused as the normaliser
    }
    store_rows(at_row_mut<T>(args.out, b, h, q0), args.out.row, args.out.col, acc, Dvp, rows, Dv, alpha);
  }
}

void forward(const ForwardArgs& args, int64_t begin, int64_t end) {
  switch (args.p.dtype) {
    case DType::Float32: return forward_typed<float>(args, begin, end);
    case DType::BFloat16: return forward_typed<c10::BFloat16>(args, begin, end);
    case DType::Float16: return forward_typed<c10::Half>(args, begin, end);
  }
}
