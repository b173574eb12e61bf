"""Per-sample sums of squares of the Philox noise in Triton (see kernels/common/noise_norms.h)."""

import triton
import triton.language as tl

from .common import default_block_groups, philox_key_words
from .common import group_variants as gpu_variants  # noqa: F401 (for triton_gpu_compile)
from .philox import philox_normal4

CHUNK = 1 << 14  # elements per chunk, as on the other backends


@triton.jit
def noise_norms_kernel(partial_ptr, seed_lo, seed_hi, base_lo, base_hi, row_size, chunk_size, num_chunks,
                       BLOCK_GROUPS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # rows on axis 0: the other axes stop at 65535
    chunk = tl.program_id(1).to(tl.int64)
    row_begin = row * row_size
    begin = row_begin + chunk * chunk_size
    end = tl.minimum(begin + chunk_size, row_begin + row_size)
    acc = tl.zeros([BLOCK_GROUPS, 4], dtype=tl.float32)
    for start in range((begin // 4) * 4, end, BLOCK_GROUPS * 4):
        group = start // 4 + tl.arange(0, BLOCK_GROUPS).to(tl.int64)
        idx = group[:, None] * 4 + tl.arange(0, 4)[None, :].to(tl.int64)
        z = philox_normal4(seed_lo.to(tl.uint32), seed_hi.to(tl.uint32), base_lo.to(tl.uint32),
                           base_hi.to(tl.uint32), group)
        acc += tl.where((idx >= begin) & (idx < end), z * z, 0.0)
    tl.store(partial_ptr + row * num_chunks + chunk, tl.sum(acc))


def launch_noise_norms(partial, row_size, seed, offset, wrap=None):
    """Writes partial[r, c], the sum of z^2 over chunk c of sample r, for a (rows, chunks) float32 tensor."""
    rows, num_chunks = partial.shape
    if rows == 0 or row_size == 0:
        return
    block_groups = default_block_groups(partial.device)
    kernel = noise_norms_kernel if wrap is None else wrap(noise_norms_kernel)
    kernel[(rows, num_chunks)](partial, *philox_key_words(seed, offset), row_size, CHUNK, num_chunks,
                               BLOCK_GROUPS=block_groups)
