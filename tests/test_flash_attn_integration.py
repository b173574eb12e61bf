"""genfast.integrations.flash_attn, FlashAttention 2's functions on genfast's kernels, against the
references: flash_attn_func and its packed forms (outputs, softmax_lse and gradients by the
error-ratio rule, every option), flash_attn_varlen_func, and flash_attn_with_kvcache (the caches
written in place, rotary embedding, padded, paged and cache_batch_idx caches, cache_leftpad),
decoding token by token equal to attention over the whole sequence, torch.compile, and bad input."""

import pytest
import torch

import genfast
from genfast.integrations import flash_attn as fa
from genfast.random import next_philox_key
from genfast.reference.attention import attention, varlen_attention
from genfast.reference.attention_kvcache import kvcache_attention
from genfast.testing.tolerances import assert_error_ratio
from conftest import fused_impls, skip_unless_supported

BATCH, HEADS, KV_HEADS, DIM = 3, 4, 2, 16


def _dense(lq, lk, dtype=torch.float32, v_dim=DIM, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(BATCH, lq, HEADS, DIM, generator=g).to(dtype),
            torch.randn(BATCH, lk, KV_HEADS, DIM, generator=g).to(dtype),
            torch.randn(BATCH, lk, KV_HEADS, v_dim, generator=g).to(dtype))


def _reference_dense(q, k, v, causal=False, window_size=(-1, -1), softcap=0.0, softmax_scale=None, **options):
    o, lse = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True,
                       causal="bottom_right" if causal else None,
                       window=None if tuple(window_size) == (-1, -1) else window_size, softcap=softcap or None,
                       scale=softmax_scale, return_lse=True, **options)
    return o.transpose(1, 2), lse


def _dense_run(fn, q, k, v, dtype, options):
    """out, softmax_lse and the gradients of q, k, v for fixed upstream gradients."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    opts = {key: (val.to(dtype) if key == "alibi_slopes" and dtype == torch.float64 else val)
            for key, val in options.items()}
    o, lse = fn(*leaves, **opts)[:2]
    g = torch.Generator().manual_seed(9)
    grad_o = torch.randn(o.shape, generator=g, dtype=torch.float64)
    grad_lse = torch.randn(lse.shape, generator=g, dtype=torch.float64)
    loss = (o.double() * grad_o).sum() + (torch.where(lse.isfinite(), lse, 0).double() * grad_lse).sum()
    return (o, lse, *torch.autograd.grad(loss, leaves))


DENSE_OPTIONS = [dict(), dict(causal=True), dict(causal=True, window_size=(5, -1)), dict(window_size=(3, 2)),
                 dict(softcap=3.0, softmax_scale=0.3), dict(alibi_slopes=torch.tensor([0.5, 0.25, 0.1, 0.05])),
                 dict(alibi_slopes=torch.rand(BATCH, HEADS, generator=torch.Generator().manual_seed(1)), causal=True)]


@pytest.mark.parametrize("lengths", [(17, 17), (7, 30), (30, 7)], ids=str)
@pytest.mark.parametrize("options", DENSE_OPTIONS, ids=str)
@pytest.mark.parametrize("impl", fused_impls())
def test_flash_attn_func_matches_reference(lengths, options, impl):
    """FlashAttention's layout and bottom-right alignment (also with more queries than keys, whose
    first rows see no key: zeros and lse -inf)."""
    skip_unless_supported(impl, "cpu")
    q, k, v = _dense(*lengths)
    got = _dense_run(lambda *t, **o: fa.flash_attn_func(*t, return_attn_probs=True, impl=impl, **o),
                     q, k, v, torch.float32, options)
    exact = _dense_run(_reference_dense, q, k, v, torch.float64, options)
    low = _dense_run(_reference_dense, q, k, v, torch.float32, options)
    assert got[0].shape == (BATCH, lengths[0], HEADS, DIM) and got[0].is_contiguous()
    assert got[1].shape == (BATCH, HEADS, lengths[0]) and got[1].dtype == torch.float32 and got[1].is_contiguous()
    for name, a, e, lo in zip(("out", "softmax_lse", "grad q", "grad k", "grad v"), got, exact, low):
        assert_error_ratio(a, e, lo.to(a.dtype), ratio=2.0 if name in ("out", "softmax_lse") else 3.0, msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", fused_impls())
def test_flash_attn_func_in_half_precision(dtype, impl):
    skip_unless_supported(impl, "cpu", dtype)
    q, k, v = _dense(33, 40, dtype, v_dim=24)
    got = fa.flash_attn_func(q, k, v, causal=True, impl=impl)
    exact = _reference_dense(q.double(), k.double(), v.double(), causal=True)[0]
    low = _reference_dense(q, k, v, causal=True)[0]
    assert got.dtype == dtype and got.shape == (BATCH, 33, HEADS, 24)
    assert_error_ratio(got, exact, low, msg="out")


@pytest.mark.parametrize("impl", fused_impls())
def test_packed_forms_equal_flash_attn_func(impl):
    """qkv (B, L, 3, H, D) and kv (B, L, 2, Hk, D), gradients included."""
    skip_unless_supported(impl, "cpu")
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(2, 20, 3, HEADS, DIM, generator=g, requires_grad=True)
    q = torch.randn(2, 9, HEADS, DIM, generator=g, requires_grad=True)
    kv = torch.randn(2, 20, 2, KV_HEADS, DIM, generator=g, requires_grad=True)
    for packed, unpacked, leaves in (
            (lambda: fa.flash_attn_qkvpacked_func(qkv, causal=True, impl=impl),
             lambda: fa.flash_attn_func(*qkv.unbind(2), causal=True, impl=impl), [qkv]),
            (lambda: fa.flash_attn_kvpacked_func(q, kv, softcap=2.0, impl=impl),
             lambda: fa.flash_attn_func(q, *kv.unbind(2), softcap=2.0, impl=impl), [q, kv])):
        got, expected = packed(), unpacked()
        assert torch.equal(got, expected)
        for a, e in zip(torch.autograd.grad(got.sum(), leaves), torch.autograd.grad(expected.sum(), leaves)):
            assert torch.equal(a, e)
    cu = torch.tensor([0, 7, 20, 40], dtype=torch.int32)
    flat = qkv.detach().flatten(0, 1)
    assert torch.equal(fa.flash_attn_varlen_qkvpacked_func(flat, cu, 20, causal=True, impl=impl),
                       fa.flash_attn_varlen_func(*flat.unbind(1), cu, cu, 20, 20, causal=True, impl=impl))
    flat_kv, flat_q = kv.detach().flatten(0, 1), q.detach().flatten(0, 1)
    cu_q = torch.tensor([0, 1, 10, 18], dtype=torch.int32)
    assert torch.equal(fa.flash_attn_varlen_kvpacked_func(flat_q, flat_kv, cu_q, cu, 9, 20, impl=impl),
                       fa.flash_attn_varlen_func(flat_q, *flat_kv.unbind(1), cu_q, cu, 9, 20, impl=impl))


@pytest.mark.parametrize("impl", fused_impls())
def test_dropout_draws_from_torchs_default_generator(impl):
    """After torch.manual_seed, the mask is the Philox stream's under the key the default
    generator gives, as reference.varlen_attention indexes it; the same seed repeats it."""
    skip_unless_supported(impl, "cpu")
    q, k, v = _dense(12, 12)
    torch.manual_seed(5)
    got = fa.flash_attn_func(q, k, v, dropout_p=0.3, causal=True, impl=impl)
    torch.manual_seed(5)
    again = fa.flash_attn_func(q, k, v, dropout_p=0.3, causal=True, impl=impl)
    torch.manual_seed(5)
    seed, offset = next_philox_key(None, q.device)
    cu = torch.arange(BATCH + 1, dtype=torch.int32) * 12
    exact, low = (varlen_attention(*(t.to(dtype).flatten(0, 1) for t in (q, k, v)), cu, cu, dropout_p=0.3,
                                   dropout_seed=seed, dropout_offset=offset, enable_gqa=True, causal="bottom_right")
                  for dtype in (torch.float64, torch.float32))
    assert torch.equal(got, again)
    assert_error_ratio(got.flatten(0, 1), exact, low, msg="out")
    with pytest.raises(NotImplementedError, match="return_attn_probs"):
        fa.flash_attn_func(q, k, v, dropout_p=0.3, return_attn_probs=True, impl=impl)


@pytest.mark.parametrize("options", [dict(causal=True), dict(window_size=(6, 0), softcap=2.0)], ids=str)
@pytest.mark.parametrize("impl", fused_impls())
def test_flash_attn_varlen_func_matches_reference(options, impl):
    skip_unless_supported(impl, "cpu")
    g = torch.Generator().manual_seed(6)
    lengths_q, lengths_k = [5, 1, 0, 17], [9, 30, 4, 17]
    q = torch.randn(sum(lengths_q), HEADS, DIM, generator=g)
    k, v = (torch.randn(sum(lengths_k), KV_HEADS, DIM, generator=g) for _ in range(2))
    cu_q, cu_k = (torch.tensor([0] + n).cumsum(0).to(torch.int32) for n in (lengths_q, lengths_k))
    o, lse, probs = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 17, 30, return_attn_probs=True, impl=impl,
                                              **options)
    window = options.get("window_size")
    reference_options = dict(enable_gqa=True, causal="bottom_right" if options.get("causal") else None,
                             window=window, softcap=options.get("softcap"), return_lse=True)
    exact, low = (varlen_attention(q.double(), k.double(), v.double(), cu_q, cu_k, **reference_options),
                  varlen_attention(q, k, v, cu_q, cu_k, **reference_options))
    assert probs.numel() == 0
    assert_error_ratio(o, exact[0], low[0], msg="out")
    assert_error_ratio(lse, exact[1], low[1], msg="softmax_lse")


# flash_attn_with_kvcache

CAPACITY = 24


def _kvcache_inputs(layout, lq, new, dtype=torch.float32, v_dim=DIM, seed=0):
    """q, k_cache, v_cache (garbage past each sequence's keys), k, v and the cache options: cache_seqlens
    [6, 0, 13], and for "paged" pages of 4 keys in a scrambled order, for "cache_batch_idx" a cache of
    4 rows read in another order, for "leftpad" keys from rows [2, 0, 13] of each sequence's row,
    for "sliced" the first rows of longer ones."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, lq, HEADS, DIM, generator=g).to(dtype)
    k = torch.randn(BATCH, new, KV_HEADS, DIM, generator=g).to(dtype) if new else None
    v = torch.randn(BATCH, new, KV_HEADS, v_dim, generator=g).to(dtype) if new else None
    rows = {"paged": (CAPACITY // 4 * BATCH + 2, 4), "sliced": (BATCH, CAPACITY + 5)}.get(
        layout, (BATCH + 1, CAPACITY) if "cache_batch_idx" in layout else (BATCH, CAPACITY))
    k_cache = torch.randn(*rows, KV_HEADS, DIM, generator=g).to(dtype)
    v_cache = torch.randn(*rows, KV_HEADS, v_dim, generator=g).to(dtype)
    if layout == "sliced":  # rows of a longer cache: they do not flatten without a copy
        k_cache, v_cache = k_cache[:, :CAPACITY], v_cache[:, :CAPACITY]
    options = dict(cache_seqlens=torch.tensor([6, 0, 13], dtype=torch.int32))
    if layout == "paged":
        options["block_table"] = torch.randperm(rows[0], generator=g)[:BATCH * CAPACITY // 4].view(
            BATCH, CAPACITY // 4).to(torch.int32)
    if "cache_batch_idx" in layout:
        options["cache_batch_idx"] = torch.tensor([3, 0, 2], dtype=torch.int32)
    if "leftpad" in layout:
        options["cache_leftpad"] = torch.tensor([2, 0, 13], dtype=torch.int32)
    return q, k_cache, v_cache, k, v, options


def _rotary_tables(rotary_dim, dtype=torch.float32):
    angles = torch.arange(CAPACITY, dtype=torch.float64)[:, None] * 0.7 ** torch.arange(rotary_dim // 2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _copy(cache):
    """A copy with the cache's strides (a slice of longer rows stays one)."""
    return torch.empty_strided(cache.shape, cache.stride(), dtype=cache.dtype).copy_(cache)


def _reference_options(options: dict) -> dict:
    """flash_attn_with_kvcache's keywords as kvcache_attention's."""
    names = dict(softmax_scale="scale", window_size="window")
    return {names.get(key, key): (val or None if key == "softcap" else val) for key, val in options.items()}


def _kvcache_compare(impl, layout, lq, new, options, dtype=torch.float32):
    """Runs the call on copies of the caches for genfast, the float64 reference and the reference
    in dtype: out, softmax_lse and the caches written by the error-ratio rule."""
    q, k_cache, v_cache, k, v, cache_options = _kvcache_inputs(layout, lq, new, dtype)
    options = {**cache_options, **options}
    caches = [(_copy(k_cache), _copy(v_cache)) for _ in range(3)]
    o, lse = fa.flash_attn_with_kvcache(q, *caches[0], k, v, return_softmax_lse=True, impl=impl, **options)
    reference = _reference_options(options)
    wide = {key: (val.double() if key in ("rotary_cos", "rotary_sin") else val) for key, val in reference.items()}
    exact = kvcache_attention(*(t.double() for t in (q, *caches[1], k, v)), return_lse=True, **wide)
    low = kvcache_attention(q, *caches[2], k, v, return_lse=True, **reference)
    assert o.shape == (BATCH, lq, HEADS, DIM) and lse.shape == (BATCH, HEADS, lq) and lse.is_contiguous()
    assert_error_ratio(o, exact[0], low[0], msg="out")
    assert_error_ratio(lse, exact[1], low[1], msg="softmax_lse")
    for name, a, e, lo in zip(("k_cache", "v_cache"), caches[0], caches[1], caches[2]):
        assert_error_ratio(a, e, lo, msg=name)


KVCACHE_OPTIONS = [dict(causal=True), dict(), dict(causal=True, window_size=(4, -1)), dict(window_size=(3, 1)),
                   dict(softcap=2.0, softmax_scale=0.3, causal=True),
                   dict(alibi_slopes=torch.tensor([0.5, 0.25, 0.1, 0.05]), causal=True)]


@pytest.mark.parametrize("layout", ["padded", "sliced", "paged", "cache_batch_idx", "leftpad",
                                    "leftpad+cache_batch_idx"])
@pytest.mark.parametrize("options", KVCACHE_OPTIONS, ids=str)
@pytest.mark.parametrize("impl", fused_impls())
def test_with_kvcache_appends_and_attends(layout, options, impl):
    """Two queries and two new keys per sequence, every cache layout."""
    skip_unless_supported(impl, "cpu")
    _kvcache_compare(impl, layout, 2, 2, dict(options))


@pytest.mark.parametrize("layout", ["padded", "sliced", "paged", "cache_batch_idx"])
def test_the_cache_is_read_in_place(layout, monkeypatch):
    """Attention reads the caches' own memory (no copy of the cache a step), whatever the layout;
    a padded cache sliced from longer rows, which does not flatten, as pages of a row each."""
    q, k_cache, v_cache, k, v, options = _kvcache_inputs(layout, 1, 1)
    seen = []
    real = fa.attention_varlen

    def attention_varlen(q, keys, values, *args, **kwargs):
        seen.append((keys.untyped_storage().data_ptr(), values.untyped_storage().data_ptr(), kwargs))
        return real(q, keys, values, *args, **kwargs)

    monkeypatch.setattr(fa, "attention_varlen", attention_varlen)
    fa.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, causal=True, **options)
    (keys, values, kwargs), = seen
    assert (keys, values) == (k_cache.untyped_storage().data_ptr(), v_cache.untyped_storage().data_ptr())
    assert (kwargs.get("block_table") is not None) == (layout != "padded")


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("layout", ["padded", "paged"])
@pytest.mark.parametrize("impl", fused_impls())
def test_with_kvcache_rotary(interleaved, causal, layout, impl):
    """Rotary tables of rotary_dim 8 < head_dim: the keys written rotated, the queries rotated at
    cache_seqlens + i when causal, else all at cache_seqlens."""
    skip_unless_supported(impl, "cpu")
    cos, sin = _rotary_tables(8)
    _kvcache_compare(impl, layout, 3, 3, dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved,
                                               causal=causal))


@pytest.mark.parametrize("layout", ["padded", "paged", "cache_batch_idx"])
@pytest.mark.parametrize("impl", fused_impls())
def test_with_kvcache_reads_without_appending(layout, impl):
    """No new keys: a decoding query over the keys held; cache_seqlens an int, then None (the
    whole cache); the caches are left as they were."""
    skip_unless_supported(impl, "cpu")
    q, k_cache, v_cache, _, _, options = _kvcache_inputs(layout, 1, 0)
    before = k_cache.clone(), v_cache.clone()
    for held in (options.pop("cache_seqlens"), 5, None):
        o = fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=held, causal=True, impl=impl, **options)
        exact, low = (kvcache_attention(q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), causal=True,
                                        cache_seqlens=torch.full((BATCH,), CAPACITY) if held is None
                                        else torch.full((BATCH,), held) if isinstance(held, int) else held,
                                        **options) for dtype in (torch.float64, torch.float32))
        assert_error_ratio(o, exact, low, msg=f"out, cache_seqlens {held}")
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", fused_impls())
def test_with_kvcache_in_half_precision(dtype, impl):
    skip_unless_supported(impl, "cpu", dtype)
    cos, sin = _rotary_tables(16, dtype)
    _kvcache_compare(impl, "paged", 1, 1, dict(rotary_cos=cos, rotary_sin=sin, causal=True), dtype)


@pytest.mark.parametrize("layout", ["padded", "paged"])
@pytest.mark.parametrize("impl", fused_impls())
def test_decoding_token_by_token_equals_flash_attn_func(layout, impl):
    """A prompt of 6 appended at once, then 5 tokens one at a time, rotary embedding: each step's
    out equals flash_attn_func's rows over the whole rotated sequence."""
    skip_unless_supported(impl, "cpu")
    g = torch.Generator().manual_seed(8)
    length = 11
    q = torch.randn(BATCH, length, HEADS, DIM, generator=g)
    k, v = (torch.randn(BATCH, length, KV_HEADS, DIM, generator=g) for _ in range(2))
    cos, sin = _rotary_tables(DIM)
    positions = torch.arange(length).repeat(BATCH, 1)
    whole = fa.flash_attn_func(genfast.reference.rotary.rotary(q, cos, sin, positions),
                               genfast.reference.rotary.rotary(k, cos, sin, positions), v, causal=True, impl=impl)
    if layout == "paged":
        k_cache, v_cache = (torch.zeros(BATCH * 4, 4, KV_HEADS, DIM) for _ in range(2))
        options = dict(block_table=torch.randperm(BATCH * 4, generator=g).view(BATCH, 4).to(torch.int32))
    else:
        k_cache, v_cache = (torch.zeros(BATCH, 16, KV_HEADS, DIM) for _ in range(2))
        options = {}
    held = torch.zeros(BATCH, dtype=torch.int32)
    start = 0
    for step in (6, 1, 1, 1, 1, 1):
        rows = slice(start, start + step)
        o = fa.flash_attn_with_kvcache(q[:, rows], k_cache, v_cache, k[:, rows], v[:, rows], cos, sin, held,
                                       causal=True, rotary_interleaved=True, impl=impl, **options)
        torch.testing.assert_close(o, whole[:, rows], atol=1e-5, rtol=1e-5)
        held += step
        start += step


@pytest.mark.parametrize("impl", fused_impls())
def test_empty_batch_and_empty_queries(impl):
    skip_unless_supported(impl, "cpu")
    q, k, v = _dense(0, 5)
    assert fa.flash_attn_func(q, k, v, causal=True, impl=impl).shape == (BATCH, 0, HEADS, DIM)
    q, k_cache, v_cache, k, v, options = _kvcache_inputs("padded", 1, 1)
    o = fa.flash_attn_with_kvcache(q[:0], k_cache[:0], v_cache[:0], k[:0], v[:0], cache_seqlens=0, impl=impl)
    assert o.shape == (0, 1, HEADS, DIM)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["padded", "paged"])
def test_decoding_steps_replay_in_a_cuda_graph(layout):
    """A decoding step (kvcache_append with rotary, then attention) captured once and replayed with
    new tokens and cache_seqlens advanced in place, as a graphed decoding loop runs it: each replay
    gives the eager step's out and caches, bfloat16, grouped-query heads."""
    g = torch.Generator().manual_seed(12)
    batch, heads, kv_heads, dim, capacity = 2, 8, 2, 128, 64
    cuda = dict(device="cuda", dtype=torch.bfloat16)
    if layout == "paged":
        shape = (batch * capacity // 16, 16, kv_heads, dim)
        options = dict(block_table=torch.randperm(shape[0], generator=g).view(batch, -1).int().cuda())
    else:
        shape, options = (batch, capacity, kv_heads, dim), {}
    caches = [torch.randn(shape, generator=g).to(**cuda) for _ in range(2)]
    eager_caches = [t.clone() for t in caches]
    angles = torch.arange(capacity, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, dim, 2) / dim)
    cos, sin = angles.cos().to(**cuda), angles.sin().to(**cuda)
    held = torch.tensor([7, 30], dtype=torch.int32, device="cuda")
    q = torch.empty(batch, 1, heads, dim, **cuda)
    k, v = (torch.empty(batch, 1, kv_heads, dim, **cuda) for _ in range(2))

    def step(k_cache, v_cache, seqlens):
        return fa.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cos, sin, seqlens, causal=True,
                                          rotary_interleaved=False, **options)

    for t in (q, k, v):
        t.copy_(torch.randn(t.shape, generator=g))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: Triton compiles, the caches take the warm-up's token
        step(*[t.clone() for t in caches], held)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(*caches, held)
    for _ in range(3):
        for t in (q, k, v):
            t.copy_(torch.randn(t.shape, generator=g))
        graph.replay()
        expected = step(*eager_caches, held.clone())
        torch.cuda.synchronize()
        torch.testing.assert_close(captured, expected)
        assert torch.equal(caches[0], eager_caches[0]) and torch.equal(caches[1], eager_caches[1])
        held += 1


def test_compiles_with_fullgraph():
    """flash_attn_func's value and gradients, and a decoding step that writes the cache, under
    torch.compile(fullgraph=True)."""
    from conftest import assert_compiles_like_eager

    q, k, v = (t.requires_grad_() for t in _dense(9, 9))
    assert_compiles_like_eager(lambda q, k, v: fa.flash_attn_func(q, k, v, causal=True), [q, k, v])
    q, k_cache, v_cache, k, v, options = _kvcache_inputs("padded", 1, 1)
    cos, sin = _rotary_tables(8)
    caches = [(k_cache.clone(), v_cache.clone()) for _ in range(2)]

    def step(q, k_cache, v_cache, k, v):
        return fa.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cos, sin, causal=True, **options)

    expected = step(q, *caches[0], k, v)
    got = torch.compile(step, fullgraph=True)(q, *caches[1], k, v)
    torch.testing.assert_close(got, expected)
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])


def test_bad_input_names_the_argument():
    q, k_cache, v_cache, k, v, options = _kvcache_inputs("padded", 1, 1)
    held = options["cache_seqlens"]
    cos, sin = _rotary_tables(8)
    for call, error, match in (
            (lambda: fa.flash_attn_func(q[0], k, v), ValueError, "q must be a tensor"),
            (lambda: fa.flash_attn_with_kvcache(q, k_cache, v_cache, k, None, cache_seqlens=held), ValueError,
             "k and v go together"),
            (lambda: fa.flash_attn_with_kvcache(q, k_cache, v_cache, cos, sin, cache_seqlens=held), ValueError,
             "k must be"),
            (lambda: fa.flash_attn_with_kvcache(q, k_cache, v_cache, rotary_cos=cos, rotary_sin=sin,
                                                cache_seqlens=held), ValueError, "pass k and v too"),
            (lambda: fa.flash_attn_with_kvcache(q, k_cache, v_cache, k, v), ValueError, "cache_seqlens is needed"),
            (lambda: fa.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=held.float()), ValueError,
             "cache_seqlens must be an int32"),
            (lambda: fa.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=CAPACITY), ValueError,
             "must lie in 0 .. 24"),
            (lambda: fa.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=held, cache_leftpad=held,
                                                block_table=held[:, None]), NotImplementedError, "cache_leftpad"),
            (lambda: fa.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=held, block_table=held),
             ValueError, "block_table must be"),
            (lambda: fa.flash_attn_with_kvcache(q, k_cache, v_cache, k.half(), v.half(), cache_seqlens=held),
             ValueError, "k_cache must have k's dtype")):
        before = k_cache.clone()
        with pytest.raises(error, match=match):
            call()
        assert torch.equal(k_cache, before), "nothing is written before the checks pass"


def test_unpad_and_pad_input():
    """flash_attn.bert_padding's helpers: the kept tokens, their indices, cu_seqlens, the longest
    length, the used counts (unused_mask's tokens counted apart), and pad_input putting them back
    with zeros elsewhere; gradients only where tokens were kept."""
    x = torch.randn(3, 5, 4, 2, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    unused = torch.tensor([[0, 0, 0, 1, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    tokens, indices, cu_seqlens, max_seqlen, used = fa.unpad_input(x, mask, unused)
    kept = (mask + unused).bool()
    assert torch.equal(tokens, x[kept]) and torch.equal(indices, kept.flatten().nonzero().flatten())
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 4, 9, 10]
    assert max_seqlen == 5 and used.tolist() == [3, 5, 1]
    padded = fa.pad_input(tokens, indices, 3, 5)
    assert torch.equal(padded, torch.where(kept[..., None, None], x, 0.0))
    padded.sum().backward()
    assert torch.equal(x.grad, kept[..., None, None].float().expand_as(x))
    with pytest.raises(ValueError, match="attention_mask must be"):
        fa.unpad_input(x, mask[:, :4])


@pytest.mark.parametrize("impl", fused_impls())
def test_padded_batch_through_varlen_as_code_written_for_flash_attention(impl):
    """unpad_input, flash_attn_varlen_func and pad_input, as FlashAttention's users pack a padded
    batch: each sequence's output equals causal attention over that sequence alone."""
    skip_unless_supported(impl, "cpu")
    q, k, v = _dense(9, 9)
    k, v = (t.repeat_interleave(HEADS // KV_HEADS, dim=2) for t in (k, v))
    lengths = [9, 4, 6]
    mask = (torch.arange(9)[None] < torch.tensor(lengths)[:, None]).int()
    packed = [fa.unpad_input(t, mask) for t in (q, k, v)]
    indices, cu_seqlens, longest = packed[0][1], packed[0][2], packed[0][3]
    out = fa.flash_attn_varlen_func(packed[0][0], packed[1][0], packed[2][0], cu_seqlens, cu_seqlens, longest,
                                    longest, causal=True, impl=impl)
    padded = fa.pad_input(out, indices, BATCH, 9)
    for n, length in enumerate(lengths):
        expected, _ = _reference_dense(q[n:n + 1, :length], k[n:n + 1, :length], v[n:n + 1, :length], causal=True)
        torch.testing.assert_close(padded[n, :length], expected[0], rtol=1e-5, atol=1e-5)
        assert not padded[n, length:].any()
