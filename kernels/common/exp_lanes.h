// exp_nonpositive (elementary_math.h) on sixteen lanes of an AVX-512 register, for the CPU kernels
// (x86 hosts only; nothing on the GPU includes it): the same reduction and polynomial, with
// vscalefps multiplying by 2^n where the scalar code builds the power's bits, clamps n and selects
// zeros and NaN. g++ vectorizes the scalar code into some 25 instructions per register; this takes
// 15, and the softmax's exponentials are a third of the CPU attention's forward once its products
// run on AMX tiles. Values as exp_nonpositive's where g++ contracts its multiply-adds as here.
#pragma once

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#include <immintrin.h>
#define GF_HAS_EXP_LANES 1

namespace genfast {
namespace {

#define GF_EXP_LANES_INLINE __attribute__((target("avx512f"))) inline __attribute__((always_inline))

// x = n ln 2 + r with |r| <= ln(2) / 2 (ln 2 in two parts), exp_reduced's steps; n to *n_out.
GF_EXP_LANES_INLINE __m512 reduce_by_ln2_lanes(__m512 x, __m512* n_out) {
  // floor(x log2 e + 1/2), in the masked form: g++ 12 warns of the unmasked one's undefined source
  const __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f));
  const __m512 n = _mm512_mask_roundscale_ps(t, static_cast<__mmask16>(0xFFFF), t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  *n_out = n;
  return _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
}

// e^r 2^n: 0 where n <= -127 (x < -87.68, -inf included; the scalar code's power 2^n is built as 0
// there), NaN where x is NaN (it flows through every step, quieted; the masked lanes' NaN from
// -inf - -inf is discarded).
GF_EXP_LANES_INLINE __m512 times_power_of_two_lanes(__m512 e_r, __m512 n) {
  const __mmask16 kept = _mm512_cmp_ps_mask(n, _mm512_set1_ps(-127.0f), _CMP_NLE_UQ);  // n > -127, or NaN
  return _mm512_maskz_scalef_ps(kept, e_r, n);
}

// e^x for x <= 0 lane by lane, exp_nonpositive's steps.
GF_EXP_LANES_INLINE __m512 exp_nonpositive_lanes(__m512 x) {
  __m512 n;
  const __m512 r = reduce_by_ln2_lanes(x, &n);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  return times_power_of_two_lanes(_mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f)), n);
}

// exp_nonpositive_lanes to a relative 2e-7 (a degree-5 polynomial in Horner's form, which g++'s
// exp_nonpositive evaluates to degree 7 in Cephes' form, for its last bit), for values rounded to
// bfloat16 (2^-9) next: 3 instructions fewer a register.
GF_EXP_LANES_INLINE __m512 exp_nonpositive_lanes_coarse(__m512 x) {
  __m512 n;
  const __m512 r = reduce_by_ln2_lanes(x, &n);
  __m512 p = _mm512_set1_ps(0.008290307596325874f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.04189794138073921f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.1666763573884964f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.4999915063381195f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.9999997019767761f));
  return times_power_of_two_lanes(_mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f)), n);
}

#undef GF_EXP_LANES_INLINE

}  // namespace
}  // namespace genfast
#else
#define GF_HAS_EXP_LANES 0
#endif
