// Attention forward for Hopper (sm_90a) on wgmma: two consumer warpgroups take 128 query rows of
// one head (64 each) and walk key blocks of 128 (80 at head dim 256), K and V double-buffered in
// 128-byte-swizzled shared memory (attention_swizzle.cuh), next to Q.
//   S = Q K^T   wgmma m64n128k16 (m64n80k16), A = Q and B = K both K-major from shared memory
//   O += P V    wgmma m64n64k16 per 64 columns of O, A = P from S's registers, B = V MN-major
// S and O have mma.m16n8's C-fragment layout, so the scores, online softmax and epilogue are the
// sm_80 kernel's (ForwardRows). Two kernels:
// - warp-specialized (dense inputs that TMA can address: 16-byte aligned, strides multiples of 16
//   bytes): a third, producer warpgroup gives up its registers (setmaxnreg) and one of its threads
//   loads Q once and each key block's K and V with TMA, signalling full mbarriers; the consumers
//   release K and V through empty mbarriers. No __syncthreads in the loop, so each consumer
//   warpgroup's softmax overlaps the other's products, which take turns as in FlashAttention-3
//   (WarpgroupTurns); within a warpgroup, block n's softmax overlaps block n - 1's P V. A warpgroup
//   skips the products of a key block the mask hides from all its 64 rows (an OR of its threads'
//   mask reads on a named barrier per warpgroup), and those of every block when its rows hold no
//   query.
// - every thread copying with cp.async (packed sequences, other strides), a barrier per block,
//   which also skips a key block the mask hides whole (wait_for_shown_stage; head dims up to 128).
// They take plans without stacking or splits and head-dim buckets 64, 128 and 256; the launcher in
// attention_forward.cu uses them on sm_90 when GENFAST_ATTENTION_SM90=1 and the build has sm_90a.
#include <cstdlib>
#include <cstring>

#include "attention.cuh"
#include "attention_forward_rows.cuh"
#include "attention_hopper.cuh"

namespace genfast {
namespace attention_cuda {
namespace {

constexpr int kProducerRegisters = 24, kConsumerRegisters = 240;  // as FlashAttention-3's forward
static_assert(registers_fit(kProducerRegisters, kConsumerRegisters),
              "the consumers' registers must come out of the producer's");

// Key blocks of 128, or of 80 at head dim 256 (as FlashAttention-3), where Q and two stages of K
// and V take all of shared memory.
template <int kD>
struct HopperForwardTile {
  static constexpr int kBlockM = 128, kBlockN = kD == 256 ? 80 : 128;
  static constexpr int kQElements = kBlockM * kD, kKeyElements = kBlockN * kD;
  // Up to 1024 bytes that align the tiles to a swizzle atom, Q, K and V double-buffered, then the
  // warp-specialized kernel's 9 mbarriers.
  static constexpr int kTileBytes = (kQElements + 4 * kKeyElements) * 2;
  static constexpr int kSmemBytes = static_cast<int>(kSwizzleAtomBytes) + kTileBytes + 16 * 8;
  static_assert(kD == 64 || kD == 128 || kD == 256, "the Hopper forward takes head-dim buckets 64, 128 and 256");
  static_assert(kSmemBytes <= 227 * 1024, "the Hopper forward's tiles must fit an sm_90 CTA");
};

// The tiles of a CTA in its dynamic shared memory, 1024-byte aligned (Q's shared address for wgmma's
// descriptors), and the warp-specialized kernel's mbarriers after them.
template <int kD>
struct HopperSmem {
  using Tile = HopperForwardTile<kD>;
  uint16_t *q, *k, *v;  // k and v: buffers 0 and 1
  uint32_t q_address;
  uint64_t* barriers;
  __device__ __forceinline__ explicit HopperSmem(uint4* raw) {
    q = reinterpret_cast<uint16_t*>(swizzle_aligned(raw, q_address));
    k = q + Tile::kQElements;
    v = k + 2 * Tile::kKeyElements;
    barriers = reinterpret_cast<uint64_t*>(q + Tile::kQElements + 4 * Tile::kKeyElements);
  }
  __device__ __forceinline__ uint16_t* k_tile(int buf) const { return k + buf * Tile::kKeyElements; }
  __device__ __forceinline__ uint16_t* v_tile(int buf) const { return v + buf * Tile::kKeyElements; }
};

// One key block for a warpgroup's 64 rows (q_group: their Q; k_tile, v_tile: the block's buffers):
// S = Q K^T, then ForwardRows' scores and online softmax, then O += P V.
template <typename T, int kD, typename Rows, int kOT>
__device__ __forceinline__ void hopper_block(float (&acc_o)[kOT][4], Rows& rows, uint32_t q_group, uint32_t k_tile,
                                             uint32_t v_tile, int j0) {
  using Tile = HopperForwardTile<kD>;
  constexpr int kBlockM = Tile::kBlockM, kBlockN = Tile::kBlockN;
  float acc_s[kBlockN / 8][4];
  wgmma_abt<T, kD>(acc_s, q_group, kBlockM, k_tile, kBlockN);
  rows.step(acc_s, acc_o, j0);
  uint32_t a[kBlockN / 16][4];
  fragments_of<T>(a, acc_s);
  wgmma_ab<T, kD>(acc_o, a, v_tile, kBlockN);
}

template <typename T, int kD, bool kPlain>
__global__ void __launch_bounds__(kHopperThreads, 1)
    attention_forward_sm90_kernel(const __grid_constant__ AttentionCudaParams<T> params, QueryLayout layout,
                                  unsigned vector) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // built for another target of a fat binary: the launcher never runs it there
#else
  using Tile = HopperForwardTile<kD>;
  constexpr int kBlockM = Tile::kBlockM, kBlockN = Tile::kBlockN, kOT = kD / 8;
  const AttentionParams& p = params.base;

  const QueryTile<kBlockM, kBlockN> work(p, layout);
  if (!work.inside) return;  // past a packed sequence's end (the whole CTA)
  const int64_t b = work.b;
  const AttentionSequence& seq = work.seq;
  const BlockRange blocks = work.blocks;
  const int dim = static_cast<int>(p.dim);

  extern __shared__ uint4 smem_raw[];
  const HopperSmem<kD> smem(smem_raw);
  const uint16_t* q = reinterpret_cast<const uint16_t*>(params.q);
  const KeyValueTiles<kBlockN, kD, true, kHopperThreads> kv(params, seq, b, work.hk, smem.k, vector);
  load_rows<kBlockM, kD, kHopperThreads>(
      smem.q,
      [&](int r) {
        int64_t h;
        int i;
        work.row(r, h, i);
        return i < work.q_len ? q + attention_q_at(p, seq, b, h, i) : static_cast<const uint16_t*>(nullptr);
      },
      dim, (vector & kVectorQ) != 0, SwizzledRows<kBlockM>{});
  if (blocks.count > 0) kv.load(blocks.first, 0);
  cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, group = warp / 4;
  ForwardRows<kBlockM, kBlockN, kPlain> rows(p, work, warp, lane);
  // wgmma runs a whole warpgroup: one whose 64 rows hold no query skips the products together.
  const bool group_busy = work.any_row(group * 64, 64);
  const uint32_t q_group = smem.q_address + group * 64 * 128;

  float acc_o[kOT][4];
  zero(acc_o);
  for (int n = 0; n < blocks.count; ++n) {
    const int buf = n & 1, j0 = (blocks.first + n) * kBlockN;
    // Not at head dim 256, which would spill (136 bytes with only 4 mask loads in flight), and computes
    // hidden blocks under the mask.
    const bool shown = wait_for_shown_stage<kPlain || kD == 256>(
        n + 1 < blocks.count, [&] { kv.load(blocks.first + n + 1, buf ^ 1); },
        [&] { return mask_shows_any<kBlockM, kBlockN, kHopperThreads>(p, b, j0, work.k_len, work); });
    if (!shown) continue;  // the mask hides the block from every row of the tile
    if (group_busy) {
      hopper_block<T, kD>(acc_o, rows, q_group, smem_address(kv.k_tile(buf)), smem_address(kv.v_tile(buf)), j0);
    }
    __syncthreads();  // the buffer is refilled by the next step's prefetch
  }
  cp_async_wait<0>();  // nothing is in flight past here (no key block: only Q's group)

  rows.finish(params, acc_o, layout, ForwardPartials{});
#endif
}

// The tensor maps of q, k and v (dims: head dim, position, head, batch) for the TMA loads.
struct HopperMaps {
  CUtensorMap q, k, v;
};

template <typename T, int kD, bool kPlain>
__global__ void __launch_bounds__(kHopperThreads + kProducerThreads, 1)
    attention_forward_sm90_tma_kernel(const __grid_constant__ AttentionCudaParams<T> params,
                                      const __grid_constant__ HopperMaps maps, QueryLayout layout) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // built for another target of a fat binary: the launcher never runs it there
#else
  using Tile = HopperForwardTile<kD>;
  constexpr int kBlockM = Tile::kBlockM, kBlockN = Tile::kBlockN, kOT = kD / 8, kHalves = kD / 64;
  const AttentionParams& p = params.base;
  const QueryTile<kBlockM, kBlockN> work(p, layout);
  const BlockRange blocks = work.blocks;

  extern __shared__ uint4 smem_raw[];
  const HopperSmem<kD> smem(smem_raw);
  // q_full; per buffer s, k_full[s] and v_full[s] (a TMA load each), k_empty[s] and v_empty[s] (the
  // consumers, K as soon as S is in, V once O is).
  uint64_t* q_full = smem.barriers;
  uint64_t* k_full = smem.barriers + 1;
  uint64_t* v_full = smem.barriers + 3;
  uint64_t* k_empty = smem.barriers + 5;
  uint64_t* v_empty = smem.barriers + 7;
  if (threadIdx.x == 0) {
    mbarrier_init(q_full, 1);
    for (int s = 0; s < 2; ++s) {
      mbarrier_init(k_full + s, 1);
      mbarrier_init(v_full + s, 1);
      mbarrier_init(k_empty + s, kHopperThreads);
      mbarrier_init(v_empty + s, kHopperThreads);
    }
    fence_barrier_init();
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (warp < kProducerThreads / 32) {
    setmaxnreg_dec<kProducerRegisters>();
    if (threadIdx.x == 0) {
      const int b = static_cast<int>(work.b), hk = static_cast<int>(work.hk), h = static_cast<int>(work.h0);
      mbarrier_arrive_expect_tx(q_full, Tile::kQElements * 2);
      for (int half = 0; half < kHalves; ++half) {
        tma_load_4d(smem.q + half * kBlockM * 64, &maps.q, half * 64, work.i0, h, b, q_full);
      }
      for (int n = 0; n < blocks.count; ++n) {
        const int s = n & 1, j0 = (blocks.first + n) * kBlockN;
        const uint32_t emptied = ((n >> 1) - 1) & 1;  // the phase in which the consumers let go of block n - 2
        if (n >= 2) mbarrier_wait(k_empty + s, emptied);
        mbarrier_arrive_expect_tx(k_full + s, Tile::kKeyElements * 2);
        for (int half = 0; half < kHalves; ++half) {
          tma_load_4d(smem.k_tile(s) + half * kBlockN * 64, &maps.k, half * 64, j0, hk, b, k_full + s);
        }
        if (n >= 2) mbarrier_wait(v_empty + s, emptied);
        mbarrier_arrive_expect_tx(v_full + s, Tile::kKeyElements * 2);
        for (int half = 0; half < kHalves; ++half) {
          tma_load_4d(smem.v_tile(s) + half * kBlockN * 64, &maps.v, half * 64, j0, hk, b, v_full + s);
        }
      }
    }
    return;
  }
  setmaxnreg_inc<kConsumerRegisters>();
  const int consumer_warp = warp - kProducerThreads / 32, group = consumer_warp / 4;
  ForwardRows<kBlockM, kBlockN, kPlain> rows(p, work, consumer_warp, lane);
  const uint32_t q_group = smem.q_address + group * 64 * 128;
  const auto k_tile = [&](int n) { return smem_address(smem.k_tile(n & 1)); };
  const auto v_tile = [&](int n) { return smem_address(smem.v_tile(n & 1)); };
  const auto full = [](int n) { return static_cast<uint32_t>(n >> 1) & 1; };  // block n's phase parity

  // Each step issues S_n = Q K_n^T and O += P_{n-1} V_{n-1} together. With kOverlap, the softmax of
  // S_n runs while the second product is in flight (FlashAttention-3's intra-warpgroup overlap) and
  // O is rescaled once it has landed; that holds P_{n-1} beside S_n, which the non-plain d128 variant
  // cannot without spilling, so it waits for both first (the non-plain d256 one runs the cp.async
  // kernel).
  constexpr bool kOverlap = kPlain || kD <= 64;
  // A mask may hide a key block from all of a warpgroup's 64 rows (or the rows may hold no query):
  // the warpgroup then skips its products, and only waits for the block's K and V to release them.
  // Each wgmma is waited for in the branch that issues it, and the mask is read (warpgroup_sees_block)
  // with no product in flight, all 64 loads of a thread at once (P and O are all it holds then):
  // ptxas serializes every wgmma of a kernel whose products in flight span a branch (C7518).
  const bool masked = !kPlain && p.mask_kind != AttentionMask::kNone, group_busy = work.any_row(group * 64, 64);
  const auto group_rows = [&](int r, int64_t& h, int& i) { return work(group * 64 + r, h, i); };
  const auto shown = [&](int n) {
    return warpgroup_sees_block<64, kBlockN>(p, masked, group_busy, group, work.b, (blocks.first + n) * kBlockN,
                                             work.k_len, group_rows, consumer_warp % 4 * 32 + lane);
  };
  const WarpgroupTurns turns(group);
  float acc_o[kOT][4], acc_s[kBlockN / 8][4];
  uint32_t a[kBlockN / 16][4];  // P of the block before, when has_p
  bool has_p = false;
  zero(acc_o);
  // O += P_m V_m alone in this warpgroup's turn (P of block m), or a turn without products when there
  // is no P.
  const auto value_turn = [&](int m) {
    if (!has_p) {
      turns.begin();
      turns.end();
      return;
    }
    mbarrier_wait(v_full + (m & 1), full(m));
    turns.begin();
    wgmma_ab_async<T, kD>(acc_o, a, v_tile(m), kBlockN);
    turns.end();
    wgmma_wait<0>();
    pin_registers(acc_o);
    pin_registers(a);
  };
  mbarrier_wait(q_full, 0);
  // One turn per step, and one after the last, whatever a warpgroup skips: the turns alternate.
  for (int n = 0; n < blocks.count; ++n) {
    const int j0 = (blocks.first + n) * kBlockN, last = n - 1;
    if (!shown(n)) {
      value_turn(last);
      if (has_p) mbarrier_arrive(v_empty + (last & 1));
      has_p = false;
      mbarrier_wait(k_full + (n & 1), full(n));
      mbarrier_arrive(k_empty + (n & 1));
      mbarrier_wait(v_full + (n & 1), full(n));
      mbarrier_arrive(v_empty + (n & 1));
      continue;
    }
    mbarrier_wait(k_full + (n & 1), full(n));
    if (!has_p) {  // S_n alone: the first block shown
      turns.begin();
      wgmma_abt_async<T, kD>(acc_s, q_group, kBlockM, k_tile(n), kBlockN);
      turns.end();
      wgmma_wait<0>();
      pin_registers(acc_s);
      mbarrier_arrive(k_empty + (n & 1));
      rows.step(acc_s, acc_o, j0);
      fragments_of<T>(a, acc_s);
      has_p = true;
      continue;
    }
    mbarrier_wait(v_full + (last & 1), full(last));
    turns.begin();
    wgmma_abt_async<T, kD>(acc_s, q_group, kBlockM, k_tile(n), kBlockN);
    wgmma_ab_async<T, kD>(acc_o, a, v_tile(last), kBlockN);
    turns.end();
    float alpha[2];
    if constexpr (kOverlap) {
      wgmma_wait<1>();  // S_n, the earlier group, is in
      pin_registers(acc_s);
      mbarrier_arrive(k_empty + (n & 1));
      rows.probabilities(acc_s, j0, alpha);
    }
    wgmma_wait<0>();
    pin_registers(acc_s);
    pin_registers(acc_o);
    pin_registers(a);
    if constexpr (!kOverlap) {
      mbarrier_arrive(k_empty + (n & 1));
      rows.probabilities(acc_s, j0, alpha);
    }
    mbarrier_arrive(v_empty + (last & 1));
    rows.rescale(acc_o, alpha);
    fragments_of<T>(a, acc_s);
  }
  if (blocks.count > 0) value_turn(blocks.count - 1);
  turns.finish();
  rows.finish(params, acc_o, layout, ForwardPartials{});
#endif
}

template <typename T, int kD, bool kPlain>
cudaError_t run_forward_sm90_bucket(const AttentionCudaParams<T>& params, unsigned vector, cudaStream_t stream) {
  using Tile = HopperForwardTile<kD>;
  const AttentionParams& p = params.base;
  const QueryLayout layout = query_layout(p, Tile::kBlockM, 1, 1);
  const int64_t ctas = query_layout_ctas(p, layout);
  // Inputs TMA can address take the warp-specialized kernel; not in the non-plain d256 variant, whose
  // scores would spill from a consumer's 240 registers (the cp.async kernel's threads have 255).
  if constexpr (kPlain || kD <= 128) {
    const int64_t q_sizes[3] = {p.batch, p.heads, p.q_len}, kv_sizes[3] = {p.batch, p.kv_heads, p.k_len};
    const bool tma = p.cu_seqlens_q == nullptr && p.k_len > 0 && tma_addressable(params.q, p.q_stride, q_sizes) &&
                     tma_addressable(params.k, p.k_stride, kv_sizes) && tma_addressable(params.v, p.v_stride, kv_sizes);
    static const bool fits = starts_with_registers_that_fit(attention_forward_sm90_tma_kernel<T, kD, kPlain>,
                                                            kProducerRegisters, kConsumerRegisters);
    if (tma && fits) {
      HopperMaps maps;
      cudaError_t status = tile_map(&maps.q, params.q, p.q_stride, p.batch, p.heads, p.q_len, p.dim, Tile::kBlockM);
      if (status == cudaSuccess) {
        status = tile_map(&maps.k, params.k, p.k_stride, p.batch, p.kv_heads, p.k_len, p.dim, Tile::kBlockN);
      }
      if (status == cudaSuccess) {
        status = tile_map(&maps.v, params.v, p.v_stride, p.batch, p.kv_heads, p.k_len, p.v_dim, Tile::kBlockN);
      }
      if (status == cudaSuccess) {  // else (no driver entry point, a map the driver refuses) the cp.async kernel
        return launch_tiles(attention_forward_sm90_tma_kernel<T, kD, kPlain>, ctas, kHopperThreads + kProducerThreads,
                            Tile::kSmemBytes, stream, params, maps, layout);
      }
    }
  }
  return launch_tiles(attention_forward_sm90_kernel<T, kD, kPlain>, ctas, kHopperThreads, Tile::kSmemBytes, stream,
                      params, layout, vector);
}

}  // namespace

bool hopper_opted_in() {
#if defined(GENFAST_ATTENTION_SM90)
  const char* opt_in = std::getenv("GENFAST_ATTENTION_SM90");
  if (opt_in == nullptr || std::strcmp(opt_in, "1") != 0) return false;
  int major = 0, minor = 0;
  return current_device_capability(&major, &minor) == cudaSuccess && major == 9 && minor == 0;
#else
  return false;
#endif
}

template <typename T>
cudaError_t run_forward_sm90(const AttentionCudaParams<T>& params, unsigned vector, cudaStream_t stream) {
  const AttentionParams& p = params.base;
  const bool plain = plain_scores(p);
  if constexpr ((GENFAST_ATTENTION_BUCKETS & 2) != 0) {
    if (widest_head_dim(p) <= 64) {
      return plain ? run_forward_sm90_bucket<T, 64, true>(params, vector, stream)
                   : run_forward_sm90_bucket<T, 64, false>(params, vector, stream);
    }
  }
  if constexpr ((GENFAST_ATTENTION_BUCKETS & 4) != 0) {
    if (widest_head_dim(p) <= 128) {
      return plain ? run_forward_sm90_bucket<T, 128, true>(params, vector, stream)
                   : run_forward_sm90_bucket<T, 128, false>(params, vector, stream);
    }
  }
  if constexpr ((GENFAST_ATTENTION_BUCKETS & 8) != 0) {
    return plain ? run_forward_sm90_bucket<T, 256, true>(params, vector, stream)
                 : run_forward_sm90_bucket<T, 256, false>(params, vector, stream);
  }
  return cudaErrorInvalidValue;
}

template cudaError_t run_forward_sm90<__half>(const AttentionCudaParams<__half>&, unsigned, cudaStream_t);
template cudaError_t run_forward_sm90<__nv_bfloat16>(const AttentionCudaParams<__nv_bfloat16>&, unsigned,
                                                     cudaStream_t);

}  // namespace attention_cuda
}  // namespace genfast
