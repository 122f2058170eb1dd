// How every native kernel (csrc/cpu/ and csrc/cuda/) sees its tensors: raw pointers and element
// strides, no torch and no CUDA types. The binding (binding.cpp) builds these once for both.
#pragma once

#include <cstdint>

namespace fused_attn {

enum class DType { Float32, BFloat16, Float16 };

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A float mask (bias) value at or below this hides its key as -inf does: torch.finfo(float32).min
// and finfo(bfloat16).min (Hugging Face's padding value) are below it. Every backend draws the line
// here, where Triton's base-2 scores (bias * log2(e)) would overflow to -inf anyway; a finite score
// that low would otherwise be a row's maximum, and lse = max + log(sum) would lose the sum.
constexpr float kHidingBias = -0x1p127f;

// A (B, H, L, D) tensor: element pointer and element strides, any layout (the common
// sequence-major (B, L, H, D) view is read in place; packed (total, H, D) tensors have batch
// stride 0, their sequences being row ranges). Mask and bias views have stride 0 along their
// broadcast dims. The CUDA kernels also need col == 1 for q, k, v and out (the Python side makes
// the last dim contiguous).
struct Strided {
  void* data;
  int64_t batch, head, row, col;
};

// One float per query row of each head (lse, its gradient, delta): row i of head (b, h) is
// data[b * batch + h * head + i]. Dense (B, H, L) and packed (H, total) tensors alike.
struct RowValues {
  float* data;
  int64_t batch, head;

  float* at(int64_t b, int64_t h, int64_t i) const { return data + b * batch + h * head + i; }
};

}  // namespace fused_attn
