"""vLLM's merge of attention states (vllm.v1.attention.ops.merge_attn_states.merge_attn_states) on
genfast.merge_attention, for code written against it: change the import and nothing else,

    from vllm.v1.attention.ops.merge_attn_states import merge_attn_states
    from genfast.integrations.vllm import merge_attn_states

and it runs where vLLM's kernels do not (the CPU, genfast's Triton kernels with impl="triton", a
keyword vLLM's function does not have) and under torch.compile(fullgraph=True). The arguments,
layouts and semantics are vLLM's: outputs (num_tokens, num_heads, head_size), any strides with
contiguous features (a head-padded output included), read in place and written into `output` in
place; lse (num_heads, num_tokens), natural base, float32, where +inf (FlashAttention 2's lse of a
sequence without keys) counts as -inf (a pass over each lse turns it so); tokens from
prefill_tokens_with_context on have no prefix, and take the suffix's output and lse as they are;
output_scale quantizes the output to fp8 (float8_e4m3fn): out * (1 / output_scale), clamped to
fp8's range.

Where genfast differs, on purpose: a token whose prefix and suffix both have lse -inf gets output 0
and lse -inf (vLLM's Triton kernel gives NaN there). With output_scale, the merge is rounded to the
states' dtype before it is scaled (vLLM scales the float32 merge): a second rounding, below fp8's.
"""

import operator
from typing import Optional

import torch

from ..attention_merge import merge_attention

Tensor = torch.Tensor

__all__ = ["merge_attn_states"]


def _check(name, t, dims):
    if not isinstance(t, Tensor) or t.dim() != dims:
        raise ValueError(f"{name} must be a {dims}-d torch.Tensor, got "
                         f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")


def _count(prefill_tokens_with_context, tokens) -> int:
    """prefill_tokens_with_context as a count of tokens (any integer, numpy's included), checked."""
    try:  # (not a tensor: its value would be read on the host, a synchronisation)
        count = None if isinstance(prefill_tokens_with_context, (bool, Tensor)) else operator.index(
            prefill_tokens_with_context)
    except TypeError:
        count = None
    if count is None or count < 0:
        raise ValueError(f"prefill_tokens_with_context must be None or an int >= 0, got {prefill_tokens_with_context!r}")
    return min(count, tokens)


def _no_keys_as_minus_inf(lse: Tensor) -> Tensor:
    return torch.where(lse == float("inf"), float("-inf"), lse)


def _to_fp8(x: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    info = torch.finfo(dtype)
    return (x.float() * (1.0 / scale.float())).clamp(info.min, info.max).to(dtype)


def merge_attn_states(output: Tensor, prefix_output: Tensor, prefix_lse: Tensor, suffix_output: Tensor,
                      suffix_lse: Tensor, output_lse: Optional[Tensor] = None,
                      prefill_tokens_with_context: Optional[int] = None, output_scale: Optional[Tensor] = None, *,
                      impl: str = "auto") -> None:
    """Writes into output (num_tokens, num_heads, head_size) the attention over the prefix's and the
    suffix's keys of each token from each one's: prefix_output and suffix_output (num_tokens,
    num_heads, head_size), prefix_lse and suffix_lse (num_heads, num_tokens) their log-sum-exps;
    into output_lse (num_heads, num_tokens) the merged lse, when given."""
    for name, t, dims in (("output", output, 3), ("prefix_output", prefix_output, 3),
                          ("suffix_output", suffix_output, 3), ("prefix_lse", prefix_lse, 2),
                          ("suffix_lse", suffix_lse, 2)):
        _check(name, t, dims)
    if output_lse is not None:
        _check("output_lse", output_lse, 2)
    tokens, heads = output.shape[:2]
    if prefix_lse.shape != (heads, tokens) or suffix_lse.shape != (heads, tokens):
        raise ValueError(f"prefix_lse and suffix_lse must be (num_heads, num_tokens) = ({heads}, {tokens}), got "
                         f"{tuple(prefix_lse.shape)} and {tuple(suffix_lse.shape)}")
    with_prefix = tokens if prefill_tokens_with_context is None else _count(prefill_tokens_with_context, tokens)
    if output_scale is not None and output.dtype != torch.float8_e4m3fn:
        raise ValueError(f"output_scale quantizes to fp8: output must be torch.float8_e4m3fn, got {output.dtype}")
    states = [prefix_output[:with_prefix], suffix_output[:with_prefix]]
    logs = [_no_keys_as_minus_inf(t[:, :with_prefix]).T for t in (prefix_lse, suffix_lse)]
    merged_lse = None if output_lse is None else output_lse[:, :with_prefix].T
    def as_output(x):
        return x if output_scale is None else _to_fp8(x, output_scale, output.dtype)

    if output_scale is None and output.dtype == prefix_output.dtype:  # written where it lies
        merge_attention(states, logs, out=(output[:with_prefix], merged_lse), impl=impl)
    else:
        merged, lse = merge_attention(states, logs, impl=impl)
        if merged_lse is not None:
            merged_lse.copy_(lse)
        output[:with_prefix].copy_(as_output(merged))
    output[with_prefix:].copy_(as_output(suffix_output[with_prefix:]))
    if output_lse is not None:
        output_lse[:, with_prefix:].copy_(suffix_lse[:, with_prefix:])
