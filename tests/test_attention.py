"""genfast.attention's fused forward and backward against the reference: values, log-sum-exp and
gradients by the error-ratio rule for every option, odd lengths and head dims, fully masked rows,
NaN, dropout's Philox mask, a deterministic backward, opcheck, torch.compile and bad input."""

import importlib
import types

import pytest
import torch
import torch.nn.functional as F

import genfast
from genfast.reference import attention as ref
from genfast.reference.random import philox_uniform
from genfast.testing.tolerances import assert_error_ratio
from conftest import assert_compiles_like_eager, fused_impls, skip_unless_supported

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _qkv(batch, heads, kv_heads, lq, lk, dim, dtype, v_dim=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, lq, dim, generator=g)
    k = torch.randn(batch, kv_heads, lk, dim, generator=g)
    v = torch.randn(batch, kv_heads, lk, v_dim or dim, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _cpu_takes_bfloat16_pairs():
    """Whether the CPU kernel multiplies bfloat16 in pairs (AVX512-BF16, and AMX's tiles where the CPU
    has them) over packed panels."""
    return genfast.build_info()["cpu_capability"] in ("avx512_bf16", "avx512_amx")


def _interpreted_query_count(impl, lq):
    """lq, but 40 for 130 under the Triton interpreter: still two tiles of queries, the last partial,
    at a third of the time (the interpreter's dropout costs seconds a tile)."""
    return 40 if impl == "triton" and lq == 130 else lq


def _compare(q, k, v, impl="native", **options):
    got, lse = genfast.attention(q, k, v, impl=impl, return_lse=True, **options)
    exact, exact_lse = genfast.attention(q.double(), k.double(), v.double(), impl="reference", return_lse=True,
                                         **{key: (val.double() if isinstance(val, torch.Tensor) and
                                                  val.is_floating_point() else val) for key, val in options.items()})
    low, low_lse = genfast.attention(q, k, v, impl="reference", return_lse=True, **options)
    assert got.dtype == q.dtype and lse.dtype == torch.float32
    assert_error_ratio(got, exact, low, msg="o")
    assert_error_ratio(lse, exact_lse, low_lse.float(), msg="lse")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lq,lk", [(1, 1), (17, 17), (17, 100), (100, 33)])
@pytest.mark.parametrize("dim", [16, 64, 80])
@pytest.mark.parametrize("impl", fused_impls())
def test_matches_reference(dim, lq, lk, dtype, impl):
    skip_unless_supported(impl, "cpu", dtype)
    _compare(*_qkv(2, 3, 3, lq, lk, dim, dtype), impl=impl)


@pytest.mark.parametrize("dim", [128, 256])
@pytest.mark.parametrize("impl", fused_impls())
def test_large_head_dims(dim, impl):
    skip_unless_supported(impl, "cpu")
    _compare(*_qkv(1, 2, 2, 40, 70, dim, torch.float32), impl=impl)


@pytest.mark.parametrize("causal", ["top_left", "bottom_right"])
@pytest.mark.parametrize("lq,lk", [(17, 17), (5, 130), (130, 70)])
@pytest.mark.parametrize("impl", fused_impls())
def test_causal(lq, lk, causal, impl):
    skip_unless_supported(impl, "cpu")
    _compare(*_qkv(2, 2, 2, lq, lk, 32, torch.float32), causal=causal, impl=impl)


@pytest.mark.parametrize("window", [(8, 0), (3, 5), (-1, 2), (20, -1)])
@pytest.mark.parametrize("impl", fused_impls())
def test_windows(window, impl):
    skip_unless_supported(impl, "cpu")
    _compare(*_qkv(1, 2, 2, 90, 150, 32, torch.float32), window=window, impl=impl)


@pytest.mark.parametrize("ratio", [2, 4, 8])
@pytest.mark.parametrize("impl", fused_impls())
def test_grouped_query(ratio, impl):
    skip_unless_supported(impl, "cpu")
    _compare(*_qkv(2, 8, 8 // ratio, 20, 30, 16, torch.float32, v_dim=24), enable_gqa=True, impl=impl)


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("shape", [(2, 4, 20, 70), (1, 4, 1, 70), (20, 70), (70,)])
@pytest.mark.parametrize("impl", fused_impls())
def test_masks_broadcast(shape, kind, impl):
    skip_unless_supported(impl, "cpu")
    q, k, v = _qkv(2, 4, 4, 20, 70, 16, torch.float32)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(shape, generator=g) < 0.8 if kind == "bool" else torch.randn(shape, generator=g)
    _compare(q, k, v, attn_mask=mask, impl=impl)


@pytest.mark.parametrize("impl", fused_impls())
def test_alibi_softcap_scale_combined(impl):
    skip_unless_supported(impl, "cpu")
    q, k, v = _qkv(2, 3, 3, 33, 65, 16, torch.float32)
    slopes = torch.tensor([[0.5, 0.25, 0.125], [1.0, 0.1, 0.01]])
    _compare(q, k, v, alibi_slopes=slopes, softcap=4.0, scale=0.4, causal="bottom_right", impl=impl)
    _compare(q, k, v, alibi_slopes=slopes[0], attn_mask=torch.randn(33, 65), impl=impl)


# The CPU kernel reads K and V in place for a few queries, packs each key block per query block
# for one block of queries, and packs every key block once for several: each way with every option,
# head dims that are not whole vectors and key blocks that cross 128.
@pytest.mark.parametrize("lq", [3, 10, 130])
@pytest.mark.parametrize("impl", fused_impls())
def test_options_at_each_query_count(impl, lq):
    skip_unless_supported(impl, "cpu")
    lq = _interpreted_query_count(impl, lq)
    q, k, v = _qkv(2, 2, 2, lq, 150, 72, torch.float32, v_dim=88)
    slopes = torch.tensor([0.5, 0.125])
    _compare(q, k, v, alibi_slopes=slopes, softcap=4.0, causal="bottom_right", window=(40, 3), impl=impl)
    _compare(q, k, v, attn_mask=torch.randn(lq, 150), scale=0.3, impl=impl)
    options = dict(dropout_p=0.3, attn_mask=torch.rand(lq, 150) > 0.2)
    got = genfast.attention(q, k, v, generator=genfast.PhiloxGenerator(5, 2), impl=impl, **options)
    exact = genfast.attention(q.double(), k.double(), v.double(), generator=genfast.PhiloxGenerator(5, 2),
                              impl="reference", **options)
    low = genfast.attention(q, k, v, generator=genfast.PhiloxGenerator(5, 2), impl="reference", **options)
    assert_error_ratio(got, exact, low)
    q[1, 0, lq - 1, 7] = float("nan")
    o = genfast.attention(q, k, v, impl=impl)
    assert o[1, 0, lq - 1].isnan().all() and not o[1, 0, :lq - 1].isnan().any() and not o[0].isnan().any()


# The CPU kernel computes a key block only as wide as its keys, rounded up to 16 columns: key counts
# on and beside those widths, with every option that touches a block's columns past its keys (band,
# soft-cap, bias, dropout), forward and backward, on float32 and bfloat16 products.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lk", [16, 31, 32, 48, 77, 144])
def test_cpu_key_blocks_as_wide_as_their_keys(lk, dtype):
    skip_unless_supported("native", "cpu", dtype)
    q, k, v = _qkv(1, 4, 2, 20, lk, 64, dtype)
    mask = torch.randn(1, 4, 20, lk, generator=torch.Generator().manual_seed(lk)).to(dtype)
    options = dict(causal="bottom_right", window=(lk // 2, 0), softcap=20.0)
    _compare(q, k, v, attn_mask=mask, enable_gqa=True, **options)
    _compare_grads(q, k, v, mask, dropout_p=0.1, seed=4, **options)


# With grouped-query attention a CPU task takes several query heads of one key head together when
# there are tasks enough for the threads (4 heads with 1 thread here, 2 with 2), so that a key block
# serves them all from cache; each head keeps its own ALiBi slope, bias rows and dropout stream.
@pytest.mark.parametrize("lq", [1, 3, 130])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("impl", fused_impls())
def test_grouped_heads_keep_their_own_options(impl, lq, threads):
    skip_unless_supported(impl, "cpu")
    if impl == "triton" and threads > 1:
        pytest.skip("the thread count is the CPU kernel's; Triton's interpreter runs the same programs")
    lq = _interpreted_query_count(impl, lq)
    q, k, v = _qkv(1, 16, 4, lq, 150, 40, torch.float32, v_dim=24)
    slopes = torch.linspace(0.05, 0.8, 16)
    bias = torch.randn(1, 16, lq, 150)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _compare(q, k, v, attn_mask=bias, alibi_slopes=slopes, softcap=4.0, causal="bottom_right", window=(60, 2),
                 enable_gqa=True, impl=impl)
        options = dict(dropout_p=0.3, enable_gqa=True, attn_mask=torch.rand(lq, 150) > 0.2)
        got = genfast.attention(q, k, v, generator=genfast.PhiloxGenerator(5, 2), impl=impl, **options)
        exact = genfast.attention(q.double(), k.double(), v.double(), generator=genfast.PhiloxGenerator(5, 2),
                                  impl="reference", **options)
        low = genfast.attention(q, k, v, generator=genfast.PhiloxGenerator(5, 2), impl="reference", **options)
        assert_error_ratio(got, exact, low)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("impl", fused_impls())
def test_matches_sdpa(impl):
    skip_unless_supported(impl, "cpu")
    q, k, v = _qkv(2, 4, 4, 50, 50, 32, torch.float32)
    mask = torch.randn(50, 50)
    torch.testing.assert_close(genfast.attention(q, k, v, mask, is_causal=False, impl=impl),
                               F.scaled_dot_product_attention(q, k, v, mask), atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(genfast.attention(q, k, v, is_causal=True, impl=impl),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("impl", fused_impls())
def test_fully_masked_rows_are_zero(impl, dtype):
    skip_unless_supported(impl, "cpu", dtype)
    q, k, v = _qkv(1, 2, 2, 9, 70, 16, dtype)
    mask = torch.ones(9, 70, dtype=torch.bool)
    mask[4] = False
    o, lse = genfast.attention(q, k, v, mask, impl=impl, return_lse=True)
    assert torch.equal(o[:, :, 4], torch.zeros_like(o[:, :, 4])) and torch.isinf(lse[:, :, 4]).all()
    assert torch.isfinite(o).all()
    # An empty band masks every row.
    o = genfast.attention(q, k, v, window=(0, 0), causal="top_left", impl=impl)
    torch.testing.assert_close(o, genfast.attention(q, k, v, window=(0, 0), causal="top_left", impl="reference"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("impl", fused_impls())
def test_nan_propagates(impl, dtype):
    skip_unless_supported(impl, "cpu", dtype)
    q, k, v = _qkv(1, 2, 2, 9, 70, 16, dtype)
    q[0, 1, 3, 5] = float("nan")
    o, lse = genfast.attention(q, k, v, impl=impl, return_lse=True)
    assert o[0, 1, 3].isnan().all() and lse[0, 1, 3].isnan()
    assert not o[0, 1, 2].isnan().any() and not o[0, 0].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("impl", fused_impls())
def test_nan_in_one_key_reaches_every_row(impl, dtype):
    """A NaN score among finite ones makes the row NaN, as the reference's softmax does (a max that
    skipped NaN, as fmax and tl.max on a GPU do, would leave the rows finite)."""
    skip_unless_supported(impl, "cpu", dtype)
    q, k, v = _qkv(1, 2, 2, 9, 70, 16, dtype)
    k[0, 0, 40, 3] = float("nan")
    o, lse = genfast.attention(q, k, v, impl=impl, return_lse=True)
    assert o[0, 0].isnan().all() and lse[0, 0].isnan().all()
    assert not o[0, 1].isnan().any() and not lse[0, 1].isnan().any()


@pytest.mark.parametrize("impl", fused_impls())
def test_dropout_is_the_reference_philox_mask(impl):
    skip_unless_supported(impl, "cpu")
    q, k, v = _qkv(2, 2, 2, 20, 75, 16, torch.float32)
    got = genfast.attention(q, k, v, dropout_p=0.3, generator=genfast.PhiloxGenerator(11, 4), impl=impl)
    exact = genfast.attention(q.double(), k.double(), v.double(), dropout_p=0.3,
                              generator=genfast.PhiloxGenerator(11, 4), impl="reference")
    low = genfast.attention(q, k, v, dropout_p=0.3, generator=genfast.PhiloxGenerator(11, 4), impl="reference")
    assert_error_ratio(got, exact, low)
    # The kept fraction over many elements, and a fresh mask per call.
    generator = genfast.PhiloxGenerator(0)
    v1 = torch.ones(1, 1, 300, 1)
    q1, k1 = torch.zeros(1, 1, 300, 4), torch.zeros(1, 1, 300, 4)
    first = genfast.attention(q1, k1, v1, dropout_p=0.25, generator=generator, impl=impl)
    second = genfast.attention(q1, k1, v1, dropout_p=0.25, generator=generator, impl=impl)
    assert not torch.equal(first, second)
    kept = philox_uniform((1, 1, 300, 300), 0, 0, torch.float64) >= 0.25
    assert abs(kept.double().mean().item() - 0.75) < 0.01
    torch.testing.assert_close(first[0, 0, :, 0].double(), kept[0, 0].double().mean(1) / 0.75, atol=1e-5, rtol=0)


# Key counts whose rows start at whole Philox calls (multiples of 4) and not, at two head-dim buckets.
DROPOUT_MASK_KEYS = [64, 62, 192, 190]


def check_dropout_mask(impl, lk, dtype=torch.float32, device="cpu"):
    """Element by element, forward and backward: with equal scores P = 1 / Lk, and V the identity,
    o is the kept mask times keep_scale / Lk; with dO rows the first unit vectors, so is dV's
    transpose."""
    lq, p = 9, 0.4
    q, k = torch.zeros(2, 2, lq, 16, dtype=dtype, device=device), torch.zeros(2, 2, lk, 16, dtype=dtype, device=device)
    v = torch.eye(lk, dtype=dtype, device=device).expand(2, 2, lk, lk).clone().requires_grad_()
    o = genfast.attention(q, k, v, dropout_p=p, generator=genfast.PhiloxGenerator(3, 8), impl=impl)
    expected = (philox_uniform((2, 2, lq, lk), 3, 8, torch.float64) >= p).double() / (1 - p) / lk
    rtol = 1e-5 if dtype == torch.float32 else 1e-2  # a wrong element is off by 100%
    torch.testing.assert_close(o.double().cpu(), expected, rtol=rtol, atol=0)
    grad_o = torch.zeros(2, 2, lq, lk, dtype=dtype, device=device)
    grad_o[..., :lq] = torch.eye(lq)
    (grad_v,) = torch.autograd.grad(o, v, grad_o)
    torch.testing.assert_close(grad_v[..., :lq].transpose(-1, -2).double().cpu(), expected, rtol=rtol, atol=0)


@pytest.mark.parametrize("impl", fused_impls())
@pytest.mark.parametrize("lk", DROPOUT_MASK_KEYS)
def test_dropout_keeps_exactly_the_reference_elements(impl, lk):
    skip_unless_supported(impl, "cpu")
    check_dropout_mask(impl, lk)


@pytest.mark.parametrize("impl", [*fused_impls(), "reference"])
def test_empty_inputs(impl):
    skip_unless_supported(impl, "cpu")
    q, k, v = _qkv(2, 2, 2, 5, 7, 8, torch.float32)
    assert genfast.attention(q[:0], k[:0], v[:0], impl=impl).shape == (0, 2, 5, 8)
    assert genfast.attention(q[:, :, :0], k, v, impl=impl).shape == (2, 2, 0, 8)
    o, lse = genfast.attention(q, k[:, :, :0], v[:, :, :0], impl=impl, return_lse=True)
    assert torch.equal(o, torch.zeros_like(o)) and torch.isinf(lse).all()
    o, lse = genfast.attention(q, k, v[..., :0], impl=impl, return_lse=True)  # values without elements: lse all the same
    assert o.shape == (2, 2, 5, 0)
    torch.testing.assert_close(lse, genfast.attention(q, k, v, impl="reference", return_lse=True)[1])


# Gradients

def _grads(impl, dtype, q, k, v, mask, grad_o, grad_lse, options):
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    leaves = [cast(t).detach().requires_grad_() for t in (q, k, v)]
    m = None
    if mask is not None:
        m = cast(mask).detach().requires_grad_() if mask.is_floating_point() else mask
    opts = {key: (cast(val) if isinstance(val, torch.Tensor) and val.is_floating_point() else val)
            for key, val in options.items()}
    o, lse = genfast.attention(*leaves, m, enable_gqa=True, impl=impl, return_lse=True, **opts)
    loss = (o.double() * grad_o).sum() + (torch.where(torch.isfinite(lse), lse, 0).double() * grad_lse).sum()
    wrt = leaves + ([m] if m is not None and m.is_floating_point() else [])
    return torch.autograd.grad(loss, wrt)


def _compare_grads(q, k, v, mask=None, impl="native", **options):
    lq, dv = q.shape[2], v.shape[3]
    g = torch.Generator().manual_seed(7)
    grad_o = torch.randn(q.shape[0], q.shape[1], lq, dv, generator=g, dtype=torch.float64).to(q.device)
    grad_lse = torch.randn(q.shape[0], q.shape[1], lq, generator=g, dtype=torch.float64).to(q.device)
    generator = options.pop("seed", None)
    with_key = (lambda: dict(options, generator=genfast.PhiloxGenerator(generator))) if generator is not None else (
        lambda: options)
    got = _grads(impl, None, q, k, v, mask, grad_o, grad_lse, with_key())
    exact = _grads("reference", torch.float64, q, k, v, mask, grad_o, grad_lse, with_key())
    low = _grads("reference", None, q, k, v, mask, grad_o, grad_lse, with_key())
    for name, a, e, lo in zip(("q", "k", "v", "attn_mask"), got, exact, low):
        assert a.dtype == (q.dtype if name != "attn_mask" else mask.dtype)
        assert_error_ratio(a, e, lo, ratio=3.0, msg=f"grad {name}")


@pytest.mark.parametrize("lq", [1, 70])
def test_cpu_bfloat16_output_is_the_float32_output_rounded(lq):
    """The CPU forward rounds a bfloat16 o row by row as it finishes it: the float32 o that it gives
    for the same call (float_o) rounded by torch, bit for bit; zeros for rows that see no key; the
    same log-sum-exp."""
    skip_unless_supported("native", "cpu", torch.bfloat16)
    q, k, v = _qkv(2, 4, 2, lq, 150, 64, torch.bfloat16, v_dim=40)
    mask = torch.rand(2, 1, lq, 150, generator=torch.Generator().manual_seed(9)) > 0.3
    hidden = lq // 2 if lq > 1 else None
    if hidden is not None:
        mask[:, :, hidden] = False  # a row that sees no key
    lo, hi = importlib.import_module("genfast.attention").band(lq, 150, None, None)
    args = (q, k, v, mask, None, 0.125, 0.0, lo, hi, 0.1, 5, 0, False)
    o, lse = torch.ops.genfast.attention_forward(*args, False)
    o_float, lse_float = torch.ops.genfast.attention_forward(*args, True)
    assert o.dtype == torch.bfloat16 and o_float.dtype == torch.float32
    assert torch.equal(o, o_float.to(torch.bfloat16)) and torch.equal(lse, lse_float)
    assert hidden is None or (o[:, :, hidden] == 0).all()
    assert o.ne(0).float().mean() > 0.9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["window", "causal, more keys", "hidden rows and key block"])
def test_cpu_backward_writes_every_gradient_element(case, dtype):
    """The CPU backward writes dQ, dK and dV whole, in bfloat16 or float32 as it computes them, into
    memory it does not zero first: keys no query sees, and queries that see no key, get zeros, over
    memory freed full of NaN that the gradients may be carved from; the reference's gradients."""
    skip_unless_supported("native", "cpu", dtype)
    q, k, v = _qkv(2, 4, 2, 70, 300, 16, dtype)
    mask, options = None, {}
    if case == "window":
        options = dict(window=(20, 0))  # keys 0 .. 209 unseen
    elif case == "causal, more keys":
        options = dict(causal="top_left")  # keys 70 .. 299 unseen
    else:
        mask = torch.ones(2, 1, 70, 300, dtype=torch.bool)
        mask[:, :, 10:20] = False  # queries that see no key
        mask[..., 128:256] = False  # a key block no query sees: skipped
    for t in (q, k, v) * 3:
        torch.full(t.shape, float("nan"), dtype=dtype).add_(1)
    _compare_grads(q, k, v, mask, **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lq,lk,dim", [(1, 1, 16), (17, 100, 64), (100, 33, 80), (40, 70, 256)])
@pytest.mark.parametrize("impl", fused_impls())
def test_gradients_match_reference(lq, lk, dim, dtype, impl):
    skip_unless_supported(impl, "cpu", dtype)
    _compare_grads(*_qkv(2, 2, 2, lq, lk, dim, dtype), impl=impl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("dim,v_dim", [(512, 512), (300, 300), (64, 512), (512, 40)])
@pytest.mark.parametrize("impl", fused_impls())
def test_head_dims_past_256(impl, dim, v_dim, dtype):
    """Head dims past 256 (the single head of 512 channels in a diffusion VAE's attention, values of
    a latent attention's 512), which the Triton kernels take in a bucket of 512: grouped heads,
    bottom-right causal, out, lse and the gradients; past 512 Triton raises, naming its limit."""
    skip_unless_supported(impl, "cpu", dtype)
    q, k, v = _qkv(2, 4, 2, 23, 40, dim, dtype, v_dim=v_dim)
    _compare(q, k, v, impl=impl, enable_gqa=True, causal="bottom_right")
    _compare_grads(q, k, v, impl=impl, causal="bottom_right")
    if impl == "triton" and dim == 512:
        wide = torch.zeros(1, 1, 3, 520, dtype=dtype)
        with pytest.raises(ValueError, match="head dims up to 512, got 520"):
            genfast.attention(wide, wide, wide, impl="triton")


@pytest.mark.parametrize("scale", [-0.4, 0.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("impl", fused_impls())
def test_scales_of_either_sign(impl, dtype, scale):
    """SDPA takes any scale. The Triton kernels' half-precision path takes each row's maximum of q.k
    before a positive scale (folded into base-2 exponents); a scale of 0 or below takes the other
    path. Bottom-right causal over more keys mixes, in a row, key blocks that need only the scale
    and blocks the band cuts, whose scores are finished first."""
    skip_unless_supported(impl, "cpu", dtype)
    q, k, v = _qkv(1, 2, 2, 17, 40, 16, dtype)
    _compare(q, k, v, impl=impl, scale=scale, causal="bottom_right")
    _compare_grads(q, k, v, impl=impl, scale=scale, causal="bottom_right")


@pytest.mark.parametrize("impl", fused_impls())
def test_long_odd_length(impl):
    """A length of 1000: many blocks of queries and keys, the last of each partial (under the Triton
    interpreter, whose time grows with the programs, one small head of 250: 8 blocks of 32)."""
    skip_unless_supported(impl, "cpu")
    q, k, v = _qkv(1, 2, 1, 1000, 1000, 64, torch.float32) if impl == "native" else _qkv(1, 1, 1, 250, 250, 16,
                                                                                          torch.float32)
    _compare(q, k, v, impl=impl, enable_gqa=True, causal="top_left")
    _compare_grads(q, k, v, impl=impl, causal="top_left")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lq", [1, 2, 40], ids=lambda lq: f"lq{lq}")
def test_cpu_kernel_reads_half_precision_keys_and_values_as_they_are(lq, dtype):
    """The CPU forward widens a float16 or bfloat16 K and V in its loads (no float32 copy of a KV
    cache): exactly the float32 call on the same values, with K and V read in place (one or two
    queries) or packed (more), transposed in memory, with a head dim that leaves a tail. A bfloat16
    call that multiplies in pairs over packed panels rounds P to bfloat16, and is then only close."""
    skip_unless_supported("native", "cpu", dtype)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _qkv(2, 6, 2, lq, 300, 72, dtype, v_dim=40))
    mask = torch.rand(2, 1, lq, 300) < 0.9
    options = dict(attn_mask=mask, enable_gqa=True, causal="bottom_right", softcap=20.0, dropout_p=0.1)
    got = genfast.attention(q, k, v, generator=genfast.PhiloxGenerator(1), impl="native", **options)
    wide = genfast.attention(q.float(), k.float(), v.float(), generator=genfast.PhiloxGenerator(1), impl="native",
                             **options)
    assert got.dtype == dtype
    if dtype == torch.bfloat16 and lq > 2 and _cpu_takes_bfloat16_pairs():
        torch.testing.assert_close(got, wide.to(dtype), rtol=0.016, atol=0.016)
        assert not torch.equal(got, wide.to(dtype))
    else:
        assert torch.equal(got, wide.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lq", [1, 16], ids=lambda lq: f"lq{lq}")
def test_cpu_kernel_widens_every_half_precision_number_exactly(lq, dtype):
    """One key: o is v itself, for each of the 65536 float16 or bfloat16 bit patterns (subnormals,
    infinities, NaN), read in place (one query) and packed (16). Products on bfloat16 pairs
    (AVX512-BF16) read a subnormal as zero."""
    skip_unless_supported("native", "cpu", dtype)
    v = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int16).view(dtype).reshape(16, 16, 1, 256)
    q, k = torch.randn(16, 16, lq, 32).to(dtype), torch.randn(16, 16, 1, 32).to(dtype)
    o = genfast.attention(q, k, v, impl="native")
    expected = v
    if dtype == torch.bfloat16 and lq > 2 and _cpu_takes_bfloat16_pairs():
        expected = torch.where(v.abs() < torch.finfo(dtype).tiny, torch.zeros_like(v), v)
    torch.testing.assert_close(o, expected.expand(o.shape), rtol=0, atol=0, equal_nan=True)


def _bfloat16_pairs_forward(q, k, v, mask, scale, key_block=128):
    """What the CPU forward computes when it multiplies bfloat16 in pairs, in float64: its online
    softmax over blocks of 128 keys, scores and row sums of exact products, and each block's P (taken
    against the running maximum) rounded to bfloat16, through float32, for P V."""
    s = ((q.double() @ k.double().transpose(-1, -2)) * scale).masked_fill(~mask, float("-inf"))
    most = torch.full((*s.shape[:-1], 1), float("-inf"), dtype=torch.float64)
    total, acc = torch.zeros_like(most), torch.zeros(*s.shape[:-1], v.shape[-1], dtype=torch.float64)
    for j in range(0, s.shape[-1], key_block):
        block = s[..., j:j + key_block]
        new_most = torch.maximum(most, block.amax(-1, keepdim=True))
        rescale, p = torch.exp(most - new_most).nan_to_num(0.0), torch.exp(block - new_most).nan_to_num(0.0)
        acc = acc * rescale + p.float().bfloat16().double() @ v[..., j:j + key_block, :].double()
        total, most = total * rescale + p.sum(-1, keepdim=True), new_most
    return acc / total


@pytest.mark.parametrize("lq,lk", [(40, 257), (300, 257), (20, 200), (300, 200)],
                         ids=["own_panels", "shared_panels", "own_panels-short", "shared_panels-short"])
@pytest.mark.parametrize("dim,v_dim", [(64, 64), (72, 40), (18, 130), (40, 16), (128, 48)])
def test_cpu_bfloat16_pairs_round_probabilities_only(dim, v_dim, lq, lk):
    """On a CPU with AVX512-BF16, the bfloat16 forward over packed panels multiplies in pairs (Q K^T
    along the head dim, P V along the keys): exact products summed in float32, and P rounded to
    bfloat16 for P V. Its o is that computation rounded to bfloat16, but for a few elements near a
    step of bfloat16 or near zero (float32's sums and exp, a P rounded the other way); the float32
    products, which do not round P, miss it in about a third of the elements. Head dims that leave
    part of a 16-column chunk or of a word, key blocks that end mid-pair, panels packed per task or
    shared by query blocks (300 queries). With AMX (avx512_amx), the products take tiles of 16 rows
    and 16 pairs in twos along rows and columns, and vectors for the rest: blocks of 20, 40 and 44
    queries leave rows past the tiles, head dims of 72 and 40 and a last key block of 72 keys leave
    pairs past them, and 16 and 48 values leave a single column of tiles."""
    if not _cpu_takes_bfloat16_pairs():
        pytest.skip("needs a CPU with AVX512-BF16 (genfast.build_info()['cpu_capability'] avx512_bf16 or avx512_amx)")
    q, k, v = _qkv(1, 2, 2, lq, lk, dim, torch.bfloat16, v_dim=v_dim)
    mask = torch.rand(1, 2, lq, lk, generator=torch.Generator().manual_seed(1)) < 0.8
    mask[..., 0] = True
    expected = _bfloat16_pairs_forward(q, k, v, mask, dim ** -0.5)
    rounded = expected.float().bfloat16()
    o = genfast.attention(q, k, v, attn_mask=mask, impl="native")
    step = torch.finfo(torch.bfloat16).eps * (expected.abs() + 1 / 16)  # near zero, a row's sum cancels
    assert ((o.double() - expected).abs() <= step).all() and (o != rounded).double().mean() < 0.01
    wide = genfast.attention(q.float(), k.float(), v.float(), attn_mask=mask, impl="native").bfloat16()
    assert (wide != rounded).double().mean() > 0.2


@pytest.mark.parametrize("lq,lk", [(133, 257), (40, 200), (300, 200)])
@pytest.mark.parametrize("batch,kv_heads", [(1, 1), (2, 2)], ids=["block_passes", "pair_passes"])
@pytest.mark.parametrize("dim,v_dim", [(64, 64), (18, 40), (72, 130)])
def test_cpu_bfloat16_pairs_backward(dim, v_dim, batch, kv_heads, lq, lk):
    """On a CPU with AVX512-BF16 the bfloat16 backward takes its five products on bfloat16 pairs, P
    and dS rounded to bfloat16 (the float32 copies of q, k, v and grad_o are bfloat16 values, so
    rounding keeps them): gradients by the error-ratio rule with every option that touches them, in
    both schedules (one pass per (batch, key head), or passes per key block and per query block),
    with query blocks that end mid-pair; and not the float32 products' bits. With AMX, blocks of 40
    and 44 queries and a last key block of 72 keys leave rows and pairs past the tiles in all five
    products."""
    if not _cpu_takes_bfloat16_pairs():
        pytest.skip("needs a CPU with AVX512-BF16 (genfast.build_info()['cpu_capability'] avx512_bf16 or avx512_amx)")
    q, k, v = _qkv(batch, 2 * kv_heads, kv_heads, lq, lk, dim, torch.bfloat16, v_dim=v_dim)
    g = torch.Generator().manual_seed(2)
    mask = torch.randn(1, 1, lq, lk, generator=g).to(torch.bfloat16)
    options = dict(causal="bottom_right", softcap=30.0, dropout_p=0.1, seed=3)
    _compare_grads(q, k, v, mask, **options)
    # The backward op alone, handed the same o and lse: the float32 call's products give the bfloat16
    # call's gradients, widened, unless the latter takes pairs.
    o, lse = genfast.attention(q, k, v, impl="native", enable_gqa=True, return_lse=True)
    grad_o = torch.randn(o.shape, generator=g).to(torch.bfloat16)
    lo, hi = importlib.import_module("genfast.attention").band(lq, lk, None, None)
    grads = [torch.ops.genfast.attention_backward(grad_o.to(dtype), None, q.to(dtype), k.to(dtype), v.to(dtype),
                                                  o.to(dtype), lse, None, None, dim ** -0.5, 0.0, lo, hi, 0.0, 0, 0,
                                                  False, True)[:3] for dtype in (torch.bfloat16, torch.float32)]
    assert all(not torch.equal(a, b.to(a.dtype)) for a, b in zip(*grads))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads,kv_heads,dim,v_dim", [(8, 2, 128, 128), (12, 3, 72, 40), (5, 1, 16, 20)])
def test_cpu_decoding_stacks_grouped_heads_bit_for_bit(heads, kv_heads, dim, v_dim, dtype):
    """One query per head: the CPU kernel stacks the query heads of a key head as the rows of one
    in-place product (each K and V row loaded once for all of them), and gives the bits that each
    head alone gives against its own copy of K and V, with every option and a mask that hides some
    heads' key blocks but not others'."""
    skip_unless_supported("native", "cpu", dtype)
    q, k, v = _qkv(2, heads, kv_heads, 1, 300, dim, dtype, v_dim=v_dim)
    mask = torch.rand(2, heads, 1, 300) < 0.8
    mask[:, ::2, :, 128:256] = False
    group = heads // kv_heads
    for options in (dict(), dict(attn_mask=mask, softcap=10.0, dropout_p=0.2, causal="bottom_right", window=(200, 0),
                                 alibi_slopes=torch.linspace(0.1, 0.5, heads))):
        stacked = genfast.attention(q, k, v, enable_gqa=True, return_lse=True, impl="native",
                                    generator=genfast.PhiloxGenerator(2), **options)
        alone = genfast.attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), return_lse=True,
                                  impl="native", generator=genfast.PhiloxGenerator(2), **options)
        assert all(torch.equal(a, b) for a, b in zip(stacked, alone))
    _compare(q, k, v, impl="native", enable_gqa=True, attn_mask=mask, causal="bottom_right")


@pytest.mark.parametrize("lq", [2, 3])
def test_cpu_in_place_rows_share_loads_bit_for_bit(lq):
    """Two or three queries per head read K and V in place with each row of K and V loaded once for
    all of them: each query's row is what the query alone gives."""
    skip_unless_supported("native", "cpu")
    q, k, v = _qkv(2, 2, 2, lq, 300, 72, torch.float32, v_dim=40)
    mask = torch.rand(2, 2, lq, 300) < 0.8
    together = genfast.attention(q, k, v, attn_mask=mask, softcap=10.0, impl="native")
    alone = torch.cat([genfast.attention(q[:, :, i:i + 1], k, v, attn_mask=mask[:, :, i:i + 1], softcap=10.0,
                                         impl="native") for i in range(lq)], dim=2)
    assert torch.equal(together, alone)


@pytest.mark.parametrize("dtype,keys", [(torch.float32, 90000), (torch.bfloat16, 180000)], ids=str)
def test_long_key_sequence_packed_a_few_heads_at_a_time(dtype, keys):
    """The CPU kernel packs at most 32 MiB of K and V panels at a time: three key heads take two
    passes, the second partial (bfloat16 pairs take half a float32 panel's memory; without them
    bfloat16 takes three passes)."""
    skip_unless_supported("native", "cpu", dtype)
    q, k, v = _qkv(1, 6, 3, 8, keys, 16, dtype)
    _compare(q, k, v, impl="native", enable_gqa=True, causal="bottom_right", window=(60000, 0))


@pytest.mark.parametrize("options", [dict(causal="top_left"), dict(causal="bottom_right", window=(20, 3)),
                                     dict(softcap=3.0, scale=0.5), dict(alibi_slopes=torch.tensor([0.4, 0.1, 0.05, 1.0])),
                                     dict(dropout_p=0.2, seed=4)], ids=str)
@pytest.mark.parametrize("impl", fused_impls())
def test_gradients_with_options(options, impl):
    skip_unless_supported(impl, "cpu")
    _compare_grads(*_qkv(2, 4, 2, 50, 140, 32, torch.float32, v_dim=24), **dict(options), impl=impl)


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("impl", fused_impls())
def test_gradients_with_masks(kind, impl):
    skip_unless_supported(impl, "cpu")
    q, k, v = _qkv(2, 2, 2, 30, 75, 16, torch.float32)
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(2, 1, 30, 75, generator=g) < 0.7 if kind == "bool" else torch.randn(2, 1, 30, 75, generator=g)
    if kind == "bool":
        mask[0, 0, 5] = False  # a fully masked row: zero gradients, not NaN
    _compare_grads(q, k, v, mask, impl=impl)


# (the Triton interpreter, slow, takes two of the masks)
@pytest.mark.parametrize("impl,spans", [pytest.param("native", spans, id=f"native-{spans}")
                                        for spans in ("all", "queries", "batch and queries", "0-d")]
                         + [pytest.param("triton", spans, marks=pytest.mark.triton, id=f"triton-{spans}")
                            for spans in ("all", "batch and queries")])
def test_gradient_of_a_mask_constant_along_the_keys(spans, impl):
    """A bias constant along the keys moves no probability, only lse: its gradient is grad_lse summed
    over the rows it spans, exactly (summing dS over the keys left each row delta's rounding, and a
    scalar bias over 4590 rows erred 36 times the float32 reference's error: genfast check --fuzz,
    seed 123058); 0 for rows without keys (bottom-right causal over fewer keys), with dropout, and in
    float16 (no float32 o kept for it). Zero without lse's gradient; NaN propagates."""
    skip_unless_supported(impl, "cpu")
    # (the Triton interpreter, slow, takes fewer rows: the Triton ops' autograd is the same sum in Python)
    heads, lq = (6, 255) if impl == "native" else (1, 40)
    q, k, v = _qkv(3, heads, heads, lq, 9, 96 if impl == "native" else 16, torch.float32)
    shape = {"all": (1,), "queries": (lq, 1), "batch and queries": (3, 1, lq, 1), "0-d": ()}[spans]
    mask = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 2
    _compare_grads(q, k, v, mask, impl=impl, causal="top_left")
    _compare_grads(q, k, v, mask, impl=impl, causal="bottom_right", dropout_p=0.3, seed=5)
    _compare_grads(*(t.half() for t in (q, k, v, mask)), impl=impl, causal="bottom_right")
    m = mask.clone().requires_grad_()
    o = genfast.attention(q, k, v, m, causal="top_left", impl=impl)
    assert torch.equal(torch.autograd.grad(o.sum(), m)[0], torch.zeros_like(mask))
    q[1, 0, 7, 3] = float("nan")
    grads = [torch.autograd.grad(genfast.attention(q, k, v, m, causal="top_left", return_lse=True, impl=i)[1].sum(),
                                 m)[0] for i in (impl, "reference")]
    assert grads[0].isnan().any() and torch.equal(grads[0].isnan(), grads[1].isnan())


@pytest.mark.parametrize("batch,kv_heads,shape", [
    (4, 2, (1, 4, 150, 140)),  # a relative-position bias: per head, shared by the batch
    (4, 2, (150, 140)),  # one bias for every batch and head
    (4, 2, (4, 1, 1, 140)),  # a key-padding bias
    (1, 1, (150, 140)),  # one (batch, key head) pair: dK and dV per block of keys, then dQ
])
def test_cpu_mask_gradient_adds_up_in_the_masks_shape(batch, kv_heads, shape):
    """The CPU backward adds dS up over the batch, heads and queries that the mask broadcasts over, in
    a copy per part of the tasks (two threads here), not in a (B, H, Lq, Lk) tensor summed afterwards:
    the op returns that shape, and its sums are those of the full tensor, which a mask expanded to
    (B, H, Lq, Lk) takes. The other gradients keep their bits."""
    skip_unless_supported("native", "cpu")
    q, k, v = _qkv(batch, 4, kv_heads, 150, 140, 32, torch.float32)
    mask = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    full = (batch, 4, 150, 140)

    def grads(expand):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, mask)]
        m = leaves[3].expand(full) if expand else leaves[3]
        o = genfast.attention(*leaves[:3], m, enable_gqa=True, impl="native", dropout_p=0.1,
                              generator=genfast.PhiloxGenerator(5))
        return torch.autograd.grad((o * o.detach().cos()).sum(), leaves)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        added, again, summed = grads(False), grads(False), grads(True)
        lo, hi = importlib.import_module("genfast.attention").band(150, 140, None, None)
        o, lse = torch.ops.genfast.attention_forward(q, k, v, mask, None, 32 ** -0.5, 0.0, lo, hi, 0.0, 0, 0)
        grad_s = torch.ops.genfast.attention_backward(torch.ones_like(o), None, q, k, v, o, lse, mask, None,
                                                      32 ** -0.5, 0.0, lo, hi, 0.0, 0, 0, True)[3]
    finally:
        torch.set_num_threads(threads)
    right_aligned = (1,) * (4 - len(shape)) + shape
    assert grad_s.shape == tuple(1 if m == 1 else f for m, f in zip(right_aligned[:3], full[:3])) + (140,)
    assert all(torch.equal(a, b) for a, b in zip(added, again))
    assert all(torch.equal(a, b) for a, b in zip(added[:3], summed[:3]))
    torch.testing.assert_close(added[3], summed[3], rtol=1e-5, atol=1e-6)


@pytest.mark.triton
@pytest.mark.parametrize("shape", [(1, 2, 20, 24), (20, 24), (3, 1, 1, 24)])
def test_triton_mask_gradient_adds_up_in_chunks_of_batches(shape, monkeypatch):
    """The Triton backward sums dS over what the mask broadcasts over in chunks of whole batches
    (MASK_GRAD_CHUNK_FLOATS made two batches' worth here: chunks of batches 0-1 and 2), not in a
    (B, H, Lq, Lk) tensor: the op returns the summed shape, with the sums of what it returns for the
    mask expanded to (B, H, Lq, Lk); the other gradients keep their bits. (A chunk's dropout rows and
    ALiBi slopes: test_triton_attention_kernels.py's float_mask case.)"""
    monkeypatch.setattr(importlib.import_module("genfast.kernels.attention"), "MASK_GRAD_CHUNK_FLOATS", 2 * 2 * 20 * 24)
    q, k, v = _qkv(3, 2, 1, 20, 24, 16, torch.float32)
    mask = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    grad_o = torch.randn(3, 2, 20, 16, generator=torch.Generator().manual_seed(5))
    full = (3, 2, 20, 24)
    lo, hi = importlib.import_module("genfast.attention").band(20, 24, None, None)
    o, lse = torch.ops.genfast.attention_forward_triton(q, k, v, mask, None, 0.25, 0.0, lo, hi, 0.0, 0, 0)
    summed, expanded = (torch.ops.genfast.attention_backward_triton(grad_o, None, q, k, v, o, lse, m, None, 0.25, 0.0,
                                                                    lo, hi, 0.0, 0, 0, True)
                        for m in (mask, mask.expand(full)))
    right_aligned = (1,) * (4 - len(shape)) + shape
    assert summed[3].shape == tuple(1 if m == 1 else f for m, f in zip(right_aligned[:3], full[:3])) + (24,)
    assert expanded[3].shape == full
    assert all(torch.equal(a, b) for a, b in zip(summed[:3], expanded[:3]))
    torch.testing.assert_close(summed[3], expanded[3].sum_to_size(summed[3].shape), rtol=1e-5, atol=1e-6)


def _block_sparse_mask(batch, heads, lq, lk, kind):
    """Per head a sliding window (none, 90 or 20 keys), and each batch's keys past its length hidden:
    whole blocks of queries and keys masked out, which the CPU kernel skips, between blocks it keeps
    whole or in part; the rows past a batch's length see no key. kind "float": an additive mask,
    -inf where hidden."""
    i = torch.arange(lq)[:, None] + (lk - lq)
    j = torch.arange(lk)[None, :]
    windows = torch.tensor([lk, 90, 20, lk])[:heads, None, None]
    lengths = torch.tensor([lk, lk * 2 // 3])[:batch, None, None, None]
    keep = (j <= i) & (j > i - windows) & (j < lengths)
    if kind == "bool":
        return keep
    return torch.where(keep, torch.randn(keep.shape, generator=torch.Generator().manual_seed(3)), float("-inf"))


def check_hidden_keys_not_read(impl, kind, dtype=torch.float32, device="cpu", grads=True):
    """Padding on the right of one batch and on the left of the other: the key blocks the mask hides
    from every query are skipped (the CPU's blocks of 128 keys, the CUDA kernels' 64; the Triton
    forward's, 32 under the interpreter and up to 128 on a GPU, trimmed off the ends of its loop),
    so garbage there, even NaN, as a preallocated cache may hold, reaches no output: o is that with
    zeros there. With grads, nor any gradient (the hidden keys' dK and dV are 0): the CPU and CUDA
    kernels'; the Triton backward still computes such blocks (kernels/triton/attention.py,
    _shown_keys)."""
    q, k, v = (t.to(device) for t in _qkv(2, 2, 1, 20, 300, 16, dtype))
    keep = torch.ones(2, 1, 1, 300, dtype=torch.bool, device=device)
    keep[0, ..., 128:] = False
    keep[1, ..., :128] = False
    mask = keep if kind == "bool" else torch.zeros(keep.shape, device=device).masked_fill(~keep, float("-inf"))
    hidden = ~keep.transpose(-1, -2)
    garbage = [t.masked_fill(hidden, float("nan")) for t in (k, v)]
    _compare(q, k, v, impl=impl, attn_mask=mask, enable_gqa=True)
    o = genfast.attention(q, *garbage, mask, enable_gqa=True, impl=impl)
    torch.testing.assert_close(o, genfast.attention(q, k, v, mask, enable_gqa=True, impl=impl), rtol=0, atol=0)
    if not grads:
        return
    results = []
    for inputs in ((q, *garbage), (q, k, v)):
        leaves = [t.clone().requires_grad_() for t in inputs]
        o = genfast.attention(*leaves, mask, enable_gqa=True, impl=impl, deterministic=True)
        results.append(torch.autograd.grad(o.float().sum(), leaves))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (results[1][1].masked_select(hidden) == 0).all() and (results[1][2].masked_select(hidden) == 0).all()


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("impl", fused_impls())
def test_keys_a_mask_hides_whole_are_not_read(kind, impl):
    skip_unless_supported(impl, "cpu")
    check_hidden_keys_not_read(impl, kind, grads=impl == "native")


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("impl", fused_impls())
def test_block_sparse_masks(kind, impl):
    skip_unless_supported(impl, "cpu")
    # Past the CPU's blocks of 128 queries and keys, with the diagonal between block edges (more keys
    # than queries: blocks whose first rows see nothing and last rows do); smaller under the Triton
    # interpreter (blocks of 32).
    length = 300 if impl == "native" else 40
    q, k, v = _qkv(2, 3, 1, length, length + 50, 16, torch.float32)
    mask = _block_sparse_mask(2, 3, length, length + 50, kind)
    _compare(q, k, v, impl=impl, attn_mask=mask, enable_gqa=True)
    _compare_grads(q, k, v, mask, impl=impl)
    if impl == "native":  # one pass per (batch, key head) on one thread (BACKWARD_SCHEDULES)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _compare_grads(q, k, v, mask, impl=impl)
        finally:
            torch.set_num_threads(threads)
    # NaN in a block the additive mask otherwise hides reaches its row.
    if kind == "float":
        mask[1, 2, 10, length + 49] = float("nan")
        o = genfast.attention(q, k, v, mask, enable_gqa=True, impl=impl)
        assert o[1, 2, 10].isnan().all() and not o[1, 2, 9].isnan().any() and not o[0].isnan().any()


@pytest.mark.parametrize("layout", ["contiguous", "keys strided"])
@pytest.mark.parametrize("mask_dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("impl", fused_impls())
def test_additive_masks_of_other_dtypes(mask_dtype, layout, impl):
    """An additive mask in float16 or bfloat16 beside float32 inputs, read as it is (the C++ kernels
    take no float32 copy), or in float64: the reference's results and gradients (the mask's in its
    dtype), with -inf hiding whole blocks and rows; keys contiguous or strided in the mask; NaN in a
    hidden block reaches its row."""
    skip_unless_supported(impl, "cpu", mask_dtype)
    length = 300 if impl == "native" else 40
    q, k, v = _qkv(2, 3, 1, length, length + 50, 16, torch.float32)
    mask = _block_sparse_mask(2, 3, length, length + 50, "float").to(mask_dtype)
    if layout == "keys strided":
        mask = mask.transpose(-1, -2).contiguous().transpose(-1, -2)
    _compare(q, k, v, impl=impl, attn_mask=mask, enable_gqa=True)
    _compare_grads(q, k, v, mask, impl=impl)
    mask[1, 2, 10, length + 49] = float("nan")
    o = genfast.attention(q, k, v, mask, enable_gqa=True, impl=impl)
    assert o[1, 2, 10].isnan().all() and not o[1, 2, 9].isnan().any() and not o[0].isnan().any()


@pytest.mark.parametrize("mask_dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_full_mask_gradient_stored_in_the_masks_dtype(mask_dtype):
    """A mask with every dim gets its gradient as the CPU kernel computes dS, in the mask's dtype (no
    float32 buffer to zero, fill and round): the float32 mask's gradient rounded, bit for bit, and
    zeros where the window or a hidden key block leaves dS uncomputed, whatever the memory given to
    the gradient held before; NaN where dS is NaN."""
    skip_unless_supported("native", "cpu", mask_dtype)
    q, k, v = _qkv(2, 2, 1, 40, 150, 16, torch.float32)
    mask = torch.randn(2, 2, 40, 150, generator=torch.Generator().manual_seed(6)).to(mask_dtype).float()
    mask[1, 1, :, 128:] = float("-inf")  # a whole key block hidden from one head: skipped

    def mask_grads(mask):
        grads = {}
        for dtype in (torch.float32, mask_dtype):
            for _ in range(4):  # memory freed full of NaN, which the gradient's may be carved from
                torch.full(mask.shape, float("nan"), dtype=dtype).add_(1)
            m = mask.to(dtype, copy=True).requires_grad_()
            o = genfast.attention(q, k, v, m, enable_gqa=True, window=(10, 0), impl="native")
            grads[dtype] = torch.autograd.grad((o * o.detach().cos()).sum(), m)[0]
        assert grads[mask_dtype].dtype == mask_dtype
        return grads[torch.float32], grads[mask_dtype]

    exact, rounded = mask_grads(mask)
    assert torch.equal(rounded, exact.to(mask_dtype))
    i = torch.arange(40)[:, None] + 110
    j = torch.arange(150)[None, :]
    seen = (j <= i) & (j >= i - 10) & torch.isfinite(mask)
    assert torch.equal(rounded == 0, ~seen | (exact == 0))
    assert rounded[seen].ne(0).float().mean() > 0.9
    mask[0, 1, 5, 110] = float("nan")  # seen by query 5 (keys 105 .. 115): its row of dS is NaN
    exact, rounded = mask_grads(mask)
    assert torch.equal(rounded.isnan(), exact.isnan()) and rounded[0, 1, 5, 105:116].isnan().all()
    assert torch.equal(rounded.nan_to_num(), exact.nan_to_num().to(mask_dtype))


def test_full_float32_mask_gradient_past_the_caches_is_streamed():
    """A float32 mask gradient of 32 MiB or more, stored with streaming stores (past the caches): the
    rows of a call with a few of the queries, stored plainly, bit for bit; zeros where a hidden key
    block leaves dS uncomputed, whatever the memory given to the gradient held before."""
    skip_unless_supported("native", "cpu")
    q, k, v = _qkv(1, 2, 2, 2048, 2048, 16, torch.float32)
    mask = torch.randn(1, 2, 2048, 2048, generator=torch.Generator().manual_seed(8))
    mask[0, 1, :, 1024:1152] = float("-inf")  # a whole key block hidden from one head: skipped

    def mask_grad(rows):
        for _ in range(4):  # memory freed full of NaN, which the gradient's may be carved from
            torch.full(mask.shape, float("nan")).add_(1)
        m = mask[:, :, :rows].clone().requires_grad_()
        o = genfast.attention(q[:, :, :rows], k, v, m, impl="native")
        return torch.autograd.grad((o * o.detach().cos()).sum(), m)[0]

    streamed, plain = mask_grad(2048), mask_grad(40)
    assert streamed.numel() * streamed.element_size() >= 32 << 20 > plain.numel() * plain.element_size()
    assert torch.equal(streamed[:, :, :40], plain)
    assert streamed.isfinite().all() and (streamed[0, 1, :, 1024:1152] == 0).all()
    assert streamed[0, 0].ne(0).float().mean() > 0.99


# (the Triton interpreter, slow, takes one of the shapes)
@pytest.mark.parametrize("impl,shape", [pytest.param("native", shape, id=f"native-{shape}")
                                        for shape in ((2, 1, 40, 1), (40, 1), ())]
                         + [pytest.param("triton", (40, 1), marks=pytest.mark.triton, id="triton-(40, 1)")])
def test_half_mask_with_one_column_sums_its_gradient_in_float32(shape, impl):
    """A float16 mask broadcast over the keys: its gradient is summed in float32 and rounded once, the
    float32 mask's gradient rounded bit for bit (a float16 sum of 150 keys strays from it): through
    autograd (grad_lse summed over the rows, test_gradient_of_a_mask_constant_along_the_keys) and in
    the backward op, which sums dS over the keys, in the mask's right-aligned shape."""
    skip_unless_supported(impl, "cpu")
    q, k, v = _qkv(2, 3, 1, 40, 150, 16, torch.float32)
    mask = torch.randn(shape, generator=torch.Generator().manual_seed(7)).half().float()
    grads = {}
    for dtype in (torch.float32, torch.float16):
        m = mask.to(dtype).requires_grad_()
        o, lse = genfast.attention(q, k, v, m, enable_gqa=True, causal="bottom_right", return_lse=True, impl=impl)
        grads[dtype] = torch.autograd.grad((o * o.detach().cos()).sum() + (lse * lse.detach().sin()).sum(), m)[0]
    assert grads[torch.float16].dtype == torch.float16 and grads[torch.float16].shape == shape
    assert grads[torch.float32].ne(0).all() and torch.equal(grads[torch.float16], grads[torch.float32].half())
    backward = torch.ops.genfast.attention_backward if impl == "native" else torch.ops.genfast.attention_backward_triton
    forward = torch.ops.genfast.attention_forward if impl == "native" else torch.ops.genfast.attention_forward_triton
    lo, hi = importlib.import_module("genfast.attention").band(40, 150, "bottom_right", None)
    summed = {}
    for dtype in (torch.float32, torch.float16):
        o, lse = forward(q, k, v, mask.to(dtype), None, 0.25, 0.0, lo, hi, 0.0, 0, 0)
        summed[dtype] = backward(o.cos(), lse.sin(), q, k, v, o, lse, mask.to(dtype), None, 0.25, 0.0, lo, hi, 0.0,
                                 0, 0, True)[3]
    assert summed[torch.float32].ne(0).all() and summed[torch.float16].shape == ((1,) * (4 - len(shape)) + shape)
    assert summed[torch.float16].dtype == torch.float16
    assert torch.equal(summed[torch.float16], summed[torch.float32].half())


@pytest.mark.parametrize("impl", fused_impls())
def test_backward_is_deterministic(impl):
    skip_unless_supported(impl, "cpu")
    q, k, v = _qkv(2, 4, 2, 150, 200, 32, torch.float32) if impl == "native" else _qkv(1, 2, 1, 40, 50, 16,
                                                                                         torch.float32)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        genfast.attention(*leaves, enable_gqa=True, causal="bottom_right", deterministic=True,
                          impl=impl).square().sum().backward()
        runs.append([t.grad for t in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("impl", fused_impls())
def test_gradients_with_and_without_atomics(deterministic, impl, monkeypatch):
    """dQ added with atomics in the key-block pass (Triton's with GENFAST_TRITON_ATOMIC_DQ=1) or from
    its own pass."""
    skip_unless_supported(impl, "cpu")
    monkeypatch.setenv("GENFAST_TRITON_ATOMIC_DQ", "1")
    _compare_grads(*_qkv(2, 4, 2, 37, 50, 24, torch.float32), impl=impl, causal="bottom_right", dropout_p=0.2,
                   seed=4, softcap=5.0, deterministic=deterministic)


def test_auto_takes_triton_on_hopper_gpus(monkeypatch):
    """impl="auto" on an sm_90 GPU runs Triton, which beat the sm_80 CUDA kernels there, unless the
    Hopper kernels are opted into or a head dim is not a multiple of 8; elsewhere the CUDA kernels; an
    explicit impl is kept."""
    module = importlib.import_module("genfast.attention")
    monkeypatch.setattr(module._backend, "native_runs_on", lambda kind: True)
    monkeypatch.setattr(module._backend, "triton_runs_on", lambda kind: True)
    q = types.SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16)
    for capability, opted_in, expected in [((9, 0), False, "triton"), ((9, 0), True, "native"),
                                           ((8, 0), False, "native"), ((10, 0), False, "native")]:
        monkeypatch.setattr(module, "_capability", lambda device, c=capability: c)
        if opted_in:
            monkeypatch.setenv("GENFAST_ATTENTION_SM90", "1")
        else:
            monkeypatch.delenv("GENFAST_ATTENTION_SM90", raising=False)
        assert module._fused_backend("auto", q, (128, 128)) == expected, capability
        assert module._fused_backend("native", q, (128, 128)) == "native"
    monkeypatch.setattr(module, "_capability", lambda device: (9, 0))
    assert module._fused_backend("auto", q, (64, 33)) == "native"  # head dims Triton failed a test at
    monkeypatch.setattr(module._backend, "triton_runs_on", lambda kind: False)
    assert module._fused_backend("auto", q, (128, 128)) == "native"  # no Triton: the CUDA kernels


def test_auto_takes_triton_past_the_cuda_kernels_head_dims(monkeypatch):
    """On a GPU, head dims past the CUDA kernels' 256 run on Triton (to 512) under "auto", and past
    512 on the reference; impl="native" raises, saying whether Triton can."""
    module = importlib.import_module("genfast.attention")
    monkeypatch.setattr(module._backend, "native_runs_on", lambda kind: True)
    monkeypatch.setattr(module._backend, "triton_runs_on", lambda kind: True)
    monkeypatch.setattr(module, "_capability", lambda device: (8, 0))
    q = types.SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16)
    assert [module._fused_backend("auto", q, dims) for dims in ((256, 256), (320, 320), (64, 512), (576, 512))] \
        == ["native", "triton", "triton", "reference"]
    assert module._fused_backend("triton", q, (512, 512)) == "triton"
    with pytest.raises(TypeError, match="head dims up to 256, got 320; impl='triton' can"):
        module._fused_backend("native", q, (320, 320))
    with pytest.raises(TypeError, match="got 576$"):
        module._fused_backend("native", q, (576, 512))
    monkeypatch.setattr(module._backend, "triton_runs_on", lambda kind: False)
    assert module._fused_backend("auto", q, (320, 320)) == "reference"


def test_deterministic_algorithms_ask_for_a_deterministic_backward():
    module = importlib.import_module("genfast.attention")  # genfast.attention is the function
    assert not module._deterministic(False) and module._deterministic(True)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert module._deterministic(False)
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("impl", fused_impls())
def test_gradients_through_lse_alone(impl):
    """A loss of the log-sum-exp alone (as when partial attentions are combined by their
    normalizers): o gets no gradient, which the backward takes as zeros."""
    skip_unless_supported(impl, "cpu")
    q, k, v = _qkv(2, 2, 1, 9, 12, 8, torch.float32)

    def grads(impl, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        _, lse = genfast.attention(*leaves, enable_gqa=True, causal="bottom_right", impl=impl, return_lse=True)
        return torch.autograd.grad((lse.double() ** 2).sum(), leaves, allow_unused=True, materialize_grads=True)

    got, exact, low = grads(impl, torch.float32), grads("reference", torch.float64), grads("reference", torch.float32)
    for name, a, e, lo in zip("qkv", got, exact, low):
        assert_error_ratio(a, e, lo, ratio=3.0, msg=f"grad {name}")
    assert not got[2].any()  # lse does not depend on v


@pytest.mark.parametrize("impl", fused_impls())
def test_gradients_reach_whichever_input_asks_for_them(impl):
    """A backward is recorded only when grad mode is on and an input asks for a gradient (the
    native ops skip their autograd node otherwise): each of q, k, v and an additive mask asking
    alone gets the gradient it gets when all ask, and without either the output has no grad_fn."""
    skip_unless_supported(impl, "cpu")
    q, k, v = _qkv(1, 4, 2, 9, 20, 16, torch.float32)
    mask = torch.randn(1, 1, 9, 20, generator=torch.Generator().manual_seed(1))
    every = [t.clone().requires_grad_() for t in (q, k, v, mask)]
    expected = torch.autograd.grad(genfast.attention(*every, enable_gqa=True, impl=impl).sum(), every)
    for i in range(4):
        inputs = [t.clone().requires_grad_(j == i) for j, t in enumerate((q, k, v, mask))]
        (grad,) = torch.autograd.grad(genfast.attention(*inputs, enable_gqa=True, impl=impl).sum(), inputs[i])
        torch.testing.assert_close(grad, expected[i], msg=f"input {i}")
    with torch.no_grad():
        assert genfast.attention(*every, enable_gqa=True, impl=impl).grad_fn is None
    o = genfast.attention(q, k, v, mask, enable_gqa=True, impl=impl)
    assert o.grad_fn is None and not o.requires_grad
    torch.testing.assert_close(o, genfast.attention(*every, enable_gqa=True, impl=impl).detach(), rtol=0, atol=0)


@pytest.mark.parametrize("impl", fused_impls())
def test_half_mask_gradient_from_the_forwards_float32_o(impl):
    """With a float16 mask that needs its gradient, the forward keeps o in float32 for the backward's
    delta (float_o) and rounds it for the caller, and the gradients are those of the backward that
    recomputes the float32 o from a float16 one. The CPU kernel's float32 o rounds to the o of a call
    without that gradient, bit for bit; Triton's takes P V with P in two float16 parts, nearer the
    exact o than the o of P rounded to float16 (the delta of a gradient summed over a broadcast mask
    gathers P's rounding)."""
    skip_unless_supported(impl, "cpu", torch.float16)
    q, k, v = _qkv(2, 2, 1, 20, 30, 16, torch.float16)
    mask = torch.randn(1, 2, 20, 30, generator=torch.Generator().manual_seed(3)).half()
    leaves = [t.clone().requires_grad_() for t in (q, k, v, mask)]
    o = genfast.attention(*leaves, enable_gqa=True, impl=impl)
    assert o.dtype == torch.float16 and type(o.grad_fn).__name__ == "ToCopyBackward0"  # the float32 o, rounded
    grad = torch.randn(o.shape, generator=torch.Generator().manual_seed(4)).half()
    kept = torch.autograd.grad(o, leaves, grad)
    forward = torch.ops.genfast.attention_forward if impl == "native" else torch.ops.genfast.attention_forward_triton
    backward = torch.ops.genfast.attention_backward if impl == "native" else torch.ops.genfast.attention_backward_triton
    lo, hi = importlib.import_module("genfast.attention").band(20, 30, None, None)
    o16, lse = forward(q, k, v, mask, None, 0.25, 0.0, lo, hi, 0.0, 0, 0)
    o32, lse32 = forward(q, k, v, mask, None, 0.25, 0.0, lo, hi, 0.0, 0, 0, False, True)
    assert o32.dtype == torch.float32 and torch.equal(o32.half(), o) and torch.equal(lse32, lse)
    if impl == "native":
        assert torch.equal(o32.half(), o16)
    else:
        exact = genfast.attention(q.double(), k.double(), v.double(), mask.double(), scale=0.25, enable_gqa=True,
                                  impl="reference")
        assert (o32 - exact).abs().max() < 0.2 * (o16.double() - exact).abs().max()
    recomputed = backward(grad, None, q, k, v, o16, lse, mask, None, 0.25, 0.0, lo, hi, 0.0, 0, 0, True)
    assert all(torch.equal(a, b) for a, b in zip(kept[:3], recomputed[:3]))
    assert torch.equal(kept[3], recomputed[3].half())


@pytest.mark.parametrize("impl", fused_impls())
def test_opcheck_and_compile(impl):
    skip_unless_supported(impl, "cpu")
    q, k, v = _qkv(1, 2, 1, 9, 12, 8, torch.float32)
    mask = torch.randn(9, 12)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, mask)]
    args = (*leaves, torch.tensor([0.5, 0.1]), 0.3, 2.0, -3, 4, 0.2, 5, 8)
    forward = torch.ops.genfast.attention_forward if impl == "native" else torch.ops.genfast.attention_forward_triton
    backward = torch.ops.genfast.attention_backward if impl == "native" else torch.ops.genfast.attention_backward_triton
    torch.library.opcheck(forward, args)
    o, lse = forward(q, k, v, mask, None, 0.3, 0.0, -3, 4, 0.0, 0, 0)
    for m in (mask, mask.half(), mask.expand(1, 2, 9, 12).half()):  # the mask's gradient in its dtype
        torch.library.opcheck(backward,
                              (torch.randn_like(o), torch.randn_like(lse), q, k, v, o, lse, m, None, 0.3, 0.0, -3, 4,
                               0.0, 0, 0, True))
    q_strided = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, L, H, D) storage: fresh gradients are contiguous
    torch.library.opcheck(backward, (torch.randn_like(o), None, q_strided, k, v, o, lse, None, None, 0.3, 0.0, -3, 4,
                                     0.0, 0, 0, False))
    half = [t.detach().half().requires_grad_() for t in leaves]  # float_o: o in float32
    torch.library.opcheck(forward, (*half, None, 0.3, 0.0, -3, 4, 0.0, 0, 0, False, True))

    def layer(q, k, v, mask):
        return genfast.attention(q, k, v, mask, enable_gqa=True, causal="bottom_right", impl=impl)

    assert_compiles_like_eager(layer, leaves)


def test_bad_input_names_the_argument():
    q, k, v = _qkv(2, 4, 2, 5, 7, 8, torch.float32)
    f = genfast.attention
    with pytest.raises(ValueError, match="enable_gqa"):
        f(q, k, v)
    k3, v3 = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    with pytest.raises(ValueError, match="must divide"):
        f(q, k3, v3, enable_gqa=True)
    with pytest.raises(ValueError, match="head_dim must equal"):
        f(q, k[..., :4], v, enable_gqa=True)
    with pytest.raises(ValueError, match="attn_mask must broadcast"):
        f(q, k, v, torch.ones(5, 6, dtype=torch.bool), enable_gqa=True)
    with pytest.raises(TypeError, match="attn_mask must be a bool"):
        f(q, k, v, torch.ones(5, 7, dtype=torch.int64), enable_gqa=True)
    with pytest.raises(TypeError, match="k and v must have q's dtype"):
        f(q, k.half(), v, enable_gqa=True)
    with pytest.raises(TypeError, match="q must be float32"):
        f(q.long(), k, v, enable_gqa=True)
    with pytest.raises(ValueError, match="dropout_p"):
        f(q, k, v, dropout_p=1.0, enable_gqa=True)
    with pytest.raises(ValueError, match="causal must be one of"):
        f(q, k, v, causal="left", enable_gqa=True)
    with pytest.raises(ValueError, match="window must be"):
        f(q, k, v, window=(2,), enable_gqa=True)
    with pytest.raises(ValueError, match="alibi_slopes must have shape"):
        f(q, k, v, alibi_slopes=torch.ones(3), enable_gqa=True)
    with pytest.raises(ValueError, match="softcap must be"):
        f(q, k, v, softcap=0.0, enable_gqa=True)
    if genfast._backend.native_runs_on("cpu"):
        with pytest.raises(NotImplementedError, match="no gradient to alibi_slopes"):
            f(q, k, v, alibi_slopes=torch.ones(4, requires_grad=True), enable_gqa=True, impl="native")
        with pytest.raises(RuntimeError, match="must divide"):
            torch.ops.genfast.attention_forward(q.detach(), k3, v3, None, None, 1.0, 0.0, 0, 0, 0.0, 0, 0)


# (threads, GENFAST_CPU_ATTENTION_DQ_BUDGET_MIB) that take each of the CPU backward's schedules
# (csrc/cpu/attention.cpp's key_block_chunks) in the tests below. One pair of 3 key blocks: one pass
# on one thread; 2 chunks on two threads, 3 on eight; with dQ's own size for the chunks' budget, a
# pass per key block and one per query block, on two threads and on eight. Two packed pairs: one
# pass a pair on one and two threads (two chunks a pair tie with it there, and the fewest win);
# 3 chunks on eight, and with the budget the passes per block.
BACKWARD_SCHEDULES = ((1, None), (2, "0"), (2, None), (8, None), (8, "0"))


def _grads_per_schedule(run, leaves, monkeypatch):
    grads = []
    threads = torch.get_num_threads()
    try:
        for count, budget in BACKWARD_SCHEDULES:
            torch.set_num_threads(count)
            if budget is None:
                monkeypatch.delenv("GENFAST_CPU_ATTENTION_DQ_BUDGET_MIB", raising=False)
            else:
                monkeypatch.setenv("GENFAST_CPU_ATTENTION_DQ_BUDGET_MIB", budget)
            copies = [t.clone().requires_grad_() for t in leaves]
            grads.append(torch.autograd.grad(run(*copies), copies))
    finally:
        torch.set_num_threads(threads)
    return grads


def test_backward_schedules_agree(monkeypatch):
    """The CPU backward's schedules (BACKWARD_SCHEDULES): the same gradients each way, a mask's too."""
    skip_unless_supported("native", "cpu")
    q, k, v = _qkv(1, 4, 1, 70, 300, 16, torch.float32)  # one pair of 3 key blocks
    mask = torch.randn(70, 300)

    def run(q, k, v, mask):
        o = genfast.attention(q, k, v, mask, dropout_p=0.1, generator=genfast.PhiloxGenerator(1), enable_gqa=True,
                              causal="bottom_right", impl="native")
        return o.square().sum()

    grads = _grads_per_schedule(run, (q, k, v, mask), monkeypatch)
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    _compare_grads(q, k, v, mask, causal="bottom_right")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_schedules_agree_on_packed_sequences(dtype, monkeypatch):
    """Sequences of 300 and 150 queries and keys packed, two query heads on one key head: dQ summed
    over chunks past a sequence's first block of queries, and the short one's last chunk past its
    keys (three chunks a pair on eight threads); bfloat16 on pairs where the CPU has AVX512-BF16."""
    skip_unless_supported("native", "cpu")
    cu = torch.tensor([0, 300, 450], dtype=torch.int32)
    q, k, v = (torch.randn(450, heads, 32).to(dtype) for heads in (2, 1, 1))
    weights = torch.randn(450, 2, 32)

    def run(q, k, v, impl="native"):
        o = genfast.attention_varlen(q, k, v, cu, cu, 300, 300, causal="bottom_right", impl=impl)
        return (o.double() * weights.double()).sum()

    grads = _grads_per_schedule(run, (q, k, v), monkeypatch)
    exact, low = ([t.to(precision).requires_grad_() for t in (q, k, v)] for precision in (torch.float64, dtype))
    exact_grads = torch.autograd.grad(run(*exact, impl="reference"), exact)
    low_grads = torch.autograd.grad(run(*low, impl="reference"), low)
    for schedule, got in zip(BACKWARD_SCHEDULES, grads):
        for name, a, e, lo in zip("qkv", got, exact_grads, low_grads):
            assert_error_ratio(a, e, lo, ratio=3.0, msg=f"grad_{name}, schedule {schedule}")


def test_cuda_kernels_refuse_older_gpus_asking_the_capability_once(monkeypatch):
    module = importlib.import_module("genfast.attention")
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: asked.append(device) or (7, 5))
    q = types.SimpleNamespace(dtype=torch.float16, device=torch.device("cuda", 0))
    module._capability.cache_clear()
    try:
        for _ in range(2):
            assert "compute capability 8.0 or later" in module._cuda_kernels_refuse(q, 64)
        assert asked == [torch.device("cuda", 0)]
    finally:
        module._capability.cache_clear()  # the real GPU's answer for the tests after this one


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("impl", fused_impls())
def test_autocast_casts_q_k_v_as_sdpa(impl, dtype):
    """Under torch.autocast q, k and v are cast to its dtype, as SDPA's are (a float32 model under
    autocast hands attention float32 q and k, turned by its rotary embedding, beside a 16-bit v):
    the output in that dtype, gradients to the float32 inputs; the same for packed sequences."""
    skip_unless_supported(impl, "cpu", dtype)
    q, k, v = _qkv(2, 4, 2, 9, 9, 16, torch.float32)
    v = v.to(dtype)
    for t in (q, k, v):
        t.requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        got = genfast.attention(q, k, v, is_causal=True, enable_gqa=True, impl=impl)
        low = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert got.dtype == low.dtype == dtype
    exact = ref.attention(*(t.detach().to(dtype).double() for t in (q, k, v)), causal="top_left",
                          enable_gqa=True)
    assert_error_ratio(got, exact, low)
    got.float().sum().backward()
    assert q.grad.dtype == k.grad.dtype == torch.float32 and v.grad.dtype == dtype

    packed = [t.detach().transpose(1, 2).reshape(18, t.shape[1], 16) for t in (q, k, v)]
    cu = torch.tensor([0, 9, 18], dtype=torch.int32)
    with torch.autocast("cpu", dtype=dtype):
        got_packed = genfast.attention_varlen(*packed, cu, cu, 9, 9, causal="bottom_right", impl=impl)
    assert got_packed.dtype == dtype
    torch.testing.assert_close(got_packed, got.detach().transpose(1, 2).reshape(18, 4, 16), atol=0, rtol=0)
