"""torch.ops.genfast.kvcache_append (native, from _C) and torch.ops.genfast.kvcache_append_triton:
a KV cache's new rows written in place, the keys and the queries turned by rotary tables; see
csrc/registration.cpp."""

from typing import Optional

import torch

from .. import _backend

Tensor = torch.Tensor


def _fake(k, v, cache_seqlens, cache_batch_idx, block_table, rotary_cos, rotary_sin, rotary_interleaved, q,
          queries_in_sequence, k_cache, v_cache, q_out):
    return None


if _backend.native_module() is not None:
    torch.library.register_fake("genfast::kvcache_append")(_fake)


@torch.library.custom_op("genfast::kvcache_append_triton", mutates_args=("k_cache", "v_cache", "q_out"))
def kvcache_append_triton(k: Tensor, v: Tensor, cache_seqlens: Tensor, cache_batch_idx: Optional[Tensor],
                          block_table: Optional[Tensor], rotary_cos: Optional[Tensor], rotary_sin: Optional[Tensor],
                          rotary_interleaved: bool, q: Optional[Tensor], queries_in_sequence: bool, k_cache: Tensor,
                          v_cache: Tensor, q_out: Optional[Tensor]) -> None:
    from ..kernels.kvcache_append import launch_kvcache_append

    contiguous = [None if t is None else t.contiguous()
                  for t in (k, v, cache_seqlens, cache_batch_idx, block_table, rotary_cos, rotary_sin, q)]
    q_dst = None if q_out is None or q_out.is_contiguous() else torch.empty_like(q_out)
    k, v, cache_seqlens, cache_batch_idx, block_table, rotary_cos, rotary_sin, q = contiguous
    launch_kvcache_append(k, v, k_cache, v_cache, cache_seqlens, cache_batch_idx, block_table, rotary_cos, rotary_sin,
                          rotary_interleaved, q, queries_in_sequence, q_out if q_dst is None else q_dst)
    if q_dst is not None:
        q_out.copy_(q_dst)


kvcache_append_triton.register_fake(_fake)


def run(impl, *args):
    if impl == "native":
        torch.ops.genfast.kvcache_append.default(*args)
    elif impl == "triton":
        torch.ops.genfast.kvcache_append_triton.default(*args)
    else:
        raise ValueError(f"kvcache_append has no operator for impl={impl!r}")
