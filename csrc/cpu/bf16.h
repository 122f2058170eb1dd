// bf16 matrix products with fp32 results, on one of two kinds of hardware, for the forward's two
// products (S = Q K^T and P V) and the backward's five:
//   - Intel AMX tiles, through libtorch's exported ukernel (at::native::cpublas::brgemm, oneDNN
//     underneath): on a 2-core Sapphire Rapids a 64 x 64 x 64 product runs at ~1 TFLOP/s per core,
//     15x the fp32 AVX-512 micro-kernel (tile.h), so the softmax becomes the work;
//   - AVX512-BF16 dot products (vdpbf16ps: two bf16 products summed into each fp32 lane), on CPUs
//     that have them without AMX (AMD Zen 4 and newer, Intel Cooper Lake): twice the fp32
//     micro-kernel's multiply-adds per instruction (~220 against ~110 GFLOP/s a core on a Zen 4).
// Used by the AVX-512 build only, for bf16 inputs. Both read B packed in the VNNI layout (pairs of
// K rows interleaved), so the kernels that call them are the same for both.
//
// gemm computes C (M x N) [+]= A (M x K) B (K x N): A row-major bf16, B packed by pack_columns,
// C row-major fp32. N must be a multiple of 16 (the ukernel's rule) and K even; callers split N
// into chunks of at most kBf16ChunkN columns and pad K with a zero row.
//
// Included by kernels.h inside namespace fused_attn::cpu::FUSED_ATTN_ISA.

using Bf16 = c10::BFloat16;
// Columns per chunk of a packed B (the ukernel's widest N).
constexpr int64_t kBf16ChunkN = 64;
// Keys per step of the forward's bf16 products (and per block of its packed keys), 8 x kBlockN: a
// brgemm call costs about the same for a depth of 64 or 128 (P V's depth is the keys), every call
// that follows one of another shape reloads the tile configuration, and the softmax's per-row work
// is amortized over more keys (2-core Sapphire Rapids, L = 2048 and 4096, D = 64: 256 keys 1.15x
// faster than 128, 512 another 1.04x).
constexpr int64_t kBf16BlockN = 512;

// The bf16 products a call may take: none (tile.h's fp32 ones), AVX512-BF16 dot products, AMX.
enum class Bf16Kind { none, dot, amx };

#if defined(CPU_CAPABILITY_AVX512)
// The fastest kind this CPU has, capped by FUSED_ATTN_CPU_BF16=amx|dot|fp32 (params.h bf16_cap;
// for comparing them, and for tests).
inline Bf16Kind bf16_kind() {
  static const bool has_dot = __builtin_cpu_supports("avx512bf16");
  // (every AMX-BF16 CPU has AVX512-BF16, which the softmax uses to round P: softmax_update_rows)
  static const bool has_amx = has_dot && at::native::cpublas::could_pack(at::kBFloat16);
  const Bf16Cap cap = bf16_cap();
  if (has_amx && cap == Bf16Cap::amx) return Bf16Kind::amx;
  if (has_dot && (cap == Bf16Cap::amx || cap == Bf16Cap::dot)) return Bf16Kind::dot;
  return Bf16Kind::none;
}
#else
inline Bf16Kind bf16_kind() { return Bf16Kind::none; }
#endif

inline const char* bf16_kind_name() {
  switch (bf16_kind()) {
    case Bf16Kind::amx: return "amx";
    case Bf16Kind::dot: return "avx512-bf16";
    default: return "fp32";
  }
}

// Whether the forward may take the bf16 products for these head dims: D is a product's depth
// (even), Dv a product's width (whole chunks of 16 columns). The backward's products have both as
// widths.
inline bool bf16_forward_shapes(int64_t D, int64_t Dv) { return D % 2 == 0 && Dv % 16 == 0; }
inline bool bf16_backward_shapes(int64_t D, int64_t Dv) { return D % 16 == 0 && Dv % 16 == 0; }

// The kinds a bf16 forward and backward with these head dims take (binding.cpp takes the backward's
// one-pass schedule when it is not none: the two-pass one's dq pass computes in fp32, and schedules
// must agree bit for bit).
inline Bf16Kind bf16_forward_kind(int64_t D, int64_t Dv) {
  return bf16_forward_shapes(D, Dv) ? bf16_kind() : Bf16Kind::none;
}
inline Bf16Kind bf16_backward_kind(int64_t D, int64_t Dv) {
  return bf16_backward_shapes(D, Dv) ? bf16_kind() : Bf16Kind::none;
}
inline bool bf16_backward_takes_products(int64_t D, int64_t Dv) { return bf16_backward_kind(D, Dv) != Bf16Kind::none; }

#if defined(CPU_CAPABILITY_AVX512)
// Decoding's scores (tile.h, scores_of_few_queries) as AVX512-BF16 dot products of bf16 queries
// with bf16 keys read as they lie, 32 elements of D per instruction: each product of two bf16
// values is exact in fp32, as when the keys are converted (FloatDots), and summed in fp32.
struct Bf16Dots {
  using Key = Bf16;
  using Query = Bf16;
  using Operand = __m512bh;
  static constexpr int64_t kDepth = 32;
  FUSED_ATTN_BF16_DOTS static __m512bh load_key(const Bf16* x) {
    return reinterpret_cast<__m512bh>(_mm512_loadu_si512(x));
  }
  FUSED_ATTN_BF16_DOTS static __m512bh load_query(const Bf16* x) { return load_key(x); }
  FUSED_ATTN_BF16_DOTS static Vec madd(Vec acc, __m512bh key, __m512bh query) {
    return _mm512_dpbf16_ps(acc, key, query);
  }
};

// The dot products' register tile: C rows [0, MR) x NV vectors of 16 columns [+]= A rows x B,
// B packed as [K / 2][n][2] (n columns, the tile's first at b). Per pair of A's columns: NV loads
// of B, and per row one broadcast pair of A and NV dot products into the accumulators.
template <int MR, int NV>
__attribute__((target("avx512bf16"))) inline void dot_tile(int64_t K, const Bf16* a, int64_t lda, const Bf16* b,
                                                           int64_t n, float* c, int64_t ldc, bool accumulate) {
  __m512 acc[MR][NV];
  FUSED_ATTN_UNROLL for (int m = 0; m < MR; ++m)
    FUSED_ATTN_UNROLL for (int j = 0; j < NV; ++j)
      acc[m][j] = accumulate ? _mm512_loadu_ps(c + m * ldc + 16 * j) : _mm512_setzero_ps();
  for (int64_t r = 0; r < K; r += 2) {
    __m512bh bv[NV];
    FUSED_ATTN_UNROLL for (int j = 0; j < NV; ++j) bv[j] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b + r * n + 32 * j));
    FUSED_ATTN_UNROLL for (int m = 0; m < MR; ++m) {
      int32_t pair;
      std::memcpy(&pair, a + m * lda + r, sizeof(pair));
      const __m512bh av = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
      FUSED_ATTN_UNROLL for (int j = 0; j < NV; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], av, bv[j]);
    }
  }
  FUSED_ATTN_UNROLL for (int m = 0; m < MR; ++m)
    FUSED_ATTN_UNROLL for (int j = 0; j < NV; ++j) _mm512_storeu_ps(c + m * ldc + 16 * j, acc[m][j]);
}

// Rows of a chunk of NV vectors' width: MR at a time (24 accumulators for four vectors), then the
// last rows (fewer than MR) with a tile of their own height.
template <int NV, int MR, int R = 1>
inline void dot_tail(int64_t rows, int64_t K, const Bf16* a, int64_t lda, const Bf16* b, int64_t n, float* c,
                     int64_t ldc, bool accumulate) {
  if constexpr (R + 1 < MR) {
    if (rows != R) return dot_tail<NV, MR, R + 1>(rows, K, a, lda, b, n, c, ldc, accumulate);
  }
  dot_tile<R, NV>(K, a, lda, b, n, c, ldc, accumulate);
}
template <int NV>
inline void dot_chunk(int64_t M, int64_t K, const Bf16* a, int64_t lda, const Bf16* b, int64_t n, float* c,
                      int64_t ldc, bool accumulate) {
  constexpr int MR = NV == 4 ? 6 : 8;
  int64_t m = 0;
  for (; m + MR <= M; m += MR) dot_tile<MR, NV>(K, a + m * lda, lda, b, n, c + m * ldc, ldc, accumulate);
  if (m < M) dot_tail<NV, MR>(M - m, K, a + m * lda, lda, b, n, c + m * ldc, ldc, accumulate);
}

// C (M x n) [+]= A (M x K) B, B one packed chunk of n columns (16, 32, 48 or 64).
inline void dot_gemm(int64_t M, int64_t n, int64_t K, const Bf16* a, int64_t lda, const Bf16* b, float* c,
                     int64_t ldc, bool accumulate) {
  switch (n / 16) {
    case 4: return dot_chunk<4>(M, K, a, lda, b, n, c, ldc, accumulate);
    case 3: return dot_chunk<3>(M, K, a, lda, b, n, c, ldc, accumulate);
    case 2: return dot_chunk<2>(M, K, a, lda, b, n, c, ldc, accumulate);
    default: return dot_chunk<1>(M, K, a, lda, b, n, c, ldc, accumulate);
  }
}

// Row tiles of the banded dot products (Bf16Products::gemm_banded_*): each computes only the
// vectors of columns, or the depth, its rows need. 6 rows keep 24 accumulators for 4 vectors.
constexpr int64_t kDotBandRows = 6;

// C rows [0, rows) x nv vectors [+]= A B, rows <= kDotBandRows, nv <= 4 (B as dot_tile takes it).
inline void dot_rows(int64_t rows, int64_t nv, int64_t K, const Bf16* a, int64_t lda, const Bf16* b, int64_t n,
                     float* c, int64_t ldc, bool accumulate) {
  auto tile = [&](auto vectors) {
    constexpr int NV = decltype(vectors)::value;
    if (rows == kDotBandRows) return dot_tile<kDotBandRows, NV>(K, a, lda, b, n, c, ldc, accumulate);
    dot_tail<NV, kDotBandRows>(rows, K, a, lda, b, n, c, ldc, accumulate);
  };
  switch (nv) {
    case 4: return tile(std::integral_constant<int, 4>{});
    case 3: return tile(std::integral_constant<int, 3>{});
    case 2: return tile(std::integral_constant<int, 2>{});
    default: return tile(std::integral_constant<int, 1>{});
  }
}

// Calls f(m, rows, begin, end) for each row tile [m, m + rows) of a banded product of M rows, with
// the range seen(m, rows) widened to whole units (16 columns, or a pair of the depth) inside [0, limit).
template <typename Seen, typename F>
inline void for_each_band_tile(int64_t M, int64_t limit, int64_t unit, Seen seen, F f) {
  for (int64_t m = 0; m < M; m += kDotBandRows) {
    const int64_t rows = std::min(kDotBandRows, M - m);
    const auto [lo, hi] = seen(m, rows);
    const auto [begin, end] = whole_units(lo, hi, limit, unit);
    f(m, rows, begin, end);
  }
}

// 16 columns of two rows interleaved into 16 words: column j's two values side by side, as a pair
// row of the VNNI layout holds them.
inline __m512i interleave_pair(__m256i row0, __m256i row1) {
  return _mm512_or_si512(_mm512_cvtepu16_epi32(row0), _mm512_slli_epi32(_mm512_cvtepu16_epi32(row1), 16));
}

// Rows r and r + 1 of B (n columns, a multiple of 16) into the VNNI layout's pair row.
inline void pack_pair_row(const Bf16* row0, const Bf16* row1, int64_t n, Bf16* dst) {
  for (int64_t j = 0; j < n; j += 16)
    _mm512_storeu_si512(dst + 2 * j, interleave_pair(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row0 + j)),
                                                     _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row1 + j))));
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// The transpose of a 16 x 16 block of 32-bit words, in place: r[t] holds row t, then column t.
inline void transpose_words_16x16(__m512i r[16]) {
  __m512i t[16], u[16];
  // Within each 128-bit lane L: t pairs rows' words, u holds word 4L + k of rows 4i..4i+3 in u[4i + k].
  FUSED_ATTN_UNROLL for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  FUSED_ATTN_UNROLL for (int i = 0; i < 4; ++i) {
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // Word 4L + k of all 16 rows: lane L of u[k], u[4 + k], u[8 + k], u[12 + k].
  FUSED_ATTN_UNROLL for (int k = 0; k < 4; ++k) {
    const __m512i lo01 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0x44), hi01 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0xEE);
    const __m512i lo23 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0x44),
                  hi23 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0xEE);
    r[k] = _mm512_shuffle_i32x4(lo01, lo23, 0x88);
    r[4 + k] = _mm512_shuffle_i32x4(lo01, lo23, 0xDD);
    r[8 + k] = _mm512_shuffle_i32x4(hi01, hi23, 0x88);
    r[12 + k] = _mm512_shuffle_i32x4(hi01, hi23, 0xDD);
  }
}

inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// dst = src^T where both are read as matrices of 32-bit words (two bf16 side by side): src is
// `rows` x `words` (rows ld_src bf16 apart, at any alignment), dst `words` x `cols` (rows ld_dst
// words apart), cols a multiple of 16, zero in its columns past `rows`.
inline void transpose_words(const Bf16* src, int64_t ld_src, int64_t rows, int64_t words, int64_t cols, Bf16* dst,
                            int64_t ld_dst) {
  for (int64_t j0 = 0; j0 < cols; j0 += 16)
    for (int64_t w0 = 0; w0 < words; w0 += 16) {
      const __mmask16 lanes = first_lanes(words - w0);
      __m512i r[16];
      FUSED_ATTN_UNROLL for (int t = 0; t < 16; ++t)
        r[t] = j0 + t < rows ? _mm512_maskz_loadu_epi32(lanes, src + (j0 + t) * ld_src + 2 * w0) : _mm512_setzero_si512();
      transpose_words_16x16(r);
      for (int64_t w = 0; w < std::min<int64_t>(16, words - w0); ++w)
        _mm512_storeu_si512(dst + 2 * ((w0 + w) * ld_dst + j0), r[w]);
    }
}

// dst (cols x rows, ld_dst) = src^T, src (rows x cols, ld_src) in bf16, rows even: in dst's rows
// a pair of src's rows is one word, so each pair is interleaved into words and those transposed.
inline void transpose_row_pairs(const Bf16* src, int64_t ld_src, int64_t rows, int64_t cols, Bf16* dst,
                                int64_t ld_dst) {
  const int64_t pairs = rows / 2;
  for (int64_t j0 = 0; j0 < cols; j0 += 16) {
    const __mmask16 columns = first_lanes(cols - j0);
    for (int64_t k0 = 0; k0 < pairs; k0 += 16) {
      __m512i r[16];
      FUSED_ATTN_UNROLL for (int t = 0; t < 16; ++t) {
        if (k0 + t >= pairs) {
          r[t] = _mm512_setzero_si512();
          continue;
        }
        const Bf16* row = src + 2 * (k0 + t) * ld_src + j0;
        r[t] = interleave_pair(_mm256_maskz_loadu_epi16(columns, row), _mm256_maskz_loadu_epi16(columns, row + ld_src));
      }
      transpose_words_16x16(r);
      const __mmask16 words = first_lanes(pairs - k0);
      for (int64_t j = 0; j < std::min<int64_t>(16, cols - j0); ++j)
        _mm512_mask_storeu_epi32(dst + (j0 + j) * ld_dst + 2 * k0, words, r[j]);
    }
  }
}
#endif

// dst (cols x rows, ld_dst) = src^T, src (rows x cols, ld_src) in bf16.
inline void transpose_bf16(const Bf16* src, int64_t ld_src, int64_t rows, int64_t cols, Bf16* dst, int64_t ld_dst) {
#if defined(CPU_CAPABILITY_AVX512)
  if (rows % 2 == 0) return transpose_row_pairs(src, ld_src, rows, cols, dst, ld_dst);
#endif
  for (int64_t i = 0; i < rows; i += 32)
    for (int64_t j = 0; j < cols; j += 32)
      at::vec::transpose_mxn<Bf16>(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst,
                                   std::min<int64_t>(32, rows - i), std::min<int64_t>(32, cols - j));
}

// A thread's bf16 products during one call: the kind (bf16_kind, read as its tasks start) and the
// products and packing of that kind (each kind reads only what its own packing wrote).
class Bf16Products {
 public:
  explicit Bf16Products(Bf16Kind kind) : kind_(kind) {}

  // C (M x N, ldc) [+]= A (M x K, lda) * packed B, N in chunks of at most kBf16ChunkN columns as
  // pack_columns wrote them: chunk c0 of B lies at packed + c0 * packed_depth, and rows
  // [first, first + K) of it are used (first and K even, first + K <= packed_depth; in the VNNI
  // layout row pair r / 2 of an n-column chunk starts n * r elements in). N must be the width B
  // was packed with, or a whole number of chunks of it.
  void gemm(int64_t M, int64_t N, int64_t K, const Bf16* a, int64_t lda, const Bf16* packed, float* c, int64_t ldc,
            bool accumulate, int64_t packed_depth = 0, int64_t first = 0) const {
    if (packed_depth == 0) packed_depth = K;
    for (int64_t c0 = 0; c0 < N; c0 += kBf16ChunkN) {
      const int64_t n = std::min(kBf16ChunkN, N - c0);
      const Bf16* b = packed + c0 * packed_depth + first * n;
#if defined(CPU_CAPABILITY_AVX512)
      if (kind_ == Bf16Kind::dot) {
        dot_gemm(M, n, K, a, lda, b, c + c0, ldc, accumulate);
        continue;
      }
#endif
      at::native::cpublas::brgemm(M, n, K, lda, n, ldc, accumulate, a, b, c + c0, true);
    }
  }

  // gemm (C not accumulated), where `banded` says the rows see a band of C's columns (a tile the
  // window cuts): row tile [m, m + rows) needs only columns seen(m, rows) = [lo, hi), a range that
  // may reach past [0, N). The dot products compute just the vectors of 16 columns that hold them
  // and set the rest of the tile's row to `skipped`; AMX computes the whole of C (a tile shape per
  // range would reload its tile configuration at every call), as does an unbanded call. Either way
  // the callers hide the columns the rows do not see.
  template <typename Seen>
  void gemm_banded_columns(bool banded, int64_t M, int64_t N, int64_t K, const Bf16* a, int64_t lda,
                           const Bf16* packed, float* c, int64_t ldc, Seen seen, float skipped) const {
#if defined(CPU_CAPABILITY_AVX512)
    if (banded && kind_ == Bf16Kind::dot) {
      for_each_band_tile(M, N, 16, seen, [&](int64_t m, int64_t rows, int64_t begin, int64_t end) {
        for (int64_t i = m; i < m + rows; ++i) {
          fill(c + i * ldc, begin, skipped);
          fill(c + i * ldc + end, N - end, skipped);
        }
        for (int64_t c0 = begin / kBf16ChunkN * kBf16ChunkN; c0 < end; c0 += kBf16ChunkN) {
          const int64_t n = std::min(kBf16ChunkN, N - c0), j0 = std::max(begin, c0) - c0,
                        j1 = std::min(end, c0 + n) - c0;
          dot_rows(rows, (j1 - j0) / 16, K, a + m * lda, lda, packed + c0 * K + 2 * j0, n, c + m * ldc + c0 + j0,
                   ldc, false);
        }
      });
      return;
    }
#endif
    gemm(M, N, K, a, lda, packed, c, ldc, false);
  }

  // gemm, where `banded` says the rows of A are zero outside a band of its columns, the depth: row
  // tile [m, m + rows) has its nonzero columns in seen(m, rows) = [lo, hi) (a range that may reach
  // past [0, K)). The dot products sum over just those (from an even column on; a tile with none
  // gets zero rows, or keeps C's when accumulating); AMX and unbanded calls sum over all of K (see
  // gemm_banded_columns).
  template <typename Seen>
  void gemm_banded_depth(bool banded, int64_t M, int64_t N, int64_t K, const Bf16* a, int64_t lda,
                         const Bf16* packed, float* c, int64_t ldc, bool accumulate, Seen seen,
                         int64_t packed_depth = 0, int64_t first = 0) const {
    if (packed_depth == 0) packed_depth = K;
#if defined(CPU_CAPABILITY_AVX512)
    if (banded && kind_ == Bf16Kind::dot) {
      for_each_band_tile(M, K, 2, seen, [&](int64_t m, int64_t rows, int64_t begin, int64_t end) {
        for (int64_t c0 = 0; c0 < N; c0 += kBf16ChunkN) {
          const int64_t n = std::min(kBf16ChunkN, N - c0);
          dot_rows(rows, n / 16, end - begin, a + m * lda + begin, lda, packed + c0 * packed_depth + (first + begin) * n,
                   n, c + m * ldc + c0, ldc, accumulate);
        }
      });
      return;
    }
#endif
    gemm(M, N, K, a, lda, packed, c, ldc, accumulate, packed_depth, first);
  }

  // B (K x N, row-major, ld, K even) into the VNNI layout, chunk by chunk as gemm reads it: as
  // rows [first, first + K) of chunks packed_depth rows deep (by default B alone, K deep).
  void pack_columns(const Bf16* b, int64_t ld, int64_t K, int64_t N, Bf16* packed, int64_t packed_depth = 0,
                    int64_t first = 0) const {
    if (packed_depth == 0) packed_depth = K;
    for (int64_t c0 = 0; c0 < N; c0 += kBf16ChunkN) {
      const int64_t n = std::min(kBf16ChunkN, N - c0);
      Bf16* chunk = packed + c0 * packed_depth + first * n;
#if defined(CPU_CAPABILITY_AVX512)
      if (kind_ == Bf16Kind::dot) {
        for (int64_t r = 0; r < K; r += 2) pack_pair_row(b + r * ld + c0, b + (r + 1) * ld + c0, n, chunk + r * n);
        continue;
      }
#endif
      at::native::cpublas::pack(K, n, ld, n, at::kBFloat16, at::kBFloat16, b + c0, chunk);
    }
  }

  // B = R^T (dim x width, zero in its columns past n) packed for gemm, R being n rows of dim
  // (ld apart), through `staging` (dim x width) for AMX. For the dot products, a pair row of R^T
  // holds two neighbouring values of each row of R, one 32-bit word of it: each chunk of B is that
  // chunk's rows of R transposed as words (dim even).
  void pack_transposed(const Bf16* rows, int64_t ld, int64_t n, int64_t dim, int64_t width, Bf16* staging,
                       Bf16* packed) const {
#if defined(CPU_CAPABILITY_AVX512)
    if (kind_ == Bf16Kind::dot) {
      for (int64_t c0 = 0; c0 < width; c0 += kBf16ChunkN) {
        const int64_t chunk = std::min(kBf16ChunkN, width - c0);
        transpose_words(rows + c0 * ld, ld, std::clamp<int64_t>(n - c0, 0, chunk), dim / 2, chunk, packed + c0 * dim,
                        chunk);
      }
      return;
    }
#endif
    transpose_bf16(rows, ld, n, dim, staging, width);
    for (int64_t d = 0; d < dim; ++d) std::fill(staging + d * width + n, staging + (d + 1) * width, Bf16(0.f));
    pack_columns(staging, width, dim, width, packed);
  }

  // This thread's AMX tile configuration, released at the end of a call's tasks.
  void release() const {
    if (kind_ == Bf16Kind::amx) at::native::cpublas::brgemm_release(true);
  }

 private:
  Bf16Kind kind_;
};

// rows x cols of an fp32 tile (ld) rounded to bf16 into dst (ld), plus zero rows up to rows_even.
// Only the bf16 products call it, which run on CPUs with AVX512-BF16: vcvtne2ps2bf16 rounds 32
// values in one instruction (to nearest even, as at::vec does in ~10; it reads denormal inputs as
// zero, which moves a P or dS below 1.2e-38 by less than that).
#if defined(CPU_CAPABILITY_AVX512)
__attribute__((target("avx512bf16")))
#endif
inline void round_rows(const float* src, int64_t rows, int64_t rows_even, int64_t ld, Bf16* dst) {
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512)
  for (; i + 32 <= rows * ld; i += 32)
    _mm512_storeu_si512(dst + i, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + 16),
                                                                                _mm512_loadu_ps(src + i))));
#endif
  at::vec::convert(src + i, dst + i, rows * ld - i);
  std::fill(dst + rows * ld, dst + rows_even * ld, Bf16(0.f));
}

// The forward's products and bf16 buffers for blocks of up to bm query columns and bn keys (one per
// thread).
class Bf16Buffers {
 public:
  Bf16Buffers(Bf16Kind kind, int64_t D, int64_t Dv, int64_t bm, int64_t bn)
      : products(kind),
        scratch_(Scratch::size_of({Scratch::halves(bm * D), Scratch::halves(bm * bn), bm * Dv})),
        q_rows(scratch_.take_halves(bm * D)),
        p(scratch_.take_halves(bm * bn)),
        pv(scratch_.take(bm * Dv)) {}

  const Bf16Products products;

 private:
  Scratch scratch_;

 public:
  Bf16* const q_rows;  // the block's query rows (cols x D), where they cannot be read in place
  Bf16* const p;       // P rounded to bf16 (cols x bn)
  float* const pv;     // P V of the block (cols x Dv), before it joins the accumulator
};

// The backward's products and bf16 buffers for one key block of up to bn keys against query
// blocks of up to bm rows (one per thread): its fixed operands, packed once per key block, and per
// query block the rows that cannot be read in place and the products' operands.
class Bf16BackwardBuffers {
 public:
  Bf16BackwardBuffers(Bf16Kind kind, int64_t D, int64_t Dv, int64_t bm, int64_t bn)
      : products(kind),
        scratch_(floats_for({bn * std::max(D, Dv), std::max(D, Dv) * bn, D * bn, Dv * bn, bn * D, bm * D, bm * D,
                            bm * Dv, bm * Dv, bm * bn, bn * bm})),
        k_rows(scratch_.take_halves(bn * std::max(D, Dv))),
        transpose_staging(scratch_.take_halves(std::max(D, Dv) * bn)),
        kt_packed(scratch_.take_halves(D * bn)),
        vt_packed(scratch_.take_halves(Dv * bn)),
        k_packed(scratch_.take_halves(bn * D)),
        q_rows(scratch_.take_halves(bm * D)),
        q_packed(scratch_.take_halves(bm * D)),
        do_rows(scratch_.take_halves(bm * Dv)),
        do_packed(scratch_.take_halves(bm * Dv)),
        staging(scratch_.take_halves(bm * bn)),
        transposed(scratch_.take_halves(bn * bm)) {}

 private:
  // Scratch floats for bf16 tiles of these sizes.
  static int64_t floats_for(std::initializer_list<int64_t> tiles) {
    int64_t total = 0;
    for (int64_t n : tiles) total += Scratch::size_of({Scratch::halves(n)});
    return total;
  }

 public:
  const Bf16Products products;

 private:
  Scratch scratch_;

 public:
  Bf16* const k_rows;             // K or V rows of the key block, where they cannot be read in place
  Bf16* const transpose_staging;  // K^T or V^T before packing (pack_transposed)
  Bf16* const kt_packed;          // K^T (D x bn, zero past the block's keys) packed: S = Q K^T
  Bf16* const vt_packed;          // V^T likewise: dP = dO V^T
  Bf16* const k_packed;    // K (keys padded to even x D) packed: dQ += dS K
  Bf16* const q_rows;      // Q rows (with a zero row when their count is odd), then
  Bf16* const q_packed;    // packed: dK += dS^T Q
  Bf16* const do_rows;     // dO rows, likewise: dV += P^T dO
  Bf16* const do_packed;
  Bf16* const staging;     // P or dS rounded (rows padded to even x bn)
  Bf16* const transposed;  // its transpose (bn x rows padded to even)
};
