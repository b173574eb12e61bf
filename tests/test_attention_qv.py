"""genfast.attention_varlen's and genfast.attention's qv, multi-head latent attention's absorbed form
(DeepSeek's decoding, FlashAttention 3's qv): the scores scale (q k^T + qv v^T). The reference's
definition, gradients checked in float64; every backend against it (the forwards of the CPU and
Triton reading qv in place; gradients through the concatenation it stands for), packed, paged,
dense, decoding with stacked heads, GQA, options; opcheck and torch.compile; empty, NaN,
non-contiguous and bad input; on a GPU, DeepSeek's 64 + 512 from a paged cache without
synchronising."""

import importlib

import pytest
import torch

import genfast
from genfast.reference.attention import attention, varlen_attention
from genfast.testing.tolerances import assert_error_ratio
from conftest import fused_impls, skip_unless_runs, skip_unless_supported
from test_attention_paged import paged_inputs

LENGTHS_Q = [3, 1, 0, 20, 1]
LENGTHS_K = [300, 129, 5, 256, 0]


def packed_inputs(lengths_q, lengths_k, heads=4, kv_heads=2, dim=16, v_dim=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lengths_q), heads, dim, generator=g)
    k = torch.randn(sum(lengths_k), kv_heads, dim, generator=g)
    v = torch.randn(sum(lengths_k), kv_heads, v_dim, generator=g)
    qv = torch.randn(sum(lengths_q), heads, v_dim, generator=g)
    cu_q, cu_k = (torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
                  for lengths in (lengths_q, lengths_k))
    return [t.to(dtype) for t in (q, k, v, qv)], cu_q, cu_k


def _layouts(qv):
    """qv (total, heads, Dv) with its rows and heads apart in other strides: a slice of wider rows,
    and heads-major."""
    return torch.cat((qv, qv), -1)[..., :qv.shape[-1]], qv.transpose(0, 1).contiguous().transpose(0, 1)


def _compare(impl, q, k, v, qv, cu_q, cu_k, max_q, max_k, **options):
    """o and lse against the reference in float64 and in the inputs' dtype (error-ratio rule)."""
    with torch.no_grad():
        o, lse = genfast.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, qv=qv, impl=impl, return_lse=True,
                                          **options)

    def reference(dtype):
        floats = {key: val.to(dtype) if isinstance(val, torch.Tensor) and val.is_floating_point() else val
                  for key, val in options.items()}
        return varlen_attention(*(t.to(dtype) for t in (q, k, v)), cu_q, cu_k, qv=qv.to(dtype), enable_gqa=True,
                                return_lse=True, **floats)

    exact, low = reference(torch.float64), reference(q.dtype)
    assert o.dtype == q.dtype and o.shape == (q.shape[0], q.shape[1], v.shape[-1])
    for name, got, e, lo in zip(("o", "lse"), (o, lse), exact, low):
        assert_error_ratio(got, e, lo.to(got.dtype), ratio=2.0, msg=name)
    return o, lse


def test_reference_is_attention_of_the_concatenation():
    """scale (q k^T + qv v^T), default scale (D + Dv)^-1/2: attention of cat(q, qv) over cat(k, v)
    with values v, grouped heads and the options included."""
    (q, k, v, qv), _, _ = packed_inputs([7], [9], dtype=torch.float64)
    dense = [t.transpose(0, 1)[None] for t in (q, k, v, qv)]
    options = dict(causal="bottom_right", softcap=3.0, sinks=torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64),
                   return_lse=True, enable_gqa=True)
    o, lse = attention(*dense[:3], qv=dense[3], **options)
    wide_o, wide_lse = attention(torch.cat((dense[0], dense[3]), -1), torch.cat((dense[1], dense[2]), -1), dense[2],
                                 **options)
    torch.testing.assert_close(o, wide_o, rtol=0, atol=1e-14)
    torch.testing.assert_close(lse, wide_lse, rtol=0, atol=1e-14)


def test_reference_gradients():
    """gradcheck of the reference in float64, qv's gradient among them."""
    (q, k, v, qv), cu_q, cu_k = packed_inputs([3, 2], [4, 5], heads=2, kv_heads=1, dim=3, v_dim=5,
                                              dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (q, k, v, qv)]

    def run(q, k, v, qv):
        return varlen_attention(q, k, v, cu_q, cu_k, qv=qv, enable_gqa=True, causal="bottom_right", return_lse=True)

    assert torch.autograd.gradcheck(run, leaves)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", fused_impls())
def test_packed_matches_reference(dtype, impl):
    """Prefill-like packed sequences, grouped heads, bottom-right causal."""
    skip_unless_supported(impl, "cpu", dtype)
    (q, k, v, qv), cu_q, cu_k = packed_inputs([5, 1, 17, 0], [9, 30, 17, 4], dtype=dtype)
    _compare(impl, q, k, v, qv, cu_q, cu_k, 17, 30, causal="bottom_right")


@pytest.mark.parametrize("options", [dict(window=(6, 0)), dict(softcap=2.0, scale=0.3),
                                     dict(sinks=torch.tensor([-1.0, 0.5, 2.0, float("-inf")])),
                                     dict(alibi_slopes=torch.tensor([0.5, 0.25, 0.1, 0.05])),
                                     dict(seqused_k=torch.tensor([200, 7, 0, 255, 0], dtype=torch.int32),
                                          causal="bottom_right")], ids=str)
@pytest.mark.parametrize("impl", fused_impls())
def test_paged_options_match_reference(options, impl):
    """A paged cache, pages shuffled, NaN where no key is (read, it would show), with the options."""
    skip_unless_supported(impl, "cpu")
    q, k, v, cu_q, cu_k, max_q, max_k, table = paged_inputs(LENGTHS_Q, LENGTHS_K, v_dim=32, seed=3)
    qv = torch.randn(q.shape[0], q.shape[1], 32, generator=torch.Generator().manual_seed(4))
    _compare(impl, q, k, v, qv, cu_q, cu_k, max_q, max_k, block_table=table, **options)


@pytest.mark.parametrize("page_size", [1, 16, 48])
@pytest.mark.parametrize("impl", fused_impls())
def test_small_pages(page_size, impl):
    """Pages smaller than a key block (SGLang's 1, vLLM's 16): the values qv reads across pages."""
    skip_unless_supported(impl, "cpu")
    q, k, v, cu_q, cu_k, max_q, max_k, table = paged_inputs([2, 1, 17], [130, 7, 60], page_size=page_size, v_dim=24,
                                                            seed=12)
    qv = torch.randn(q.shape[0], q.shape[1], 24, generator=torch.Generator().manual_seed(13))
    _compare(impl, q, k, v, qv, cu_q, cu_k, max_q, max_k, block_table=table, causal="bottom_right")


@pytest.mark.parametrize("impl", fused_impls())
def test_dropout(impl):
    """Dropout with qv keys the same Philox stream as without it: the forward reading qv in place,
    the concatenation (a gradient asked) and the reference, from one seed."""
    skip_unless_supported(impl, "cpu")
    (q, k, v, qv), cu_q, cu_k = packed_inputs([5, 1, 12], [9, 30, 7], seed=14)

    def run(backend, grad=False):
        inputs = [t.clone().requires_grad_(grad) for t in (q, k, v, qv)]
        return genfast.attention_varlen(*inputs[:3], cu_q, cu_k, 12, 30, qv=inputs[3], dropout_p=0.3,
                                        generator=genfast.PhiloxGenerator(5), impl=backend).detach()

    with torch.no_grad():
        in_place = run(impl)
    exact = varlen_attention(*(t.double() for t in (q, k, v)), cu_q, cu_k, qv=qv.double(), enable_gqa=True,
                             dropout_p=0.3, dropout_seed=5, dropout_offset=0)
    low = run("reference")
    assert_error_ratio(in_place, exact, low, ratio=2.0, msg="o")
    assert_error_ratio(run(impl, grad=True), exact, low, ratio=2.0, msg="o of the concatenation")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("impl", fused_impls())
def test_decoding_with_many_heads_on_one_kv_head(dtype, impl):
    """DeepSeek's decoding shape, scaled down: one query a sequence, 16 query heads on one kv head,
    qk dim 8 (its rope part) and qv dim 64 (its latent), long caches: the plans that stack heads and
    split the keys."""
    skip_unless_supported(impl, "cpu", dtype)
    (q, k, v, qv), cu_q, cu_k = packed_inputs([1, 1, 1], [700, 130, 257], heads=16, kv_heads=1, dim=8, v_dim=64,
                                              dtype=dtype, seed=5)
    o, _ = _compare(impl, q, k, v, qv, cu_q, cu_k, 1, 700, causal="bottom_right")
    # qv's rows and heads apart as other layouts lay them: the same result, bit for bit.
    for layout in _layouts(qv):
        with torch.no_grad():
            again = genfast.attention_varlen(q, k, v, cu_q, cu_k, 1, 700, qv=layout, impl=impl, causal="bottom_right")
        assert torch.equal(again, o)


@pytest.mark.parametrize("impl", fused_impls())
def test_value_head_dims_past_256(impl):
    """A qv and v of 300 channels (Triton's tiles for head dims past 256, which the qv tile's
    registers narrow), a packed prefill and a decoding sequence, float16."""
    skip_unless_supported(impl, "cpu", torch.float16)
    (q, k, v, qv), cu_q, cu_k = packed_inputs([17, 1], [40, 23], heads=2, kv_heads=1, dim=16, v_dim=300,
                                              dtype=torch.float16, seed=11)
    _compare(impl, q, k, v, qv, cu_q, cu_k, 17, 40, causal="bottom_right")


@pytest.mark.parametrize("impl", fused_impls())
def test_reads_qv_in_place_and_concatenates_for_gradients(impl, monkeypatch):
    """Without gradients the forwards of the CPU and Triton take qv themselves: nothing is
    concatenated. Asked for gradients, the call runs on the concatenation, and qv gets its gradient."""
    skip_unless_supported(impl, "cpu")
    widths = []
    cat = torch.cat

    def spy(tensors, *args, **kwargs):
        widths.append(tuple(t.shape[-1] for t in tensors))
        return cat(tensors, *args, **kwargs)

    (q, k, v, qv), cu_q, cu_k = packed_inputs([3, 4], [5, 9])
    monkeypatch.setattr(torch, "cat", spy)
    with torch.no_grad():
        genfast.attention_varlen(q, k, v, cu_q, cu_k, 4, 9, qv=qv, impl=impl)
    assert widths == []
    leaves = [t.clone().requires_grad_() for t in (q, k, v, qv)]
    o = genfast.attention_varlen(*leaves[:3], cu_q, cu_k, 4, 9, qv=leaves[3], impl=impl, causal="bottom_right")
    assert widths == [(16, 32), (16, 32)]  # cat(q, qv) and cat(k, v)
    monkeypatch.undo()
    grad_o = torch.randn_like(o)
    o.backward(grad_o)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v, qv)]
    expected = varlen_attention(*exact[:3], cu_q, cu_k, qv=exact[3], enable_gqa=True, causal="bottom_right")
    expected.backward(grad_o.double())
    low = [t.detach().requires_grad_() for t in (q, k, v, qv)]
    varlen_attention(*low[:3], cu_q, cu_k, qv=low[3], enable_gqa=True, causal="bottom_right").backward(grad_o)
    for name, leaf, e, lo in zip(("q", "k", "v", "qv"), leaves, exact, low):
        assert_error_ratio(leaf.grad, e.grad, lo.grad, ratio=3.0, msg=f"grad of {name}")


@pytest.mark.parametrize("impl", fused_impls())
def test_gradients_match_reference(impl):
    """Every backend's gradients with qv (the concatenation's backward), the sinks' among them (a
    gradient asked of the sinks alone takes that path too), by the error-ratio rule."""
    skip_unless_supported(impl, "cpu")
    (q, k, v, qv), cu_q, cu_k = packed_inputs([5, 1, 12], [9, 30, 7], seed=6)
    sinks = torch.tensor([0.5, -1.0, 1.5, 0.0])
    grad_o = torch.randn(q.shape[0], q.shape[1], v.shape[-1], generator=torch.Generator().manual_seed(7))

    def grads(dtype, backend):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, qv, sinks)]
        o = genfast.attention_varlen(*leaves[:3], cu_q, cu_k, 12, 30, qv=leaves[3], sinks=leaves[4],
                                     causal="bottom_right", window=(5, 0), impl=backend)
        o.backward(grad_o.to(dtype))
        return [t.grad for t in leaves]

    got, exact, low = grads(torch.float32, impl), grads(torch.float64, "reference"), grads(torch.float32, "reference")
    with torch.no_grad():
        alone = genfast.attention_varlen(q, k, v, cu_q, cu_k, 12, 30, qv=qv, sinks=sinks.clone().requires_grad_(),
                                         causal="bottom_right", window=(5, 0), impl=impl)
    o = genfast.attention_varlen(q, k, v, cu_q, cu_k, 12, 30, qv=qv, sinks=sinks.clone().requires_grad_(),
                                 causal="bottom_right", window=(5, 0), impl=impl)
    torch.testing.assert_close(o.detach(), alone, atol=1e-5, rtol=1e-5)
    for name, g, e, lo in zip(("q", "k", "v", "qv", "sinks"), got, exact, low):
        assert_error_ratio(g, e, lo, ratio=3.0, msg=f"grad of {name}")


@pytest.mark.parametrize("impl", fused_impls() + ["reference"])
def test_empty_nan_and_non_contiguous(impl):
    """No queries; NaN in one query's qv reaches its row alone; qv a strided slice, a slice of wider
    rows, heads-major."""
    skip_unless_runs(impl, "cpu")
    (q, k, v, qv), cu_q, cu_k = packed_inputs([3, 4], [5, 9])
    empty = genfast.attention_varlen(q[:0], k, v, torch.zeros(3, dtype=torch.int32), cu_k, 0, 9, qv=qv[:0],
                                     impl=impl)
    assert empty.shape == (0, 4, 32)
    poisoned = qv.clone()
    poisoned[4, 1, 3] = float("nan")
    with torch.no_grad():
        o = genfast.attention_varlen(q, k, v, cu_q, cu_k, 4, 9, qv=poisoned, impl=impl)
        clean = genfast.attention_varlen(q, k, v, cu_q, cu_k, 4, 9, qv=qv, impl=impl)
        strided = torch.randn(qv.shape[0], qv.shape[1], 2 * qv.shape[2])[..., ::2]
        strided.copy_(qv)
        again = [genfast.attention_varlen(q, k, v, cu_q, cu_k, 4, 9, qv=t, impl=impl) for t in (strided, *_layouts(qv))]
    assert o[4, 1].isnan().all()
    nan_rows = o.isnan().any(-1)
    assert nan_rows.sum() == 1 and torch.equal(o[~nan_rows], clean[~nan_rows])
    for result in again:
        torch.testing.assert_close(result, clean, rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["native", pytest.param("triton", marks=pytest.mark.triton), "reference"])
def test_bad_qv_names_the_argument(impl):
    skip_unless_runs(impl, "cpu")
    (q, k, v, qv), cu_q, cu_k = packed_inputs([3, 4], [5, 9])
    for bad in (qv[:, :, :16], qv[:5], qv.double(), qv.to("meta"), qv.tolist()):
        with pytest.raises(ValueError, match=r"qv must be q's shape with v's head dim, \(7, 4, 32\)"):
            genfast.attention_varlen(q, k, v, cu_q, cu_k, 4, 9, qv=bad, impl=impl)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="qv must be"):
        genfast.attention_varlen(q, k, v, cu_q, cu_k, 4, 9, qv=qv.tolist(), impl=impl)


@pytest.mark.parametrize("impl", fused_impls())
def test_ops_check_qv_and_have_no_backward_of_it(impl):
    """The ops, called directly: a bad qv named; qv asking for gradients raises (genfast.
    attention_varlen gives them through the concatenation)."""
    skip_unless_supported(impl, "cpu")
    (q, k, v, qv), cu_q, cu_k = packed_inputs([3, 4], [5, 9])
    op = getattr(torch.ops.genfast, "attention_varlen_forward" + ("" if impl == "native" else "_triton"))
    options = (None, 0.3, 0.0, -3, 0, 0.0, 0, 0, False, None, None, None)
    for bad in (qv[:, :, :8], qv[:6], qv.double()):
        with pytest.raises((ValueError, RuntimeError), match="qv must"):
            op(q, k, v, cu_q, cu_k, 4, 9, *options, bad)
    with pytest.raises(RuntimeError, match="qv serves inference and has no backward here"):
        op(q, k, v, cu_q, cu_k, 4, 9, *options, qv.clone().requires_grad_())


@pytest.mark.parametrize("impl", fused_impls())
def test_opcheck_and_compile(impl):
    """The op of each backend with qv under opcheck; attention_varlen with qv under
    torch.compile(fullgraph=True)."""
    skip_unless_supported(impl, "cpu")
    (q, k, v, qv), cu_q, cu_k = packed_inputs([2, 1], [13, 7], heads=2, kv_heads=1, dim=8, v_dim=16)
    op = getattr(torch.ops.genfast, "attention_varlen_forward" + ("" if impl == "native" else "_triton"))
    options = (None, 0.3, 0.0, -3, 0, 0.0, 0, 0, False, None, None, None)
    torch.library.opcheck(op, (q, k, v, cu_q, cu_k, 2, 13, *options, qv))

    def layer(q, k, v, qv):
        return genfast.attention_varlen(q, k, v, cu_q, cu_k, 2, 13, qv=qv, causal="bottom_right", impl=impl)

    with torch.no_grad():
        torch.testing.assert_close(torch.compile(layer, fullgraph=True)(q, k, v, qv), layer(q, k, v, qv))


@pytest.mark.cuda
@pytest.mark.triton
def test_deepseek_decoding_on_a_gpu_without_synchronising():
    """DeepSeek's 64 + 512 (past the head dims any concatenation could take on a GPU) with 16 query
    heads on one kv head, from a paged cache of vLLM's 16-key pages, under torch's sync debug mode,
    bfloat16, against the reference in float64 by the error-ratio rule; and a prefill chunk with qv."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    for lengths_q, lengths_k in (([1, 1, 1, 1], [700, 130, 1, 4097]), ([37, 1], [300, 90])):
        q, k, v, cu_q, cu_k, max_q, max_k, table = paged_inputs(lengths_q, lengths_k, page_size=16, heads=16,
                                                                kv_heads=1, dim=64, v_dim=512, seed=8)
        qv = torch.randn(q.shape[0], 16, 512, generator=torch.Generator().manual_seed(9))
        gpu = [t.cuda() for t in (q, k, v, qv, cu_q, cu_k, table)]
        gpu[:4] = [t.bfloat16() for t in gpu[:4]]
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.no_grad():
                o, lse = genfast.attention_varlen(*gpu[:3], *gpu[4:6], max_q, max_k, qv=gpu[3], block_table=gpu[6],
                                                  causal="bottom_right", return_lse=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        rounded = [t.bfloat16() for t in (q, k, v, qv)]
        exact, low = (varlen_attention(*(t.to(d) for t in rounded[:3]), cu_q, cu_k, qv=rounded[3].to(d),
                                       block_table=table, enable_gqa=True, causal="bottom_right", return_lse=True)
                      for d in (torch.float64, torch.bfloat16))
        for name, got, e, lo in zip(("o", "lse"), (o, lse), exact, low):
            assert_error_ratio(got.cpu(), e, lo.to(got.dtype), ratio=2.0, msg=f"{name} of {lengths_q}")


@pytest.mark.cuda
@pytest.mark.triton
def test_auto_reads_qv_in_place_on_a_gpu(monkeypatch):
    """Where the CUDA kernels could run the concatenation (64 + 128, bfloat16), "auto" takes Triton's
    forward, which reads qv in place: nothing is concatenated."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    (q, k, v, qv), cu_q, cu_k = packed_inputs([3, 40], [50, 9], dim=64, v_dim=128, dtype=torch.bfloat16, seed=15)
    gpu = [t.cuda() for t in (q, k, v, qv, cu_q, cu_k)]
    widths = []
    cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda tensors, *a, **kw: widths.append(len(tensors)) or cat(tensors, *a, **kw))
    with torch.no_grad():
        o = genfast.attention_varlen(*gpu[:3], *gpu[4:], 40, 50, qv=gpu[3], causal="bottom_right")
    monkeypatch.undo()
    assert widths == []
    exact, low = (varlen_attention(*(t.to(d) for t in (q, k, v)), cu_q, cu_k, qv=qv.to(d), enable_gqa=True,
                                   causal="bottom_right") for d in (torch.float64, torch.bfloat16))
    assert_error_ratio(o.cpu(), exact, low, ratio=2.0, msg="o")
    options = (None, 0.1, 0.0, -3, 0, 0.0, 0, 0, False, None, None, None)
    with pytest.raises(RuntimeError, match="the CUDA kernels take no qv"):
        torch.ops.genfast.attention_varlen_forward(*gpu[:3], *gpu[4:], 40, 50, *options, gpu[3])


# genfast.attention's qv: (B, Hq, Lq, Dv) beside q in SDPA's layout.

def dense_inputs(batch, heads, kv_heads, lq, lk, dim=16, v_dim=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, lq, dim, generator=g)
    k = torch.randn(batch, kv_heads, lk, dim, generator=g)
    v = torch.randn(batch, kv_heads, lk, v_dim, generator=g)
    qv = torch.randn(batch, heads, lq, v_dim, generator=g)
    return [t.to(dtype) for t in (q, k, v, qv)]


def _compare_dense(impl, q, k, v, qv, **options):
    """genfast.attention's o and lse with qv against the reference in float64 and in the inputs' dtype."""
    with torch.no_grad():
        o, lse = genfast.attention(q, k, v, qv=qv, enable_gqa=True, impl=impl, return_lse=True, **options)

    def reference(dtype):
        floats = {key: val.to(dtype) if isinstance(val, torch.Tensor) and val.is_floating_point() else val
                  for key, val in options.items()}
        return attention(*(t.to(dtype) for t in (q, k, v)), qv=qv.to(dtype), enable_gqa=True, return_lse=True,
                         **floats)

    exact, low = reference(torch.float64), reference(q.dtype)
    assert o.dtype == q.dtype and o.shape == qv.shape
    for name, got, e, lo in zip(("o", "lse"), (o, lse), exact, low):
        assert_error_ratio(got, e, lo.to(got.dtype), ratio=2.0, msg=name)


DENSE_OPTIONS = [dict(), dict(causal="bottom_right"), dict(causal="top_left", window=(20, 0)),
                 dict(attn_mask=torch.rand(1, 1, 20, 150, generator=torch.Generator().manual_seed(3)) > 0.3),
                 dict(attn_mask=torch.randn(2, 1, 20, 150, generator=torch.Generator().manual_seed(4))),
                 dict(softcap=2.0, scale=0.3, alibi_slopes=torch.tensor([0.5, 0.25, 0.1, 0.05])),
                 dict(sinks=torch.tensor([0.5, -1.0, 2.0, 0.0]))]


@pytest.mark.parametrize("options", DENSE_OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("impl", fused_impls())
def test_dense_matches_reference(options, impl):
    """Grouped heads, Lq 20 against Lk 150 (past the CPU's blocks of 128 keys), each option."""
    skip_unless_supported(impl, "cpu")
    _compare_dense(impl, *dense_inputs(2, 4, 2, 20, 150), **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", fused_impls())
def test_dense_decoding_with_many_heads_on_one_kv_head(dtype, impl):
    """One query of 16 heads on one kv head (the CPU's stacked heads), DeepSeek's rope 64 beside a
    latent 128 in SDPA's layout; five queries with qv a transposed view of (B, L, H, Dv) rows."""
    skip_unless_supported(impl, "cpu", dtype)
    q, k, v, qv = dense_inputs(2, 16, 1, 1, 300, dim=64, v_dim=128, dtype=dtype, seed=5)
    _compare_dense(impl, q, k, v, qv, causal="bottom_right")
    q, k, v, qv = dense_inputs(2, 16, 1, 5, 300, dim=64, v_dim=128, dtype=dtype, seed=6)
    rows = qv.transpose(1, 2).contiguous().transpose(1, 2)
    assert rows.stride() != qv.stride()
    with torch.no_grad():
        torch.testing.assert_close(genfast.attention(q, k, v, qv=rows, enable_gqa=True, impl=impl),
                                   genfast.attention(q, k, v, qv=qv, enable_gqa=True, impl=impl), rtol=0, atol=0)
    _compare_dense(impl, q, k, v, rows, causal="bottom_right")


@pytest.mark.parametrize("impl", fused_impls())
def test_dense_dropout_and_is_causal(impl):
    """Dropout with qv in SDPA's layout keys the Philox stream as without it (the forward reading qv
    in place, the concatenation and the reference, from one seed); is_causal as causal="top_left"."""
    skip_unless_supported(impl, "cpu")
    q, k, v, qv = dense_inputs(2, 4, 2, 20, 150, seed=10)

    def run(backend, grad=False, **options):
        inputs = [t.clone().requires_grad_(grad) for t in (q, k, v, qv)]
        return genfast.attention(*inputs[:3], qv=inputs[3], enable_gqa=True, impl=backend, **options).detach()

    with torch.no_grad():
        in_place = run(impl, dropout_p=0.3, generator=genfast.PhiloxGenerator(5))
        causal = run(impl, is_causal=True)
    exact = attention(*(t.double() for t in (q, k, v)), qv=qv.double(), enable_gqa=True, dropout_p=0.3,
                      dropout_seed=5, dropout_offset=0)
    low = run("reference", dropout_p=0.3, generator=genfast.PhiloxGenerator(5))
    assert_error_ratio(in_place, exact, low, ratio=2.0, msg="o")
    assert_error_ratio(run(impl, grad=True, dropout_p=0.3, generator=genfast.PhiloxGenerator(5)), exact, low,
                       ratio=2.0, msg="o of the concatenation")
    exact = attention(*(t.double() for t in (q, k, v)), qv=qv.double(), enable_gqa=True, causal="top_left")
    assert_error_ratio(causal, exact, run("reference", causal="top_left"), ratio=2.0, msg="o, is_causal")


@pytest.mark.parametrize("impl", fused_impls())
def test_dense_gradients_through_the_concatenation(impl):
    """Gradients of q, k, v, qv and an additive mask (asked of the mask alone, the call takes the
    concatenation too) against the reference's, by the error-ratio rule."""
    skip_unless_supported(impl, "cpu")
    q, k, v, qv = dense_inputs(1, 4, 2, 9, 30, seed=7)
    mask = torch.randn(1, 4, 9, 30, generator=torch.Generator().manual_seed(8))
    grad_o = torch.randn(1, 4, 9, 32, generator=torch.Generator().manual_seed(9))

    def grads(dtype, backend, asked=(True,) * 5):
        leaves = [t.detach().to(dtype).requires_grad_(a) for t, a in zip((q, k, v, qv, mask), asked)]
        o = genfast.attention(*leaves[:3], leaves[4], qv=leaves[3], enable_gqa=True, causal="bottom_right",
                              impl=backend)
        o.backward(grad_o.to(dtype))
        return [t.grad for t in leaves]

    got, exact, low = grads(torch.float32, impl), grads(torch.float64, "reference"), grads(torch.float32, "reference")
    for name, g, e, lo in zip(("q", "k", "v", "qv", "mask"), got, exact, low):
        assert_error_ratio(g, e, lo, ratio=3.0, msg=f"grad of {name}")
    mask_alone = grads(torch.float32, impl, asked=(False,) * 4 + (True,))[4]
    torch.testing.assert_close(mask_alone, got[4], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", fused_impls())
def test_dense_op_checks_qv_and_has_no_backward_of_it(impl):
    """attention_forward (native or Triton) called directly with qv: opcheck; a bad qv named; qv
    asking for a gradient raises. genfast.attention with qv under torch.compile(fullgraph=True)."""
    skip_unless_supported(impl, "cpu")
    q, k, v, qv = dense_inputs(1, 2, 1, 3, 13, dim=8, v_dim=16)
    op = getattr(torch.ops.genfast, "attention_forward" + ("" if impl == "native" else "_triton"))
    options = (None, None, 0.3, 0.0, -3, 0, 0.0, 0, 0, False, False, None)
    torch.library.opcheck(op, (q, k, v, *options, qv))
    for bad in (qv[..., :8], qv[:, :1], qv.double()):
        with pytest.raises((ValueError, RuntimeError), match="qv must"):
            op(q, k, v, *options, bad)
    with pytest.raises(RuntimeError, match="qv serves inference and has no backward here"):
        op(q, k, v, *options, qv.clone().requires_grad_())

    def layer(q, k, v, qv):
        return genfast.attention(q, k, v, qv=qv, enable_gqa=True, causal="bottom_right", impl=impl)

    with torch.no_grad():
        torch.testing.assert_close(torch.compile(layer, fullgraph=True)(q, k, v, qv), layer(q, k, v, qv))
    with pytest.raises(ValueError, match=r"qv must be q's shape with v's head dim, \(1, 2, 3, 16\)"):
        genfast.attention(q, k, v, qv=qv[..., :8], enable_gqa=True, impl=impl)


@pytest.mark.cuda
@pytest.mark.triton
def test_dense_auto_reads_qv_in_place_on_a_gpu(monkeypatch):
    """genfast.attention with qv on a GPU: "auto" takes Triton's forward, which reads qv in place
    (bfloat16, 64 + 512, 16 heads on one kv head, decoding; nothing concatenated, nothing run on
    the reference), against the reference; the CUDA op refuses qv."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    q, k, v, qv = dense_inputs(2, 16, 1, 1, 1000, dim=64, v_dim=512, dtype=torch.bfloat16, seed=12)
    gpu = [t.cuda() for t in (q, k, v, qv)]
    calls = []
    cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda tensors, *a, **kw: calls.append("cat") or cat(tensors, *a, **kw))
    monkeypatch.setattr(importlib.import_module("genfast.attention").reference, "attention",
                        lambda *a, **kw: calls.append("reference"))
    with torch.no_grad():
        o = genfast.attention(*gpu[:3], qv=gpu[3], enable_gqa=True, causal="bottom_right")
    monkeypatch.undo()
    assert calls == []
    exact, low = (attention(*(t.to(d) for t in (q, k, v)), qv=qv.to(d), enable_gqa=True, causal="bottom_right")
                  for d in (torch.float64, torch.bfloat16))
    assert_error_ratio(o.cpu(), exact, low, ratio=2.0, msg="o")
    options = (None, None, 0.1, 0.0, -3, 0, 0.0, 0, 0, False, False, None)
    with pytest.raises(RuntimeError, match="the CUDA kernels take no qv"):
        torch.ops.genfast.attention_forward(*[t[..., :64] for t in gpu[:2]], gpu[2][..., :64], *options,
                                            gpu[3][..., :64])
