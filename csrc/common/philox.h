// The dropout bits of every backend: the first 32-bit word of Philox4x32-7 (Salmon et al. 2011)
// for counter (c0, c1, c2, 0) under a 64-bit key, the same rounds as fused_attn/dropout.py and
// fused_attn/triton/common.py. One definition for the CPU and CUDA kernels, so their bits agree.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(FUSED_ATTN_EMULATOR)
#define FUSED_ATTN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FUSED_ATTN_HOST_DEVICE inline
#endif

namespace fused_attn {

FUSED_ATTN_HOST_DEVICE uint32_t philox_bits(uint64_t key, uint32_t c0, uint32_t c1, uint32_t c2) {
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32), c3 = 0;
  for (int round = 0; round < 7; ++round) {
    const uint64_t product_b = uint64_t{0xCD9E8D57u} * c2, product_a = uint64_t{0xD2511F53u} * c0;
    const uint32_t next0 = static_cast<uint32_t>(product_b >> 32) ^ c1 ^ k0;
    const uint32_t next2 = static_cast<uint32_t>(product_a >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(product_b);
    c3 = static_cast<uint32_t>(product_a);
    c0 = next0;
    c2 = next2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

}  // namespace fused_attn
