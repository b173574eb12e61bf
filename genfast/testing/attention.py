"""`genfast check` cases of attention: outputs, log-sum-exp and gradients of each fused backend
against the float64 reference by the error-ratio rule."""

import torch

from ..attention import attention, attention_varlen

CASES = {
    "plain": {},
    "gqa": dict(enable_gqa=True),
    "causal top_left": dict(causal="top_left"),
    "causal bottom_right window": dict(causal="bottom_right", window=(24, 0)),
    "mask alibi softcap": dict(attn_mask="float", alibi_slopes=True, softcap=5.0),
    "bool mask": dict(attn_mask="bool"),
    "dropout": dict(dropout_p=0.2),
    "sinks gqa causal": dict(enable_gqa=True, causal="bottom_right", sinks=True),
}


def _case(options, dtype, device):
    g = torch.Generator().manual_seed(5)
    kv_heads = 2 if options.get("enable_gqa") else 4
    q = torch.randn(2, 4, 37, 32, generator=g).to(device=device, dtype=dtype)
    k, v = (torch.randn(2, kv_heads, 53, 32, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    mask = None
    if options.get("attn_mask") == "float":
        mask = torch.randn(37, 53, generator=g).to(device=device, dtype=dtype)
    elif options.get("attn_mask") == "bool":
        mask = (torch.rand(2, 1, 37, 53, generator=g) < 0.8).to(device)
    slopes = torch.tensor([0.5, 0.25, 0.1, 0.05], device=device) if options.get("alibi_slopes") else None
    sinks = torch.tensor([1.5, -2.0, 0.0, 4.0], device=device, dtype=dtype) if options.get("sinks") else None
    rest = {key: val for key, val in options.items() if key not in ("attn_mask", "alibi_slopes", "sinks")}
    rest["enable_gqa"] = True
    weights = torch.linspace(-1, 1, 2 * 4 * 37 * 32, dtype=torch.float64, device=device).reshape(2, 4, 37, 32)

    def run(impl, cast=None):
        from ..random import PhiloxGenerator

        inputs = (q, k, v) if sinks is None else (q, k, v, sinks)  # the sinks' gradient too
        leaves = [(t if cast is None else t.to(cast)).detach().requires_grad_() for t in inputs]
        m = mask if mask is None or mask.dtype == torch.bool or cast is None else mask.to(cast)
        s = slopes if slopes is None or cast is None else slopes.to(cast)
        o, lse = attention(*leaves[:3], m, alibi_slopes=s, generator=PhiloxGenerator(3), return_lse=True, impl=impl,
                           sinks=leaves[3] if sinks is not None else None, **rest)
        return [o, lse, *torch.autograd.grad((o.double() * weights).sum(), leaves)]

    return run


def _varlen_case(dtype, device, padded_cache=False):
    """Packed sequences of lengths 0 to 40, bottom-right causal with a window, grouped-query heads;
    padded_cache: their keys at the front of rows of 48 (seqused_k), the rest large."""
    g = torch.Generator().manual_seed(6)
    lengths_q, lengths_k = [17, 0, 1, 40], [30, 5, 1, 40]
    used = torch.tensor(lengths_k, dtype=torch.int32, device=device) if padded_cache else None
    rows_k = [48] * len(lengths_k) if padded_cache else lengths_k
    q = torch.randn(sum(lengths_q), 4, 32, generator=g).to(device=device, dtype=dtype)
    k, v = (torch.randn(sum(rows_k), 2, 32, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    if padded_cache:
        unused = (torch.arange(48)[None, :] >= torch.tensor(lengths_k)[:, None]).flatten().to(device)
        k[unused], v[unused] = 1e3, -1e3
    cu_q, cu_k = (torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
                  for lengths in (lengths_q, rows_k))
    weights = torch.linspace(-1, 1, q.numel(), dtype=torch.float64, device=device).reshape(q.shape)

    def run(impl, cast=None):
        leaves = [(t if cast is None else t.to(cast)).detach().requires_grad_() for t in (q, k, v)]
        o, lse = attention_varlen(*leaves, cu_q, cu_k, max(lengths_q), max(rows_k), causal="bottom_right",
                                  window=(12, -1), return_lse=True, impl=impl, seqused_k=used)
        return [o, lse, *torch.autograd.grad((o.double() * weights).sum(), leaves)]

    return run


def _paged_case(dtype, device, page_size):
    """Decoding and a prefill from a paged KV cache (pages of page_size keys, in reverse order, NaN
    in the rows no key fills), bottom-right causal, grouped-query heads: o and lse (a paged cache has
    no gradient)."""
    g = torch.Generator().manual_seed(7)
    lengths_q, lengths_k = [1, 1, 30, 2], [300, 129, 200, 1]
    per_sequence = [-(-n // page_size) for n in lengths_k]
    pages = sum(per_sequence)
    q = torch.randn(sum(lengths_q), 4, 64, generator=g).to(device=device, dtype=dtype)
    k, v = (torch.full((pages, page_size, 2, 64), float("nan")) for _ in range(2))
    table = torch.zeros(len(lengths_k), max(per_sequence), dtype=torch.int32)
    page = pages
    for n, count in enumerate(lengths_k):
        for p in range(per_sequence[n]):
            page -= 1
            table[n, p] = page
            rows = min(page_size, count - page_size * p)
            k[page, :rows], v[page, :rows] = (torch.randn(rows, 2, 64, generator=g) for _ in range(2))
    k, v, table = k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype), table.to(device)
    cu_q, cu_k = (torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
                  for lengths in (lengths_q, lengths_k))

    def run(impl, cast=None):
        with torch.no_grad():
            o, lse = attention_varlen(*(t if cast is None else t.to(cast) for t in (q, k, v)), cu_q, cu_k,
                                      max(lengths_q), max(lengths_k), causal="bottom_right", return_lse=True,
                                      impl=impl, block_table=table)
        return [o, lse]

    return run


def _kvcache_case(dtype, device, page_size):
    """A decoding step of flash_attn_with_kvcache (genfast.integrations.flash_attn): two new tokens
    per sequence turned by rotary tables (GPT-NeoX's layout) with the queries and appended (by
    genfast.kvcache_append) to a padded cache (page_size None) or a paged one, sequences holding
    200, 0 and 17 keys, then attended bottom-right causal: o, lse and the caches written."""
    from ..integrations.flash_attn import flash_attn_with_kvcache

    g = torch.Generator().manual_seed(11)
    batch, capacity, heads, kv_heads, dim = 3, 256, 4, 2, 64
    q = torch.randn(batch, 2, heads, dim, generator=g)
    k, v = (torch.randn(batch, 2, kv_heads, dim, generator=g) for _ in range(2))
    angles = torch.arange(capacity, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, dim, 2) / dim)
    cos, sin = angles.cos(), angles.sin()
    rows = (batch, capacity) if page_size is None else (batch * capacity // page_size + 4, page_size)
    k_cache, v_cache = (torch.randn(*rows, kv_heads, dim, generator=g) for _ in range(2))
    table = None if page_size is None else torch.randperm(rows[0], generator=g)[:batch * capacity // page_size].view(
        batch, -1).to(device=device, dtype=torch.int32)
    held = torch.tensor([200, 0, 17], dtype=torch.int32, device=device)

    def run(impl, cast=None):
        q_, k_, v_, cos_, sin_, caches = (t.to(device=device, dtype=cast or dtype)
                                          for t in (q, k, v, cos, sin, torch.stack((k_cache, v_cache))))
        with torch.no_grad():
            o, lse = flash_attn_with_kvcache(q_, caches[0], caches[1], k_, v_, cos_, sin_, held, block_table=table,
                                             causal=True, rotary_interleaved=False, return_softmax_lse=True,
                                             impl=impl)
        return [o, lse, caches[0], caches[1]]

    return run


def cases(device, dtypes):
    """(name, dtype, run, output names) for each case."""
    for dtype in dtypes:
        for name, options in CASES.items():
            yield f"attention {name}", dtype, _case(options, dtype, device), ("o", "lse")
        yield "attention varlen causal window", dtype, _varlen_case(dtype, device), ("o", "lse")
        yield "attention varlen seqused_k", dtype, _varlen_case(dtype, device, True), ("o", "lse")
        for page_size in (128, 16):
            yield (f"attention varlen paged KV cache, {page_size}-key pages", dtype,
                   _paged_case(dtype, device, page_size), ("o", "lse"))
        for page_size in (None, 16):
            layout = "padded" if page_size is None else f"{page_size}-key pages"
            yield (f"flash_attn_with_kvcache rotary, {layout}", dtype, _kvcache_case(dtype, device, page_size),
                   ("o", "lse", "k_cache", "v_cache"))
