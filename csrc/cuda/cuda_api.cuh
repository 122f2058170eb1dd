// The only header the CUDA kernels include for CUDA things: the runtime and 16-bit float types,
// the inline PTX the kernels use (one function per instruction, namespace ptx), dynamic shared
// memory and launch_kernel.
//
// With FUSED_ATTN_EMULATOR the same names come from tests/cuda_emulator/fused_attn_emulator.h,
// which runs kernels on the CPU (one fiber per CUDA thread) so CI can test them without a GPU.
// Kernels must use nothing CUDA-specific beyond what both halves provide (see that header).
//
// Loops over register arrays carry `#pragma unroll`: without it nvcc moves the arrays to local
// memory (tests/test_cuda_compile.py makes that an error). The emulator's g++ ignores the pragma.
#pragma once

#ifdef FUSED_ATTN_EMULATOR
#include "fused_attn_emulator.h"
#else

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace fused_attn::cuda {

// The block's dynamic shared memory (the launch's smem_bytes), 128-byte aligned.
__device__ __forceinline__ char* dynamic_shared_memory() {
  extern __shared__ __align__(128) char dynamic_smem[];
  return dynamic_smem;
}

// Launches kernel<<<grid, block, smem_bytes, stream>>>(args...), first raising the kernel's
// dynamic shared memory limit when it needs more than the default 48 KiB.
template <typename Kernel, typename... Args>
cudaError_t launch_kernel(Kernel kernel, dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                          Args... args) {
  if (smem_bytes > 48 * 1024) {
    const cudaError_t error =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes));
    if (error != cudaSuccess) return error;
  }
  kernel<<<grid, block, smem_bytes, stream>>>(args...);
  return cudaGetLastError();
}

namespace ptx {

// D = A B + C on tensor cores, one warp: A 16x16 (row), B 16x8 (col) 16-bit, C and D 16x8 fp32,
// in the PTX ISA's fragment layouts (lane = 4 * group + t: a[0] = A[group][2t..2t+1],
// a[1] = A[group + 8][2t..], a[2] = A[group][2t + 8..], a[3] = A[group + 8][2t + 8..];
// b[0] = B[2t..2t+1][group], b[1] = B[2t + 8..][group]; c[0..1] = C[group][2t..], c[2..3] = C[group + 8][2t..]).
__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                 const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                  const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// Loads 8x8 16-bit matrices from shared memory, one warp: lanes 8m .. 8m + 7 give the rows
// (16 bytes each) of matrix m; r[m] of lane 4 * group + t holds row group, columns 2t and 2t + 1
// of matrix m (with _trans: column group, rows 2t and 2t + 1). x4: four matrices, x2: two
// (rows from lanes 0..15; the other lanes' addresses are ignored but must be valid).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(smem_row))
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(smem_row))
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(shared_address(smem_row))
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(shared_address(smem_row))
               : "memory");
}

// Asynchronous 16-byte copy global -> shared (cp.async.cg, both addresses 16-byte aligned); when
// !in_bounds nothing is read and the 16 bytes are zero-filled (gmem must still be a valid address).
// The copies issued since the last commit form a group; cp_async_wait<N>() waits until at most N
// groups are pending (the thread's own copies: a __syncthreads must follow before others read).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool in_bounds) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(smem)), "l"(gmem),
               "r"(in_bounds ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

}  // namespace ptx
}  // namespace fused_attn::cuda

#endif  // FUSED_ATTN_EMULATOR
