// The kernels compiled for x86-64 CPUs with AVX-512 (F, BW, VL, DQ: what ATen's 16-lane vector
// code needs) plus FMA and F16C: setup.py compiles this file alone with those flags and links it
// after the portable and AVX2 units (see kernels_portable.cpp for why the order matters). The
// binding calls these kernels only after checking the CPU at run time. Built without those flags
// (another architecture) the file provides no kernels.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    defined(__FMA__) && defined(__F16C__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define FUSED_ATTN_ISA avx512
#define FUSED_ATTN_ISA_NAME "avx512"
#include "kernels.h"

namespace fused_attn::cpu {
const Kernels* avx512_kernels() { return &avx512::kKernels; }
}  // namespace fused_attn::cpu

#else
#include "params.h"

namespace fused_attn::cpu {
const Kernels* avx512_kernels() { return nullptr; }
}  // namespace fused_attn::cpu
#endif
