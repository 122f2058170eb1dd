// The kernels compiled for any CPU of the target architecture (no flags beyond the defaults).
// Linked before kernels_avx2.cpp, and that before kernels_avx512.cpp, on purpose: where several
// units emit the same inline function from a shared header (c10, libstdc++), the linker keeps
// the first copy, so code that may run on a CPU without AVX2 (or without AVX-512) never ends up
// calling a copy compiled for more than it has.
#define CPU_CAPABILITY DEFAULT
#define FUSED_ATTN_ISA portable
#define FUSED_ATTN_ISA_NAME "portable"
#include "kernels.h"

namespace fused_attn::cpu {
const Kernels& portable_kernels() { return portable::kKernels; }
}  // namespace fused_attn::cpu
