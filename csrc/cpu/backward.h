// Backward in two passes, neither with atomics:
//   pass 1, per (batch, query head, query block): delta = rowsum(dO * O) - dlse, then
//           dQ = sum over key blocks of dS K;
//   pass 2, per (batch, key/value head, key block): dV = sum P^T dO and dK = sum dS^T Q over
//           the query heads of the group and their query blocks, in a fixed order.
// with P = exp(scale S - lse) recomputed from the saved lse, dP = dO V^T and
// dS = P * (dP - delta) * scale. Pass 1 works on S^T (queries as columns, like the forward);
// pass 2 on S (keys as columns), so each pass packs its fixed operand transposed once per task.
// Included by kernels.h inside namespace fused_attn::cpu::FUSED_ATTN_ISA.

// lse as the backward uses it: rows that saw no key have lse = -inf; +inf makes every
// p = exp(s - lse) exactly 0 there, so their gradients are 0 instead of NaN.
inline float backward_lse(float lse) { return lse == -kInf ? kInf : lse; }

template <typename T>
void backward_dq_typed(const BackwardArgs& args, int64_t begin, int64_t end) {
  const Problem& p = args.p;
  const int64_t D = p.head_dim, Dv = p.head_dim_v;
  const int64_t Dp = round_up(D, kVec), Dvp = round_up(Dv, kVec);
  const int64_t BM = kBlockM, BN = kBlockN;
  Scratch scratch(Scratch::size_of({D * BM, Dv * BM, BN * Dp, BN * Dvp, BN * BM, BN * BM, BM * Dp, BM, BM}));
  float* qt = scratch.take(D * BM);    // Q^T (D x BM)
  float* dot = scratch.take(Dv * BM);  // dO^T (Dv x BM)
  float* kb = scratch.take(BN * Dp);   // key block, rows
  float* vb = scratch.take(BN * Dvp);  // value block, rows
  float* st = scratch.take(BN * BM);   // S^T, then P^T, then dS^T
  float* dpt = scratch.take(BN * BM);  // dP^T
  float* dq = scratch.take(BM * Dp);   // dQ rows
  float* lse = scratch.take(BM);
  float* delta = scratch.take(BM);

  const int64_t blocks = ceil_div(p.seqlen_q, BM);
  const int64_t group = p.heads_q / p.heads_kv;
  const Vec scale(p.scale);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t bh = task / blocks, b = bh / p.heads_q, h = bh % p.heads_q, hk = h / group;
    const int64_t q0 = balanced_block(task % blocks, blocks) * BM;
    const int64_t rows = std::min(BM, p.seqlen_q - q0);
    const int64_t row_offset = bh * p.seqlen_q + q0;  // into the (B, Hq, Lq) row vectors

    const T* q = at_row<T>(args.q, b, h, q0);
    const T* dout = at_row<T>(args.dout, b, h, q0);
    const T* out = at_row<T>(args.out, b, h, q0);
    load_tile(qt, BM, q, args.q.col, args.q.row, D, rows);
    load_tile(dot, BM, dout, args.dout.col, args.dout.row, Dv, rows);
    // delta_i = sum_c dO_ic O_ic - dlse_i; padding columns get lse = +inf, so p = 0 there.
    for (int64_t i = 0; i < BM; ++i) {
      if (i >= rows) {
        lse[i] = kInf;
        delta[i] = 0.f;
        continue;
      }
      float dot_product = 0.f;
      for (int64_t c = 0; c < Dv; ++c)
        dot_product += static_cast<float>(dout[i * args.dout.row + c * args.dout.col]) *
                       static_cast<float>(out[i * args.out.row + c * args.out.col]);
      delta[i] = dot_product - args.dlse[row_offset + i];
      args.delta[row_offset + i] = delta[i];
      lse[i] = backward_lse(args.lse[row_offset + i]);
    }
    fill(dq, rows * Dp, 0.f);

    const int64_t keys_end = visible_keys(p, q0, rows);
    for (int64_t k0 = 0; k0 < keys_end; k0 += BN) {
      const int64_t keys = std::min(BN, keys_end - k0);
      load_tile(kb, Dp, at_row<T>(args.k, b, hk, k0), args.k.row, args.k.col, keys, D);
      load_tile(vb, Dvp, at_row<T>(args.v, b, hk, k0), args.v.row, args.v.col, keys, Dv);
      gemm(keys, BM, D, kb, Dp, 1, qt, BM, st, BM, false);     // S^T = K Q^T
      gemm(keys, BM, Dv, vb, Dvp, 1, dot, BM, dpt, BM, false); // dP^T = V dO^T
      // dS^T = P^T * (dP^T - delta) * scale, P^T = exp(scale S^T - lse), queries along columns
      for (int64_t j = 0; j < keys; ++j) {
        float* s = st + j * BM;
        const float* dp = dpt + j * BM;
        for (int64_t c = 0; c < BM; c += kVec) {
          const Vec prob = exp(at::vec::fmadd(Vec::loadu(s + c), scale, -Vec::loadu(lse + c)));
          (prob * (Vec::loadu(dp + c) - Vec::loadu(delta + c)) * scale).store(s + c);
        }
      }
      mask_causal_columns(st, p, q0, k0, keys, 0.f);
      gemm(rows, Dp, keys, st, 1, BM, kb, Dp, dq, Dp, true);  // dQ += dS K, dS read from dS^T
    }
    store_rows(at_row_mut<T>(args.dq, b, h, q0), args.dq.row, args.dq.col, dq, Dp, rows, D);
  }
}

template <typename T>
void backward_dkdv_typed(const BackwardArgs& args, int64_t begin, int64_t end) {
  const Problem& p = args.p;
  const int64_t D = p.head_dim, Dv = p.head_dim_v;
  const int64_t Dp = round_up(D, kVec), Dvp = round_up(Dv, kVec);
  const int64_t BM = kBlockM, BN = kBlockN;
  Scratch scratch(Scratch::size_of({D * BN, Dv * BN, BM * Dp, BM * Dvp, BM * BN, BM * BN, BN * Dp, BN * Dvp}));
  float* kt = scratch.take(D * BN);    // K^T (D x BN): key j is column j
  float* vt = scratch.take(Dv * BN);   // V^T (Dv x BN)
  float* qb = scratch.take(BM * Dp);   // query block, rows
  float* dob = scratch.take(BM * Dvp); // dO block, rows
  float* s = scratch.take(BM * BN);    // S, then P
  float* dp = scratch.take(BM * BN);   // dP, then dS
  float* dk = scratch.take(BN * Dp);
  float* dv = scratch.take(BN * Dvp);

  const int64_t blocks = ceil_div(p.seqlen_k, BN);
  const int64_t group = p.heads_q / p.heads_kv;
  const Vec scale(p.scale);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t bh = task / blocks, b = bh / p.heads_kv, hk = bh % p.heads_kv;
    const int64_t k0 = balanced_block(task % blocks, blocks) * BN;
    const int64_t keys = std::min(BN, p.seqlen_k - k0);

    load_tile(kt, BN, at_row<T>(args.k, b, hk, k0), args.k.col, args.k.row, D, keys);
    load_tile(vt, BN, at_row<T>(args.v, b, hk, k0), args.v.col, args.v.row, Dv, keys);
    fill(dk, keys * Dp, 0.f);
    fill(dv, keys * Dvp, 0.f);
    // The first query that sees key k0 (k0 <= i + offset); earlier rows contribute nothing.
    const int64_t first_row = p.causal ? std::min(p.seqlen_q, std::max<int64_t>(0, k0 - p.causal_offset)) : 0;

    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
      for (int64_t q0 = first_row; q0 < p.seqlen_q; q0 += BM) {
        const int64_t rows = std::min(BM, p.seqlen_q - q0);
        const int64_t row_offset = (b * p.heads_q + h) * p.seqlen_q + q0;
        load_tile(qb, Dp, at_row<T>(args.q, b, h, q0), args.q.row, args.q.col, rows, D);
        load_tile(dob, Dvp, at_row<T>(args.dout, b, h, q0), args.dout.row, args.dout.col, rows, Dv);
        gemm(rows, BN, D, qb, Dp, 1, kt, BN, s, BN, false);     // S = Q K^T
        gemm(rows, BN, Dv, dob, Dvp, 1, vt, BN, dp, BN, false); // dP = dO V^T
        // P = exp(scale S - lse), dS = P * (dP - delta) * scale, keys along columns; keys past
        // the causal diagonal or past the block's end (zero padding of K^T) get P = dS = 0.
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t row = q0 + i;
          const Vec lse(backward_lse(args.lse[row_offset + i]));
          const Vec delta(args.delta[row_offset + i]);
          float* si = s + i * BN;
          float* dpi = dp + i * BN;
          for (int64_t c = 0; c < BN; c += kVec) {
            const Vec prob = exp(at::vec::fmadd(Vec::loadu(si + c), scale, -lse));
            prob.store(si + c);
            (prob * (Vec::loadu(dpi + c) - delta) * scale).store(dpi + c);
          }
          int64_t visible = keys;
          if (p.causal) visible = std::min(keys, std::max<int64_t>(0, row + p.causal_offset - k0 + 1));
          fill(si + visible, BN - visible, 0.f);
          fill(dpi + visible, BN - visible, 0.f);
        }
        gemm(keys, Dvp, rows, s, 1, BN, dob, Dvp, dv, Dvp, true); // dV += P^T dO
        gemm(keys, Dp, rows, dp, 1, BN, qb, Dp, dk, Dp, true);    // dK += dS^T Q
      }
    }
    store_rows(at_row_mut<T>(args.dk, b, hk, k0), args.dk.row, args.dk.col, dk, Dp, keys, D);
    store_rows(at_row_mut<T>(args.dv, b, hk, k0), args.dv.row, args.dv.col, dv, Dvp, keys, Dv);
  }
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
