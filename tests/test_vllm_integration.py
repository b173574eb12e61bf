"""genfast.integrations.vllm, vLLM's merge_attn_states on genfast.merge_attention, against vLLM's
definition written here (in float64) on every backend: chunked prefill over a cached prefix merging
into attention over all the keys, a head-padded output written in place, output_lse, tokens without
a prefix, FlashAttention 2's +inf lse, fp8 output, torch.compile and bad input."""

import math

import pytest
import torch

import genfast
from genfast.integrations.vllm import merge_attn_states
from genfast.testing.tolerances import assert_error_ratio
from conftest import fused_impls, skip_unless_supported

IMPLS = fused_impls() + ["reference"]
TOKENS, HEADS, HEAD_SIZE = 11, 3, 40


def _vllm_merge(prefix_output, prefix_lse, suffix_output, suffix_lse, with_prefix, dtype=torch.float64):
    """vLLM's merge_attn_states as its kernels define it, in dtype: (output, output_lse)."""
    p_out, s_out = prefix_output.to(dtype), suffix_output.to(dtype)
    p_lse = torch.where(prefix_lse == math.inf, -math.inf, prefix_lse).to(dtype).T
    s_lse = torch.where(suffix_lse == math.inf, -math.inf, suffix_lse).to(dtype).T
    most = torch.maximum(p_lse, s_lse)
    p_se, s_se = torch.exp(p_lse - most), torch.exp(s_lse - most)
    total = p_se + s_se
    out = p_out * (p_se / total)[..., None] + s_out * (s_se / total)[..., None]
    lse = torch.log(total) + most
    out[with_prefix:] = s_out[with_prefix:]
    lse[with_prefix:] = suffix_lse.T.to(dtype)[with_prefix:]
    return out, lse.T


def _inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    prefix_output, suffix_output = (torch.randn(TOKENS, HEADS, HEAD_SIZE, generator=g).to(dtype) for _ in range(2))
    prefix_lse, suffix_lse = (torch.randn(HEADS, TOKENS, generator=g) * 3 for _ in range(2))
    prefix_lse[1, 2] = math.inf  # FlashAttention 2's lse of a sequence without keys
    return prefix_output, prefix_lse, suffix_output, suffix_lse


@pytest.mark.parametrize("impl", IMPLS)
def test_chunked_prefill_merges_into_attention_over_all_keys(impl):
    """New tokens attend to a cached prefix (all of it) and to themselves (causal); merged, they are
    causal attention over the cache and the new keys."""
    skip_unless_supported(impl, "cpu")
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, HEADS, n, 16, generator=g) for n in (TOKENS, 30, 30))
    cached = 30 - TOKENS
    full, full_lse = genfast.attention(q, k, v, causal="bottom_right", return_lse=True, impl="reference")
    (p, p_lse), (s, s_lse) = (genfast.attention(q, k[:, :, a:b], v[:, :, a:b], causal=causal, return_lse=True,
                                                impl="reference")
                              for a, b, causal in ((0, cached, None), (cached, 30, "top_left")))
    output, output_lse = torch.empty(TOKENS, HEADS, 16), torch.empty(HEADS, TOKENS)
    merge_attn_states(output, p[0].transpose(0, 1), p_lse[0], s[0].transpose(0, 1), s_lse[0], output_lse, impl=impl)
    torch.testing.assert_close(output, full[0].transpose(0, 1))
    torch.testing.assert_close(output_lse, full_lse[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("with_prefix", [None, 5, 0])
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_vllm(impl, with_prefix, dtype):
    """A head-padded output (vLLM's attention backends pad heads) written in place, its padding left
    alone; output_lse; tokens from prefill_tokens_with_context on take the suffix as it is."""
    skip_unless_supported(impl, "cpu", dtype)
    inputs = _inputs(dtype)
    padded = torch.full((TOKENS, HEADS, HEAD_SIZE + 8), 5.0, dtype=dtype)
    output, output_lse = padded[..., :HEAD_SIZE], torch.full((HEADS, TOKENS), math.nan)
    assert merge_attn_states(output, *inputs, output_lse, with_prefix, impl=impl) is None
    n = TOKENS if with_prefix is None else with_prefix
    exact = _vllm_merge(*inputs, n)
    low = _vllm_merge(*inputs, n, dtype=torch.float32)
    low = (low[0].to(dtype), low[1]) if dtype != torch.float32 else low
    assert_error_ratio(output, exact[0], low[0], msg="output")
    assert_error_ratio(output_lse, exact[1], low[1], msg="output_lse")
    assert torch.equal(output[n:], inputs[2][n:]) and torch.equal(output_lse[:, n:], inputs[3][:, n:])
    assert bool((padded[..., HEAD_SIZE:] == 5.0).all())


@pytest.mark.parametrize("impl", IMPLS)
def test_tokens_without_keys_and_fp8_output(impl):
    """A token whose prefix and suffix both lack keys gets 0 and -inf (vLLM's gives NaN); output_scale
    quantizes to float8_e4m3fn as vLLM does, up to fp8's rounding of a merge rounded once more."""
    skip_unless_supported(impl, "cpu")
    prefix_output, prefix_lse, suffix_output, suffix_lse = _inputs()
    prefix_lse[0, 4], suffix_lse[0, 4] = -math.inf, math.inf
    output = torch.empty(TOKENS, HEADS, HEAD_SIZE)
    output_lse = torch.empty(HEADS, TOKENS)
    merge_attn_states(output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse, impl=impl)
    assert bool((output[4, 0] == 0).all()) and output_lse[0, 4] == -math.inf
    scale = torch.tensor([0.05])
    fp8 = torch.empty(TOKENS, HEADS, HEAD_SIZE, dtype=torch.float8_e4m3fn)
    merge_attn_states(fp8, prefix_output, prefix_lse, suffix_output, suffix_lse, None, 7, scale, impl=impl)
    exact = _vllm_merge(prefix_output, prefix_lse, suffix_output, suffix_lse, 7)[0]
    wanted = (exact / 0.05).clamp(-448, 448).nan_to_num(0.0)
    torch.testing.assert_close(fp8.float(), wanted.float(), rtol=2 ** -3, atol=2 ** -9)  # fp8's spacing


@pytest.mark.parametrize("impl", fused_impls())
def test_compiles_with_fullgraph(impl):
    skip_unless_supported(impl, "cpu")
    inputs = _inputs()
    eager, compiled = (torch.empty(TOKENS, HEADS, HEAD_SIZE) for _ in range(2))
    merge_attn_states(eager, *inputs, impl=impl)
    torch.compile(lambda out, *args: merge_attn_states(out, *args, impl=impl), fullgraph=True)(compiled, *inputs)
    torch.testing.assert_close(compiled, eager)


def test_bad_input_names_the_argument():
    prefix_output, prefix_lse, suffix_output, suffix_lse = _inputs()
    output = torch.empty(TOKENS, HEADS, HEAD_SIZE)
    for args, match in (
            ((output[0], prefix_output, prefix_lse, suffix_output, suffix_lse), "output must be a 3-d"),
            ((output, prefix_output, prefix_lse.T, suffix_output, suffix_lse),
             r"prefix_lse and suffix_lse must be \(num_heads, num_tokens\) = \(3, 11\)"),
            ((output, prefix_output, prefix_lse, suffix_output, suffix_lse, None, -1),
             "prefill_tokens_with_context must be None or an int >= 0"),
            ((output, prefix_output, prefix_lse, suffix_output, suffix_lse, None, True),
             "prefill_tokens_with_context must be None or an int >= 0, got True"),
            ((output, prefix_output, prefix_lse, suffix_output, suffix_lse, None, 2.0),
             "prefill_tokens_with_context must be None or an int >= 0, got 2.0"),
            ((output, prefix_output, prefix_lse, suffix_output, suffix_lse, None, None, torch.ones(1)),
             "output must be torch.float8_e4m3fn")):
        with pytest.raises(ValueError, match=match):
            merge_attn_states(*args)
