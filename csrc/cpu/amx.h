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

#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kAmxBuild = true;
#else
constexpr bool kAmxBuild = false;
#endif

// Whether this build takes the AMX products on this CPU. FUSED_ATTN_CPU_AMX=0 turns them off
// (read at every call, like FUSED_ATTN_CPU_ISA), for comparing the two and for tests.
inline bool amx_bf16_enabled() {
  if (!kAmxBuild) return false;
  static const bool available = at::native::cpublas::could_pack(at::kBFloat16);
  const char* env = std::getenv("FUSED_ATTN_CPU_AMX");
  return available && !(env != nullptr && std::string(env) == "0");
}

// Why the forward may take the AMX products for this call's shapes: D is the products' depth
// (even), Dv their width (whole chunks of 16 columns).
inline bool amx_shapes(int64_t D, int64_t Dv) { return D % 2 == 0 && Dv % 16 == 0; }

// C (M x N, ldc) [+]= A (M x K, lda) * packed B, N in chunks of at most kAmxMaxN columns: chunk
// c0 of B lies at packed + c0 * K, as pack_columns writes it.
inline void amx_gemm(int64_t M, int64_t N, int64_t K, const Bf16* a, int64_t lda, const Bf16* packed, float* c,
                     int64_t ldc, bool accumulate) {
  for (int64_t c0 = 0; c0 < N; c0 += kAmxMaxN) {
    const int64_t n = std::min(kAmxMaxN, N - c0);
    at::native::cpublas::brgemm(M, n, K, lda, n, ldc, accumulate, a, packed + c0 * K, c + c0, true);
  }
}

// B (K x N, row-major, ld) into the VNNI layout, chunk by chunk as amx_gemm reads it.
inline void pack_columns(const Bf16* b, int64_t ld, int64_t K, int64_t N, Bf16* packed) {
  for (int64_t c0 = 0; c0 < N; c0 += kAmxMaxN) {
    const int64_t n = std::min(kAmxMaxN, N - c0);
    at::native::cpublas::pack(K, n, ld, n, at::kBFloat16, at::kBFloat16, b + c0, packed + c0 * K);
  }
}

// P (cols x keys_even, bf16) from P^T (keys x ld, fp32), with a zero column when keys is odd.
inline void transpose_to_bf16(const float* pt, int64_t ld, int64_t keys, int64_t cols, Bf16* p, int64_t keys_even) {
  for (int64_t i = 0; i < cols; ++i) {
    Bf16* row = p + i * keys_even;
    for (int64_t j = 0; j < keys; ++j) row[j] = static_cast<Bf16>(pt[j * ld + i]);
    if (keys_even != keys) row[keys] = Bf16(0.f);
  }
}
