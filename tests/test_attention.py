"""genfast.attention's fused forward against the reference: values and log-sum-exp by the
error-ratio rule for every option, odd lengths and head dims, fully masked rows, NaN, dropout's
Philox mask, opcheck, torch.compile and bad input. (The backward and the GPU kernels come next.)"""

import pytest
import torch
import torch.nn.functional as F

import genfast
from genfast.reference import attention as ref
from genfast.reference.random import philox_uniform
from genfast.testing.tolerances import assert_error_ratio
from conftest import skip_unless_runs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _qkv(batch, heads, kv_heads, lq, lk, dim, dtype, v_dim=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, lq, dim, generator=g)
    k = torch.randn(batch, kv_heads, lk, dim, generator=g)
    v = torch.randn(batch, kv_heads, lk, v_dim or dim, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _compare(q, k, v, **options):
    got, lse = genfast.attention(q, k, v, impl="native", return_lse=True, **options)
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
def test_matches_reference(dim, lq, lk, dtype):
    skip_unless_runs("native", "cpu")
    _compare(*_qkv(2, 3, 3, lq, lk, dim, dtype))


@pytest.mark.parametrize("dim", [128, 256])
def test_large_head_dims(dim):
    skip_unless_runs("native", "cpu")
    _compare(*_qkv(1, 2, 2, 40, 70, dim, torch.float32))


@pytest.mark.parametrize("causal", ["top_left", "bottom_right"])
@pytest.mark.parametrize("lq,lk", [(17, 17), (5, 130), (130, 70)])
def test_causal(lq, lk, causal):
    skip_unless_runs("native", "cpu")
    _compare(*_qkv(2, 2, 2, lq, lk, 32, torch.float32), causal=causal)


@pytest.mark.parametrize("window", [(8, 0), (3, 5), (-1, 2), (20, -1)])
def test_windows(window):
    skip_unless_runs("native", "cpu")
    _compare(*_qkv(1, 2, 2, 90, 150, 32, torch.float32), window=window)


@pytest.mark.parametrize("ratio", [2, 4, 8])
def test_grouped_query(ratio):
    skip_unless_runs("native", "cpu")
    _compare(*_qkv(2, 8, 8 // ratio, 20, 30, 16, torch.float32, v_dim=24), enable_gqa=True)


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("shape", [(2, 4, 20, 70), (1, 4, 1, 70), (20, 70), (70,)])
def test_masks_broadcast(shape, kind):
    skip_unless_runs("native", "cpu")
    q, k, v = _qkv(2, 4, 4, 20, 70, 16, torch.float32)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(shape, generator=g) < 0.8 if kind == "bool" else torch.randn(shape, generator=g)
    _compare(q, k, v, attn_mask=mask)


def test_alibi_softcap_scale_combined():
    skip_unless_runs("native", "cpu")
    q, k, v = _qkv(2, 3, 3, 33, 65, 16, torch.float32)
    slopes = torch.tensor([[0.5, 0.25, 0.125], [1.0, 0.1, 0.01]])
    _compare(q, k, v, alibi_slopes=slopes, softcap=4.0, scale=0.4, causal="bottom_right")
    _compare(q, k, v, alibi_slopes=slopes[0], attn_mask=torch.randn(33, 65))


def test_matches_sdpa():
    skip_unless_runs("native", "cpu")
    q, k, v = _qkv(2, 4, 4, 50, 50, 32, torch.float32)
    mask = torch.randn(50, 50)
    torch.testing.assert_close(genfast.attention(q, k, v, mask, is_causal=False, impl="native"),
                               F.scaled_dot_product_attention(q, k, v, mask), atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(genfast.attention(q, k, v, is_causal=True, impl="native"),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=2e-6, rtol=2e-5)


def test_fully_masked_rows_are_zero():
    skip_unless_runs("native", "cpu")
    q, k, v = _qkv(1, 2, 2, 9, 70, 16, torch.float32)
    mask = torch.ones(9, 70, dtype=torch.bool)
    mask[4] = False
    o, lse = genfast.attention(q, k, v, mask, impl="native", return_lse=True)
    assert torch.equal(o[:, :, 4], torch.zeros_like(o[:, :, 4])) and torch.isinf(lse[:, :, 4]).all()
    assert torch.isfinite(o).all()
    # An empty band masks every row.
    o = genfast.attention(q, k, v, window=(0, 0), causal="top_left", impl="native")
    torch.testing.assert_close(o, genfast.attention(q, k, v, window=(0, 0), causal="top_left", impl="reference"))


def test_nan_propagates():
    skip_unless_runs("native", "cpu")
    q, k, v = _qkv(1, 2, 2, 9, 70, 16, torch.float32)
    q[0, 1, 3, 5] = float("nan")
    o, lse = genfast.attention(q, k, v, impl="native", return_lse=True)
    assert o[0, 1, 3].isnan().all() and lse[0, 1, 3].isnan()
    assert not o[0, 1, 2].isnan().any() and not o[0, 0].isnan().any()


def test_dropout_is_the_reference_philox_mask():
    skip_unless_runs("native", "cpu")
    q, k, v = _qkv(2, 2, 2, 20, 75, 16, torch.float32)
    got = genfast.attention(q, k, v, dropout_p=0.3, generator=genfast.PhiloxGenerator(11, 4), impl="native")
    exact = genfast.attention(q.double(), k.double(), v.double(), dropout_p=0.3,
                              generator=genfast.PhiloxGenerator(11, 4), impl="reference")
    low = genfast.attention(q, k, v, dropout_p=0.3, generator=genfast.PhiloxGenerator(11, 4), impl="reference")
    assert_error_ratio(got, exact, low)
    # The kept fraction over many elements, and a fresh mask per call.
    generator = genfast.PhiloxGenerator(0)
    v1 = torch.ones(1, 1, 300, 1)
    q1, k1 = torch.zeros(1, 1, 300, 4), torch.zeros(1, 1, 300, 4)
    first = genfast.attention(q1, k1, v1, dropout_p=0.25, generator=generator, impl="native")
    second = genfast.attention(q1, k1, v1, dropout_p=0.25, generator=generator, impl="native")
    assert not torch.equal(first, second)
    kept = philox_uniform((1, 1, 300, 300), 0, 0, torch.float64) >= 0.25
    assert abs(kept.double().mean().item() - 0.75) < 0.01
    torch.testing.assert_close(first[0, 0, :, 0].double(), kept[0, 0].double().mean(1) / 0.75, atol=1e-5, rtol=0)


def test_empty_inputs():
    skip_unless_runs("native", "cpu")
    q, k, v = _qkv(2, 2, 2, 5, 7, 8, torch.float32)
    assert genfast.attention(q[:0], k[:0], v[:0], impl="native").shape == (0, 2, 5, 8)
    assert genfast.attention(q[:, :, :0], k, v, impl="native").shape == (2, 2, 0, 8)
    o, lse = genfast.attention(q, k[:, :, :0], v[:, :, :0], impl="native", return_lse=True)
    assert torch.equal(o, torch.zeros_like(o)) and torch.isinf(lse).all()


def test_opcheck_and_compile():
    skip_unless_runs("native", "cpu")
    q, k, v = _qkv(1, 2, 1, 9, 12, 8, torch.float32)
    mask = torch.randn(9, 12)
    args = (q, k, v, mask, torch.tensor([0.5, 0.1]), 0.3, 2.0, -3, 4, 0.2, None, 5, 8)
    torch.library.opcheck(torch.ops.genfast.attention_forward, args, test_utils=("test_schema", "test_faketensor"))

    def layer(q, k, v):
        return genfast.attention(q, k, v, mask, enable_gqa=True, causal="bottom_right", impl="native")

    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(q, k, v), layer(q, k, v))


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
        with pytest.raises(NotImplementedError, match="backward is not built yet"):
            f(q.requires_grad_(), k, v, enable_gqa=True, impl="native")
        with pytest.raises(RuntimeError, match="must divide"):
            torch.ops.genfast.attention_forward(q.detach(), k3, v3, None, None, 1.0, 0.0, 0, 0, 0.0, None, 0, 0)
