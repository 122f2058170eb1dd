// The variants of the scores (params.h, Variants): which keys a block of queries may see under a
// window, and the per-element terms applied to a tile of scale * q.k. The forward and both
// backward passes compute their scores with these functions, so they agree bit for bit.
// Included by kernels.h inside namespace fused_attn::cpu::FUSED_ATTN_ISA, after tile.h.

// tanh(x) = 1 - 2 / (exp(2x) + 1). Saturates to exactly +-1 (exp clamps or underflows to 0) and is
// within ~1e-7 absolute near 0, which is what softcap * tanh(x / softcap) needs.
inline Vec tanh(Vec x) { return Vec(1.f) - Vec(2.f) / (exp(x + x) + Vec(1.f)); }

struct Range {
  int64_t begin, end;  // [begin, end); empty when begin >= end
};

// Keys that some query of [q0, q0 + rows) may see: query i sees keys
// i + shift - left .. i + shift + right. Key blocks outside this range are skipped.
inline Range visible_keys(const Problem& p, int64_t q0, int64_t rows) {
  const Variants& v = p.variants;
  const int64_t begin = v.window_left < 0 ? 0 : q0 + p.shift() - v.window_left;
  const int64_t end = v.window_right < 0 ? p.seqlen_k : q0 + rows + p.shift() + v.window_right;
  return {std::clamp<int64_t>(begin, 0, p.seqlen_k), std::clamp<int64_t>(end, 0, p.seqlen_k)};
}

// Queries that may see some key of [k0, k0 + keys): the same inequalities solved for i.
inline Range visible_queries(const Problem& p, int64_t k0, int64_t keys) {
  const Variants& v = p.variants;
  const int64_t begin = v.window_right < 0 ? 0 : k0 - p.shift() - v.window_right;
  const int64_t end = v.window_left < 0 ? p.seqlen_q : k0 + keys - p.shift() + v.window_left;
  return {std::clamp<int64_t>(begin, 0, p.seqlen_q), std::clamp<int64_t>(end, 0, p.seqlen_q)};
}

// A tile of scores: head (b, h), queries q0 + i (i < rows) and keys k0 + j (j < keys), element
// (i, j) at data[i * q_step + j * k_step]. The forward and the dq pass hold S^T (q_step 1), the
// dk/dv pass holds S (k_step 1).
struct ScoreTile {
  float* data;
  int64_t q_step, k_step;
  int64_t b, h, q0, rows, k0, keys;

  float& at(int64_t i, int64_t j) const { return data[i * q_step + j * k_step]; }

  // Calls f(i, j) for every valid element, the contiguous dimension innermost.
  template <typename F>
  void for_each(F f) const {
    if (q_step == 1) {
      for (int64_t j = 0; j < keys; ++j)
        for (int64_t i = 0; i < rows; ++i) f(i, j);
    } else {
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < keys; ++j) f(i, j);
    }
  }
};


// Multiplies every valid element (i, j) of the tile by its dropout factor, keep / (1 - p) with
// keep decided by Philox on (key k0 + j, query q0 + i, head b * Hq + h). The forward applies it
// to P, the backward to dP and to the P that dV sees; the bits are the same every time.
inline void apply_dropout(const Problem& p, const ScoreTile& t) {
  const Variants& v = p.variants;
  const uint32_t head = static_cast<uint32_t>(t.b * p.heads_q + t.h);
  t.for_each([&](int64_t i, int64_t j) {
    const uint32_t bits = philox_bits(v.dropout_seed, static_cast<uint32_t>(t.k0 + j), static_cast<uint32_t>(t.q0 + i), head);
    t.at(i, j) *= bits >= v.drop_threshold ? v.keep_scale : 0.f;
  });
}

// Whether the window hides some key of the tile from some query (else no element is hidden).
inline bool window_cuts(const Problem& p, const ScoreTile& t) {
  const Variants& v = p.variants;
  const int64_t nearest = t.k0 - (t.q0 + t.rows - 1 + p.shift());  // smallest j - (i + shift)
  const int64_t farthest = t.k0 + t.keys - 1 - (t.q0 + p.shift());  // largest
  return (v.window_left >= 0 && nearest < -v.window_left) || (v.window_right >= 0 && farthest > v.window_right);
}

// Scores from q.k, for n consecutive floats of a tile (times `mul`: 1 where q was loaded
// pre-scaled): s = softcap * tanh(scale q.k / softcap), or scale q.k without a softcap. With `tanh`
// (same layout) not null, tanh(scale q.k / softcap) is kept there for the backward's chain rule,
// d(softcap tanh(x / softcap)) / dx = 1 - tanh^2.
inline void cap_scores(const Problem& p, float* data, int64_t n, float mul, float* tanh) {
  const Variants& v = p.variants;
  if (mul == 1.f && v.softcap == 0.f) return;
  const Vec scale(mul), softcap(v.softcap);
  for (int64_t c = 0; c < n; c += kVec) {
    Vec s = Vec::loadu(data + c) * scale;
    if (v.softcap > 0.f) {
      const Vec th = cpu::FUSED_ATTN_ISA::tanh(s / softcap);
      if (tanh != nullptr) th.store(tanh + c);
      s = softcap * th;
    }
    s.store(data + c);
  }
}

// The terms that depend on where a score is: s - slope |j - (i + shift)| + bias, or -inf where
// the window or the mask hides key j from query i.
inline void place_scores(const Problem& p, const ScoreTile& t) {
  const Variants& v = p.variants;
  const bool cuts = window_cuts(p, t);
  if (v.alibi_slopes == nullptr && v.bias.data == nullptr && v.mask.data == nullptr && !cuts) return;
  const float slope = v.alibi_slopes == nullptr ? 0.f : v.alibi_slopes[t.b * v.slopes_batch + t.h * v.slopes_head];
  const float* bias = v.bias.data == nullptr ? nullptr : at_row<float>(v.bias, t.b, t.h, t.q0) + t.k0 * v.bias.col;
  const bool* mask = v.mask.data == nullptr ? nullptr : at_row<bool>(v.mask, t.b, t.h, t.q0) + t.k0 * v.mask.col;
  const int64_t shift = p.shift();
  t.for_each([&](int64_t i, int64_t j) {
    const int64_t distance = t.k0 + j - (t.q0 + i + shift);
    float& s = t.at(i, j);
    if ((cuts && ((v.window_left >= 0 && distance < -v.window_left) ||
                  (v.window_right >= 0 && distance > v.window_right))) ||
        (mask != nullptr && !mask[i * v.mask.row + j * v.mask.col])) {
      s = -kInf;
      return;
    }
    if (v.alibi_slopes != nullptr) s -= slope * static_cast<float>(std::abs(distance));
    if (bias != nullptr) s += bias[i * v.bias.row + j * v.bias.col];
  });
}

// Final scores of a whole tile whose n floats from t.data are its own (the backward's tiles).
inline void finish_scores(const Problem& p, const ScoreTile& t, int64_t n, float mul, float* tanh) {
  cap_scores(p, t.data, n, mul, tanh);
  place_scores(p, t);
}
