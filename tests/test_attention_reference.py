"""The attention reference against torch's SDPA and against its own definition: masks, causal
alignments, GQA, windows, ALiBi, soft-capping, dropout, fully masked rows, varlen, gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from genfast.reference import attention as ref
from genfast.reference.random import philox_uniform


def _qkv(batch=2, heads=4, kv_heads=None, lq=7, lk=9, dim=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    kv_heads = kv_heads or heads
    q = torch.randn(batch, heads, lq, dim, generator=g, dtype=dtype)
    k = torch.randn(batch, kv_heads, lk, dim, generator=g, dtype=dtype)
    v = torch.randn(batch, kv_heads, lk, dim, generator=g, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("lq,lk", [(7, 9), (9, 9), (1, 17), (17, 1)])
def test_matches_sdpa(lq, lk, is_causal):
    q, k, v = _qkv(lq=lq, lk=lk)
    torch.testing.assert_close(ref.attention(q, k, v, is_causal=is_causal),
                               F.scaled_dot_product_attention(q, k, v, is_causal=is_causal))


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("shape", [(2, 4, 7, 9), (1, 1, 7, 9), (2, 1, 1, 9), (7, 9)])
def test_masks_broadcast_like_sdpa(mask_kind, shape):
    q, k, v = _qkv()
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(shape, generator=g) < 0.7 if mask_kind == "bool" else torch.randn(shape, generator=g,
                                                                                      dtype=torch.float64)
    if mask_kind == "bool":
        mask[..., 0] = True  # no fully masked row: SDPA gives NaN there
    torch.testing.assert_close(ref.attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, mask))


def test_gqa_and_scale_match_sdpa():
    q, k, v = _qkv(heads=8, kv_heads=2)
    torch.testing.assert_close(ref.attention(q, k, v, scale=0.3, enable_gqa=True),
                               F.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=True))
    with pytest.raises(ValueError, match="enable_gqa"):
        ref.attention(q, k, v)


def test_bottom_right_causal_is_decoding_with_a_cache():
    """The last Lq queries of a sequence against all its keys: the rows of full causal attention."""
    q_all, k, v = _qkv(lq=12, lk=12)
    full = ref.attention(q_all, k, v, is_causal=True)
    tail = ref.attention(q_all[:, :, -5:], k, v, causal="bottom_right")
    torch.testing.assert_close(tail, full[:, :, -5:])


def test_window_alibi_softcap_follow_the_formula():
    q, k, v = _qkv(heads=3, lq=6, lk=10)
    slopes = torch.tensor([0.5, 0.25, 0.125], dtype=torch.float64)
    got, lse = ref.attention(q, k, v, window=(2, 1), alibi_slopes=slopes, softcap=5.0, return_lse=True)
    s = 5.0 * torch.tanh(q @ k.transpose(-1, -2) / math.sqrt(16) / 5.0)
    i, j = torch.arange(6)[:, None], torch.arange(10)[None, :]
    s = s - slopes[:, None, None] * (i + 4 - j).abs()
    keep = (j >= i + 4 - 2) & (j <= i + 4 + 1)
    s = s.masked_fill(~keep, float("-inf"))
    torch.testing.assert_close(got, torch.softmax(s, -1) @ v)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))


def test_fully_masked_rows_are_zero_with_zero_gradients():
    q, k, v = _qkv()
    mask = torch.ones(7, 9, dtype=torch.bool)
    mask[3] = False
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, lse = ref.attention(*leaves, mask, return_lse=True)
    assert torch.equal(o[:, :, 3], torch.zeros_like(o[:, :, 3])) and torch.isinf(lse[:, :, 3]).all()
    assert torch.isfinite(o).all()
    o.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    assert not leaves[0].grad[:, :, 3].any()


def test_nan_propagates():
    q, k, v = _qkv()
    q[0, 1, 2, 3] = float("nan")
    o, lse = ref.attention(q, k, v, return_lse=True)
    assert o[0, 1, 2].isnan().all() and lse[0, 1, 2].isnan()
    assert not o[0, 1, 1].isnan().any()


def test_dropout_is_the_philox_keep_mask():
    q, k, v = _qkv()
    p = 0.3
    got = ref.attention(q, k, v, dropout_p=p, dropout_seed=5, dropout_offset=8)
    u = philox_uniform((2, 4, 7, 9), 5, 8, torch.float64)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1)
    torch.testing.assert_close(got, torch.where(u >= p, weights / (1 - p), 0.0) @ v)
    same = ref.attention(q, k, v, dropout_p=p, dropout_uniforms=u)
    torch.testing.assert_close(same, got)


def test_varlen_is_each_sequence_alone():
    g = torch.Generator().manual_seed(3)
    lengths_q, lengths_k = [3, 1, 5], [4, 6, 5]
    q = torch.randn(sum(lengths_q), 4, 8, generator=g, dtype=torch.float64)
    k = torch.randn(sum(lengths_k), 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(sum(lengths_k), 2, 8, generator=g, dtype=torch.float64)
    cu_q = torch.tensor([0, 3, 4, 9])
    cu_k = torch.tensor([0, 4, 10, 15])
    o, lse = ref.varlen_attention(q, k, v, cu_q, cu_k, causal="bottom_right", enable_gqa=True, return_lse=True)
    assert o.shape == (9, 4, 8) and lse.shape == (4, 9)
    for n in range(3):
        qs = q[cu_q[n]:cu_q[n + 1]].transpose(0, 1)[None]
        ks, vs = (t[cu_k[n]:cu_k[n + 1]].transpose(0, 1)[None] for t in (k, v))
        expected = ref.attention(qs, ks, vs, causal="bottom_right", enable_gqa=True)
        torch.testing.assert_close(o[cu_q[n]:cu_q[n + 1]], expected[0].transpose(0, 1))


def test_gradcheck():
    q, k, v = (t.requires_grad_() for t in _qkv(batch=1, heads=2, lq=3, lk=4, dim=4))
    bias = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    slopes = torch.tensor([0.5, 0.1], dtype=torch.float64)
    torch.autograd.gradcheck(lambda q, k, v, bias: ref.attention(q, k, v, bias, softcap=3.0, alibi_slopes=slopes,
                                                                 causal="bottom_right", return_lse=True),
                             (q, k, v, bias))
