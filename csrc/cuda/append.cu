// A decoding step's new tokens (params.h, KvCache): token i of batch b goes to cache position
// seqlens_k[b] + i (row position % page_size of page page_table[b][position / page_size] in a
// paged cache, row position of batch b's cache otherwise), every head's keys and values.
// Elements are copied as bits: the new tokens have the cache's dtype. A position outside the
// cache (an unchecked length) is not written.
#include "elements.cuh"
#include "forward_kernels.h"

namespace fused_attn::cuda {
namespace {

constexpr int kThreads = 128;

// The (head, column) elements of one token's row of `from` (Strided (B, H, L, dim)) into row `row`
// of page `page` of `to` (Strided (pages, H, page_size, dim)).
template <typename Bits>
__device__ __forceinline__ void copy_token(const Strided& from, int64_t b, int64_t i, const Strided& to, int64_t page,
                                           int64_t row, int64_t heads, int64_t dim) {
  const Bits* src = static_cast<const Bits*>(from.data) + b * from.batch + i * from.row;
  Bits* dst = static_cast<Bits*>(to.data) + page * to.batch + row * to.row;
  for (int64_t e = threadIdx.x; e < heads * dim; e += kThreads) {
    const int64_t h = e / dim, c = e % dim;
    dst[h * to.head + c * to.col] = src[h * from.head + c * from.col];
  }
}

// One block per new token (b, i).
template <typename Bits>
__global__ void append_kernel(ForwardParams params) {
  const KvCache& cache = params.cache;
  const int64_t b = blockIdx.x / cache.new_tokens, i = blockIdx.x % cache.new_tokens;
  const int64_t position = cache.seqlens_k[b] + i;
  if (position < 0 || position >= params.p.seqlen_k) return;  // outside the cache: unchecked input
  int64_t page = b, row = position;
  if (cache.page_table != nullptr) {
    page = cache.page_table[b * cache.table_stride + position / cache.page_size];
    row = position % cache.page_size;
    if (page < 0 || page >= cache.num_pages) return;  // a page outside the cache: unchecked input
  }
  copy_token<Bits>(cache.k_new, b, i, params.k, page, row, params.p.heads_kv, params.p.head_dim);
  copy_token<Bits>(cache.v_new, b, i, params.v, page, row, params.p.heads_kv, params.p.head_dim_v);
}

}  // namespace

cudaError_t launch_append(const ForwardParams& params, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(params.p.batch * params.cache.new_tokens)), block(kThreads);
  if (params.p.dtype == DType::Float32) return launch_kernel(append_kernel<uint32_t>, grid, block, 0, stream, params);
  return launch_kernel(append_kernel<uint16_t>, grid, block, 0, stream, params);
}

}  // namespace fused_attn::cuda
