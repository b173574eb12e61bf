"""Merging partial attentions, in plain PyTorch: what cascade inference (a shared prefix attended
once, then each request's own keys), split-KV decoding, chunked prefill over a cached prefix and
ring attention do with attentions of one query over disjoint sets of keys.

State s of a row is the attention of that row over its set of keys, given as its normalized output
o_s and the log-sum-exp of its scores lse_s, to base b: e for genfast.attention's and
FlashAttention's lse, 2 for FlashInfer's. Over all the keys:

    lse = log_b sum_s b^lse_s,   o = sum_s b^(lse_s - lse) o_s.

A state of lse -inf has no keys: it weighs nothing and its o_s is not read (attention kernels may
leave such rows unwritten). A row whose states all have lse -inf gets o = 0 and lse = -inf, as
genfast's attention gives a row without keys. A NaN lse makes the row NaN, and lse +inf too (its
weight is inf / inf).

Computed in float32 (float64 for float64 inputs); o rounded once to its dtype, lse float32 (float64).
"""

import math

import torch

Tensor = torch.Tensor


def attention_merge(o: Tensor, lse: Tensor, dim: int = 0, lse_base: float = math.e):
    """(o, lse) of the attention over all the states, o (..., head_dim) with the states along lse's
    dim `dim`, lse o's shape without its head dim, to base lse_base; returns o without the states'
    dim, in o's dtype, and lse without it."""
    compute = torch.float64 if o.dtype == torch.float64 else torch.float32
    dim = dim % lse.dim()
    ln_base = math.log(lse_base)  # b^x = e^(x ln b): the merge below is in natural base
    states = o.movedim(dim, 0).to(compute)
    logs = lse.movedim(dim, 0).to(compute) * ln_base
    most = logs.detach().amax(0) if logs.shape[0] else torch.full(logs.shape[1:], float("-inf"), dtype=compute,
                                                                       device=logs.device)
    seen = most != float("-inf")  # NaN is seen
    shift = torch.where(seen, most, 0.0)  # lse is shift + log sum exp(lse_s - shift) for any shift
    empty = logs == float("-inf")
    terms = torch.where(empty, 0.0, torch.exp(torch.where(empty, 0.0, logs - shift)))
    total = terms.sum(0)
    merged = torch.where(seen, shift + torch.log(torch.where(seen, total, 1.0)), float("-inf"))
    weights = torch.where(empty, 0.0, torch.exp(torch.where(empty, 0.0, logs - torch.where(seen, merged, 0.0))))
    out = torch.where(empty[..., None], 0.0, weights[..., None] * states).sum(0)
    return out.to(o.dtype), (merged / ln_base).to(torch.float64 if lse.dtype == torch.float64 else torch.float32)
