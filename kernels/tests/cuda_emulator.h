// Runs the tensor-core attention kernels of kernels/cuda on the host, so that machines without a
// GPU (CI, this project's development machines) execute their indexing, tiling, band logic,
// synchronization and numerics. Include it, then the kernels' .cu files.
//
// One CTA runs at a time; each of its threads is a ucontext fiber, switched only where a GPU thread
// would wait: __syncthreads, and the warp collectives (__shfl_xor_sync, ldmatrix, mma.sync), which
// run once every lane of the warp has arrived with its operands, and fail loudly when the lanes
// disagree. Between two barriers the warps run one after another in a shuffled order, and cp.async
// copies land either at their wait (deferred_copies) or at once: a missing wait or barrier then
// shows as wrong results. Shared memory starts each CTA filled with NaN.
//
// ldmatrix and mma.m16n8k16 follow the PTX ISA's fragment layouts (lane = 4 g + t: groupID g,
// threadID_in_group t):
//   ldmatrix .x4: lanes 8i .. 8i + 7 give the row addresses of matrix i, which lands in register i;
//     lane l receives row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 (with .trans: of the transposed matrix).
//   mma A (16 x 16): a0 (g, 2t..), a1 (g + 8, 2t..), a2 (g, 2t + 8..), a3 (g + 8, 2t + 8..);
//   B (16 x 8): b0 (k = 2t.., n = g), b1 (k = 2t + 8.., n = g);
//   C and D (16 x 8): c0, c1 (g, 2t..), c2, c3 (g + 8, 2t..).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <type_traits>
#include <vector>

// cuda_runtime.h gives these host-compiler meanings; here the kernels are plain host functions.
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __grid_constant__
#undef __launch_bounds__
#define GENFAST_EMULATED_CUDA 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__
#define __grid_constant__
#define __launch_bounds__(...)

struct EmulatedDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline EmulatedDim3 threadIdx, blockIdx;

inline int min(int a, int b) { return a < b ? a : b; }

namespace cuda_emulator {

enum class State { kRunnable, kBarrier, kWarp, kDone };
enum class Op { kShuffle, kLdsm, kLdsmTrans, kMmaHalf, kMmaBf16 };

struct Collective {
  Op op;
  float value;  // shuffle: in and out
  int lane_mask;
  const uint16_t* address;  // ldmatrix
  uint32_t* out;            // ldmatrix: 4 registers
  float* c;                 // mma: 4 accumulators, in and out
  const uint32_t* a;        // mma: 4 registers
  uint32_t b0, b1;
};

struct PendingCopy {
  void* dst;
  const void* src;
};

struct Thread {
  ucontext_t context;
  std::vector<char> stack;
  State state = State::kRunnable;
  Collective* collective = nullptr;
  std::vector<std::vector<PendingCopy>> groups{1};  // the last one is open
};

struct Cta {
  std::vector<Thread> threads;
  ucontext_t scheduler;
  int current = 0;
  std::function<void()> body;
};

inline Cta* cta = nullptr;
inline std::mt19937 schedule_rng(2024);
// Deferred (the default): a cp.async lands at the cp.async.wait_group that covers it, the latest it
// may, so a read that comes before its wait sees stale data. Otherwise it lands when issued, the
// earliest, so a prefetch into a buffer that another warp still reads corrupts that read.
inline bool deferred_copies = true;

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda_emulator: %s (block %u, thread %d)\n", what, blockIdx.x, cta ? cta->current : -1);
  std::abort();
}

inline Thread& self() { return cta->threads[cta->current]; }

inline void wait_as(State state, Collective* collective = nullptr) {
  Thread& t = self();
  t.state = state;
  t.collective = collective;
  swapcontext(&t.context, &cta->scheduler);
}

inline void thread_entry() {
  cta->body();
  self().state = State::kDone;
  // Returning switches to uc_link: the scheduler.
}

inline float from_bits(uint16_t bits, Op op) {
  return op == Op::kMmaHalf ? __half2float(__ushort_as_half(bits)) : __bfloat162float(__ushort_as_bfloat16(bits));
}
inline uint16_t lo16(uint32_t v) { return static_cast<uint16_t>(v & 0xffffu); }
inline uint16_t hi16(uint32_t v) { return static_cast<uint16_t>(v >> 16); }

// Runs the collective that every live lane of warp `warp` waits at.
inline void run_collective(int warp) {
  Thread* lanes = &cta->threads[warp * 32];
  const Op op = lanes[0].collective->op;
  for (int l = 0; l < 32; ++l) {
    if (lanes[l].state != State::kWarp) fail("a warp collective with lanes that exited or wait elsewhere");
    if (lanes[l].collective->op != op) fail("the lanes of a warp disagree on the collective");
  }
  Collective* c[32];
  for (int l = 0; l < 32; ++l) c[l] = lanes[l].collective;
  if (op == Op::kShuffle) {
    float in[32];
    for (int l = 0; l < 32; ++l) in[l] = c[l]->value;
    for (int l = 0; l < 32; ++l) c[l]->value = in[l ^ c[l]->lane_mask];
  } else if (op == Op::kLdsm || op == Op::kLdsmTrans) {
    for (int l = 0; l < 32; ++l) {
      for (int i = 0; i < 4; ++i) {
        uint16_t e[2];
        for (int k = 0; k < 2; ++k) {
          const int row = op == Op::kLdsm ? l / 4 : 2 * (l % 4) + k;
          const int col = op == Op::kLdsm ? 2 * (l % 4) + k : l / 4;
          const uint16_t* address = c[8 * i + row]->address;
          if (reinterpret_cast<uintptr_t>(address) % 16 != 0) fail("ldmatrix row address not 16-byte aligned");
          e[k] = address[col];
        }
        c[l]->out[i] = static_cast<uint32_t>(e[0]) | (static_cast<uint32_t>(e[1]) << 16);
      }
    }
  } else {
    float a[16][16], b[16][8];
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      const uint32_t* ra = c[l]->a;
      for (int k = 0; k < 2; ++k) {
        const auto part = [&](uint32_t v) { return from_bits(k == 0 ? lo16(v) : hi16(v), op); };
        a[g][2 * t + k] = part(ra[0]);
        a[g + 8][2 * t + k] = part(ra[1]);
        a[g][2 * t + 8 + k] = part(ra[2]);
        a[g + 8][2 * t + 8 + k] = part(ra[3]);
        b[2 * t + k][g] = part(c[l]->b0);
        b[2 * t + 8 + k][g] = part(c[l]->b1);
      }
    }
    float d[16][8];
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      for (int k = 0; k < 2; ++k) {
        d[g][2 * t + k] = c[l]->c[k];
        d[g + 8][2 * t + k] = c[l]->c[2 + k];
      }
    }
    for (int m = 0; m < 16; ++m) {
      for (int n = 0; n < 8; ++n) {
        float sum = d[m][n];
        for (int k = 0; k < 16; ++k) sum = std::fma(a[m][k], b[k][n], sum);
        d[m][n] = sum;
      }
    }
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      for (int k = 0; k < 2; ++k) {
        c[l]->c[k] = d[g][2 * t + k];
        c[l]->c[2 + k] = d[g + 8][2 * t + k];
      }
    }
  }
  for (int l = 0; l < 32; ++l) {
    lanes[l].state = State::kRunnable;
    lanes[l].collective = nullptr;
  }
}

// Runs one CTA of `threads` threads to completion.
inline void run_cta(int threads, const std::function<void()>& body) {
  if (threads % 32 != 0) fail("the emulator runs whole warps");
  Cta block;
  block.body = body;
  block.threads.resize(threads);
  cta = &block;
  for (int i = 0; i < threads; ++i) {
    Thread& t = block.threads[i];
    t.stack.resize(256 * 1024);
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = t.stack.data();
    t.context.uc_stack.ss_size = t.stack.size();
    t.context.uc_link = &block.scheduler;
    makecontext(&t.context, thread_entry, 0);
  }
  std::vector<int> order(threads / 32);
  for (int w = 0; w < threads / 32; ++w) order[w] = w;
  for (;;) {
    // Each warp in turn runs as far as it can before the next __syncthreads, in a shuffled order:
    // the greatest skew between warps that the barriers allow, which exposes missing barriers.
    std::shuffle(order.begin(), order.end(), schedule_rng);
    for (int w : order) {
      Thread* lanes = &block.threads[w * 32];
      for (;;) {
        for (int l = 0; l < 32; ++l) {
          if (lanes[l].state != State::kRunnable) continue;
          block.current = w * 32 + l;
          threadIdx.x = static_cast<unsigned>(block.current);
          swapcontext(&block.scheduler, &lanes[l].context);
        }
        int at_collective = 0;
        for (int l = 0; l < 32; ++l) at_collective += lanes[l].state == State::kWarp;
        if (at_collective == 0) break;
        block.current = w * 32;
        if (at_collective < 32) fail("a warp collective that not every lane reaches");
        run_collective(w);
      }
    }
    bool all_done = true;
    for (Thread& t : block.threads) all_done = all_done && t.state == State::kDone;
    if (all_done) break;
    for (Thread& t : block.threads) {  // exited threads count as arrived, as on sm_70 and later
      if (t.state == State::kBarrier) t.state = State::kRunnable;
    }
  }
  for (const Thread& t : block.threads) {
    for (const auto& group : t.groups) {
      if (!group.empty()) fail("a thread exited with cp.async copies it never waited for");
    }
  }
  cta = nullptr;
}

// The dynamic shared memory of the CTA being run (the kernels' `extern __shared__` array).
constexpr int kSharedBytes = 227 * 1024;

}  // namespace cuda_emulator

inline void __syncthreads() { cuda_emulator::wait_as(cuda_emulator::State::kBarrier); }

inline float __shfl_xor_sync(unsigned mask, float value, int lane_mask) {
  if (mask != 0xffffffffu) cuda_emulator::fail("only full-warp shuffles are emulated");
  cuda_emulator::Collective c{};
  c.op = cuda_emulator::Op::kShuffle;
  c.value = value;
  c.lane_mask = lane_mask;
  cuda_emulator::wait_as(cuda_emulator::State::kWarp, &c);
  return c.value;
}

inline void __trap() { cuda_emulator::fail("__trap"); }

namespace genfast {
namespace attention_cuda {

namespace {
// The kernels' `extern __shared__ uint4 smem_raw[]` (declared in this same unnamed namespace).
alignas(16) uint4 smem_raw[cuda_emulator::kSharedBytes / 16];
}  // namespace

inline void cp_async_16(void* dst, const void* src) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0) {
    cuda_emulator::fail("cp.async of 16 bytes at an unaligned address");
  }
  if (cuda_emulator::deferred_copies) {
    cuda_emulator::self().groups.back().push_back({dst, src});
  } else {
    std::memcpy(dst, src, 16);
  }
}
inline void cp_async_commit() { cuda_emulator::self().groups.emplace_back(); }
template <int N>
inline void cp_async_wait() {
  auto& groups = cuda_emulator::self().groups;  // committed groups, then the open one
  const int committed = static_cast<int>(groups.size()) - 1;
  for (int g = 0; g < committed - N; ++g) {
    for (const auto& copy : groups[g]) std::memcpy(copy.dst, copy.src, 16);
    groups[g].clear();
  }
}

inline void ldsm(uint32_t (&r)[4], const uint16_t* p, cuda_emulator::Op op) {
  cuda_emulator::Collective c{};
  c.op = op;
  c.address = p;
  c.out = r;
  cuda_emulator::wait_as(cuda_emulator::State::kWarp, &c);
}
inline void ldsm_x4(uint32_t (&r)[4], const uint16_t* p) { ldsm(r, p, cuda_emulator::Op::kLdsm); }
inline void ldsm_x4_trans(uint32_t (&r)[4], const uint16_t* p) { ldsm(r, p, cuda_emulator::Op::kLdsmTrans); }

template <typename T>
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  cuda_emulator::Collective op{};
  op.op = std::is_same<T, __half>::value ? cuda_emulator::Op::kMmaHalf : cuda_emulator::Op::kMmaBf16;
  op.c = c;
  op.a = a;
  op.b0 = b0;
  op.b1 = b1;
  cuda_emulator::wait_as(cuda_emulator::State::kWarp, &op);
}

inline cudaError_t current_device_major(int* major) {
  *major = 8;
  return cudaSuccess;
}

// Runs the grid CTA by CTA, with shared memory filled with 0xff bytes (NaN in float16 and bfloat16) at each start.
template <typename... KernelArgs, typename... Args>
cudaError_t launch_tiles(void (*kernel)(KernelArgs...), int64_t grid, int threads, int smem_bytes, cudaStream_t,
                         const Args&... args) {
  if (smem_bytes > cuda_emulator::kSharedBytes) return cudaErrorInvalidValue;
  if (grid > 0x7fffffff) return cudaErrorInvalidConfiguration;
  for (int64_t block = 0; block < grid; ++block) {
    blockIdx.x = static_cast<unsigned>(block);
    std::memset(smem_raw, 0xff, sizeof(smem_raw));
    cuda_emulator::run_cta(threads, [&] { kernel(args...); });
  }
  return cudaSuccess;
}

}  // namespace attention_cuda
}  // namespace genfast
