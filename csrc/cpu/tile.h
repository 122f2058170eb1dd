// Building blocks of the CPU kernels: scratch memory, tile loads/stores with dtype conversion,
// a register-blocked matrix product, and exp. Everything works on fp32 tiles.
//
// Included by kernels.h inside namespace fused_attn::cpu::FUSED_ATTN_ISA, once per instruction
// set: at::vec::Vectorized<float> is 8 AVX2 lanes in the AVX2 build, 16 in the AVX-512 one, and a
// plain array of 8 the compiler vectorizes as it can in the portable build. The code is the same
// for all three.

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
constexpr float kInf = std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// [lo, hi) clamped to [0, limit) and widened to whole units (vectors, pairs) that hold it: begin
// rounded down, end up but not past limit, {begin, begin} when nothing is left. The banded
// products' and passes' ranges, from the keys or queries a band says are seen.
inline std::pair<int64_t, int64_t> whole_units(int64_t lo, int64_t hi, int64_t limit, int64_t unit) {
  const int64_t begin = std::clamp<int64_t>(lo, 0, limit) / unit * unit;
  return {begin, std::clamp<int64_t>(round_up(hi, unit), begin, limit)};
}

// Per-thread scratch: one allocation per kernel call (one call per thread), 64-byte aligned.
// Defined in this namespace rather than using std::vector, so no template instance is shared
// (and possibly merged at link time) between the portable and the AVX2 build.
class Scratch {
 public:
  explicit Scratch(int64_t floats)
      : data_(static_cast<float*>(std::aligned_alloc(64, round_up(floats * sizeof(float), 64)))) {
    if (data_ == nullptr) throw std::bad_alloc();
  }
  ~Scratch() { std::free(data_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  // Hands out consecutive tiles, each rounded up to a whole number of cache lines.
  float* take(int64_t floats) {
    float* tile = data_ + used_;
    used_ += round_up(floats, 16);
    return tile;
  }
  // Tiles of 2-byte elements (bf16): n of them in halves(n) floats.
  static int64_t halves(int64_t n) { return (n + 1) / 2; }
  c10::BFloat16* take_halves(int64_t n) { return reinterpret_cast<c10::BFloat16*>(take(halves(n))); }
  static int64_t size_of(std::initializer_list<int64_t> tiles) {
    int64_t total = 0;
    for (int64_t t : tiles) total += round_up(t, 16);
    return total;
  }

 private:
  float* data_;
  int64_t used_ = 0;
};

// Order in which a thread's tasks visit the blocks of one head: 0, n-1, 1, n-2, ... With a
// causal mask block i costs about i (or n-1-i) units of work, so any two consecutive tasks cost
// the same and the contiguous task ranges of at::parallel_for get equal work.
inline int64_t balanced_block(int64_t t, int64_t n) { return (t % 2 == 0) ? t / 2 : n - 1 - t / 2; }

template <typename T>
inline const T* at_row(const Strided& s, int64_t b, int64_t h, int64_t row) {
  return static_cast<const T*>(s.data) + b * s.batch + h * s.head + row * s.row;
}
template <typename T>
inline T* at_row_mut(const Strided& s, int64_t b, int64_t h, int64_t row) {
  return static_cast<T*>(s.data) + b * s.batch + h * s.head + row * s.row;
}

// kVec values of x (float32, bf16 or fp16) as floats (the compiler does not vectorize a loop of
// scalar 16-bit conversions). The 16-bit values are read with a load of exactly their kVec * 2
// bytes: ATen's Vectorized<T>::loadu(x, kVec) is a masked load of a whole 16-bit vector, twice
// as wide, which at a row's end spans the next cache line (another head's row, which nothing else
// reads); converting a bf16 cache's rows from memory ran 1.2x faster with the exact loads on a
// Zen 5 EPYC.
template <typename T>
inline Vec load_as_floats(const T* x) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(x);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    const __m256i halves = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
    if constexpr (std::is_same_v<T, c10::BFloat16>) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
    else return _mm512_cvtph_ps(halves);
#elif defined(CPU_CAPABILITY_AVX2)
    const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
    if constexpr (std::is_same_v<T, c10::BFloat16>) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
    else return _mm256_cvtph_ps(halves);
#else
    return std::get<0>(at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(x, kVec)));
#endif
  }
}

// dst[c] = mul * src[c] for c < n, converted to fp32 a vector at a time.
template <typename T>
inline void load_scaled(float* dst, const T* src, int64_t n, float mul) {
  int64_t c = 0;
  for (; c + kVec <= n; c += kVec) (load_as_floats(src + c) * Vec(mul)).store(dst + c);
  for (; c < n; ++c) dst[c] = static_cast<float>(src[c]) * mul;
}

// dst[c] = T(mul * src[c]) for c < n, rounding to nearest even, likewise.
template <typename T>
inline void store_scaled(T* dst, const float* src, int64_t n, float mul) {
  int64_t c = 0;
  if constexpr (!std::is_same_v<T, float>) {
    for (; c + 2 * kVec <= n; c += 2 * kVec)
      at::vec::convert_from_float<T>(Vec::loadu(src + c) * Vec(mul), Vec::loadu(src + c + kVec) * Vec(mul))
          .store(dst + c);
  }
  for (; c < n; ++c) dst[c] = static_cast<T>(src[c] * mul);
}

// dst (rows x padded_cols, row-major) = mul * src(r, c), zero in columns [cols, padded_cols).
// Swapping the strides loads the transpose: load_tile(dst, ld, q, q.col, q.row, D, m) is Q^T.
template <typename T>
inline void load_tile(float* dst, int64_t padded_cols, const T* src, int64_t row_stride, int64_t col_stride,
                      int64_t rows, int64_t cols, float mul = 1.f) {
  for (int64_t r = 0; r < rows; ++r) {
    float* d = dst + r * padded_cols;
    const T* s = src + r * row_stride;
    if (col_stride == 1) {
      load_scaled(d, s, cols, mul);
    } else {
      for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<float>(s[c * col_stride]) * mul;
    }
    for (int64_t c = cols; c < padded_cols; ++c) d[c] = 0.f;
  }
}

// dst(r, c) = T(mul[r] * src[r * ld + c]) for r < rows, c < cols (rounding to nearest even).
template <typename T>
inline void store_rows(T* dst, int64_t row_stride, int64_t col_stride, const float* src, int64_t ld,
                       int64_t rows, int64_t cols, const float* mul = nullptr) {
  for (int64_t r = 0; r < rows; ++r) {
    const float m = mul ? mul[r] : 1.f;
    T* d = dst + r * row_stride;
    const float* s = src + r * ld;
    if (col_stride == 1) {
      store_scaled(d, s, cols, m);
    } else {
      for (int64_t c = 0; c < cols; ++c) d[c * col_stride] = static_cast<T>(s[c] * m);
    }
  }
}

// fp32 rows laid out as the kernels' tiles: row r at data + r * ld, each a whole number of vectors.
struct Rows {
  const float* data;
  int64_t ld;
};

// src(r, c) as such a tile (rows x ld): read where it lies when it already is one (fp32, unit
// column stride, cols == ld so no padding is needed), else loaded into dst as load_tile does.
template <typename T>
inline Rows fp32_tile(float* dst, int64_t ld, const T* src, int64_t row_stride, int64_t col_stride, int64_t rows,
                      int64_t cols) {
  if constexpr (std::is_same_v<T, float>) {
    if (col_stride == 1 && cols == ld) return {src, row_stride};
  }
  load_tile(dst, ld, src, row_stride, col_stride, rows, cols);
  return {dst, ld};
}

inline void fill(float* dst, int64_t n, float value) {
  for (int64_t i = 0; i < n; ++i) dst[i] = value;
}

// dst (cols x ld) = the transpose of src(r, c) = src[r * row_stride + c * col_stride], r < rows <= ld, c < cols,
// zero in columns [rows, ld): K^T from K's rows, say. The rows are read along their length (as
// fp32 rows in place, or converted into `staging`, rows x cols) and transposed in 16 x 16 blocks
// (ATen's AVX-512 transposes in that build), where a strided load_tile reads one scalar at a time:
// a narrow window's backward transposes its key blocks for only a few query blocks each.
template <typename T>
inline void load_transposed(float* dst, int64_t ld, const T* src, int64_t row_stride, int64_t col_stride, int64_t rows,
                            int64_t cols, float* staging) {
  const Rows r = fp32_tile(staging, cols, src, row_stride, col_stride, rows, cols);
  at::vec::transpose_mxn<float>(r.data, r.ld, dst, ld, static_cast<int>(rows), static_cast<int>(cols));
  for (int64_t c = 0; c < cols; ++c) fill(dst + c * ld + rows, ld - rows, 0.f);
}

// ------------------------------------------------------------------------------------------
// C (M x N) = [C +] A (M x K) * B (K x N)
//
// A is read one scalar at a time and broadcast, A(i, k) = a[i * a_rs + k * a_cs], so A can be a
// transposed view of a tile at no cost (P^T, dS^T). B and C are row-major and N is a multiple of
// kVec (tiles are zero-padded), so every B/C access is a full vector. B is fp32, or 16-bit rows
// read where they lie and converted as they are loaded (decoding's V, read once). The
// micro-kernel keeps an MR x (NR * kVec) block of C in registers over the whole K loop: 6 x 2
// vectors = 12 of the 16 AVX2 registers, plus 2 for B and 1 for the broadcast.

constexpr int kMR = 6;

// Before each loop over a register tile's rows or vectors: unrolled whole, the accumulators stay in
// registers for the whole call. Without it GCC 12 kept them in a stack array between the loads of C,
// the K loop and the stores (~100 extra vector moves a call: 7% of an fp32 forward at K = 64).
#define FUSED_ATTN_UNROLL _Pragma("GCC unroll 16")

template <int MR, int NR, typename TB>
inline void micro_kernel(int64_t K, const float* a, int64_t a_rs, int64_t a_cs, const TB* b, int64_t ldb,
                         float* c, int64_t ldc, bool accumulate) {
  Vec acc[MR][NR];
  FUSED_ATTN_UNROLL for (int i = 0; i < MR; ++i)
    FUSED_ATTN_UNROLL for (int j = 0; j < NR; ++j) acc[i][j] = accumulate ? Vec::loadu(c + i * ldc + j * kVec) : Vec(0.f);
  for (int64_t k = 0; k < K; ++k) {
    Vec bk[NR];
    FUSED_ATTN_UNROLL for (int j = 0; j < NR; ++j) bk[j] = load_as_floats(b + k * ldb + j * kVec);
    const float* ak = a + k * a_cs;
    FUSED_ATTN_UNROLL for (int i = 0; i < MR; ++i) {
      const Vec ai(ak[i * a_rs]);
      FUSED_ATTN_UNROLL for (int j = 0; j < NR; ++j) acc[i][j] = at::vec::fmadd(ai, bk[j], acc[i][j]);
    }
  }
  FUSED_ATTN_UNROLL for (int i = 0; i < MR; ++i)
    FUSED_ATTN_UNROLL for (int j = 0; j < NR; ++j) acc[i][j].store(c + i * ldc + j * kVec);
}

// One column panel of C (NR vectors wide), all M rows: full MR-row tiles, then the ragged rest.
template <int NR, typename TB>
inline void gemm_panel(int64_t M, int64_t K, const float* a, int64_t a_rs, int64_t a_cs, const TB* b,
                       int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  int64_t i = 0;
  for (; i + kMR <= M; i += kMR)
    micro_kernel<kMR, NR>(K, a + i * a_rs, a_rs, a_cs, b, ldb, c + i * ldc, ldc, accumulate);
  const float* ai = a + i * a_rs;
  float* ci = c + i * ldc;
  switch (M - i) {
    case 5: micro_kernel<5, NR>(K, ai, a_rs, a_cs, b, ldb, ci, ldc, accumulate); break;
    case 4: micro_kernel<4, NR>(K, ai, a_rs, a_cs, b, ldb, ci, ldc, accumulate); break;
    case 3: micro_kernel<3, NR>(K, ai, a_rs, a_cs, b, ldb, ci, ldc, accumulate); break;
    case 2: micro_kernel<2, NR>(K, ai, a_rs, a_cs, b, ldb, ci, ldc, accumulate); break;
    case 1: micro_kernel<1, NR>(K, ai, a_rs, a_cs, b, ldb, ci, ldc, accumulate); break;
    default: break;
  }
}

template <typename TB>
inline void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_rs, int64_t a_cs, const TB* b,
                 int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  int64_t j = 0;
  if constexpr (kVec == 16)
    for (; j + 4 * kVec <= N; j += 4 * kVec) gemm_panel<4>(M, K, a, a_rs, a_cs, b + j, ldb, c + j, ldc, accumulate);
  for (; j + 2 * kVec <= N; j += 2 * kVec) gemm_panel<2>(M, K, a, a_rs, a_cs, b + j, ldb, c + j, ldc, accumulate);
  if (j < N) gemm_panel<1>(M, K, a, a_rs, a_cs, b + j, ldb, c + j, ldc, accumulate);
}

// Banded products, for tiles that a window cuts (the causal diagonal, a window's edges): most of
// such a tile is hidden, and these compute only where some pair is visible.
//
// C (M x N) = A (M x K) B (K x N), rows in groups of `group`: group [i0, i0 + m) computes only its
// columns within cols(i0, m) = {begin, end}, widened to whole vectors; its other columns are set
// to `outside`. N and ldc as in gemm.
template <typename Cols>
inline void gemm_banded_columns(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_rs, int64_t a_cs,
                                const float* b, int64_t ldb, float* c, int64_t ldc, int64_t group, Cols cols,
                                float outside) {
  for (int64_t i0 = 0; i0 < M; i0 += group) {
    const int64_t m = std::min(group, M - i0);
    const auto [first, last] = cols(i0, m);
    const auto [begin, end] = whole_units(first, last, N, kVec);
    for (int64_t i = i0; i < i0 + m; ++i) {
      fill(c + i * ldc, begin, outside);
      fill(c + i * ldc + end, N - end, outside);
    }
    if (end > begin) gemm(m, end - begin, K, a + i0 * a_rs, a_rs, a_cs, b + begin, ldb, c + i0 * ldc + begin, ldc, false);
  }
}

// C (M x N) += A (M x K) B (K x N), rows in groups of kMR: group [i0, i0 + m) sums only over
// depth(i0, m) = {begin, end} of K, where the rest of its A is zero, so C gets the same bits as
// from gemm (the terms skipped are exact zeros, B finite).
template <typename Depth>
inline void gemm_banded_depth(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_rs, int64_t a_cs,
                              const float* b, int64_t ldb, float* c, int64_t ldc, Depth depth) {
  for (int64_t i0 = 0; i0 < M; i0 += kMR) {
    const int64_t m = std::min<int64_t>(kMR, M - i0);
    const auto [first, last] = depth(i0, m);
    const int64_t begin = std::clamp<int64_t>(first, 0, K), end = std::clamp<int64_t>(last, begin, K);
    if (end > begin)
      gemm(m, N, end - begin, a + i0 * a_rs + begin * a_cs, a_rs, a_cs, b + begin * ldb, ldb, c + i0 * ldc, ldc, true);
  }
}

// ------------------------------------------------------------------------------------------
// Scores of a block of few queries (decoding): S (cols x lds, a query per row) = Q K^T for
// cols <= kVec queries, as dot products along D. A gemm would spend a vector lane on every query
// up to a whole vector, most of them padding when one to four queries share the keys; here each
// key row is read once as vectors and multiplied with the queries' rows, which stay in L1, and
// only the final sums are spread across lanes.

// The sums of the lanes of kVec vectors, as one vector: result[i] = sum of v[i]'s lanes.
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// Eight 8-lane vectors: hadd pairs neighbouring lanes within each 128-bit half; two rounds leave
// [half sums of v0..v3 | of v0..v3] and the same for v4..v7, and the halves are then added.
inline __m256 sums_of_eight(const __m256* v) {
  const __m256 v01 = _mm256_hadd_ps(v[0], v[1]), v23 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 v45 = _mm256_hadd_ps(v[4], v[5]), v67 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 low = _mm256_hadd_ps(v01, v23), high = _mm256_hadd_ps(v45, v67);
  return _mm256_add_ps(_mm256_permute2f128_ps(low, high, 0x20), _mm256_permute2f128_ps(low, high, 0x31));
}
#endif

// (Inlined: called on an array of accumulators, it otherwise left them in memory, stored at every step.)
__attribute__((always_inline)) inline Vec lane_sums(const Vec (&v)[kVec]) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256 eight[8] = {v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]};
  return Vec(sums_of_eight(eight));
#elif defined(CPU_CAPABILITY_AVX512)
  // Fold each 16-lane vector onto 8 lanes (adding its halves), then two rounds of the above.
  __m256 folded[16];
  for (int i = 0; i < 16; ++i)
    folded[i] = _mm256_add_ps(_mm512_castps512_ps256(v[i]), _mm512_extractf32x8_ps(v[i], 1));
  return Vec(_mm512_insertf32x8(_mm512_castps256_ps512(sums_of_eight(folded)), sums_of_eight(folded + 8), 1));
#else
  float sums[kVec], lanes[kVec];
  for (int64_t i = 0; i < kVec; ++i) {
    v[i].store(lanes);
    sums[i] = 0.f;
    for (int64_t l = 0; l < kVec; ++l) sums[i] += lanes[l];
  }
  return Vec::loadu(sums);
#endif
}

// The largest and the sum of one vector's lanes (a NaN lane gives NaN).
inline float lane_max(Vec v) {
#if defined(CPU_CAPABILITY_AVX512)
  if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0) return std::numeric_limits<float>::quiet_NaN();
  return _mm512_reduce_max_ps(v);
#else
  float lanes[kVec], m = -kInf;
  v.store(lanes);
  bool nan = false;
  for (int64_t l = 0; l < kVec; ++l) {
    nan = nan || std::isnan(lanes[l]);
    m = std::max(m, lanes[l]);
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : m;
#endif
}
inline float lane_sum(Vec v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_add_ps(v);
#else
  float lanes[kVec];
  v.store(lanes);
  float sum = 0.f;
  for (int64_t l = 0; l < kVec; ++l) sum += lanes[l];
  return sum;
#endif
}

// Rows that decoding asks the memory for one key at a time, ahead of their use: row j (n rows,
// `bytes` long each) at data + j * ld bytes; none where data is null. The scores of few queries
// read kVec / kCols keys' rows in turn, a vector of each at a time, so no load instruction walks
// the rows at one stride and the CPU's stride prefetcher does not follow them: decoding from
// memory waited on every key row. The request is an asm statement: GCC 12 took a function whose
// only effect was __builtin_prefetch for one without side effects and deleted the calls to it.
struct RowStream {
  const char* data = nullptr;
  int64_t n = 0, ld = 0, bytes = 0;

  void fetch(int64_t j) const {
    if (j >= n) return;
    for (int64_t at = 0; at < bytes; at += 64) {
      const char* line = data + j * ld + at;
#if defined(__x86_64__)
      asm volatile("prefetcht0 %0" : : "m"(*line));
#elif defined(__aarch64__)
      asm volatile("prfm pldl1keep, [%0]" : : "r"(line));
#else
      __builtin_prefetch(line, 0, 3);
#endif
    }
  }
};

// What the scores of key j of a block ask for: a key row some keys ahead, and key j's value row,
// which the P V product reads after the block's softmax.
struct RowsAhead {
  RowStream keys, values;

  void fetch(int64_t j) const {
    keys.fetch(j);
    values.fetch(j);
  }
};

// Dot products of fp32 query rows with key rows of type TK (16-bit ones converted as they are
// loaded), kDepth elements of D per step; bf16.h has the AVX512-BF16 kind (Bf16Dots).
template <typename TK>
struct FloatDots {
  using Key = TK;
  using Query = float;
  using Operand = Vec;
  static constexpr int64_t kDepth = kVec;
  static Vec load_key(const TK* x) { return load_as_floats(x); }
  static Vec load_query(const float* x) { return Vec::loadu(x); }
  static Vec madd(Vec acc, Vec key, Vec query) { return at::vec::fmadd(key, query, acc); }
};

// AVX512-BF16 instructions (bf16.h: Bf16Dots, and the softmax's rounding of P) must be enabled in
// the function that holds them. Functions marked with this are compiled with them enabled for every
// type they are instantiated for; only the bf16 intrinsics produce such instructions, so the
// instances and branches without them run on any AVX-512 CPU (checked with objdump: the FloatDots
// scores hold none).
#if defined(CPU_CAPABILITY_AVX512)
#define FUSED_ATTN_BF16_DOTS __attribute__((target("avx512bf16")))
#else
#define FUSED_ATTN_BF16_DOTS
#endif

// kVec dot products along D of kVec / kCols rows (keys of one head, or one key's rows of several
// heads) with kCols query rows each: lane u * kCols + c of the result is rows[u] . (query row
// u * q_unit + c of q, rows D apart); q_unit is 0 where every row meets the same queries. (Inlined:
// GCC called it once per key and head group, zeroing its accumulators in memory; an fp32 decode of
// Hkv = 8 heads was ~7% slower.)
template <int kCols, typename Dots>
FUSED_ATTN_BF16_DOTS __attribute__((always_inline)) inline Vec row_dots(const typename Dots::Key* const* rows,
                                                                         const typename Dots::Query* q, int64_t q_unit,
                                                                         int64_t D) {
  constexpr int kRows = kVec / kCols;
  Vec acc[kVec];
  FUSED_ATTN_UNROLL for (Vec& a : acc) a = Vec(0.f);
  for (int64_t d = 0; d < D; d += Dots::kDepth) {
    typename Dots::Operand key[kRows];
    FUSED_ATTN_UNROLL for (int u = 0; u < kRows; ++u) key[u] = Dots::load_key(rows[u] + d);
    FUSED_ATTN_UNROLL for (int u = 0; u < kRows; ++u)
      FUSED_ATTN_UNROLL for (int c = 0; c < kCols; ++c) {
        // (with q_unit 0 the compiler loads each query vector once for all rows)
        const typename Dots::Operand query = Dots::load_query(q + (u * q_unit + c) * D + d);
        Vec& a = acc[u * kCols + c];
        a = Dots::madd(a, key[u], query);
      }
  }
  return lane_sums(acc);
}

// kCols queries (a power of two, >= cols) and kVec / kCols keys per step, one accumulator each.
// k: key rows (ldk apart, D a multiple of Dots::kDepth), q: the queries' rows (kCols x D, rows past
// cols zero); ahead: rows asked for, one per key. A short last step rereads the last key instead
// of reading past the block; S's rows (lds >= keys rounded up to kVec) take its scores too.
template <int kCols, typename Dots>
FUSED_ATTN_BF16_DOTS void few_query_scores(int64_t keys, int64_t D, const typename Dots::Key* k, int64_t ldk,
                                           const typename Dots::Query* q, int64_t cols, float* s, int64_t lds,
                                           const RowsAhead& ahead) {
  constexpr int kKeys = kVec / kCols;
  for (int64_t j = 0; j < keys; j += kKeys) {
    FUSED_ATTN_UNROLL for (int i = 0; i < kKeys; ++i) ahead.fetch(j + i);
    const typename Dots::Key* rows[kKeys];
    FUSED_ATTN_UNROLL for (int i = 0; i < kKeys; ++i) rows[i] = k + std::min<int64_t>(j + i, keys - 1) * ldk;
    float sums[kVec];
    row_dots<kCols, Dots>(rows, q, 0, D).store(sums);
    // All kKeys of a row's scores, a fixed count (std::copy of the few that are keys called memmove):
    // the extra ones of a short last step, the last key's again, lie in S's padding.
    for (int64_t c = 0; c < cols; ++c)
      FUSED_ATTN_UNROLL for (int i = 0; i < kKeys; ++i) s[c * lds + j + i] = sums[i * kCols + c];
  }
}

// Decoding's scores for the kCols query rows of each of `heads` key/value heads (a multiple of
// kVec / kCols) whose rows of a key lie side by side (head_stride apart; a (B, L, Hkv, D) cache),
// key by key, so that the keys are read in memory order, which the CPU's prefetcher follows (one
// head's rows alone, 256 bytes of every 2 KB, it does not). S row h * kCols + c is head h's query
// c, q's rows in the same order. k: key 0's row of the first head.
template <int kCols, typename Dots>
FUSED_ATTN_BF16_DOTS void kv_head_scores(int64_t keys, int64_t D, const typename Dots::Key* k, int64_t ldk,
                                         int64_t head_stride, int64_t heads, const typename Dots::Query* q, float* s,
                                         int64_t lds, const RowsAhead& ahead) {
  constexpr int kHeads = kVec / kCols;
  for (int64_t j = 0; j < keys; ++j) {
    ahead.fetch(j);
    for (int64_t h0 = 0; h0 < heads; h0 += kHeads) {
      const typename Dots::Key* rows[kHeads];
      FUSED_ATTN_UNROLL for (int i = 0; i < kHeads; ++i) rows[i] = k + j * ldk + (h0 + i) * head_stride;
      float sums[kVec];
      row_dots<kCols, Dots>(rows, q + h0 * kCols * D, kCols, D).store(sums);
      FUSED_ATTN_UNROLL for (int e = 0; e < kVec; ++e) s[(h0 * kCols + e) * lds + j] = sums[e];
    }
  }
}

// kv_head_scores for R query rows per head (1, 2, 4 or 8: within every build's kVec).
template <typename Dots>
inline void scores_of_kv_heads(int64_t keys, int64_t D, const typename Dots::Key* k, int64_t ldk, int64_t head_stride,
                               int64_t heads, const typename Dots::Query* q, int64_t R, float* s, int64_t lds,
                               const RowsAhead& ahead) {
  switch (R) {
    case 1: return kv_head_scores<1, Dots>(keys, D, k, ldk, head_stride, heads, q, s, lds, ahead);
    case 2: return kv_head_scores<2, Dots>(keys, D, k, ldk, head_stride, heads, q, s, lds, ahead);
    case 4: return kv_head_scores<4, Dots>(keys, D, k, ldk, head_stride, heads, q, s, lds, ahead);
    default: return kv_head_scores<8, Dots>(keys, D, k, ldk, head_stride, heads, q, s, lds, ahead);
  }
}

// Callers pass cols <= kVec (8 lanes in the AVX2 and portable builds, 16 in the AVX-512 one).
static_assert(kVec == 8 || kVec == 16, "scores_of_few_queries is instantiated for kVec = 8 or 16");
template <typename Dots>
inline void scores_of_few_queries(int64_t keys, int64_t D, const typename Dots::Key* k, int64_t ldk,
                                  const typename Dots::Query* q, int64_t cols, float* s, int64_t lds,
                                  const RowsAhead& ahead) {
  if (cols == 1) return few_query_scores<1, Dots>(keys, D, k, ldk, q, cols, s, lds, ahead);
  if (cols == 2) return few_query_scores<2, Dots>(keys, D, k, ldk, q, cols, s, lds, ahead);
  if (cols <= 4) return few_query_scores<4, Dots>(keys, D, k, ldk, q, cols, s, lds, ahead);
  if (cols <= 8 || kVec == 8) return few_query_scores<8, Dots>(keys, D, k, ldk, q, cols, s, lds, ahead);
  few_query_scores<kVec, Dots>(keys, D, k, ldk, q, cols, s, lds, ahead);
}

// ------------------------------------------------------------------------------------------
// exp(x) to about 1 ulp (Cephes expf): x = n ln2 + r with |r| <= ln2/2, exp(r) by a degree-7
// polynomial, 2^n built in the exponent bits. exp(-inf) = 0, which the masking relies on.
// (ATen's exp_u20 is faster but ~20 ulp, visible in fp32 outputs; Sleef is not linkable.)
inline Vec exp(Vec x) {
  const Vec lo(-87.33654f), hi(88.72283f);
  const Vec underflow = x < lo;
  x = at::vec::minimum(at::vec::maximum(x, lo), hi);
  const Vec n = (x * Vec(1.44269504088896341f)).round();
  Vec r = at::vec::fmadd(n, Vec(-0.693359375f), x);   // ln2 in two parts: the high part is exact
  r = at::vec::fmadd(n, Vec(2.12194440e-4f), r);     // in float, so r has no cancellation error
  Vec p(1.9875691500e-4f);
  p = at::vec::fmadd(p, r, Vec(1.3981999507e-3f));
  p = at::vec::fmadd(p, r, Vec(8.3334519073e-3f));
  p = at::vec::fmadd(p, r, Vec(4.1665795894e-2f));
  p = at::vec::fmadd(p, r, Vec(1.6666665459e-1f));
  p = at::vec::fmadd(p, r, Vec(5.0000001201e-1f));
  p = at::vec::fmadd(p, r * r, r) + Vec(1.f);
  const auto bits = (at::vec::convert_to_int_of_same_size(n) + at::vec::Vectorized<int32_t>(127))
                    << at::vec::Vectorized<int32_t>(23);
  const Vec result = p * at::vec::cast<float>(bits);
  return Vec::blendv(result, Vec(0.f), underflow);
}

// exp(x) for x <= 88 by 2^t, t = x log2(e) clamped at -127: n = round(t), 2^(t - n) by a
// polynomial of degree kDegree on [-1/2, 1/2] fitted for relative error, 1 + f (c1 + ...) so
// exact at 0, and 2^n built in the exponent bits, which are 0 at n = -127: exp(-inf) = 0, NaN stays
// NaN, and above 88 the result is garbage. Relative error, through the rounding of t: degree 4
// < 3.8e-6, degree 6 ~1 ulp where the probabilities that matter lie (x within a few units of 0).
// Degree 4 takes 11 instructions and degree 6 13, to exp's 19 (whose range reduction keeps 1 ulp
// at any x).
template <int kDegree>
inline Vec exp_by_powers_of_two(Vec x) {
  static_assert(kDegree == 4 || kDegree == 6, "coefficients are fitted for degrees 4 and 6");
  constexpr float c4[] = {6.931241750717163e-1f, 2.4024099111557007e-1f, 5.590633675456047e-2f,
                          9.5828203484416e-3f};
  constexpr float c6[] = {6.931471824645996e-1f, 2.4022647738456726e-1f, 5.5503323674201965e-2f,
                          9.61843691766262e-3f, 1.339887036010623e-3f, 1.535334886284545e-4f};
  const float* c = kDegree == 4 ? c4 : c6;
  const Vec t = at::vec::clamp_min(x * Vec(1.44269504088896341f), Vec(-127.f));  // NaN passes
  // z = t + 1.5 * 2^23 + 127 lies in [2^23, 2^24), where floats are the integers: adding rounds t
  // to nearest even, leaves n + 127 in z's low mantissa bits, and z's bits shifted up by 23 are 2^n
  // (3 instructions where round, convert, add and shift take 5).
  constexpr float kRoundBiased = 12582912.f + 127.f;
  const Vec z = t + Vec(kRoundBiased);
  const Vec f = t - (z - Vec(kRoundBiased));
  Vec p(c[kDegree - 1]);
  for (int i = kDegree - 2; i >= 0; --i) p = at::vec::fmadd(p, f, Vec(c[i]));
  p = at::vec::fmadd(p, f, Vec(1.f));
  return p * at::vec::cast<float>(at::vec::cast<int32_t>(z) << at::vec::Vectorized<int32_t>(23));
}

// exp of the shifted scores (<= 0), for the probabilities of inputs of type T. Exact at 0 matters:
// a row's maximum gives P = 1, so the lse of a row that one key dominates is its score. fp32 takes
// ~1 ulp; 16-bit inputs < 4e-6, far below their rounding (and the bf16 products round P to bf16).
// (ATen's fexp_u20, used for 16-bit inputs before, was as fast but ~1e-4 off, and 1 - 5e-5 at 0:
// a bias every fp16/bf16 lse carried.)
template <typename T>
inline Vec probability_exp(Vec x) {
  return exp_by_powers_of_two<std::is_same_v<T, float> ? 6 : 4>(x);
}
