// The kernels compiled for x86-64 CPUs with AVX2 and FMA: setup.py compiles this file alone
// with -mavx2 -mfma -mf16c (ATen's AVX2 vector code needs all three). The binding calls these
// kernels only after checking the CPU at run time (__builtin_cpu_supports), so one build runs
// everywhere. Built without those flags (another
// architecture) the file provides no kernels and the portable ones serve every call.
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define FUSED_ATTN_ISA avx2
#define FUSED_ATTN_ISA_NAME "avx2"
#include "kernels.h"

namespace fused_attn::cpu {
const Kernels* avx2_kernels() { return &avx2::kKernels; }
}  // namespace fused_attn::cpu

#else
#include "params.h"

namespace fused_attn::cpu {
const Kernels* avx2_kernels() { return nullptr; }
}  // namespace fused_attn::cpu
#endif
