"""genfast.integrations.sdpa: torch.nn.functional.scaled_dot_product_attention patched to run
genfast.attention. Direct calls with SDPA's options, nn.TransformerEncoderLayer in training (which
reaches SDPA through MultiheadAttention's functional code), diffusers' default attention processor
and a compiled caller give torch's values and gradients by the error-ratio rule (float64 torch as
the exact value, float32 torch as the low-precision one), through genfast; dropout repeats under
torch's seed; calls its kernels do not take go to torch's SDPA, or raise when a backend was named;
the patch comes off as it went on."""

import pytest
import torch
import torch.nn.functional as F

import genfast.integrations.sdpa as genfast_sdpa
from genfast.testing.tolerances import assert_error_ratio
from conftest import assert_compiles_like_eager, fused_impls, skip_unless_supported


@pytest.fixture
def genfast_calls(monkeypatch):
    """The calls the patch makes to genfast.attention (q's shape each); torch's function restored
    after the test, whatever it did."""
    calls = []
    real_attention = genfast_sdpa.attention

    def attention(q, *args, **kwargs):
        calls.append(tuple(q.shape))
        return real_attention(q, *args, **kwargs)

    monkeypatch.setattr(genfast_sdpa, "attention", attention)
    yield calls
    genfast_sdpa.unpatch()


def _inputs(batch=2, heads=4, kv_heads=4, lq=33, lk=47, dim=16, requires_grad=True):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, lq, dim, generator=g)
    k, v = (torch.randn(batch, kv_heads, lk, dim, generator=g) for _ in range(2))
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _value_and_grads(fn, leaves, weights):
    out = fn(*leaves)
    return [out.detach()] + list(torch.autograd.grad((out.double() * weights).sum(), leaves))


def _options(name):
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(2, 1, 33, 47, generator=g) > 0.3
    return {"bool mask": dict(attn_mask=keep),
            "float mask": dict(attn_mask=torch.randn(33, 47, generator=g)),
            "causal, scale": dict(is_causal=True, scale=0.3),
            "grouped-query": dict(enable_gqa=True)}[name]


@pytest.mark.parametrize("impl", fused_impls())
@pytest.mark.parametrize("name", ["bool mask", "float mask", "causal, scale", "grouped-query"])
def test_patched_sdpa_runs_genfast_with_sdpas_options(impl, name, genfast_calls):
    skip_unless_supported(impl, "cpu")
    options = _options(name)
    leaves = _inputs(kv_heads=2 if options.get("enable_gqa") else 4)
    weights = torch.randn(2, 4, 33, 16, dtype=torch.float64)

    def call(q, k, v):  # SDPA takes a float mask in q's dtype only
        mask = options.get("attn_mask")
        mask = {} if mask is None else dict(attn_mask=mask if mask.dtype == torch.bool else mask.to(q.dtype))
        return F.scaled_dot_product_attention(q, k, v, **{**options, **mask})

    exact = _value_and_grads(call, [t.detach().double().requires_grad_() for t in leaves], weights)
    low = _value_and_grads(call, leaves, weights)
    with genfast_sdpa.patched(impl):
        got = _value_and_grads(call, leaves, weights)
    assert genfast_calls == [(2, 4, 33, 16)]
    for what, a, e, lo in zip(("output", "grad q", "grad k", "grad v"), got, exact, low):
        assert_error_ratio(a, e, lo, ratio=2.0 if what == "output" else 3.0, msg=f"{name}: {what}")


@pytest.mark.parametrize("impl", fused_impls())
def test_transformer_layers_in_training_reach_genfast(impl, genfast_calls):
    """nn.TransformerEncoderLayer in training calls SDPA through MultiheadAttention's functional
    code, with the causal and key-padding masks merged into one."""
    skip_unless_supported(impl, "cpu")
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, dropout=0.0, batch_first=True).train()
    exact_layer = torch.nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, dropout=0.0, batch_first=True)
    exact_layer.load_state_dict(layer.state_dict())
    exact_layer.double().train()
    x = torch.randn(3, 21, 64)
    padding = torch.zeros(3, 21, dtype=torch.bool)
    padding[1, 15:] = True
    causal = torch.ones(21, 21, dtype=torch.bool).triu(1)  # True: hidden, as nn.Transformer's masks say
    weights = torch.randn(3, 21, 64, dtype=torch.float64)

    def run(module, inputs):
        module.zero_grad()
        out = module(inputs, src_mask=causal, src_key_padding_mask=padding, is_causal=True)
        (out.double() * weights).sum().backward()
        return [out.detach()] + [p.grad.reshape(-1) for p in module.parameters()]

    exact = run(exact_layer, x.double())
    low = run(layer, x)
    with genfast_sdpa.patched(impl):
        got = run(layer, x)
    assert genfast_calls == [(3, 4, 21, 16)]
    assert_error_ratio(got[0], exact[0], low[0], msg="output")
    assert_error_ratio(torch.cat(got[1:]), torch.cat(exact[1:]), torch.cat(low[1:]), ratio=3.0,
                       msg="parameter gradients")


def test_diffusers_default_processor_reaches_genfast(genfast_calls):
    attention_processor = pytest.importorskip("diffusers.models.attention_processor")
    torch.manual_seed(0)
    block = attention_processor.Attention(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8)
    assert isinstance(block.processor, attention_processor.AttnProcessor2_0)
    x, context = torch.randn(2, 30, 32), torch.randn(2, 11, 24)
    exact = block.double()(x.double(), encoder_hidden_states=context.double())
    low = block.float()(x, encoder_hidden_states=context)
    with genfast_sdpa.patched():
        got = block(x, encoder_hidden_states=context)
    assert genfast_calls == [(2, 4, 30, 8)]
    assert_error_ratio(got.detach(), exact.detach(), low.detach(), msg="cross-attention block")


def test_dropout_repeats_under_torchs_seed(genfast_calls):
    q, k, v = _inputs(requires_grad=False)
    outs = []
    with genfast_sdpa.patched():
        for seed in (5, 5, 6):
            torch.manual_seed(seed)
            outs.append(F.scaled_dot_product_attention(q, k, v, dropout_p=0.5))
    assert genfast_calls == [(2, 4, 33, 16)] * 3
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    assert not torch.allclose(outs[0], genfast_sdpa.torch_sdpa(q, k, v))


def test_calls_the_kernels_do_not_take_go_to_torch_with_auto(genfast_calls):
    genfast_sdpa.patch()
    q64, k64, v64 = (t.detach().double() for t in _inputs())
    torch.testing.assert_close(F.scaled_dot_product_attention(q64, k64, v64),
                               genfast_sdpa.torch_sdpa(q64, k64, v64))
    q3 = torch.randn(4, 9, 16)  # (batch, length, dim): SDPA takes it, genfast's kernels do not
    torch.testing.assert_close(F.scaled_dot_product_attention(q3, q3, q3), genfast_sdpa.torch_sdpa(q3, q3, q3))
    assert genfast_calls == []
    F.scaled_dot_product_attention(*(t.detach() for t in _inputs()))
    assert genfast_calls == [(2, 4, 33, 16)]


def test_a_named_backend_raises_instead_of_falling_back(genfast_calls):
    q64, k64, v64 = (t.detach().double() for t in _inputs())
    with genfast_sdpa.patched("native"):
        with pytest.raises(TypeError, match="q must be float32, float16 or bfloat16"):
            F.scaled_dot_product_attention(q64, k64, v64)
    with pytest.raises(ValueError, match="impl must be one of"):
        genfast_sdpa.patch("reference")


def test_the_patch_comes_off_as_it_went_on():
    assert not genfast_sdpa.is_patched()
    with pytest.raises(ZeroDivisionError):
        with genfast_sdpa.patched():
            assert genfast_sdpa.is_patched()
            with genfast_sdpa.patched("native"):
                assert F.scaled_dot_product_attention.genfast_impl == "native"
            assert F.scaled_dot_product_attention.genfast_impl == "auto"
            1 / 0
    assert F.scaled_dot_product_attention is genfast_sdpa.torch_sdpa
    genfast_sdpa.patch()
    genfast_sdpa.patch("native")
    genfast_sdpa.unpatch()
    assert F.scaled_dot_product_attention is torch.nn.functional.scaled_dot_product_attention
    assert not genfast_sdpa.is_patched()


def test_a_compiled_caller_traces_the_patch_into_one_graph(genfast_calls):
    leaves = _inputs()
    with genfast_sdpa.patched():
        assert_compiles_like_eager(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), leaves)
    assert genfast_calls  # eager's call, and the compiled one's trace


BROADCAST_CASES = {
    "causal_upper_left": lambda q, k, v: dict(attn_mask=torch.nn.attention.bias.causal_upper_left(33, 47)),
    "causal_lower_right": lambda q, k, v: dict(attn_mask=torch.nn.attention.bias.causal_lower_right(33, 47)),
    "one kv head": lambda q, k, v: dict(key=k[:, :1], value=v[:, :1]),
    "k and v of one batch row": lambda q, k, v: dict(key=k[:1], value=v[:1]),
    "q of one batch row, one head": lambda q, k, v: dict(query=q[:1, :1]),
}


@pytest.mark.parametrize("impl", fused_impls())
@pytest.mark.parametrize("name", list(BROADCAST_CASES))
def test_patched_sdpa_broadcasts_and_reads_causal_biases_as_sdpa(impl, name, genfast_calls):
    """torch.nn.attention.bias's causal masks (whose storage is not the mask) and batch or head dims
    of 1 (SDPA broadcasts them, without enable_gqa): genfast's result equal to torch's by the
    error-ratio rule, gradients included."""
    skip_unless_supported(impl, "cpu")

    def call(q, k, v):
        args = {**dict(query=q, key=k, value=v), **BROADCAST_CASES[name](q, k, v)}
        return F.scaled_dot_product_attention(**args)

    leaves = _inputs()
    weights = torch.randn(call(*leaves).shape, dtype=torch.float64)
    exact = _value_and_grads(call, [t.detach().double().requires_grad_() for t in leaves], weights)
    low = _value_and_grads(call, leaves, weights)
    with genfast_sdpa.patched(impl):
        got = _value_and_grads(call, leaves, weights)
    assert len(genfast_calls) == 1 and type(got[0]) is torch.Tensor
    for what, a, e, lo in zip(("output", "grad q", "grad k", "grad v"), got, exact, low):
        assert_error_ratio(a, e, lo, ratio=2.0 if what == "output" else 3.0, msg=f"{name}: {what}")


def test_all_dropped_and_empty_heads_go_to_torch(genfast_calls):
    """dropout_p 1 (zeros) and head dim 0, which SDPA takes and genfast.attention refuses, go to
    torch's with auto; genfast.attention names a causal bias's equivalent."""
    q, k, v = (t.detach() for t in _inputs())
    with genfast_sdpa.patched():
        assert torch.equal(F.scaled_dot_product_attention(q, k, v, dropout_p=1.0), torch.zeros_like(q))
        empty = F.scaled_dot_product_attention(q[..., :0], k[..., :0], v)
        torch.testing.assert_close(empty, v.mean(2, keepdim=True).expand_as(empty))
    assert genfast_calls == []
    with pytest.raises(TypeError, match="is_causal=True"):
        genfast_sdpa.attention(q, k, v, torch.nn.attention.bias.causal_upper_left(33, 47))
