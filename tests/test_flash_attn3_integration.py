"""genfast.integrations.flash_attn_interface, FlashAttention 3's functions on genfast's kernels,
against a reference written here from FlashAttention 3's definitions (each sequence's scores, mask
and softmax in float64): the returns, seqused_q and seqused_k, attention_chunk (forward and
backward), qv, the packed qkv forms, flash_attn_with_kvcache's FlashAttention 3 arguments
(page_table, cu_seqlens_q, cu_seqlens_k_new, rotary_seqlens, qv, attention_chunk over each cache
layout), flash_attn_combine, torch.compile, bad input, and on a GPU the absence of host-device
synchronisation."""

import functools

import pytest
import torch

import genfast
from genfast.integrations import flash_attn as fa2
from genfast.integrations import flash_attn_interface as fa3
from genfast.testing.tolerances import assert_error_ratio
from conftest import fused_impls, skip_unless_supported

HEADS, KV_HEADS, DIM, V_DIM = 4, 2, 16, 8


def _sequence_attention(q, k, v, qv=None, used_q=None, used_k=None, causal=False, window_size=(-1, -1),
                        attention_chunk=0, softcap=0.0, softmax_scale=None):
    """One sequence, q (Lq, H, D), k and v (Lk, Hk, D[v]), by FlashAttention 3's definitions, in q's
    dtype: query i < used_q at position p = i + used_k - used_q sees key j < used_k where causal (j
    <= p), the window and its chunk [p - p mod chunk, .. + chunk) allow (none when p < 0); rows past
    used_q and rows that see no key give out 0 and lse -inf. Returns (out (Lq, H, Dv), lse (H, Lq))."""
    lq, lk = q.shape[0], k.shape[0]
    used_q = lq if used_q is None else used_q
    used_k = lk if used_k is None else used_k
    group = q.shape[1] // k.shape[1]
    k_, v_ = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    if softmax_scale is None:
        softmax_scale = (q.shape[-1] + (0 if qv is None else qv.shape[-1])) ** -0.5
    scores = torch.einsum("ihd,jhd->hij", q, k_)
    if qv is not None:
        scores = scores + torch.einsum("ihd,jhd->hij", qv, v_)
    scores = scores * softmax_scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    i = torch.arange(lq)[:, None]
    j = torch.arange(lk)[None, :]
    position = i + used_k - used_q
    seen = (i < used_q) & (j < used_k)
    if causal:
        seen &= j <= position
    left, right = window_size
    if left >= 0:
        seen &= j >= position - left
    if right >= 0:
        seen &= j <= position + right
    if attention_chunk:
        start = torch.div(position, attention_chunk, rounding_mode="floor") * attention_chunk
        seen &= (j >= start) & (j < start + attention_chunk)
    scores = scores.masked_fill(~seen, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.where(lse[..., None] == float("-inf"), 0.0, torch.exp(scores - lse[..., None]))
    return torch.einsum("hij,jhd->ihd", probs, v_), lse


def _packed_reference(q, k, v, cu_q, cu_k, qv=None, seqused_q=None, seqused_k=None, **options):
    outs, lses = [], []
    for n in range(cu_q.numel() - 1):
        rows_q, rows_k = slice(cu_q[n], cu_q[n + 1]), slice(cu_k[n], cu_k[n + 1])
        o, lse = _sequence_attention(q[rows_q], k[rows_k], v[rows_k], None if qv is None else qv[rows_q],
                                     None if seqused_q is None else int(seqused_q[n]),
                                     None if seqused_k is None else int(seqused_k[n]), **options)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses, 1)


def _inputs(lengths_q, lengths_k, dtype=torch.float32, with_qv=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lengths_q), HEADS, DIM, generator=g)
    k = torch.randn(sum(lengths_k), KV_HEADS, DIM, generator=g)
    v = torch.randn(sum(lengths_k), KV_HEADS, V_DIM, generator=g)
    qv = torch.randn(sum(lengths_q), HEADS, V_DIM, generator=g) if with_qv else None
    cu_q, cu_k = (torch.tensor([0] + list(n)).cumsum(0).to(torch.int32) for n in (lengths_q, lengths_k))
    return [None if t is None else t.to(dtype) for t in (q, k, v, qv)], cu_q, cu_k


def _compare(got_fn, leaves, reference_fn, names=("out", "softmax_lse")):
    """got_fn(*leaves) against reference_fn in float64 and float32: outputs by the error-ratio rule
    (2x), gradients of the leaves (3x) for fixed upstream gradients of out and the finite lse."""
    results = []
    for fn, dtype in ((got_fn, None), (reference_fn, torch.float64), (reference_fn, torch.float32)):
        inputs = [t.detach().to(dtype or t.dtype).requires_grad_() for t in leaves]
        o, lse = fn(*inputs)
        g = torch.Generator().manual_seed(9)
        grad_o = torch.randn(o.shape, generator=g, dtype=torch.float64)
        grad_lse = torch.randn(lse.shape, generator=g, dtype=torch.float64)
        loss = (o.double() * grad_o).sum() + (torch.where(lse.isfinite(), lse, 0).double() * grad_lse).sum()
        results.append((o, lse, *torch.autograd.grad(loss, inputs, allow_unused=True)))
    got, exact, low = results
    for index, (a, e, lo) in enumerate(zip(got, exact, low)):
        name = names[index] if index < len(names) else f"grad {index - len(names)}"
        assert a is not None and e is not None, name
        assert_error_ratio(a, e, lo.to(a.dtype), ratio=2.0 if index < len(names) else 3.0, msg=name)
    return got


VARLEN_OPTIONS = [dict(causal=True), dict(), dict(causal=True, window_size=(5, -1)), dict(window_size=(3, 2)),
                  dict(attention_chunk=8, causal=True), dict(attention_chunk=5),
                  dict(attention_chunk=6, window_size=(3, 3)),
                  dict(attention_chunk=6, causal=True, window_size=(4, -1), softcap=2.0)]


@pytest.mark.parametrize("used", ["all", "seqused_q", "seqused_k", "both"])
@pytest.mark.parametrize("options", VARLEN_OPTIONS, ids=str)
@pytest.mark.parametrize("impl", fused_impls())
def test_varlen_matches_flash_attention_3s_definition(used, options, impl):
    """Sequences of 5/9, 1/30, 3/4, 17/17, 12/7 and 0/5 queries/keys (more queries than keys in the
    fifth: with chunks, its first rows fall before key 0), with seqused_q and seqused_k shorter than
    the rows (0 for the third, whose rows are there): out, softmax_lse and the gradients of q, k, v.
    With seqused_q and seqused_k, max_seqlen_q and max_seqlen_k are their maxima, below the rows, as
    FlashAttention 3 takes them."""
    skip_unless_supported(impl, "cpu")
    lengths_q, lengths_k = [5, 1, 3, 17, 12, 0], [9, 30, 4, 17, 7, 5]
    (q, k, v, _), cu_q, cu_k = _inputs(lengths_q, lengths_k)
    seqused_q = torch.tensor([3, 1, 0, 11, 12, 0], dtype=torch.int32) if used in ("seqused_q", "both") else None
    seqused_k = torch.tensor([9, 20, 0, 13, 5, 4], dtype=torch.int32) if used in ("seqused_k", "both") else None

    def run(q, k, v):
        max_q, max_k = (rows if used is None else int(used.max()) for rows, used in ((17, seqused_q), (30, seqused_k)))
        return fa3.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, seqused_q=seqused_q,
                                          seqused_k=seqused_k, return_attn_probs=True, impl=impl, **options)

    def reference(q, k, v):
        return _packed_reference(q, k, v, cu_q, cu_k, seqused_q=seqused_q, seqused_k=seqused_k, **options)

    out, lse = _compare(run, [q, k, v], reference)[:2]
    assert out.shape == (sum(lengths_q), HEADS, V_DIM) and lse.shape == (HEADS, sum(lengths_q))
    if seqused_q is not None:
        rows = torch.cat([torch.arange(a + u, b) for a, b, u in zip(cu_q[:-1], cu_q[1:], seqused_q)])
        assert torch.equal(out[rows], torch.zeros_like(out[rows])), "rows past seqused_q are 0"
        assert (lse[:, rows] == float("-inf")).all()


@pytest.mark.parametrize("options", [dict(causal=True), dict(attention_chunk=4, causal=True)], ids=str)
@pytest.mark.parametrize("impl", fused_impls())
def test_max_seqlen_q_below_the_rows_past_seqused_q(options, impl):
    """max_seqlen_q = max(seqused_q) = 5, where a sequence of 17 rows uses 2: its 15 rows past them
    get out 0 and softmax_lse -inf all the same, and the rest is the call with the rows' bound."""
    skip_unless_supported(impl, "cpu")
    (q, k, v, _), cu_q, cu_k = _inputs([5, 17], [9, 6])
    seqused_q = torch.tensor([5, 2], dtype=torch.int32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    results = []
    for max_q in (17, 5):
        out, lse = fa3.flash_attn_varlen_func(*leaves, cu_q, cu_k, max_q, 9, seqused_q=seqused_q,
                                              return_attn_probs=True, impl=impl, **options)
        grads = torch.autograd.grad(out.square().sum(), leaves)
        results.append((out, lse, *grads))
    assert torch.equal(results[1][0][7:], torch.zeros_like(results[1][0][7:]))
    assert bool((results[1][1][:, 7:] == float("-inf")).all())
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_chunks_are_the_mask_they_stand_for():
    """attention_chunk against the reference with the chunks' mask alone, causal or not, long enough
    for several chunks in each sequence; a chunk as long as the keys changes nothing."""
    (q, k, v, _), cu_q, cu_k = _inputs([40, 23, 30], [40, 50, 12], seed=3)
    for chunk in (7, 16):
        for causal in (True, False):
            got = fa3.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 40, 50, attention_chunk=chunk, causal=causal,
                                             return_attn_probs=True, impl="native")
            exact, low = (_packed_reference(q.to(d), k.to(d), v.to(d), cu_q, cu_k, causal=causal,
                                            attention_chunk=chunk) for d in (torch.float64, torch.float32))
            assert_error_ratio(got[0], exact[0], low[0], msg=f"out, chunks of {chunk}, causal {causal}")
            assert_error_ratio(got[1], exact[1], low[1], msg=f"lse, chunks of {chunk}, causal {causal}")
    whole = fa3.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 40, 50, attention_chunk=50, causal=True)
    torch.testing.assert_close(whole, fa3.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 40, 50, causal=True))


@pytest.mark.parametrize("options", [dict(), dict(causal=True), dict(attention_chunk=4, causal=True),
                                     dict(attention_chunk=4), dict(softmax_scale=0.2, window_size=(2, 2))], ids=str)
@pytest.mark.parametrize("lengths", [(11, 11), (5, 14), (14, 5)], ids=str)
@pytest.mark.parametrize("impl", fused_impls())
def test_flash_attn_func_with_qv(options, lengths, impl):
    """qv's scores q k^T + qv v^T with FlashAttention 3's default scale, and the gradients of q, k,
    v and qv; flash_attn_func without return_attn_probs returns out alone."""
    skip_unless_supported(impl, "cpu")
    batch, (lq, lk) = 2, lengths
    (q, k, v, qv), _, _ = _inputs([lq] * batch, [lk] * batch, with_qv=True, seed=2)
    dense = [t.view(batch, -1, *t.shape[1:]) for t in (q, k, v, qv)]

    def run(q, k, v, qv):
        return fa3.flash_attn_func(q, k, v, qv=qv, return_attn_probs=True, impl=impl, **options)

    def reference(q, k, v, qv):
        pairs = [_sequence_attention(*(t[n] for t in (q, k, v, qv)), **options) for n in range(batch)]
        return torch.stack([o for o, _ in pairs]), torch.stack([lse for _, lse in pairs])

    out, lse = _compare(run, dense, reference)[:2]
    assert out.shape == (batch, lq, HEADS, V_DIM) and lse.shape == (batch, HEADS, lq) and lse.is_contiguous()
    leaves = [t.clone().requires_grad_() for t in dense]  # a gradient asked, as of out: the same path
    alone = fa3.flash_attn_func(*leaves[:3], qv=leaves[3], impl=impl, **options)
    assert isinstance(alone, torch.Tensor) and torch.equal(alone.detach(), out.detach())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", fused_impls())
def test_half_precision(dtype, impl):
    skip_unless_supported(impl, "cpu", dtype)
    (q, k, v, _), cu_q, cu_k = _inputs([9, 20], [9, 33], dtype, seed=5)
    got = fa3.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 20, 33, causal=True, attention_chunk=8, impl=impl)
    exact, low = (_packed_reference(q.to(d), k.to(d), v.to(d), cu_q, cu_k, causal=True, attention_chunk=8)[0]
                  for d in (torch.float64, dtype))
    assert got.dtype == dtype
    assert_error_ratio(got, exact, low, msg="out")


FP8 = torch.float8_e4m3fn


def _descaled(t8, descale, cu, group):
    """Packed fp8 rows (rows, heads, d) times their sequence's descale (batch, kv_heads) over
    `group` heads each, in float64: what FlashAttention 3's fp8 kernels read."""
    sequence = torch.repeat_interleave(torch.arange(cu.numel() - 1), (cu[1:] - cu[:-1]).long())
    return t8.double() * descale.double().repeat_interleave(group, 1)[sequence][..., None]


def _fp8_call(seed, lengths_q, lengths_k, with_qv):
    """fp8 q, k, v (and qv) of values up to about 12 (e4m3's 3 bits of mantissa), and descales in
    [0.05, 0.45) for each (sequence, kv head); with their descaled float64 values."""
    (q, k, v, qv), cu_q, cu_k = _inputs(lengths_q, lengths_k, with_qv=with_qv, seed=seed)
    fp8 = [None if t is None else (4 * t).to(FP8) for t in (q, k, v, qv)]
    g = torch.Generator().manual_seed(seed + 1)
    descales = [torch.rand(len(lengths_q), KV_HEADS, generator=g) * 0.4 + 0.05 for _ in range(3)]
    group = HEADS // KV_HEADS
    wide = [_descaled(fp8[0], descales[0], cu_q, group), _descaled(fp8[1], descales[1], cu_k, 1),
            _descaled(fp8[2], descales[2], cu_k, 1),
            None if qv is None else _descaled(fp8[3], descales[0], cu_q, group)]
    return fp8, descales, wide, cu_q, cu_k


@pytest.mark.parametrize("wide", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_qv", [False, True], ids=["", "qv"])
@pytest.mark.parametrize("options", [dict(causal=True), dict(attention_chunk=4, window_size=(5, 1), softcap=3.0)],
                         ids=str)
@pytest.mark.parametrize("impl", fused_impls())
def test_fp8_with_descales_matches_flash_attention_3s_definition(options, with_qv, wide, impl, monkeypatch):
    """float8_e4m3fn q, k, v (and qv) with q_descale, k_descale and v_descale of each (sequence, kv
    head), grouped heads, seqused_k: FlashAttention 3's scores scale (q qd)(k kd)^T + (qv qd)(v
    vd)^T and out P (v vd), in bfloat16 (its fp8 out dtype), softmax_lse float32; computed widened
    to float32 (the CPU's) or bfloat16 (a GPU's, here on the CPU)."""
    skip_unless_supported(impl, "cpu", wide)
    monkeypatch.setattr(fa3, "wide_dtype", lambda device: wide)
    (q8, k8, v8, qv8), (qd, kd, vd), exact_inputs, cu_q, cu_k = _fp8_call(6, [5, 1, 12], [9, 30, 7], with_qv)
    seqused_k = torch.tensor([9, 20, 6], dtype=torch.int32)
    out, lse = fa3.flash_attn_varlen_func(q8, k8, v8, cu_q, cu_k, 12, 30, seqused_k=seqused_k, qv=qv8, q_descale=qd,
                                          k_descale=kd, v_descale=vd, return_attn_probs=True, impl=impl, **options)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    exact, low = (_packed_reference(*(t.to(d) for t in exact_inputs[:3]), cu_q, cu_k,
                                    qv=None if qv8 is None else exact_inputs[3].to(d), seqused_k=seqused_k, **options)
                  for d in (torch.float64, wide))
    assert_error_ratio(out, exact[0], low[0].to(torch.bfloat16), msg="out")
    assert_error_ratio(lse, exact[1], low[1].float(), msg="softmax_lse")
    if not with_qv:  # flash_attn_func: the same sequences padded to one length
        batch, lq, lk = 3, 12, 30
        dense = []
        for t, cu, rows in ((q8, cu_q, lq), (k8, cu_k, lk), (v8, cu_k, lk)):
            padded = torch.zeros(batch, rows, *t.shape[1:], dtype=FP8)
            for n in range(batch):
                padded[n, :int(cu[n + 1] - cu[n])] = t[int(cu[n]):int(cu[n + 1])]
            dense.append(padded)
        got = fa3.flash_attn_func(*dense, q_descale=qd, k_descale=kd, v_descale=vd, impl=impl, causal=True)
        full = _uniform(batch, lq), _uniform(batch, lk)
        wide_dense = [_descaled(dense[0].flatten(0, 1), qd, full[0], HEADS // KV_HEADS),
                      _descaled(dense[1].flatten(0, 1), kd, full[1], 1),
                      _descaled(dense[2].flatten(0, 1), vd, full[1], 1)]
        exact, low = (_packed_reference(*(t.to(d) for t in wide_dense), *full, causal=True)[0]
                      for d in (torch.float64, wide))
        assert_error_ratio(got.flatten(0, 1), exact, low.to(torch.bfloat16), msg="flash_attn_func's out")


def _uniform(batch, length):
    return torch.arange(batch + 1, dtype=torch.int32) * length


def test_fp8_bad_input_and_other_dtypes():
    """fp8 mixed with other dtypes, a descale of the wrong shape or dtype, a gradient asked of fp8
    inputs and rotary tables over an fp8 cache raise, naming the argument; descales beside 16-bit or
    float32 inputs are ignored, as FlashAttention 3 ignores them."""
    (q8, k8, v8, _), (qd, kd, vd), _, cu_q, cu_k = _fp8_call(8, [3, 4], [5, 6], False)
    for call, error, match in (
            (lambda: fa3.flash_attn_varlen_func(q8, k8.float(), v8, cu_q, cu_k, 4, 6), ValueError,
             "k must be float8_e4m3fn too"),
            (lambda: fa3.flash_attn_varlen_func(q8.float(), k8, v8, cu_q, cu_k, 4, 6), ValueError,
             "k is float8_e4m3fn: q must be too"),
            (lambda: fa3.flash_attn_varlen_func(q8, k8, v8, cu_q, cu_k, 4, 6, q_descale=qd[:1]), ValueError,
             "q_descale must be a float32 tensor \\(batch, kv_heads\\) = \\(2, 2\\)"),
            (lambda: fa3.flash_attn_varlen_func(q8, k8, v8, cu_q, cu_k, 4, 6, v_descale=vd.double()), ValueError,
             "v_descale must be a float32"),
            (lambda: fa3.flash_attn_varlen_func(q8, k8[:, :1].repeat(1, 3, 1), v8[:, :1].repeat(1, 3, 1), cu_q,
                                                cu_k, 4, 6), ValueError, "q's 4 heads must be a multiple of k's 3"),
            (lambda: fa3.flash_attn_varlen_func(q8.requires_grad_(), k8, v8, cu_q, cu_k, 4, 6), NotImplementedError,
             "no backward")):
        with pytest.raises(error, match=match):
            call()
    q8.requires_grad_(False)
    k_cache, v_cache, _ = _cache(False)
    cos = sin = torch.ones(CAPACITY, DIM // 2)
    with pytest.raises(NotImplementedError, match="rotary_cos and rotary_sin with a float8_e4m3fn cache"):
        fa3.flash_attn_with_kvcache(q8[:3, None], k_cache.to(FP8), v_cache.to(FP8), k8[:3, None], v8[:3, None],
                                    rotary_cos=cos, rotary_sin=sin, cache_seqlens=1)
    with pytest.raises(ValueError, match="k must be float8_e4m3fn, as the cache is"):
        fa3.flash_attn_with_kvcache(q8[:3, None], k_cache.to(FP8), v_cache.to(FP8), k8[:3, None].float(),
                                    v8[:3, None], cache_seqlens=1)
    with pytest.raises(ValueError, match="k_cache is float8_e4m3fn: q must be too"):
        fa3.flash_attn_with_kvcache(q8[:3, None].float(), k_cache.to(FP8), v_cache.to(FP8), cache_seqlens=1)
    with pytest.raises(ValueError, match="with float8_e4m3fn q, k_cache must be float8_e4m3fn too"):
        fa3.flash_attn_with_kvcache(q8[:3, None], k_cache, v_cache, cache_seqlens=1)
    q, k, v = (t.float() for t in (q8, k8, v8))
    plain = fa3.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 6)
    assert torch.equal(fa3.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 6, q_descale=qd, k_descale=kd,
                                                  v_descale=vd), plain)


@pytest.mark.parametrize("layout", ["padded", "paged", "rows by cache_batch_idx, chunks", "cache_leftpad"])
@pytest.mark.parametrize("impl", fused_impls())
def test_fp8_with_kvcache(layout, impl):
    """An fp8 cache (padded, paged, padded with its rows picked by cache_batch_idx and attention chunks
    of 8, or padded with each sequence's keys from cache_leftpad on), two fp8 new keys a sequence
    written into it as they are, and fp8 queries over it, one per sequence and then packed (3, 1 and
    2), with descales of each (sequence, kv head): each sequence's rows against FlashAttention 3's
    definition. A bad descale raises before the cache is written."""
    skip_unless_supported(impl, "cpu")
    paged, picked = layout == "paged", layout.startswith("rows")
    k_cache, v_cache, table = _cache(paged, seed=3)
    cache_rows = torch.tensor([2, 0, 1], dtype=torch.int32) if picked else None
    extra = dict(cache_batch_idx=cache_rows, attention_chunk=8) if picked else {}
    leftpad = torch.tensor([1, 0, 3] if layout == "cache_leftpad" else [0, 0, 0], dtype=torch.int32)
    if layout == "cache_leftpad":
        extra = dict(cache_leftpad=leftpad)
    k_cache, v_cache = (4 * k_cache).to(FP8), (4 * v_cache).to(FP8)
    g = torch.Generator().manual_seed(4)
    k, v = ((4 * torch.randn(BATCH, 2, KV_HEADS, d, generator=g)).to(FP8) for d in (DIM, V_DIM))
    qd, kd, vd = (torch.rand(BATCH, KV_HEADS, generator=g) * 0.4 + 0.05 for _ in range(3))
    held = torch.tensor([6, 0, 13], dtype=torch.int32)
    for cu_q in (_uniform(BATCH, 1), torch.tensor([0, 3, 4, 6], dtype=torch.int32)):
        q = (4 * torch.randn(int(cu_q[-1]), HEADS, DIM, generator=g)).to(FP8)
        caches = k_cache.clone(), v_cache.clone()
        packed = dict(cu_seqlens_q=cu_q, max_seqlen_q=3) if cu_q[-1] != BATCH else {}
        call = dict(cache_seqlens=held, page_table=table, q_descale=qd, k_descale=kd, v_descale=vd, causal=True,
                    impl=impl, **packed, **extra)
        with pytest.raises(ValueError, match="v_descale must be"):
            fa3.flash_attn_with_kvcache(q if packed else q.view(BATCH, 1, HEADS, DIM), *caches, k, v,
                                        **dict(call, v_descale=vd[:1]))
        assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(caches, (k_cache, v_cache)))
        out = fa3.flash_attn_with_kvcache(q if packed else q.view(BATCH, 1, HEADS, DIM), *caches, k, v, **call)
        out = out.view(-1, HEADS, V_DIM)
        assert out.dtype == torch.bfloat16
        for n in range(BATCH):
            count = int(held[n]) + 2
            keys, values = (_cache_keys(c, table, n if cache_rows is None else int(cache_rows[n]), count)
                            [int(leftpad[n]):] for c in caches)
            assert torch.equal(keys[-2:].view(torch.uint8), k[n].view(torch.uint8))
            assert torch.equal(values[-2:].view(torch.uint8), v[n].view(torch.uint8))
            rows = slice(int(cu_q[n]), int(cu_q[n + 1]))
            scaled = (q[rows].double() * qd[n].double().repeat_interleave(HEADS // KV_HEADS)[:, None],
                      keys.double() * kd[n].double()[:, None], values.double() * vd[n].double()[:, None])
            exact, low = (_sequence_attention(*(t.to(d) for t in scaled), causal=True,
                                              attention_chunk=extra.get("attention_chunk", 0))[0]
                          for d in (torch.float64, torch.float32))
            assert_error_ratio(out[rows], exact, low.to(torch.bfloat16), msg=f"out of sequence {n}")


@pytest.mark.parametrize("impl", fused_impls())
def test_packed_qkv_forms(impl):
    """qkv (B, L, 3, H, D), and (B, L, Hq + 2 Hk, D) with num_heads_q: flash_attn_func of its parts,
    gradients included."""
    skip_unless_supported(impl, "cpu")
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(2, 13, 3, HEADS, DIM, generator=g, requires_grad=True)
    grouped = torch.randn(2, 13, HEADS + 2 * KV_HEADS, DIM, generator=g, requires_grad=True)
    for packed, unpacked, leaf in (
            (lambda: fa3.flash_attn_qkvpacked_func(qkv, causal=True, impl=impl),
             lambda: fa3.flash_attn_func(*qkv.unbind(2), causal=True, impl=impl), qkv),
            (lambda: fa3.flash_attn_qkvpacked_func(grouped, num_heads_q=HEADS, attention_chunk=4, impl=impl),
             lambda: fa3.flash_attn_func(*grouped.split([HEADS, KV_HEADS, KV_HEADS], 2), attention_chunk=4,
                                         impl=impl), grouped)):
        got, expected = packed(), unpacked()
        assert torch.equal(got, expected)
        assert torch.equal(torch.autograd.grad(got.sum(), leaf)[0], torch.autograd.grad(expected.sum(), leaf)[0])


def test_returns_and_deterministic_reaches_the_kernels(monkeypatch):
    """FlashAttention 3's returns (out; (out, lse)); deterministic=True reaches attention_varlen, whose
    tests check the bit-equal backward on the GPU (the CPU's is deterministic always)."""
    (q, k, v, _), _, _ = _inputs([10] * 2, [10] * 2)
    q, k, v = (t.view(2, 10, *t.shape[1:]) for t in (q, k, v))
    seen = []
    real = fa3.attention_varlen

    def attention_varlen(*args, **kwargs):
        seen.append(kwargs["deterministic"])
        return real(*args, **kwargs)

    monkeypatch.setattr(fa3, "attention_varlen", attention_varlen)
    assert isinstance(fa3.flash_attn_func(q, k, v, causal=True, deterministic=True), torch.Tensor)
    assert len(fa3.flash_attn_func(q, k, v, attention_chunk=4, return_attn_probs=True)) == 2
    assert seen == [True, False]


def test_chunks_of_a_dense_call_make_no_empty_parts(monkeypatch):
    """flash_attn_func with no more queries than keys splits each sequence into its chunks alone,
    each bounded by the chunk: no part of no queries (the CPU kernels share tasks out in contiguous
    runs, which parts of nothing in front would leave to one thread); with more queries than keys,
    parts of no keys for the queries before key 0 first, a chunk's worth each."""
    seen = []
    real = fa3.attention_varlen

    def attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
        seen.append((cu_q.tolist(), max_q, max_k))
        return real(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)

    monkeypatch.setattr(fa3, "attention_varlen", attention_varlen)
    (q, k, v, _), _, _ = _inputs([16] * 2, [16] * 2)
    q, k, v = (t.view(2, 16, *t.shape[1:]) for t in (q, k, v))
    fa3.flash_attn_func(q, k, v, causal=True, attention_chunk=4)
    fa3.flash_attn_func(q, k[:, :10], v[:, :10], causal=True, attention_chunk=4)
    assert seen[0] == (list(range(0, 33, 4)), 4, 4)
    # 16 queries over 10 keys: 6 before key 0 (positions -6 .. -1: chunks -2 and -1, of no keys), then
    # the chunks of keys 0-3, 4-7 and 8-9.
    assert seen[1] == ([0, 2, 6, 10, 14, 16, 18, 22, 26, 30, 32], 4, 4)


@pytest.mark.cuda
def test_on_a_gpu_without_synchronising():
    """Chunks, seqused_q and seqused_k, a cache step with packed queries and new keys, a paged cache,
    chunks and rotary tables, fp8 inputs with descales, and DeepSeek's qv (64 + 512), on the GPU under
    torch's sync debug mode (any host-device synchronisation raises), against the CPU's results."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    (q, k, v, _), cu_q, cu_k = _inputs([5, 1, 3, 17, 12], [9, 30, 4, 17, 7], torch.float16)
    used_q = torch.tensor([3, 1, 0, 2, 12], dtype=torch.int32)  # 15 rows past the fourth's, over max_seqlen_q
    used_k = torch.tensor([9, 20, 0, 13, 5], dtype=torch.int32)
    cpu = fa3.flash_attn_varlen_func(*(t.float() for t in (q, k, v)), cu_q, cu_k, 17, 30, seqused_q=used_q,
                                     seqused_k=used_k, causal=True, attention_chunk=6)
    gpu_args = [t.cuda() for t in (q, k, v, cu_q, cu_k)]
    torch.cuda.set_sync_debug_mode("error")
    try:  # max_seqlen_q and max_seqlen_k as FlashAttention 3 takes them: max(seqused_q), max(seqused_k)
        got = fa3.flash_attn_varlen_func(*gpu_args, 12, 20, seqused_q=used_q.cuda(), seqused_k=used_k.cuda(),
                                         causal=True, attention_chunk=6)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(got.float().cpu(), cpu, atol=2e-3, rtol=2e-3)
    # The gradients beside rows the GPU left unwritten (past max_seqlen_q = 12, cleared afterwards).
    grads = []
    for leaves, device, bounds in (([t.float() for t in (q, k, v)], "cpu", (17, 30)),
                                   ([t.cuda() for t in (q, k, v)], "cuda", (12, 20))):
        leaves = [t.requires_grad_() for t in leaves]
        out = fa3.flash_attn_varlen_func(*leaves, cu_q.to(device), cu_k.to(device), *bounds,
                                         seqused_q=used_q.to(device), seqused_k=used_k.to(device), causal=True,
                                         attention_chunk=6)
        grads.append(torch.autograd.grad(out.float().square().sum(), leaves))
    for got_grad, cpu_grad in zip(grads[1], grads[0]):
        assert got_grad.isfinite().all()
        torch.testing.assert_close(got_grad.float().cpu(), cpu_grad, atol=1e-2, rtol=1e-2)
    # A cache step with every FlashAttention 3 argument that moves rows: packed queries and new
    # keys, a paged cache, chunks, rotary tables at rotary_seqlens.
    k_cache, v_cache, table = _cache(True, v_dim=DIM)
    g = torch.Generator().manual_seed(9)
    step_q = torch.randn(6, HEADS, DIM, generator=g)
    new_k, new_v = (torch.randn(5, KV_HEADS, DIM, generator=g) for _ in range(2))
    angles = torch.arange(2 * CAPACITY, dtype=torch.float64)[:, None] * 0.7 ** torch.arange(4)
    step = dict(cache_seqlens=torch.tensor([6, 0, 13], dtype=torch.int32), page_table=table,
                cu_seqlens_q=torch.tensor([0, 2, 3, 6], dtype=torch.int32), max_seqlen_q=3,
                cu_seqlens_k_new=torch.tensor([0, 2, 2, 5], dtype=torch.int32), rotary_cos=angles.cos().float(),
                rotary_sin=angles.sin().float(), rotary_seqlens=torch.tensor([7, 1, 14], dtype=torch.int32),
                attention_chunk=8, causal=True)
    cpu_caches = k_cache.clone(), v_cache.clone()
    cpu = fa3.flash_attn_with_kvcache(step_q, *cpu_caches, new_k, new_v, **step)
    gpu_step = {key: value.cuda() if isinstance(value, torch.Tensor) else value for key, value in step.items()}
    gpu_caches = k_cache.cuda(), v_cache.cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = fa3.flash_attn_with_kvcache(step_q.cuda(), *gpu_caches, new_k.cuda(), new_v.cuda(), **gpu_step)
        dense = fa3.flash_attn_func(*(t.view(1, *t.shape).cuda() for t in (q, q, q)), causal=True,
                                    attention_chunk=4)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(got.cpu(), cpu, atol=2e-3, rtol=2e-3)  # float32 products may take TF32
    torch.testing.assert_close(gpu_caches[0].cpu(), cpu_caches[0], atol=1e-5, rtol=1e-5)
    expected = fa3.flash_attn_func(*(t.view(1, *t.shape).float() for t in (q, q, q)), causal=True, attention_chunk=4)
    torch.testing.assert_close(dense.float().cpu(), expected, atol=2e-3, rtol=2e-3)
    # fp8 with descales: widened to bfloat16 on the GPU, to float32 on the CPU.
    (q8, k8, v8, _), descales, _, cu8_q, cu8_k = _fp8_call(8, [3, 4], [5, 6], False)
    scales = dict(zip(("q_descale", "k_descale", "v_descale"), descales))
    cpu = fa3.flash_attn_varlen_func(q8, k8, v8, cu8_q, cu8_k, 4, 6, causal=True, **scales)
    gpu_args = [t.cuda() for t in (q8, k8, v8, cu8_q, cu8_k)]
    gpu_scales = {key: value.cuda() for key, value in scales.items()}
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = fa3.flash_attn_varlen_func(*gpu_args, 4, 6, causal=True, **gpu_scales)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float().cpu(), cpu.float(), atol=6e-2, rtol=3e-2)
    # DeepSeek's qv, 64 + 512: past any concatenation's head dim on a GPU, read in place by Triton.
    g = torch.Generator().manual_seed(10)
    wide_q, wide_k = torch.randn(2, 4, 2, 64, generator=g), torch.randn(2, 9, 2, 64, generator=g)
    wide_v, wide_qv = torch.randn(2, 9, 2, 512, generator=g), torch.randn(2, 4, 2, 512, generator=g)
    cpu = fa3.flash_attn_func(wide_q, wide_k, wide_v, qv=wide_qv, causal=True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = fa3.flash_attn_func(*(t.cuda().half() for t in (wide_q, wide_k, wide_v)), qv=wide_qv.cuda().half(),
                                  causal=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(got.float().cpu(), cpu, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("unpacked", ["q", "k", "both"])
@pytest.mark.parametrize("impl", fused_impls())
def test_varlen_takes_either_side_unpacked(unpacked, impl):
    """cu_seqlens_q or cu_seqlens_k None (FlashAttention 3's is_varlen_q or _k false): that side
    (batch, seqlen, heads, head_dim), 3 sequences of 6 queries over 9 keys, seqused_k taking the
    first 9, 2 and 0 keys, chunks of 4, causal; an unpacked q gives out (batch, seqlen_q, heads,
    head_dim_v) and softmax_lse (batch, heads, seqlen_q). Values and gradients against the
    reference of the packed sequences; a side with its cu_seqlens None must be 4-d."""
    skip_unless_supported(impl, "cpu")
    (q, k, v, qv), cu_q, cu_k = _inputs([6] * 3, [9] * 3, with_qv=True)
    seqused_k = torch.tensor([9, 2, 0], dtype=torch.int32)
    options = dict(causal=True, attention_chunk=4)
    dense_q, dense_k = unpacked in ("q", "both"), unpacked in ("k", "both")

    def run(q, k, v, qv):
        unflat = (lambda t: t.unflatten(0, (3, -1)))
        o, lse = fa3.flash_attn_varlen_func(
            unflat(q) if dense_q else q, unflat(k) if dense_k else k, unflat(v) if dense_k else v,
            None if dense_q else cu_q, None if dense_k else cu_k, 1000 if dense_q else 6, 1000 if dense_k else 9,
            seqused_k=seqused_k, qv=unflat(qv) if dense_q else qv, return_attn_probs=True, impl=impl, **options)
        if dense_q:
            assert o.shape == (3, 6, HEADS, V_DIM) and lse.shape == (3, HEADS, 6)
            o, lse = o.flatten(0, 1), lse.transpose(0, 1).flatten(1)
        return o, lse

    def reference(q, k, v, qv):
        return _packed_reference(q, k, v, cu_q, cu_k, qv, seqused_k=seqused_k, **options)

    _compare(run, [q, k, v, qv], reference)
    with pytest.raises(ValueError, match="k must be"):
        fa3.flash_attn_varlen_func(q, k, v, cu_q, None, 6, 9, impl=impl)


# flash_attn_with_kvcache

CAPACITY, BATCH = 24, 3


def _cache(paged, seed=0, v_dim=V_DIM):
    g = torch.Generator().manual_seed(seed)
    rows = (CAPACITY // 4 * BATCH + 2, 4) if paged else (BATCH, CAPACITY)
    k_cache = torch.randn(*rows, KV_HEADS, DIM, generator=g)
    v_cache = torch.randn(*rows, KV_HEADS, v_dim, generator=g)
    table = torch.randperm(rows[0], generator=g)[:BATCH * CAPACITY // 4].view(BATCH, -1).to(torch.int32) \
        if paged else None
    return k_cache, v_cache, table


def _cache_keys(cache, table, n, count):
    """The first `count` keys of sequence n."""
    if table is None:
        return cache[n, :count]
    return cache[table[n].long()].flatten(0, 1)[:count]


@pytest.mark.parametrize("paged", [False, True], ids=["padded", "paged"])
@pytest.mark.parametrize("impl", fused_impls())
def test_with_kvcache_packed_queries_and_qv(paged, impl):
    """cu_seqlens_q (3, 1 and 2 queries over caches of 6, 0 and 13 keys, two new ones appended to
    each), with and without qv: each sequence's rows against the reference over its keys, causal from
    its bottom-right corner; (out, softmax_lse (heads, total_q), two empty tensors) returned."""
    skip_unless_supported(impl, "cpu")
    k_cache, v_cache, table = _cache(paged)
    g = torch.Generator().manual_seed(1)
    cu_q = torch.tensor([0, 3, 4, 6], dtype=torch.int32)
    q = torch.randn(6, HEADS, DIM, generator=g)
    qv = torch.randn(6, HEADS, V_DIM, generator=g)
    k, v = torch.randn(BATCH, 2, KV_HEADS, DIM, generator=g), torch.randn(BATCH, 2, KV_HEADS, V_DIM, generator=g)
    held = torch.tensor([6, 0, 13], dtype=torch.int32)
    for with_qv in (False, True):
        caches = k_cache.clone(), v_cache.clone()
        out, lse, *rest = fa3.flash_attn_with_kvcache(
            q, *caches, k, v, qv=qv if with_qv else None, cache_seqlens=held, page_table=table, cu_seqlens_q=cu_q,
            max_seqlen_q=3, causal=True, return_softmax_lse=True, impl=impl)
        assert out.shape == (6, HEADS, V_DIM) and lse.shape == (HEADS, 6) and [t.numel() for t in rest] == [0, 0]
        for n in range(BATCH):
            count = int(held[n]) + 2
            keys, values = (_cache_keys(c, table, n, count) for c in caches)
            assert torch.equal(keys[-2:], k[n]) and torch.equal(values[-2:], v[n])
            rows = slice(int(cu_q[n]), int(cu_q[n + 1]))
            exact, low = (_sequence_attention(q[rows].to(d), keys.to(d), values.to(d),
                                              qv[rows].to(d) if with_qv else None, causal=True)
                          for d in (torch.float64, torch.float32))
            assert_error_ratio(out[rows], exact[0], low[0], msg=f"out of sequence {n}")
            assert_error_ratio(lse[:, rows], exact[1], low[1], msg=f"softmax_lse of sequence {n}")


def _rotary_cache_call(seed, queries):
    """A padded cache (values of the keys' head dim), `queries` queries and two new keys a sequence
    over caches holding 6, 0 and 13 keys, and rotary tables (cos, sin) of 2 CAPACITY positions."""
    k_cache, v_cache, _ = _cache(False, v_dim=DIM)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, queries, HEADS, DIM, generator=g)
    k, v = torch.randn(BATCH, 2, KV_HEADS, DIM, generator=g), torch.randn(BATCH, 2, KV_HEADS, DIM, generator=g)
    held = torch.tensor([6, 0, 13], dtype=torch.int32)
    angles = torch.arange(2 * CAPACITY, dtype=torch.float64)[:, None] * 0.7 ** torch.arange(4)
    return k_cache, v_cache, q, k, v, held, angles.cos().float(), angles.sin().float()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("impl", fused_impls())
def test_with_kvcache_rotary_seqlens(causal, impl):
    """rotary_seqlens turns the new keys at rotary_seqlens[n] + i (the queries there too when causal,
    else all at rotary_seqlens[n]) wherever they are written: FlashAttention 2's call with the tables
    shifted by each sequence's difference gives the same."""
    skip_unless_supported(impl, "cpu")
    k_cache, v_cache, q, k, v, held, cos, sin = _rotary_cache_call(2, 2)
    shifts = [3, 20, 1]
    caches = k_cache.clone(), v_cache.clone()
    got = fa3.flash_attn_with_kvcache(q, *caches, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=held,
                                      rotary_seqlens=held + torch.tensor(shifts, dtype=torch.int32), causal=causal,
                                      rotary_interleaved=False, impl=impl)
    for n, shift in enumerate(shifts):
        expected_caches = k_cache[n:n + 1].clone(), v_cache[n:n + 1].clone()
        expected = fa2.flash_attn_with_kvcache(q[n:n + 1], *expected_caches, k[n:n + 1], v[n:n + 1],
                                               rotary_cos=cos[shift:], rotary_sin=sin[shift:],
                                               cache_seqlens=held[n:n + 1], causal=causal, rotary_interleaved=False,
                                               impl=impl)
        torch.testing.assert_close(got[n:n + 1], expected)
        torch.testing.assert_close(caches[0][n:n + 1], expected_caches[0])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("rotary_seqlens", [False, True])
@pytest.mark.parametrize("impl", fused_impls())
def test_with_kvcache_packed_queries_turned(causal, rotary_seqlens, impl):
    """cu_seqlens_q with rotary tables: queries of 2, 1 and 3 rows, each sequence's turned at its
    cache_seqlens (or rotary_seqlens) + i when causal, else all there, equal to the dense call on
    that sequence alone."""
    skip_unless_supported(impl, "cpu")
    k_cache, v_cache, _ = _cache(False, v_dim=DIM)
    g = torch.Generator().manual_seed(6)
    lengths = [2, 1, 3]
    cu_q = torch.tensor([0, 2, 3, 6], dtype=torch.int32)
    q = torch.randn(6, HEADS, DIM, generator=g)
    k, v = torch.randn(BATCH, 2, KV_HEADS, DIM, generator=g), torch.randn(BATCH, 2, KV_HEADS, DIM, generator=g)
    held = torch.tensor([6, 0, 13], dtype=torch.int32)
    angles = torch.arange(2 * CAPACITY, dtype=torch.float64)[:, None] * 0.7 ** torch.arange(4)
    rotary = dict(rotary_cos=angles.cos().float(), rotary_sin=angles.sin().float(), causal=causal, impl=impl)
    if rotary_seqlens:
        rotary["rotary_seqlens"] = held + torch.tensor([3, 20, 1], dtype=torch.int32)
    caches = k_cache.clone(), v_cache.clone()
    got = fa3.flash_attn_with_kvcache(q, *caches, k, v, cache_seqlens=held, cu_seqlens_q=cu_q, max_seqlen_q=3,
                                      **rotary)
    for n, length in enumerate(lengths):
        alone = k_cache[n:n + 1].clone(), v_cache[n:n + 1].clone()
        options = dict(rotary, rotary_seqlens=rotary["rotary_seqlens"][n:n + 1]) if rotary_seqlens else rotary
        expected = fa3.flash_attn_with_kvcache(q[None, cu_q[n]:cu_q[n + 1]], *alone, k[n:n + 1], v[n:n + 1],
                                               cache_seqlens=held[n:n + 1], **options)
        torch.testing.assert_close(got[cu_q[n]:cu_q[n + 1]], expected[0])
        torch.testing.assert_close(caches[0][n:n + 1], alone[0])


@pytest.mark.parametrize("rotary", [False, True])
@pytest.mark.parametrize("layout", ["padded", "paged", "cache_batch_idx"])
@pytest.mark.parametrize("impl", fused_impls())
def test_with_kvcache_packed_new_keys(layout, rotary, impl):
    """cu_seqlens_k_new: 2, 0 and 3 new keys packed without padding, written at each sequence's
    cache_seqlens (turned there by the rotary tables), with queries packed by cu_seqlens_q; each
    sequence equal to the dense call on it alone (its own count of new keys), caches included."""
    skip_unless_supported(impl, "cpu")
    k_cache, v_cache, table = _cache(layout == "paged", v_dim=DIM, seed=7)
    g = torch.Generator().manual_seed(8)
    new = [2, 0, 3]
    cu_new = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    cu_q = torch.tensor([0, 2, 3, 6], dtype=torch.int32)
    q = torch.randn(6, HEADS, DIM, generator=g)
    k, v = torch.randn(5, KV_HEADS, DIM, generator=g), torch.randn(5, KV_HEADS, DIM, generator=g)
    held = torch.tensor([6, 0, 13], dtype=torch.int32)
    angles = torch.arange(CAPACITY, dtype=torch.float64)[:, None] * 0.7 ** torch.arange(4)
    options = dict(causal=True, impl=impl)
    if rotary:
        options.update(rotary_cos=angles.cos().float(), rotary_sin=angles.sin().float())
    rows = torch.tensor([2, 0, 1]) if layout == "cache_batch_idx" else torch.arange(BATCH)
    layout_options = {"paged": dict(page_table=table),
                      "cache_batch_idx": dict(cache_batch_idx=rows.to(torch.int32))}.get(layout, {})
    caches = k_cache.clone(), v_cache.clone()
    got = fa3.flash_attn_with_kvcache(q, *caches, k, v, cache_seqlens=held, cu_seqlens_q=cu_q, max_seqlen_q=3,
                                      cu_seqlens_k_new=cu_new, **options, **layout_options)
    for n in range(BATCH):
        alone = [c.clone() for c in (k_cache, v_cache)]
        mine = dict(page_table=table[n:n + 1]) if layout == "paged" else \
            dict(cache_batch_idx=rows[n:n + 1].to(torch.int32)) if layout == "cache_batch_idx" else {}
        if layout == "padded":
            alone = [c[n:n + 1] for c in alone]
        new_rows = slice(int(cu_new[n]), int(cu_new[n + 1]))
        expected = fa3.flash_attn_with_kvcache(q[None, cu_q[n]:cu_q[n + 1]], *alone, k[None, new_rows],
                                               v[None, new_rows], cache_seqlens=held[n:n + 1], **options, **mine)
        torch.testing.assert_close(got[cu_q[n]:cu_q[n + 1]], expected[0])
        count = int(held[n]) + new[n]
        for cache, expected_cache in zip(caches, alone):
            if table is None:
                row = 0 if layout == "padded" else int(rows[n])
                ours = cache[int(rows[n]), :count]
                torch.testing.assert_close(ours, expected_cache[row, :count])
            else:
                torch.testing.assert_close(_cache_keys(cache, table, n, count),
                                           _cache_keys(expected_cache, table, n, count))


@pytest.mark.parametrize("layout", ["padded", "paged"])
def test_with_kvcache_rows_past_the_new_keys_are_not_written(layout):
    """New keys packed by cu_seqlens_k_new in a k and v padded past cu_seqlens_k_new[-1] (a batch
    padded to a captured graph's size): the padding is no key, as FlashAttention 3 takes it; the
    caches end as with the rows alone, also where no sequence has a new key, and with rotary tables
    that end at the last new key's position (the padding is not turned past them)."""
    skip_unless_supported("native", "cpu")
    k_cache, v_cache, table = _cache(layout == "paged", v_dim=DIM, seed=7)
    g = torch.Generator().manual_seed(9)
    q = torch.randn(3, HEADS, DIM, generator=g)
    k, v = torch.randn(8, KV_HEADS, DIM, generator=g), torch.randn(8, KV_HEADS, DIM, generator=g)
    k[5:], v[5:] = 1e30, -1e30  # the padding
    held = torch.tensor([6, 0, 13], dtype=torch.int32)
    options = dict(cache_seqlens=held, cu_seqlens_q=torch.tensor([0, 1, 2, 3], dtype=torch.int32), max_seqlen_q=1,
                   causal=True, impl="native", **(dict(page_table=table) if layout == "paged" else {}))
    angles = torch.arange(16, dtype=torch.float64)[:, None] * 0.7 ** torch.arange(4)  # positions 0 .. 15
    tables = dict(rotary_cos=angles.cos().float(), rotary_sin=angles.sin().float())
    for cu_new, real, rotary in ((torch.tensor([0, 2, 2, 5], dtype=torch.int32), 5, {}),
                                 (torch.tensor([0, 2, 2, 5], dtype=torch.int32), 5, tables),
                                 (torch.tensor([0, 0, 0, 0], dtype=torch.int32), 0, {})):
        padded, alone = (k_cache.clone(), v_cache.clone()), (k_cache.clone(), v_cache.clone())
        got = fa3.flash_attn_with_kvcache(q, *padded, k, v, cu_seqlens_k_new=cu_new, **options, **rotary)
        expected = fa3.flash_attn_with_kvcache(q, *alone, k[:real], v[:real], cu_seqlens_k_new=cu_new, **options,
                                               **rotary)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        for ours, theirs in zip(padded, alone):
            assert torch.equal(ours.nan_to_num(), theirs.nan_to_num())


@pytest.mark.parametrize("impl", fused_impls())
def test_with_kvcache_chunks_turn_queries_in_sequence(impl):
    """With chunks (local attention in FlashAttention 3) the queries are turned at cache_seqlens + i
    even without causal: the call equals one on queries and keys turned so beforehand."""
    skip_unless_supported(impl, "cpu")
    k_cache, v_cache, _ = _cache(False, v_dim=DIM, seed=10)
    g = torch.Generator().manual_seed(11)
    q = torch.randn(BATCH, 3, HEADS, DIM, generator=g)
    k, v = torch.randn(BATCH, 3, KV_HEADS, DIM, generator=g), torch.randn(BATCH, 3, KV_HEADS, DIM, generator=g)
    held = torch.tensor([6, 0, 13], dtype=torch.int32)
    angles = torch.arange(CAPACITY, dtype=torch.float64)[:, None] * 0.7 ** torch.arange(4)
    cos, sin = angles.cos().float(), angles.sin().float()
    positions = held[:, None] + torch.arange(3, dtype=torch.int32)
    turned_q, turned_k = (genfast.rotary(t, cos, sin, positions, interleaved=True) for t in (q, k))
    caches = [(k_cache.clone(), v_cache.clone()) for _ in range(2)]
    got = fa3.flash_attn_with_kvcache(q, *caches[0], k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=held,
                                      attention_chunk=5, impl=impl)
    expected = fa3.flash_attn_with_kvcache(turned_q, *caches[1], turned_k, v, cache_seqlens=held, attention_chunk=5,
                                           impl=impl)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(caches[0][0], caches[1][0])


def test_with_kvcache_equals_flash_attention_2s():
    """Without FlashAttention 3's own arguments, its flash_attn_with_kvcache is FlashAttention 2's
    (page_table for block_table)."""
    k_cache, v_cache, table = _cache(True, v_dim=DIM)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(BATCH, 1, HEADS, DIM, generator=g)
    k, v = torch.randn(BATCH, 1, KV_HEADS, DIM, generator=g), torch.randn(BATCH, 1, KV_HEADS, DIM, generator=g)
    held = torch.tensor([6, 0, 13], dtype=torch.int32)
    angles = torch.arange(CAPACITY, dtype=torch.float64)[:, None] * 0.7 ** torch.arange(4)
    rotary = dict(rotary_cos=angles.cos().float(), rotary_sin=angles.sin().float())
    caches = [(k_cache.clone(), v_cache.clone()) for _ in range(2)]
    got = fa3.flash_attn_with_kvcache(q, *caches[0], k, v, cache_seqlens=held, page_table=table, causal=True,
                                      softcap=3.0, window_size=(5, 0), return_softmax_lse=True, **rotary)
    expected = fa2.flash_attn_with_kvcache(q, *caches[1], k, v, cache_seqlens=held, block_table=table, causal=True,
                                           softcap=3.0, window_size=(5, 0), return_softmax_lse=True, **rotary)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("layout, chunk", [("padded", 5), ("paged", 8), ("paged", 6), ("cache_batch_idx", 5),
                                           ("leftpad", 5)], ids=str)
@pytest.mark.parametrize("impl", fused_impls())
def test_with_kvcache_chunks(layout, chunk, causal, impl):
    """attention_chunk over a KV cache (Llama 4's decoding): 3 queries per sequence after 2 new keys
    appended to 6, 0 and 13 held; each sequence's rows against the reference over its keys, for a
    padded cache, a paged one whose chunk holds whole pages (8 keys, pages of 4) or not (6), rows
    chosen by cache_batch_idx, and keys that start at cache_leftpad (2, 0 and 5)."""
    skip_unless_supported(impl, "cpu")
    k_cache, v_cache, table = _cache(layout == "paged", seed=4)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(BATCH, 3, HEADS, DIM, generator=g)
    k, v = torch.randn(BATCH, 2, KV_HEADS, DIM, generator=g), torch.randn(BATCH, 2, KV_HEADS, V_DIM, generator=g)
    held = torch.tensor([6, 0, 13], dtype=torch.int32)
    options = {"paged": dict(page_table=table), "cache_batch_idx": dict(cache_batch_idx=torch.tensor(
        [2, 0, 1], dtype=torch.int32)), "leftpad": dict(cache_leftpad=torch.tensor([2, 0, 5], dtype=torch.int32))}
    options = options.get(layout, {})
    caches = k_cache.clone(), v_cache.clone()
    out, lse, *_ = fa3.flash_attn_with_kvcache(q, *caches, k, v, cache_seqlens=held, causal=causal,
                                               attention_chunk=chunk, return_softmax_lse=True, impl=impl, **options)
    rows = options.get("cache_batch_idx", torch.arange(BATCH))
    start = options.get("cache_leftpad", torch.zeros(BATCH, dtype=torch.int32))
    for n in range(BATCH):
        if table is None:
            keys, values = (c[int(rows[n]), int(start[n]):int(held[n]) + 2] for c in caches)
        else:
            keys, values = (_cache_keys(c, table, n, int(held[n]) + 2) for c in caches)
        exact, low = (_sequence_attention(q[n].to(d), keys.to(d), values.to(d), causal=causal, attention_chunk=chunk)
                      for d in (torch.float64, torch.float32))
        assert_error_ratio(out[n], exact[0], low[0], msg=f"out of sequence {n}")
        assert_error_ratio(lse[n], exact[1], low[1], msg=f"softmax_lse of sequence {n}")


# flash_attn_combine

@pytest.mark.parametrize("impl", fused_impls() + ["reference"])
def test_combine_merges_attentions_over_parts_of_the_keys(impl):
    """Keys split in three: the parts' float32 outputs and lse combined (genfast.merge_attention with
    backend impl) equal attention over all the keys (out in float32, bfloat16 or into `out`); a row
    that no part saw gets 0 and -inf; the gradients of the parts."""
    skip_unless_supported(impl, "cpu")
    combine = functools.partial(fa3.flash_attn_combine, impl=impl)
    (q, k, v, _), _, _ = _inputs([9] * 2, [30] * 2, seed=7)
    q, k, v = (t.view(2, -1, *t.shape[1:]) for t in (q, k, v))
    parts = [fa3.flash_attn_func(q, k[:, a:b], v[:, a:b], return_attn_probs=True) for a, b in ((0, 10), (10, 21),
                                                                                             (21, 30))]
    out_partial = torch.stack([o for o, _ in parts])
    lse_partial = torch.stack([lse.transpose(1, 2) for _, lse in parts])
    out, lse = combine(out_partial, lse_partial)
    assert out.shape == (2, 9, HEADS, V_DIM) and out.dtype == torch.float32 and lse.shape == (2, 9, HEADS)
    assert lse.transpose(1, 2).is_contiguous(), "lse is FlashAttention 3's view of a (batch, heads, seqlen) tensor"
    for n in range(2):
        exact, low = (_sequence_attention(q[n].to(d), k[n].to(d), v[n].to(d)) for d in (torch.float64, torch.float32))
        assert_error_ratio(out[n], exact[0], low[0], msg="out")
        assert_error_ratio(lse[n], exact[1].T, low[1].T, msg="lse")
    half, _ = combine(out_partial, lse_partial, out_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, out.to(torch.bfloat16))
    into = torch.empty_like(out)
    got, got_lse = combine(out_partial, lse_partial, out=into)  # written where it lies
    assert got is into and torch.equal(into, out)
    assert torch.equal(got_lse, lse) and got_lse.transpose(1, 2).is_contiguous()
    hidden = lse_partial.clone()
    hidden[:, 0, 0, 0] = float("-inf")
    out, lse = combine(out_partial, hidden)
    assert lse[0, 0, 0] == float("-inf") and torch.equal(out[0, 0, 0], torch.zeros(V_DIM))
    # A part that saw nothing may hold garbage (an unwritten buffer): it weighs nothing, NaN or not;
    # a NaN in a part that weighs propagates.
    garbage = out_partial.clone()
    garbage[0, 1, 2] = float("nan")
    hidden = lse_partial.clone()
    hidden[0, 1, 2] = float("-inf")
    expected = combine(out_partial, hidden)
    got = combine(garbage, hidden)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert combine(garbage, lse_partial)[0][1, 2].isnan().all()
    # The gradients reach the parts: a part's weight in the merge is its share of the whole.
    leaves = out_partial.clone().requires_grad_(), lse_partial.clone().requires_grad_()
    merged, merged_lse = combine(*leaves)
    grad_out, grad_lse = torch.autograd.grad(merged.sum() + merged_lse.sum(), leaves)
    share = torch.exp(lse_partial - merged_lse.detach())
    torch.testing.assert_close(grad_out, share[..., None].expand_as(grad_out))
    torch.testing.assert_close(grad_lse, share * (1 + (out_partial - merged.detach()).sum(-1)))


def test_compiles_with_fullgraph():
    """Chunked attention with qv, value and gradients, under torch.compile(fullgraph=True)."""
    from conftest import assert_compiles_like_eager

    (q, k, v, qv), _, _ = _inputs([12] * 2, [12] * 2, with_qv=True)
    leaves = [t.view(2, 12, *t.shape[1:]).requires_grad_() for t in (q, k, v, qv)]
    assert_compiles_like_eager(lambda q, k, v, qv: fa3.flash_attn_func(q, k, v, qv=qv, causal=True,
                                                                        attention_chunk=5), leaves)


def test_bad_input_names_the_argument():
    (q, k, v, _), cu_q, cu_k = _inputs([5, 7], [5, 7])
    dense = [t.view(2, -1, *t.shape[1:]) for t in (q, k, v)]
    k_cache, v_cache, _ = _cache(False)
    held = torch.tensor([1, 2], dtype=torch.int32)
    for call, error, match in (
            (lambda: fa3.flash_attn_func(*dense, attention_chunk=-2), ValueError, "attention_chunk must be"),
            (lambda: fa3.flash_attn_func(*dense, qv=dense[0]), ValueError, "qv must be"),
            (lambda: fa3.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 7, 7, seqused_q=held.long()), ValueError,
             "seqused_q must be an int32"),
            (lambda: fa3.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 7, 7, seqused_k=held[:1]), ValueError,
             "seqused_k must be an int32"),
            (lambda: fa3.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 7, 7, seqused_k=held * 4), ValueError,
             "seqused_k\\[1\\] = 8 exceeds sequence 1's 7 rows"),
            (lambda: fa3.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 7, 7, seqused_q=held * 4, attention_chunk=2),
             ValueError, "seqused_q\\[1\\] = 8 exceeds"),
            (lambda: fa3.flash_attn_qkvpacked_func(torch.zeros(2, 5, 8, DIM)), ValueError, "num_heads_q"),
            (lambda: fa3.flash_attn_with_kvcache(dense[0][:, :1], k_cache, v_cache, k[:12], v[:12].repeat(1, 1, 2),
                                                 cache_seqlens=held, cu_seqlens_k_new=cu_k), ValueError,
             "v must be \\(total_new, 2, 8\\)"),
            (lambda: fa3.flash_attn_with_kvcache(dense[0][:, :1], k_cache, v_cache, k[:12], v[:12], cache_seqlens=held,
                                                 cu_seqlens_k_new=cu_k.long()), ValueError,
             "cu_seqlens_k_new must be an int32"),
            (lambda: fa3.flash_attn_with_kvcache(dense[0][:, :1], k_cache, v_cache, k[:12], v[:12],
                                                 cache_seqlens=torch.tensor([20, 1], dtype=torch.int32),
                                                 cu_seqlens_k_new=cu_k), ValueError, "do not fit the 24 keys"),
            (lambda: fa3.flash_attn_with_kvcache(q, k_cache, v_cache, cu_seqlens_q=cu_q), ValueError,
             "max_seqlen_q"),
            (lambda: fa3.flash_attn_combine(torch.zeros(2, 1, 3, 4, 5), torch.zeros(2, 1, 3, 5)), ValueError,
             "lse_partial must be")):
        with pytest.raises(error, match=match):
            call()


@pytest.mark.parametrize("impl", fused_impls())
def test_with_kvcache_windows_that_limit_nothing_turn_queries_as_none(impl):
    """A cache call's queries are turned at their own positions where the call is causal or local,
    else all at the first: FlashAttention 3 counts a window local only after dropping a left side of
    at least the cache's keys less one and a right side of at least the queries less one
    (FlashAttention 2: the keys, for both). Such windows give the call without a window; a side one
    shorter turns the queries in sequence (the mask the same: 15 keys at most in caches of 24)."""
    skip_unless_supported(impl, "cpu")
    k_cache, v_cache, q, k, v, held, cos, sin = _rotary_cache_call(5, 3)
    tables = dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=False)

    def run(module, window_size):
        return module.flash_attn_with_kvcache(q, k_cache.clone(), v_cache.clone(), k, v, cache_seqlens=held,
                                              window_size=window_size, impl=impl, **tables)

    for module, left, right in ((fa3, CAPACITY - 1, 3 - 1), (fa2, CAPACITY, CAPACITY)):
        none = run(module, (-1, -1))
        for window in ((left, -1), (-1, right), (left, right)):
            torch.testing.assert_close(run(module, window), none, atol=0, rtol=0)
        for window in ((left - 1, -1), (left - 1, right)):
            assert not torch.allclose(run(module, window), none), (module.__name__, window)
    # softcap <= 0 is off, as in FlashAttention.
    for module in (fa2, fa3):
        torch.testing.assert_close(run(module, (-1, -1)), module.flash_attn_with_kvcache(
            q, k_cache.clone(), v_cache.clone(), k, v, cache_seqlens=held, softcap=-1.0, impl=impl, **tables))
