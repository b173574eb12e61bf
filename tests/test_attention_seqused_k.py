"""genfast.attention_varlen's seqused_k (FlashAttention 3's; flash_attn_with_kvcache's cache_seqlens):
sequences that use only the first keys of their rows, as in decoding from a padded KV cache, against
reference.varlen_attention and against the same sequences packed without padding; the unused rows,
NaN as an uninitialized cache may hold, get no weight and a zero gradient; dropout's stream, sinks,
rows with no key, opcheck, torch.compile and bad input."""

import pytest
import torch

import genfast
from conftest import assert_compiles_like_eager, fused_impls, skip_unless_supported
from test_attention_varlen import _compare

CACHE = 40  # each sequence's rows of k and v: a padded cache of this length
USED = [17, 0, 40, 1, 33]
LENGTHS_Q = [5, 1, 3, 1, 33]


def cache_inputs(used, lengths_q, cache=CACHE, heads=4, kv_heads=2, dim=16, v_dim=None, dtype=torch.float32,
                 device="cpu", seed=0, unused=float("nan")):
    """q packed by lengths_q; k and v a (batch, cache) padded cache flattened, its rows past each
    sequence's used keys set to `unused`; cu_seqlens_q, cu_seqlens_k (n cache), the maxima, seqused_k."""
    g = torch.Generator().manual_seed(seed)
    batch = len(used)
    q = torch.randn(sum(lengths_q), heads, dim, generator=g)
    k = torch.randn(batch, cache, kv_heads, dim, generator=g)
    v = torch.randn(batch, cache, kv_heads, v_dim or dim, generator=g)
    for n, count in enumerate(used):
        k[n, count:] = unused
        v[n, count:] = unused
    cu_q = torch.tensor([0] + lengths_q).cumsum(0).to(torch.int32)
    cu_k = (torch.arange(batch + 1) * cache).to(torch.int32)
    seqused_k = torch.tensor(used, dtype=torch.int32)
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k.flatten(0, 1), v.flatten(0, 1)))
    return q, k, v, cu_q.to(device), cu_k.to(device), max(lengths_q), cache, seqused_k.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", fused_impls())
def test_matches_reference(dtype, impl):
    """o, lse and the gradients by the error-ratio rule, bottom-right causal as decoding takes it;
    the unused rows finite here (the reference reads none of them either way)."""
    skip_unless_supported(impl, "cpu", dtype)
    *args, seqused_k = cache_inputs(USED, LENGTHS_Q, dtype=dtype, unused=3.0)
    _compare(impl, args, seqused_k=seqused_k, causal="bottom_right")


@pytest.mark.parametrize("options", [dict(), dict(window=(6, 2)), dict(softcap=2.0, scale=0.4),
                                     dict(alibi_slopes=torch.tensor([0.5, 0.25, 0.1, 0.05])),
                                     dict(dropout_p=0.25, seed=3), dict(causal="bottom_right", deterministic=True),
                                     dict(sinks=torch.tensor([-1.0, 0.5, 2.0, float("-inf")]))], ids=str)
@pytest.mark.parametrize("impl", fused_impls())
def test_options_match_reference(options, impl):
    """Dropout keeps the packed stream's element of key column cu_seqlens_k[n] + j."""
    skip_unless_supported(impl, "cpu")
    *args, seqused_k = cache_inputs(USED, LENGTHS_Q, v_dim=24, unused=-2.0)
    _compare(impl, args, seqused_k=seqused_k, **options)


@pytest.mark.parametrize("impl", fused_impls())
def test_equals_the_sequences_packed_without_padding(impl):
    """NaN in the unused rows changes nothing: o and lse are those of the keys packed alone, and the
    unused rows' gradients are zero."""
    skip_unless_supported(impl, "cpu")
    q, k, v, cu_q, cu_k, mq, mk, seqused_k = cache_inputs(USED, LENGTHS_Q)
    rows = torch.cat([torch.arange(n * CACHE, n * CACHE + count) for n, count in enumerate(USED)])
    cu_packed = torch.tensor([0] + USED).cumsum(0).to(torch.int32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, lse = genfast.attention_varlen(*leaves, cu_q, cu_k, mq, mk, causal="bottom_right", seqused_k=seqused_k,
                                      return_lse=True, impl=impl)
    expected, expected_lse = genfast.attention_varlen(q, k[rows], v[rows], cu_q, cu_packed, mq, max(USED),
                                                      causal="bottom_right", return_lse=True, impl=impl)
    torch.testing.assert_close(o, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, expected_lse, atol=1e-6, rtol=1e-5)
    grad_q, grad_k, grad_v = torch.autograd.grad(o.sum() + torch.where(lse.isfinite(), lse, 0).sum(), leaves)
    unused = torch.ones(k.shape[0], dtype=torch.bool)
    unused[rows] = False
    assert grad_q.isfinite().all() and grad_k[~unused].isfinite().all() and grad_v[~unused].isfinite().all()
    assert torch.equal(grad_k[unused], torch.zeros_like(grad_k[unused]))
    assert torch.equal(grad_v[unused], torch.zeros_like(grad_v[unused]))


@pytest.mark.parametrize("impl", fused_impls())
def test_max_seqlen_k_may_bound_the_keys_used_alone(impl):
    """max_seqlen_k = max(seqused_k), below the rows of each sequence, as FlashAttention 3 takes it:
    the o, lse and gradients of max_seqlen_k = the rows. Past the rows' 128-key blocks, so that the
    CPU's backward counts fewer key blocks by it."""
    skip_unless_supported(impl, "cpu")
    used = [117, 0, 125, 1, 12]
    q, k, v, cu_q, cu_k, mq, mk, seqused_k = cache_inputs(used, LENGTHS_Q, cache=300, unused=3.0)
    results = []
    for max_k in (mk, max(used)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o, lse = genfast.attention_varlen(*leaves, cu_q, cu_k, mq, max_k, causal="bottom_right", seqused_k=seqused_k,
                                          return_lse=True, impl=impl)
        grads = torch.autograd.grad(o.square().sum() + torch.where(lse.isfinite(), lse, 0).sum(), leaves)
        results.append((o, lse, *grads))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", fused_impls())
def test_sequences_with_no_used_key(impl):
    """o = 0 and lse = -inf, or the sink with sinks."""
    skip_unless_supported(impl, "cpu")
    q, k, v, cu_q, cu_k, mq, mk, seqused_k = cache_inputs([0, 0], [2, 3])
    for max_k in (mk, 0):  # 0: max(seqused_k), as FlashAttention 3 takes it
        o, lse = genfast.attention_varlen(q, k, v, cu_q, cu_k, mq, max_k, seqused_k=seqused_k, return_lse=True,
                                          impl=impl)
        assert torch.equal(o, torch.zeros_like(o)) and bool((lse == float("-inf")).all())
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0])
    o, lse = genfast.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, seqused_k=seqused_k, sinks=sinks,
                                      return_lse=True, impl=impl)
    assert torch.equal(o, torch.zeros_like(o)) and torch.equal(lse, sinks[:, None].expand_as(lse))


@pytest.mark.parametrize("impl", fused_impls())
def test_opcheck_and_compile(impl):
    skip_unless_supported(impl, "cpu")
    q, k, v, cu_q, cu_k, mq, mk, seqused_k = cache_inputs([3, 7, 0], [2, 1, 4], cache=9, heads=2, kv_heads=1,
                                                          dim=8, unused=1.0)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    suffix = "" if impl == "native" else "_triton"
    forward, backward = (getattr(torch.ops.genfast, "attention_varlen_" + name + suffix)
                         for name in ("forward", "backward"))
    options = (None, 0.3, 0.0, -3, 0, 0.0, 0, 0, False, None)
    torch.library.opcheck(forward, (*leaves, cu_q, cu_k, mq, mk, *options, seqused_k))
    o, lse = forward(q, k, v, cu_q, cu_k, mq, mk, *options, seqused_k)
    torch.library.opcheck(backward, (torch.randn_like(o), torch.randn_like(lse), q, k, v, o, lse, cu_q, cu_k, mq, mk,
                                     *options, seqused_k))

    def layer(q, k, v):
        return genfast.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal="bottom_right", seqused_k=seqused_k,
                                        impl=impl)

    assert_compiles_like_eager(layer, leaves)


def test_bad_seqused_k_names_the_argument():
    q, k, v, cu_q, cu_k, mq, mk, seqused_k = cache_inputs([3, 5], [2, 2], cache=6)
    f = genfast.attention_varlen
    for bad in (seqused_k[:1], seqused_k.long(), seqused_k[None], [3, 5]):
        with pytest.raises(ValueError, match=r"seqused_k must be an int32 tensor of shape \(batch,\) = \(2,\)"):
            f(q, k, v, cu_q, cu_k, mq, mk, seqused_k=bad)
    with pytest.raises(ValueError, match="there is no seqused_k"):
        f(q, k, v, cu_q, cu_q, mq, mk, seqused_k=seqused_k, causal="top_left")
    if genfast._backend.native_runs_on("cpu"):
        for bad in ([3, 7], [-1, 5]):
            with pytest.raises(RuntimeError, match=r"seqused_k\[\d\] must be in 0 \.\. 6"):
                f(q, k, v, cu_q, cu_k, mq, mk, seqused_k=torch.tensor(bad, dtype=torch.int32), impl="native")
        with pytest.raises(RuntimeError, match=r"seqused_k\[1\] must be at most max_seqlen_k \(4\), got 5"):
            f(q, k, v, cu_q, cu_k, mq, 4, seqused_k=seqused_k, impl="native")
