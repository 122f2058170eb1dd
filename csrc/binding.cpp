// The torch binding of fused_attn's native kernels: ops in the `fused_attn_native` namespace.
//
//   cpu_forward(q, k, v, out!, lse!, scale, window_left, window_right, shift, softcap, alibi_slopes, mask, bias,
//               dropout_seed, dropout_p)
//   cpu_backward(dout, dlse, q, k, v, out, lse, dq!, dk!, dv!, <the forward's arguments from scale on>, dbias!)
//   cpu_isa() -> str       which kernels the next call runs: "avx2" or "portable"
//
// Outputs are passed in (allocated by fused_attn/backends/cpu_backend.py), so their layout follows
// fused_attn/layout.py in one place. The ops are called inside the opaque custom op
// fused_attn::forward / fused_attn::backward, which carry autograd and fake implementations.
//
// The kernels exist once per instruction set; the environment variable FUSED_ATTN_CPU_ISA
// (auto | portable | avx2, read at every call) overrides the choice made from the CPU.
#include <Python.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu/params.h"

namespace fused_attn {
namespace {

using at::Tensor;

bool cpu_has_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  // libgcc also checks that the OS saves the AVX registers.
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

const cpu::Kernels& select_kernels() {
  const cpu::Kernels* avx2 = cpu::avx2_kernels();
  const bool avx2_ok = avx2 != nullptr && cpu_has_avx2();
  const char* env = std::getenv("FUSED_ATTN_CPU_ISA");
  const std::string wanted = env == nullptr ? "" : env;
  if (wanted.empty() || wanted == "auto") return avx2_ok ? *avx2 : cpu::portable_kernels();
  if (wanted == "portable") return cpu::portable_kernels();
  if (wanted == "avx2") {
    TORCH_CHECK(avx2 != nullptr, "FUSED_ATTN_CPU_ISA=avx2, but this build has no AVX2 kernels");
    TORCH_CHECK(avx2_ok, "FUSED_ATTN_CPU_ISA=avx2, but this CPU lacks AVX2, FMA or F16C");
    return *avx2;
  }
  TORCH_CHECK(false, "FUSED_ATTN_CPU_ISA must be auto, portable or avx2, got '", wanted, "'");
}

cpu::DType kernel_dtype(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cpu::DType::Float32;
    case at::kBFloat16: return cpu::DType::BFloat16;
    case at::kHalf: return cpu::DType::Float16;
    default: TORCH_CHECK(false, "fused_attn_native: dtype ", t.scalar_type(), " (supports float32, bfloat16, float16)");
  }
}

cpu::Strided strided(const Tensor& t) {
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

void check_tensor(const Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), "fused_attn_native: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "fused_attn_native: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "fused_attn_native: ", name, " must have shape ", shape, ", got ", t.sizes());
}

// The arguments both ops take after their tensors: scale and the variants (params.h, Variants).
// Window bounds are -1 (unbounded) or >= 0; causal is window_right = 0; shift aligns query i with
// key i + shift. alibi_slopes: float32 (Hq,) or (B, Hq). mask (bool) and bias (float32): views
// of shape (B, Hq, Lq, Lk), broadcast ones (stride 0) welcome; they are read in place.
// dropout_seed: int64 (1,), the Philox key (fused_attn/dropout.py), needed when dropout_p > 0.
#define FUSED_ATTN_VARIANT_PARAMS                                                                       \
  double scale, int64_t window_left, int64_t window_right, int64_t shift, double softcap,               \
      const std::optional<Tensor>&alibi_slopes, const std::optional<Tensor>&mask,                         \
      const std::optional<Tensor>&bias, const std::optional<Tensor>&dropout_seed, double dropout_p
#define FUSED_ATTN_VARIANT_ARGS \
  scale, window_left, window_right, shift, softcap, alibi_slopes, mask, bias, dropout_seed, dropout_p
#define FUSED_ATTN_VARIANT_SCHEMA                                                                        \
  "float scale, int window_left, int window_right, int shift, float softcap=0., Tensor? alibi_slopes=None, " \
  "Tensor? mask=None, Tensor? bias=None, Tensor? dropout_seed=None, float dropout_p=0."

// Checks q, k, v against each other and the variants' tensors against them; returns the problem.
cpu::Problem problem_of(const Tensor& q, const Tensor& k, const Tensor& v, FUSED_ATTN_VARIANT_PARAMS) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "fused_attn_native: q, k, v must be (B, H, L, D)");
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2), Dv = v.size(3);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "fused_attn_native: query heads (", Hq, ") must be a multiple of key/value heads (", Hkv, ")");
  TORCH_CHECK(B > 0 && Lq > 0 && Lk > 0 && D > 0 && Dv > 0, "fused_attn_native: empty inputs are handled in Python");
  kernel_dtype(q);
  check_tensor(q, "q", q.scalar_type(), q.sizes());
  check_tensor(k, "k", q.scalar_type(), {B, Hkv, Lk, D});
  check_tensor(v, "v", q.scalar_type(), {B, Hkv, Lk, Dv});
  TORCH_CHECK(window_left >= -1 && window_right >= -1, "fused_attn_native: window bounds must be >= -1");
  cpu::Variants variants;
  variants.window_left = window_left;
  variants.window_right = window_right;
  variants.shift = shift;
  variants.softcap = static_cast<float>(softcap);
  if (alibi_slopes) {
    const Tensor& slopes = *alibi_slopes;
    TORCH_CHECK(slopes.device().is_cpu() && slopes.scalar_type() == at::kFloat,
                "fused_attn_native: alibi_slopes must be a float32 CPU tensor");
    TORCH_CHECK(slopes.sizes() == at::IntArrayRef({Hq}) || slopes.sizes() == at::IntArrayRef({B, Hq}),
                "fused_attn_native: alibi_slopes must have shape (Hq,) or (B, Hq), got ", slopes.sizes());
    const Tensor expanded = slopes.expand({B, Hq});  // stride 0 along the batch of (Hq,) slopes
    variants.alibi_slopes = slopes.data_ptr<float>();
    variants.slopes_batch = expanded.stride(0);
    variants.slopes_head = expanded.stride(1);
  }
  if (mask) {
    check_tensor(*mask, "mask", at::kBool, {B, Hq, Lq, Lk});
    variants.mask = strided(*mask);
  }
  if (bias) {
    check_tensor(*bias, "bias", at::kFloat, {B, Hq, Lq, Lk});
    variants.bias = strided(*bias);
  }
  if (dropout_p > 0) {
    TORCH_CHECK(dropout_p < 1, "fused_attn_native: dropout_p must be < 1");
    TORCH_CHECK(dropout_seed && dropout_seed->device().is_cpu() && dropout_seed->scalar_type() == at::kLong &&
                    dropout_seed->numel() == 1,
                "fused_attn_native: dropout needs dropout_seed, an int64 CPU tensor of one element");
    variants.dropout = true;
    variants.dropout_seed = static_cast<uint64_t>(*dropout_seed->data_ptr<int64_t>());
    // round(p * 2^32) as fused_attn/dropout.py's keep_threshold (ties to even, like Python's round)
    variants.drop_threshold = static_cast<uint32_t>(std::min(std::nearbyint(dropout_p * 4294967296.0), 4294967295.0));
    variants.keep_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  }
  return {kernel_dtype(q), B, Hq, Hkv, Lq, Lk, D, Dv, static_cast<float>(scale), variants};
}

void cpu_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                 FUSED_ATTN_VARIANT_PARAMS) {
  const cpu::Problem p = problem_of(q, k, v, FUSED_ATTN_VARIANT_ARGS);
  check_tensor(out, "out", q.scalar_type(), {p.batch, p.heads_q, p.seqlen_q, p.head_dim_v});
  check_tensor(lse, "lse", at::kFloat, {p.batch, p.heads_q, p.seqlen_q});
  TORCH_CHECK(lse.is_contiguous(), "fused_attn_native: lse must be contiguous");
  const cpu::ForwardArgs args{p, strided(q), strided(k), strided(v), strided(out), lse.data_ptr<float>()};
  const cpu::Kernels& kernels = select_kernels();
  at::parallel_for(0, cpu::forward_tasks(p), 1, [&](int64_t begin, int64_t end) { kernels.forward(args, begin, end); });
}

// The one-pass backward does 5 block products per (query block, key block) pair where the
// two-pass one does 7, but has only B * Hkv tasks (of equal size): take it when that parallelism
// is not worse than the extra work, ceil(tasks / threads) * 5 <= tasks / threads * 7.
bool prefer_one_pass(const cpu::Problem& p) {
  const int64_t tasks = cpu::fused_tasks(p), threads = at::get_num_threads();
  return cpu::ceil_div(tasks, threads) * 5 * threads <= tasks * 7;
}

void cpu_backward(const Tensor& dout, const Tensor& dlse, const Tensor& q, const Tensor& k, const Tensor& v,
                  const Tensor& out, const Tensor& lse, const Tensor& dq, const Tensor& dk, const Tensor& dv,
                  FUSED_ATTN_VARIANT_PARAMS, const std::optional<Tensor>& dbias) {
  const cpu::Problem p = problem_of(q, k, v, FUSED_ATTN_VARIANT_ARGS);
  const std::vector<int64_t> rows{p.batch, p.heads_q, p.seqlen_q};
  check_tensor(out, "out", q.scalar_type(), {p.batch, p.heads_q, p.seqlen_q, p.head_dim_v});
  check_tensor(dout, "dout", q.scalar_type(), out.sizes());
  check_tensor(lse, "lse", at::kFloat, rows);
  check_tensor(dlse, "dlse", at::kFloat, rows);
  check_tensor(dq, "dq", q.scalar_type(), q.sizes());
  check_tensor(dk, "dk", q.scalar_type(), k.sizes());
  check_tensor(dv, "dv", q.scalar_type(), v.sizes());
  // Row vectors are tiny next to the inputs; contiguous copies keep the kernels' indexing simple.
  const Tensor lse_c = lse.contiguous(), dlse_c = dlse.contiguous();
  const Tensor delta = at::empty(rows, lse.options());
  cpu::Strided dbias_view{nullptr, 0, 0, 0, 0};
  if (dbias) {
    check_tensor(*dbias, "dbias", at::kFloat, {p.batch, p.heads_q, p.seqlen_q, p.seqlen_k});
    TORCH_CHECK(bias, "fused_attn_native: dbias without bias");
    dbias_view = strided(*dbias);
  }
  const cpu::BackwardArgs args{p, strided(q), strided(k), strided(v), strided(out), strided(dout),
                               strided(dq), strided(dk), strided(dv), lse_c.data_ptr<float>(),
                               dlse_c.data_ptr<float>(), delta.data_ptr<float>(), dbias_view};
  const cpu::Kernels& kernels = select_kernels();
  // Both schedules give the same bits; the choice is only about speed, except that the bias
  // gradient is summed by the two-pass one's dK/dV tasks (params.h, dkdv_split). Every pass reads
  // the delta of rows other tasks write, hence separate parallel loops.
  if (prefer_one_pass(p) && !dbias) {
    at::parallel_for(0, cpu::dq_tasks(p), 1, [&](int64_t begin, int64_t end) { kernels.backward_delta(args, begin, end); });
    at::parallel_for(0, cpu::fused_tasks(p), 1, [&](int64_t begin, int64_t end) { kernels.backward_fused(args, begin, end); });
  } else {
    at::parallel_for(0, cpu::dq_tasks(p), 1, [&](int64_t begin, int64_t end) { kernels.backward_dq(args, begin, end); });
    at::parallel_for(0, cpu::dkdv_tasks(p, dbias_view), 1, [&](int64_t begin, int64_t end) { kernels.backward_dkdv(args, begin, end); });
  }
}

std::string cpu_isa() { return select_kernels().isa; }

}  // namespace
}  // namespace fused_attn

TORCH_LIBRARY(fused_attn_native, m) {
  m.def("cpu_forward(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor(b!) lse, " FUSED_ATTN_VARIANT_SCHEMA
        ") -> ()");
  m.def("cpu_backward(Tensor dout, Tensor dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv, " FUSED_ATTN_VARIANT_SCHEMA ", Tensor(d!)? dbias=None) -> ()");
  m.def("cpu_isa() -> str", &fused_attn::cpu_isa);
}

TORCH_LIBRARY_IMPL(fused_attn_native, CPU, m) {
  m.impl("cpu_forward", &fused_attn::cpu_forward);
  m.impl("cpu_backward", &fused_attn::cpu_backward);
}

// `import fused_attn._native` loads this library, which registers the ops above; the module
// itself is empty.
static PyModuleDef native_module = {PyModuleDef_HEAD_INIT, "_native",
                                    "fused_attn's C++ kernels, registered as torch.ops.fused_attn_native.*", -1,
                                    nullptr};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&native_module); }
