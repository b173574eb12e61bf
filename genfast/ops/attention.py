"""torch.ops.genfast.attention_forward (native, from _C): its fake. The backward comes next."""

import torch

from .. import _backend


def _fake(q, k, v, attn_mask, alibi_slopes, scale, softcap, band_lo, band_hi, dropout_p, generator, seed, offset):
    o = q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    return o, q.new_empty(q.shape[:3], dtype=torch.float32)


if _backend.native_module() is not None:
    torch.library.register_fake("genfast::attention_forward")(_fake)
