"""The references of rotary embedding and of attention over a KV cache extended in place, against
formulas written another way: rotation as complex multiplication (interleaved) and as
transformers' rotate_half (GPT-NeoX); decoding token by token through the cache equal to causal
attention over the whole sequence at once."""

import pytest
import torch

from genfast.reference.attention import attention
from genfast.reference.attention_kvcache import kvcache_attention
from genfast.reference.rotary import rotary


def _tables(positions, rotary_dim, base=10000.0, dtype=torch.float64):
    inverse = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * inverse
    return angles.cos().to(dtype), angles.sin().to(dtype)


@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_interleaved_rotary_is_complex_multiplication(rotary_dim):
    """Features (2m, 2m + 1) as the complex number x_2m + i x_2m+1, times e^(i angle); the
    features past rotary_dim unchanged."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 16, generator=g, dtype=torch.float64)
    positions = torch.tensor([[0, 3, 4, 9, 1], [7, 7, 2, 0, 11]])
    cos, sin = _tables(12, rotary_dim)
    turned = torch.view_as_complex(x[..., :rotary_dim].reshape(2, 5, 3, rotary_dim // 2, 2).contiguous())
    turn = torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))[positions][:, :, None]
    expected = torch.cat((torch.view_as_real(turned * turn).flatten(-2), x[..., rotary_dim:]), dim=-1)
    torch.testing.assert_close(rotary(x, cos, sin, positions, interleaved=True), expected)


def test_neox_rotary_is_transformers_rotate_half():
    """transformers' apply_rotary_pos_emb, whose cos and sin repeat the table across both halves."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, 6, 4, 32, generator=g, dtype=torch.float64) for _ in range(2))
    positions = torch.arange(6).repeat(2, 1) + torch.tensor([[0], [5]])
    cos, sin = _tables(16, 32)
    full_cos, full_sin = (torch.cat((t, t), dim=-1)[positions] for t in (cos, sin))
    # transformers' layout is (batch, heads, seqlen, head_dim)
    q_t, k_t = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), full_cos, full_sin)
    torch.testing.assert_close(rotary(q, cos, sin, positions, interleaved=False), q_t.transpose(1, 2))
    torch.testing.assert_close(rotary(k, cos, sin, positions, interleaved=False), k_t.transpose(1, 2))


def test_rotary_rounds_once_to_the_input_dtype():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 2, 8, generator=g).to(torch.bfloat16)
    cos, sin = _tables(4, 8, dtype=torch.float32)
    positions = torch.arange(4)[None]
    got = rotary(x, cos, sin, positions)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, rotary(x.float(), cos, sin, positions).to(torch.bfloat16))


@pytest.mark.parametrize("layout", ["padded", "paged", "cache_batch_idx"])
@pytest.mark.parametrize("interleaved", [True, False])
def test_decoding_through_the_cache_is_causal_attention_of_the_whole_sequence(layout, interleaved):
    """A prompt of 5 written at once, then 4 tokens one at a time: each step's output equals the
    matching rows of causal attention over the rotated whole sequence, and the cache then holds
    the rotated keys."""
    g = torch.Generator().manual_seed(3)
    batch, heads, kv_heads, dim, length, capacity = 2, 4, 2, 16, 9, 12
    q = torch.randn(batch, length, heads, dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, length, kv_heads, dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, length, kv_heads, dim, generator=g, dtype=torch.float64)
    cos, sin = _tables(capacity, 8)
    options = dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved, causal=True)
    if layout == "paged":  # pages of 4 keys, in a scrambled order
        k_cache, v_cache = (torch.zeros(7, 4, kv_heads, dim, dtype=torch.float64) for _ in range(2))
        options["block_table"] = torch.tensor([[5, 0, 3], [1, 6, 2]], dtype=torch.int32)
    else:
        k_cache, v_cache = (torch.zeros(3, capacity, kv_heads, dim, dtype=torch.float64) for _ in range(2))
        if layout == "cache_batch_idx":
            options["cache_batch_idx"] = torch.tensor([2, 0], dtype=torch.int32)
    positions = torch.arange(length).repeat(batch, 1)
    q_all, k_all = (rotary(t, cos, sin, positions, interleaved) for t in (q, k))
    expected = attention(q_all.transpose(1, 2), k_all.transpose(1, 2), v.transpose(1, 2), enable_gqa=True,
                         causal="top_left").transpose(1, 2)
    held = 0
    for step in (5, 1, 1, 1, 1):
        rows = slice(held, held + step)
        o = kvcache_attention(q[:, rows], k_cache, v_cache, k[:, rows], v[:, rows],
                              cache_seqlens=torch.full((batch,), held, dtype=torch.int32), **options)
        torch.testing.assert_close(o, expected[:, rows])
        held += step
    j = torch.arange(length)
    for n in range(batch):
        if layout == "paged":
            rows = options["block_table"][n, j // 4].long(), j % 4
        else:
            rows = torch.full_like(j, int(options.get("cache_batch_idx", torch.arange(batch))[n])), j
        assert torch.equal(k_cache[rows], k_all[n]) and torch.equal(v_cache[rows], v[n])
