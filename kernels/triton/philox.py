"""Philox-4x32-10 and Box-Muller in Triton: the same stream and the same polynomials as
kernels/common/philox.h and normal_math.h."""

import triton
import triton.language as tl

# A launch's Philox key and counter base as 32-bit words (common.philox_key_words). Each may be 1,
# which triton.jit would make a constant (no .to() then): kernels that take them keep them runtime values.
PHILOX_KEY_WORDS = ["seed_lo", "seed_hi", "base_lo", "base_hi"]


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def philox_words(group, seed_lo, seed_hi, base_lo, base_hi):
    """The four 32-bit words of call `group` (int64 tensor) of the (seed, offset) stream."""
    c0 = tl.zeros_like(group).to(tl.uint32) + base_lo
    c1 = tl.zeros_like(group).to(tl.uint32) + base_hi
    return philox4x32_10(c0, c1, (group & 0xFFFFFFFF).to(tl.uint32), (group >> 32).to(tl.uint32), seed_lo, seed_hi)


@triton.jit
def uniform_from_bits(bits):
    """A word's uniform in (0, 1): its top 24 bits and a half, over 2^24."""
    return ((bits >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-8


@triton.jit
def philox_uniform(index, seed_lo, seed_hi, base_lo, base_hi):
    """The uniform of element `index` (int64) of the (seed, offset) stream: genfast.reference.random."""
    word = index & 3
    r0, r1, r2, r3 = philox_words(index >> 2, seed_lo, seed_hi, base_lo, base_hi)
    return uniform_from_bits(tl.where(word == 0, r0, tl.where(word == 1, r1, tl.where(word == 2, r2, r3))))


@triton.jit
def log_positive(v):
    bits = v.to(tl.uint32, bitcast=True)
    exponent = ((bits >> 23).to(tl.int32) - 126).to(tl.float32)
    mantissa = ((bits & 0x007FFFFF) | 0x3F000000).to(tl.float32, bitcast=True)
    below = mantissa < 0.70710678118654752
    exponent = tl.where(below, exponent - 1.0, exponent)
    f = tl.where(below, mantissa + mantissa - 1.0, mantissa - 1.0)
    z = f * f
    p = 7.0376836292e-2
    p = p * f - 1.1514610310e-1
    p = p * f + 1.1676998740e-1
    p = p * f - 1.2420140846e-1
    p = p * f + 1.4249322787e-1
    p = p * f - 1.6668057665e-1
    p = p * f + 2.0000714765e-1
    p = p * f - 2.4999993993e-1
    p = p * f + 3.3333331174e-1
    y = p * f * z
    y += -2.12194440e-4 * exponent
    y += -0.5 * z
    return f + y + 0.693359375 * exponent


@triton.jit
def box_muller_radius(bits):
    return tl.sqrt(-2.0 * log_positive(uniform_from_bits(bits)))


@triton.jit
def cos_sin_turns(bits):
    k = (bits >> 8).to(tl.int32)
    quadrant = (k + (1 << 21)) >> 22
    remainder = k - (quadrant << 22)
    a = remainder.to(tl.float32) * 3.7450702829239744e-07
    z = a * a
    s = a + a * z * ((-1.9515295891e-4 * z + 8.3321608736e-3) * z - 1.6666654611e-1)
    c = 1.0 - 0.5 * z + z * z * ((2.443315711809948e-5 * z - 1.388731625493765e-3) * z + 4.166664568298827e-2)
    odd = (quadrant & 1) != 0
    sign = tl.where((quadrant & 2) != 0, -1.0, 1.0)
    return sign * tl.where(odd, -s, c), sign * tl.where(odd, c, s)


@triton.jit
def philox_normal4(seed_lo, seed_hi, base_lo, base_hi, group):
    """Four normals for each int64 group index in `group` (shape [G]); returns [G, 4]."""
    x, y, z, w = philox_words(group, seed_lo, seed_hi, base_lo, base_hi)
    r0 = box_muller_radius(x)
    r1 = box_muller_radius(z)
    cos0, sin0 = cos_sin_turns(y)
    cos1, sin1 = cos_sin_turns(w)
    # join(join(a, c), join(b, d)) flattens to a, b, c, d.
    first = tl.join(r0 * cos0, r1 * cos1)
    second = tl.join(r0 * sin0, r1 * sin1)
    return tl.reshape(tl.join(first, second), (group.shape[0], 4))
