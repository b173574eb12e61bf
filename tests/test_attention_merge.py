"""genfast.merge_attention, partial attentions merged, with its backward, on every backend against
reference.attention_merge: outputs by the error-ratio rule (2x) and gradients (3x), float32/16/bfloat16,
1 to 5 states, states without keys (lse -inf, not read) and rows without any, the states along any dim,
strided and packed layouts, sequences of states, empty tensors, NaN, opcheck, torch.compile, CUDA
graphs and bad input. The reference itself: gradcheck in float64, and attentions over splits of the
keys merging into the attention over all of them."""

import math

import pytest
import torch

import genfast
from genfast.reference.attention_merge import attention_merge as reference_merge
from genfast.testing.tolerances import assert_error_ratio
from conftest import assert_compiles_like_eager, capture_cuda_graph, devices, fused_impls, skip_unless_supported

NO_KEYS = float("-inf")


def _states(states, rows, dim, dtype=torch.float32, device="cpu", seed=0):
    """o (states, *rows, dim) and lse (states, *rows): some states without keys, and the first row
    without any in all of them."""
    g = torch.Generator().manual_seed(seed)
    o = torch.randn(states, *rows, dim, generator=g)
    lse = torch.randn(states, *rows, generator=g) * 3
    lse.masked_fill_(torch.rand(lse.shape, generator=g) < 0.2, NO_KEYS)
    lse.view(states, -1)[:, 0] = NO_KEYS
    o.masked_fill_(torch.isinf(lse)[..., None] & (torch.rand(o.shape, generator=g) < 0.5), float("nan"))  # unread
    return o.to(device=device, dtype=dtype), lse.to(device)


def _compare(impl, o, lse, dim=0, lse_base=math.e):
    """Outputs and gradients of genfast.merge_attention against the float64 reference and the
    reference in o's dtype."""
    leaves = [o.detach().requires_grad_(), lse.detach().requires_grad_()]
    out, out_lse = genfast.merge_attention(*leaves, dim, lse_base=lse_base, impl=impl)
    g = torch.Generator().manual_seed(1)
    grads = (torch.randn(out.shape, generator=g).to(out), torch.randn(out_lse.shape, generator=g).to(out_lse))
    got = [out, out_lse, *torch.autograd.grad((out, out_lse), leaves, grads)]
    results = {}
    for name, cast in (("exact", torch.float64), ("low", None)):
        ref_leaves = [t.detach().to(cast or t.dtype).requires_grad_() for t in (o, lse)]
        r, r_lse = genfast.merge_attention(*ref_leaves, dim, lse_base=lse_base, impl="reference")
        results[name] = [r, r_lse, *torch.autograd.grad((r, r_lse), ref_leaves, [t.to(r.dtype) for t in grads[:1]] +
                                                        [grads[1].to(r_lse.dtype)])]
    assert out.dtype == o.dtype and out_lse.dtype == torch.float32
    for k, name in enumerate(("out", "lse", "grad_o", "grad_lse")):
        assert got[k].shape == results["exact"][k].shape, name
        assert_error_ratio(got[k], results["exact"][k], results["low"][k], ratio=2.0 if k < 2 else 3.0, msg=name)
    return out, out_lse


def test_reference_gradcheck():
    o, lse = _states(3, (2, 5), 4)
    lse[0, 0, 0] = 0.5  # rows without keys have lse -inf, which numerical derivatives cannot take
    o = o.nan_to_num().double().requires_grad_()
    lse = lse.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: reference_merge(a, b), (o, lse))
    assert torch.autograd.gradcheck(lambda a, b: reference_merge(a, b, dim=1), (o.transpose(0, 1), lse.transpose(0, 1)))
    assert torch.autograd.gradcheck(lambda a, b: reference_merge(a, b, lse_base=2), (o, lse))


@pytest.mark.parametrize("impl", fused_impls() + ["reference"])
def test_splits_of_the_keys_merge_into_the_attention_over_all(impl):
    """The definition at work: attentions over three chunks of the keys (one hiding every key from
    some queries, by a mask) merge into the attention over all the keys, output and lse."""
    skip_unless_supported(impl, "cpu")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (9, 40, 40))
    mask = torch.rand(9, 40, generator=g) > 0.3
    mask[2:5, 10:25] = False  # chunk 1 hides all its keys from queries 2 .. 4
    full, full_lse = genfast.attention(q, k, v, attn_mask=mask, return_lse=True, impl="reference")
    parts = [genfast.attention(q, k[:, :, a:b], v[:, :, a:b], attn_mask=mask[:, a:b], return_lse=True,
                               impl="reference") for a, b in ((0, 10), (10, 25), (25, 40))]
    assert bool(torch.isinf(parts[1][1][:, :, 2:5]).all())
    out, out_lse = genfast.merge_attention([p[0] for p in parts], [p[1] for p in parts], impl=impl)
    torch.testing.assert_close(out, full)
    torch.testing.assert_close(out_lse, full_lse)


@pytest.mark.parametrize("states,dim", [(1, 17), (2, 64), (5, 40), (3, 128)])
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
def test_matches_reference(impl, device, states, dim):
    skip_unless_supported(impl, device)
    _compare(impl, *_states(states, (2, 3, 7), dim, device=device))


@pytest.mark.parametrize("states,dim", [(2, 64), (3, 48), (2, 40), (8, 32), (9, 32)])
def test_rows_past_one_block(states, dim):
    """The CPU kernel computes the weights of 128 rows at a time: 335 rows, two whole blocks and a
    partial one, summed in registers (head dims of sixteens, up to eight states) or in a buffer (40;
    nine states)."""
    skip_unless_supported("native", "cpu")
    _compare("native", *_states(states, (5, 67), dim, seed=dim))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
def test_half_precision(impl, device, dtype):
    skip_unless_supported(impl, device, dtype)
    for states, dim in ((2, 128), (3, 72), (4, 5)):  # 16-byte chunks on CUDA, and single elements
        _compare(impl, *_states(states, (3, 11), dim, dtype, device, seed=states))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
def test_layouts(impl, device):
    """States along dim 1 (FlashInfer's (tokens, states, heads, head_dim)) and last, packed outputs
    (tokens, heads, head_dim) with FlashAttention's varlen lse (heads, tokens) transposed, strided
    features, and rows that view as no two dims (copied)."""
    skip_unless_supported(impl, device)
    o, lse = _states(3, (13, 4), 32, device=device)
    _compare(impl, o.transpose(0, 1).contiguous(), lse.transpose(0, 1).contiguous(), dim=1)
    _compare(impl, o.movedim(0, 2).contiguous(), lse.movedim(0, 2).contiguous(), dim=-1)
    varlen_lse = lse.transpose(1, 2).contiguous().transpose(1, 2)  # each state's lse (heads, tokens), seen as .T
    _compare(impl, o, varlen_lse)
    wide = torch.randn(3, 13, 4, 64, device=device)
    _compare(impl, wide[..., ::2], lse)
    o6, lse6 = _states(2, (3, 4, 5), 8, device=device)
    _compare(impl, o6.permute(0, 2, 1, 3, 4), lse6.permute(0, 2, 1, 3))  # (4, 3, 5) rows: no two dims


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls() + ["reference"])
def test_base_2_lse(impl, device):
    """lse_base=2 (FlashInfer's lse): the merge of lse / ln 2 is the natural merge's o, and its lse / ln
    2; outputs and gradients against the reference in float32 and float16, 16-byte chunks and single
    elements."""
    skip_unless_supported(impl, device)
    o, lse = _states(3, (5, 4), 32, device=device)
    natural, natural_lse = reference_merge(o, lse)
    out, out_lse = genfast.merge_attention(o, lse / math.log(2), lse_base=2, impl=impl)
    torch.testing.assert_close(out, natural, equal_nan=True)
    torch.testing.assert_close(out_lse * math.log(2), natural_lse)
    if impl != "reference":
        _compare(impl, o, lse, lse_base=2)
        _compare(impl, o.transpose(0, 1), lse.transpose(0, 1), dim=1, lse_base=2.0)
        _compare(impl, *_states(2, (3, 7), 40, torch.float16, device, seed=4), lse_base=2)


def _merge_sequences(impl, o, lse):
    """merge_attention of sequences of states against the reference of them stacked: o and lse as
    given, gradients included."""
    o = [t.detach().requires_grad_() for t in o]
    lse = [t.detach().requires_grad_() for t in lse]
    out, out_lse = genfast.merge_attention(o, lse, impl=impl)
    expected, expected_lse = reference_merge(torch.stack(o), torch.stack(lse))
    torch.testing.assert_close(out, expected, equal_nan=True)
    torch.testing.assert_close(out_lse, expected_lse)
    grads = [torch.randn_like(out), torch.randn_like(out_lse)]
    got = torch.autograd.grad((out, out_lse), o + lse, grads)
    wanted = torch.autograd.grad((expected, expected_lse), o + lse, grads)
    for a, e in zip(got, wanted):
        torch.testing.assert_close(a, e, equal_nan=True)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
def test_sequences_of_states(impl, device):
    """States as separate tensors, read where they lie: in separate allocations (up to eight listed),
    of different layouts (copied contiguous), more than eight evenly spaced (the unbound rows of one
    tensor) or not (stacked)."""
    skip_unless_supported(impl, device)
    o, lse = _states(11, (6, 4), 16, device=device)
    o = o.nan_to_num()
    separate = [t.clone() for t in o[:3]], [t.clone() for t in lse[:3]]
    _merge_sequences(impl, *separate)
    mixed = [o[0], o[1].transpose(0, 1).contiguous().transpose(0, 1), o[2]], list(lse[:3])
    _merge_sequences(impl, *mixed)
    _merge_sequences(impl, list(o.unbind(0)), list(lse.unbind(0)))
    _merge_sequences(impl, list(o.unbind(0))[::-1], list(lse.unbind(0))[::-1])  # spaced backwards
    _merge_sequences(impl, [t.clone() for t in o], [t.clone() for t in lse])
    wide = torch.randn(6, 4, 17, device=device)
    _merge_sequences(impl, [wide[..., :16], wide[..., 1:]], list(lse[:2]))  # states one element apart


def test_large_float32_merges_into_given_outputs_stream_their_stores():
    """Into outputs whose pages are resident (given, written before), the CPU kernel writes float32
    rows with streaming stores once the output outgrows the caches (32 MiB): two states of 8.4M
    elements; into new outputs, forward and backward, plain stores."""
    skip_unless_supported("native", "cpu")
    o, lse = _states(2, (4096, 16), 128, seed=5)
    _compare("native", o, lse)
    out = (torch.full(o.shape[1:], float("nan")), torch.full(lse.shape[1:], float("nan")))
    assert genfast._C.pages_resident(out[0].data_ptr(), out[0].numel() * 4)
    written = genfast.merge_attention(o, lse, out=out, impl="native")
    assert written[0] is out[0] and written[1] is out[1]
    expected = genfast.merge_attention(o.double(), lse.double(), impl="reference")
    low = genfast.merge_attention(o, lse, impl="reference")
    for got, exact, approximate, name in zip(out, expected, low, ("out", "lse")):
        assert_error_ratio(got, exact, approximate, msg=name)


@pytest.mark.parametrize("impl", fused_impls())
def test_states_are_read_where_they_lie(impl):
    """Separate tensors (up to eight) and evenly spaced ones (the unbound rows of a stacked tensor,
    states along dim 1 included) are neither stacked nor copied; more than eight unevenly spaced are."""
    skip_unless_supported(impl, "cpu")
    o, lse = _states(11, (6, 4), 16)

    def copies(o, lse, dim=0):
        with torch.profiler.profile() as prof:
            genfast.merge_attention(o, lse, dim, impl=impl)
        # (copy_ is not asked after: the Triton interpreter copies every argument)
        return sorted({e.key for e in prof.key_averages() if e.key in ("aten::stack", "aten::clone")})

    assert copies([t.clone() for t in o[:8]], [t.clone() for t in lse[:8]]) == []
    assert copies(o, lse) == []
    assert copies(list(o.unbind(0))[::-1], list(lse.unbind(0))[::-1]) == []
    assert copies(o.transpose(0, 1), lse.transpose(0, 1), dim=1) == []
    assert copies([t.clone() for t in o], [t.clone() for t in lse]) == ["aten::stack"]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls() + ["reference"])
def test_out_writes_into_given_tensors(impl, device):
    """out=(o, lse): the merge as it would return it, written into contiguous outputs, strided ones
    (rows of a wider buffer, whose rest is left alone; lse as (heads, tokens).T), a new lse for None,
    in place into one of the states (separate or stacked), and through a new tensor into outputs that
    overlap the states otherwise."""
    skip_unless_supported(impl, device)
    o, lse = _states(3, (13, 4), 32, device=device)  # states without keys hold NaN, never read
    expected = genfast.merge_attention(o, lse, impl=impl)
    for into in ((torch.empty_like(expected[0]), torch.empty_like(expected[1])),
                 (torch.full((13, 4, 40), 7.0, device=device)[..., :32],
                  torch.empty(4, 13, device=device).T)):
        got = genfast.merge_attention(o, lse, out=into, impl=impl)
        assert got[0] is into[0] and got[1] is into[1]
        assert torch.equal(into[0], expected[0]) and torch.equal(into[1], expected[1])
        if into[0].stride(1) == 40:
            assert bool((into[0]._base[..., 32:] == 7.0).all())
    got = genfast.merge_attention(o, lse, out=(torch.empty_like(expected[0]), None), impl=impl)
    assert torch.equal(got[1], expected[1])
    separate_o, separate_lse = [t.clone() for t in o], [t.clone() for t in lse]
    got = genfast.merge_attention(separate_o, separate_lse, out=(separate_o[1], separate_lse[1]), impl=impl)
    assert got[0] is separate_o[1] and torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    stacked_o, stacked_lse = o.clone(), lse.clone()
    genfast.merge_attention(stacked_o, stacked_lse, out=(stacked_o[0], stacked_lse[0]), impl=impl)
    assert torch.equal(stacked_o[0], expected[0]) and torch.equal(stacked_lse[0], expected[1])
    features_apart = torch.empty(13, 4, 64, device=device)[..., ::2]  # features not contiguous: through a copy
    got = genfast.merge_attention(o, lse, out=(features_apart, None), impl=impl)
    assert got[0] is features_apart and torch.equal(features_apart, expected[0])
    none = genfast.merge_attention(o[:0], lse[:0], out=(torch.empty_like(expected[0]), None), impl=impl)
    assert bool((none[0] == 0).all()) and bool((none[1] == NO_KEYS).all())  # no states: no keys
    shifted_o, shifted_lse = o.clone(), lse.clone()  # outputs half a state along, over states 0 and 1
    half = shifted_o[0].numel() // 2
    into = (shifted_o.view(-1)[half:half + shifted_o[0].numel()].view(13, 4, 32),
            shifted_lse.view(-1)[26:26 + 52].view(13, 4))
    genfast.merge_attention(shifted_o, shifted_lse, out=into, impl=impl)
    assert torch.equal(into[0], expected[0]) and torch.equal(into[1], expected[1])


@pytest.mark.parametrize("impl", fused_impls())
def test_out_is_written_where_it_lies(impl, monkeypatch):
    """In place into a state, and into a head-padded o and an lse (heads, tokens).T: the kernel gets
    the outputs themselves (no new tensor, no copy), and their versions move (autograd then refuses
    a tensor it saved that the merge overwrote)."""
    skip_unless_supported(impl, "cpu")
    o, lse = _states(3, (6, 4), 16)
    separate = [t.clone() for t in o], [t.clone() for t in lse]
    strided = torch.empty(6, 4, 24)[..., :16], torch.empty(4, 6).T
    written = []
    if impl == "triton":
        from genfast.kernels import attention_merge as kernels

        launch = kernels.launch_attention_merge
        monkeypatch.setattr(kernels, "launch_attention_merge",
                            lambda *args: written.append(args[-2:]) or launch(*args))
    for out in ((separate[0][0], separate[1][0]), strided):
        versions = [t._version for t in out]
        with torch.profiler.profile() as prof:
            genfast.merge_attention(*separate, out=out, impl=impl)
        ops = {e.key for e in prof.key_averages()}
        assert not ops & {"aten::stack", "aten::clone", "aten::copy_", "aten::empty_like"} or impl == "triton"
        assert all(t._version > v for t, v in zip(out, versions))
        if impl == "triton":  # (the interpreter copies every argument: the launch's own are asked after)
            assert all(a.data_ptr() == b.data_ptr() for a, b in zip(written.pop(), out))
    leaf = torch.zeros(6, 4, 16, requires_grad=True)
    saved = leaf.exp()  # exp keeps its output for the backward
    genfast.merge_attention(*separate, out=(saved.detach(), None), impl=impl)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()


def test_out_checks():
    o, lse = _states(2, (3, 4), 8)
    for out, error, match in (
            ((torch.empty(3, 4, 8, dtype=torch.float64), None), ValueError,
             r"out\[0\] must be a torch.float32 tensor \(3, 4, 8\)"),
            ((torch.empty(3, 4, 8), torch.empty(4, 3)), ValueError,
             r"out\[1\] must be a torch.float32 tensor \(3, 4\)"),
            (torch.empty(3, 4, 8), TypeError, "out must be a pair"),
            ((torch.empty(3, 4, 8), 0), TypeError, "out must be a pair")):
        with pytest.raises(error, match=match):
            genfast.merge_attention(o, lse, out=out)
    with pytest.raises(ValueError, match=r"out\[1\] must not have elements that share memory"):
        genfast.merge_attention(o, lse, out=(torch.empty(3, 4, 8), torch.empty(3, 1).expand(3, 4)))
    with pytest.raises(RuntimeError, match=r"out=\.\.\.\) writes into out and has no backward"):
        genfast.merge_attention(o, lse, out=(torch.empty(3, 4, 8, requires_grad=True), None))
    with pytest.raises(RuntimeError, match=r"out=\.\.\.\) writes into out and has no backward"):
        genfast.merge_attention(o.requires_grad_(), lse, out=(torch.empty(3, 4, 8), None))
    with torch.no_grad():
        genfast.merge_attention(o, lse, out=(torch.empty(3, 4, 8), None))
    o = o.detach().double()
    exact = genfast.merge_attention(o, lse.double(), out=(torch.empty(3, 4, 8, dtype=torch.float64), None),
                                    impl="reference")
    assert exact[1].dtype == torch.float64  # the float64 reference's lse
    with pytest.raises(ValueError, match=r"out\[1\] must be a torch.float64 tensor"):
        genfast.merge_attention(o, lse.double(), out=(exact[0], torch.empty(3, 4)), impl="reference")


def test_the_triton_ops_check_their_arguments():
    skip_unless_supported("triton", "cpu")
    o, lse = _states(2, (3, 4), 8)
    with pytest.raises(ValueError, match="ln_base .* must be finite and positive, got 0.0"):
        torch.ops.genfast.attention_merge_triton(list(o), list(lse), 0.0)
    with pytest.raises(ValueError, match="ln_base .* must be finite and positive"):
        torch.ops.genfast.attention_merge_backward_triton(torch.randn(3, 4, 8), None, list(o), list(lse), -1.0)
    into = torch.ops.genfast.attention_merge_out_triton
    with pytest.raises(ValueError, match="share memory"):
        into(list(o), list(lse), 1.0, torch.empty(3, 1, 8).expand(3, 4, 8), torch.empty(3, 4))
    with pytest.raises(ValueError, match="with contiguous features"):
        into(list(o), list(lse), 1.0, torch.empty(3, 8, 4).transpose(1, 2), torch.empty(3, 4))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls() + ["reference"])
def test_empty_tensors_nan_and_infinity(impl, device):
    skip_unless_supported(impl, device)
    for states, rows, dim in ((2, (0, 3), 8), (0, (4, 3), 8), (2, (4, 3), 0)):
        o = torch.randn(states, *rows, dim, device=device, requires_grad=True)
        lse = torch.randn(states, *rows, device=device, requires_grad=True)
        out, out_lse = genfast.merge_attention(o, lse, impl=impl)
        assert out.shape == rows + (dim,) and out_lse.shape == rows
        if states == 0:  # no keys anywhere
            assert bool((out == 0).all()) and bool((out_lse == NO_KEYS).all())
        expected, expected_lse = reference_merge(o, lse)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(out_lse, expected_lse)
        wanted = torch.autograd.grad((expected.sum() + expected_lse.clamp_min(0).sum()), (o, lse), allow_unused=True)
        got = torch.autograd.grad((out.sum() + out_lse.clamp_min(0).sum()), (o, lse), allow_unused=True)
        for a, e, t in zip(got, wanted, (o, lse)):
            torch.testing.assert_close(torch.zeros_like(t) if a is None else a, torch.zeros_like(t) if e is None else e)
    for dim in (8, 16):  # the CPU kernel's buffer and its registers (head dims of sixteens)
        o, lse = _states(3, (4,), dim, device=device)
        lse[1, 2] = float("nan")
        lse[2, 3] = float("inf")
        out, out_lse = genfast.merge_attention(o, lse, impl=impl)
        nan_rows = out.isnan().any(-1)
        assert nan_rows.tolist() == [False, False, True, True] and out_lse.isnan().tolist() == nan_rows.tolist()
        assert bool((out[0] == 0).all()) and out_lse[0] == NO_KEYS  # no keys in any state, NaN o unread


@pytest.mark.parametrize("impl", fused_impls())
def test_opcheck_and_compile(impl):
    skip_unless_supported(impl, "cpu")
    o, lse = _states(3, (2, 5), 16)
    o = o.nan_to_num()
    forward = torch.ops.genfast.attention_merge if impl == "native" else torch.ops.genfast.attention_merge_triton
    backward = (torch.ops.genfast.attention_merge_backward if impl == "native"
                else torch.ops.genfast.attention_merge_backward_triton)
    states = [list(t.unbind(0)) for t in (o.clone().requires_grad_(), lse.clone().requires_grad_())]
    torch.library.opcheck(forward, states)
    torch.library.opcheck(forward, ([t.transpose(0, 1) for t in o], [t.transpose(0, 1) for t in lse]))
    for grad_lse in (torch.randn(2, 5), None):
        torch.library.opcheck(backward, (torch.randn(2, 5, 16), grad_lse, list(o), list(lse)))
    into = torch.ops.genfast.attention_merge_out if impl == "native" else torch.ops.genfast.attention_merge_out_triton
    torch.library.opcheck(into, (list(o), list(lse), 1.0, torch.empty(2, 5, 16), torch.empty(5, 2).T))
    buffers = torch.empty(2, 5, 16), torch.empty(2, 5)
    with torch.no_grad():
        compiled = torch.compile(lambda a, b: genfast.merge_attention(a, b, out=buffers, impl=impl), fullgraph=True)
        compiled(o, lse)
        torch.testing.assert_close(buffers, genfast.merge_attention(o, lse, impl=impl))
    assert_compiles_like_eager(  # lse -inf in some states and rows, where exp(lse) is 0
        lambda a, b: (lambda r: r[0] * r[1].exp()[..., None])(genfast.merge_attention(a, b, impl=impl)),
        [o.clone().requires_grad_(), lse.clone().requires_grad_()])


@pytest.mark.cuda
@pytest.mark.parametrize("impl", fused_impls())
def test_replays_in_a_cuda_graph(impl):
    """No host-device synchronisation: captured once, replayed with new states."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    skip_unless_supported(impl, "cuda")
    o, lse = _states(3, (4, 33), 128, torch.bfloat16, "cuda")
    graph, (out, out_lse) = capture_cuda_graph(lambda: genfast.merge_attention(o, lse, impl=impl))
    fresh, fresh_lse = _states(3, (4, 33), 128, torch.bfloat16, "cuda", seed=7)
    o.copy_(fresh)
    lse.copy_(fresh_lse)
    graph.replay()
    torch.cuda.synchronize()
    expected, expected_lse = reference_merge(o, lse)
    torch.testing.assert_close(out, expected, equal_nan=True)
    torch.testing.assert_close(out_lse, expected_lse)
    # the backward too, which parks each state's dot product in its lse gradient
    leaves = [o.nan_to_num().requires_grad_(), lse.clone().requires_grad_()]
    grads = [torch.randn_like(out), torch.randn_like(out_lse)]
    graph, got = capture_cuda_graph(lambda: torch.autograd.grad(genfast.merge_attention(*leaves, impl=impl), leaves,
                                                                grads))
    for t in grads:
        t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    reference_leaves = [t.detach().requires_grad_() for t in leaves]
    wanted = torch.autograd.grad(reference_merge(*reference_leaves), reference_leaves, grads)
    for a, e in zip(got, wanted):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("impl", fused_impls() + ["reference"])
def test_bad_input_names_the_argument(impl):
    skip_unless_supported(impl, "cpu")
    o, lse = _states(2, (3,), 8)
    for call, error, match in (
            (lambda: genfast.merge_attention(o.int(), lse, impl=impl), TypeError, "o must be float32"),
            (lambda: genfast.merge_attention(o, lse.half(), impl=impl), TypeError, "lse must be torch.float32"),
            (lambda: genfast.merge_attention(o, lse[:, :2], impl=impl), ValueError, "lse must have o's shape"),
            (lambda: genfast.merge_attention(o[0, 0], lse[0, 0], impl=impl), ValueError, "lse must have o's shape"),
            (lambda: genfast.merge_attention(o, lse, 2, impl=impl), ValueError, "dim must index one of lse's 2"),
            (lambda: genfast.merge_attention([o[0]], [lse[0], lse[1]], impl=impl), ValueError, "both non-empty"),
            (lambda: genfast.merge_attention([o[0], o[1, :2]], [lse[0], lse[1]], impl=impl), ValueError,
             "one shape each"),
            (lambda: genfast.merge_attention([o[0], o[1]], [lse[0, :2], lse[1, :2]], impl=impl), ValueError,
             r"each state's lse must have its o's shape without the head dim, o \(3, 8\), got \(2,\)"),
            (lambda: genfast.merge_attention(o, lse.numpy(), impl=impl), TypeError, "lse must be a torch.Tensor"),
            *((lambda base=base: genfast.merge_attention(o, lse, lse_base=base, impl=impl), ValueError,
               f"lse_base must be a number greater than 1 and finite .*, got {base!r}")
              for base in (1, 0.5, -2, math.inf, math.nan, "2", True))):
        with pytest.raises(error, match=match):
            call()


def test_the_native_op_checks_its_arguments():
    from genfast import _backend

    if not _backend.native_runs_on("cpu"):
        pytest.skip("genfast._C is not built here")
    o, lse = _states(2, (3, 4), 8)
    with pytest.raises(RuntimeError, match=r"lse\[1\] must be a float32 tensor \[3, 4\]"):
        torch.ops.genfast.attention_merge(list(o), [lse[0], lse[1, :2]])
    with pytest.raises(RuntimeError, match=r"lse\[0\] must be a float32 tensor"):
        torch.ops.genfast.attention_merge(list(o), list(lse.double()))
    with pytest.raises(RuntimeError, match=r"o's states must be \(rows_outer, rows_inner, head_dim\)"):
        torch.ops.genfast.attention_merge(list(o[:, 0]), list(lse[:, 0]))
    with pytest.raises(RuntimeError, match=r"o\[1\] must be a Float tensor"):
        torch.ops.genfast.attention_merge([o[0], o[1].half()], list(lse))
    with pytest.raises(RuntimeError, match="one tensor per state, at least one"):
        torch.ops.genfast.attention_merge(list(o), list(lse[:1]))
    with pytest.raises(RuntimeError, match="grad_lse must be a float32 tensor"):
        torch.ops.genfast.attention_merge_backward(torch.randn(3, 4, 8), torch.randn(3, 5), list(o), list(lse))
    into = torch.ops.genfast.attention_merge_out
    for out, out_lse, match in ((torch.empty(3, 4, 8).double(), torch.empty(3, 4), "out must be a Float tensor"),
                                (torch.empty(3, 8, 4).transpose(1, 2), torch.empty(3, 4), "with contiguous features"),
                                (torch.empty(3, 4, 8), torch.empty(4, 3), r"out_lse must be a float32 tensor \[3, 4\]"),
                                (torch.empty(3, 1, 8).expand(3, 4, 8), torch.empty(3, 4), "share memory")):
        with pytest.raises(RuntimeError, match=match):
            into(list(o), list(lse), 1.0, out, out_lse)
    for ln_base in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(RuntimeError, match="ln_base .* must be finite and positive"):
            torch.ops.genfast.attention_merge(list(o), list(lse), ln_base)
        with pytest.raises(RuntimeError, match="ln_base .* must be finite and positive"):
            torch.ops.genfast.attention_merge_backward(torch.randn(3, 4, 8), None, list(o), list(lse), ln_base)
