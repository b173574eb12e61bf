"""Attention sinks (genfast.attention's sinks=, gpt-oss's learned sinks): the reference against an
independent softmax over the scores and the sink, its float64 gradients, and every fused backend
against it (o, lse and the gradients of q, k, v and the sinks by the error-ratio rule), through
the paths that join a sink: whole rows, rows split over key blocks (decoding), rows that see no key,
packed sequences; opcheck, torch.compile and bad input."""

import math

import pytest
import torch

import genfast
from genfast.reference import attention as ref
from genfast.testing.tolerances import assert_error_ratio
from conftest import assert_compiles_like_eager, fused_impls, skip_unless_supported


def sink_inputs(batch, heads, kv_heads, lq, lk, dim, dtype, seed=0, device="cpu"):
    """q, k, v and sinks: of either sign and size, and one -inf (a sink that changes nothing)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, h, n, dim, generator=g).to(device, dtype)
               for h, n in ((heads, lq), (kv_heads, lk), (kv_heads, lk)))
    sinks = (torch.randn(heads, generator=g) * 3).to(device, dtype)
    sinks[0] = float("-inf")
    return q, k, v, sinks


def _softmax_with_sink(q, k, v, sinks, mask=None):
    """The definition, written apart from the reference: the sink as one more column of the scores."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    joined = torch.cat([s, sinks[:, None, None].expand(*s.shape[:-1], 1)], -1)
    return torch.softmax(joined, -1)[..., :-1] @ v, torch.logsumexp(joined, -1)


def test_reference_is_the_softmax_with_the_sink_as_a_score():
    q, k, v, sinks = sink_inputs(2, 4, 2, 7, 11, 8, torch.float64)
    mask = torch.rand(2, 1, 7, 11, generator=torch.Generator().manual_seed(1)) > 0.3
    o, lse = ref.attention(q, k, v, mask, enable_gqa=True, sinks=sinks, return_lse=True)
    want_o, want_lse = _softmax_with_sink(q, k, v, sinks, mask)
    torch.testing.assert_close(o, want_o)
    torch.testing.assert_close(lse, want_lse)


def test_reference_gradients_in_float64():
    q, k, v, sinks = (t.requires_grad_() for t in sink_inputs(1, 2, 1, 5, 6, 4, torch.float64))
    mask = torch.ones(5, 6, dtype=torch.bool)
    mask[2] = False  # a row that sees no key: o = 0 whatever the sink, lse = its sink

    def f(q, k, v, sinks):
        o, lse = ref.attention(q, k, v, mask, enable_gqa=True, causal="bottom_right", softcap=2.0, sinks=sinks,
                               return_lse=True)
        return o, torch.where(torch.isfinite(lse), lse, 0)

    sinks.data[0] = 0.7  # gradcheck's finite differences need finite sinks
    assert torch.autograd.gradcheck(f, (q, k, v, sinks))


def test_a_row_that_sees_no_key_has_the_sinks_lse():
    q, k, v, sinks = sink_inputs(1, 3, 3, 4, 5, 8, torch.float32)
    o, lse = ref.attention(q, k, v, torch.zeros(4, 5, dtype=torch.bool), sinks=sinks, return_lse=True)
    assert torch.equal(o, torch.zeros_like(o))
    torch.testing.assert_close(lse, sinks[None, :, None].expand(1, 3, 4))


def _wide(t):
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _outputs_and_grads(impl, q, k, v, sinks, mask, grad_o, grad_lse, cast=None, **options):
    cast = cast or (lambda t: t)
    with_mask = mask is not None and mask.is_floating_point()  # an additive mask's gradient too
    leaves = [cast(t).detach().requires_grad_() for t in (q, k, v, sinks) + ((mask,) if with_mask else ())]
    o, lse = genfast.attention(*leaves[:3], leaves[4] if with_mask else mask, enable_gqa=True, impl=impl,
                               return_lse=True, sinks=leaves[3], **options)
    loss = (o.double() * grad_o).sum() + (torch.where(torch.isfinite(lse), lse, 0).double() * grad_lse).sum()
    return (o, lse, *torch.autograd.grad(loss, leaves))


def compare_with_sinks(impl, q, k, v, sinks, mask=None, seed=None, **options):
    """o, lse and every gradient of `impl` (q, k, v, the sinks and an additive mask) against the
    float64 reference, with the reference in the inputs' dtype as the error's yardstick."""
    g = torch.Generator().manual_seed(7)
    grad_o = torch.randn(*q.shape[:3], v.shape[3], generator=g, dtype=torch.float64).to(q.device)
    grad_lse = torch.randn(*q.shape[:3], generator=g, dtype=torch.float64).to(q.device)

    def run(impl, cast=None):
        keyed = dict(options, generator=genfast.PhiloxGenerator(seed)) if seed is not None else options
        return _outputs_and_grads(impl, q, k, v, sinks, mask, grad_o, grad_lse, cast, **keyed)

    got, exact, low = run(impl), run("reference", _wide), run("reference")
    assert got[0].dtype == q.dtype and got[1].dtype == torch.float32 and got[5].dtype == sinks.dtype
    for name, a, e, lo, ratio in zip(("o", "lse", "grad q", "grad k", "grad v", "grad sinks", "grad attn_mask"), got,
                                     exact, low, (2.0, 2.0, 3.0, 3.0, 3.0, 3.0, 3.0)):
        assert_error_ratio(a, e, lo.float() if name == "lse" else lo, ratio=ratio, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", fused_impls())
def test_matches_reference(impl, dtype):
    skip_unless_supported(impl, "cpu", dtype)
    q, k, v, sinks = sink_inputs(2, 4, 2, 33, 70, 32, dtype)
    mask = torch.rand(2, 1, 33, 70, generator=torch.Generator().manual_seed(3)) > 0.4
    mask[:, :, 5] = False  # rows that see no key
    compare_with_sinks(impl, q, k, v, sinks, mask, causal="bottom_right")


@pytest.mark.parametrize("lq", [1, 3])
@pytest.mark.parametrize("impl", fused_impls())
def test_decoding_rows_split_over_key_blocks(impl, lq):
    """A few queries of grouped heads against a long cache: the fused kernels stack the group's heads
    and split the keys (the sink joins the rows when the splits are combined)."""
    skip_unless_supported(impl, "cpu")
    compare_with_sinks(impl, *sink_inputs(1, 4, 1, lq, 600, 64, torch.float32), window=(300, 0))


@pytest.mark.parametrize("impl", fused_impls())
def test_half_precision_additive_mask_and_its_gradient(impl):
    """The float32 o that a 16-bit mask's gradient takes delta from joins the sinks too."""
    skip_unless_supported(impl, "cpu", torch.float16)
    q, k, v, sinks = sink_inputs(2, 2, 1, 20, 40, 16, torch.float16)
    mask = torch.randn(2, 1, 20, 40, generator=torch.Generator().manual_seed(2)).half()
    compare_with_sinks(impl, q, k, v, sinks, mask)


@pytest.mark.parametrize("impl", fused_impls())
def test_backward_op_recomputing_the_float32_o_joins_the_sinks(impl):
    """Handed a 16-bit o, the backward op recomputes o in float32 for a mask's gradient: with the
    forward's sinks, the gradients it gives are those from the forward's own float32 o."""
    skip_unless_supported(impl, "cpu", torch.float16)
    q, k, v, sinks = sink_inputs(1, 2, 1, 20, 40, 16, torch.float16)
    sinks = sinks.float()
    mask = torch.randn(1, 1, 20, 40, generator=torch.Generator().manual_seed(2)).half()
    suffix = "" if impl == "native" else "_triton"
    forward = getattr(torch.ops.genfast, "attention_forward" + suffix)
    backward = getattr(torch.ops.genfast, "attention_backward" + suffix)
    options = (0.25, 0.0, -(1 << 62), 1 << 62, 0.0, 0, 0)
    o_float, lse = forward(q, k, v, mask, None, *options, False, True, sinks)
    grad_o = torch.randn(o_float.shape, generator=torch.Generator().manual_seed(3)).half()
    kept = backward(grad_o, None, q, k, v, o_float, lse, mask, None, *options, True, True, sinks)
    recomputed = backward(grad_o, None, q, k, v, o_float.half(), lse, mask, None, *options, True, True, sinks)
    for a, e in zip(kept, recomputed):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("impl", fused_impls())
def test_with_dropout_softcap_and_alibi(impl):
    skip_unless_supported(impl, "cpu")
    q, k, v, sinks = sink_inputs(1, 2, 2, 20, 30, 16, torch.float32)
    compare_with_sinks(impl, q, k, v, sinks, seed=11, dropout_p=0.2, softcap=3.0, alibi_slopes=torch.tensor([0.3, 0.05]))


@pytest.mark.parametrize("impl", fused_impls())
def test_rows_that_see_no_key(impl):
    """o = 0 and lse = the sink, for a mask that hides every key of a row and for no keys at all."""
    skip_unless_supported(impl, "cpu")
    q, k, v, sinks = sink_inputs(1, 3, 3, 4, 5, 16, torch.float32)
    for keys in (5, 0):
        mask = torch.zeros(4, keys, dtype=torch.bool)
        o, lse = genfast.attention(q, k[:, :, :keys], v[:, :, :keys], mask, impl=impl, return_lse=True, sinks=sinks)
        assert torch.equal(o, torch.zeros_like(o))
        assert torch.equal(lse, sinks[None, :, None].expand(1, 3, 4))


@pytest.mark.parametrize("impl", fused_impls())
def test_nan_in_a_sink_reaches_its_heads_rows(impl):
    skip_unless_supported(impl, "cpu")
    q, k, v, sinks = sink_inputs(1, 3, 3, 4, 5, 16, torch.float32)
    sinks[1] = float("nan")
    o, lse = genfast.attention(q, k, v, impl=impl, return_lse=True, sinks=sinks)
    assert torch.isnan(o[:, 1]).all() and torch.isnan(lse[:, 1]).all()
    assert torch.isfinite(o[:, [0, 2]]).all() and torch.isfinite(lse[:, [0, 2]]).all()


@pytest.mark.parametrize("impl", fused_impls())
def test_packed_sequences(impl):
    skip_unless_supported(impl, "cpu")
    g = torch.Generator().manual_seed(4)
    cu_q = torch.tensor([0, 17, 18, 18, 40], dtype=torch.int32)
    cu_k = torch.tensor([0, 17, 100, 103, 125], dtype=torch.int32)
    q, k, v = torch.randn(40, 4, 32, generator=g), torch.randn(125, 2, 32, generator=g), torch.randn(125, 2, 32, generator=g)
    sinks = torch.randn(4, generator=g) * 2
    grad_o, grad_lse = torch.randn(40, 4, 32, generator=g), torch.randn(4, 40, generator=g)

    def run(impl, cast):
        leaves = [cast(t).requires_grad_() for t in (q, k, v, sinks)]
        o, lse = genfast.attention_varlen(*leaves[:3], cu_q, cu_k, 83, 83, causal="bottom_right", sinks=leaves[3],
                                          return_lse=True, impl=impl)
        loss = (o * cast(grad_o)).sum() + (lse * cast(grad_lse)).sum()
        return (o, lse, *torch.autograd.grad(loss, leaves))

    got, exact, low = run(impl, lambda t: t.clone()), run("reference", torch.Tensor.double), run("reference",
                                                                                                  torch.Tensor.clone)
    for name, a, e, lo in zip(("o", "lse", "grad q", "grad k", "grad v", "grad sinks"), got, exact, low):
        assert_error_ratio(a, e, lo, ratio=2.0 if name in ("o", "lse") else 3.0, msg=name)


@pytest.mark.parametrize("impl", fused_impls())
def test_opcheck_and_compile(impl):
    skip_unless_supported(impl, "cpu")
    q, k, v, sinks = sink_inputs(1, 2, 1, 9, 12, 8, torch.float32)
    sinks[0] = -1.0
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    suffix = "" if impl == "native" else "_triton"
    forward, backward, varlen, varlen_backward = (getattr(torch.ops.genfast, "attention_" + name + suffix) for name in
                                                  ("forward", "backward", "varlen_forward", "varlen_backward"))
    options = (0.3, 0.0, -3, 4, 0.0, 0, 0)
    torch.library.opcheck(forward, (*leaves[:3], None, None, *options, False, False, leaves[3]))
    # The backward ops have no autograd of their own (no double backward): q, k, v need none there.
    o, lse = forward(q, k, v, None, None, *options, False, False, sinks)
    torch.library.opcheck(backward, (torch.randn_like(o), torch.randn_like(lse), q, k, v, o, lse, None, None,
                                     *options, False, False, sinks))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)

    def packed(q, k, v):
        return q[0].transpose(0, 1), k[0, :, :9].transpose(0, 1), v[0, :, :9].transpose(0, 1), cu, cu, 5, 5, None

    options = (0.3, 0.0, -3, 0, 0.0, 0, 0, False)
    torch.library.opcheck(varlen, (*packed(*leaves[:3]), *options, leaves[3]))
    o, lse = varlen(*packed(q, k, v), *options, sinks)
    torch.library.opcheck(varlen_backward, (torch.randn_like(o), torch.randn_like(lse), *packed(q, k, v)[:3], o, lse,
                                            *packed(q, k, v)[3:], *options, sinks))

    def layer(q, k, v, sinks):
        return genfast.attention(q, k, v, enable_gqa=True, causal="bottom_right", sinks=sinks, impl=impl)

    assert_compiles_like_eager(layer, leaves)


def test_bad_sinks_name_the_argument():
    q, k, v, sinks = sink_inputs(1, 4, 2, 3, 5, 8, torch.float32)
    for bad in (sinks[:3], sinks[None], sinks.long(), [1.0] * 4):
        with pytest.raises(ValueError, match=r"sinks must be a floating-point tensor of shape \(heads,\) = \(4,\)"):
            genfast.attention(q, k, v, enable_gqa=True, sinks=bad)
    if genfast._backend.native_runs_on("cpu"):
        with pytest.raises(RuntimeError, match=r"sinks must have shape \(heads,\)"):
            torch.ops.genfast.attention_forward(q, k, v, None, None, 1.0, 0.0, 0, 0, 0.0, 0, 0, False, False, sinks[:2])
    # The backward ops check the sinks whose gradient they give.
    o, lse = genfast.attention(q, k, v, enable_gqa=True, return_lse=True, impl="reference")
    for name in ("attention_backward", "attention_backward_triton"):
        if name.endswith("_triton") or genfast._backend.native_runs_on("cpu"):
            with pytest.raises((RuntimeError, ValueError), match=r"sinks must have shape \(heads,\)"):
                getattr(torch.ops.genfast, name)(o, None, q, k, v, o, lse, None, None, 1.0, 0.0, 0, 0, 0.0, 0, 0,
                                                 False, False, sinks[:2])
