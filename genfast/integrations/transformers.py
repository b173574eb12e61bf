"""genfast.attention as a transformers attention implementation.

    import genfast.integrations.transformers                  # registers "genfast"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="genfast")
    model.set_attn_implementation("genfast")                  # or switch a loaded model

Every model that dispatches through transformers' AttentionInterface (Llama, Mistral, Qwen, Gemma,
GPT-2, ...) then computes its attention with genfast's fused kernels: what "sdpa" computes, with
grouped-query heads read in place (no repeat_kv copies) and masks of any kind on every backend.
transformers builds the same masks for "genfast" as for "sdpa" (boolean, or none where is_causal
covers it). Gemma 2's logit soft-capping, which "sdpa" drops, is kept, and so are the attention
sinks of gpt-oss and the other models that pass `s_aux` (their flash paths' argument), which
"sdpa" cannot run: genfast.attention's sinks, with their gradient. A sliding-window layer's
window (the `sliding_window` transformers hands its flash paths) is passed as a band beside the
mask, so that the kernels skip the key blocks outside it instead of reading the mask there.
Sequences packed into one row without padding, with flash_attn_varlen_func's kwargs
(cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k: what DataCollatorWithFlattening(
return_flash_attn_kwargs=True) gives), run as genfast.attention_varlen, each sequence causal on its
own: the cost of the sequences, not of the row's square under a block-diagonal mask. DeepSeek
V3.2's sparse attention (`indices`, its indexer's top-k keys of each query) is folded into the mask
as eager folds it; a model's `block_indices` (MiniMax M3 VL's) raise.
Continuous batching (`model.generate_batch(...)`, which switches a "genfast" model to
"paged|genfast" where neither FlashAttention 3 nor 2 is installed, and to FlashAttention where one
is, with a warning: set_attn_implementation("paged|genfast") first keeps genfast) writes each
step's keys and values into transformers' paged cache and runs the batch (chunks of prompts and
decoding steps together) as genfast.attention_varlen, each sequence
causal from its bottom-right corner, reading a full-attention layer's keys from the cache's pages
through a block table: no mask is built, no key head repeated, no key copied out of the cache.
register(name, impl) adds further names pinned to a backend, e.g. "genfast_triton", and their
"paged|" forms. apply_rotary_pos_emb (genfast.integrations.transformers_rotary) replaces the
models' rotary embedding by genfast.rotary, in one line.
"""

import warnings
from typing import Optional

import torch

try:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import create_position_bias_mask
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as error:  # pragma: no cover - exercised only without transformers
    raise ImportError("genfast.integrations.transformers needs transformers>=5: pip install transformers") from error

from .. import _backend
from ..attention import attention, attention_varlen
from .transformers_rotary import apply_rotary_pos_emb  # noqa: F401 (its one-line drop-in, documented there)

NAME = "genfast"
PAGED_PREFIX = "paged|"  # transformers' continuous batching takes the paged form of a model's implementation


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, position_bias: Optional[torch.Tensor] = None,
                      impl: str = "auto", **kwargs):
    """transformers' attention function signature: query (B, H, Lq, D), key and value (B, Hk, Lk,
    D); returns ((B, Lq, H, Dv), None). The causal decision is sdpa_attention_forward's."""
    _warn_no_weights(kwargs)
    q_length, kv_length = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if kwargs.get("block_indices") is not None:
        raise NotImplementedError("genfast's attention: this model's sparse attention passes block_indices to "
                                  "implementations other than eager and sdpa, which genfast does not read; use "
                                  "attn_implementation=\"sdpa\" (or genfast.integrations.sdpa.patch())")
    packed = _packed_sequences(kwargs, query, key, position_bias)
    if packed is not None:
        if kwargs.get("indices") is not None:
            raise NotImplementedError("genfast's attention: sparse attention's indices with packed sequences")
        return _packed_attention(query, key, value, packed, dropout, scaling, is_causal, impl, kwargs), None
    is_causal = q_length > 1 and attention_mask is None and is_causal
    if kwargs.get("indices") is not None:
        attention_mask = _keep_selected_keys(attention_mask, kwargs["indices"], kv_length)
    if is_causal and kv_length > q_length:
        # A static cache at prefill: the keys past the queries are empty slots, masked by causality anyway.
        key, value = key[:, :, :q_length], value[:, :, :q_length]
        if position_bias is not None:
            position_bias = position_bias[..., :q_length]
        if attention_mask is not None:
            attention_mask = attention_mask[..., :q_length]
    if position_bias is not None:
        attention_mask = create_position_bias_mask(position_bias, attention_mask, is_causal, query, key)
        is_causal = False
    # Logit soft-capping (Gemma 2), which "sdpa" ignores, is applied as "eager" applies it.
    out = attention(query, key, value, attention_mask, dropout_p=dropout, is_causal=is_causal, scale=scaling,
                    enable_gqa=key.shape[1] != query.shape[1], softcap=kwargs.get("softcap"),
                    window=_window(kwargs.get("sliding_window"), q_length, key.shape[2]), sinks=kwargs.get("s_aux"),
                    impl=impl)
    return out.transpose(1, 2).contiguous(), None


def _warn_no_weights(kwargs) -> None:
    """output_attentions=True: the fused kernels never form the attention weights, so the model's
    attentions come back None, as under "sdpa", which warns likewise."""
    if kwargs.get("output_attentions", False):
        warnings.warn("genfast's attention does not return attention weights (output_attentions=True gives None "
                      "for them); use attn_implementation=\"eager\" for them", stacklevel=3)


def _keep_selected_keys(attention_mask: Optional[torch.Tensor], indices: torch.Tensor, kv_length: int) -> torch.Tensor:
    """attention_mask hiding every key but each query's selected ones: DeepSeek V3.2's sparse attention
    (and GLM-MoE-DSA's, HY-V4's, AXK2's) hands implementations other than eager and sdpa its
    indexer's top-k keys, `indices` (batch, Lq, topk), which those two fold into the mask as here."""
    hidden = torch.ones((*indices.shape[:2], kv_length), dtype=torch.bool, device=indices.device)
    hidden = hidden.scatter(-1, indices.long(), False)[:, None]
    if attention_mask is None:
        return ~hidden
    if attention_mask.dtype == torch.bool:
        return attention_mask & ~hidden
    return attention_mask.masked_fill(hidden, torch.finfo(attention_mask.dtype).min)


_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


@torch.compiler.disable  # as transformers' paged paths: the cache update writes views of the cache in place
def paged_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                            scaling: Optional[float] = None, cache=None, cu_seq_lens_q: Optional[torch.Tensor] = None,
                            cu_seq_lens_k=None, max_seqlen_q: Optional[int] = None, max_seqlen_k=None,
                            block_table: Optional[torch.Tensor] = None, impl: str = "auto", **kwargs):
    """transformers' paged attention signature (continuous batching): query (1, H, total_q, D), key
    and value (1, Hk, total_q, D) this step's, the cache and its read and write indices, the
    sequences' cumulative lengths (cu_seq_lens_k and max_seqlen_k per layer type where the model
    has several); returns ((1, total_q, H, Dv), None). Sliding-window layers read their window from
    the module, as transformers' flash paths do."""
    if cache is None:
        raise ValueError("genfast's paged attention: no paged attention cache was passed; it runs the packed "
                         "batches of continuous batching (generate_batch). Use the name without \"paged|\" for a "
                         "plain forward.")
    if block_table is not None:
        raise ValueError("genfast's paged attention: block_table (transformers' decode fast path, made for "
                         "flash_attn_with_kvcache) is not supported; set the continuous batching config's "
                         "max_blocks_per_request to 0")
    _warn_no_weights(kwargs)
    sliding_window = getattr(module, "sliding_window", None)
    layer_type = "sliding_attention" if sliding_window else "full_attention"
    if isinstance(cu_seq_lens_k, dict):
        cu_seq_lens_k, max_seqlen_k = cu_seq_lens_k[layer_type], max_seqlen_k[layer_type]
    read_index, write_index = kwargs["read_index"], kwargs["write_index"]
    cu_seq_lens_k, max_seqlen_k = cu_seq_lens_k.to(torch.int32), int(max_seqlen_k)
    pages = _cache_pages(cache, module.layer_idx, read_index) if dropout == 0.0 else None  # paged: no dropout
    table = None
    if pages is None:
        # (total_k, Hk, D): each sequence's cached keys and then its new ones, in the order of cu_seq_lens_k.
        key, value = cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx,
                                  read_index=read_index, write_index=write_index)
    else:
        cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx,
                     read_index=[index[:0] for index in read_index], write_index=write_index)  # written, not read
        (key, value), group_read_index = pages
        table = _block_table(group_read_index, cu_seq_lens_k, max_seqlen_k, key.shape[1])
    out = attention_varlen(query[0].transpose(0, 1), key, value, cu_seq_lens_q.to(torch.int32), cu_seq_lens_k,
                           int(max_seqlen_q), max_seqlen_k, dropout_p=dropout,
                           scale=getattr(module, "scaling", None) if scaling is None else scaling,
                           causal="bottom_right", window=(sliding_window - 1, 0) if sliding_window else None,
                           softcap=kwargs.get("softcap"), sinks=kwargs.get("s_aux"), impl=impl, block_table=table)
    return out[None], None


def _cache_pages(cache, layer_idx: int, read_index):
    """((k_pages, v_pages), the layer's group's read index) where the kernels can read the layer's
    keys from the cache's pages (pages, page_size, Hk, D) through a block table instead of
    cache.update reading them back into one tensor (a copy of every key the step reads, a layer:
    on the CPU it took longer than the attention); None where they cannot: a sliding window's
    pages, which transformers reuses as a ring, or a step that reads no cached key (its keys are
    the step's own)."""
    try:
        group, k_pages, v_pages = cache.get_cache_for_block_table(layer_idx)
    except NotImplementedError:
        return None
    if read_index[group].numel() == 0:
        return None
    return (k_pages, v_pages), read_index[group]


def _block_table(read_index: torch.Tensor, cu_seq_lens_k: torch.Tensor, max_seqlen_k: int, page_size: int):
    """The block table (batch, pages per sequence) of a full-attention layer's read index, which
    lists each sequence's keys in order (cu_seq_lens_k), page by page: a page's first key's row over
    the page size is the page's index among the cache's page views (transformers fills its own
    block tables so). Entries past a sequence's keys are never read; they repeat a valid page."""
    pages = -(-max_seqlen_k // page_size)
    first_keys = cu_seq_lens_k[:-1, None].long() + page_size * torch.arange(pages, device=read_index.device)
    rows = read_index[first_keys.clamp(max=max(read_index.numel() - 1, 0))]
    return torch.div(rows, page_size, rounding_mode="floor").to(torch.int32)


def _packed_sequences(kwargs, query, key, position_bias):
    """flash_attn_varlen_func's kwargs where transformers' flash paths would take them: all four
    given, one row of queries and keys as long as each other (no cache) and no position bias. The
    kwargs then say where the sequences are; the mask transformers built for the row is not read
    (a padding-free collator gives no padding to mask)."""
    values = tuple(kwargs.get(name) for name in _VARLEN_KWARGS)
    if any(value is None for value in values) or query.shape[0] != 1 or position_bias is not None:
        return None
    return values if query.shape[2] == key.shape[2] else None


def _packed_attention(query, key, value, packed, dropout, scaling, is_causal, impl, kwargs):
    """The row's packed sequences through attention_varlen, as transformers' flash paths run them:
    (1, L, H, Dv). The max lengths may be tensors (read once, as flash_attn_varlen_func reads them)."""
    cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k = packed
    rows = [t[0].transpose(0, 1) for t in (query, key, value)]  # (L, heads, dim)
    length = query.shape[2]
    out = attention_varlen(*rows, cu_seq_lens_q.to(torch.int32), cu_seq_lens_k.to(torch.int32), int(max_length_q),
                           int(max_length_k), dropout_p=dropout, scale=scaling,
                           causal="bottom_right" if is_causal else None,
                           window=_window(kwargs.get("sliding_window"), length, length), softcap=kwargs.get("softcap"),
                           sinks=kwargs.get("s_aux"), impl=impl)
    return out[None]


def _window(sliding_window, q_length: int, kv_length: int):
    """The band of a sliding-window layer: keys within sliding_window - 1 of the query on either
    side, as transformers' flash paths read `sliding_window` (its masks' sliding overlay keeps
    kv > q - sliding_window, and their causal part the right side). Only where the queries are the
    keys' positions (training, prefill): a cache's keys need not end at the last query."""
    if not isinstance(sliding_window, int) or sliding_window <= 0 or q_length != kv_length:
        return None
    return (sliding_window - 1, sliding_window - 1)


def register(name: str = NAME, impl: str = "auto") -> str:
    """Registers attention_forward with backend `impl` under `name` in transformers' attention and
    mask interfaces, and paged_attention_forward under "paged|" + name; returns the name, for
    attn_implementation=."""
    if impl not in _backend.IMPLS:
        raise ValueError(f"impl must be one of {_backend.IMPLS}, got {impl!r}")

    def forward(*args, **kwargs):
        return attention_forward(*args, impl=impl, **kwargs)

    def paged_forward(*args, **kwargs):
        return paged_attention_forward(*args, impl=impl, **kwargs)

    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    AttentionInterface.register(PAGED_PREFIX + name, paged_forward)
    return name


register()
