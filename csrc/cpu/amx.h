// bf16 matrix products on Intel AMX through libtorch's exported ukernel (at::native::cpublas::
// brgemm, oneDNN underneath): the forward's two products, S^T = K Q^T and acc += P V, with bf16
// operands and fp32 results. On a 2-core Sapphire Rapids one such 64 x 64 x 64 product runs at
// ~1 TFLOP/s per core, 15x the fp32 AVX-512 micro-kernel (tile.h), so the softmax becomes the
// work. Used by the AVX-512 build only (every AMX CPU has AVX-512), for bf16 inputs, when
// cpublas::could_pack says the CPU has AMX-BF16.
//
// brgemm computes C (M x N) [+]= A (M x K) B (K x N): A row-major bf16, B packed by cpublas::pack
// into the VNNI layout (pairs of K rows interleaved), C row-major fp32. The ukernel needs N a
// multiple of 16, at most 64, and K even; callers split N into chunks and pad K with a zero row.
//
// Included by kernels.h inside namespace fused_attn::cpu::FUSED_ATTN_ISA.

using Bf16 = c10::BFloat16;
constexpr int64_t kAmxMaxN = 64;
// Keys per step of the forward's AMX products (and per block of its packed keys), 8 x kBlockN: a brgemm call costs about the same
// for a depth of 64 or 128 (P V's depth is the keys), every call that follows one of another
// shape reloads the tile configuration, and the softmax's per-row work is amortized over more
// keys (2-core Sapphire Rapids, L = 2048 and 4096, D = 64: 256 keys 1.15x faster than 128, 512
// another 1.04x).
constexpr int64_t kAmxBlockN = 512;

#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kAmxBuild = true;
#else
constexpr bool kAmxBuild = false;
#endif

// Whether this build takes the AMX products on this CPU. FUSED_ATTN_CPU_AMX=0 turns them off
// (read at every call, like FUSED_ATTN_CPU_ISA), for comparing the two and for tests.
inline bool amx_bf16_enabled() {
  if (!kAmxBuild) return false;
  // (forward.h softmax_update_rows also takes AVX512-BF16 for granted: every AMX-BF16 CPU has it)
  static const bool available =
      at::native::cpublas::could_pack(at::kBFloat16) && __builtin_cpu_supports("avx512bf16");
  const char* env = std::getenv("FUSED_ATTN_CPU_AMX");
  return available && !(env != nullptr && std::string(env) == "0");
}

// Whether the forward may take the AMX products for these head dims: D is a product's depth
// (even), Dv a product's width (whole chunks of 16 columns). The backward's products have both as
// widths.
inline bool amx_shapes(int64_t D, int64_t Dv) { return D % 2 == 0 && Dv % 16 == 0; }
inline bool amx_backward_shapes(int64_t D, int64_t Dv) { return D % 16 == 0 && Dv % 16 == 0; }

// Whether a bf16 backward with these head dims takes the AMX products (binding.cpp then always
// takes the one-pass schedule: the two-pass one's dq pass computes in fp32, and schedules must
// agree bit for bit).
inline bool bf16_backward_on_amx(int64_t D, int64_t Dv) { return amx_backward_shapes(D, Dv) && amx_bf16_enabled(); }

// C (M x N, ldc) [+]= A (M x K, lda) * packed B, N in chunks of at most kAmxMaxN columns as
// pack_columns wrote them: chunk c0 of B lies at packed + c0 * packed_depth, and rows
// [first, first + K) of it are used (first and K even, first + K <= packed_depth; in the VNNI
// layout row pair r / 2 of an n-column chunk starts n * r elements in). N must be the width B was
// packed with, or a whole number of chunks of it.
inline void amx_gemm(int64_t M, int64_t N, int64_t K, const Bf16* a, int64_t lda, const Bf16* packed, float* c,
                     int64_t ldc, bool accumulate, int64_t packed_depth = 0, int64_t first = 0) {
  if (packed_depth == 0) packed_depth = K;
  for (int64_t c0 = 0; c0 < N; c0 += kAmxMaxN) {
    const int64_t n = std::min(kAmxMaxN, N - c0);
    at::native::cpublas::brgemm(M, n, K, lda, n, ldc, accumulate, a, packed + c0 * packed_depth + first * n, c + c0,
                                true);
  }
}

// B (K x N, row-major, ld, K even) into the VNNI layout, chunk by chunk as amx_gemm reads it: as
// rows [first, first + K) of chunks packed_depth rows deep (by default B alone, K deep).
inline void pack_columns(const Bf16* b, int64_t ld, int64_t K, int64_t N, Bf16* packed, int64_t packed_depth = 0,
                         int64_t first = 0) {
  if (packed_depth == 0) packed_depth = K;
  for (int64_t c0 = 0; c0 < N; c0 += kAmxMaxN) {
    const int64_t n = std::min(kAmxMaxN, N - c0);
    at::native::cpublas::pack(K, n, ld, n, at::kBFloat16, at::kBFloat16, b + c0, packed + c0 * packed_depth + first * n);
  }
}

// dst (cols x rows, ld_dst) = src^T, src (rows x cols, ld_src) in bf16, 32 x 32 at a time.
inline void transpose_bf16(const Bf16* src, int64_t ld_src, int64_t rows, int64_t cols, Bf16* dst, int64_t ld_dst) {
  for (int64_t i = 0; i < rows; i += 32)
    for (int64_t j = 0; j < cols; j += 32)
      at::vec::transpose_mxn<Bf16>(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst,
                                   std::min<int64_t>(32, rows - i), std::min<int64_t>(32, cols - j));
}

// B = R^T (dim x width, zero in its columns past n) packed for amx_gemm, R being n rows of dim
// (ld apart), through `staging` (dim x width).
inline void pack_transposed(const Bf16* rows, int64_t ld, int64_t n, int64_t dim, int64_t width, Bf16* staging,
                            Bf16* packed) {
  transpose_bf16(rows, ld, n, dim, staging, width);
  for (int64_t d = 0; d < dim; ++d) std::fill(staging + d * width + n, staging + (d + 1) * width, Bf16(0.f));
  pack_columns(staging, width, dim, width, packed);
}

// rows x cols of an fp32 tile (ld) rounded to bf16 into dst (ld), plus zero rows up to rows_even.
inline void round_rows(const float* src, int64_t rows, int64_t rows_even, int64_t ld, Bf16* dst) {
  at::vec::convert(src, dst, rows * ld);
  std::fill(dst + rows * ld, dst + rows_even * ld, Bf16(0.f));
}

// The forward's bf16 buffers for blocks of up to bm query columns and bn keys (one per thread).
class AmxBuffers {
 public:
  AmxBuffers(int64_t D, int64_t Dv, int64_t bm, int64_t bn)
      : scratch_(Scratch::size_of({Scratch::halves(bm * D), Scratch::halves(bm * bn), bm * Dv})),
        q_rows(scratch_.take_halves(bm * D)),
        p(scratch_.take_halves(bm * bn)),
        pv(scratch_.take(bm * Dv)) {}

 private:
  Scratch scratch_;

 public:
  Bf16* const q_rows;  // the block's query rows (cols x D), where they cannot be read in place
  Bf16* const p;       // P rounded to bf16 (cols x bn)
  float* const pv;     // P V of the block (cols x Dv), before it joins the accumulator
};

// The backward's bf16 buffers for one key block of up to bn keys against query blocks of up to
// bm rows (one per thread): its fixed operands, packed once per key block, and per query block
// the rows that cannot be read in place and the products' operands.
class AmxBackwardBuffers {
 public:
  AmxBackwardBuffers(int64_t D, int64_t Dv, int64_t bm, int64_t bn)
      : scratch_(floats_for({bn * std::max(D, Dv), std::max(D, Dv) * bn, D * bn, Dv * bn, bn * D, bm * D, bm * D,
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
