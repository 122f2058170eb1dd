// The torch binding of fused_attn's native kernels: ops in the `fused_attn_native` namespace.
//
//   cpu_forward(q, k, v, out!, lse!, scale, window_left, window_right, bottom_right, softcap, alibi_slopes, mask,
//               bias, dropout_seed, dropout_p, cu_seqlens_q, cu_seqlens_k, for_backward)    dense or packed
//               (varlen) inputs; for_backward: a backward will follow (params.h, ForwardArgs)
//   cpu_backward(dout, dlse, q, k, v, out, lse, dq!, dk!, dv!, <the forward's arguments from scale on>, dbias!)
//   cpu_kvcache_forward(q, k_cache!, v_cache!, seqlens_k, block_table, out!, lse!, scale, window_left,
//                       window_right, softcap, alibi_slopes, k_new, v_new)   decoding against a KV cache,
//                       after writing a step's new tokens (if given) into it
//   cpu_isa() -> str       which kernels the next call runs: "avx512", "avx2" or "portable"
//   cpu_bf16_products() -> str  what their bf16 products run on: "amx", "avx512-bf16" or "fp32"
//
// Outputs are passed in (allocated by fused_attn/backends/cpu_backend.py), so their layout follows
// fused_attn/layout.py in one place. The ops are called inside the opaque custom ops
// fused_attn::forward / fused_attn::backward / fused_attn::kvcache_forward, which carry autograd
// and fake implementations.
//
// The kernels exist once per instruction set; the environment variable FUSED_ATTN_CPU_ISA
// (auto | portable | avx2 | avx512, read at every call) overrides the choice made from the CPU,
// and FUSED_ATTN_CPU_BF16 (amx | dot | fp32) caps the bf16 products they may use (cpu/bf16.h).
//
// With FUSED_ATTN_WITH_CUDA (setup.py defines it when it builds csrc/cuda/), also
//   cuda_forward(q, k, v, out!, lse!, <the variant arguments>, int stream)   dense inputs, CUDA tensors
//   cuda_backward(<cpu_backward's arguments>, int stream)
//   cuda_kvcache_forward(<cpu_kvcache_forward's arguments>, int num_splits, int stream)   KV-cache decoding
// whose kernels are launched on `stream` (torch.cuda.current_stream().cuda_stream, an int, so this
// file needs no CUDA header of torch's). With FUSED_ATTN_EMULATOR as well (tests/cuda_emulator/),
// only that section is compiled, its ops are registered as fused_attn_emulated::* on CPU tensors,
// and the stream is ignored: the CUDA kernels run on the emulator.
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

#ifdef FUSED_ATTN_WITH_CUDA
#include <c10/core/DeviceGuard.h>

#include "cuda/backward_launch.h"
#include "cuda/launch.h"
#endif

namespace fused_attn {
namespace {

using at::Tensor;

#ifndef FUSED_ATTN_EMULATOR
bool cpu_has_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  // libgcc also checks that the OS saves the AVX registers.
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  // libgcc also checks that the OS saves the AVX-512 registers.
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

// One instruction set's kernels, forced by FUSED_ATTN_CPU_ISA: an error if unusable here.
const cpu::Kernels& forced(const char* name, const cpu::Kernels* kernels, bool cpu_ok, const char* needs) {
  TORCH_CHECK(kernels != nullptr, "FUSED_ATTN_CPU_ISA=", name, ", but this build has no ", name, " kernels");
  TORCH_CHECK(cpu_ok, "FUSED_ATTN_CPU_ISA=", name, ", but this CPU lacks ", needs);
  return *kernels;
}

const cpu::Kernels& select_kernels() {
  TORCH_CHECK(cpu::bf16_cap() != cpu::Bf16Cap::invalid,
              "FUSED_ATTN_CPU_BF16 must be amx, dot or fp32 (the fastest bf16 products the cpu kernels may use), got '",
              std::getenv("FUSED_ATTN_CPU_BF16"), "'");
  const cpu::Kernels* avx2 = cpu::avx2_kernels();
  const cpu::Kernels* avx512 = cpu::avx512_kernels();
  const char* env = std::getenv("FUSED_ATTN_CPU_ISA");
  const std::string wanted = env == nullptr ? "" : env;
  if (wanted.empty() || wanted == "auto") {
    if (avx512 != nullptr && cpu_has_avx512()) return *avx512;
    if (avx2 != nullptr && cpu_has_avx2()) return *avx2;
    return cpu::portable_kernels();
  }
  if (wanted == "portable") return cpu::portable_kernels();
  if (wanted == "avx2") return forced("avx2", avx2, cpu_has_avx2(), "AVX2, FMA or F16C");
  if (wanted == "avx512") return forced("avx512", avx512, cpu_has_avx512(), "AVX-512 F/BW/VL/DQ, AVX2, FMA or F16C");
  TORCH_CHECK(false, "FUSED_ATTN_CPU_ISA must be auto, portable, avx2 or avx512, got '", wanted, "'");
}
#endif  // FUSED_ATTN_EMULATOR

DType kernel_dtype(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kBFloat16: return DType::BFloat16;
    case at::kHalf: return DType::Float16;
    default: TORCH_CHECK(false, "fused_attn_native: dtype ", t.scalar_type(), " (supports float32, bfloat16, float16)");
  }
}

// (B, H, L, D) tensors as they are; packed (total, H, D) ones as (B, H, total, D) with batch
// stride 0, their sequences being row ranges (params.h, sequence).
Strided strided(const Tensor& t) {
  if (t.dim() == 3) return {t.data_ptr(), 0, t.stride(1), t.stride(0), t.stride(2)};
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Dense (B, H, L) or packed (H, total) row values, rows contiguous.
RowValues row_values(const Tensor& t) {
  TORCH_CHECK(t.stride(-1) == 1, "fused_attn_native: row values (lse, dlse) must have contiguous rows");
  if (t.dim() == 2) return {t.data_ptr<float>(), 0, t.stride(0)};
  return {t.data_ptr<float>(), t.stride(0), t.stride(1)};
}

// t must live on `device` (the CPU ops' default) with this dtype and shape.
void check_tensor(const Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape,
                  at::Device device = at::kCPU) {
  TORCH_CHECK(t.device() == device, "fused_attn_native: ", name, " must be on ", device, ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "fused_attn_native: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "fused_attn_native: ", name, " must have shape ", shape, ", got ", t.sizes());
}

// Sequence lengths read on the host (cu_seqlens and cache lengths are CPU tensors): they build
// the task tables, so no task is spent on padding. Checked here, as the kernels trust them.
std::vector<int64_t> lengths_of(const Tensor& t, const char* name, int64_t entries, bool cumulative, int64_t limit) {
  check_tensor(t, name, at::kInt, {entries});
  TORCH_CHECK(t.is_contiguous(), "fused_attn_native: ", name, " must be contiguous");
  const int32_t* values = t.data_ptr<int32_t>();
  std::vector<int64_t> lengths;
  if (cumulative) {
    TORCH_CHECK(values[0] == 0, "fused_attn_native: ", name, " must start at 0");
    for (int64_t b = 0; b + 1 < entries; ++b) lengths.push_back(values[b + 1] - values[b]);
  } else {
    lengths.assign(values, values + entries);
  }
  if (!cumulative) {  // (one message either side: a traced KV-cache call marks a sequence outside its cache -1)
    for (int64_t length : lengths)
      TORCH_CHECK(length >= 0 && length <= limit, "fused_attn_native: ", name, " must lie within [0, ", limit,
                  "], got ", length);
    return lengths;
  }
  int64_t total = 0;
  for (int64_t length : lengths) {
    TORCH_CHECK(length >= 0, "fused_attn_native: ", name, " must be non-decreasing");
    total += length;
  }
  TORCH_CHECK(total <= limit, "fused_attn_native: ", name, " goes past the ", limit, " rows of its tensor");
  return lengths;
}

// A checked call: the kernels' Problem and every sequence's lengths.
struct Call {
  cpu::Problem p;
  std::vector<int64_t> seqlens_q, seqlens_k;
};

#ifndef FUSED_ATTN_EMULATOR
// The task table (params.h, TaskTable) whose group b has count(b) tasks.
template <typename Count>
std::vector<int64_t> task_table(int64_t groups, Count count) {
  std::vector<int64_t> first{0};
  for (int64_t b = 0; b < groups; ++b) first.push_back(first.back() + count(b));
  return first;
}
cpu::TaskTable table_view(const std::vector<int64_t>& first) {
  return {first.data(), static_cast<int64_t>(first.size()) - 1};
}
#endif  // FUSED_ATTN_EMULATOR

// The variants every kernel call may have. Window bounds are -1 (unbounded) or >= 0; causal is
// window_right = 0; bottom_right aligns each sequence's last query with its last key.
// alibi_slopes: float32 (Hq,) or (B, Hq), on the call's device.
cpu::Variants variants_of(int64_t B, int64_t Hq, int64_t window_left, int64_t window_right, bool bottom_right,
                          double softcap, const std::optional<Tensor>& alibi_slopes, at::Device device = at::kCPU) {
  TORCH_CHECK(window_left >= -1 && window_right >= -1, "fused_attn_native: window bounds must be >= -1");
  cpu::Variants variants;
  variants.window_left = window_left;
  variants.window_right = window_right;
  variants.bottom_right = bottom_right;
  variants.softcap = static_cast<float>(softcap);
  if (alibi_slopes) {
    const Tensor& slopes = *alibi_slopes;
    TORCH_CHECK(slopes.device() == device && slopes.scalar_type() == at::kFloat,
                "fused_attn_native: alibi_slopes must be a float32 tensor on ", device);
    TORCH_CHECK(slopes.sizes() == at::IntArrayRef({Hq}) || slopes.sizes() == at::IntArrayRef({B, Hq}),
                "fused_attn_native: alibi_slopes must have shape (Hq,) or (B, Hq), got ", slopes.sizes());
    const Tensor expanded = slopes.expand({B, Hq});  // stride 0 along the batch of (Hq,) slopes
    variants.alibi_slopes = slopes.data_ptr<float>();
    variants.slopes_batch = expanded.stride(0);
    variants.slopes_head = expanded.stride(1);
  }
  return variants;
}

// The arguments of cpu_forward and cpu_backward after their tensors: scale and the variants
// (above, and params.h, Variants). mask (bool) and bias (float32): views of shape
// (B, Hq, Lq, Lk), broadcast ones (stride 0) welcome; they are read in place. dropout_seed: int64
// (1,), the Philox key (fused_attn/dropout.py), needed when dropout_p > 0. cu_seqlens_q/k: int32
// (B + 1,) for packed q (total_q, Hq, D), k and v (total_k, Hkv, D), which take no mask or bias.
#define FUSED_ATTN_VARIANT_PARAMS                                                                          \
  double scale, int64_t window_left, int64_t window_right, bool bottom_right, double softcap,              \
      const std::optional<Tensor>&alibi_slopes, const std::optional<Tensor>&mask,                            \
      const std::optional<Tensor>&bias, const std::optional<Tensor>&dropout_seed, double dropout_p,          \
      const std::optional<Tensor>&cu_seqlens_q, const std::optional<Tensor>&cu_seqlens_k
#define FUSED_ATTN_VARIANT_ARGS                                                                            \
  scale, window_left, window_right, bottom_right, softcap, alibi_slopes, mask, bias, dropout_seed, dropout_p, \
      cu_seqlens_q, cu_seqlens_k
#define FUSED_ATTN_VARIANT_SCHEMA                                                                              \
  "float scale, int window_left, int window_right, bool bottom_right, float softcap=0., "                      \
  "Tensor? alibi_slopes=None, Tensor? mask=None, Tensor? bias=None, Tensor? dropout_seed=None, "               \
  "float dropout_p=0., Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None"

// cu_seqlens left on the device (the CUDA ops: the kernels read them, so no host sync): its
// dtype, shape and layout checked; its values are fused_attn/varlen.py's to check.
void check_device_lengths(const Tensor& t, const char* name, int64_t entries, at::Device device) {
  check_tensor(t, name, at::kInt, {entries}, device);
  TORCH_CHECK(t.is_contiguous(), "fused_attn_native: ", name, " must be contiguous");
}

// Checks q, k, v against each other and the variants' tensors against them, all on `device`.
// The dropout key is read here from a CPU seed; on other devices the kernels read it themselves.
// Packed lengths are read from cu_seqlens on the host, unless `longest` gives the longest query
// and key sequences (then cu_seqlens stay on the device, see check_device_lengths).
Call call_of(const Tensor& q, const Tensor& k, const Tensor& v, FUSED_ATTN_VARIANT_PARAMS,
             at::Device device = at::kCPU, std::optional<std::pair<int64_t, int64_t>> longest = std::nullopt) {
  const bool packed = q.dim() == 3;
  TORCH_CHECK(cu_seqlens_q.has_value() == packed && cu_seqlens_k.has_value() == packed,
              "fused_attn_native: packed (total, H, D) inputs come with cu_seqlens_q and cu_seqlens_k, and only they");
  TORCH_CHECK((q.dim() == 4 || packed) && k.dim() == q.dim() && v.dim() == q.dim(),
              "fused_attn_native: q, k, v must be (B, H, L, D), or (total, H, D) when packed");
  const int64_t Hq = q.size(1), Hkv = k.size(1), D = q.size(-1), Dv = v.size(-1);  // dim 1: heads, both layouts
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "fused_attn_native: query heads (", Hq, ") must be a multiple of key/value heads (", Hkv, ")");
  kernel_dtype(q);
  check_tensor(q, "q", q.scalar_type(), q.sizes(), device);
  Call call;
  const int64_t B = packed ? cu_seqlens_q->numel() - 1 : q.size(0);
  if (packed) {
    check_tensor(k, "k", q.scalar_type(), {k.size(0), Hkv, D}, device);
    check_tensor(v, "v", q.scalar_type(), {k.size(0), Hkv, Dv}, device);
    TORCH_CHECK(B > 0, "fused_attn_native: cu_seqlens_q must have batch + 1 >= 2 entries");
    if (longest) {
      check_device_lengths(*cu_seqlens_q, "cu_seqlens_q", B + 1, device);
      check_device_lengths(*cu_seqlens_k, "cu_seqlens_k", B + 1, device);
      TORCH_CHECK(longest->first >= 0 && longest->first <= q.size(0) && longest->second >= 0 &&
                      longest->second <= k.size(0),
                  "fused_attn_native: max_seqlen_q and max_seqlen_k must be in [0, packed rows], got ",
                  longest->first, " and ", longest->second);
      call.seqlens_q = {longest->first};
      call.seqlens_k = {longest->second};
    } else {
      call.seqlens_q = lengths_of(*cu_seqlens_q, "cu_seqlens_q", B + 1, true, q.size(0));
      call.seqlens_k = lengths_of(*cu_seqlens_k, "cu_seqlens_k", B + 1, true, k.size(0));
    }
    TORCH_CHECK(!mask && !bias, "fused_attn_native: packed inputs take no mask or bias");
  } else {
    check_tensor(k, "k", q.scalar_type(), {B, Hkv, k.size(2), D}, device);
    check_tensor(v, "v", q.scalar_type(), {B, Hkv, k.size(2), Dv}, device);
    call.seqlens_q.assign(B, q.size(2));
    call.seqlens_k.assign(B, k.size(2));
  }
  const int64_t Lq = *std::max_element(call.seqlens_q.begin(), call.seqlens_q.end());
  const int64_t Lk = *std::max_element(call.seqlens_k.begin(), call.seqlens_k.end());
  TORCH_CHECK(B > 0 && D > 0 && Dv > 0 && (packed || (Lq > 0 && Lk > 0)),
              "fused_attn_native: empty inputs are handled in Python");
  cpu::Variants variants = variants_of(B, Hq, window_left, window_right, bottom_right, softcap, alibi_slopes, device);
  if (mask) {
    check_tensor(*mask, "mask", at::kBool, {B, Hq, Lq, Lk}, device);
    variants.mask = strided(*mask);
  }
  if (bias) {
    // A bias in q's dtype is read as it is (converting an L x L bias to float32 would cost a pass
    // over it and its copy).
    const bool own_dtype = bias->scalar_type() == q.scalar_type();
    check_tensor(*bias, "bias", own_dtype ? q.scalar_type() : at::kFloat, {B, Hq, Lq, Lk}, device);
    variants.bias = strided(*bias);
    variants.bias_dtype = kernel_dtype(*bias);
  }
  if (dropout_p > 0) {
    TORCH_CHECK(dropout_p < 1, "fused_attn_native: dropout_p must be < 1");
    TORCH_CHECK(dropout_seed && dropout_seed->device() == device && dropout_seed->scalar_type() == at::kLong &&
                    dropout_seed->numel() == 1,
                "fused_attn_native: dropout needs dropout_seed, an int64 tensor of one element on ", device);
    variants.dropout = true;
    if (device.is_cpu()) variants.dropout_seed = static_cast<uint64_t>(*dropout_seed->data_ptr<int64_t>());
    // round(p * 2^32) as fused_attn/dropout.py's keep_threshold (ties to even, like Python's round)
    variants.drop_threshold = static_cast<uint32_t>(std::min(std::nearbyint(dropout_p * 4294967296.0), 4294967295.0));
    variants.keep_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  }
  call.p = {kernel_dtype(q), B, Hq, Hkv, Lq, Lk, D, Dv, static_cast<float>(scale), variants};
  if (packed) {
    call.p.cu_seqlens_q = cu_seqlens_q->data_ptr<int32_t>();
    call.p.cu_seqlens_k = cu_seqlens_k->data_ptr<int32_t>();
  }
  return call;
}

// The shapes of out and lse: (B, Hq, Lq, Dv) and (B, Hq, Lq), or packed (total_q, Hq, Dv) and (Hq, total_q).
std::vector<int64_t> out_shape(const Tensor& q, const Tensor& v) {
  std::vector<int64_t> shape = q.sizes().vec();
  shape.back() = v.size(-1);
  return shape;
}
std::vector<int64_t> lse_shape(const Tensor& q) {
  if (q.dim() == 3) return {q.size(1), q.size(0)};
  return {q.size(0), q.size(1), q.size(2)};
}

#ifndef FUSED_ATTN_EMULATOR
// Packed rows past the last sequence (dim `dim` of t, rows from cu_seqlens[B] on) belong to no
// sequence: the caller fills them as an empty sequence's rows (out 0, lse -inf, gradients 0).
Tensor unused_rows(const Tensor& t, int64_t dim, const int32_t* cu_seqlens, int64_t batch) {
  return t.narrow(dim, cu_seqlens[batch], t.size(dim) - cu_seqlens[batch]);
}

// Split-KV for a call of uniform query length Lq whose sequences are at most `longest` keys long,
// when it has too few tasks for a many-core CPU (params.h, split_keys): the splits, and the one
// float32 buffer of their partial results, (acc, max, sum) per (b, h, query row, split), which
// `partials` keeps alive. No split: splits.keys = 0.
cpu::Splits split_kv(const cpu::Problem& p, int64_t Lq, int64_t longest, Tensor& partials) {
  cpu::Splits splits;
  splits.keys = cpu::split_keys(p.batch * cpu::forward_tasks(p, Lq), longest, p.kv_heads_per_task);
  if (splits.keys != 0) {
    splits.count = cpu::ceil_div(longest, splits.keys);
    const int64_t rows = p.batch * p.heads_q * Lq * splits.count;
    partials = at::empty({rows * (p.head_dim_v + 2)}, at::TensorOptions().dtype(at::kFloat));
    splits.acc = partials.data_ptr<float>();
    splits.max = splits.acc + rows * p.head_dim_v;
    splits.sum = splits.max + rows;
  }
  return splits;
}

// Key/value heads per task of a decoding call (params.h, Problem::kv_heads_per_task): all of them
// where K's and V's rows of a key lie side by side for every head (a (B, L, Hkv, D) cache, or
// transposed views of such tensors) and the call's queries fit one task (every query head's rows,
// up to 8 per key/value head: any build's vector holds them, a multiple of 16 in all), so that the
// task reads the keys in memory order; else 1.
int64_t decoding_kv_heads(const cpu::Problem& p, const cpu::Strided& k, const cpu::Strided& v, int64_t seqlen_q) {
  const int64_t rows = p.heads_q * seqlen_q, per_head = rows / p.heads_kv;
  const bool side_by_side = k.col == 1 && v.col == 1 && k.head == p.head_dim && v.head == p.head_dim_v;
  const bool fits = rows <= cpu::kBlockM && rows % 16 == 0 && per_head <= 8 && (per_head & (per_head - 1)) == 0;
  return p.heads_kv > 1 && side_by_side && fits && p.head_dim % 16 == 0 ? p.heads_kv : 1;
}

// The forward's tasks (params.h, ForwardArgs): with args.splits, each sequence's split tasks, then
// the merge of their partials into out and lse.
void run_forward(const cpu::Kernels& kernels, const cpu::ForwardArgs& args) {
  at::parallel_for(0, args.tasks.count(), 1, [&](int64_t begin, int64_t end) { kernels.forward(args, begin, end); });
  if (args.splits.keys != 0) {
    const int64_t rows = args.p.batch * args.p.heads_q;
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) { kernels.merge_splits(args, begin, end); });
  }
}

void cpu_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                 FUSED_ATTN_VARIANT_PARAMS, bool for_backward) {
  Call call = call_of(q, k, v, FUSED_ATTN_VARIANT_ARGS);
  check_tensor(out, "out", q.scalar_type(), out_shape(q, v));
  check_tensor(lse, "lse", at::kFloat, lse_shape(q));
  const cpu::Kernels& kernels = select_kernels();  // (its checks come before any allocation)
  // Dense calls that no backward follows (which recomputes the scores of whole blocks) and that
  // take no mask, bias or dropout are decoding's, however short their keys: split-KV, as
  // cpu_kvcache_forward, so that a few-query call against long keys uses every core.
  const bool decoding = !for_backward && call.p.cu_seqlens_q == nullptr && !mask && !bias && dropout_p == 0;
  if (decoding) call.p.kv_heads_per_task = decoding_kv_heads(call.p, strided(k), strided(v), call.p.seqlen_q);
  Tensor partials;
  const cpu::Splits splits = decoding ? split_kv(call.p, call.p.seqlen_q, call.p.seqlen_k, partials) : cpu::Splits{};
  const std::vector<int64_t> tasks = task_table(call.p.batch, [&](int64_t b) {
    return cpu::forward_tasks(call.p, call.seqlens_q[b]) * splits.of(call.seqlens_k[b]);
  });
  run_forward(kernels, {call.p, strided(q), strided(k), strided(v), strided(out), row_values(lse), table_view(tasks),
                        {}, splits, for_backward});
  if (call.p.cu_seqlens_q != nullptr) {
    unused_rows(out, 0, call.p.cu_seqlens_q, call.p.batch).zero_();
    unused_rows(lse, 1, call.p.cu_seqlens_q, call.p.batch).fill_(-INFINITY);
  }
}

// The one-pass backward does 5 block products per (query block, key block) pair where the
// two-pass one does 7, but has only B * Hkv tasks, each as big as its sequence: take it when its
// longest thread (at::parallel_for gives each thread ceil(tasks / threads) consecutive tasks)
// has no more work than the two-pass schedule spread evenly. Work is counted in query x key rows.
bool prefer_one_pass(const Call& call) {
  const int64_t tasks = call.p.batch * call.p.heads_kv;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), tasks);
  const int64_t chunk = cpu::ceil_div(tasks, threads);
  double total = 0, longest = 0, current = 0;
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t b = task / call.p.heads_kv;
    const double work = static_cast<double>(call.seqlens_q[b]) * static_cast<double>(call.seqlens_k[b]);
    total += work;
    current = task % chunk == 0 ? work : current + work;
    longest = std::max(longest, current);
  }
  return longest * 5 * threads <= total * 7;
}

void cpu_backward(const Tensor& dout, const Tensor& dlse, const Tensor& q, const Tensor& k, const Tensor& v,
                  const Tensor& out, const Tensor& lse, const Tensor& dq, const Tensor& dk, const Tensor& dv,
                  FUSED_ATTN_VARIANT_PARAMS, const std::optional<Tensor>& dbias) {
  const Call call = call_of(q, k, v, FUSED_ATTN_VARIANT_ARGS);
  const cpu::Problem& p = call.p;
  check_tensor(out, "out", q.scalar_type(), out_shape(q, v));
  check_tensor(dout, "dout", q.scalar_type(), out.sizes());
  check_tensor(lse, "lse", at::kFloat, lse_shape(q));
  check_tensor(dlse, "dlse", at::kFloat, lse.sizes());
  check_tensor(dq, "dq", q.scalar_type(), q.sizes());
  check_tensor(dk, "dk", q.scalar_type(), k.sizes());
  check_tensor(dv, "dv", q.scalar_type(), v.sizes());
  // Row vectors are tiny next to the inputs; contiguous copies keep the kernels' indexing simple.
  const Tensor lse_c = lse.contiguous(), dlse_c = dlse.contiguous();
  const Tensor delta = at::empty(lse.sizes(), lse.options());
  cpu::Strided dbias_view{nullptr, 0, 0, 0, 0};
  DType dbias_dtype = DType::Float32;
  if (dbias) {
    TORCH_CHECK(bias, "fused_attn_native: dbias without bias");
    // A 16-bit dbias takes each element's one term, rounded once; summed terms need float32.
    bool one_term = true;
    for (int64_t d = 0; d < 4; ++d) one_term = one_term && (dbias->stride(d) != 0 || dbias->size(d) == 1);
    const bool own_dtype = one_term && dbias->scalar_type() == bias->scalar_type();
    check_tensor(*dbias, "dbias", own_dtype ? bias->scalar_type() : at::kFloat,
                 {p.batch, p.heads_q, p.seqlen_q, p.seqlen_k});
    dbias_view = strided(*dbias);
    dbias_dtype = kernel_dtype(*dbias);
  }
  const cpu::DkdvSplit split = cpu::dkdv_split(dbias_view);
  const std::vector<int64_t> query_tasks =
      task_table(p.batch, [&](int64_t b) { return cpu::dq_tasks(p, call.seqlens_q[b]); });
  const std::vector<int64_t> key_tasks = task_table(
      split.batches ? p.batch : 1, [&](int64_t b) { return cpu::dkdv_tasks(p, split, call.seqlens_k[b]); });
  const cpu::BackwardArgs args{p, strided(q), strided(k), strided(v), strided(out), strided(dout),
                               strided(dq), strided(dk), strided(dv), row_values(lse_c), row_values(dlse_c),
                               row_values(delta), dbias_view, dbias_dtype, table_view(query_tasks),
                               table_view(key_tasks)};
  const cpu::Kernels& kernels = select_kernels();
  // Both schedules give the same bits; the choice is only about speed, except that some bias
  // gradients need the two-pass one's task split (params.h, one_pass_owns_dbias). Every pass reads
  // the delta of rows other tasks write, hence separate parallel loops.
  // bf16 with bf16 products computes in the one-pass schedule only (bf16.h bf16_backward_kind).
  const bool bf16_products =
      p.dtype == cpu::DType::BFloat16 && kernels.bf16_backward_takes_products(p.head_dim, p.head_dim_v);
  if ((bf16_products || prefer_one_pass(call)) && cpu::one_pass_owns_dbias(p, dbias_view)) {
    at::parallel_for(0, query_tasks.back(), 1, [&](int64_t begin, int64_t end) { kernels.backward_delta(args, begin, end); });
    at::parallel_for(0, p.batch * p.heads_kv, 1, [&](int64_t begin, int64_t end) { kernels.backward_fused(args, begin, end); });
  } else {
    at::parallel_for(0, query_tasks.back(), 1, [&](int64_t begin, int64_t end) { kernels.backward_dq(args, begin, end); });
    at::parallel_for(0, key_tasks.back(), 1, [&](int64_t begin, int64_t end) { kernels.backward_dkdv(args, begin, end); });
  }
  if (p.cu_seqlens_q != nullptr) {
    unused_rows(dq, 0, p.cu_seqlens_q, p.batch).zero_();
    unused_rows(dk, 0, p.cu_seqlens_k, p.batch).zero_();
    unused_rows(dv, 0, p.cu_seqlens_k, p.batch).zero_();
  }
}

// A decoding step's new keys or values, `rows` (B, Hkv, Lnew, D) as strided() sees them, written
// into `cache` (pages, Hkv, page_size, D) in place at positions seqlens[b] .. seqlens[b] + Lnew - 1
// of each sequence (through the page table of a paged cache, whose pages were checked; a contiguous
// cache's batch b is its page b). Elements are copied as bits: the dtypes match.
template <typename Bits>
void copy_new_rows(const Strided& cache, const Strided& rows, int64_t B, int64_t Lnew, int64_t H, int64_t D,
                   int64_t page_size, const int32_t* seqlens, const cpu::Pages& pages) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < Lnew; ++i) {
      const int64_t position = seqlens[b] + i;
      const int64_t page = pages.table != nullptr ? pages.table[b * pages.table_stride + position / page_size] : b;
      Bits* to = static_cast<Bits*>(cache.data) + page * cache.batch + position % page_size * cache.row;
      const Bits* from = static_cast<const Bits*>(rows.data) + b * rows.batch + i * rows.row;
      for (int64_t h = 0; h < H; ++h)
        for (int64_t d = 0; d < D; ++d) to[h * cache.head + d * cache.col] = from[h * rows.head + d * rows.col];
    }
}

void append_rows(const Tensor& cache, const Tensor& rows, const Tensor& seqlens, const cpu::Pages& pages) {
  const Strided to = strided(cache.transpose(1, 2)), from = strided(rows.transpose(1, 2));
  const int64_t B = rows.size(0), Lnew = rows.size(1), H = rows.size(2), D = rows.size(3), page_size = cache.size(1);
  const int32_t* lengths = seqlens.data_ptr<int32_t>();
  if (cache.element_size() == 2) return copy_new_rows<uint16_t>(to, from, B, Lnew, H, D, page_size, lengths, pages);
  copy_new_rows<uint32_t>(to, from, B, Lnew, H, D, page_size, lengths, pages);
}

// Decoding: q (B, Lq, Hq, D) against the first seqlens_k[b] + Lnew keys of a contiguous cache
// (B, capacity, Hkv, D) or, with block_table (B, max_pages) int32, of a paged one
// (pages, page_size, Hkv, D); bottom-right aligned. out (B, Lq, Hq, Dv), lse (B, Hq, Lq). With
// k_new, v_new (B, Lnew, Hkv, D / Dv) their rows are first written into the caches after each
// sequence's seqlens_k[b] keys (in place; Lnew = 0 without them).
void cpu_kvcache_forward(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& seqlens_k,
                         const std::optional<Tensor>& block_table, const Tensor& out, const Tensor& lse, double scale,
                         int64_t window_left, int64_t window_right, double softcap,
                         const std::optional<Tensor>& alibi_slopes, const std::optional<Tensor>& k_new,
                         const std::optional<Tensor>& v_new) {
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4,
              "fused_attn_native: q (B, Lq, Hq, D), k_cache and v_cache must be 4-dimensional");
  const int64_t B = q.size(0), Lq = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Hkv = k_cache.size(2), Dv = v_cache.size(3), page_size = k_cache.size(1);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "fused_attn_native: query heads (", Hq, ") must be a multiple of key/value heads (", Hkv, ")");
  TORCH_CHECK(B > 0 && Lq > 0 && D > 0 && Dv > 0, "fused_attn_native: empty inputs are handled in Python");
  kernel_dtype(q);
  check_tensor(q, "q", q.scalar_type(), q.sizes());
  check_tensor(k_cache, "k_cache", q.scalar_type(), {k_cache.size(0), page_size, Hkv, D});
  check_tensor(v_cache, "v_cache", q.scalar_type(), {k_cache.size(0), page_size, Hkv, Dv});
  check_tensor(out, "out", q.scalar_type(), {B, Lq, Hq, Dv});
  check_tensor(lse, "lse", at::kFloat, {B, Hq, Lq});
  cpu::Pages pages;
  int64_t capacity = page_size;
  if (block_table) {
    const Tensor& table = *block_table;
    check_tensor(table, "block_table", at::kInt, {B, table.size(-1)});
    TORCH_CHECK(table.stride(1) == 1, "fused_attn_native: block_table rows must be contiguous");
    capacity = page_size * table.size(1);
    pages = {table.data_ptr<int32_t>(), table.stride(0), page_size};
  } else {
    TORCH_CHECK(k_cache.size(0) == B, "fused_attn_native: a contiguous cache must have B = ", B, " rows, got ", k_cache.size(0));
  }
  TORCH_CHECK(k_new.has_value() == v_new.has_value(), "fused_attn_native: k_new and v_new must be given together");
  const int64_t Lnew = k_new ? k_new->size(1) : 0;
  if (k_new) {
    check_tensor(*k_new, "k_new", q.scalar_type(), {B, Lnew, Hkv, D});
    check_tensor(*v_new, "v_new", q.scalar_type(), {B, Lnew, Hkv, Dv});
  }
  Call call;
  call.seqlens_k = lengths_of(seqlens_k, "cache_seqlens (the cache's capacity less the new tokens)", B, false,
                              capacity - Lnew);
  for (int64_t& length : call.seqlens_k) length += Lnew;  // the new tokens' rows are attended to
  call.seqlens_q.assign(B, Lq);
  if (block_table) {  // every page a sequence reads must exist
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < cpu::ceil_div(call.seqlens_k[b], page_size); ++i) {
        const int32_t page = pages.table[b * pages.table_stride + i];
        TORCH_CHECK(page >= 0 && page < k_cache.size(0), "fused_attn_native: block_table[", b, ", ", i, "] = ", page,
                    " is not a page of k_cache (", k_cache.size(0), " pages)");
      }
  }
  call.p = {kernel_dtype(q), B, Hq, Hkv, Lq, capacity, D, Dv, static_cast<float>(scale),
            variants_of(B, Hq, window_left, window_right, true, softcap, alibi_slopes)};
  const cpu::Kernels& kernels = select_kernels();  // (its checks come before the cache is written)
  if (k_new) {
    append_rows(k_cache, *k_new, seqlens_k, pages);
    append_rows(v_cache, *v_new, seqlens_k, pages);
  }
  const std::vector<int32_t> lengths(call.seqlens_k.begin(), call.seqlens_k.end());
  call.p.seqlens_k = lengths.data();
  // (B, L, H, D) tensors as (B, H, L, D) views; a paged cache's pages play the batch.
  auto heads_first = [](const Tensor& t) { return strided(t.transpose(1, 2)); };
  const cpu::Strided k_view = heads_first(k_cache), v_view = heads_first(v_cache);
  call.p.kv_heads_per_task = decoding_kv_heads(call.p, k_view, v_view, Lq);
  Tensor partials;
  const cpu::Splits splits =
      split_kv(call.p, Lq, *std::max_element(call.seqlens_k.begin(), call.seqlens_k.end()), partials);
  const std::vector<int64_t> tasks = task_table(
      B, [&](int64_t b) { return cpu::forward_tasks(call.p, Lq) * splits.of(call.seqlens_k[b]); });
  run_forward(kernels, {call.p, heads_first(q), k_view, v_view, heads_first(out), row_values(lse), table_view(tasks),
                        pages, splits});
}

std::string cpu_isa() { return select_kernels().isa; }
std::string cpu_bf16_products() { return select_kernels().bf16_products(); }
#endif  // FUSED_ATTN_EMULATOR


#ifdef FUSED_ATTN_WITH_CUDA
// ---- The CUDA kernels (csrc/cuda/): dense and packed calls, and KV caches. ----

#ifdef FUSED_ATTN_EMULATOR
constexpr at::DeviceType kCudaDeviceType = at::kCPU;  // the emulator runs the kernels on CPU tensors
#else
constexpr at::DeviceType kCudaDeviceType = at::kCUDA;
#endif

// The kernels' view of a checked dense call (call_of on the tensors' device).
cuda::Problem cuda_problem(const Call& call, const std::optional<Tensor>& dropout_seed) {
  const cpu::Problem& p = call.p;
  const cpu::Variants& v = p.variants;
  cuda::Problem c{};
  c.dtype = p.dtype;
  c.batch = p.batch, c.heads_q = p.heads_q, c.heads_kv = p.heads_kv, c.seqlen_q = p.seqlen_q;
  c.seqlen_k = p.seqlen_k, c.head_dim = p.head_dim, c.head_dim_v = p.head_dim_v, c.scale = p.scale;
  c.variants.window_left = v.window_left;
  c.variants.window_right = v.window_right;
  c.variants.shift = p.shift();
  c.variants.softcap = v.softcap;
  c.variants.alibi_slopes = v.alibi_slopes;
  c.variants.slopes_batch = v.slopes_batch;
  c.variants.slopes_head = v.slopes_head;
  c.variants.mask = v.mask;
  c.variants.bias = v.bias;
  c.variants.bias_dtype = v.bias_dtype;
  if (v.dropout) {
    c.variants.dropout = true;
    c.variants.dropout_seed = dropout_seed->data_ptr<int64_t>();
    c.variants.drop_threshold = v.drop_threshold;
    c.variants.keep_scale = v.keep_scale;
  }
  return c;
}

// The checks every CUDA op makes beyond call_of's: the device, sizes the kernels take, and
// contiguous last dims. Packed calls give the longest sequences (max_seqlen_q/k: they size the
// grid), as the kernels read cu_seqlens on the device.
Call cuda_call_of(const Tensor& q, const Tensor& k, const Tensor& v, FUSED_ATTN_VARIANT_PARAMS,
                  int64_t max_seqlen_q, int64_t max_seqlen_k) {
  TORCH_CHECK(q.device().type() == kCudaDeviceType, "fused_attn_native: q must be a ",
              at::DeviceTypeName(kCudaDeviceType), " tensor, got ", q.device());
  const Call call = call_of(q, k, v, FUSED_ATTN_VARIANT_ARGS, q.device(), std::pair{max_seqlen_q, max_seqlen_k});
  const cpu::Problem& p = call.p;
  TORCH_CHECK(p.head_dim <= cuda::kMaxHeadDim && p.head_dim_v <= cuda::kMaxHeadDim,
              "fused_attn_native: the CUDA kernels take head dims up to ", cuda::kMaxHeadDim, ", got D = ",
              p.head_dim, ", Dv = ", p.head_dim_v);
  TORCH_CHECK(p.seqlen_q < (int64_t{1} << 31) && p.seqlen_k < (int64_t{1} << 31),
              "fused_attn_native: the CUDA kernels take sequences shorter than 2^31");
  TORCH_CHECK(p.batch <= 65535 && p.heads_q <= 65535,  // grid dims y and z
              "fused_attn_native: the CUDA kernels take up to 65535 batches and heads, got ", p.batch, " and ",
              p.heads_q);
  for (const auto& [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}})
    TORCH_CHECK(t->stride(-1) == 1, "fused_attn_native: ", name, " must have a contiguous last dim");
  return call;
}

// Where the kernels find the packed sequences (params.h, Packed) of q (total_q, Hq, D) and k
// (total_k, Hkv, D); none for a dense call.
cuda::Packed cuda_packed(const Call& call, const Tensor& q, const Tensor& k) {
  cuda::Packed packed;
  packed.cu_seqlens_q = call.p.cu_seqlens_q;
  packed.cu_seqlens_k = call.p.cu_seqlens_k;
  packed.total_q = q.size(0);
  packed.total_k = k.size(0);
  packed.bottom_right = call.p.variants.bottom_right;
  return packed;
}

cudaStream_t stream_of(int64_t stream) { return reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(stream)); }

// Packed calls (q (total_q, Hq, D), cu_seqlens_q/k given) also take max_seqlen_q/k; their rows
// past cu_seqlens_q[B] are left for the caller to fill (fused_attn/layout.py, fill_unused_rows).
void cuda_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                  FUSED_ATTN_VARIANT_PARAMS, int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t stream) {
  const Call call = cuda_call_of(q, k, v, FUSED_ATTN_VARIANT_ARGS, max_seqlen_q, max_seqlen_k);
  check_tensor(out, "out", q.scalar_type(), out_shape(q, v), q.device());
  check_tensor(lse, "lse", at::kFloat, lse_shape(q), q.device());
  TORCH_CHECK(out.stride(-1) == 1, "fused_attn_native: out must have a contiguous last dim");
  const c10::DeviceGuard guard(q.device());
  const cuda::ForwardParams params{cuda_problem(call, dropout_seed), strided(q), strided(k),
                                   strided(v), strided(out), row_values(lse), {},
                                   cuda_packed(call, q, k)};
  const cudaError_t error = cuda::launch_forward(params, stream_of(stream));
  TORCH_CHECK(error == cudaSuccess, "fused_attn_native: the CUDA forward failed to launch: ", cudaGetErrorString(error));
}

// As cpu_backward, for the CUDA kernels: out, dout and the gradients need contiguous last dims.
// dbias, float32, the broadcast (B, Hq, Lq, Lk) view of a buffer of the bias's own shape, is
// written whole (each element once, its broadcast terms summed in the kernel), not accumulated.
void cuda_backward(const Tensor& dout, const Tensor& dlse, const Tensor& q, const Tensor& k, const Tensor& v,
                   const Tensor& out, const Tensor& lse, const Tensor& dq, const Tensor& dk, const Tensor& dv,
                   FUSED_ATTN_VARIANT_PARAMS, const std::optional<Tensor>& dbias, int64_t max_seqlen_q,
                   int64_t max_seqlen_k, int64_t stream) {
  const Call call = cuda_call_of(q, k, v, FUSED_ATTN_VARIANT_ARGS, max_seqlen_q, max_seqlen_k);
  const cpu::Problem& p = call.p;
  check_tensor(out, "out", q.scalar_type(), out_shape(q, v), q.device());
  check_tensor(dout, "dout", q.scalar_type(), out.sizes(), q.device());
  check_tensor(lse, "lse", at::kFloat, lse_shape(q), q.device());
  check_tensor(dlse, "dlse", at::kFloat, lse.sizes(), q.device());
  check_tensor(dq, "dq", q.scalar_type(), q.sizes(), q.device());
  check_tensor(dk, "dk", q.scalar_type(), k.sizes(), q.device());
  check_tensor(dv, "dv", q.scalar_type(), v.sizes(), q.device());
  for (const auto& [t, name] : {std::pair{&out, "out"}, std::pair{&dout, "dout"}, std::pair{&dq, "dq"},
                                std::pair{&dk, "dk"}, std::pair{&dv, "dv"}})
    TORCH_CHECK(t->stride(-1) == 1, "fused_attn_native: ", name, " must have a contiguous last dim");
  if (dbias) {
    TORCH_CHECK(bias, "fused_attn_native: dbias without bias");
    check_tensor(*dbias, "dbias", at::kFloat, {p.batch, p.heads_q, p.seqlen_q, p.seqlen_k}, q.device());
  }
  const c10::DeviceGuard guard(q.device());
  // Row vectors are tiny next to the inputs; contiguous copies keep the kernels' indexing simple.
  const Tensor lse_c = lse.contiguous(), dlse_c = dlse.contiguous();
  const Tensor delta = at::empty(lse.sizes(), lse.options());
  cuda::BackwardParams params{cuda_problem(call, dropout_seed), strided(q), strided(k), strided(v),
                              strided(out), strided(dout), strided(dq), strided(dk),
                              strided(dv), row_values(lse_c), row_values(dlse_c),
                              row_values(delta)};
  if (dbias) params.dbias = strided(*dbias);
  params.packed = cuda_packed(call, q, k);
  const cudaError_t error = cuda::launch_backward(params, stream_of(stream));
  TORCH_CHECK(error == cudaSuccess, "fused_attn_native: the CUDA backward failed to launch: ", cudaGetErrorString(error));
}

// Decoding, as cpu_kvcache_forward: q (B, Lq, Hq, D) against the first seqlens_k[b] keys of a
// contiguous cache (B, capacity, Hkv, D) or, with block_table (B, max_pages) int32, of a paged one
// (pages, page_size, Hkv, D); bottom-right aligned. out (B, Lq, Hq, Dv), lse (B, Hq, Lq). The
// lengths and page indices stay on the device: fused_attn/kvcache.py has checked them. The query
// heads of a group share blocks and long caches are split (launch.h, decoding_of); num_splits > 0
// asks for that many splits.
void cuda_kvcache_forward(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& seqlens_k,
                          const std::optional<Tensor>& block_table, const Tensor& out, const Tensor& lse, double scale,
                          int64_t window_left, int64_t window_right, double softcap,
                          const std::optional<Tensor>& alibi_slopes, const std::optional<Tensor>& k_new,
                          const std::optional<Tensor>& v_new, int64_t num_splits, int64_t stream) {
  TORCH_CHECK(q.device().type() == kCudaDeviceType, "fused_attn_native: q must be a ",
              at::DeviceTypeName(kCudaDeviceType), " tensor, got ", q.device());
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4,
              "fused_attn_native: q (B, Lq, Hq, D), k_cache and v_cache must be 4-dimensional");
  const at::Device device = q.device();
  const int64_t B = q.size(0), Lq = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Hkv = k_cache.size(2), Dv = v_cache.size(3), page_size = k_cache.size(1);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "fused_attn_native: query heads (", Hq, ") must be a multiple of key/value heads (", Hkv, ")");
  TORCH_CHECK(B > 0 && Lq > 0 && D > 0 && Dv > 0, "fused_attn_native: empty inputs are handled in Python");
  TORCH_CHECK(D <= cuda::kMaxHeadDim && Dv <= cuda::kMaxHeadDim, "fused_attn_native: the CUDA kernels take head dims up to ",
              cuda::kMaxHeadDim, ", got D = ", D, ", Dv = ", Dv);
  TORCH_CHECK(B <= 65535 && Hq <= 65535, "fused_attn_native: the CUDA kernels take up to 65535 batches and heads");
  kernel_dtype(q);
  check_tensor(q, "q", q.scalar_type(), q.sizes(), device);
  check_tensor(k_cache, "k_cache", q.scalar_type(), {k_cache.size(0), page_size, Hkv, D}, device);
  check_tensor(v_cache, "v_cache", q.scalar_type(), {k_cache.size(0), page_size, Hkv, Dv}, device);
  check_tensor(out, "out", q.scalar_type(), {B, Lq, Hq, Dv}, device);
  check_tensor(lse, "lse", at::kFloat, {B, Hq, Lq}, device);
  check_tensor(seqlens_k, "seqlens_k", at::kInt, {B}, device);
  TORCH_CHECK(seqlens_k.is_contiguous(), "fused_attn_native: seqlens_k must be contiguous");
  for (const auto& [t, name] : {std::pair{&q, "q"}, std::pair{&k_cache, "k_cache"}, std::pair{&v_cache, "v_cache"},
                                std::pair{&out, "out"}})
    TORCH_CHECK(t->stride(3) == 1, "fused_attn_native: ", name, " must have a contiguous last dim");
  cuda::KvCache cache;
  cache.seqlens_k = seqlens_k.data_ptr<int32_t>();
  int64_t capacity = page_size;
  if (block_table) {
    const Tensor& table = *block_table;
    check_tensor(table, "block_table", at::kInt, {B, table.size(-1)}, device);
    TORCH_CHECK(table.stride(1) == 1, "fused_attn_native: block_table rows must be contiguous");
    capacity = page_size * table.size(1);
    cache.page_table = table.data_ptr<int32_t>();
    cache.table_stride = table.stride(0);
    cache.page_size = page_size;
    cache.num_pages = k_cache.size(0);
  } else {
    TORCH_CHECK(k_cache.size(0) == B, "fused_attn_native: a contiguous cache must have B = ", B, " rows, got ", k_cache.size(0));
  }
  TORCH_CHECK(capacity < (int64_t{1} << 31), "fused_attn_native: the CUDA kernels take caches shorter than 2^31");
  TORCH_CHECK(k_new.has_value() == v_new.has_value(), "fused_attn_native: k_new and v_new must be given together");
  // (B, L, H, D) tensors as (B, H, L, D) views; a paged cache's pages play the batch.
  auto heads_first = [](const Tensor& t) { return strided(t.transpose(1, 2)); };
  if (k_new) {  // written into the cache by the launch, before the keys are read (append.cu)
    cache.new_tokens = k_new->size(1);
    check_tensor(*k_new, "k_new", q.scalar_type(), {B, cache.new_tokens, Hkv, D}, device);
    check_tensor(*v_new, "v_new", q.scalar_type(), {B, cache.new_tokens, Hkv, Dv}, device);
    cache.k_new = heads_first(*k_new);
    cache.v_new = heads_first(*v_new);
  }
  Call call;
  call.p = {kernel_dtype(q), B, Hq, Hkv, Lq, capacity, D, Dv, static_cast<float>(scale),
            variants_of(B, Hq, window_left, window_right, true, softcap, alibi_slopes, device)};
  const c10::DeviceGuard guard(device);
  cuda::ForwardParams params{cuda_problem(call, std::nullopt), heads_first(q), heads_first(k_cache),
                             heads_first(v_cache), heads_first(out), row_values(lse), cache};
  params.decoding = cuda::decoding_of(params.p, num_splits, cuda::multiprocessor_count());
  Tensor partials;  // split-KV: (splits, B, Lq, Hq) rows of Dv outputs, then their lse
  if (params.decoding.splits > 1) {
    const int64_t rows = params.decoding.splits * B * Lq * Hq;
    partials = at::empty({rows * (Dv + 1)}, q.options().dtype(at::kFloat));
    params.decoding.out_partial = partials.data_ptr<float>();
    params.decoding.lse_partial = params.decoding.out_partial + rows * Dv;
  }
  const cudaError_t error = cuda::launch_forward(params, stream_of(stream));
  TORCH_CHECK(error == cudaSuccess, "fused_attn_native: the CUDA KV-cache forward failed to launch: ",
              cudaGetErrorString(error));
}
#endif  // FUSED_ATTN_WITH_CUDA

}  // namespace
}  // namespace fused_attn

#ifdef FUSED_ATTN_WITH_CUDA
#ifdef FUSED_ATTN_EMULATOR
#define FUSED_ATTN_CUDA_OPS fused_attn_emulated
#define FUSED_ATTN_CUDA_DISPATCH_KEY CPU
#else
#define FUSED_ATTN_CUDA_OPS fused_attn_native
#define FUSED_ATTN_CUDA_DISPATCH_KEY CUDA
#endif

TORCH_LIBRARY_FRAGMENT(FUSED_ATTN_CUDA_OPS, m) {
  m.def("cuda_forward(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor(b!) lse, " FUSED_ATTN_VARIANT_SCHEMA
        ", int max_seqlen_q=0, int max_seqlen_k=0, int stream=0) -> ()");
  m.def("cuda_backward(Tensor dout, Tensor dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv, " FUSED_ATTN_VARIANT_SCHEMA
        ", Tensor(d!)? dbias=None, int max_seqlen_q=0, int max_seqlen_k=0, int stream=0) -> ()");
  m.def("cuda_kvcache_forward(Tensor q, Tensor(c!) k_cache, Tensor(d!) v_cache, Tensor seqlens_k, Tensor? block_table, "
        "Tensor(a!) out, Tensor(b!) lse, float scale, int window_left, int window_right, float softcap=0., "
        "Tensor? alibi_slopes=None, Tensor? k_new=None, Tensor? v_new=None, int num_splits=0, int stream=0) -> ()");
}

TORCH_LIBRARY_IMPL(FUSED_ATTN_CUDA_OPS, FUSED_ATTN_CUDA_DISPATCH_KEY, m) {
  m.impl("cuda_forward", &fused_attn::cuda_forward);
  m.impl("cuda_backward", &fused_attn::cuda_backward);
  m.impl("cuda_kvcache_forward", &fused_attn::cuda_kvcache_forward);
}
#endif  // FUSED_ATTN_WITH_CUDA

#ifndef FUSED_ATTN_EMULATOR

TORCH_LIBRARY(fused_attn_native, m) {
  m.def("cpu_forward(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor(b!) lse, " FUSED_ATTN_VARIANT_SCHEMA
        ", bool for_backward=False) -> ()");
  m.def("cpu_backward(Tensor dout, Tensor dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv, " FUSED_ATTN_VARIANT_SCHEMA ", Tensor(d!)? dbias=None) -> ()");
  m.def("cpu_kvcache_forward(Tensor q, Tensor(c!) k_cache, Tensor(d!) v_cache, Tensor seqlens_k, Tensor? block_table, "
        "Tensor(a!) out, Tensor(b!) lse, float scale, int window_left, int window_right, float softcap=0., "
        "Tensor? alibi_slopes=None, Tensor? k_new=None, Tensor? v_new=None) -> ()");
  m.def("cpu_isa() -> str", &fused_attn::cpu_isa);
  m.def("cpu_bf16_products() -> str", &fused_attn::cpu_bf16_products);
}

TORCH_LIBRARY_IMPL(fused_attn_native, CPU, m) {
  m.impl("cpu_forward", &fused_attn::cpu_forward);
  m.impl("cpu_backward", &fused_attn::cpu_backward);
  m.impl("cpu_kvcache_forward", &fused_attn::cpu_kvcache_forward);
}

// `import fused_attn._native` loads this library, which registers the ops above; the module
// itself is empty.
static PyModuleDef native_module = {PyModuleDef_HEAD_INIT, "_native",
                                    "fused_attn's C++ kernels, registered as torch.ops.fused_attn_native.*", -1,
                                    nullptr};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&native_module); }
#endif  // FUSED_ATTN_EMULATOR
