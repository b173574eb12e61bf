"""FlashInfer's attention and its merges of attention states on genfast, for code written against
them: change the import and nothing else,

    import flashinfer
    import genfast.integrations.flashinfer as flashinfer

and it runs where FlashInfer does not (the CPU, genfast's Triton kernels with impl="...", a keyword
FlashInfer does not have, on every call and wrapper constructor).

Attention (flashinfer_single.py, flashinfer_batch.py): single_prefill_with_kv_cache (and
_return_lse), single_decode_with_kv_cache, BatchPrefillWithRaggedKVCacheWrapper,
BatchPrefillWithPagedKVCacheWrapper, BatchDecodeWithPagedKVCacheWrapper and
BatchAttentionWithAttentionSinkWrapper (plan, run, run_return_lse, begin_forward, end_forward) with
FlashInfer's arguments, layouts (NHD and HND; a paged cache as a tuple (k, v) or one tensor (pages,
2, ...)) and semantics: causal aligned bottom-right, window_left, logits_soft_cap, sm_scale, q/k/v
scales as numbers or tensors of one value or one a head (scale_q (num_qo_heads,), scale_k and
scale_v (num_kv_heads,), read on the device), custom masks (bool, or packed little-endian bits, each
request's from a byte of its own, as segment_packbits packs them), pos_encoding_mode ROPE_LLAMA
(rotate-half pairs, rope_theta and rope_scale, queries at i + kv_len - qo_len) and ALIBI
(FlashInfer's slopes and bias slope (j - i)), and lse to base 2.
Attention sinks (gpt-oss's; one natural-log logit a query head,
unscaled, in every row's softmax and lse) as the paged wrappers' run(sinks=), the AttentionSink
variant's jit_args on the ragged wrapper (run(q, k, v, sink, sm_scale)) and
BatchAttentionWithAttentionSinkWrapper take them; FlashInfer's FA2 and FA3 paged runs leave sinks=
out where its trtllm-gen kernels apply it: genfast applies it, and a request without keys gets o 0
and lse its sink (FlashInfer's FA2 variant may give -inf there). The AttentionSink variant's scores
are its run's sm_scale q.k alone: q_scale, k_scale, logits_soft_cap and pos_encoding_mode are
refused with it. The decode wrapper's q_len_per_req (given to plan(); run() takes it only when
equal, as FlashInfer did before) gives each request that many queries, causal among themselves, as
speculative decoding checks its drafts (window_right, FlashInfer's cute-dsl backend's, lets each see
that many keys past its own, -1 all). plan() reads the index arrays on the host, as FlashInfer's
does, and puts its tensors on the workspace buffer's device (else the index arrays'), without
waiting unless non_blocking=False; run() does not synchronise, and the single calls build their
tensors by device ops (no copy from the host, which a CUDA graph could not capture). Where genfast
differs, on purpose or not yet:
- a row with no keys gets o 0 and lse -inf (FlashInfer's gives a finite -5e4);
- custom masks, and ALiBi without causal over several queries, run one request at a time through
  genfast.attention (an additive mask holds ALiBi's bias there; a paged cache's pages gathered per
  request); use_cuda_graph refuses them;
- ROPE_LLAMA turns a copy of q and k (genfast.rotary) before the attention, where FlashInfer turns
  them as it loads them; of a paged cache, the requests' keys are gathered from their pages first
  (use_cuda_graph refuses it: turn keys as they are written, as vLLM and SGLang do);
- ALIBI with logits_soft_cap is refused (FlashInfer's versions order them differently);
- ROPE_LLAMA's tables are rounded to q's dtype (genfast.rotary's), v_scale scales the output
  rounded to q's dtype, and an o_dtype wider than q's widens that output;
- sinks with ALIBI are refused (genfast's ALiBi bias differs from FlashInfer's by a row constant,
  which the sink's weight does not share);
- use_cuda_graph=True on the paged wrappers (flashinfer_graph.py): plan() writes FlashInfer's
  buffers and the tensors the wrapper holds for a captured run; the first plan fixes the query
  counts and settings, and max_pages_per_request (genfast's keyword, needed where batch x the
  indices buffer's size passes 2^20) the block table's width and the key bound; the ragged
  wrapper refuses it;
- fp8 KV caches and fp8 q are widened exactly to q's dtype (bfloat16 on a GPU, float32 on the
  CPU for fp8 q), a paged cache's named pages alone: fp8 code runs, not at fp8's speed;
- a tensor q/k scale is folded into q (rounded once to its dtype, as the FlashAttention 3 drop-in's
  descales), a number into sm_scale; the wrappers' k_scale and v_scale are taken per kv head where
  they have one value a head (FlashInfer's single_prefill's scale_k and scale_v are), where FlashInfer
  multiplies sm_scale and the output by them whole;
- not taken: JIT variants other than AttentionSink
  (CUDA source; the decode wrapper takes none). The decode plan's block_tables and seq_lens
  (trtllm-gen's) are taken: each request's pages and key count in place of the page lists'.
  q_data_type, kv_data_type, the workspace buffers, FlashInfer's backend choices, fixed_split_size and
  disable_split_kv (genfast's forward splits keys its own way, without atomics, so that a run
  repeats bit for bit) are taken and left.

Merges (flashinfer.cascade: merge_state, merge_states, merge_state_in_place) run on
genfast.merge_attention, under torch.compile(fullgraph=True), and are differentiable in v and s
(FlashInfer's merges have no backward, which training with ring attention or split keys needs).
The arguments, layouts and semantics are FlashInfer's: v (seq_len, num_heads, head_dim), s
(seq_len, num_heads) the log-sum-exp to base 2, as FlashInfer's attention returns it (converted to
float32 as FlashInfer converts it); merge_states takes v (seq_len, num_states, num_heads, head_dim),
read in place.

Where genfast differs, on purpose: a state of s -inf (no keys) weighs nothing and is not read, and a
row whose states all have s -inf gets v 0 and s -inf (FlashInfer's gives NaN there); a NaN s makes
its row NaN. merge_state_in_place writes v and s in place (genfast.merge_attention's out); with a
mask, which CUDA graphs use, or gradients wanted, it merges into new tensors and copies them (the
rows the mask takes, read on the device, with no synchronisation).
"""

from typing import Optional, Tuple

import torch

from ..attention_merge import merge_attention
from .flashinfer_batch import (BatchAttentionWithAttentionSinkWrapper, BatchDecodeWithPagedKVCacheWrapper,
                               BatchPrefillWithPagedKVCacheWrapper, BatchPrefillWithRaggedKVCacheWrapper)
from .flashinfer_common import alibi_slopes as get_alibi_slopes
from .flashinfer_single import (single_decode_with_kv_cache, single_prefill_with_kv_cache,
                                single_prefill_with_kv_cache_return_lse)

Tensor = torch.Tensor

__all__ = ["BatchAttentionWithAttentionSinkWrapper", "BatchDecodeWithPagedKVCacheWrapper", "BatchPrefillWithPagedKVCacheWrapper",
           "BatchPrefillWithRaggedKVCacheWrapper", "get_alibi_slopes", "merge_state", "merge_state_in_place",
           "merge_states", "single_decode_with_kv_cache", "single_prefill_with_kv_cache",
           "single_prefill_with_kv_cache_return_lse"]


def _float32(name, s):
    if not isinstance(s, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(s).__name__}")
    return s.to(torch.float32)


def merge_state(v_a: Tensor, s_a: Tensor, v_b: Tensor, s_b: Tensor, *, impl: str = "auto") -> Tuple[Tensor, Tensor]:
    """The attention over the keys of segments A and B from each one's: v_a and v_b (seq_len,
    num_heads, head_dim), s_a and s_b (seq_len, num_heads) their base-2 log-sum-exps. Returns
    (v_merged in v_a's dtype, s_merged float32)."""
    return merge_attention([v_a, v_b], [_float32("s_a", s_a), _float32("s_b", s_b)], lse_base=2, impl=impl)


def merge_states(v: Tensor, s: Tensor, *, impl: str = "auto") -> Tuple[Tensor, Tensor]:
    """The attention over the keys of every segment: v (seq_len, num_states, num_heads, head_dim),
    s (seq_len, num_states, num_heads) base-2 log-sum-exps. Returns (v_merged (seq_len, num_heads,
    head_dim) in v's dtype, s_merged (seq_len, num_heads) float32); no states give v 0 and s -inf."""
    if not isinstance(v, Tensor) or v.dim() != 4:
        raise ValueError("v must be a (seq_len, num_states, num_heads, head_dim) tensor, got "
                         f"{tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}")
    return merge_attention(v, _float32("s", s), dim=1, lse_base=2, impl=impl)


def merge_state_in_place(v: Tensor, s: Tensor, v_other: Tensor, s_other: Tensor, mask: Optional[Tensor] = None, *,
                         impl: str = "auto") -> None:
    """(v, s) merged with (v_other, s_other) in place, merge_state's layouts; with mask (seq_len,
    bool), only the sequences where it is True."""
    if mask is not None and not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    grads = torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in (v, s, v_other, s_other))
    if mask is None and isinstance(s, Tensor) and s.dtype == torch.float32 and not grads:  # v and s: state 0's
        merge_attention([v, v_other], [s, _float32("s_other", s_other)], lse_base=2, out=(v, s), impl=impl)
        return
    # (with gradients wanted, the merge keeps its states for the backward: v and s as they were)
    v_merged, s_merged = merge_state(v.clone() if grads else v, s.clone() if grads else s, v_other, s_other,
                                     impl=impl)
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape != v.shape[:1] or mask.device != v.device:
            raise ValueError(f"mask must be a bool tensor ({v.shape[0]},) on {v.device}, got {mask.dtype} "
                             f"{tuple(mask.shape)} on {mask.device}")
        v_merged = torch.where(mask[:, None, None], v_merged, v)
        s_merged = torch.where(mask[:, None], s_merged, s)
    v.copy_(v_merged)
    s.copy_(s_merged)
