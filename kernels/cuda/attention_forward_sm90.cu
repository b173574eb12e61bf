// Attention forward for Hopper (sm_90a) on wgmma: a CTA of two warpgroups takes 128 query rows of
// one head (64 per warpgroup) and walks key blocks of 128, K and V double-buffered through cp.async
// in 128-byte-swizzled shared memory (attention_swizzle.cuh), next to Q.
//   S = Q K^T   wgmma m64n128k16, A = Q and B = K both K-major from shared memory
//   O += P V    wgmma m64n64k16 per 64 columns of O, A = P from S's registers, B = V MN-major
// S and O have mma.m16n8's C-fragment layout, so the scores, online softmax and epilogue are the
// sm_80 kernel's (ForwardRows). This first Hopper step keeps the sm_80 kernel's structure: each
// warpgroup waits for its products, and no warp only copies (no TMA or warp specialization yet).
// It takes plans without stacking or splits and head-dim buckets 64 and 128; the launcher in
// attention_forward.cu uses it on sm_90 when GENFAST_ATTENTION_SM90=1 and the build has sm_90a.
#include <cstdlib>
#include <cstring>

#include "attention.cuh"
#include "attention_forward_rows.cuh"
#include "attention_swizzle.cuh"
#include "attention_tile.cuh"
#ifndef GENFAST_EMULATED_CUDA
#include "attention_sm90.cuh"
#endif

namespace genfast {
namespace attention_cuda {
namespace {

constexpr int kHopperThreads = 256;  // two warpgroups

template <int kD>
struct HopperForwardTile {
  static constexpr int kBlockM = 128, kBlockN = 128;
  static constexpr int kQElements = kBlockM * kD, kKeyElements = kBlockN * kD;
  // Q, then K and V double-buffered, after up to 1024 bytes that align the tiles to a swizzle atom.
  static constexpr int kSmemBytes = static_cast<int>(kSwizzleAtomBytes) + (kQElements + 4 * kKeyElements) * 2;
  static_assert(kD == 64 || kD == 128, "the Hopper forward takes head-dim buckets 64 and 128");
  static_assert(kSmemBytes <= 227 * 1024, "the Hopper forward's tiles must fit an sm_90 CTA");
};

template <int kTiles>
__device__ __forceinline__ float (&columns_of(float (&acc)[kTiles][4], int first))[8][4] {
  return *reinterpret_cast<float(*)[8][4]>(&acc[first]);
}

template <typename T, int kD, bool kPlain>
__global__ void __launch_bounds__(kHopperThreads, 1)
    attention_forward_sm90_kernel(const __grid_constant__ AttentionCudaParams<T> params, QueryLayout layout,
                                  unsigned vector) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // built for another target of a fat binary: the launcher never runs it there
#else
  using Tile = HopperForwardTile<kD>;
  constexpr int kBlockM = Tile::kBlockM, kBlockN = Tile::kBlockN;
  constexpr int kST = kBlockN / 8, kOT = kD / 8, kHalves = kD / 64;
  constexpr int kHalfBytesQ = kBlockM * 128, kHalfBytesKey = kBlockN * 128;  // one 64-column half
  const AttentionParams& p = params.base;

  const QueryTile<kBlockM, kBlockN> work(p, layout);
  if (!work.inside) return;  // past a packed sequence's end (the whole CTA)
  const int64_t b = work.b;
  const AttentionSequence& seq = work.seq;
  const BlockRange blocks = work.blocks;
  const int dim = static_cast<int>(p.dim), v_dim = static_cast<int>(p.v_dim), k_len = work.k_len;

  extern __shared__ uint4 smem_raw[];
  const uint32_t raw = smem_address(smem_raw);
  const uint32_t aligned = (raw + kSwizzleAtomBytes - 1) & ~(kSwizzleAtomBytes - 1);
  uint16_t* s_q = reinterpret_cast<uint16_t*>(reinterpret_cast<char*>(smem_raw) + (aligned - raw));
  uint16_t* s_k = s_q + Tile::kQElements;  // buffers 0 and 1
  uint16_t* s_v = s_k + 2 * Tile::kKeyElements;
  const uint32_t q_address = aligned;
  const uint32_t k_address = q_address + Tile::kQElements * 2, v_address = k_address + 2 * Tile::kKeyElements * 2;

  const uint16_t* q = reinterpret_cast<const uint16_t*>(params.q);
  const uint16_t* k_base = reinterpret_cast<const uint16_t*>(params.k) + attention_k_at(p, seq, b, work.hk, 0);
  const uint16_t* v_base = reinterpret_cast<const uint16_t*>(params.v) + attention_v_at(p, seq, b, work.hk, 0);
  const int64_t k_row = p.k_stride[2], v_row = p.v_stride[2];
  const auto load_keys = [&](int block, int buf) {
    const int j0 = block * kBlockN, valid = min(kBlockN, k_len - j0);
    load_tile<kBlockN, kD, kHopperThreads>(s_k + buf * Tile::kKeyElements, k_base + j0 * k_row, k_row, valid, dim,
                                           (vector & kVectorK) != 0, SwizzledRows<kBlockN>{});
    load_tile<kBlockN, kD, kHopperThreads>(s_v + buf * Tile::kKeyElements, v_base + j0 * v_row, v_row, valid,
                                           v_dim, (vector & kVectorV) != 0, SwizzledRows<kBlockN>{});
  };
  load_rows<kBlockM, kD, kHopperThreads>(
      s_q,
      [&](int r) {
        int64_t h;
        int i;
        work.row(r, h, i);
        return i < work.q_len ? q + attention_q_at(p, seq, b, h, i) : static_cast<const uint16_t*>(nullptr);
      },
      dim, (vector & kVectorQ) != 0, SwizzledRows<kBlockM>{});
  if (blocks.count > 0) load_keys(blocks.first, 0);
  cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, group = warp / 4;
  ForwardRows<kBlockM, kBlockN, kPlain> rows(p, work, warp, lane);
  // wgmma runs a whole warpgroup: one whose 64 rows hold no query skips the products together.
  const bool group_busy = work.any_row(group * 64, 64);
  const uint32_t q_group = q_address + group * 64 * 128;

  float acc_o[kOT][4];
  zero(acc_o);

  for (int n = 0; n < blocks.count; ++n) {
    const int buf = n & 1, j0 = (blocks.first + n) * kBlockN;
    if (n + 1 < blocks.count) {
      load_keys(blocks.first + n + 1, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    fence_async_shared();  // this thread's landed copies (and zero stores), before any wgmma reads them
    __syncthreads();
    if (group_busy) {
      const uint32_t k_tile = k_address + buf * Tile::kKeyElements * 2;
      const uint32_t v_tile = v_address + buf * Tile::kKeyElements * 2;

      // S = Q K^T for the warpgroup's 64 rows: k-step ks reads 32 bytes into a row of its half.
      // Every k-step and half runs (the zero-padded columns add nothing): a branch between two wgmma
      // makes ptxas serialize them.
      float acc_s[kST][4];
      zero(acc_s);
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kD / 16; ++ks) {
        const uint32_t within = (ks % 4) * 32;
        wgmma_ss<T>(acc_s, smem_descriptor(q_group + (ks / 4) * kHalfBytesQ + within),
                    smem_descriptor(k_tile + (ks / 4) * kHalfBytesKey + within));
      }
      wgmma_commit();
      wgmma_wait<0>();
      pin_registers(acc_s);

      rows.step(acc_s, acc_o, j0);

      // O += P V: k-step kk takes keys 16 kk .. 16 kk + 15, two swizzle atoms of V's rows.
      uint32_t a[kBlockN / 16][4];
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) a_from_c<T, kST>(a[kk], acc_s, kk);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
#pragma unroll
        for (int half = 0; half < kHalves; ++half) {
          wgmma_rs<T>(columns_of(acc_o, half * 8), a[kk],
                      smem_descriptor(v_tile + half * kHalfBytesKey + kk * 2 * kSwizzleAtomBytes));
        }
      }
      wgmma_commit();
      wgmma_wait<0>();
      pin_registers(acc_o);
    }
    __syncthreads();  // the buffer is refilled by the next step's prefetch
  }
  cp_async_wait<0>();  // nothing is in flight past here (no key block: only Q's group)

  rows.finish(params, acc_o, layout, ForwardPartials{});
#endif
}

template <typename T, int kD, bool kPlain>
cudaError_t run_forward_sm90_bucket(const AttentionCudaParams<T>& params, unsigned vector, cudaStream_t stream) {
  using Tile = HopperForwardTile<kD>;
  const AttentionParams& p = params.base;
  const QueryLayout layout = query_layout(p, Tile::kBlockM, 1, 1);
  return launch_tiles(attention_forward_sm90_kernel<T, kD, kPlain>, query_layout_ctas(p, layout), kHopperThreads,
                      Tile::kSmemBytes, stream, params, layout, vector);
}

}  // namespace

bool hopper_forward_applies(const AttentionParams& p, const AttentionForwardPlan& plan) {
#if defined(GENFAST_ATTENTION_SM90)
  const char* opt_in = std::getenv("GENFAST_ATTENTION_SM90");
  if (opt_in == nullptr || std::strcmp(opt_in, "1") != 0) return false;
  if (plan.heads_per_cta != 1 || plan.splits != 1 || (p.dim > p.v_dim ? p.dim : p.v_dim) > kHopperMaxHeadDim) {
    return false;
  }
  int major = 0, minor = 0;
  return current_device_capability(&major, &minor) == cudaSuccess && major == 9 && minor == 0;
#else
  (void)p;
  (void)plan;
  return false;
#endif
}

template <typename T>
cudaError_t run_forward_sm90(const AttentionCudaParams<T>& params, unsigned vector, cudaStream_t stream) {
  const AttentionParams& p = params.base;
  const bool plain = plain_scores(p);
  if constexpr ((GENFAST_ATTENTION_BUCKETS & 2) != 0) {
    if ((p.dim > p.v_dim ? p.dim : p.v_dim) <= 64) {
      return plain ? run_forward_sm90_bucket<T, 64, true>(params, vector, stream)
                   : run_forward_sm90_bucket<T, 64, false>(params, vector, stream);
    }
  }
  if constexpr ((GENFAST_ATTENTION_BUCKETS & 4) != 0) {
    return plain ? run_forward_sm90_bucket<T, 128, true>(params, vector, stream)
                 : run_forward_sm90_bucket<T, 128, false>(params, vector, stream);
  }
  return cudaErrorInvalidValue;
}

template cudaError_t run_forward_sm90<__half>(const AttentionCudaParams<__half>&, unsigned, cudaStream_t);
template cudaError_t run_forward_sm90<__nv_bfloat16>(const AttentionCudaParams<__nv_bfloat16>&, unsigned,
                                                     cudaStream_t);

}  // namespace attention_cuda
}  // namespace genfast
