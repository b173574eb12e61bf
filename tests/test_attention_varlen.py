"""genfast.attention_varlen (packed sequences, flash_attn_varlen_func's layout) against
reference.varlen_attention: outputs, log-sum-exp and gradients by the error-ratio rule for every
option, empty and one-row sequences, dropout's packed Philox index, opcheck, torch.compile and bad
input."""

import pytest
import torch

import genfast
from genfast.testing.tolerances import assert_error_ratio
from conftest import assert_compiles_like_eager, fused_impls, skip_unless_supported

LENGTHS_Q = [17, 0, 1, 40, 33]
LENGTHS_K = [30, 5, 1, 40, 70]


def _packed(lengths_q, lengths_k, heads=4, kv_heads=2, dim=16, v_dim=None, dtype=torch.float32, device="cpu",
            seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lengths_q), heads, dim, generator=g)
    k = torch.randn(sum(lengths_k), kv_heads, dim, generator=g)
    v = torch.randn(sum(lengths_k), kv_heads, v_dim or dim, generator=g)
    cu = [torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
          for lengths in (lengths_q, lengths_k)]
    return (*(t.to(device=device, dtype=dtype) for t in (q, k, v)), *cu, max(lengths_q, default=0), max(lengths_k, default=0))


def _as(options, dtype):
    return {key: (val.to(dtype) if isinstance(val, torch.Tensor) and val.is_floating_point() else val)
            for key, val in options.items()}


def _run(impl, dtype, args, grads, options):
    """o, lse and, with grads = (grad_o, grad_lse), the gradients of q, k, v."""
    q, k, v, *rest = args
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    seed = options.get("seed")
    opts = {key: val for key, val in options.items() if key != "seed"}
    if seed is not None:
        opts["generator"] = genfast.PhiloxGenerator(seed)
    o, lse = genfast.attention_varlen(*leaves, *rest, impl=impl, return_lse=True, **_as(opts, dtype or q.dtype))
    if grads is None:
        return o, lse
    grad_o, grad_lse = grads
    loss = (o.double() * grad_o).sum() + (torch.where(torch.isfinite(lse), lse, 0).double() * grad_lse).sum()
    return (o, lse, *torch.autograd.grad(loss, leaves))


def _compare(impl, args, with_grads=True, **options):
    q, v = args[0], args[2]
    g = torch.Generator().manual_seed(7)
    grads = (torch.randn(q.shape[0], q.shape[1], v.shape[2], generator=g, dtype=torch.float64).to(q.device),
             torch.randn(q.shape[1], q.shape[0], generator=g, dtype=torch.float64).to(q.device)) if with_grads else None
    got = _run(impl, None, args, grads, options)
    exact = _run("reference", torch.float64, args, grads, options)
    low = _run("reference", None, args, grads, options)
    assert got[0].dtype == q.dtype and got[1].dtype == torch.float32
    assert got[0].shape == (q.shape[0], q.shape[1], v.shape[2]) and got[1].shape == (q.shape[1], q.shape[0])
    for name, a, e, lo in zip(("o", "lse", "grad q", "grad k", "grad v"), got, exact, low):
        assert_error_ratio(a, e, lo.to(a.dtype), ratio=2.0 if name in ("o", "lse") else 3.0, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", fused_impls())
def test_matches_reference(dtype, impl):
    skip_unless_supported(impl, "cpu", dtype)
    _compare(impl, _packed(LENGTHS_Q, LENGTHS_K, dtype=dtype))


@pytest.mark.parametrize("options", [dict(causal="bottom_right"), dict(window=(6, 2)),
                                     dict(causal="bottom_right", window=(10, -1)), dict(softcap=2.0, scale=0.4),
                                     dict(alibi_slopes=torch.tensor([0.5, 0.25, 0.1, 0.05])),
                                     dict(alibi_slopes=torch.rand(5, 4, generator=torch.Generator().manual_seed(0))),
                                     dict(dropout_p=0.25, seed=3),
                                     dict(causal="bottom_right", deterministic=True)], ids=str)
@pytest.mark.parametrize("impl", fused_impls())
def test_options_match_reference(options, impl):
    skip_unless_supported(impl, "cpu")
    _compare(impl, _packed(LENGTHS_Q, LENGTHS_K, v_dim=24), **options)


@pytest.mark.parametrize("impl", fused_impls())
def test_single_queries_beside_longer_sequences(impl):
    """Sequences of one query, whose grouped heads the CPU kernel stacks as the rows of one product
    (more rows than the longest sequence has), beside sequences of a few queries."""
    skip_unless_supported(impl, "cpu")
    args = _packed([1, 2, 1, 3], [300, 5, 129, 40], heads=8, kv_heads=2, v_dim=24)
    _compare(impl, args)
    _compare(impl, args, causal="bottom_right", dropout_p=0.3, seed=5, softcap=5.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decoding_beside_a_prompt_chunk_reads_keys_as_alone(dtype):
    """A step of continuous batching on the CPU kernel: sequences of one query beside a prompt's
    chunk of three query blocks. The chunk's key blocks are packed once for its tasks; the decoding
    sequences read their keys in place, as alone, and give the bits they give alone (they read the
    packed panels before, which cost a pass over all of their keys)."""
    skip_unless_supported("native", "cpu", dtype)
    lengths_q, lengths_k = [1, 1, 300, 1], [700, 90, 420, 1200]
    args = _packed(lengths_q, lengths_k, heads=8, kv_heads=2, dtype=dtype)
    q, k, v, cu_q, cu_k, *_ = args
    o = genfast.attention_varlen(*args, causal="bottom_right", impl="native")
    for n, (length_q, length_k) in enumerate(zip(lengths_q, lengths_k)):
        rows, keys = slice(cu_q[n], cu_q[n + 1]), slice(cu_k[n], cu_k[n + 1])
        alone = genfast.attention_varlen(q[rows], k[keys], v[keys], *(torch.tensor([0, length], dtype=torch.int32)
                                                                      for length in (length_q, length_k)),
                                         length_q, length_k, causal="bottom_right", impl="native")
        assert torch.equal(o[rows], alone), f"sequence {n}"
    _compare("native", args, with_grads=False, causal="bottom_right")


@pytest.mark.parametrize("impl", fused_impls())
def test_top_left_causal_with_shared_lengths(impl):
    skip_unless_supported(impl, "cpu")
    q, k, v, cu, _, most, _ = _packed([9, 130, 1], [9, 130, 1], heads=2, kv_heads=2)
    got = genfast.attention_varlen(q, k, v, cu, cu, most, most, causal="top_left", impl=impl)
    dense = genfast.attention(q[9:139].transpose(0, 1)[None], k[9:139].transpose(0, 1)[None],
                              v[9:139].transpose(0, 1)[None], is_causal=True, impl="reference")
    torch.testing.assert_close(got[9:139], dense[0].transpose(0, 1), atol=2e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="bottom_right"):
        genfast.attention_varlen(q, k, v, cu, cu.clone(), most, most, causal="top_left", impl=impl)


@pytest.mark.parametrize("impl", fused_impls())
def test_dropout_is_the_packed_stream(impl):
    """Each sequence's mask is its own block of the (heads, total_q, total_k) stream: two equal
    sequences do not share a mask (the reference's equality is test_options_match_reference's)."""
    skip_unless_supported(impl, "cpu")
    q, k, v, cu_q, cu_k, mq, mk = _packed([20, 20], [20, 20], heads=2, kv_heads=2)
    k = torch.cat([k[:20], k[:20]])
    v = torch.cat([v[:20], v[:20]])
    q = torch.cat([q[:20], q[:20]])
    o = genfast.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, dropout_p=0.5, generator=genfast.PhiloxGenerator(1),
                                 impl=impl)
    assert not torch.allclose(o[:20], o[20:])
    plain = genfast.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, impl=impl)
    torch.testing.assert_close(plain[:20], plain[20:])


@pytest.mark.parametrize("impl", fused_impls())
def test_empty_batches(impl):
    skip_unless_supported(impl, "cpu")
    q, k, v, cu_q, cu_k, mq, mk = _packed([], [])
    o, lse = genfast.attention_varlen(q, k, v, cu_q, cu_k, 0, 0, impl=impl, return_lse=True)
    assert o.shape == (0, 4, 16) and lse.shape == (4, 0)
    q, k, v, cu_q, cu_k, mq, mk = _packed([3, 2], [0, 0])
    o, lse = genfast.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, impl=impl, return_lse=True)
    assert torch.equal(o, torch.zeros_like(o)) and bool((lse == float("-inf")).all())


@pytest.mark.parametrize("impl", fused_impls())
def test_opcheck_and_compile(impl):
    skip_unless_supported(impl, "cpu")
    q, k, v, cu_q, cu_k, mq, mk = _packed([5, 0, 9], [7, 3, 9], heads=2, kv_heads=1, dim=8)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    native = impl == "native"
    forward = torch.ops.genfast.attention_varlen_forward if native else torch.ops.genfast.attention_varlen_forward_triton
    backward = (torch.ops.genfast.attention_varlen_backward if native
                else torch.ops.genfast.attention_varlen_backward_triton)
    options = (torch.tensor([0.5, 0.1]), 0.3, 2.0, -3, 4, 0.2, 5, 8)
    torch.library.opcheck(forward, (*leaves, cu_q, cu_k, mq, mk, *options))
    o, lse = forward(q, k, v, cu_q, cu_k, mq, mk, *options)
    torch.library.opcheck(backward, (torch.randn_like(o), torch.randn_like(lse), q, k, v, o, lse, cu_q, cu_k, mq, mk,
                                     *options))

    def layer(q, k, v):
        return genfast.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal="bottom_right", impl=impl)

    assert_compiles_like_eager(layer, leaves)


def test_bad_input_names_the_argument():
    q, k, v, cu_q, cu_k, mq, mk = _packed([3, 4], [5, 6])
    f = genfast.attention_varlen
    with pytest.raises(ValueError, match="cu_seqlens_q must be an int32"):
        f(q, k, v, cu_q.long(), cu_k, mq, mk)
    with pytest.raises(ValueError, match="cu_seqlens_k must have cu_seqlens_q's shape"):
        f(q, k, v, cu_q, cu_k[:2], mq, mk)
    with pytest.raises(ValueError, match="q must have shape"):
        f(q[None], k, v, cu_q, cu_k, mq, mk)
    with pytest.raises(ValueError, match="max_seqlen_k"):
        f(q, k, v, cu_q, cu_k, mq, -1)
    # The checks shared with genfast.attention, on the packed shapes.
    with pytest.raises(TypeError, match="q must be float32"):
        f(q.long(), k, v, cu_q, cu_k, mq, mk)
    with pytest.raises(TypeError, match="k and v must have q's dtype"):
        f(q, k.half(), v, cu_q, cu_k, mq, mk)
    with pytest.raises(ValueError, match="k's head_dim must equal q's"):
        f(q, k[..., :8], v, cu_q, cu_k, mq, mk)
    with pytest.raises(ValueError, match="v must have k's heads and length"):
        f(q, k, v[:10], cu_q, cu_k, mq, mk)
    with pytest.raises(ValueError, match=r"k's heads \(3\) must divide q's heads \(4\)"):
        f(q, torch.randn(11, 3, 16), torch.randn(11, 3, 16), cu_q, cu_k, mq, mk)
    with pytest.raises(ValueError, match="alibi_slopes"):
        f(q, k, v, cu_q, cu_k, mq, mk, alibi_slopes=torch.ones(3, 4))
    with pytest.raises(RuntimeError, match="cu_seqlens_q must run from 0"):
        f(q, k, v, cu_q + 1, cu_k, mq, mk, impl="native")
    with pytest.raises(RuntimeError, match="max_seqlen"):
        f(q, k, v, cu_q, cu_k, mq, 2, impl="native")


@pytest.mark.cuda
def test_more_sequences_times_heads_than_a_grid_axis_holds():
    """2100 sequences of 1 to 4 queries and 1 to 9 keys, 32 heads: 67200 (sequence, head) programs,
    past the 65535 a GPU's second grid axis holds, forward and backward through every GPU backend,
    against the CPU kernels."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    g = torch.Generator().manual_seed(0)
    lengths_q = torch.randint(1, 5, (2100,), generator=g)
    lengths_k = torch.randint(1, 10, (2100,), generator=g)
    cu_q, cu_k = (torch.nn.functional.pad(n.cumsum(0), (1, 0)).to(torch.int32) for n in (lengths_q, lengths_k))
    q = torch.randn(int(cu_q[-1]), 32, 64, generator=g)
    k, v = (torch.randn(int(cu_k[-1]), 8, 64, generator=g) for _ in range(2))
    grad = torch.randn(q.shape, generator=g)

    def run(device, impl, dtype):
        leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]
        o = genfast.attention_varlen(*leaves, cu_q.to(device), cu_k.to(device), 4, 9, causal="bottom_right",
                                     impl=impl)
        return [o, *torch.autograd.grad(o, leaves, grad.to(device=device, dtype=dtype))]

    expected = run("cpu", "native", torch.float32)
    for impl in ("native", "triton"):
        if impl == "triton" and not genfast._backend.triton_runs_on("cuda"):
            continue
        for name, got, want in zip(("o", "dq", "dk", "dv"), run("cuda", impl, torch.float16), expected):
            torch.testing.assert_close(got.float().cpu(), want, atol=2e-2, rtol=2e-2,
                                       msg=lambda m: f"{impl} {name}: {m}")
