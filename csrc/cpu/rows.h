// Rows of K, V, Q and dO as the kernels read them: key rows through a paged cache's table, runs of
// rows that lie together, tiles read in place where they can be (else converted or gathered), and
// the rows decoding asks for ahead.
// Included by kernels.h inside namespace fused_attn::cpu::FUSED_ATTN_ISA.

// Key j's row of K or V of (b, hk), through the page table of a paged cache.
template <typename T>
const T* key_row(const Strided& s, const Pages& pages, int64_t b, int64_t hk, int64_t j) {
  if (pages.table == nullptr) return at_row<T>(s, b, hk, j);
  return at_row<T>(s, pages.table[b * pages.table_stride + j / pages.size], hk, j % pages.size);
}

// How many of keys [j, end) lie in one run of rows from key j's: all of them, or in a paged cache
// those up to the end of j's page.
inline int64_t rows_in_run(const Pages& pages, int64_t j, int64_t end) {
  return pages.table == nullptr ? end - j : std::min(pages.size - j % pages.size, end - j);
}

// Rows [k0, k0 + n) of K or V of (b, hk) into dst as load_tile does, run by run.
template <typename T>
void load_key_rows(float* dst, int64_t ld, const Strided& s, const Pages& pages, int64_t b, int64_t hk, int64_t k0,
                   int64_t n, int64_t cols) {
  for (int64_t j = k0, run; j < k0 + n; j += run) {
    run = rows_in_run(pages, j, k0 + n);
    load_tile(dst + (j - k0) * ld, ld, key_row<T>(s, pages, b, hk, j), s.row, s.col, run, cols);
  }
}

// Rows [begin, end) of K or V of (b, hk) for decoding to ask for ahead (tile.h, RowsAhead): those
// in begin's page run (all of them without pages); none when the range is empty or a row is not
// contiguous.
template <typename T>
RowStream row_stream(const Strided& s, const Pages& pages, int64_t b, int64_t hk, int64_t begin, int64_t end,
                     int64_t cols) {
  if (begin >= end || s.col != 1) return {};
  const int64_t size = sizeof(T);
  return {reinterpret_cast<const char*>(key_row<T>(s, pages, b, hk, begin)), rows_in_run(pages, begin, end),
          s.row * size, cols * size};
}

// How many keys ahead of the one whose scores it computes decoding asks for a key row. On a Zen 5
// EPYC (Hq=32, Hkv=8, D=128, 8k keys from memory, 2 threads), 16 to 64 were alike and 128 or more
// slower; asking for them read a bf16 cache 1.8x faster and an fp32 one 1.15x, and also asking for
// the value rows ~4% more.
constexpr int64_t kKeysAhead = 32;
// The same where a task reads every head's rows of a key, side by side, key after key (forward.h,
// decoding_step): on the Zen 5 EPYC (Hkv = 8, D = 128, bf16, 16k keys, 1 thread) asking 2 to 8
// keys ahead was ~1.15x faster than leaving it to the CPU's prefetcher, 16 or more slower.
constexpr int64_t kKeysAheadInOrder = 4;

// Rows [k0, k0 + n) of (b, hk) of s (K or V through a paged cache's table; Q, dO with no pages)
// as fp32 tiles (tile.h, fp32_tile), read where they lie when they lie within one page: the
// forward reads each key block once per query block, and the backward each Q and dO block once
// per key block, so a copy of an fp32 tile would cost about as much as its products.
template <typename T>
Rows fp32_rows(float* dst, int64_t ld, const Strided& s, const Pages& pages, int64_t b, int64_t hk, int64_t k0,
               int64_t n, int64_t cols) {
  if (rows_in_run(pages, k0, k0 + n) == n)
    return fp32_tile(dst, ld, key_row<T>(s, pages, b, hk, k0), s.row, s.col, n, cols);
  load_key_rows<T>(dst, ld, s, pages, b, hk, k0, n, cols);
  return {dst, ld};
}

// Rows [k0, k0 + n) of K or V of (b, hk) for decoding's products, which read each key once: f(rows,
// ld) gets them as fp32_rows does, except that 16-bit rows that could be read in place as tiles
// (unit column stride, cols a whole number of vectors, one page run) are, in their own dtype:
// the products convert them as they load them, where a copy first would be a second pass over
// every key.
template <typename T, typename F>
void with_key_rows(float* dst, int64_t ld, const Strided& s, const Pages& pages, int64_t b, int64_t hk, int64_t k0,
                   int64_t n, int64_t cols, F f) {
  if constexpr (!std::is_same_v<T, float>) {
    if (s.col == 1 && cols % kVec == 0 && rows_in_run(pages, k0, k0 + n) == n)
      return f(key_row<T>(s, pages, b, hk, k0), s.row);
  }
  const Rows rows = fp32_rows<T>(dst, ld, s, pages, b, hk, k0, n, cols);
  f(rows.data, rows.ld);
}

// bf16 rows for the bf16 products (bf16.h): rows [k0, k0 + n) of K, V (through the page table of a
// paged cache), Q or dO of (b, h) where they lie when they can be read in place (unit column
// stride, one page run, and n even where `even` asks for the pairs of rows that packing reads),
// else copied into dst (n rows, plus a zero row when n is odd and `even`, of cols).
struct Bf16Rows {
  const Bf16* data;
  int64_t ld;
};
inline Bf16Rows bf16_rows(Bf16* dst, const Strided& s, const Pages& pages, int64_t b, int64_t hk, int64_t k0,
                              int64_t n, int64_t cols, bool even) {
  if (s.col == 1 && rows_in_run(pages, k0, k0 + n) == n && !(even && n % 2 == 1))
    return {key_row<Bf16>(s, pages, b, hk, k0), s.row};
  for (int64_t j = 0; j < n; ++j) {
    const Bf16* row = key_row<Bf16>(s, pages, b, hk, k0 + j);
    for (int64_t c = 0; c < cols; ++c) dst[j * cols + c] = row[c * s.col];
  }
  if (even && n % 2 == 1) std::fill(dst + n * cols, dst + (n + 1) * cols, Bf16(0.f));
  return {dst, cols};
}
