// Small kernels that exercise one emulated primitive each, for tests/test_cuda_emulator.py, which
// builds this program and checks its output against the PTX ISA's layouts computed in Python.
//
//   selftest MODE < integers > integers
// MODE: mma_f16 | mma_bf16 (stdin: per lane a[4] b[2] c[4] as 32-bit words; stdout: per lane d[4]
// as float bits), ldmatrix_x4 | ldmatrix_x4_trans | ldmatrix_x2 | ldmatrix_x2_trans (shared
// memory holds 0, 1, 2, ... as 16-bit words, row r of matrix m at words 64 m + 8 r; stdout: per
// lane its registers), shfl (stdout: per lane xor-1, xor-6 and idx-(lane * 5 % 32) shuffles of
// 100 + lane), cp_async (stdout: shared words before the wait, after it), syncthreads (stdout: per
// thread the neighbour's value seen after a barrier), syncthreads_or (stdout: per block, round and
// thread what __syncthreads_or returned), deadlock | divergence (stdout: the launch's
// error), convert (stdin: float bit patterns; stdout: per value its half and bfloat16 bits).
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "cuda_api.cuh"

using namespace fused_attn::cuda;

namespace {

std::vector<uint32_t> read_words() {
  std::vector<uint32_t> words;
  unsigned long long x;
  while (std::scanf("%llu", &x) == 1) words.push_back(static_cast<uint32_t>(x));
  return words;
}

__global__ void mma_kernel(const uint32_t* in, uint32_t* out, bool bf16) {
  const int lane = threadIdx.x;
  const uint32_t* mine = in + 10 * lane;
  const uint32_t a[4] = {mine[0], mine[1], mine[2], mine[3]};
  const uint32_t b[2] = {mine[4], mine[5]};
  float c[4], d[4];
  std::memcpy(c, mine + 6, 16);
  if (bf16)
    ptx::mma_m16n8k16_bf16(d, a, b, c);
  else
    ptx::mma_m16n8k16_f16(d, a, b, c);
  std::memcpy(out + 4 * lane, d, 16);
}

__global__ void ldmatrix_kernel(uint32_t* out, int matrices, bool transpose) {
  __shared__ __align__(16) uint16_t smem[4 * 64];
  const int lane = threadIdx.x;
  for (int i = lane; i < 4 * 64; i += 32) smem[i] = static_cast<uint16_t>(i);
  __syncwarp();
  const uint16_t* row = smem + 64 * (lane / 8 % matrices) + 8 * (lane % 8);
  uint32_t r[4] = {};
  if (matrices == 4) {
    if (transpose)
      ptx::ldmatrix_x4_trans(r, row);
    else
      ptx::ldmatrix_x4(r, row);
  } else {
    uint32_t r2[2];
    if (transpose)
      ptx::ldmatrix_x2_trans(r2, row);
    else
      ptx::ldmatrix_x2(r2, row);
    r[0] = r2[0];
    r[1] = r2[1];
  }
  for (int m = 0; m < matrices; ++m) out[matrices * lane + m] = r[m];
}

__global__ void shfl_kernel(uint32_t* out) {
  const int lane = threadIdx.x;
  const unsigned value = 100u + lane;
  out[3 * lane] = __shfl_xor_sync(0xffffffffu, value, 1);
  out[3 * lane + 1] = static_cast<uint32_t>(__shfl_xor_sync(0xffffffffu, static_cast<int>(value), 6));
  out[3 * lane + 2] = static_cast<uint32_t>(__shfl_sync(0xffffffffu, static_cast<float>(value), lane * 5 % 32));
}

// Lane 0 copies 16 bytes in bounds into words 0..3 and zero-fills words 4..7 of a tile that holds
// 0xab bytes; what the tile holds before and after the wait.
__global__ void cp_async_kernel(const uint32_t* source, uint32_t* out) {
  __shared__ __align__(16) uint32_t tile[8];
  if (threadIdx.x == 0) {
    std::memset(tile, 0xab, sizeof(tile));
    ptx::cp_async_16(tile, source, true);
    ptx::cp_async_16(tile + 4, source, false);
    ptx::cp_async_commit();
    for (int i = 0; i < 8; ++i) out[i] = tile[i];
    ptx::cp_async_wait<0>();
    for (int i = 0; i < 8; ++i) out[8 + i] = tile[i];
  }
}

__global__ void syncthreads_kernel(uint32_t* out) {
  uint32_t* smem = reinterpret_cast<uint32_t*>(dynamic_shared_memory());
  const unsigned t = threadIdx.x, n = blockDim.x;
  smem[t] = 1000u * blockIdx.x + t;
  __syncthreads();
  out[blockIdx.x * n + t] = smem[(t + 1) % n];
}

// Three rounds of __syncthreads_or: only thread 70 votes true in round 0, none in round 1, only
// thread 5 of block 1 in round 2; each thread writes what every round returned.
__global__ void syncthreads_or_kernel(uint32_t* out) {
  const unsigned t = threadIdx.x, n = blockDim.x;
  const bool votes[3] = {t == 70, false, blockIdx.x == 1 && t == 5};
  for (int round = 0; round < 3; ++round) out[(blockIdx.x * 3 + round) * n + t] = __syncthreads_or(votes[round]);
}

// Half the warp waits at __syncwarp for lanes that wait at __syncthreads for it.
__global__ void deadlock_kernel() {
  if (threadIdx.x % 32 < 16)
    __syncwarp();
  else
    __syncthreads();
}

__global__ void divergence_kernel() {
  if (threadIdx.x % 2 == 0)
    __syncwarp();
  else
    __shfl_xor_sync(0xffffffffu, 1, 1);
}

void print(const std::vector<uint32_t>& words) {
  for (uint32_t w : words) std::printf("%u\n", w);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  const std::string mode = argv[1];
  cudaError_t error = cudaSuccess;
  std::vector<uint32_t> out;
  if (mode == "mma_f16" || mode == "mma_bf16") {
    const std::vector<uint32_t> in = read_words();
    if (in.size() != 320) return 2;
    out.resize(128);
    error = launch_kernel(mma_kernel, dim3(1), dim3(32), 0, nullptr, in.data(), out.data(), mode == "mma_bf16");
  } else if (mode.rfind("ldmatrix_", 0) == 0) {
    const int matrices = mode[10] - '0';
    out.resize(32 * matrices);
    error = launch_kernel(ldmatrix_kernel, dim3(1), dim3(32), 0, nullptr, out.data(), matrices,
                          mode.find("trans") != std::string::npos);
  } else if (mode == "shfl") {
    out.resize(96);
    error = launch_kernel(shfl_kernel, dim3(1), dim3(32), 0, nullptr, out.data());
  } else if (mode == "cp_async") {
    alignas(16) static const uint32_t source[4] = {11, 22, 33, 44};
    out.resize(16);
    error = launch_kernel(cp_async_kernel, dim3(1), dim3(32), 0, nullptr, source, out.data());
  } else if (mode == "syncthreads") {
    out.resize(2 * 96);
    error = launch_kernel(syncthreads_kernel, dim3(2), dim3(96), 96 * sizeof(uint32_t), nullptr, out.data());
  } else if (mode == "syncthreads_or") {
    out.resize(2 * 3 * 96);
    error = launch_kernel(syncthreads_or_kernel, dim3(2), dim3(96), 0, nullptr, out.data());
  } else if (mode == "deadlock" || mode == "divergence") {
    error = mode == "deadlock" ? launch_kernel(deadlock_kernel, dim3(1), dim3(32), 0, nullptr)
                               : launch_kernel(divergence_kernel, dim3(1), dim3(32), 0, nullptr);
    std::printf("%s\n", cudaGetErrorString(error));
    return 0;
  } else if (mode == "convert") {
    for (uint32_t bits : read_words()) {
      float value;
      std::memcpy(&value, &bits, 4);
      out.push_back(__float2half_rn(value).bits);
      out.push_back(__float2bfloat16_rn(value).bits);
    }
  } else {
    return 2;
  }
  if (error != cudaSuccess) {
    std::fprintf(stderr, "%s\n", cudaGetErrorString(error));
    return 1;
  }
  print(out);
  return 0;
}
