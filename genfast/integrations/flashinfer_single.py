"""FlashInfer's attention of one request (flashinfer.single_prefill_with_kv_cache,
single_prefill_with_kv_cache_return_lse, single_decode_with_kv_cache) on genfast's kernels:
genfast.integrations.flashinfer documents what is FlashInfer's and where genfast differs."""

import functools
from typing import Optional

import torch

from .._checks import check_choice
from .flashinfer_common import KV_LAYOUTS, Plan, dtype_value, nhd, run_plan, scale_value, unpack_masks

Tensor = torch.Tensor


def single_prefill_with_kv_cache(q: Tensor, k: Tensor, v: Tensor, scale_q=None, scale_k=None, scale_v=None,
                                 o_dtype: Optional[torch.dtype] = None, custom_mask: Optional[Tensor] = None,
                                 packed_custom_mask: Optional[Tensor] = None, causal: bool = False,
                                 kv_layout: str = "NHD", pos_encoding_mode: str = "NONE",
                                 use_fp16_qk_reduction: bool = False, sm_scale: Optional[float] = None,
                                 window_left: int = -1, logits_soft_cap: Optional[float] = None,
                                 rope_scale: Optional[float] = None, rope_theta: Optional[float] = None,
                                 backend: str = "auto", return_lse: bool = False, *, k_scale=None, v_scale=None,
                                 impl: str = "auto"):
    """Prefill or append attention of one request, as FlashInfer's: q (qo_len, num_qo_heads,
    head_dim), k and v (kv_len, num_kv_heads, head_dim) (NHD) or (num_kv_heads, kv_len, head_dim)
    (HND). Returns o (qo_len, num_qo_heads, head_dim_vo), or (o, lse) with return_lse, lse (qo_len,
    num_qo_heads) base 2, float32. `backend` and use_fp16_qk_reduction are FlashInfer's kernel
    choices, taken and left; impl picks genfast's backend."""
    check_choice("kv_layout", kv_layout, KV_LAYOUTS)
    k, v = nhd("k", k, kv_layout), nhd("v", v, kv_layout)
    if not isinstance(q, Tensor) or q.dim() != 3:
        raise ValueError("q must be a 3-d tensor (qo_len, num_qo_heads, head_dim), got "
                         f"{tuple(q.shape) if isinstance(q, Tensor) else type(q).__name__}")
    qo_len, kv_len = q.shape[0], k.shape[0]
    mask = None
    if packed_custom_mask is not None:
        mask = unpack_masks(packed_custom_mask, [(qo_len, kv_len)])[0]
    elif custom_mask is not None:
        if not isinstance(custom_mask, Tensor) or tuple(custom_mask.shape) != (qo_len, kv_len):
            raise ValueError(f"custom_mask must be a bool tensor (qo_len, kv_len) = ({qo_len}, {kv_len}), got "
                             f"{getattr(custom_mask, 'shape', type(custom_mask).__name__)}")
        mask = custom_mask.bool()
    plan = Plan([qo_len], [kv_len], q.shape[1], k.shape[1], causal=bool(causal), pos_encoding_mode=pos_encoding_mode,
                window_left=int(window_left), logits_soft_cap=logits_soft_cap, sm_scale=sm_scale,
                rope_scale=rope_scale, rope_theta=rope_theta, masks=None if mask is None else [mask],
                o_dtype=dtype_value("o_dtype", o_dtype)).check(q.shape[-1])
    heads, kv_heads = q.shape[1], k.shape[1]
    k_factor = scale_value("scale_k", scale_k, kv_heads, q.device) * scale_value("k_scale", k_scale, kv_heads, q.device)
    v_factor = scale_value("scale_v", scale_v, kv_heads, q.device) * scale_value("v_scale", v_scale, kv_heads, q.device)
    return run_plan(plan, q, k, v, impl=impl, return_lse=return_lse,
                    q_scale=scale_value("scale_q", scale_q, heads, q.device), k_scale=k_factor, v_scale=v_factor)


single_prefill_with_kv_cache_return_lse = functools.partial(single_prefill_with_kv_cache, return_lse=True)


def single_decode_with_kv_cache(q: Tensor, k: Tensor, v: Tensor, kv_layout: str = "NHD",
                                pos_encoding_mode: str = "NONE", use_tensor_cores: bool = False, q_scale=None,
                                k_scale=None, v_scale=None, window_left: int = -1,
                                logits_soft_cap: Optional[float] = None, sm_scale: Optional[float] = None,
                                rope_scale: Optional[float] = None, rope_theta: Optional[float] = None,
                                return_lse: bool = False, *, impl: str = "auto"):
    """One query of each head decoding over a request's keys, as FlashInfer's: q (num_qo_heads,
    head_dim), k and v as single_prefill_with_kv_cache's. Returns o (num_qo_heads, head_dim_vo), or
    (o, lse (num_qo_heads,) base 2) with return_lse. The query stands at position kv_len - 1 (its
    rotary angle; ALiBi's bias is slope j, FlashInfer's)."""
    check_choice("kv_layout", kv_layout, KV_LAYOUTS)
    k, v = nhd("k", k, kv_layout), nhd("v", v, kv_layout)
    if not isinstance(q, Tensor) or q.dim() != 2:
        raise ValueError("q must be a 2-d tensor (num_qo_heads, head_dim), got "
                         f"{tuple(q.shape) if isinstance(q, Tensor) else type(q).__name__}")
    plan = Plan([1], [k.shape[0]], q.shape[0], k.shape[1], causal=True, pos_encoding_mode=pos_encoding_mode,
                window_left=int(window_left), logits_soft_cap=logits_soft_cap, sm_scale=sm_scale,
                rope_scale=rope_scale, rope_theta=rope_theta).check(q.shape[-1])
    result = run_plan(plan, q[None], k, v, impl=impl, return_lse=return_lse, q_scale=q_scale, k_scale=k_scale,
                      v_scale=v_scale)
    return (result[0][0], result[1][0]) if return_lse else result[0]
