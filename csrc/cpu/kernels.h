// The CPU kernels for one instruction set. A translation unit defines FUSED_ATTN_ISA (the
// namespace), FUSED_ATTN_ISA_NAME and ATen's CPU_CAPABILITY macros, then includes this file:
// kernels_portable.cpp and kernels_avx2.cpp are the whole of those units.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../common/philox.h"
#include "params.h"

#ifndef FUSED_ATTN_ISA
#error "define FUSED_ATTN_ISA (the namespace of this instruction set's kernels) before including kernels.h"
#endif

namespace fused_attn::cpu::FUSED_ATTN_ISA {
namespace {

#include "tile.h"
#include "bf16.h"
#include "scores.h"
#include "rows.h"
#include "forward.h"
#include "backward.h"

}  // namespace

const Kernels kKernels = {FUSED_ATTN_ISA_NAME, bf16_kind_name, bf16_backward_takes_products, forward,
                          merge_splits,        backward_dq,      backward_dkdv,        backward_delta,
                          backward_fused};

}  // namespace fused_attn::cpu::FUSED_ATTN_ISA
