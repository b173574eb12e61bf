"""genfast.integrations.flashinfer's attention (single prefill and decode, the ragged and paged batch
wrappers) against FlashInfer's definition written here in float64 (causal aligned bottom-right,
window_left, soft cap, ALiBi's slope (j - i), ROPE_LLAMA's rotate-half pairs, custom masks, lse
to base 2), on the CPU's backends by the error-ratio rule, and on a GPU without synchronising;
layouts, paged caches, out and lse, and bad input."""

import math

import pytest
import torch

from genfast.integrations import flashinfer, flashinfer_common
from genfast.testing.tolerances import assert_error_ratio
from conftest import RecordedOps, capture_cuda_graph, fused_impls, skip_unless_supported

IMPLS = fused_impls() + ["reference"]


def _rope(x, positions, theta, scale):
    """FlashInfer's ROPE_LLAMA of x (tokens, heads, dim) at positions (tokens,)."""
    dim = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim) / scale
    angles = positions.double()[:, None, None] * inv_freq
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    first, second = x[..., :dim // 2], x[..., dim // 2:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], -1)


def _flashinfer(q, k, v, *, causal=False, window_left=-1, window_right=-1, sm_scale=None, logits_soft_cap=None,
                pos_encoding_mode="NONE", rope_theta=1e4, rope_scale=1.0, custom_mask=None, sinks=None,
                dtype=torch.float64):
    """FlashInfer's attention of one request, in `dtype`: q (qo_len, Hq, D), k and v (kv_len, Hk, D)
    NHD; sinks (Hq,) one more score a row, unscaled, with no value. Returns o (qo_len, Hq, Dv) and
    lse (qo_len, Hq) to base 2."""
    q, k, v = (t.to(dtype) for t in (q, k, v))
    qo_len, kv_len, heads = q.shape[0], k.shape[0], q.shape[1]
    i = torch.arange(qo_len)[:, None]
    j = torch.arange(kv_len)[None, :]
    if pos_encoding_mode == "ROPE_LLAMA":
        q = _rope(q, torch.arange(qo_len) + kv_len - qo_len, rope_theta, rope_scale)
        k = _rope(k, torch.arange(kv_len), rope_theta, rope_scale)
    k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))
    s = torch.einsum("qhd,khd->hqk", q, k) * (sm_scale or 1 / math.sqrt(q.shape[-1]))
    if pos_encoding_mode == "ALIBI":
        s = s + flashinfer.get_alibi_slopes(heads).to(dtype)[:, None, None] * (j - i)
    if logits_soft_cap:
        s = logits_soft_cap * torch.tanh(s / logits_soft_cap)
    keep = torch.ones(qo_len, kv_len, dtype=torch.bool)
    diagonal = i + kv_len - qo_len
    if custom_mask is not None:
        keep &= custom_mask
    elif causal:
        keep &= j <= diagonal
    if window_left >= 0:
        keep &= j >= diagonal - window_left
    if window_right >= 0:
        keep &= j <= diagonal + window_right
    s = s.masked_fill(~keep, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.to(dtype)[:, None, None].expand(heads, qo_len, 1)], -1)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)[..., :kv_len]
    o = torch.einsum("hqk,khd->qhd", p, v)
    return o, (lse / math.log(2)).T


def _inputs(qo_len, kv_len, heads=4, kv_heads=2, dim=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, h, dim, generator=g).to(dtype) for n, h in ((qo_len, heads), (kv_len, kv_heads),
                                                                        (kv_len, kv_heads))]


def _id(options):
    return ",".join(key if isinstance(value, torch.Tensor) or value is True else f"{key}={value}"
                    for key, value in options.items()) or "plain"


def _check(got, q, k, v, **options):
    """got (o, lse) against FlashInfer's definition: float64 exact, float32 the low precision."""
    exact = _flashinfer(q, k, v, **options)
    low = _flashinfer(q, k, v, dtype=torch.float32, **options)
    for name, a, e, lo in zip(("o", "lse"), got, exact, low):
        assert a.shape == e.shape, (name, a.shape, e.shape)
        assert_error_ratio(a, e, lo.to(a.dtype), msg=name)


MASK = torch.rand(7, 19, generator=torch.Generator().manual_seed(5)) < 0.7
PREFILL_OPTIONS = [dict(), dict(causal=True), dict(causal=True, window_left=5), dict(window_left=4),
                   dict(logits_soft_cap=2.0, sm_scale=0.4), dict(causal=True, pos_encoding_mode="ALIBI"),
                   dict(pos_encoding_mode="ALIBI"),
                   dict(causal=True, pos_encoding_mode="ROPE_LLAMA", rope_theta=500.0, rope_scale=2.0),
                   dict(custom_mask=MASK, causal=True), dict(custom_mask=MASK, window_left=6)]


@pytest.mark.parametrize("options", PREFILL_OPTIONS, ids=_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_single_prefill_matches_flashinfer(impl, options):
    """Appending 7 queries to a request of 19 keys, grouped heads; a custom mask overrides causal."""
    skip_unless_supported(impl, "cpu")
    q, k, v = _inputs(7, 19)
    got = flashinfer.single_prefill_with_kv_cache(q, k, v, return_lse=True, impl=impl, **options)
    assert got[0].dtype == q.dtype and got[1].dtype == torch.float32
    _check(got, q, k, v, **options)
    o = flashinfer.single_prefill_with_kv_cache_return_lse(q, k, v, impl=impl, **options)[0]
    torch.testing.assert_close(o, got[0], rtol=0, atol=0)


def _packbits(masks):
    """FlashInfer's segment_packbits (bit order little): each mask flattened, padded to whole bytes."""
    flats = [m.reshape(-1) for m in masks]
    bits = torch.cat([torch.nn.functional.pad(f, (0, -f.numel() % 8)) for f in flats]).view(-1, 8).to(torch.int32)
    return (bits << torch.arange(8, dtype=torch.int32)).sum(1).to(torch.uint8)


@pytest.mark.parametrize("impl", IMPLS)
def test_single_prefill_layouts_masks_and_scales(impl):
    """HND keys read as NHD; a packed custom mask (little-endian bits) as the bool one; k_scale
    multiplies sm_scale and v_scale the output; o_dtype."""
    skip_unless_supported(impl, "cpu")
    q, k, v = _inputs(7, 19)
    plain = flashinfer.single_prefill_with_kv_cache(q, k, v, custom_mask=MASK, impl=impl)
    hnd = flashinfer.single_prefill_with_kv_cache(q, k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous(),
                                                  custom_mask=MASK, kv_layout="HND", impl=impl)
    torch.testing.assert_close(hnd, plain, rtol=0, atol=0)
    packed = _packbits([MASK])
    torch.testing.assert_close(flashinfer.single_prefill_with_kv_cache(q, k, v, packed_custom_mask=packed, impl=impl),
                               plain, rtol=0, atol=0)
    scaled = flashinfer.single_prefill_with_kv_cache(q, k, v, k_scale=0.5, v_scale=3.0, sm_scale=0.8, impl=impl,
                                                     return_lse=True)
    exact = _flashinfer(q, k, v, sm_scale=0.4)
    low = _flashinfer(q, k, v, sm_scale=0.4, dtype=torch.float32)
    assert_error_ratio(scaled[0], exact[0] * 3, low[0] * 3, msg="o")
    assert_error_ratio(scaled[1], exact[1], low[1], msg="lse")
    assert flashinfer.single_prefill_with_kv_cache(q, k, v, o_dtype=torch.float64, impl=impl).dtype == torch.float64


@pytest.mark.parametrize("impl", IMPLS)
def test_per_head_scale_tensors(impl):
    """FlashInfer's per-head scales, read on the device: scale_q (num_qo_heads,), scale_k and scale_v
    (num_kv_heads,) of single_prefill, and a wrapper run's q_scale, k_scale and v_scale as tensors of
    one value or one a head: head h's scores take q_scale[h] k_scale[h // group], its output
    v_scale[h // group]."""
    skip_unless_supported(impl, "cpu")
    q, k, v = _inputs(7, 19)
    g = torch.Generator().manual_seed(5)
    scale_q, scale_k, scale_v = (torch.rand(n, generator=g) + 0.5 for n in (4, 2, 2))
    per_q = (scale_q * scale_k.repeat_interleave(2))[None, :, None]
    per_o = scale_v.repeat_interleave(2)[None, :, None]

    def expected(dtype, **options):
        o, lse = _flashinfer(q.to(dtype) * per_q.to(dtype), k, v, dtype=dtype, **options)
        return o * per_o.to(dtype), lse
    got = flashinfer.single_prefill_with_kv_cache(q, k, v, scale_q=scale_q, scale_k=scale_k, scale_v=scale_v,
                                                  causal=True, return_lse=True, impl=impl)
    exact, low = expected(torch.float64, causal=True), expected(torch.float32, causal=True)
    assert_error_ratio(got[0], exact[0], low[0], msg="o")
    assert_error_ratio(got[1], exact[1], low[1], msg="lse")
    wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(None, impl=impl)
    wrapper.plan(torch.tensor([0, 7]), torch.tensor([0, 19]), 4, 2, 16, causal=True)
    ran = wrapper.run(q, k, v, q_scale=scale_q, k_scale=scale_k, v_scale=scale_v, return_lse=True)
    torch.testing.assert_close(ran, got, rtol=0, atol=0)
    one = wrapper.run(q, k, v, k_scale=torch.tensor([0.5]), v_scale=torch.tensor(3.0))
    torch.testing.assert_close(one, wrapper.run(q, k, v, k_scale=0.5, v_scale=3.0))


DECODE_OPTIONS = [dict(), dict(window_left=6), dict(logits_soft_cap=3.0), dict(pos_encoding_mode="ALIBI"),
                  dict(pos_encoding_mode="ROPE_LLAMA", rope_theta=1e4)]


@pytest.mark.parametrize("options", DECODE_OPTIONS, ids=_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_single_decode_matches_flashinfer(impl, options):
    """One query a head at position kv_len - 1 (ALiBi's bias slope j); HND keys."""
    skip_unless_supported(impl, "cpu")
    q, k, v = _inputs(1, 23, heads=8, kv_heads=2)
    o, lse = flashinfer.single_decode_with_kv_cache(q[0], k.transpose(0, 1), v.transpose(0, 1), kv_layout="HND",
                                                    return_lse=True, impl=impl, **options)
    assert o.shape == (8, 16) and lse.shape == (8,)
    _check((o[None], lse[None]), q, k, v, causal=True, **options)


# Requests of (qo_len, kv_len): an append, a prefill, one with no queries, one query over many keys.
REQUESTS = [(5, 12), (9, 9), (0, 4), (1, 30)]


def _packed(requests, heads=4, kv_heads=2, dim=16, seed=1):
    q, k, v = _inputs(sum(n for n, _ in requests), sum(n for _, n in requests), heads, kv_heads, dim, seed=seed)
    qo_indptr = torch.tensor([0] + [n for n, _ in requests]).cumsum(0).int()
    kv_indptr = torch.tensor([0] + [n for _, n in requests]).cumsum(0).int()
    return q, k, v, qo_indptr, kv_indptr


def _check_requests(got, q, k, v, requests, masks=None, **options):
    at_q = at_k = 0
    for n, (qo_len, kv_len) in enumerate(requests):
        rows, keys = slice(at_q, at_q + qo_len), slice(at_k, at_k + kv_len)
        if qo_len:
            mask = None if masks is None else masks[n]
            _check((got[0][rows], got[1][rows]), q[rows], k[keys], v[keys], custom_mask=mask, **options)
        at_q, at_k = at_q + qo_len, at_k + kv_len


RAGGED_OPTIONS = [dict(causal=True), dict(causal=True, window_left=3), dict(causal=True, pos_encoding_mode="ALIBI"),
                  dict(pos_encoding_mode="ALIBI"), dict(causal=True, pos_encoding_mode="ROPE_LLAMA"),
                  dict(logits_soft_cap=4.0), dict(custom_mask=True)]


@pytest.mark.parametrize("options", RAGGED_OPTIONS, ids=_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_ragged_wrapper_matches_flashinfer(impl, options):
    skip_unless_supported(impl, "cpu")
    q, k, v, qo_indptr, kv_indptr = _packed(REQUESTS)
    options = dict(options)
    masks = None
    if options.pop("custom_mask", False):
        g = torch.Generator().manual_seed(3)
        masks = [torch.rand(a, b, generator=g) < 0.6 for a, b in REQUESTS]
        options_plan = dict(options, custom_mask=torch.cat([m.reshape(-1) for m in masks]))
    else:
        options_plan = options
    wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(torch.empty(1, dtype=torch.uint8), "NHD", impl=impl)
    wrapper.plan(qo_indptr, kv_indptr, 4, 2, 16, **options_plan)
    got = wrapper.run(q, k, v, return_lse=True)
    assert got[0].shape == q.shape and got[1].shape == q.shape[:2]
    _check_requests(got, q, k, v, REQUESTS, masks, **options)
    torch.testing.assert_close(wrapper.run_return_lse(q, k, v)[0], got[0], rtol=0, atol=0)
    if masks is not None:  # the same masks packed, each request's from a byte of its own
        wrapper.plan(qo_indptr, kv_indptr, 4, 2, 16, packed_custom_mask=_packbits(masks), **options)
        for a, b in zip(wrapper.run(q, k, v, return_lse=True), got):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def _paged(requests, page_size, heads=4, kv_heads=2, dim=16, layout="NHD", single=False, seed=2):
    """Each request's keys in pages of page_size, the pages shuffled in a larger cache, and
    FlashInfer's page lists: (q, k, v packed, cache, indptr, indices, last_page_len)."""
    q, k, v, _, _ = _packed(requests, heads, kv_heads, dim, seed)
    pages = [-(-kv_len // page_size) for _, kv_len in requests]
    order = torch.randperm(sum(pages) + 3, generator=torch.Generator().manual_seed(seed))
    k_cache = torch.full((sum(pages) + 3, page_size, kv_heads, dim), float("nan"))
    v_cache = k_cache.clone()
    indices, at_k, used = [], 0, 0
    for (_, kv_len), count in zip(requests, pages):
        for p in range(count):
            page = int(order[used])
            used += 1
            indices.append(page)
            rows = slice(at_k + p * page_size, at_k + min((p + 1) * page_size, kv_len))
            k_cache[page, :rows.stop - rows.start] = k[rows]
            v_cache[page, :rows.stop - rows.start] = v[rows]
        at_k += kv_len
    last = [kv_len - (count - 1) * page_size if count else 0 for (_, kv_len), count in zip(requests, pages)]
    indptr = torch.tensor([0] + pages).cumsum(0).int()
    if layout == "HND":
        k_cache, v_cache = (t.transpose(1, 2).contiguous() for t in (k_cache, v_cache))
    cache = torch.stack([k_cache, v_cache], 1) if single else (k_cache, v_cache)
    return q, k, v, cache, indptr, torch.tensor(indices, dtype=torch.int32), torch.tensor(last, dtype=torch.int32)


@pytest.mark.parametrize("layout,single", [("NHD", False), ("HND", True)])
@pytest.mark.parametrize("impl", IMPLS)
def test_paged_prefill_wrapper_matches_flashinfer(impl, layout, single):
    """Pages shuffled in a cache whose unused slots hold NaN; a tuple or one tensor, NHD or HND;
    ROPE_LLAMA (the keys gathered from their pages and turned); ALiBi without causal and custom
    masks (bool and packed) too, attended one request at a time."""
    skip_unless_supported(impl, "cpu")
    requests = [(5, 12), (9, 9), (1, 30)]
    q, k, v, cache, indptr, indices, last = _paged(requests, 4, layout=layout, single=single)
    qo_indptr = torch.tensor([0] + [n for n, _ in requests]).cumsum(0).int()
    wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(None, layout, impl=impl)
    for options in (dict(causal=True), dict(causal=True, pos_encoding_mode="ALIBI", window_left=7),
                    dict(pos_encoding_mode="ALIBI"), dict(causal=True, pos_encoding_mode="ROPE_LLAMA", rope_theta=500.0,
                                                          rope_scale=2.0)):
        wrapper.plan(qo_indptr, indptr, indices, last, 4, 2, 16, 4, **options)
        got = wrapper.run(q, cache, return_lse=True)
        _check_requests(got, q, k, v, requests, **options)
    g = torch.Generator().manual_seed(3)
    masks = [torch.rand(a, b, generator=g) < 0.6 for a, b in requests]
    for mask_option in (dict(custom_mask=torch.cat([m.reshape(-1) for m in masks])),
                        dict(packed_custom_mask=_packbits(masks))):
        wrapper.plan(qo_indptr, indptr, indices, last, 4, 2, 16, 4, window_left=6, **mask_option)
        _check_requests(wrapper.run(q, cache, return_lse=True), q, k, v, requests, masks, window_left=6)
    wrapper.plan(qo_indptr, indptr, indices, last, 4, 2, 16, 4, pos_encoding_mode="ROPE_LLAMA", **mask_option)
    _check_requests(wrapper.run(q, cache, return_lse=True), q, k, v, requests, masks, pos_encoding_mode="ROPE_LLAMA")


@pytest.mark.parametrize("impl", IMPLS)
def test_paged_decode_wrapper_matches_flashinfer(impl):
    """One query per request over pages of 16 (a partial last page, a single key); out and lse
    written in place."""
    skip_unless_supported(impl, "cpu")
    requests = [(1, 40), (1, 1), (1, 16), (1, 33)]
    q, k, v, cache, indptr, indices, last = _paged(requests, 16, heads=8)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(torch.empty(8, dtype=torch.uint8), "NHD", impl=impl)
    for options in (dict(), dict(pos_encoding_mode="ALIBI"), dict(window_left=9, logits_soft_cap=5.0),
                    dict(pos_encoding_mode="ROPE_LLAMA")):
        wrapper.begin_forward(indptr, indices, last, 8, 2, 16, 16, **options)
        out, lse = torch.empty_like(q), torch.empty(q.shape[:2])
        got = wrapper.run(q, cache, out=out, lse=lse, return_lse=True)
        assert got[0] is out and got[1] is lse
        _check_requests(got, q, k, v, requests, causal=True, **options)
        wrapper.end_forward()


SINKS = torch.tensor([1.5, -0.5, 3.0, 0.25, 2.0, -1.0, 0.0, 4.0])
SINK_JIT_ARGS = ("batch_prefill_attention_sink_f32_swa_False_fa2", torch.float32, torch.float32, torch.float32,
                 torch.int32, 16, 16, ["sink"], ["float"], ["sm_scale"], ["double"], "AttentionSink", "decl")


@pytest.mark.parametrize("impl", IMPLS)
def test_sinks_join_every_rows_softmax(impl):
    """gpt-oss's sinks, one unscaled logit a query head: the paged wrappers' run(sinks=), the
    AttentionSink variant on the ragged wrapper (run(q, k, v, sink, sm_scale), the run's scale
    replacing the plan's) and BatchAttentionWithAttentionSinkWrapper; a request with no keys gets o 0
    and lse the sink."""
    skip_unless_supported(impl, "cpu")
    sinks = SINKS[:4]
    requests = [(5, 12), (9, 9), (1, 30)]
    q, k, v, cache, indptr, indices, last = _paged(requests, 4)
    qo_indptr = torch.tensor([0] + [n for n, _ in requests]).cumsum(0).int()
    paged = flashinfer.BatchPrefillWithPagedKVCacheWrapper(None, impl=impl)
    paged.plan(qo_indptr, indptr, indices, last, 4, 2, 16, 4, causal=True, window_left=6)
    _check_requests(paged.run(q, cache, sinks=sinks, return_lse=True), q, k, v, requests, causal=True,
                    window_left=6, sinks=sinks)
    sink_wrapper = flashinfer.BatchAttentionWithAttentionSinkWrapper(None, q_data_type=torch.float32,
                                                                     kv_data_type=torch.float32, head_dim_qk=16,
                                                                     head_dim_vo=16, window_left=6, impl=impl)
    sink_wrapper.plan(qo_indptr, indptr, indices, last, 4, 2, 16, 4, causal=True, window_left=6, sm_scale=9.0)
    got = sink_wrapper.run(q, cache, sinks, 0.3, return_lse=True)
    _check_requests(got, q, k, v, requests, causal=True, window_left=6, sinks=sinks, sm_scale=0.3)

    ragged_requests = [(5, 12), (0, 4), (2, 0), (1, 30)]
    q, k, v, qo_indptr, kv_indptr = _packed(ragged_requests)
    ragged = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(None, jit_args=SINK_JIT_ARGS, impl=impl)
    ragged.plan(qo_indptr, kv_indptr, 4, 2, 16, causal=False)
    o, lse = ragged.run(q, k, v, sinks, 0.5, return_lse=True)
    _check_requests((o, lse), q, k, v, ragged_requests, sinks=sinks, sm_scale=0.5)
    no_keys = slice(5, 7)  # the request of two queries and no keys
    assert torch.equal(o[no_keys], torch.zeros_like(o[no_keys]))
    torch.testing.assert_close(lse[no_keys], (sinks / math.log(2)).expand(2, 4), rtol=1e-6, atol=0)

    # one request at a time (custom masks), the request without keys among them
    g = torch.Generator().manual_seed(4)
    masks = [torch.rand(a, b, generator=g) < 0.6 for a, b in ragged_requests]
    ragged.plan(qo_indptr, kv_indptr, 4, 2, 16, custom_mask=torch.cat([m.reshape(-1) for m in masks]))
    o, lse = ragged.run(q, k, v, sinks, 0.5, return_lse=True)
    _check_requests((o, lse), q, k, v, ragged_requests, masks, sinks=sinks, sm_scale=0.5)
    torch.testing.assert_close(lse[no_keys], (sinks / math.log(2)).expand(2, 4), rtol=1e-6, atol=0)

    decode_requests = [(2, 40), (2, 2), (2, 33)]
    q, k, v, cache, indptr, indices, last = _paged(decode_requests, 16, heads=8)
    decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(None, impl=impl)
    for q_len in (1, 2):  # one query a request (each request's last), and two
        queries = q if q_len == 2 else q[1::2]
        decode.plan(indptr, indices, last, 8, 2, 16, 16, logits_soft_cap=5.0, q_len_per_req=q_len)
        got = decode.run(queries, cache, sinks=SINKS, return_lse=True)
        for n in range(3):
            rows, keys = slice(n * q_len, (n + 1) * q_len), slice(sum(b for _, b in decode_requests[:n]),
                                                                   sum(b for _, b in decode_requests[:n + 1]))
            _check((got[0][rows], got[1][rows]), queries[rows], k[keys], v[keys], causal=True, logits_soft_cap=5.0,
                   sinks=SINKS)


@pytest.mark.parametrize("impl", IMPLS)
def test_paged_batch_without_any_keys(impl):
    """Every request's page list empty in a pool that holds pages: o 0, lse -inf or the sink, and
    max_seqlen_k at least 1 for the kernels (the CUDA kernels' grids come from it, and they refuse 0
    while k, here the pool, has rows)."""
    skip_unless_supported(impl, "cpu")
    requests = [(2, 0), (3, 0)]
    q, k, v, cache, indptr, indices, last = _paged(requests, 4)
    qo_indptr = torch.tensor([0] + [n for n, _ in requests]).cumsum(0).int()
    wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(None, impl=impl)
    wrapper.plan(qo_indptr, indptr, indices, last, 4, 2, 16, 4, non_blocking=False)
    with RecordedOps() as mode:
        o, lse = wrapper.run(q, cache, return_lse=True)
    assert torch.equal(o, torch.zeros_like(o)) and torch.equal(lse, torch.full_like(lse, -math.inf))
    o, lse = wrapper.run(q, cache, sinks=SINKS[:4], return_lse=True)
    assert torch.equal(o, torch.zeros_like(o))
    torch.testing.assert_close(lse, (SINKS[:4] / math.log(2)).expand(5, 4), rtol=1e-6, atol=0)
    forwards = [args for name, args, _ in mode.calls if "attention_varlen_forward" in name]
    assert len(forwards) == (impl != "reference")
    for args in forwards:
        assert args[6] >= 1, f"max_seqlen_k {args[6]}"


@pytest.mark.parametrize("impl", IMPLS)
def test_decode_wrapper_takes_several_queries_a_request(impl):
    """q_len_per_req = 3 (speculative decoding's drafts): each request's queries at its last three
    positions, causal among themselves, from plan() or, as FlashInfer took it before, run(); with
    window_right -1 or 1, each sees every draft or one draft past its own."""
    skip_unless_supported(impl, "cpu")
    requests = [(3, 40), (3, 3), (3, 17)]
    q, k, v, cache, indptr, indices, last = _paged(requests, 16, heads=8)
    decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(None, impl=impl)
    decode.plan(indptr, indices, last, 8, 2, 16, 16, q_len_per_req=3, window_left=20)
    got = decode.run(q, cache, return_lse=True)
    assert got[0].shape == (9, 8, 16)
    _check_requests(got, q, k, v, requests, causal=True, window_left=20)
    torch.testing.assert_close(decode.run(q, cache, q_len_per_req=3), got[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"q_len_per_req \(2\) must be the planned one \(3\)"):
        decode.run(q, cache, q_len_per_req=2)
    with pytest.raises(ValueError, match="at least q_len_per_req"):
        decode.plan(indptr, indices, last, 8, 2, 16, 16, q_len_per_req=4)
    for window_right in (-1, 1):  # every draft sees all the drafts, or one past its own
        decode.plan(indptr, indices, last, 8, 2, 16, 16, q_len_per_req=3, window_left=20, window_right=window_right)
        _check_requests(decode.run(q, cache, return_lse=True), q, k, v, requests, window_left=20,
                        window_right=window_right)


@pytest.mark.parametrize("impl", IMPLS)
def test_decode_plan_takes_block_tables_and_seq_lens(impl):
    """FlashInfer's decode plan(block_tables=, seq_lens=) (its trtllm-gen backend's): each request's
    pages from the table (int64 here, padded past them with a page of NaN) and its first seq_lens
    keys, not its page lists'."""
    skip_unless_supported(impl, "cpu")
    requests = [(1, 40), (1, 1), (1, 16), (1, 33)]
    q, k, v, cache, indptr, indices, last = _paged(requests, 16, heads=8)
    unused = sorted(set(range(cache[0].shape[0])) - set(indices.tolist()))[0]  # its slots hold NaN
    table = torch.full((4, 4), unused, dtype=torch.int64)
    for n in range(4):
        table[n, :indptr[n + 1] - indptr[n]] = indices[indptr[n]:indptr[n + 1]]
    seq_lens = torch.tensor([35, 1, 10, 33], dtype=torch.int32)
    decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(None, impl=impl)
    decode.plan(torch.zeros(5, dtype=torch.int32), indices[:0], torch.zeros(4, dtype=torch.int32), 8, 2, 16, 16,
                block_tables=table, seq_lens=seq_lens)
    o, lse = decode.run(q, cache, return_lse=True)
    starts = [0] + torch.tensor([n for _, n in requests]).cumsum(0).tolist()
    for n, used in enumerate(seq_lens.tolist()):
        keys = slice(starts[n], starts[n] + used)
        _check((o[n:n + 1], lse[n:n + 1]), q[n:n + 1], k[keys], v[keys], causal=True)
    with pytest.raises(ValueError, match="seq_lens must fit each request's pages"):
        decode.plan(indptr, indices, last, 8, 2, 16, 16, seq_lens=torch.tensor([40, 1, 17, 33]))
    with pytest.raises(ValueError, match="block_tables must be an int32 or int64 tensor"):
        decode.plan(indptr, indices, last, 8, 2, 16, 16, block_tables=table[:3])


@pytest.mark.parametrize("impl", IMPLS)
def test_rope_on_paged_caches_equals_the_ragged_wrapper_on_their_keys(impl):
    """ROPE_LLAMA over a paged cache (its keys gathered, then turned) equals the ragged wrapper's
    over the same keys packed, with decode's q_len_per_req, block_tables and seq_lens, an fp8 cache
    (a pool widened whole and one whose named pages are gathered) and per-head scale tensors."""
    skip_unless_supported(impl, "cpu")
    requests = [(2, 40), (2, 3), (2, 16), (2, 33)]
    q, k, v, cache, indptr, indices, last = _paged(requests, 16, heads=8)
    qo_indptr = torch.tensor([0] + [n for n, _ in requests]).cumsum(0).int()
    ragged = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(None, impl=impl)
    ragged.plan(qo_indptr, torch.tensor([0] + [n for _, n in requests]).cumsum(0).int(), 8, 2, 16, causal=True,
                pos_encoding_mode="ROPE_LLAMA", rope_theta=500.0)
    decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(None, impl=impl)
    decode.plan(indptr, indices, last, 8, 2, 16, 16, q_len_per_req=2, pos_encoding_mode="ROPE_LLAMA", rope_theta=500.0)
    scales = dict(q_scale=torch.linspace(0.5, 2.0, 8), k_scale=torch.tensor([0.75, 1.5]), v_scale=torch.tensor(2.0))
    torch.testing.assert_close(decode.run(q, cache, **scales), ragged.run(q, k, v, **scales), rtol=0, atol=0)
    fp8 = tuple(t.to(torch.float8_e4m3fn) for t in cache)
    k8, v8 = (t.to(torch.float8_e4m3fn).float() for t in (k, v))
    spare = tuple(torch.cat([t, torch.full((30, *t.shape[1:]), float("nan"))]).to(torch.float8_e4m3fn) for t in cache)
    for pool in (fp8, spare):  # 11 pages, under a table of 4 x 3: widened whole; 41: the table's pages gathered
        torch.testing.assert_close(decode.run(q, pool), ragged.run(q, k8, v8), rtol=0, atol=0)
    table = torch.zeros(4, 3, dtype=torch.int32)
    for n in range(4):
        table[n, :indptr[n + 1] - indptr[n]] = indices[indptr[n]:indptr[n + 1]]
    seq_lens = torch.tensor([35, 3, 10, 33], dtype=torch.int32)
    decode.plan(torch.zeros(5, dtype=torch.int32), indices[:0], torch.zeros(4, dtype=torch.int32), 8, 2, 16, 16,
                q_len_per_req=2, block_tables=table, seq_lens=seq_lens, pos_encoding_mode="ROPE_LLAMA")
    starts = [0] + torch.tensor([n for _, n in requests]).cumsum(0).tolist()
    keys = torch.cat([torch.arange(starts[n], starts[n] + used) for n, used in enumerate(seq_lens.tolist())])
    ragged.plan(qo_indptr, torch.cat([torch.zeros(1), seq_lens.cumsum(0)]).int(), 8, 2, 16, causal=True,
                pos_encoding_mode="ROPE_LLAMA")
    torch.testing.assert_close(decode.run(q, cache), ragged.run(q, k[keys], v[keys]), rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_float8_caches_and_queries_are_widened(impl):
    """FlashInfer's fp8 KV caches (float8_e4m3fn pages, k_scale and v_scale numbers) and fp8 q: equal to
    the same call on their values widened (float32 here): a pool no larger than the table widened
    whole, and the table's pages gathered from a larger one, whose unused slots hold NaN; a ragged
    batch's float8_e5m2 keys too."""
    skip_unless_supported(impl, "cpu")
    requests = [(1, 40), (1, 1), (1, 16), (1, 33)]
    q, k, v, cache, indptr, indices, last = _paged(requests, 16, heads=8)
    decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(None, impl=impl)
    decode.plan(indptr, indices, last, 8, 2, 16, 16, kv_data_type=torch.float8_e4m3fn)
    for spare in (0, 30):  # 11 pages against a table of 4 x 3 entries; then 41
        pool = tuple(torch.cat([t, torch.full((spare, *t.shape[1:]), float("nan"))]) for t in cache)
        fp8 = tuple(t.to(torch.float8_e4m3fn) for t in pool)
        got = decode.run(q, fp8, k_scale=0.5, v_scale=2.0, return_lse=True)
        want = decode.run(q, tuple(t.float() for t in fp8), k_scale=0.5, v_scale=2.0, return_lse=True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    q8 = q.to(torch.float8_e4m3fn)
    decode.plan(indptr, indices, last, 8, 2, 16, 16, o_data_type=torch.float32)
    torch.testing.assert_close(decode.run(q8, fp8), decode.run(q8.float(), tuple(t.float() for t in fp8)),
                               rtol=1e-6, atol=1e-6)
    q, k, v, qo_indptr, kv_indptr = _packed(REQUESTS)
    ragged = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(None, impl=impl)
    ragged.plan(qo_indptr, kv_indptr, 4, 2, 16, causal=True)
    k5, v5 = k.to(torch.float8_e5m2), v.to(torch.float8_e5m2)
    torch.testing.assert_close(ragged.run(q, k5, v5), ragged.run(q, k5.float(), v5.float()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_cascade_of_prefix_and_suffix_merges_into_attention_over_all_keys(impl):
    """FlashInfer's cascade: a request's queries over a shared prefix (non-causal) and over its own
    keys (causal), merged by merge_state from the base-2 lse the attention returns, equal attention
    over all the keys."""
    skip_unless_supported(impl, "cpu")
    q, k, v = _inputs(6, 26)
    full = flashinfer.single_prefill_with_kv_cache(q, k, v, causal=True, return_lse=True, impl=impl)
    prefix = flashinfer.single_prefill_with_kv_cache(q, k[:20], v[:20], return_lse=True, impl=impl)
    own = flashinfer.single_prefill_with_kv_cache(q, k[20:], v[20:], causal=True, return_lse=True, impl=impl)
    merged = flashinfer.merge_state(*prefix, *own, impl=impl)
    torch.testing.assert_close(merged[0], full[0], atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(merged[1], full[1], atol=2e-6, rtol=2e-5)


def test_bad_input_names_the_argument():
    q, k, v = _inputs(7, 19)
    for call, error, match in [
            (lambda: flashinfer.single_prefill_with_kv_cache(q, k, v, kv_layout="NDH"), ValueError, "kv_layout"),
            (lambda: flashinfer.single_prefill_with_kv_cache(q, k, v, pos_encoding_mode="ROPE"), ValueError,
             "pos_encoding_mode"),
            (lambda: flashinfer.single_prefill_with_kv_cache(q, k, v, pos_encoding_mode="ALIBI", logits_soft_cap=2.0),
             ValueError, "ALIBI.*logits_soft_cap"),
            (lambda: flashinfer.single_prefill_with_kv_cache(q, k, v, custom_mask=MASK[:, :5]), ValueError,
             "custom_mask must be"),
            (lambda: flashinfer.single_prefill_with_kv_cache(q, k, v, k_scale=torch.ones(3)), ValueError,
             "k_scale must be a number or a floating-point tensor of 1 or 2 values"),
            (lambda: flashinfer.single_prefill_with_kv_cache(q, k[:, :1].expand(19, 3, 16), v[:, :1].expand(19, 3, 16)),
             ValueError, "num_kv_heads"),
            (lambda: flashinfer.single_decode_with_kv_cache(q, k, v), ValueError, "q must be a 2-d"),
            (lambda: flashinfer.BatchDecodeWithPagedKVCacheWrapper(None).run(q, (k, v)), RuntimeError, "before plan"),
            (lambda: flashinfer.BatchDecodeWithPagedKVCacheWrapper(None, use_cuda_graph=True), ValueError,
             "use_cuda_graph"),
            (lambda: flashinfer.BatchPrefillWithRaggedKVCacheWrapper(None, jit_args=("my_variant",)), ValueError,
             "jit_args: .* AttentionSink"),
            (lambda: flashinfer.BatchAttentionWithAttentionSinkWrapper(None, pos_encoding_mode="ALIBI"), ValueError,
             "pos_encoding_mode must be 'NONE' with attention sinks"),
            (lambda: flashinfer.BatchPrefillWithRaggedKVCacheWrapper(None).run(q, k, v, SINKS[:4], 0.5), ValueError,
             "positional arguments after them are a JIT variant's")]:
        with pytest.raises(error, match=match):
            call()
    requests = [(5, 12), (1, 30)]
    q, k, v, cache, indptr, indices, last = _paged(requests, 4)
    qo_indptr = torch.tensor([0, 5, 6], dtype=torch.int32)
    paged = flashinfer.BatchPrefillWithPagedKVCacheWrapper(None)
    for options, match in [(dict(custom_mask=torch.ones(89, dtype=torch.bool)), "custom_mask must hold")]:
        with pytest.raises(ValueError, match=match):
            paged.plan(qo_indptr, indptr, indices, last, 4, 2, 16, 4, **options)
    with pytest.raises(ValueError, match="paged_kv_last_page_len"):
        paged.plan(qo_indptr, indptr, indices, torch.tensor([5, 2]), 4, 2, 16, 4)
    paged.plan(qo_indptr, indptr, indices, last, 4, 2, 16, 4, causal=True)
    with pytest.raises(ValueError, match="page_size 4"):
        paged.run(q, (cache[0][:, :2], cache[1][:, :2]))
    with pytest.raises(ValueError, match=r"q must be \(6, 4, head_dim\)"):
        paged.run(q[:5], cache)
    with pytest.raises(ValueError, match="window_left"):
        paged.run(q, cache, window_left=3)
    with pytest.raises(ValueError, match="the AttentionSink variant's run takes"):
        flashinfer.BatchAttentionWithAttentionSinkWrapper(None).run(q, cache, SINKS[:4])
    sink_wrapper = flashinfer.BatchAttentionWithAttentionSinkWrapper(None)
    sink_wrapper.plan(qo_indptr, indptr, indices, last, 4, 2, 16, 4, causal=True)
    with pytest.raises(ValueError, match="q_scale and k_scale with the AttentionSink variant"):
        sink_wrapper.run(q, cache, SINKS[:4], 0.5, k_scale=2.0)
    sink_wrapper.plan(qo_indptr, indptr, indices, last, 4, 2, 16, 4, causal=True, logits_soft_cap=3.0)
    with pytest.raises(ValueError, match="has no logits_soft_cap or pos_encoding_mode"):
        sink_wrapper.run(q, cache, SINKS[:4], 0.5)
    with pytest.raises(ValueError, match="JIT decode variants"):
        flashinfer.BatchDecodeWithPagedKVCacheWrapper(None, jit_args=SINK_JIT_ARGS)
    with pytest.raises(ValueError, match="sinks must be a floating-point tensor of shape"):
        paged.run(q, cache, sinks=SINKS)
    paged.plan(qo_indptr, indptr, indices, last, 4, 2, 16, 4, causal=True, pos_encoding_mode="ALIBI")
    with pytest.raises(ValueError, match="sinks with pos_encoding_mode='ALIBI'"):
        paged.run(q, cache, sinks=SINKS[:4])
    with pytest.raises(ValueError, match="window_right must be -1"):
        flashinfer.BatchDecodeWithPagedKVCacheWrapper(None).plan(indptr, indices, last, 4, 2, 16, 4, window_right=-2)
    ragged = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(None)
    with pytest.raises(ValueError, match="custom_mask must hold"):
        ragged.plan(qo_indptr, torch.tensor([0, 12, 42]), 4, 2, 16, custom_mask=torch.ones(10, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"packed_custom_mask must hold 12 bytes \(each request's"):
        ragged.plan(qo_indptr, torch.tensor([0, 12, 42]), 4, 2, 16,
                    packed_custom_mask=torch.ones(11, dtype=torch.uint8))
    with pytest.raises(ValueError, match="qo_indptr must start at 0"):
        ragged.plan(torch.tensor([1, 5]), torch.tensor([0, 5]), 4, 2, 16)


def test_alibi_slopes_are_flashinfers():
    """2^(-8 (h + 1) / n) for the n = 2^floor(log2 heads) first heads, 2^(-4 (2 j + 1) / n) after."""
    powers = 2.0 ** -torch.arange(1.0, 9.0)
    assert torch.equal(flashinfer.get_alibi_slopes(8), powers)
    torch.testing.assert_close(flashinfer.get_alibi_slopes(12),
                               torch.cat([powers, 2.0 ** -(torch.arange(4.0) + 0.5)]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_single_calls_copy_nothing_from_the_host(impl, monkeypatch):
    """The single_* calls plan on every call: their plan's tensors (sequence bounds, RoPE tables and
    rows, ALiBi slopes and lse shifts) are made by device ops, none passed through to_device (the
    batch plans' copy from pinned host memory, which a CUDA graph could not capture: the pinned
    source would be reused after it)."""
    skip_unless_supported(impl, "cpu")
    copied = []
    monkeypatch.setattr(flashinfer_common, "to_device", lambda t, *args: copied.append(t.shape) or t)
    q, k, v = _inputs(5, 12)
    for options in (dict(causal=True, pos_encoding_mode="ROPE_LLAMA"), dict(pos_encoding_mode="ALIBI", causal=True)):
        _check(flashinfer.single_prefill_with_kv_cache(q, k, v, return_lse=True, impl=impl, **options), q, k, v,
               **options)
    got = flashinfer.single_decode_with_kv_cache(q[-1], k, v, pos_encoding_mode="ALIBI", return_lse=True, impl=impl)
    _check((got[0][None], got[1][None]), q[-1:], k, v, causal=True, pos_encoding_mode="ALIBI")
    assert copied == []


@pytest.mark.cuda
@pytest.mark.parametrize("impl", fused_impls())
def test_single_decode_is_captured_in_a_cuda_graph(impl):
    """single_decode_with_kv_cache (RoPE) captured in a CUDA graph: each replay reads q as it is then."""
    skip_unless_supported(impl, "cuda")
    q, k, v = (t.cuda().half() for t in _inputs(1, 40))
    query = q[0].clone()

    def decode():
        return flashinfer.single_decode_with_kv_cache(query, k, v, pos_encoding_mode="ROPE_LLAMA", impl=impl)

    graph, result = capture_cuda_graph(decode)
    for seed in range(2):
        query.copy_(torch.randn(query.shape, generator=torch.Generator().manual_seed(seed)).half().cuda())
        graph.replay()
        torch.testing.assert_close(result, decode(), atol=0, rtol=0)


def _graph_wrapper(kind, batch, pool_pages, impl, device="cpu", **options):
    """A paged wrapper with use_cuda_graph=True and FlashInfer's buffers for `batch` requests."""
    buffers = [torch.full((n,), -1, dtype=torch.int32, device=device) for n in (batch + 1, pool_pages, batch)]
    if kind == "decode":
        names = ("paged_kv_indptr_buffer", "paged_kv_indices_buffer", "paged_kv_last_page_len_buffer")
        cls = flashinfer.BatchDecodeWithPagedKVCacheWrapper
    else:
        buffers.insert(0, torch.full((batch + 1,), -1, dtype=torch.int32, device=device))
        names = ("qo_indptr_buf", "paged_kv_indptr_buf", "paged_kv_indices_buf", "paged_kv_last_page_len_buf")
        cls = flashinfer.BatchPrefillWithPagedKVCacheWrapper
    workspace = torch.empty(8, dtype=torch.uint8, device=device)
    return cls(workspace, use_cuda_graph=True, impl=impl, **dict(zip(names, buffers)), **options), buffers


GRAPH_BATCHES = {"decode": ([(1, 40), (1, 1), (1, 16)], [(1, 7), (1, 64), (1, 30)]),
                 "prefill": ([(2, 12), (3, 5), (1, 30)], [(2, 20), (3, 3), (1, 9)])}


@pytest.mark.parametrize("kind", ["decode", "prefill"])
@pytest.mark.parametrize("impl", IMPLS)
def test_cuda_graph_wrappers_run_every_plan_on_the_same_tensors(impl, kind, monkeypatch):
    """use_cuda_graph=True: plans of other key counts and pages (the batch and query counts fixed)
    give FlashInfer's results, and every run passes attention_varlen the same tensors (held at fixed
    addresses, as a captured run reads them at replay) and the same bounds; the constructor's
    buffers get each plan's index arrays, as FlashInfer's do."""
    skip_unless_supported(impl, "cpu")
    calls = []

    def recorded(*args, **kwargs):
        calls.append((args[3:7], kwargs["block_table"]))
        return attention_varlen(*args, **kwargs)

    attention_varlen = flashinfer_common.attention_varlen
    monkeypatch.setattr(flashinfer_common, "attention_varlen", recorded)
    wrapper, buffers = _graph_wrapper(kind, 3, 12, impl)
    assert wrapper.is_cuda_graph_enabled
    options = dict(pos_encoding_mode="ALIBI", causal=True) if kind == "prefill" else dict(logits_soft_cap=5.0)
    for seed, requests in enumerate(GRAPH_BATCHES[kind]):
        q, k, v, cache, indptr, indices, last = _paged(requests, 16, heads=8, seed=seed)
        qo_indptr = torch.tensor([0] + [n for n, _ in requests]).cumsum(0).int()
        if kind == "decode":
            wrapper.plan(indptr, indices, last, 8, 2, 16, 16, **options)
        else:
            wrapper.plan(qo_indptr, indptr, indices, last, 8, 2, 16, 16, **options)
        _check_requests(wrapper.run(q, cache, return_lse=True), q, k, v, requests, **dict(options, causal=True))
        for buffer, value in zip(buffers, ([qo_indptr] if kind == "prefill" else []) + [indptr, indices, last]):
            assert torch.equal(buffer[:value.numel()], value)
    (bounds, table), (bounds_after, table_after) = calls
    assert table is table_after and table.shape == (3, 12)
    assert bounds[0] is bounds_after[0] and bounds[1] is bounds_after[1], "cu_seqlens moved"
    assert bounds[2:] == bounds_after[2:] == (max(n for n, _ in GRAPH_BATCHES[kind][0]), 12 * 16)


def test_cuda_graph_wrappers_name_what_a_plan_must_keep():
    requests = [(1, 40), (1, 1)]
    q, k, v, cache, indptr, indices, last = _paged(requests, 16, heads=8)
    decode, _ = _graph_wrapper("decode", 2, 4, "reference", max_pages_per_request=2)
    with pytest.raises(ValueError, match="max_pages_per_request \\(2\\)"):
        decode.plan(indptr, indices, last, 8, 2, 16, 16)
    decode, _ = _graph_wrapper("decode", 2, 4, "reference")
    with pytest.raises(ValueError, match="batch size is fixed at 2"):
        decode.plan(indptr[:2], indices[:3], last[:1], 8, 2, 16, 16)
    decode.plan(indptr, indices, last, 8, 2, 16, 16)
    with pytest.raises(ValueError, match="keeps the first plan's"):
        decode.plan(indptr, indices, last, 8, 2, 16, 16, window_left=3)
    with pytest.raises(ValueError, match="pos_encoding_mode='ROPE_LLAMA' gathers each plan's keys"):
        decode.plan(indptr, indices, last, 8, 2, 16, 16, pos_encoding_mode="ROPE_LLAMA")
    with pytest.raises(RuntimeError, match="before plan"):  # a plan that failed leaves none
        decode.run(q, cache)
    decode.plan(indptr, indices, last, 8, 2, 16, 16)
    with pytest.raises(ValueError, match="q must be on the planned device"):
        decode.run(q.to("meta"), cache)
    prefill, _ = _graph_wrapper("prefill", 2, 4, "reference")
    with pytest.raises(ValueError, match="run one request at a time"):
        prefill.plan(torch.tensor([0, 1, 2], dtype=torch.int32), indptr, indices, last, 8, 2, 16, 16,
                     custom_mask=torch.ones(41, dtype=torch.bool))
    small, _ = _graph_wrapper("decode", 2, 3, "reference")
    with pytest.raises(ValueError, match="4 pages, more than paged_kv_indices_buffer \\(3\\)"):
        small.plan(indptr, indices, last, 8, 2, 16, 16)
    for call, match in [
            (lambda: flashinfer.BatchDecodeWithPagedKVCacheWrapper(None, use_cuda_graph=True),
             "needs paged_kv_indptr_buffer, a 1-d int32 tensor"),
            (lambda: flashinfer.BatchPrefillWithPagedKVCacheWrapper(
                None, use_cuda_graph=True, qo_indptr_buf=torch.zeros(2, dtype=torch.int32),
                paged_kv_indptr_buf=torch.zeros(3, dtype=torch.int32), paged_kv_indices_buf=torch.zeros(
                    4, dtype=torch.int32), paged_kv_last_page_len_buf=torch.zeros(2, dtype=torch.int32)),
             "qo_indptr_buf must hold batch_size \\+ 1 = 3"),
            (lambda: flashinfer.BatchPrefillWithRaggedKVCacheWrapper(None, use_cuda_graph=True),
             "use_cuda_graph=True on BatchPrefillWithRaggedKVCacheWrapper"),
            (lambda: _graph_wrapper("decode", 64, 1 << 15, "reference"), "needs max_pages_per_request"),
            (lambda: _graph_wrapper("decode", 2, 4, "reference", max_pages_per_request=0),
             "max_pages_per_request must be at least 1")]:
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.cuda
@pytest.mark.parametrize("impl", fused_impls())
def test_cuda_graph_decode_replays_each_plan(impl):
    """A decode run captured once, then re-planned with other key counts and pages and replayed:
    each replay equals the run of a wrapper alike, not captured (the same key bound: the same
    splits), bit for bit; that run's values are test_cuda_graph_wrappers_run_every_plan_on_the_same_tensors's."""
    skip_unless_supported(impl, "cuda")
    wrapper, _ = _graph_wrapper("decode", 3, 12, impl, device="cuda")
    eager, _ = _graph_wrapper("decode", 3, 12, impl, device="cuda")
    first, later = GRAPH_BATCHES["decode"]
    pool = tuple(torch.zeros(16, 16, 2, 16, dtype=torch.half, device="cuda") for _ in range(2))
    query = torch.zeros(3, 8, 16, dtype=torch.half, device="cuda")
    for seed, requests in enumerate([first, later, first]):
        q, _, _, cache, indptr, indices, last = _paged(requests, 16, heads=8, seed=seed + 3)
        query.copy_(q)
        for held, pages in zip(pool, cache):
            held[:pages.shape[0]].copy_(pages.nan_to_num(0))
        if seed == 0:
            wrapper.plan(indptr, indices.cuda(), last, 8, 2, 16, 16)
            graph, result = capture_cuda_graph(lambda: wrapper.run(query, pool))
            continue
        for w in (wrapper, eager):
            w.plan(indptr, indices.cuda(), last, 8, 2, 16, 16)
        graph.replay()
        torch.testing.assert_close(result, eager.run(query, pool), atol=0, rtol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", fused_impls())
def test_runs_on_the_gpu_without_synchronising(impl):
    """float16 on a GPU, FlashInfer's definition to float16's accuracy; the single calls and the
    wrappers' run() launch without synchronising (plan() reads its index arrays on the host)."""
    skip_unless_supported(impl, "cuda")
    requests = [(5, 12), (9, 9), (1, 30)]
    q, k, v, cache, indptr, indices, last = _paged(requests, 4)
    _, _, _, qo_indptr, kv_indptr = _packed(requests, seed=2)
    half = [t.cuda().half() for t in (q, k, v)]
    paged_cache = tuple(t.nan_to_num(0).cuda().half() for t in cache)
    workspace = torch.empty(8, dtype=torch.uint8, device="cuda")
    ragged = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace, impl=impl)
    ragged.plan(qo_indptr, kv_indptr, 4, 2, 16, causal=True, pos_encoding_mode="ALIBI")
    paged = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, impl=impl)
    paged.plan(qo_indptr, indptr, indices.cuda(), last, 4, 2, 16, 4, causal=True, window_left=6)
    decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, impl=impl)
    decode.plan(indptr, indices.cuda(), last, 4, 2, 16, 4, logits_soft_cap=5.0)
    decoded = half[0][qo_indptr[1:].long().cuda() - 1]  # each request's last query, for the decode wrapper
    torch.cuda.set_sync_debug_mode("error")
    try:
        single = flashinfer.single_prefill_with_kv_cache(half[0][:5], half[1][:12], half[2][:12], causal=True,
                                                         pos_encoding_mode="ROPE_LLAMA", return_lse=True, impl=impl)
        results = [ragged.run(*half, return_lse=True), paged.run(half[0], paged_cache, return_lse=True),
                   decode.run(decoded, paged_cache, return_lse=True)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = _flashinfer(q[:5], k[:12], v[:12], causal=True, pos_encoding_mode="ROPE_LLAMA")
    for got, want in zip(single, expected):
        torch.testing.assert_close(got.double().cpu(), want, atol=2e-2, rtol=2e-2)
    at_q = at_k = 0
    for n, (qo_len, kv_len) in enumerate(requests):
        rows, keys = slice(at_q, at_q + qo_len), slice(at_k, at_k + kv_len)
        for got, options, queries in ((results[0], dict(causal=True, pos_encoding_mode="ALIBI"), rows),
                                      (results[1], dict(causal=True, window_left=6), rows),
                                      (results[2], dict(causal=True, logits_soft_cap=5.0), slice(n, n + 1))):
            query = q[rows] if queries is rows else q[rows][-1:]
            want = _flashinfer(query, k[keys], v[keys], **options)
            for a, e in zip(got, want):
                torch.testing.assert_close(a[queries].double().cpu(), e, atol=2e-2, rtol=2e-2)
        at_q, at_k = at_q + qo_len, at_k + kv_len


def test_plan_checks_and_names_the_argument():
    """A request without pages must have no keys in its last page; a failed plan leaves none to run;
    the single calls name FlashInfer's own scale arguments."""
    requests = [(5, 12), (1, 30)]
    q, k, v, cache, indptr, indices, last = _paged(requests, 4)
    decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(None)
    with pytest.raises(ValueError, match="last_page_len must lie in 1 .. page_size .* be 0 for those without"):
        decode.plan(torch.tensor([0, 3, 3]), indices, torch.tensor([4, 2]), 4, 2, 16, 4)
    decode.plan(indptr, indices, last, 4, 2, 16, 4)
    with pytest.raises(ValueError, match="pos_encoding_mode"):
        decode.plan(indptr, indices, last, 4, 2, 16, 4, pos_encoding_mode="rope")
    with pytest.raises(RuntimeError, match="before plan"):
        decode.run(q[:2], cache)
    with pytest.raises(ValueError, match="scale_q"):
        flashinfer.single_prefill_with_kv_cache(q[:5], k[:12], v[:12], scale_q=torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="o_dtype"):
        flashinfer.single_prefill_with_kv_cache(q[:5], k[:12], v[:12], o_dtype="half-ish")
