// The pieces the attention kernels share (attention_forward.cu, attention_backward.cu): cp.async
// staging of 16-bit tiles into padded shared memory, the ldmatrix and mma.sync m16n8k16 products
// with float32 accumulators (their PTX is in attention_sm80.cuh), the scores' options, and the
// launchers' host-side choices.
//
// Fragment layouts of mma.m16n8k16 (lane = 4 gid + tig):
//   A (16 x 16, row-major), four 32-bit registers of two 16-bit values (low half first):
//     a[0] = (gid,     2 tig + {0,1})   a[1] = (gid + 8, 2 tig + {0,1})
//     a[2] = (gid,     2 tig + 8 + {0,1})   a[3] = (gid + 8, 2 tig + 8 + {0,1})
//   B (16 x 8, "col"), two registers: b[0] = (k = 2 tig + {0,1}, n = gid), b[1] = (k + 8, n = gid)
//   C (16 x 8, float): c[0], c[1] = (gid, 2 tig + {0,1});  c[2], c[3] = (gid + 8, 2 tig + {0,1})
// So the C tiles 2 kk and 2 kk + 1 (16 columns) of a product are, packed, the A fragment of k-step
// kk of the next product (a_from_c).
//
// Shared tiles are rows of kD 16-bit values padded to kD + 8 (16 bytes more per row), so that the
// eight 16-byte rows one 8x8 ldmatrix matrix reads fall in distinct banks for every kD used here.
// Two ldmatrix.x4 lane-address patterns serve every operand:
//   pattern A: row = lane % 16, column = 8 (lane / 16): from a tile stored [m][k], the A fragment
//     of rows 0..15, k 0..15; with .trans, from a tile stored [k][n], the B fragments of n-tiles
//     0..7 (r[0], r[1]) and 8..15 (r[2], r[3]).
//   pattern B: row = lane % 8 + 8 (lane / 16), column = 8 ((lane / 8) % 2): from a tile stored
//     [n][k], the B fragments of n-tiles 0..7 (r[0], r[1]) and 8..15 (r[2], r[3]).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "../common/attention.h"
#include "attention.cuh"
#include "attention_swizzle.cuh"
// What touches the hardware: the PTX wrappers, the device query and the launch. The emulator of
// kernels/tests (GENFAST_EMULATED_CUDA) gives its own, so that these kernels also run on the host.
#ifndef GENFAST_EMULATED_CUDA
#include "attention_sm80.cuh"
#endif

namespace genfast {
namespace attention_cuda {

constexpr int kThreads = 128;  // 4 warps
// The dynamic shared memory a block may opt into on every sm_80+ GPU (99 KiB on sm_86, sm_89 and
// sm_120; more on sm_80, sm_87 and sm_90): every tile configuration fits it.
constexpr int kMaxSmemBytes = 99 * 1024;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -__builtin_inff();

// Which inputs may be read 16 bytes at a time (aligned base, strides in multiples of 8 elements).
// kVectorMask: a bool mask whose keys are contiguous and rows 16-byte aligned.
enum VectorFlags : unsigned { kVectorQ = 1u, kVectorK = 2u, kVectorV = 4u, kVectorGradO = 8u, kVectorMask = 16u };

// Whether a call can run here: sizes the kernels take (0 with nothing to do is fine) on an sm_80+
// device; the launchers return this before launching anything.
inline cudaError_t check_attention_call(const AttentionParams& p) {
  const int64_t width = p.dim > p.v_dim ? p.dim : p.v_dim;
  if (width > kAttentionCudaMaxHeadDim || p.dim < 0 || p.v_dim < 0 || p.heads < 0 || p.kv_heads <= 0 ||
      p.heads % p.kv_heads != 0) {
    return cudaErrorInvalidValue;
  }
  int major = 0, minor = 0;
  const cudaError_t status = current_device_capability(&major, &minor);
  if (status != cudaSuccess) return status;
  return major >= 8 ? cudaSuccess : cudaErrorNotSupported;
}

// Whether a tensor may be read 16 bytes at a time: aligned base, strides in multiples of 8 elements.
inline bool vector_ok(const void* ptr, const int64_t (&stride)[3]) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && stride[0] % 8 == 0 && stride[1] % 8 == 0 &&
         stride[2] % 8 == 0;
}

inline bool bool_mask_vector_ok(const AttentionParams& p) {
  return p.mask_kind == AttentionMask::kBool && p.mask_stride[3] == 1 &&
         reinterpret_cast<uintptr_t>(p.mask) % 16 == 0 && p.mask_stride[0] % 16 == 0 && p.mask_stride[1] % 16 == 0 &&
         p.mask_stride[2] % 16 == 0;
}

// The inputs (q, k, v, a bool mask) that may be read 16 bytes at a time.
template <typename T>
unsigned input_vector_flags(const AttentionCudaParams<T>& params) {
  const AttentionParams& p = params.base;
  return (vector_ok(params.q, p.q_stride) ? kVectorQ : 0u) | (vector_ok(params.k, p.k_stride) ? kVectorK : 0u) |
         (vector_ok(params.v, p.v_stride) ? kVectorV : 0u) | (bool_mask_vector_ok(p) ? kVectorMask : 0u);
}

// Bit b set: the head-dim bucket 32 << b is compiled (setup.py's GENFAST_ATTENTION_HEAD_DIMS narrows
// it for development builds). 256 always is: a larger bucket serves smaller head dims, zero-padded.
#ifndef GENFAST_ATTENTION_BUCKETS
#define GENFAST_ATTENTION_BUCKETS 0xF
#endif

// fn(std::integral_constant<int, kD>{}) for the smallest compiled head-dim bucket kD (32, 64, 128
// or 256) that holds max(dim, v_dim); the tail of the bucket is zero-padded in the tiles.
template <typename Fn>
cudaError_t with_head_dim_bucket(const AttentionParams& p, Fn fn) {
  const int64_t width = p.dim > p.v_dim ? p.dim : p.v_dim;
  if constexpr ((GENFAST_ATTENTION_BUCKETS & 1) != 0) {
    if (width <= 32) return fn(std::integral_constant<int, 32>{});
  }
  if constexpr ((GENFAST_ATTENTION_BUCKETS & 2) != 0) {
    if (width <= 64) return fn(std::integral_constant<int, 64>{});
  }
  if constexpr ((GENFAST_ATTENTION_BUCKETS & 4) != 0) {
    if (width <= 128) return fn(std::integral_constant<int, 128>{});
  }
  return fn(std::integral_constant<int, 256>{});
}

// GENFAST_FAST_PATH_ONLY (scripts/cuda-attention-sass.py; no build that runs): every test that
// sends whole tiles to a fast path holds, so that a kernel's loop is the instructions of its step on
// whole tiles, which the script counts.
#ifdef GENFAST_FAST_PATH_ONLY
#ifdef GENFAST_WITH_CUDA
#error "GENFAST_FAST_PATH_ONLY is for counting instructions: its kernels are wrong on partial tiles"
#endif
#define GENFAST_FAST_PATH(test) true
#else
#define GENFAST_FAST_PATH(test) (test)
#endif

// Whether the scores need only a positive scale and the band (no soft-cap, ALiBi, mask or dropout):
// the plain kernels fold the scale into their exponents, max(scale x) = scale max(x).
inline bool plain_scores(const AttentionParams& p) {
  return p.softcap == 0.0f && p.alibi_slopes == nullptr && p.mask_kind == AttentionMask::kNone &&
         !(p.dropout_p > 0.0f) && p.scale > 0.0f;
}

// Two floats as two T in one register, lo in the low half (the lower column of a fragment).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return static_cast<uint32_t>(__half_as_ushort(v.x)) | (static_cast<uint32_t>(__half_as_ushort(v.y)) << 16);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return static_cast<uint32_t>(__bfloat16_as_ushort(v.x)) | (static_cast<uint32_t>(__bfloat16_as_ushort(v.y)) << 16);
}

// The value of a T given by its bits.
template <typename T>
__device__ __forceinline__ float widen(uint16_t bits);
template <>
__device__ __forceinline__ float widen<__half>(uint16_t bits) {
  return __half2float(__ushort_as_half(bits));
}
template <>
__device__ __forceinline__ float widen<__nv_bfloat16>(uint16_t bits) {
  return __bfloat162float(__ushort_as_bfloat16(bits));
}

// The A fragment of k-step kk from the C tiles 2 kk and 2 kk + 1 of a 16-row product.
template <typename T, int kTiles>
__device__ __forceinline__ void a_from_c(uint32_t (&a)[4], const float (&c)[kTiles][4], int kk) {
  a[0] = pack2<T>(c[2 * kk][0], c[2 * kk][1]);
  a[1] = pack2<T>(c[2 * kk][2], c[2 * kk][3]);
  a[2] = pack2<T>(c[2 * kk + 1][0], c[2 * kk + 1][1]);
  a[3] = pack2<T>(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

// What a_from_c's rounding to T leaves of the same C tiles, as a fragment of T: a product of P in
// the two fragments carries P to 2^-22 (half) or 2^-16 (bfloat16) instead of 2^-11 or 2^-8.
template <typename T, int kTiles>
__device__ __forceinline__ void a_rest_from_c(uint32_t (&a)[4], const float (&c)[kTiles][4], int kk) {
  const auto rest = [](float lo, float hi) {
    const uint32_t rounded = pack2<T>(lo, hi);
    return pack2<T>(lo - widen<T>(static_cast<uint16_t>(rounded & 0xffffu)),
                    hi - widen<T>(static_cast<uint16_t>(rounded >> 16)));
  };
  a[0] = rest(c[2 * kk][0], c[2 * kk][1]);
  a[1] = rest(c[2 * kk][2], c[2 * kk][3]);
  a[2] = rest(c[2 * kk + 1][0], c[2 * kk + 1][1]);
  a[3] = rest(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

// A warp's C tiles (its 16 rows from row0, kTiles n-tiles of 8 columns) in T, to a shared tile
// stored transposed: element (row0 + r, column c) at c * stride + row0 + r.
template <typename T, int kTiles>
__device__ __forceinline__ void store_transposed(uint16_t* tile, int stride, int row0, const float (&c)[kTiles][4]) {
  const int gid = (threadIdx.x % 32) / 4, tig = threadIdx.x % 4;
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int column = t * 8 + 2 * tig + (e & 1), row = row0 + gid + 8 * (e / 2);
      tile[column * stride + row] = static_cast<uint16_t>(pack2<T>(c[t][e], 0.0f) & 0xffffu);
    }
  }
}

// A warp's C tiles in T, to a shared tile as they are: element (row0 + r, col0 + c) at
// (row0 + r) * stride + col0 + c, a pair to a 32-bit store (stride and col0 even).
template <typename T, int kTiles>
__device__ __forceinline__ void store_rows(uint16_t* tile, int stride, int row0, int col0,
                                           const float (&c)[kTiles][4]) {
  const int gid = (threadIdx.x % 32) / 4, tig = threadIdx.x % 4;
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      *reinterpret_cast<uint32_t*>(tile + (row0 + gid + 8 * r) * stride + col0 + t * 8 + 2 * tig) =
          pack2<T>(c[t][2 * r], c[t][2 * r + 1]);
    }
  }
}

// The A fragments of k-steps 0 .. kSteps - 1 (k from col0) of rows row0 .. row0 + 15 of a shared
// tile stored [m][k] with row stride `stride`: ldmatrix with pattern A.
template <int kSteps>
__device__ __forceinline__ void load_a_fragments(uint32_t (&a)[kSteps][4], const uint16_t* tile, int stride, int row0,
                                                 int col0) {
  const int lane = threadIdx.x % 32;
  const uint16_t* frag = tile + (row0 + lane % 16) * stride + col0 + (lane / 16) * 8;
#pragma unroll
  for (int kk = 0; kk < kSteps; ++kk) ldsm_x4(a[kk], frag + kk * 16);
}

template <int kTiles>
__device__ __forceinline__ void zero(float (&acc)[kTiles][4]) {
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[t][e] = 0.0f;
  }
}

// mma_a_bt's and mma_a_b's products, each under a test of its bound unless kAll. nvcc compiles each
// tested product as a branch whose block re-derives its shared addresses and waits for its own
// ldmatrix: the sm_80 forward's step at head dim 128 held 16 such blocks, each a WARPSYNC and a stall.
// A: a lane's pattern-A address (ldmatrix per k-step) or the k-steps' fragments in registers.
template <typename T, int kD, bool kAll, int kTiles, typename A>
__device__ __forceinline__ void mma_a_bt_steps(float (&acc)[kTiles][4], const A& a_source, const uint16_t* b_frag,
                                               int steps) {
  constexpr int kStride = kD + 8;
#pragma unroll
  for (int ks = 0; ks < kD / 16; ++ks) {
    if (kAll || ks < steps) {
      uint32_t a[4];
      if constexpr (std::is_pointer<A>::value) {
        ldsm_x4(a, a_source + ks * 16);
      } else {
#pragma unroll
        for (int x = 0; x < 4; ++x) a[x] = a_source[ks][x];
      }
#pragma unroll
      for (int t = 0; t < kTiles / 2; ++t) {
        uint32_t b[4];
        ldsm_x4(b, b_frag + t * 16 * kStride + ks * 16);
        mma_16816<T>(acc[2 * t], a, b[0], b[1]);
        mma_16816<T>(acc[2 * t + 1], a, b[2], b[3]);
      }
    }
  }
}

template <typename T, bool kAll, int kTiles>
__device__ __forceinline__ void mma_a_b_tiles(float (&acc)[kTiles][4], const uint32_t (&a)[4], const uint16_t* b_frag,
                                              int cols) {
#pragma unroll
  for (int t = 0; t < kTiles / 2; ++t) {
    if (kAll || t * 16 < cols) {
      uint32_t b[4];
      ldsm_x4_trans(b, b_frag + t * 16);
      mma_16816<T>(acc[2 * t], a, b[0], b[1]);
      mma_16816<T>(acc[2 * t + 1], a, b[2], b[3]);
    }
  }
}

// acc (16 rows, kTiles n-tiles of 8) += A B^T over the k-steps (of 16) below `steps`, at most
// kD / 16: A's rows from a_source, this lane's pattern-A address in a tile stored [m][k] or the
// fragments of all kD / 16 k-steps in registers (uint32_t[kD / 16][4]); B's rows from b_frag, its
// pattern-B address in a tile stored [n][k]; both tiles of row stride kD + 8.
template <typename T, int kD, int kTiles, typename A>
__device__ __forceinline__ void mma_a_bt(float (&acc)[kTiles][4], const A& a_source, const uint16_t* b_frag,
                                         int steps) {
  if (GENFAST_FAST_PATH(steps >= kD / 16)) {
    mma_a_bt_steps<T, kD, true>(acc, a_source, b_frag, steps);
  } else {
    mma_a_bt_steps<T, kD, false>(acc, a_source, b_frag, steps);
  }
}

// acc (16 rows, kTiles n-tiles of 8) += A B for one k-step of 16: A in registers; B's 16 rows from
// b_frag, this lane's pattern-A address (.trans) in a tile stored [k][n]. Pairs of n-tiles at or
// past `cols` are skipped.
template <typename T, int kTiles>
__device__ __forceinline__ void mma_a_b(float (&acc)[kTiles][4], const uint32_t (&a)[4], const uint16_t* b_frag,
                                        int cols) {
  if (GENFAST_FAST_PATH(cols >= kTiles * 8)) {
    mma_a_b_tiles<T, true>(acc, a, b_frag, cols);
  } else {
    mma_a_b_tiles<T, false>(acc, a, b_frag, cols);
  }
}

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// out[at] = lo and, when `both`, out[at + 1] = hi; one 32-bit store when pair_ok (at even, aligned).
template <typename T>
__device__ __forceinline__ void store_pair(T* out, int64_t at, float lo, float hi, bool both, bool pair_ok) {
  if (both && pair_ok) {
    const uint32_t v = pack2<T>(lo, hi);
    *reinterpret_cast<uint32_t*>(out + at) = v;
  } else {
    out[at] = from_f32<T>(lo);
    if (both) out[at + 1] = from_f32<T>(hi);
  }
}

// The maximum, NaN when either is NaN (fmaxf would drop it): one FMNMX.NAN on sm_80 and later, where
// the comparisons took two FSETP and an FSEL.
__device__ __forceinline__ float nan_max(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float most;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(most) : "f"(a), "f"(b));
  return most;
#else
  return (a > b || a != a) ? a : b;
#endif
}

// 2^x, flushing results below 2^-126 to zero: one MUFU.EX2, where exp2f scales denormal results
// around it. A probability that small vanishes against its row's sum, which is at least 1.
__device__ __forceinline__ float exp2_ftz(float x) {
#if defined(__CUDA_ARCH__)
  float power;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(power) : "f"(x));
  return power;
#else
  return exp2f(x);
#endif
}

// Where element (r, c) of a shared tile of kD columns is: rows of kD + 8 values (padded).
template <int kD>
struct PaddedRows {
  __device__ __forceinline__ int operator()(int r, int c) const { return r * (kD + 8) + c; }
};

// Rows 0 .. kRows - 1 of a shared tile of kD columns laid out by `at` (the offset of element (r, c),
// for c a multiple of 8, whose 8 values are contiguous) from 16-bit values: row r from row_at(r),
// its first element, or zeros where row_at(r) is null; columns past `cols` are zeroed. Whole 16-byte
// chunks go through cp.async when `vector`; kBlockThreads threads share the work, kUnroll chunks
// unrolled; the caller commits and waits.
template <int kRows, int kD, int kBlockThreads = kThreads, typename RowAt, typename At = PaddedRows<kD>,
          int kUnroll = 4>
__device__ __forceinline__ void load_rows(uint16_t* tile, const RowAt& row_at, int cols, bool vector,
                                          const At& at = At{}) {
  constexpr int kChunks = kD / 8;
#pragma unroll kUnroll
  for (int e = threadIdx.x; e < kRows * kChunks; e += kBlockThreads) {
    const int r = e / kChunks, c = (e % kChunks) * 8;
    uint16_t* dst = tile + at(r, c);
    const uint16_t* row = c < cols ? row_at(r) : nullptr;
    if (row != nullptr) {
      const uint16_t* s = row + c;
      if (vector && c + 8 <= cols) {
        cp_async_16(dst, s);
      } else {
        uint32_t w[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const uint32_t lo = c + 2 * k < cols ? s[2 * k] : 0u;
          const uint32_t hi = c + 2 * k + 1 < cols ? s[2 * k + 1] : 0u;
          w[k] = lo | (hi << 16);
        }
        *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
      }
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

// load_rows of rows < rows from `src`, rows row_stride elements apart. In the mma.sync kernels'
// padded tiles (blocks of exactly kBlockThreads threads) a whole tile (every row, kD columns,
// 16-byte chunks) takes one cp.async per chunk and no test: load_rows' tests and branches were a
// third of the instructions of the sm_80 forward's step. The Hopper kernels' swizzled tiles keep
// load_rows, whose registers their budgets were set by (the fast path spilled their d128 kv kernel's
// by 72 more bytes).
template <int kRows, int kD, int kBlockThreads = kThreads, typename At = PaddedRows<kD>>
__device__ __forceinline__ void load_tile(uint16_t* tile, const uint16_t* src, int64_t row_stride, int rows,
                                          int cols, bool vector, const At& at = At{}) {
  if constexpr (std::is_same<At, PaddedRows<kD>>::value) {
    constexpr int kChunks = kD / 8, kRowStep = kBlockThreads / kChunks;
    static_assert(kBlockThreads % kChunks == 0 && kRows % kRowStep == 0,
                  "each thread copies one column of chunks, the same number of rows");
    if (GENFAST_FAST_PATH(vector && rows == kRows && cols == kD)) {
      const int t = static_cast<int>(threadIdx.x), c = (t % kChunks) * 8;
      const uint16_t* from = src + (t / kChunks) * row_stride + c;
      const int64_t step = kRowStep * row_stride;
      // Counted: bounded by r < kRows instead, nvcc left the loop rolled.
#pragma unroll
      for (int n = 0, r = t / kChunks; n < kRows / kRowStep; ++n, r += kRowStep, from += step) {
        cp_async_16(tile + at(r, c), from);
      }
      return;
    }
  }
  load_rows<kRows, kD, kBlockThreads>(
      tile, [&](int r) { return r < rows ? src + r * row_stride : static_cast<const uint16_t*>(nullptr); }, cols,
      vector, at);
}

// The band of a sequence in 32 bits: key j of query i is kept when lo <= j - i <= hi. Clamping to
// [-q_len - 1, k_len + 1] changes no decision, since -q_len < j - i < k_len.
struct Band {
  int lo, hi;
};
__device__ __forceinline__ int clamp_band(int64_t v, int64_t q_len, int64_t k_len) {
  return static_cast<int>(v < -q_len - 1 ? -q_len - 1 : (v > k_len + 1 ? k_len + 1 : v));
}
__device__ __forceinline__ Band sequence_band(const AttentionSequence& seq) {
  return Band{clamp_band(seq.band_lo, seq.q_len, seq.k_len), clamp_band(seq.band_hi, seq.q_len, seq.k_len)};
}

// The key blocks (of kBlockN) that queries [i0, i0 + rows) can see: blocks first .. first + count - 1.
struct BlockRange {
  int first, count;
};
template <int kBlockN>
__device__ __forceinline__ BlockRange key_blocks(const Band& band, int i0, int rows, int k_len) {
  const int64_t first = i0 + static_cast<int64_t>(band.lo) > 0 ? i0 + static_cast<int64_t>(band.lo) : 0;
  const int64_t last_end = static_cast<int64_t>(i0) + rows + band.hi;  // one past the last key
  const int64_t end = last_end < k_len ? last_end : k_len;
  if (end <= first) return BlockRange{0, 0};
  const int b0 = static_cast<int>(first / kBlockN);
  return BlockRange{b0, static_cast<int>((end - 1) / kBlockN) - b0 + 1};
}

// How the CTAs of a kernel that walks key blocks for a tile of queries (the forward, the backward's
// dQ) cover the work. CTA x takes key split x % splits of query tile x / splits; query tiles go,
// slowest first, over batch, kv head, chunks of heads_per_cta of its query heads, and blocks of
// rows_per_head queries; a launch may start at tile first_tile. Row r of a tile is query
// i0 + r % rows_per_head of head h0 + r / rows_per_head.
// Stacking a kv head's query heads in one tile lets a few queries (decoding) fill the tensor cores'
// rows while each key block is read once for all of them; splitting the keys gives a GPU enough CTAs.
struct QueryLayout {
  int q_blocks, head_chunks, heads_per_cta, rows_per_head, splits;
  int64_t first_tile;
};

// The layout of tiles of block_m rows: one head per tile, or heads_per_cta heads of min(q_len,
// block_m / heads_per_cta) rows each; 1 <= heads_per_cta <= block_m.
inline QueryLayout query_layout(const AttentionParams& p, int block_m, int heads_per_cta, int splits) {
  QueryLayout l{};
  const int64_t group = p.heads / p.kv_heads;
  l.heads_per_cta = heads_per_cta;
  const int64_t stacked = p.q_len < block_m / heads_per_cta ? p.q_len : block_m / heads_per_cta;
  l.rows_per_head = heads_per_cta == 1 ? block_m : static_cast<int>(stacked > 1 ? stacked : 1);
  l.q_blocks = static_cast<int>((p.q_len + l.rows_per_head - 1) / l.rows_per_head);
  l.head_chunks = static_cast<int>((group + heads_per_cta - 1) / heads_per_cta);
  l.splits = splits;
  return l;
}

inline int64_t query_layout_ctas(const AttentionParams& p, const QueryLayout& l) {
  return static_cast<int64_t>(l.q_blocks) * l.head_chunks * p.kv_heads * p.batch * l.splits;
}

// What CTA blockIdx.x of a QueryLayout works on. `inside` is false past a packed sequence's end (the
// whole CTA returns).
template <int kBlockM, int kBlockN>
struct QueryTile {
  int64_t b, hk, h0;
  int heads;  // query heads h0 .. h0 + heads - 1
  AttentionSequence seq;
  int i0, rows, rows_per_head, q_len, k_len;  // queries i0 .. i0 + rows - 1 of each head
  Band band;
  BlockRange blocks;  // this CTA's split of the key blocks the tile's queries reach
  bool inside;
  __device__ __forceinline__ QueryTile(const AttentionParams& p, const QueryLayout& l) {
    const int64_t tile = l.first_tile + blockIdx.x / l.splits;
    const int split = static_cast<int>(blockIdx.x % l.splits);
    const int64_t group = p.heads / p.kv_heads;
    rows_per_head = l.rows_per_head;
    // The last query blocks first: under a causal band they reach the most keys, and started first
    // they leave the cheap blocks to fill the last wave (FlashAttention-2's order).
    i0 = static_cast<int>(l.q_blocks - 1 - tile % l.q_blocks) * rows_per_head;
    const int64_t chunk = tile / l.q_blocks;
    const int c = static_cast<int>(chunk % l.head_chunks);
    const int64_t bhk = chunk / l.head_chunks;
    b = bhk / p.kv_heads;
    hk = bhk % p.kv_heads;
    h0 = hk * group + c * l.heads_per_cta;
    heads = min(l.heads_per_cta, static_cast<int>(group) - c * l.heads_per_cta);
    seq = attention_sequence(p, b);
    q_len = static_cast<int>(seq.q_len);
    k_len = static_cast<int>(seq.k_len);
    inside = i0 < q_len;
    rows = inside ? min(rows_per_head, q_len - i0) : 0;
    band = sequence_band(seq);
    const BlockRange all = inside ? key_blocks<kBlockN>(band, i0, rows, k_len) : BlockRange{0, 0};
    const int per = (all.count + l.splits - 1) / l.splits;
    const int skip = min(all.count, split * per);
    blocks = BlockRange{all.first + skip, min(per, all.count - skip)};
  }
  // Head h and query i of tile row r; a row past the tile's heads or queries gets i = q_len.
  __device__ __forceinline__ void row(int r, int64_t& h, int& i) const {
    const int g = r / rows_per_head, k = r % rows_per_head;
    const bool used = g < heads && k < rows;
    h = h0 + (used ? g : 0);
    i = used ? i0 + k : q_len;
  }
  // row() as mask_shows_any asks it: whether row r holds a query.
  __device__ __forceinline__ bool operator()(int r, int64_t& h, int& i) const {
    row(r, h, i);
    return i < q_len;
  }
  // Whether any of rows r0 .. r0 + n - 1 holds a query.
  __device__ __forceinline__ bool any_row(int r0, int n) const {
    for (int r = r0; r < r0 + n; ++r) {
      if (r / rows_per_head < heads && r % rows_per_head < rows) return true;
    }
    return false;
  }
};

// The key blocks of kv head hk, staged through cp.async by kBlockThreads threads into two buffers
// each of K and V (kBlockN rows of kD columns: padded rows, or 128-byte swizzled for wgmma), keys
// past k_len zeroed. kPaged: k and v may be a paged cache; the kernels that never take one keep the
// block table's registers.
template <int kBlockN, int kD, bool kSwizzled = false, int kBlockThreads = kThreads, bool kPaged = false>
struct KeyValueTiles {
  using Layout = typename std::conditional<kSwizzled, SwizzledRows<kBlockN>, PaddedRows<kD>>::type;
  static constexpr int kTileElements = kBlockN * (kSwizzled ? kD : kD + 8);
  static constexpr int kElements = 4 * kTileElements;  // of shared memory
  uint16_t *s_k, *s_v;
  const uint16_t *k_base, *v_base;  // key 0's rows; a paged cache's page 0, head hk
  int64_t k_row, v_row;
  const int32_t* pages;  // the sequence's row of the block table, or null: not paged
  const AttentionParams& p;
  int k_len, dim, v_dim;
  bool vector_k, vector_v;
  template <typename T>
  __device__ __forceinline__ KeyValueTiles(const AttentionCudaParams<T>& params, const AttentionSequence& seq,
                                           int64_t b, int64_t hk, uint16_t* smem, unsigned vector)
      : p(params.base) {
    s_k = smem;
    s_v = smem + 2 * kTileElements;
    pages = kPaged && p.block_table != nullptr ? p.block_table + b * p.block_table_stride : nullptr;
    const int64_t k_at = pages != nullptr ? hk * p.k_stride[1] : attention_k_at(p, seq, b, hk, 0);
    const int64_t v_at = pages != nullptr ? hk * p.v_stride[1] : attention_v_at(p, seq, b, hk, 0);
    k_base = reinterpret_cast<const uint16_t*>(params.k) + k_at;
    v_base = reinterpret_cast<const uint16_t*>(params.v) + v_at;
    k_row = p.k_stride[2];
    v_row = p.v_stride[2];
    k_len = static_cast<int>(seq.k_len);
    dim = static_cast<int>(p.dim);
    v_dim = static_cast<int>(p.v_dim);
    vector_k = (vector & kVectorK) != 0;
    vector_v = (vector & kVectorV) != 0;
  }
  // The rows of a block at j0 (valid of them) that crosses pages of a paged cache, each row's page
  // looked up: load_rows, rolled, so that this rare path adds few instructions and no registers to
  // the kernel's loop (unrolled, it spilled the sm_80 forward at head dim 64).
  __device__ __forceinline__ void load_paged_rows(uint16_t* tile, const uint16_t* base, int j0, int valid,
                                                  const int64_t (&stride)[3], int cols, bool vector) const {
    const auto row_at = [&](int r) {
      const uint16_t* row = r < valid ? base + attention_paged_key_at(p, pages, j0 + r, stride) : nullptr;
      return row;
    };
    load_rows<kBlockN, kD, kBlockThreads, decltype(row_at), Layout, 1>(tile, row_at, cols, vector);
  }
  __device__ __forceinline__ uint16_t* k_tile(int buf) const { return s_k + buf * kTileElements; }
  __device__ __forceinline__ uint16_t* v_tile(int buf) const { return s_v + buf * kTileElements; }
  // Issues the copies of key block `block` into buffer `buf`; the caller commits and waits.
  __device__ __forceinline__ void load(int block, int buf) const {
    const int j0 = block * kBlockN, valid = min(kBlockN, k_len - j0);
    const uint16_t *k_rows = k_base + j0 * k_row, *v_rows = v_base + j0 * v_row;
    if (kPaged && pages != nullptr) {
      if (!attention_block_in_one_page(p, j0, valid)) {  // each row's page, looked up as it is read
        load_paged_rows(k_tile(buf), k_base, j0, valid, p.k_stride, dim, vector_k);
        load_paged_rows(v_tile(buf), v_base, j0, valid, p.v_stride, v_dim, vector_v);
        return;
      }
      k_rows = k_base + attention_paged_key_at(p, pages, j0, p.k_stride);  // the block's page, looked up once
      v_rows = v_base + attention_paged_key_at(p, pages, j0, p.v_stride);
    }
    load_tile<kBlockN, kD, kBlockThreads>(k_tile(buf), k_rows, k_row, valid, dim, vector_k, Layout{});
    load_tile<kBlockN, kD, kBlockThreads>(v_tile(buf), v_rows, v_row, valid, v_dim, vector_v, Layout{});
  }
};

// Whether every (i, j) of queries [i0, i0 + m) and keys [j0, j0 + n) is inside the band and the keys.
__device__ __forceinline__ bool block_inside(const Band& band, int i0, int m, int j0, int n, int k_len) {
  return GENFAST_FAST_PATH(j0 + n <= k_len && static_cast<int64_t>(j0) - (i0 + m - 1) >= band.lo &&
                           static_cast<int64_t>(j0) + n - 1 - i0 <= band.hi);
}

// mask_shows_any's rows for queries i0 + r of head h: those below q_len.
struct HeadQueries {
  int64_t h;
  int i0, q_len;
  __device__ __forceinline__ bool operator()(int r, int64_t& head, int& i) const {
    head = h;
    i = i0 + r;
    return i < q_len;
  }
};

// Whether the mask lets any element of a tile through (true without a mask): rows r < kRows, where
// row(r, h, i) gives the row's head and query and returns false for a row with none, and keys j0 ..
// j0 + kCols - 1 below k_len. The kBlockThreads threads share the elements in order (consecutive
// threads, consecutive keys), each issuing all its loads at once, or kInFlight at a time where
// that many registers would spill the kernel's accumulators. A bool mask hides with false, an
// additive one with -inf (NaN does not hide). The caller ORs the threads' answers over the CTA
// (stage_block) and skips the tile when none sees a key: padding, document and block-sparse masks
// then cost about the blocks they let through, as on the CPU. `thread`: this thread's index among
// the kBlockThreads (threadIdx.x when negative).
template <int kRows, int kCols, int kBlockThreads = kThreads, int kInFlight = 0, typename RowFn>
__device__ __forceinline__ bool mask_shows_any(const AttentionParams& p, int64_t b, int j0, int k_len, RowFn row,
                                               int thread = -1) {
  constexpr int kElements = kRows * kCols, kLoads = (kElements + kBlockThreads - 1) / kBlockThreads;
  constexpr int kGroup = kInFlight > 0 && kInFlight < kLoads ? kInFlight : kLoads;
  constexpr bool kOwnColumn = kBlockThreads % kCols == 0;  // each thread reads a single key
  if (p.mask_kind == AttentionMask::kNone) return true;
  const int t = thread >= 0 ? thread : static_cast<int>(threadIdx.x);
  bool shown = false;
#pragma unroll 1
  for (int n0 = 0; n0 < kLoads; n0 += kGroup) {
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      const int n = n0 + g, e = t + n * kBlockThreads;
      const int c = kOwnColumn ? t % kCols : e % kCols;
      const int r = kOwnColumn ? t / kCols + n * (kBlockThreads / kCols) : e / kCols;
      int64_t h;
      int i;
      if (n >= kLoads || e >= kElements || j0 + c >= k_len || !row(r, h, i)) continue;
      const int64_t at = attention_mask_row(p, b, h, i) + (j0 + c) * p.mask_stride[3];
      shown |= !attention_mask_hides(p, at);
    }
  }
  return shown;
}

struct AlwaysShown {
  __device__ __forceinline__ bool operator()() const { return true; }
};

// Before a step of a loop whose blocks cp.async stages in two buffers: issues the next block's
// copies (load_next, when there is one), then this thread's shown() (its reads of the block's mask,
// mask_shows_any, which go out while the copies fly), waits for this block's copies, runs
// publish() (the Hopper kernels' fence that shows them to wgmma), then shown_after_wait() (a test
// of the mask staged with the block, BoolMaskTiles::shown), and syncs the CTA. Returns whether any
// thread's shown() and shown_after_wait() both held: false when the mask hides the block whole.
// kAlways: true, and neither is called.
template <bool kAlways, typename LoadNext, typename Shown, typename Publish, typename ShownAfterWait = AlwaysShown>
__device__ __forceinline__ bool stage_block(bool has_next, const LoadNext& load_next, const Shown& shown,
                                            const Publish& publish,
                                            const ShownAfterWait& shown_after_wait = ShownAfterWait{}) {
  if (has_next) {
    load_next();
    cp_async_commit();
  }
  bool mine = true;
  if constexpr (!kAlways) mine = shown();
  if (has_next) {
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
  publish();
  if constexpr (kAlways) {
    __syncthreads();
    return true;
  } else {
    mine = mine && shown_after_wait();
    return __syncthreads_or(mine) != 0;
  }
}

// The score s_ij from the raw dot product q_i . k_j: the plain path only scales (not when !kScaled:
// its caller folds the scale, positive on that path, into an exponent) and, when `check`, applies
// the band and the keys' end; the full path is attention_score (soft-cap, ALiBi, mask, band) and
// -inf outside the sequence's queries and keys (the keys and the band tested only when `check`: a
// block inside them needs neither). With kCap, cap gets the soft-cap's 1 - tanh^2. mask_row:
// attention_mask_row(p, b, h, i) (unused without a mask), which a caller walking a row forms once;
// without read_mask the caller applies the mask (staged in shared memory).
template <bool kPlain, bool kCap, bool kScaled = true>
__device__ __forceinline__ float score_at(const AttentionParams& p, const AttentionSequence& seq, const Band& band,
                                          int64_t b, int64_t h, float dot, int i, int j, int q_len, int k_len,
                                          bool check, float& cap, int64_t mask_row, bool read_mask = true) {
  if (kPlain) {
    if (check) {
      const int d = j - i;
      if (j >= k_len || d < band.lo || d > band.hi) return kNegInf;
    }
    return kScaled ? dot * p.scale : dot;
  } else {
    const float scaled = dot * p.scale;
    if (i >= q_len || (check && j >= k_len)) return kNegInf;  // a tile's rows past q_len read no mask
    if (kCap && p.softcap > 0.0f) {
      float t;
      soft_capped(scaled, p.softcap, t);
      cap = 1.0f - t * t;
    }
    return attention_score_in_row(p, seq, scaled, b, h, i, j, mask_row, check, read_mask);
  }
}

// Philox key and keep scale of a call's dropout.
struct Dropout {
  uint64_t seed, offset;
  float keep_scale;
  bool on;
};
__device__ __forceinline__ Dropout dropout_of(const AttentionParams& p) {
  Dropout d{};
  d.on = p.dropout_p > 0.0f;
  if (d.on) {
    resolve_philox_key(p.key, &d.seed, &d.offset);
    d.keep_scale = 1.0f / (1.0f - p.dropout_p);
  }
  return d;
}

// Dropout's uniforms of a lane's four elements of an n-tile, with fewer Philox calls than elements.
// [query][key] fragments (rows gid and gid + 8, columns 2 tig and 2 tig + 1): a lane's two neighbouring
// keys share a group of four words unless the first is its group's last, so one call serves both.
// [key][query] fragments (rows: keys gid and gid + 8, columns: queries 2 tig and 2 tig + 1): a lane's
// four elements lie in four groups, whose words for keys gid - gid % 4 .. gid - gid % 4 + 3 the four
// lanes with those keys need; where every row's stream starts at a whole group (row_length and col0
// multiples of 4, so that key j is word j % 4), each of those lanes computes one group and they swap
// the words with shuffles (the whole warp takes part).
__device__ __forceinline__ uint32_t philox_word(const Uint4x32& w, int k) {
  return k == 0 ? w.x : k == 1 ? w.y : k == 2 ? w.z : w.w;
}

// index: the stream index of a row's element in column 2 tig; u[0 .. 1]: that and the next.
__device__ __forceinline__ void dropout_uniform_pair(const Dropout& drop, uint64_t index, float* u) {
  const Uint4x32 w = philox_group_bits(drop.seed, drop.offset, index / 4);
  const int k = static_cast<int>(index % 4);
  u[0] = uniform_open_zero(philox_word(w, k));
  u[1] = uniform_open_zero(k < 3 ? philox_word(w, k + 1) : philox_group_bits(drop.seed, drop.offset, index / 4 + 1).x);
}

// col_index[c]: the stream index of query column c's key gid - gid % 4 (a multiple of 4). Element e
// (query e % 2, key half e / 2) needs word gid % 4 of its group. Of the four lanes that share tig and
// gid / 4, the one with gid % 4 = r computes element r's group and hands lane r ^ x its word in
// shuffle round x.
__device__ __forceinline__ void dropout_uniforms_by_columns(const Dropout& drop, const uint64_t (&col_index)[2],
                                                            float (&u)[4]) {
  const int r = (threadIdx.x / 4) & 3;
  const Uint4x32 w = philox_group_bits(drop.seed, drop.offset, col_index[r & 1] / 4 + 2 * (r >> 1));
  uint32_t bits[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) bits[e] = philox_word(w, r);  // right for e == r, replaced below otherwise
#pragma unroll
  for (int x = 1; x < 4; ++x) {
    const uint32_t got = __shfl_xor_sync(0xffffffffu, philox_word(w, r ^ x), 4 * x);
#pragma unroll
    for (int e = 0; e < 4; ++e) bits[e] = e == (r ^ x) ? got : bits[e];
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) u[e] = uniform_open_zero(bits[e]);
}

// Whether dropout keeps a lane's four elements of an n-tile, [query][key] (kRowsOfQueries: queries
// `rows` of heads row_h, keys j0 + 2 tig + e % 2) or [key][query] (keys `rows`, queries j0 + 2 tig + e % 2
// of head row_h[0]); j0 is the tile's first column. Elements past q_len or k_len are not kept.
template <bool kRowsOfQueries>
__device__ __forceinline__ void dropout_keeps(const AttentionParams& p, const AttentionSequence& seq,
                                              const Dropout& drop, const int64_t (&row_h)[2], const int (&rows)[2],
                                              int j0, bool (&keep)[4]) {
  const int tig = threadIdx.x % 4, q_len = static_cast<int>(seq.q_len), k_len = static_cast<int>(seq.k_len);
  int query[4], key[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    query[e] = kRowsOfQueries ? rows[e / 2] : j0 + 2 * tig + (e & 1);
    key[e] = kRowsOfQueries ? j0 + 2 * tig + (e & 1) : rows[e / 2];
  }
  const auto index = [&](int e) {
    return static_cast<uint64_t>(seq.lse_row(row_h[kRowsOfQueries ? e / 2 : 0], query[e]) * seq.row_length + seq.col0 +
                                 key[e]);
  };
  float u[4];
  if (kRowsOfQueries) {
    dropout_uniform_pair(drop, index(0), u);
    dropout_uniform_pair(drop, index(2), u + 2);
  } else if (seq.row_length % 4 == 0 && seq.col0 % 4 == 0) {
    const int first = ((threadIdx.x % 32) / 4) & 3;  // rows[0] - first: its group's first key
    const uint64_t col_index[2] = {index(0) - first, index(1) - first};
    dropout_uniforms_by_columns(drop, col_index, u);
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) u[e] = philox_uniform(drop.seed, drop.offset, index(e));
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) keep[e] = query[e] < q_len && key[e] < k_len && u[e] >= p.dropout_p;
}

// A lane's view of a bool mask's block staged in shared memory (BoolMaskTiles, [query][key]): `at`
// the byte of its first element, a query row `stride` bytes on. Not `on`: the mask, if any, is read
// from global memory.
struct StagedMask {
  bool on = false;
  const uint8_t* at = nullptr;
  int stride = 0;
};

// The backward's element (query i, key j) from the raw dot products q.k and dO.v: P = exp(s - lse)
// (0 in a row that saw no key), the forward's dropout replayed (keep), and dS = P (dP kept - delta), times
// the soft-cap's slope (the gradient of scale q.k) and without it (that of the final score). With
// `staged` the caller has read the mask (shown: its byte is not 0).
struct BackwardElement {
  float dropped, ds, ds_score;
};
template <bool kPlain>
__device__ __forceinline__ BackwardElement backward_element(const AttentionParams& p, const AttentionSequence& seq,
                                                            const Band& band, int64_t b, int64_t h, float dot,
                                                            float dp, int i, int j, int q_len, int k_len, bool check,
                                                            float lse, float delta, const Dropout& drop,
                                                            bool keep, bool staged = false, bool shown = true) {
  float cap = 1.0f;
  // Plain: s unscaled, P = 2^(dot scale log2(e) - lse log2(e)), an FFMA where (s - lse) log2(e) took two.
  // The general kernels test every element here (skipping the tests on inside blocks spilled the
  // Hopper kv kernels' registers).
  float s = score_at<kPlain, true, !kPlain>(p, seq, band, b, h, dot, i, j, q_len, k_len, kPlain ? check : true, cap,
                                             kPlain || staged ? 0 : attention_mask_row(p, b, h, i), !staged);
  if (!kPlain && staged && !shown) s = kNegInf;
  const float prob = lse == kNegInf ? 0.0f
                     : kPlain       ? exp2_ftz(fmaf(s, p.scale * kLog2e, -lse * kLog2e))
                                    : exp2_ftz((s - lse) * kLog2e);
  float up = dp, dropped = prob;
  if (!kPlain && drop.on) {
    up = keep ? up * drop.keep_scale : 0.0f;
    dropped = keep ? prob * drop.keep_scale : 0.0f;
  }
  const float ds = prob * (up - delta);
  return BackwardElement{dropped, kPlain ? ds : ds * cap, ds};
}

// What CTA blockIdx.x of a backward kernel over key blocks works on: keys [j0, j0 + cols) of kv
// head hk of batch b, against each query head of the group and each block of kBlockM queries that
// the band lets see them (steps = group x q_steps). `inside` is false past a packed sequence's end.
template <int kBlockN, int kBlockM>
struct KeyBlockWork {
  int64_t b, hk, group;
  AttentionSequence seq;
  Band band;
  int q_len, k_len, j0, cols, first_q, q_steps, steps;
  bool inside;
  __device__ __forceinline__ KeyBlockWork(const AttentionParams& p, int k_blocks) {
    const int64_t bhk = blockIdx.x / k_blocks;
    j0 = static_cast<int>(blockIdx.x % k_blocks) * kBlockN;
    b = bhk / p.kv_heads;
    hk = bhk % p.kv_heads;
    group = p.heads / p.kv_heads;
    seq = attention_sequence(p, b);
    q_len = static_cast<int>(seq.q_len);
    k_len = static_cast<int>(seq.k_len);
    inside = j0 < k_len;
    cols = inside ? min(kBlockN, k_len - j0) : 0;
    band = sequence_band(seq);
    // The queries [first_q, end_q) that can see keys [j0, j0 + cols).
    const int64_t first = static_cast<int64_t>(j0) - band.hi;
    first_q = static_cast<int>(first > 0 ? first : 0);
    const int64_t end64 = static_cast<int64_t>(j0) + cols - band.lo;
    const int end_q = static_cast<int>(end64 < q_len ? end64 : q_len);
    q_steps = end_q > first_q ? (end_q - first_q + kBlockM - 1) / kBlockM : 0;
    steps = static_cast<int>(group) * q_steps;
  }
  __device__ __forceinline__ int64_t head(int step) const { return hk * group + step / q_steps; }
  __device__ __forceinline__ int i0(int step) const { return first_q + (step % q_steps) * kBlockM; }
  // head(step) and i0(step) walked one step at a time: an add and a test where the division by
  // q_steps took some twenty instructions a call.
  struct Step {
    int64_t h;
    int i0;
  };
  __device__ __forceinline__ Step first_step() const { return Step{hk * group, first_q}; }
  __device__ __forceinline__ Step next(const Step& s) const {
    const bool wrap = s.i0 + kBlockM >= first_q + q_steps * kBlockM;
    return Step{s.h + (wrap ? 1 : 0), wrap ? first_q : s.i0 + kBlockM};
  }
};

// lse and delta of queries i0 .. i0 + kRows - 1 of head h into shared memory, kBlockThreads threads
// sharing the work (this one is `thread` of them); rows past `valid` get -inf (so P = 0) and 0.
template <int kRows, int kBlockThreads>
__device__ __forceinline__ void stage_row_stats(const AttentionParams& p, const float* delta,
                                                const AttentionSequence& seq, int64_t h, int i0, int valid,
                                                float* s_lse, float* s_delta, int thread) {
  for (int r = thread; r < kRows; r += kBlockThreads) {
    const bool inside = r < valid;
    const int64_t row = seq.lse_row(h, i0 + r);
    s_lse[r] = inside ? p.lse[row] : kNegInf;
    s_delta[r] = inside ? delta[row] : 0.0f;
  }
}

// The key-block kernels' elements (key j of rows key_j, query i0 + column): acc_s (raw q.k) becomes
// P after dropout, acc_dp (raw dO.v) dS times the soft-cap's slope; lse and delta by column. A staged
// mask's `at`: the byte of query i0 and key key_j[0].
template <bool kPlain, int kTiles>
__device__ __forceinline__ void key_block_elements(const AttentionParams& p, const AttentionSequence& seq,
                                                   const Band& band, int64_t b, int64_t h, float (&acc_s)[kTiles][4],
                                                   float (&acc_dp)[kTiles][4], int i0, const int (&key_j)[2],
                                                   bool check, const float* lse, const float* delta,
                                                   const Dropout& drop, const StagedMask& staged = StagedMask{}) {
  const int tig = threadIdx.x % 4, q_len = static_cast<int>(seq.q_len), k_len = static_cast<int>(seq.k_len);
  const int64_t heads[2] = {h, h};
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
    bool keep[4] = {};
    if (!kPlain && drop.on) dropout_keeps<false>(p, seq, drop, heads, key_j, i0 + t * 8, keep);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int c = t * 8 + 2 * tig + (e & 1);
      const bool staged_shown = !kPlain && staged.on && staged.at[c * staged.stride + 8 * (e / 2)] != 0;
      const BackwardElement el = backward_element<kPlain>(p, seq, band, b, h, acc_s[t][e], acc_dp[t][e], i0 + c,
                                                          key_j[e / 2], q_len, k_len, check, lse[c], delta[c], drop,
                                                          keep[e], !kPlain && staged.on, staged_shown);
      acc_s[t][e] = el.dropped;
      acc_dp[t][e] = el.ds;
    }
  }
}

// The query-block kernels' elements (query row_i, key j0 + column): acc_s (raw q.k) becomes dS times
// the soft-cap's slope, and dS goes to grad_s (rows lse_row - grad_s_row0, row_length apart) when it
// is given. A staged mask's `at`: the byte of query row_i[0] and key j0.
template <bool kPlain, int kTiles>
__device__ __forceinline__ void query_block_elements(const AttentionParams& p, const AttentionSequence& seq,
                                                     const Band& band, int64_t b, int64_t h,
                                                     float (&acc_s)[kTiles][4], const float (&acc_dp)[kTiles][4],
                                                     const int (&row_i)[2], int j0, bool check,
                                                     const float (&row_lse)[2], const float (&row_delta)[2],
                                                     const Dropout& drop, float* grad_s, int64_t grad_s_row0,
                                                     const StagedMask& staged = StagedMask{}) {
  const int tig = threadIdx.x % 4, q_len = static_cast<int>(seq.q_len), k_len = static_cast<int>(seq.k_len);
  const int64_t heads[2] = {h, h};
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
    bool keep[4] = {};
    if (!kPlain && drop.on) dropout_keeps<true>(p, seq, drop, heads, row_i, j0 + t * 8, keep);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = row_i[e / 2], j = j0 + t * 8 + 2 * tig + (e & 1);
      const bool staged_shown =
          !kPlain && staged.on && staged.at[8 * (e / 2) * staged.stride + t * 8 + 2 * tig + (e & 1)] != 0;
      const BackwardElement el = backward_element<kPlain>(p, seq, band, b, h, acc_s[t][e], acc_dp[t][e], i, j, q_len,
                                                          k_len, check, row_lse[e / 2], row_delta[e / 2], drop,
                                                          keep[e], !kPlain && staged.on, staged_shown);
      if (grad_s != nullptr && i < q_len && j < k_len) {
        grad_s[(seq.lse_row(h, i) - grad_s_row0) * seq.row_length + j] = el.ds_score;
      }
      acc_s[t][e] = el.ds;
    }
  }
}

// grad_q = dq_accum (float32, scaled already) in T: kCastPerThread elements per thread, coalesced.
constexpr int kCastPerThread = 8;
template <typename T>
__global__ void __launch_bounds__(kThreads) attention_dq_cast_kernel(const float* dq_accum, T* grad_q, int64_t n) {
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads * kCastPerThread + threadIdx.x;
#pragma unroll
  for (int e = 0; e < kCastPerThread; ++e) {
    const int64_t at = first + e * kThreads;
    if (at < n) grad_q[at] = from_f32<T>(dq_accum[at]);
  }
}

// grad_q from grads.dq_accum, where the kernel over key blocks added dQ.
template <typename T>
cudaError_t launch_dq_cast(const AttentionCudaParams<T>& params, const AttentionCudaGrads<T>& grads,
                           cudaStream_t stream) {
  const AttentionParams& p = params.base;
  const int64_t n = (p.cu_seqlens_q != nullptr ? p.total_q : p.batch * p.q_len) * p.heads * p.dim;
  constexpr int64_t kPerCta = kThreads * kCastPerThread;
  return launch_tiles(attention_dq_cast_kernel<T>, (n + kPerCta - 1) / kPerCta, kThreads, 0, stream,
                      static_cast<const float*>(grads.dq_accum), grads.grad_q, n);
}

// Whether grads.grad_s is dS summed over a dim (its shape is not (B, H, Lq, Lk)).
template <typename T>
bool summed_score_grads(const AttentionParams& p, const AttentionCudaGrads<T>& grads) {
  return grads.grad_s != nullptr &&
         (grads.grad_s_batches != p.batch || grads.grad_s_heads != p.heads || grads.grad_s_rows != p.q_len);
}

// Whether grads.grad_s (when given) has a shape the launchers take: dense inputs; each dim the whole
// one or 1; for summed dS with something to sum, a chunk buffer.
template <typename T>
bool score_grads_ok(const AttentionParams& p, const AttentionCudaGrads<T>& grads) {
  if (grads.grad_s == nullptr) return true;
  const auto whole_or_1 = [](int64_t size, int64_t whole) { return size == whole || size == 1; };
  const bool empty = p.batch * p.heads * p.q_len * p.k_len == 0;
  return p.cu_seqlens_q == nullptr && whole_or_1(grads.grad_s_batches, p.batch) &&
         whole_or_1(grads.grad_s_heads, p.heads) && whole_or_1(grads.grad_s_rows, p.q_len) &&
         (!summed_score_grads(p, grads) || empty || (grads.ds_chunk != nullptr && grads.ds_chunk_batches >= 1));
}

// What attention_ds_sum_kernel adds: ds_chunk's dS of batches first_batch .. + batches - 1 of (heads,
// q_len, k_len) into grad_s of (out_batches, out_heads, out_rows, k_len), each the whole dim or 1.
struct ScoreGradChunk {
  float* ds_chunk;
  float* grad_s;
  int64_t first_batch, batches, heads, q_len, k_len, out_batches, out_heads, out_rows;
};

// grad_s += ds_chunk summed over grad_s's dims of 1, and ds_chunk zeroed again for the next chunk. A
// CTA takes kDsSumThreads / kSplit consecutive elements of grad_s (consecutive keys: coalesced); each
// of kSplit groups of its threads adds every kSplit-th of an element's terms, and the first group
// adds the groups' sums in order: additions in a fixed order (deterministic).
constexpr int kDsSumThreads = 256;
namespace {  // (a kernel per translation unit, whose smem_raw is the unnamed namespace's, as the .cu files' are)
template <int kSplit>
__global__ void __launch_bounds__(kDsSumThreads) attention_ds_sum_kernel(ScoreGradChunk c, int64_t n) {
  constexpr int kOutputs = kDsSumThreads / kSplit;
  const int lane = threadIdx.x % kOutputs, group = threadIdx.x / kOutputs;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kOutputs + lane;
  const bool each_b = c.out_batches > 1, each_h = c.out_heads > 1, each_i = c.out_rows > 1;
  const int64_t heads = each_h ? 1 : c.heads, rows = each_i ? 1 : c.q_len;  // summed over, per term
  const int64_t terms = (each_b ? 1 : c.batches) * heads * rows;
  const int64_t j = e % c.k_len, row = e / c.k_len;
  const int64_t out_i = row % c.out_rows, out_h = (row / c.out_rows) % c.out_heads;
  const int64_t out_b = row / c.out_rows / c.out_heads;  // of the chunk, unless grad_s sums batches
  float sum = 0.0f;
  for (int64_t t = group; e < n && t < terms; t += kSplit) {
    const int64_t b = each_b ? out_b : t / (heads * rows), h = each_h ? out_h : (t / rows) % heads;
    const int64_t i = each_i ? out_i : t % rows;
    float& ds = c.ds_chunk[((b * c.heads + h) * c.q_len + i) * c.k_len + j];
    sum += ds;
    ds = 0.0f;
  }
  if constexpr (kSplit > 1) {
    extern __shared__ uint4 smem_raw[];
    float* partial = reinterpret_cast<float*>(smem_raw);
    partial[threadIdx.x] = sum;
    __syncthreads();
    if (group != 0) return;
    for (int g = 1; g < kSplit; ++g) sum += partial[g * kOutputs + lane];
  }
  const int64_t b_out = each_b ? c.first_batch + out_b : 0;
  if (e < n) c.grad_s[((b_out * c.out_heads + out_h) * c.out_rows + out_i) * c.k_len + j] += sum;
}
}  // namespace

// attention_ds_sum_kernel for a chunk: 8 groups of threads per element where it has many terms (a
// bias over keys only sums heads x queries of them), else one thread per element.
inline cudaError_t launch_ds_sum(const ScoreGradChunk& c, cudaStream_t stream) {
  const int64_t n = (c.out_batches > 1 ? c.batches : 1) * c.out_heads * c.out_rows * c.k_len;
  const int64_t terms = (c.out_batches > 1 ? 1 : c.batches) * (c.out_heads > 1 ? 1 : c.heads) *
                        (c.out_rows > 1 ? 1 : c.q_len);
  if (terms < 64) {
    return launch_tiles(attention_ds_sum_kernel<1>, (n + kDsSumThreads - 1) / kDsSumThreads, kDsSumThreads, 0, stream,
                        c, n);
  }
  constexpr int kOutputs = kDsSumThreads / 8;
  return launch_tiles(attention_ds_sum_kernel<8>, (n + kOutputs - 1) / kOutputs, kDsSumThreads,
                      kDsSumThreads * static_cast<int>(sizeof(float)), stream, c, n);
}

// The backward's second launch, after its kernel over key blocks: q_kernel (of `threads` threads)
// over tiles of QTile::kBlockM queries, or, when grads.dq_accum is given (the first kernel then
// added dQ there), the cast of dQ to grad_q. Summed dS: the tiles of ds_chunk_batches batches at a
// time (tiles go over batches slowest), each launch followed by attention_ds_sum_kernel.
template <typename QTile, typename QKernel, typename T>
cudaError_t launch_query_pass(QKernel q_kernel, int threads, const AttentionCudaParams<T>& params,
                              const AttentionCudaGrads<T>& grads, unsigned vector, cudaStream_t stream) {
  const AttentionParams& p = params.base;
  QueryLayout layout = query_layout(p, QTile::kBlockM, 1, 1);
  if (grads.dq_accum != nullptr) return launch_dq_cast(params, grads, stream);
  const int64_t tiles = query_layout_ctas(p, layout);
  if (!summed_score_grads(p, grads) || tiles == 0 || p.k_len == 0) {  // (nothing to sum)
    return launch_tiles(q_kernel, tiles, threads, QTile::kSmemBytes, stream, params, grads, layout, vector);
  }
  const int64_t tiles_per_batch = tiles / p.batch;
  AttentionCudaGrads<T> chunk = grads;
  chunk.grad_s = grads.ds_chunk;
  for (int64_t b0 = 0; b0 < p.batch; b0 += grads.ds_chunk_batches) {
    const int64_t batches = grads.ds_chunk_batches < p.batch - b0 ? grads.ds_chunk_batches : p.batch - b0;
    layout.first_tile = b0 * tiles_per_batch;
    chunk.grad_s_row0 = b0 * p.heads * p.q_len;
    cudaError_t status = launch_tiles(q_kernel, batches * tiles_per_batch, threads, QTile::kSmemBytes, stream, params,
                                      chunk, layout, vector);
    if (status != cudaSuccess) return status;
    status = launch_ds_sum(ScoreGradChunk{grads.ds_chunk, grads.grad_s, b0, batches, p.heads, p.q_len, p.k_len,
                                          grads.grad_s_batches, grads.grad_s_heads, grads.grad_s_rows},
                           stream);
    if (status != cudaSuccess) return status;
  }
  return cudaSuccess;
}

// The backward's launches, each a kernel of `threads` threads: kv_kernel over blocks of
// KvTile::kBlockN keys of each kv head, then launch_query_pass.
template <typename KvTile, typename QTile, typename KvKernel, typename QKernel, typename T>
cudaError_t launch_backward_kernels(KvKernel kv_kernel, QKernel q_kernel, int threads,
                                    const AttentionCudaParams<T>& params, const AttentionCudaGrads<T>& grads,
                                    unsigned vector, cudaStream_t stream) {
  const AttentionParams& p = params.base;
  const int64_t k_blocks = (p.k_len + KvTile::kBlockN - 1) / KvTile::kBlockN;
  const cudaError_t status = launch_tiles(kv_kernel, k_blocks * p.batch * p.kv_heads, threads, KvTile::kSmemBytes,
                                          stream, params, grads, static_cast<int>(k_blocks), vector);
  if (status != cudaSuccess) return status;
  return launch_query_pass<QTile>(q_kernel, threads, params, grads, vector, stream);
}

// The lse and delta of a lane's two query rows (row_i; past q_len: -inf, so P = 0, and 0).
__device__ __forceinline__ void query_row_stats(const AttentionParams& p, const float* delta,
                                                const AttentionSequence& seq, int64_t h, const int (&row_i)[2],
                                                int q_len, float (&row_lse)[2], float (&row_delta)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const bool inside = row_i[r] < q_len;
    const int64_t row = seq.lse_row(h, inside ? row_i[r] : 0);
    row_lse[r] = inside ? p.lse[row] : kNegInf;
    row_delta[r] = inside ? delta[row] : 0.0f;
  }
}

// fn(row, c, lo, hi) for a lane's two query rows (row_i; rows past q_len skipped) and each n-tile's
// columns c = col0 + 2 tig and c + 1 (c < dim): row = out_row(h, i) * dim, lo and hi scale acc_dq.
template <int kTiles, typename Fn>
__device__ __forceinline__ void for_query_grad_pairs(const AttentionParams& p, const AttentionSequence& seq, int64_t h,
                                                     const int (&row_i)[2], int q_len, int col0,
                                                     const float (&acc_dq)[kTiles][4], const Fn& fn) {
  const int dim = static_cast<int>(p.dim), tig = threadIdx.x % 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = row_i[r];
    if (i >= q_len) continue;
    const int64_t row = seq.out_row(h, i) * p.dim;
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      const int c = col0 + t * 8 + 2 * tig;
      if (c < dim) fn(row, c, acc_dq[t][2 * r] * p.scale, acc_dq[t][2 * r + 1] * p.scale);
    }
  }
}

// grad_q = scale acc_dq for a lane's two query rows (columns col0 + 2 tig .. of each n-tile).
template <typename T, int kTiles>
__device__ __forceinline__ void store_query_grads(const AttentionParams& p, T* grad_q, const AttentionSequence& seq,
                                                  int64_t h, const int (&row_i)[2], int q_len, int col0,
                                                  const float (&acc_dq)[kTiles][4]) {
  const int dim = static_cast<int>(p.dim);
  const bool pair_ok = (dim % 2) == 0;
  for_query_grad_pairs(p, seq, h, row_i, q_len, col0, acc_dq, [&](int64_t row, int c, float lo, float hi) {
    store_pair<T>(grad_q + row, c, lo, hi, c + 1 < dim, pair_ok);
  });
}

// dq_accum += scale acc_dq, atomically, for a lane's two query rows (columns col0 + 2 tig .. of each
// n-tile); pairs of columns at once when dim is even (dq_accum 8-byte aligned). kWholeFastPath: when
// every pair is inside, no test (a branch) per pair; it costs the Hopper kernels 172 bytes of spills.
template <bool kWholeFastPath, int kTiles>
__device__ __forceinline__ void add_query_grads(const AttentionParams& p, float* dq_accum, const AttentionSequence& seq,
                                                int64_t h, const int (&row_i)[2], int q_len, int col0,
                                                const float (&acc_dq)[kTiles][4]) {
  const int dim = static_cast<int>(p.dim);
  const bool pair_ok = (dim % 2) == 0;
  if (kWholeFastPath && GENFAST_FAST_PATH(pair_ok && col0 + kTiles * 8 <= dim)) {
    const int tig = threadIdx.x % 4;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (row_i[r] >= q_len) continue;
      // One address a row, the n-tiles at immediate offsets from it (through for_query_grad_pairs'
      // (row, c) nvcc formed a 64-bit row * dim + c for each pair).
      float* at = dq_accum + seq.out_row(h, row_i[r]) * p.dim + col0 + 2 * tig;
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        atomic_add_f32x2(at + t * 8, acc_dq[t][2 * r] * p.scale, acc_dq[t][2 * r + 1] * p.scale);
      }
    }
    return;
  }
  for_query_grad_pairs(p, seq, h, row_i, q_len, col0, acc_dq, [&](int64_t row, int c, float lo, float hi) {
    if (c + 1 < dim && pair_ok) {
      atomic_add_f32x2(dq_accum + row + c, lo, hi);
    } else {
      atomic_add_f32(dq_accum + row + c, lo);
      if (c + 1 < dim) atomic_add_f32(dq_accum + row + c + 1, hi);
    }
  });
}

// dK = scale acc_dk and dV = acc_dv for a lane's two keys (key_j), columns col0 + 2 tig .. of each
// n-tile; keys past the sequence's skipped.
template <typename T, int kTiles>
__device__ __forceinline__ void store_key_grads(const AttentionParams& p, T* grad_k, T* grad_v,
                                                const AttentionSequence& seq, int64_t hk, const int (&key_j)[2],
                                                int col0, const float (&acc_dk)[kTiles][4],
                                                const float (&acc_dv)[kTiles][4]) {
  const int dim = static_cast<int>(p.dim), v_dim = static_cast<int>(p.v_dim), tig = threadIdx.x % 4;
  const bool dk_pair = (dim % 2) == 0, dv_pair = (v_dim % 2) == 0;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = key_j[r];
    if (j >= seq.k_len) continue;
    const int64_t key = seq.key_out_row(hk, j);
    T* dk_row = grad_k + key * p.dim;
    T* dv_row = grad_v + key * p.v_dim;
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      const int c = col0 + t * 8 + 2 * tig;
      if (c < dim) {
        store_pair<T>(dk_row, c, acc_dk[t][2 * r] * p.scale, acc_dk[t][2 * r + 1] * p.scale, c + 1 < dim, dk_pair);
      }
      if (c < v_dim) store_pair<T>(dv_row, c, acc_dv[t][2 * r], acc_dv[t][2 * r + 1], c + 1 < v_dim, dv_pair);
    }
  }
}

}  // namespace attention_cuda
}  // namespace genfast
