// The emulator's scheduler and warp collectives (see fused_attn_emulator.h for the model).
#include "fused_attn_emulator.h"

#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <deque>
#include <memory>
#include <string>
#include <vector>

namespace fused_attn_emulator {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kWarpSize = 32;

enum class State { Runnable, Waiting, Done };
enum class Collective { SyncWarp, Shuffle, Ldmatrix, Mma };
const char* const kCollectiveNames[] = {"__syncwarp", "a shuffle", "ldmatrix", "mma"};

struct Copy {
  void* smem;
  const void* gmem;
  bool in_bounds;
};

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  ThreadPosition position;
  State state = State::Runnable;
  bool at_barrier = false;
  // cp.async: copies issued since the last commit, and committed groups, oldest first.
  std::vector<Copy> open;
  std::deque<std::vector<Copy>> pending;
  // A warp collective's operands and results.
  uint32_t in[10];
  uint32_t out[4];
  const void* address;
};

struct Warp {
  int arrived = 0;
  Collective kind;
  int variant;
};

struct Launch {
  const std::function<void()>* body;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  ucontext_t scheduler;
  Fiber* current = nullptr;
  int live = 0, barrier_arrived = 0;
  bool barrier_any = false;  // __syncthreads_or: some thread at the barrier gave a true predicate
  std::unique_ptr<char, decltype(&std::free)> smem{nullptr, &std::free};
  size_t smem_bytes = 0;
  std::string error;
};

thread_local Launch* active = nullptr;
thread_local std::string last_error;

Launch& launch() {
  if (active == nullptr) {
    std::fprintf(stderr, "fused_attn_emulator: a device function was called outside a kernel\n");
    std::abort();
  }
  return *active;
}

int linear_thread(const Fiber& f) {
  const ThreadPosition& p = f.position;
  return static_cast<int>(p.thread_idx.x + p.block_dim.x * (p.thread_idx.y + p.block_dim.y * p.thread_idx.z));
}

// Suspends the running fiber until another releases it.
void wait_here() {
  Launch& l = launch();
  Fiber* self = l.current;
  self->state = State::Waiting;
  swapcontext(&self->context, &l.scheduler);
}

// Records the first error and abandons the running fiber; the launch then fails.
[[noreturn]] void fail(const std::string& message) {
  Launch& l = launch();
  if (l.error.empty()) l.error = "thread " + std::to_string(linear_thread(*l.current)) + " of block (" +
                                 std::to_string(l.current->position.block_idx.x) + ", " +
                                 std::to_string(l.current->position.block_idx.y) + ", " +
                                 std::to_string(l.current->position.block_idx.z) + "): " + message;
  l.current->state = State::Done;
  setcontext(&l.scheduler);
  std::abort();  // not reached
}

// Every waiting thread leaves the barrier with its OR (out[0], what __syncthreads_or returns).
void release_barrier(Launch& l) {
  l.barrier_arrived = 0;
  for (Fiber& f : l.fibers)
    if (f.at_barrier) {
      f.at_barrier = false;
      f.out[0] = l.barrier_any;
      f.state = State::Runnable;
    }
  l.barrier_any = false;
}

void run_copies(const std::vector<Copy>& group) {
  for (const Copy& c : group) {
    if (c.in_bounds)
      std::memcpy(c.smem, c.gmem, 16);
    else
      std::memset(c.smem, 0, 16);
  }
}

void compute_ldmatrix(Fiber* const* lanes, int variant) {
  const int matrices = variant / 2;
  const bool transpose = variant % 2 != 0;
  uint16_t m[4][8][8];
  for (int k = 0; k < matrices; ++k)
    for (int row = 0; row < 8; ++row) std::memcpy(m[k][row], lanes[8 * k + row]->address, 16);
  for (int lane = 0; lane < kWarpSize; ++lane) {
    const int group = lane / 4, t = lane % 4;
    for (int k = 0; k < matrices; ++k) {
      const uint16_t lo = transpose ? m[k][2 * t][group] : m[k][group][2 * t];
      const uint16_t hi = transpose ? m[k][2 * t + 1][group] : m[k][group][2 * t + 1];
      lanes[lane]->out[k] = lo | static_cast<uint32_t>(hi) << 16;
    }
  }
}

float to_float(uint16_t bits, bool bf16) { return bf16 ? bfloat16_bits_to_float(bits) : half_bits_to_float(bits); }

// D = A B + C with the PTX ISA's m16n8k16 fragments. The products of 16-bit floats are exact in
// double, and the sum with C is rounded to fp32 once.
void compute_mma(Fiber* const* lanes, bool bf16) {
  float a[16][16], b[16][8], c[16][8];
  for (int lane = 0; lane < kWarpSize; ++lane) {
    const uint32_t* in = lanes[lane]->in;
    const int group = lane / 4, t = lane % 4;
    for (int half = 0; half < 2; ++half) {
      auto element = [&](uint32_t word) { return to_float(static_cast<uint16_t>(word >> (16 * half)), bf16); };
      a[group][2 * t + half] = element(in[0]);
      a[group + 8][2 * t + half] = element(in[1]);
      a[group][2 * t + 8 + half] = element(in[2]);
      a[group + 8][2 * t + 8 + half] = element(in[3]);
      b[2 * t + half][group] = element(in[4]);
      b[2 * t + 8 + half][group] = element(in[5]);
      c[group][2 * t + half] = bit_cast<float>(in[6 + half]);
      c[group + 8][2 * t + half] = bit_cast<float>(in[8 + half]);
    }
  }
  for (int lane = 0; lane < kWarpSize; ++lane) {
    const int group = lane / 4, t = lane % 4;
    for (int index = 0; index < 4; ++index) {
      const int row = group + 8 * (index / 2), col = 2 * t + index % 2;
      double sum = c[row][col];
      for (int k = 0; k < 16; ++k) sum += static_cast<double>(a[row][k]) * b[k][col];
      lanes[lane]->out[index] = bit_cast<uint32_t>(static_cast<float>(sum));
    }
  }
}

// Every lane of the running fiber's warp must call the same collective; the last one to arrive
// computes it for all. Operands are in each fiber's in/address, results land in out.
void collective(Collective kind, int variant, unsigned mask) {
  Launch& l = launch();
  Fiber* self = l.current;
  if (mask != 0xffffffffu) fail("warp collectives with a partial mask are not emulated");
  const int first = linear_thread(*self) / kWarpSize * kWarpSize;
  Warp& w = l.warps[first / kWarpSize];
  if (w.arrived == 0) {
    w.kind = kind;
    w.variant = variant;
  } else if (w.kind != kind || w.variant != variant) {
    fail(std::string("divergent warp: this lane calls ") + kCollectiveNames[static_cast<int>(kind)] +
         " while others wait in " + kCollectiveNames[static_cast<int>(w.kind)]);
  }
  if (++w.arrived < kWarpSize) {
    wait_here();
    return;
  }
  w.arrived = 0;
  Fiber* lanes[kWarpSize];
  for (int lane = 0; lane < kWarpSize; ++lane) lanes[lane] = &l.fibers[first + lane];
  switch (kind) {
    case Collective::SyncWarp: break;
    case Collective::Shuffle:
      for (int lane = 0; lane < kWarpSize; ++lane) {
        const int source = (variant ? lane ^ static_cast<int>(lanes[lane]->in[1]) : static_cast<int>(lanes[lane]->in[1])) &
                           (kWarpSize - 1);
        lanes[lane]->out[0] = lanes[source]->in[0];
      }
      break;
    case Collective::Ldmatrix: compute_ldmatrix(lanes, variant); break;
    case Collective::Mma: compute_mma(lanes, variant != 0); break;
  }
  for (Fiber* f : lanes)
    if (f != self) f->state = State::Runnable;
}

void trampoline() {
  Launch& l = launch();
  (*l.body)();
  Fiber* self = l.current;
  run_copies(self->open);
  for (const std::vector<Copy>& group : self->pending) run_copies(group);
  self->state = State::Done;
  --l.live;
  if (l.barrier_arrived > 0 && l.barrier_arrived == l.live) release_barrier(l);
}  // returns to the scheduler through uc_link

bool run_block(Launch& l, dim3 block_idx, dim3 grid, dim3 block) {
  const int threads = static_cast<int>(block.x * block.y * block.z);
  std::memset(l.smem.get(), 0xff, l.smem_bytes);  // unwritten shared memory reads as NaN
  l.live = threads;
  l.barrier_arrived = 0;
  l.barrier_any = false;
  for (Warp& w : l.warps) w.arrived = 0;
  for (int t = 0; t < threads; ++t) {
    Fiber& f = l.fibers[t];
    f.position = {{t % block.x, t / block.x % block.y, t / (block.x * block.y)},
                  {block_idx.x, block_idx.y, block_idx.z}, block, grid};
    f.state = State::Runnable;
    f.at_barrier = false;
    f.open.clear();
    f.pending.clear();
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &l.scheduler;
    makecontext(&f.context, trampoline, 0);
  }
  // Threads run in index order in even blocks and in reverse order in odd ones, so a read that
  // misses a barrier sees unwritten (NaN) shared memory in one order or the other.
  const bool reverse = (block_idx.x + block_idx.y + block_idx.z) % 2 != 0;
  while (l.live > 0) {
    bool ran = false;
    for (int index = 0; index < threads; ++index) {
      Fiber& f = l.fibers[reverse ? threads - 1 - index : index];
      if (f.state != State::Runnable) continue;
      l.current = &f;
      swapcontext(&l.scheduler, &f.context);
      ran = true;
      if (!l.error.empty()) return false;
    }
    if (!ran) {
      l.error = "deadlock: every live thread waits (at __syncthreads or a warp collective) for threads that never come";
      return false;
    }
  }
  return true;
}

}  // namespace

const ThreadPosition& position() { return launch().current->position; }

char* dynamic_shared_memory() { return launch().smem.get(); }

int sync_threads_or(int predicate) {
  Launch& l = launch();
  l.barrier_any = l.barrier_any || predicate != 0;
  if (++l.barrier_arrived == l.live) {
    const bool any = l.barrier_any;
    release_barrier(l);
    return any;
  }
  l.current->at_barrier = true;
  wait_here();
  return static_cast<int>(l.current->out[0]);
}

void sync_threads() { sync_threads_or(0); }

void sync_warp(unsigned mask) { collective(Collective::SyncWarp, 0, mask); }

uint32_t shuffle(unsigned mask, uint32_t value, int lane_or_mask, bool xor_lanes) {
  Fiber* self = launch().current;
  self->in[0] = value;
  self->in[1] = static_cast<uint32_t>(lane_or_mask);
  collective(Collective::Shuffle, xor_lanes ? 1 : 0, mask);
  return self->out[0];
}

void mma_m16n8k16(bool bf16, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  Fiber* self = launch().current;
  std::memcpy(self->in, a, 16);
  std::memcpy(self->in + 4, b, 8);
  std::memcpy(self->in + 6, c, 16);
  collective(Collective::Mma, bf16 ? 1 : 0, 0xffffffffu);
  std::memcpy(d, self->out, 16);
}

void ldmatrix(uint32_t* r, int matrices, bool transpose, const void* smem_row) {
  Fiber* self = launch().current;
  const int lane = linear_thread(*self) % kWarpSize;
  if (lane < 8 * matrices && reinterpret_cast<uintptr_t>(smem_row) % 16 != 0)
    fail("ldmatrix row address not 16-byte aligned");
  self->address = smem_row;
  collective(Collective::Ldmatrix, matrices * 2 + (transpose ? 1 : 0), 0xffffffffu);
  std::memcpy(r, self->out, sizeof(uint32_t) * matrices);
}

void cp_async_16(void* smem, const void* gmem, bool in_bounds) {
  if (reinterpret_cast<uintptr_t>(smem) % 16 != 0 || (in_bounds && reinterpret_cast<uintptr_t>(gmem) % 16 != 0))
    fail("cp.async address not 16-byte aligned");
  launch().current->open.push_back({smem, gmem, in_bounds});
}

void cp_async_commit() {
  Fiber* self = launch().current;
  self->pending.push_back(std::move(self->open));
  self->open.clear();
}

void cp_async_wait(int pending) {
  Fiber* self = launch().current;
  while (static_cast<int>(self->pending.size()) > pending) {
    run_copies(self->pending.front());
    self->pending.pop_front();
  }
}

cudaError_t run_grid(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (threads <= 0 || threads > 1024 || threads % kWarpSize != 0 || grid.x * grid.y * grid.z == 0 ||
      smem_bytes > kMaxSharedMemory) {
    last_error = "invalid configuration: " + std::to_string(threads) + " threads per block (whole warps, <= 1024), " +
                 std::to_string(smem_bytes) + " bytes of shared memory (<= " + std::to_string(kMaxSharedMemory) + ")";
    return cudaErrorInvalidConfiguration;
  }
  if (active != nullptr) {
    last_error = "kernel launched from inside a kernel";
    return cudaErrorLaunchFailure;
  }
  Launch l;
  l.body = &body;
  l.fibers.resize(threads);
  for (Fiber& f : l.fibers) f.stack.reset(new char[kStackBytes]);
  l.warps.resize(threads / kWarpSize);
  l.smem_bytes = smem_bytes;
  l.smem.reset(static_cast<char*>(std::aligned_alloc(128, (smem_bytes + 127) / 128 * 128 + 128)));
  active = &l;
  bool ok = true;
  for (unsigned z = 0; z < grid.z && ok; ++z)
    for (unsigned y = 0; y < grid.y && ok; ++y)
      for (unsigned x = 0; x < grid.x && ok; ++x) ok = run_block(l, dim3(x, y, z), grid, block);
  active = nullptr;
  if (!ok) {
    last_error = l.error;
    return cudaErrorLaunchFailure;
  }
  return cudaSuccess;
}

}  // namespace fused_attn_emulator

const char* cudaGetErrorString(cudaError_t error) {
  static thread_local std::string message;
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidConfiguration: message = "invalid configuration argument (emulator: "; break;
    case cudaErrorLaunchFailure: message = "unspecified launch failure (emulator: "; break;
  }
  message += fused_attn_emulator::last_error + ")";
  return message.c_str();
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  if (attribute != cudaDevAttrMultiProcessorCount || device != 0) return cudaErrorInvalidConfiguration;
  *value = fused_attn_emulator::kMultiprocessors;
  return cudaSuccess;
}
