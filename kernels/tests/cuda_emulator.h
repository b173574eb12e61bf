// Runs the tensor-core attention kernels of kernels/cuda on the host, so that machines without a
// GPU (CI, this project's development machines) execute their indexing, tiling, band logic,
// synchronization and numerics. Include it, then the kernels' .cu files.
//
// One CTA runs at a time; each of its threads is a ucontext fiber, switched only where a GPU thread
// would wait: __syncthreads (and __syncthreads_or, which returns the OR of the threads' predicates),
// and the warp collectives (__shfl_xor_sync, __syncwarp, ldmatrix, mma.sync), which run once every
// lane of the warp has arrived with its operands, and fail loudly when the lanes disagree
// (mma_products and wgmma_products count the products run). Between two barriers the warps run one after another in
// a shuffled order, and cp.async copies land either at their wait (deferred_copies) or at once: a
// missing wait or barrier then shows as wrong results. Shared memory starts each CTA filled with NaN.
//
// wgmma (the Hopper kernels) is asynchronous here too: an issued product is recorded, and runs at
// the wgmma.wait_group that covers it, a warp collective, reading shared memory through its
// descriptors (128-byte swizzle only, decoded as the PTX ISA defines the canonical K-major and
// MN-major layouts) and A and the accumulators from the lanes' registers at that time; so reading an
// accumulator before the wait, or overwriting an operand while a product is in flight, gives wrong
// results. A warp that reaches a wait either lets the other warps run before its products land, so
// a buffer released (an mbarrier arrival) before the wait that covers its last read gets refilled
// under that read, or (at random) goes on at once, so a read of what other warps write after their
// own waits, without a barrier between, finds it unwritten. Each warp runs its own 16 rows of the
// warpgroup's 64; the warps of a warpgroup must issue the same products. The proxy fence before
// wgmma reads what threads wrote is not modelled.
//
// mbarriers count arrivals and transaction bytes per phase; a thread waiting on a phase parity
// blocks until the phase completes. Named barriers (bar.sync, bar.arrive, bar.red.or: an id and a
// thread count) release their waiters once `count` threads have arrived (bar.red.or returning
// whether any arrival's predicate held), and must be left with no partial count.
// A CTA whose threads all wait on phases or named barriers that cannot complete fails as a
// deadlock. A TMA copy (a tensor map as the emulated encoder writes it, which refuses what
// cuTensorMapEncodeTiled refuses) lands with the 128-byte swizzle and zeros out of bounds, either
// when a thread waits on its mbarrier (deferred_copies) or at once. setmaxnreg does nothing.
//
// ldmatrix and mma.m16n8k16 follow the PTX ISA's fragment layouts (lane = 4 g + t: groupID g,
// threadID_in_group t):
//   ldmatrix .x4: lanes 8i .. 8i + 7 give the row addresses of matrix i, which lands in register i;
//     lane l receives row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 (with .trans: of the transposed matrix).
//   mma A (16 x 16): a0 (g, 2t..), a1 (g + 8, 2t..), a2 (g, 2t + 8..), a3 (g + 8, 2t + 8..);
//   B (16 x 8): b0 (k = 2t.., n = g), b1 (k = 2t + 8.., n = g);
//   C and D (16 x 8): c0, c1 (g, 2t..), c2, c3 (g + 8, 2t..).
#pragma once

#include <cuda.h>
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
#include <memory>
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

// kBlocked: waiting on an mbarrier phase or a named barrier (bar.sync).
enum class State { kRunnable, kBarrier, kWarp, kBlocked, kDone };
enum class Op { kShuffle, kLdsm, kLdsmTrans, kMmaHalf, kMmaBf16, kWgmmaWait };

struct Collective {
  Op op;
  float value;  // shuffle: in and out
  int lane_mask;
  const uint16_t* address;  // ldmatrix
  uint32_t* out;            // ldmatrix: 4 registers
  float* c;                 // mma: 4 accumulators, in and out
  const uint32_t* a;        // mma: 4 registers
  uint32_t b0, b1;
  int groups;               // wgmma.wait_group: the committed groups that may stay in flight
};

// One issued wgmma m64nNk16 (this lane's part): d (N / 8 tiles of 4 accumulators) = A B, plus d
// when accumulate.
struct Wgmma {
  bool half;                    // float16 operands, else bfloat16
  int n;                        // N
  float* d;
  uint64_t desc_a, desc_b;
  const uint32_t* a;            // A in registers (4), else from desc_a, K-major
  bool trans_b;                 // B MN-major, else K-major
  bool accumulate;
};

struct PendingCopy {
  void* dst;
  const void* src;
};

struct Thread {
  ucontext_t context;
  State state = State::kRunnable;
  Collective* collective = nullptr;
  std::vector<std::vector<PendingCopy>> groups{1};  // the last one is open
  std::vector<std::vector<Wgmma>> wgmma_groups{1};  // likewise
  long wgmma_run = 0;
  uint32_t waiting_barrier = 0, waiting_parity = 0;  // State::kBlocked: the mbarrier and phase parity
  int waiting_named = -1;                            // or the named barrier and its generation
  long waiting_generation = 0;
};

// A tensor map as the emulated encoder writes it into a CUtensorMap: a 4-d tensor of 16-bit values
// (dims innermost first, byte strides of dims 1 .. 3), a box of box0 x box1 x 1 x 1, 128-byte swizzle.
struct TileMap {
  const unsigned char* base;
  uint64_t dims[4], strides[3];
  uint32_t box0, box1;
};

// One TMA copy in flight: the box at `coords` of `map` into shared offset `dst`.
struct TmaCopy {
  TileMap map;
  int coords[4];
  uint32_t dst;
};

// An mbarrier (by its shared offset): the arrivals its phase still waits for, the transaction
// bytes still to land, and the TMA copies that complete them.
struct Mbarrier {
  int count = 0, pending = 0;
  long tx = 0;
  uint32_t phase = 0;
  std::vector<TmaCopy> copies;
};

// A named barrier (bar.sync / bar.arrive with an id and a thread count): its generation moves on
// when `count` threads have arrived.
struct NamedBarrier {
  int count = 0, arrived = 0;
  long generation = 0;
  bool any = false, last_any = false;  // bar.red.or: the OR so far, and the last completed one's
};

struct Cta {
  std::vector<Thread> threads;
  NamedBarrier named[16];
  ucontext_t scheduler;
  int current = 0;
  std::function<void()> body;
  std::vector<std::pair<uint32_t, Mbarrier>> barriers;
  bool barrier_or = false, barrier_result = false;  // __syncthreads_or: the OR so far, and the last one's
};

inline Cta* cta = nullptr;
inline std::mt19937 schedule_rng(2024);
// Deferred (the default): a cp.async lands at the cp.async.wait_group that covers it, the latest it
// may, so a read that comes before its wait sees stale data. Otherwise it lands when issued, the
// earliest, so a prefetch into a buffer that another warp still reads corrupts that read.
inline bool deferred_copies = true;
// Makes encode_tile_map fail, as a driver without cuTensorMapEncodeTiled would.
inline bool tensor_maps_fail = false;
inline int tensor_map_refusals = 0;  // maps encode_tile_map refused, as the driver would
// For tests of skipped work: the mma.sync run, and the wgmma run (a warp's 16 rows of each).
inline long mma_products = 0, wgmma_products = 0;

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

// The compute capability current_device_capability reports (a test sets 9.0 to run the Hopper kernel).
inline int capability_major = 8, capability_minor = 0;

inline float from_bits(uint16_t bits, Op op) {
  return op == Op::kMmaHalf ? __half2float(__ushort_as_half(bits)) : __bfloat162float(__ushort_as_bfloat16(bits));
}
inline uint16_t lo16(uint32_t v) { return static_cast<uint16_t>(v & 0xffffu); }
inline uint16_t hi16(uint32_t v) { return static_cast<uint16_t>(v >> 16); }

inline unsigned char* shared_bytes();
constexpr uint32_t kSwizzleAtomBytesEmulated = 1024;

// Element (mn, k) of a 16-bit operand of a wgmma k-step from its descriptor: 128-byte swizzle,
// K-major (8 rows of 128 bytes per swizzle atom, atoms `stride` bytes apart in M or N; k within a
// row) or MN-major (64 M/N values per 128-byte row, a row per k; M/N beyond 64 `leading` bytes on,
// 8 more k `stride` bytes on).
inline uint16_t wgmma_operand(uint64_t desc, bool mn_major, int mn, int k) {
  const uint32_t start = static_cast<uint32_t>(desc & 0x3fff) << 4;
  const uint32_t leading = static_cast<uint32_t>((desc >> 16) & 0x3fff) << 4;
  const uint32_t stride = static_cast<uint32_t>((desc >> 32) & 0x3fff) << 4;
  if (((desc >> 49) & 7) != 0 || (desc >> 62) != 1) {
    fail("a wgmma descriptor other than 128-byte swizzle, base offset 0");
  }
  uint32_t address;
  if (mn_major) {
    if (start % 128 != 0) fail("an MN-major wgmma operand that does not start a 128-byte row");
    address = start + 2 * (mn % 64) + (mn / 64) * leading + (k % 8) * 128 + (k / 8) * stride;
  } else {
    if (start % 128 + 32 > 128) fail("a K-major wgmma k-step that crosses a 128-byte row");
    address = start + (mn % 8) * 128 + (mn / 8) * stride + 2 * k;
  }
  address ^= ((address >> 7) & 7) << 4;
  if (address + 2 > 227 * 1024) fail("a wgmma operand past shared memory");
  uint16_t bits;
  std::memcpy(&bits, shared_bytes() + address, 2);
  return bits;
}

// Runs product `index` of wgmma group `group` of warp `warp` (its 16 rows of the warpgroup's 64).
inline void run_wgmma(int warp, int group, int index) {
  Thread* lanes = &cta->threads[warp * 32];
  const Wgmma& w = lanes[0].wgmma_groups[group][index];
  const Op op = w.half ? Op::kMmaHalf : Op::kMmaBf16;
  for (int l = 1; l < 32; ++l) {
    const Wgmma& o = lanes[l].wgmma_groups[group][index];
    if (o.half != w.half || o.n != w.n || o.desc_b != w.desc_b || o.trans_b != w.trans_b ||
        o.accumulate != w.accumulate ||
        (o.a == nullptr) != (w.a == nullptr) || (w.a == nullptr && o.desc_a != w.desc_a)) {
      fail("the lanes of a warp disagree on a wgmma");
    }
  }
  float a[16][16];
  std::vector<float> b(16 * w.n), d(16 * w.n);
  for (int m = 0; m < 16; ++m) {
    for (int k = 0; k < 16; ++k) {
      if (w.a == nullptr) a[m][k] = from_bits(wgmma_operand(w.desc_a, false, 16 * (warp % 4) + m, k), op);
    }
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    const Wgmma& o = lanes[l].wgmma_groups[group][index];
    for (int k = 0; k < 2; ++k) {
      if (o.a != nullptr) {
        const auto part = [&](uint32_t v) { return from_bits(k == 0 ? lo16(v) : hi16(v), op); };
        a[g][2 * t + k] = part(o.a[0]);
        a[g + 8][2 * t + k] = part(o.a[1]);
        a[g][2 * t + 8 + k] = part(o.a[2]);
        a[g + 8][2 * t + 8 + k] = part(o.a[3]);
      }
      for (int tile = 0; tile < w.n / 8; ++tile) {
        d[g * w.n + 8 * tile + 2 * t + k] = w.accumulate ? o.d[4 * tile + k] : 0.0f;
        d[(g + 8) * w.n + 8 * tile + 2 * t + k] = w.accumulate ? o.d[4 * tile + 2 + k] : 0.0f;
      }
    }
  }
  for (int k = 0; k < 16; ++k) {
    for (int n = 0; n < w.n; ++n) b[k * w.n + n] = from_bits(wgmma_operand(w.desc_b, w.trans_b, n, k), op);
  }
  for (int m = 0; m < 16; ++m) {
    for (int n = 0; n < w.n; ++n) {
      float sum = d[m * w.n + n];
      for (int k = 0; k < 16; ++k) sum = std::fma(a[m][k], b[k * w.n + n], sum);
      d[m * w.n + n] = sum;
    }
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    float* out = lanes[l].wgmma_groups[group][index].d;
    for (int k = 0; k < 2; ++k) {
      for (int tile = 0; tile < w.n / 8; ++tile) {
        out[4 * tile + k] = d[g * w.n + 8 * tile + 2 * t + k];
        out[4 * tile + 2 + k] = d[(g + 8) * w.n + 8 * tile + 2 * t + k];
      }
    }
    ++lanes[l].wgmma_run;
  }
  ++wgmma_products;
}

// wgmma.wait_group: runs the warp's committed groups but the last `keep`.
inline void run_wgmma_wait(int warp, int keep) {
  Thread* lanes = &cta->threads[warp * 32];
  const size_t groups = lanes[0].wgmma_groups.size();
  for (int l = 0; l < 32; ++l) {
    if (lanes[l].wgmma_groups.size() != groups) fail("the lanes of a warp disagree on the wgmma groups");
    for (size_t g = 0; g < groups; ++g) {
      if (lanes[l].wgmma_groups[g].size() != lanes[0].wgmma_groups[g].size()) {
        fail("the lanes of a warp disagree on the wgmma groups");
      }
    }
  }
  const int committed = static_cast<int>(groups) - 1;
  const int done = committed - keep > 0 ? committed - keep : 0;
  for (int g = 0; g < done; ++g) {
    for (size_t i = 0; i < lanes[0].wgmma_groups[g].size(); ++i) run_wgmma(warp, g, static_cast<int>(i));
  }
  for (int l = 0; l < 32; ++l) {
    auto& list = lanes[l].wgmma_groups;
    list.erase(list.begin(), list.begin() + done);
  }
}

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
  if (op == Op::kWgmmaWait) {
    for (int l = 1; l < 32; ++l) {
      if (c[l]->groups != c[0]->groups) fail("the lanes of a warp disagree on wgmma.wait_group");
    }
    run_wgmma_wait(warp, c[0]->groups);
  } else if (op == Op::kShuffle) {
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
    ++mma_products;
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

inline Mbarrier& mbarrier_at(uint32_t offset) {
  for (auto& b : cta->barriers) {
    if (b.first == offset) return b.second;
  }
  fail("an mbarrier used before mbarrier.init");
}

// A phase ends when its arrivals are in and its transaction bytes have landed.
inline void complete_phase(Mbarrier& b) {
  if (b.pending < 0 || (b.pending == 0 && b.tx < 0)) fail("more arrivals or bytes than an mbarrier's phase expects");
  if (b.pending == 0 && b.tx == 0) {
    ++b.phase;
    b.pending = b.count;
  }
}

// Lands a TMA copy: the box's elements in bounds, zeros out of bounds, written with the 128-byte
// swizzle (by shared address, as wgmma reads it); then its bytes complete on `barrier`.
inline void land(const TmaCopy& copy, Mbarrier& barrier) {
  const TileMap& m = copy.map;
  if (m.box0 * 2 != 128) fail("a TMA box whose rows are not the 128 bytes of the swizzle span");
  if (copy.dst % kSwizzleAtomBytesEmulated != 0) fail("a TMA destination not aligned to the 1024-byte swizzle atom");
  for (uint32_t r = 0; r < m.box1; ++r) {
    for (uint32_t e = 0; e < m.box0; ++e) {
      const int64_t c[4] = {copy.coords[0] + static_cast<int64_t>(e), copy.coords[1] + static_cast<int64_t>(r),
                            copy.coords[2], copy.coords[3]};
      bool inside = true;
      for (int d = 0; d < 4; ++d) inside = inside && c[d] >= 0 && static_cast<uint64_t>(c[d]) < m.dims[d];
      uint16_t value = 0;
      if (inside) {
        std::memcpy(&value, m.base + 2 * c[0] + c[1] * m.strides[0] + c[2] * m.strides[1] + c[3] * m.strides[2], 2);
      }
      uint32_t address = copy.dst + r * 128 + 2 * e;
      address ^= ((address >> 7) & 7) << 4;
      std::memcpy(shared_bytes() + address, &value, 2);
    }
  }
  barrier.tx -= 2L * m.box0 * m.box1;
  complete_phase(barrier);
}

// Whether a thread waiting on an mbarrier may go on (its pending copies landed first).
inline bool mbarrier_released(Thread& t) {
  Mbarrier& b = mbarrier_at(t.waiting_barrier);
  std::vector<TmaCopy> copies;
  copies.swap(b.copies);
  for (const TmaCopy& copy : copies) land(copy, b);
  return (b.phase & 1) != t.waiting_parity;
}

// Whether a thread blocked on an mbarrier or a named barrier may go on.
inline bool released(Thread& t) {
  if (t.waiting_named < 0) return mbarrier_released(t);
  if (cta->named[t.waiting_named].generation == t.waiting_generation) return false;
  t.waiting_named = -1;
  return true;
}

// An arrival of this thread on named barrier `id` (1 .. 15: 0 is __syncthreads') of `count` threads.
inline void named_arrival(int id, int count, bool predicate = false) {
  if (id < 1 || id > 15) fail("a named barrier id outside 1 .. 15");
  if (count <= 0 || count % 32 != 0 || count > static_cast<int>(cta->threads.size())) {
    fail("a named barrier count that is not a number of the CTA's warps");
  }
  NamedBarrier& b = cta->named[id];
  if (b.arrived == 0) b.count = count;
  if (b.count != count) fail("threads disagree on a named barrier's count");
  b.any = b.any || predicate;
  if (++b.arrived == b.count) {
    b.arrived = 0;
    ++b.generation;
    b.last_any = b.any;
    b.any = false;
  }
}

// The threads' stacks, kept from CTA to CTA: allocating (and zeroing) them for every CTA took
// more time than the kernels.
constexpr size_t kStackBytes = 256 * 1024;
inline std::vector<std::unique_ptr<char[]>> stacks;

// Runs one CTA of `threads` threads to completion.
inline void run_cta(int threads, const std::function<void()>& body) {
  if (threads % 32 != 0) fail("the emulator runs whole warps");
  Cta block;
  block.body = body;
  block.threads.resize(threads);
  cta = &block;
  while (stacks.size() < static_cast<size_t>(threads)) stacks.emplace_back(new char[kStackBytes]);
  for (int i = 0; i < threads; ++i) {
    Thread& t = block.threads[i];
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = stacks[i].get();
    t.context.uc_stack.ss_size = kStackBytes;
    t.context.uc_link = &block.scheduler;
    makecontext(&t.context, thread_entry, 0);
  }
  std::vector<int> order(threads / 32);
  std::vector<char> wgmma_yielded(threads / 32, 0);
  for (int w = 0; w < threads / 32; ++w) order[w] = w;
  for (;;) {
    // Each warp in turn runs as far as it can before the next __syncthreads, wait on an mbarrier or
    // wgmma.wait_group, in a shuffled order: the greatest skew between warps that the barriers allow,
    // which exposes missing barriers.
    std::shuffle(order.begin(), order.end(), schedule_rng);
    long resumed = 0;
    for (int w : order) {
      Thread* lanes = &block.threads[w * 32];
      for (;;) {
        for (int l = 0; l < 32; ++l) {
          if (lanes[l].state == State::kBlocked && released(lanes[l])) lanes[l].state = State::kRunnable;
          if (lanes[l].state != State::kRunnable) continue;
          block.current = w * 32 + l;
          threadIdx.x = static_cast<unsigned>(block.current);
          swapcontext(&block.scheduler, &lanes[l].context);
          ++resumed;
        }
        int at_collective = 0, blocked = 0, runnable = 0;
        for (int l = 0; l < 32; ++l) {
          at_collective += lanes[l].state == State::kWarp;
          blocked += lanes[l].state == State::kBlocked;
          runnable += lanes[l].state == State::kRunnable;
        }
        if (runnable > 0) continue;
        if (at_collective == 0) break;
        block.current = w * 32;
        if (at_collective == 32) {
          // At a wgmma wait the warp stops (its products land after the other warps have run) or,
          // at random, goes on at once (ahead of the other warps, to what follows the wait).
          if (lanes[0].collective->op == Op::kWgmmaWait && !wgmma_yielded[w] && (schedule_rng() & 1) != 0) {
            wgmma_yielded[w] = true;
            ++resumed;
            break;
          }
          wgmma_yielded[w] = false;
          run_collective(w);
          continue;
        }
        if (blocked > 0) break;  // the other lanes reach the collective once their mbarrier lets them
        fail("a warp collective that not every lane reaches");
      }
    }
    bool all_done = true, waiting = false;
    for (Thread& t : block.threads) {
      all_done = all_done && t.state == State::kDone;
      waiting = waiting || t.state == State::kBlocked || t.state == State::kWarp;
    }
    if (all_done) break;
    if (waiting) {
      // __syncthreads waits for the threads blocked on mbarriers or named barriers; those must move
      // on by themselves.
      if (resumed == 0) {
        bool any = false;
        for (Thread& t : block.threads) any = any || (t.state == State::kBlocked && released(t));
        if (!any) fail("deadlock: threads wait on mbarrier phases or named barriers that never complete");
      }
      continue;
    }
    for (Thread& t : block.threads) {  // exited threads count as arrived, as on sm_70 and later
      if (t.state == State::kBarrier) t.state = State::kRunnable;
    }
    block.barrier_result = block.barrier_or;
    block.barrier_or = false;
  }
  for (const Thread& t : block.threads) {
    for (const auto& group : t.groups) {
      if (!group.empty()) fail("a thread exited with cp.async copies it never waited for");
    }
    for (const auto& group : t.wgmma_groups) {
      if (!group.empty()) fail("a thread exited with wgmma products it never waited for");
    }
  }
  for (const auto& b : block.barriers) {
    if (!b.second.copies.empty()) fail("a CTA exited with TMA copies in flight");
  }
  for (const NamedBarrier& b : block.named) {
    if (b.arrived != 0) fail("a CTA exited with threads part-way through a named barrier");
  }
  for (int t = 0; t < threads; ++t) {
    if (block.threads[t].wgmma_run != block.threads[t - t % 128].wgmma_run) {
      fail("the warps of a warpgroup ran different wgmma products");
    }
  }
  cta = nullptr;
}

// The dynamic shared memory of the CTA being run (the kernels' `extern __shared__` array).
constexpr int kSharedBytes = 227 * 1024;

}  // namespace cuda_emulator

inline void __syncthreads() { cuda_emulator::wait_as(cuda_emulator::State::kBarrier); }
inline int __syncthreads_or(int predicate) {
  cuda_emulator::cta->barrier_or = cuda_emulator::cta->barrier_or || predicate != 0;
  __syncthreads();
  return cuda_emulator::cta->barrier_result;
}

inline float __shfl_xor_sync(unsigned mask, float value, int lane_mask) {
  if (mask != 0xffffffffu) cuda_emulator::fail("only full-warp shuffles are emulated");
  cuda_emulator::Collective c{};
  c.op = cuda_emulator::Op::kShuffle;
  c.value = value;
  c.lane_mask = lane_mask;
  cuda_emulator::wait_as(cuda_emulator::State::kWarp, &c);
  return c.value;
}

inline unsigned __shfl_xor_sync(unsigned mask, unsigned value, int lane_mask) {
  float bits;
  std::memcpy(&bits, &value, sizeof(bits));
  bits = __shfl_xor_sync(mask, bits, lane_mask);
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// The warp's lanes meet (a shuffle with no exchange: every lane must take part).
inline void __syncwarp(unsigned mask = 0xffffffffu) { (void)__shfl_xor_sync(mask, 0.0f, 0); }

// Whether any lane's predicate holds, as a butterfly of shuffles (every lane must take part).
inline int __any_sync(unsigned mask, int predicate) {
  float any = predicate ? 1.0f : 0.0f;
  for (int lane_mask = 1; lane_mask < 32; lane_mask *= 2) any = std::max(any, __shfl_xor_sync(mask, any, lane_mask));
  return any != 0.0f;
}

inline void __trap() { cuda_emulator::fail("__trap"); }

namespace genfast {
namespace attention_cuda {

namespace {
// The kernels' `extern __shared__ uint4 smem_raw[]` (declared in this same unnamed namespace).
alignas(1024) uint4 smem_raw[cuda_emulator::kSharedBytes / 16];
}  // namespace

}  // namespace attention_cuda
}  // namespace genfast

inline unsigned char* cuda_emulator::shared_bytes() {
  return reinterpret_cast<unsigned char*>(genfast::attention_cuda::smem_raw);
}

namespace genfast {
namespace attention_cuda {

inline uint32_t smem_address(const void* p) {
  const auto offset = reinterpret_cast<const char*>(p) - reinterpret_cast<const char*>(smem_raw);
  if (offset < 0 || offset > cuda_emulator::kSharedBytes) cuda_emulator::fail("a shared address outside shared memory");
  return static_cast<uint32_t>(offset);
}

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

// One CTA runs at a time, and its threads switch only at waits: a plain add is atomic here.
inline void atomic_add_f32(float* p, float v) { *p += v; }
inline void atomic_add_f32x2(float* p, float lo, float hi) {
  if (reinterpret_cast<uintptr_t>(p) % 8 != 0) cuda_emulator::fail("a float2 atomic at an address not 8-byte aligned");
  p[0] += lo;
  p[1] += hi;
}

inline cudaError_t current_device_capability(int* major, int* minor) {
  *major = cuda_emulator::capability_major;
  *minor = cuda_emulator::capability_minor;
  return cudaSuccess;
}

// mbarriers and TMA (the warp-specialized Hopper kernel).
inline void mbarrier_init(uint64_t* bar, uint32_t count) {
  const uint32_t at = smem_address(bar);
  auto& all = cuda_emulator::cta->barriers;
  for (auto& b : all) {
    if (b.first == at) cuda_emulator::fail("an mbarrier initialized twice");
  }
  cuda_emulator::Mbarrier b;
  b.count = b.pending = static_cast<int>(count);
  all.emplace_back(at, b);
}
inline void fence_barrier_init() {}
inline void mbarrier_arrive(uint64_t* bar) {
  cuda_emulator::Mbarrier& b = cuda_emulator::mbarrier_at(smem_address(bar));
  --b.pending;
  cuda_emulator::complete_phase(b);
}
inline void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  cuda_emulator::Mbarrier& b = cuda_emulator::mbarrier_at(smem_address(bar));
  b.tx += bytes;
  --b.pending;
  cuda_emulator::complete_phase(b);
}
inline void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  cuda_emulator::Thread& t = cuda_emulator::self();
  t.waiting_barrier = smem_address(bar);
  t.waiting_parity = parity;
  if (!cuda_emulator::mbarrier_released(t)) cuda_emulator::wait_as(cuda_emulator::State::kBlocked);
}
// A TMA copy lands when a thread waits on its mbarrier (deferred_copies), else at once.
inline void tma_load_4d(void* dst, const CUtensorMap* map, int c0, int c1, int c2, int c3, uint64_t* bar) {
  cuda_emulator::TmaCopy copy{};
  std::memcpy(&copy.map, map, sizeof(copy.map));
  copy.coords[0] = c0, copy.coords[1] = c1, copy.coords[2] = c2, copy.coords[3] = c3;
  copy.dst = smem_address(dst);
  cuda_emulator::Mbarrier& b = cuda_emulator::mbarrier_at(smem_address(bar));
  if (cuda_emulator::deferred_copies) {
    b.copies.push_back(copy);
  } else {
    cuda_emulator::land(copy, b);
  }
}
inline void named_barrier_arrive(int id, int count) { cuda_emulator::named_arrival(id, count); }
inline void named_barrier_sync(int id, int count, bool predicate = false) {
  cuda_emulator::Thread& t = cuda_emulator::self();
  const long generation = cuda_emulator::cta->named[id & 15].generation;
  cuda_emulator::named_arrival(id, count, predicate);
  if (cuda_emulator::cta->named[id].generation != generation) return;
  t.waiting_named = id;
  t.waiting_generation = generation;
  cuda_emulator::wait_as(cuda_emulator::State::kBlocked);
}
// bar.red.or.pred: whether any of the `count` threads' predicates held. last_any is still this
// completion's when the thread reads it: the next completion needs its arrival again.
inline bool named_barrier_or(int id, int count, bool predicate) {
  named_barrier_sync(id, count, predicate);
  return cuda_emulator::cta->named[id].last_any;
}
template <int kRegisters>
inline void setmaxnreg_inc() {}
template <int kRegisters>
inline void setmaxnreg_dec() {}

// The emulated tensor map of a 4-d tensor of 16-bit values (dims innermost first, byte strides of
// dims 1 .. 3) read in boxes of box0 x box1, 128-byte swizzled.
inline cudaError_t encode_tile_map(CUtensorMap* map, const void* base, const uint64_t (&dims)[4],
                                   const uint64_t (&strides)[3], uint32_t box0, uint32_t box1) {
  static_assert(sizeof(cuda_emulator::TileMap) <= sizeof(CUtensorMap), "the emulated map fits a CUtensorMap");
  if (cuda_emulator::tensor_maps_fail) return cudaErrorNotSupported;
  // cuTensorMapEncodeTiled's rules for these maps; a refusal is counted (the tests expect none).
  bool ok = reinterpret_cast<uintptr_t>(base) % 16 == 0 && box0 * 2 <= 128 && (box0 * 2) % 16 == 0 && box1 <= 256;
  for (int d = 0; d < 4; ++d) ok = ok && dims[d] >= 1 && dims[d] <= (uint64_t{1} << 32);
  for (int d = 0; d < 3; ++d) ok = ok && strides[d] % 16 == 0 && strides[d] < (uint64_t{1} << 40);
  if (!ok) {
    ++cuda_emulator::tensor_map_refusals;
    return cudaErrorInvalidValue;
  }
  cuda_emulator::TileMap m{};
  m.base = static_cast<const unsigned char*>(base);
  for (int d = 0; d < 4; ++d) m.dims[d] = dims[d];
  for (int d = 0; d < 3; ++d) m.strides[d] = strides[d];
  m.box0 = box0, m.box1 = box1;
  std::memset(map, 0, sizeof(*map));
  std::memcpy(map, &m, sizeof(m));
  return cudaSuccess;
}

inline void wgmma_fence() {}
inline void fence_async_shared() {}
template <typename R, int kTiles>
inline void pin_registers(R (&)[kTiles][4]) {}
inline void wgmma_commit() { cuda_emulator::self().wgmma_groups.emplace_back(); }
template <int N>
inline void wgmma_wait() {
  cuda_emulator::Collective c{};
  c.op = cuda_emulator::Op::kWgmmaWait;
  c.groups = N;
  cuda_emulator::wait_as(cuda_emulator::State::kWarp, &c);
}
template <typename T>
inline void wgmma_ss(float (&d)[16][4], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  cuda_emulator::self().wgmma_groups.back().push_back(
      {std::is_same<T, __half>::value, 128, &d[0][0], desc_a, desc_b, nullptr, false, accumulate});
}
template <typename T>
inline void wgmma_ss(float (&d)[10][4], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  cuda_emulator::self().wgmma_groups.back().push_back(
      {std::is_same<T, __half>::value, 80, &d[0][0], desc_a, desc_b, nullptr, false, accumulate});
}
template <typename T>
inline void wgmma_ss(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  cuda_emulator::self().wgmma_groups.back().push_back(
      {std::is_same<T, __half>::value, 64, &d[0][0], desc_a, desc_b, nullptr, false, accumulate});
}
template <typename T>
inline void wgmma_ss(float (&d)[4][4], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  cuda_emulator::self().wgmma_groups.back().push_back(
      {std::is_same<T, __half>::value, 32, &d[0][0], desc_a, desc_b, nullptr, false, accumulate});
}
template <typename T>
inline void wgmma_rs(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc_b) {
  cuda_emulator::self().wgmma_groups.back().push_back(
      {std::is_same<T, __half>::value, 64, &d[0][0], 0, desc_b, a, true, true});
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
