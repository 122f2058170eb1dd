// The variants of the scores (params.h, Variants): which keys a block of queries may see under a
// window, and the per-element terms applied to a tile of scale * q.k. The forward and both
// backward passes compute their scores with these functions, so they agree bit for bit.
// Included by kernels.h inside namespace fused_attn::cpu::FUSED_ATTN_ISA, after tile.h.

// tanh within ~3 ulps relative everywhere, as softcap * tanh(x / softcap) needs however large the
// softcap (x then small): 1 - 2 / (exp(2x) + 1) above |x| = 0.625, which saturates to exactly +-1
// (exp clamps or underflows to 0); below, where that difference would cancel to ~1e-7 absolute,
// x P(x^2), a polynomial fitted to tanh(x) / x for the least relative error on [0, 0.625].
inline Vec tanh(Vec x) {
  const Vec y = x * x;
  Vec poly(-0.00565998862f);
  for (const float c : {0.0205909871f, -0.0537210666f, 0.133311272f, -0.333332598f, 1.f})
    poly = at::vec::fmadd(poly, y, Vec(c));
  const Vec saturating = Vec(1.f) - Vec(2.f) / (exp(x + x) + Vec(1.f));
  return Vec::blendv(saturating, x * poly, x.abs() < Vec(0.625f));
}

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

// Granularity of the banded score products: keys (or queries) per group.
constexpr int64_t kEdgeKeys = 16;

// The window's band through the tile whose first query is q0 and first key k0, in the tile's own
// coordinates, as the banded products of tile.h (for tiles the window cuts) take it.
struct Band {
  const Problem& p;
  int64_t q0, k0;

  // Keys (counted from k0) that some of the queries q0 + [i0, i0 + m) may see.
  auto keys_seen() const {
    return [this](int64_t i0, int64_t m) {
      const Range r = visible_keys(p, q0 + i0, m);
      return std::pair<int64_t, int64_t>{r.begin - k0, r.end - k0};
    };
  }
  // Queries (counted from q0) that may see some of the keys k0 + [j0, j0 + n).
  auto queries_seeing() const {
    return [this](int64_t j0, int64_t n) {
      const Range r = visible_queries(p, k0 + j0, n);
      return std::pair<int64_t, int64_t>{r.begin - q0, r.end - q0};
    };
  }
};

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

// Scores from q.k, for n consecutive floats of a tile: s = softcap * tanh(scale q.k / softcap), or
// scale q.k without a softcap. With `tanh` (same layout) not null, tanh(scale q.k / softcap) is kept
// there for the backward's chain rule, d(softcap tanh(x / softcap)) / dx = 1 - tanh^2.
// The scale multiplies the product, never q: the backward recomputes P = exp(s - lse) against the
// forward's lse, so both must round s the same way (q pre-scaled by 1 / sqrt(128) rounds
// differently, and at large scales P's error grew ~40x).
inline void cap_scores(const Problem& p, float* data, int64_t n, float* tanh) {
  const Variants& v = p.variants;
  if (p.scale == 1.f && v.softcap == 0.f) return;
  const Vec scale(p.scale), softcap(v.softcap);
  for (int64_t c = 0; c < n; c += kVec) {
    // (A zero scale gives zeros outright: 0 * q.k is NaN where a banded product left -inf for the
    // keys outside its band, and the tanh kept for the backward would carry it into dS = 0 * NaN.)
    Vec s = p.scale == 0.f ? Vec(0.f) : Vec::loadu(data + c) * scale;
    if (v.softcap > 0.f) {
      const Vec th = cpu::FUSED_ATTN_ISA::tanh(s / softcap);
      if (tanh != nullptr) th.store(tanh + c);
      s = softcap * th;
    }
    s.store(data + c);
  }
}

// The lines of a tile along its contiguous dimension: a key's column of S^T (q_step 1) or a
// query's row of S (k_step 1). f(line, n, i, j, di, dj) gets the line's n scores, line[e] being
// element (i + e * di, j + e * dj).
template <typename F>
inline void for_each_line(const ScoreTile& t, F f) {
  if (t.q_step == 1) {
    for (int64_t j = 0; j < t.keys; ++j) f(t.data + j * t.k_step, t.rows, 0, j, 1, 0);
  } else {
    for (int64_t i = 0; i < t.rows; ++i) f(t.data + i * t.q_step, t.keys, i, 0, 0, 1);
  }
}

// s + bias, or -inf where the bias hides the key (kHidingBias, common/views.h).
inline float plus_bias(float s, float bias) { return bias <= kHidingBias ? -kInf : s + bias; }
inline Vec plus_bias(Vec s, Vec bias) { return Vec::blendv(s + bias, Vec(-kInf), bias <= Vec(kHidingBias)); }

// s[e] = plus_bias(s[e], x[e * stride]), e < n: vectors where x is contiguous or one value.
template <typename B>
inline void add_strided(float* s, const B* x, int64_t stride, int64_t n) {
  int64_t e = 0;
  if (stride == 0 || stride == 1) {
    const Vec broadcast(static_cast<float>(x[0]));
    for (; e + kVec <= n; e += kVec)
      plus_bias(Vec::loadu(s + e), stride == 0 ? broadcast : load_as_floats(x + e)).store(s + e);
  }
  for (; e < n; ++e) s[e] = plus_bias(s[e], static_cast<float>(x[e * stride]));
}

// s[e] = -inf where keep[e * stride] is false, e < n. Masks come in runs (padding, blocks, bands):
// along contiguous flags, eight at a time are read as one word and settled at once when all agree.
inline void hide_where_false(float* s, const bool* keep, int64_t stride, int64_t n) {
  if (stride == 0) {
    if (!keep[0]) fill(s, n, -kInf);
    return;
  }
  int64_t e = 0;
  if (stride == 1) {
    constexpr uint64_t kAllTrue = 0x0101010101010101ull;  // eight bools, each stored as byte 1
    for (; e + 8 <= n; e += 8) {
      uint64_t flags;
      std::memcpy(&flags, keep + e, sizeof flags);
      if (flags == kAllTrue) continue;
      if (flags == 0) {
        fill(s + e, 8, -kInf);
        continue;
      }
      for (int64_t x = e; x < e + 8; ++x) s[x] = keep[x] ? s[x] : -kInf;
    }
  }
  for (; e < n; ++e) s[e] = keep[e * stride] ? s[e] : -kInf;
}

// Whether a (B, H, Lq, Lk) view stored along keys should be read key by key while the tile is
// S^T: its lines (a key across queries) would read one element per row of the view, a long stride
// that thrashes the cache (rows 4 KiB apart share a cache set), so the tile is written across
// lines instead, which stays in L1.
inline bool reads_across_lines(const ScoreTile& t, const Strided& view) {
  return t.q_step == 1 && view.col == 1 && view.row != 0;
}

// t(i, j) += bias(b, h, q0 + i, k0 + j) (plus_bias), the bias stored as B (float32, or q's 16-bit dtype).
template <typename B>
inline void add_bias(const Strided& bias, const ScoreTile& t) {
  const B* base = at_row<B>(bias, t.b, t.h, t.q0) + t.k0 * bias.col;
  if (reads_across_lines(t, bias)) {
    for (int64_t i = 0; i < t.rows; ++i)
      for (int64_t j = 0; j < t.keys; ++j) t.at(i, j) = plus_bias(t.at(i, j), static_cast<float>(base[i * bias.row + j]));
  } else {
    for_each_line(t, [&](float* s, int64_t n, int64_t i, int64_t j, int64_t di, int64_t dj) {
      add_strided(s, base + i * bias.row + j * bias.col, di * bias.row + dj * bias.col, n);
    });
  }
}

// The terms that depend on where a score is: s - slope |d| + bias with d = j - (i + shift), or
// -inf where the window or the mask hides key j from query i. Applied one term at a time along
// the tile's lines; each element gets the same operations in the same order as any other tile
// shape would give it, so the forward and both backward passes agree bit for bit.
inline void place_scores(const Problem& p, const ScoreTile& t) {
  const Variants& v = p.variants;
  const int64_t shift = p.shift();
  // Along a line d moves by dj - di per element: +1 along keys, -1 along queries.
  auto distance = [&](int64_t i, int64_t j) { return t.k0 + j - (t.q0 + i + shift); };
  if (v.alibi_slopes != nullptr) {
    const float slope = v.alibi_slopes[t.b * v.slopes_batch + t.h * v.slopes_head];
    for_each_line(t, [&](float* s, int64_t n, int64_t i, int64_t j, int64_t di, int64_t dj) {
      const int64_t d0 = distance(i, j), step = dj - di;
      for (int64_t e = 0; e < n; ++e) s[e] -= slope * static_cast<float>(std::abs(d0 + e * step));
    });
  }
  if (v.bias.data != nullptr) {
    switch (v.bias_dtype) {
      case DType::Float32: add_bias<float>(v.bias, t); break;
      case DType::BFloat16: add_bias<c10::BFloat16>(v.bias, t); break;
      case DType::Float16: add_bias<c10::Half>(v.bias, t); break;
    }
  }
  if (window_cuts(p, t)) {
    // Visible: -window_left <= d0 + e * step <= window_right (a bound of -1: none on that side).
    const int64_t left = v.window_left < 0 ? std::numeric_limits<int64_t>::max() / 4 : v.window_left;
    const int64_t right = v.window_right < 0 ? std::numeric_limits<int64_t>::max() / 4 : v.window_right;
    for_each_line(t, [&](float* s, int64_t n, int64_t i, int64_t j, int64_t di, int64_t dj) {
      const int64_t d0 = distance(i, j);
      const bool along_keys = dj - di > 0;
      const int64_t first = along_keys ? -left - d0 : d0 - right;
      const int64_t last = along_keys ? right - d0 : d0 + left;
      const int64_t begin = std::clamp<int64_t>(first, 0, n), end = std::clamp<int64_t>(last + 1, begin, n);
      fill(s, begin, -kInf);
      fill(s + end, n - end, -kInf);
    });
  }
  if (v.mask.data != nullptr) {
    const Strided& mask = v.mask;
    const bool* base = at_row<bool>(mask, t.b, t.h, t.q0) + t.k0 * mask.col;
    if (reads_across_lines(t, mask)) {
      for (int64_t i = 0; i < t.rows; ++i)
        for (int64_t j = 0; j < t.keys; ++j)
          if (!base[i * mask.row + j]) t.at(i, j) = -kInf;
    } else {
      for_each_line(t, [&](float* s, int64_t n, int64_t i, int64_t j, int64_t di, int64_t dj) {
        hide_where_false(s, base + i * mask.row + j * mask.col, di * mask.row + dj * mask.col, n);
      });
    }
  }
}

// Whether the mask hides every key of [k0, k0 + keys) from every query of [q0, q0 + rows) of
// head (b, h): such a tile adds nothing (p = 0), so the kernels skip it. Stops at the first
// visible pair, and reads one element along a broadcast dim.
inline bool mask_hides_tile(const Problem& p, int64_t b, int64_t h, int64_t q0, int64_t rows, int64_t k0,
                            int64_t keys) {
  const Strided& mask = p.variants.mask;
  if (mask.data == nullptr) return false;
  const bool* base = at_row<bool>(mask, b, h, q0) + k0 * mask.col;
  const int64_t n_rows = mask.row == 0 ? 1 : rows, n_keys = mask.col == 0 ? 1 : keys;
  for (int64_t i = 0; i < n_rows; ++i)
    for (int64_t j = 0; j < n_keys; ++j)
      if (base[i * mask.row + j * mask.col]) return false;
  return true;
}

// Final scores of a whole tile whose n floats from t.data are its own (the backward's tiles).
inline void finish_scores(const Problem& p, const ScoreTile& t, int64_t n, float* tanh) {
  cap_scores(p, t.data, n, tanh);
  place_scores(p, t);
}
