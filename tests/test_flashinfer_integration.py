"""genfast.integrations.flashinfer, FlashInfer's merges of attention states on genfast.merge_attention,
against FlashInfer's definition written here (base-2 log-sum-exps, in float64) on every backend:
cascade attention (a shared prefix and each request's own keys) merging into attention over all the
keys, merge_states over 1 to 5 states, merge_state_in_place with and without its mask, gradients,
torch.compile and bad input."""

import math

import pytest
import torch

import genfast
from genfast.integrations import flashinfer
from genfast.testing.tolerances import assert_error_ratio
from conftest import assert_compiles_like_eager, fused_impls, skip_unless_supported

IMPLS = fused_impls() + ["reference"]


def _flashinfer_merge(v, s):
    """FlashInfer's merge_states as its kernels define it: v (seq_len, states, heads, head_dim), s
    (seq_len, states, heads) base 2; in float64."""
    v, s = v.double(), s.double()
    most = s.amax(1, keepdim=True)
    weights = torch.exp2(s - most)
    total = weights.sum(1)
    merged = (weights[..., None] * v).sum(1) / total[..., None]
    return merged, torch.log2(total) + most.squeeze(1)


def _states(seq_len, states, heads, head_dim, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(seq_len, states, heads, head_dim, generator=g).to(dtype)
    s = torch.randn(seq_len, states, heads, generator=g) * 4
    return v, s


@pytest.mark.parametrize("impl", IMPLS)
def test_cascade_attention_merges_into_attention_over_all_keys(impl):
    """Requests sharing a prefix: each one's queries attend once to the prefix and once to its own
    keys; merge_state of the two (base-2 lse, as FlashInfer's attention returns it) is attention
    over all the keys."""
    skip_unless_supported(impl, "cpu")
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, n, 32, generator=g) for n in (7, 50, 50))
    full, full_lse = genfast.attention(q, k, v, return_lse=True, impl="reference")
    prefix, own = (genfast.attention(q, k[:, :, a:b], v[:, :, a:b], return_lse=True, impl="reference")
                   for a, b in ((0, 20), (20, 50)))
    # FlashInfer's layout: (seq_len, num_heads, head_dim) and (seq_len, num_heads), read in place
    v_a, v_b = (o[0].transpose(0, 1) for o, _ in (prefix, own))
    s_a, s_b = (lse[0].T / math.log(2) for _, lse in (prefix, own))
    merged, merged_s = flashinfer.merge_state(v_a, s_a, v_b, s_b, impl=impl)
    torch.testing.assert_close(merged, full[0].transpose(0, 1))
    torch.testing.assert_close(merged_s * math.log(2), full_lse[0].T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_merge_states_matches_flashinfer(impl, dtype):
    skip_unless_supported(impl, "cpu", dtype)
    for states, head_dim in ((1, 16), (2, 64), (5, 40)):
        v, s = _states(9, states, 3, head_dim, dtype, seed=states)
        merged, merged_s = flashinfer.merge_states(v, s, impl=impl)
        assert merged.dtype == dtype and merged.shape == (9, 3, head_dim) and merged_s.dtype == torch.float32
        exact = _flashinfer_merge(v, s)
        low = _flashinfer_merge(v.float(), s) if dtype == torch.float32 else (exact[0].to(dtype), exact[1].float())
        assert_error_ratio(merged, exact[0], low[0], msg="v")
        assert_error_ratio(merged_s, exact[1], low[1], msg="s")
    v, s = _states(4, 0, 2, 8)  # no states: no keys
    merged, merged_s = flashinfer.merge_states(v, s, impl=impl)
    assert bool((merged == 0).all()) and bool((merged_s == -math.inf).all())


@pytest.mark.parametrize("impl", IMPLS)
def test_merge_state_rows_without_keys(impl):
    """A segment of s -inf weighs nothing and is not read (its v may be garbage); a row without keys
    in either gets v 0 and s -inf, not FlashInfer's NaN."""
    skip_unless_supported(impl, "cpu")
    v, s = _states(5, 2, 3, 16)
    s[1, 0] = s[2, 1] = -math.inf
    v[1, 0] = v[2, 1] = math.nan
    s[3, :, 1] = -math.inf
    merged, merged_s = flashinfer.merge_state(v[:, 0], s[:, 0], v[:, 1], s[:, 1], impl=impl)
    torch.testing.assert_close(merged[1], v[1, 1])
    torch.testing.assert_close(merged[2], v[2, 0])
    torch.testing.assert_close(merged_s[1:3], torch.stack([s[1, 1], s[2, 0]]))
    assert bool((merged[3, 1] == 0).all()) and merged_s[3, 1] == -math.inf
    assert not merged[[0, 4]].isnan().any()


@pytest.mark.parametrize("impl", IMPLS)
def test_merge_state_in_place(impl):
    skip_unless_supported(impl, "cpu")
    v, s = _states(6, 2, 3, 16)
    expected, expected_s = flashinfer.merge_state(v[:, 0], s[:, 0], v[:, 1], s[:, 1], impl=impl)
    into, into_s = v[:, 0].clone(), s[:, 0].clone()
    assert flashinfer.merge_state_in_place(into, into_s, v[:, 1], s[:, 1], impl=impl) is None
    assert torch.equal(into, expected) and torch.equal(into_s, expected_s)
    mask = torch.tensor([True, False, True, True, False, False])
    into, into_s = v[:, 0].clone(), s[:, 0].clone()
    flashinfer.merge_state_in_place(into, into_s, v[:, 1], s[:, 1], mask, impl=impl)
    assert torch.equal(into[mask], expected[mask]) and torch.equal(into_s[mask], expected_s[mask])
    assert torch.equal(into[~mask], v[~mask, 0]) and torch.equal(into_s[~mask], s[~mask, 0])
    # With gradients wanted, through autograd: those of merge_state
    leaves = [t.clone().requires_grad_() for t in (v[:, 0], s[:, 0], v[:, 1], s[:, 1])]
    into, into_s = leaves[0] * 1, leaves[1] * 1
    flashinfer.merge_state_in_place(into, into_s, leaves[2], leaves[3], impl=impl)
    got = torch.autograd.grad((into * into.detach().cos()).sum() + into_s.sum(), leaves)
    merged, merged_s = flashinfer.merge_state(*leaves, impl=impl)
    wanted = torch.autograd.grad((merged * merged.detach().cos()).sum() + merged_s.sum(), leaves)
    assert all(torch.equal(a, b) for a, b in zip(got, wanted))


@pytest.mark.parametrize("impl", fused_impls())
def test_gradients_and_compile(impl):
    """Differentiable (FlashInfer's merges are not): gradients of merge_states against FlashInfer's
    formula under autograd in float64, and torch.compile(fullgraph=True)."""
    skip_unless_supported(impl, "cpu")
    v, s = _states(5, 3, 2, 24)
    leaves = [v.requires_grad_(), s.requires_grad_()]
    merged, merged_s = flashinfer.merge_states(*leaves, impl=impl)
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(merged.shape, generator=g), torch.randn(merged_s.shape, generator=g)]
    got = torch.autograd.grad((merged, merged_s), leaves, grads)
    exact_leaves = [t.detach().double().requires_grad_() for t in leaves]
    wanted = torch.autograd.grad(_flashinfer_merge(*exact_leaves), exact_leaves, [t.double() for t in grads])
    low_leaves = [t.detach().requires_grad_() for t in leaves]
    low = torch.autograd.grad(genfast.merge_attention(*low_leaves, dim=1, lse_base=2, impl="reference"), low_leaves,
                              grads)
    for name, a, e, l in zip(("v", "s"), got, wanted, low):
        assert_error_ratio(a, e, l, ratio=3.0, msg=f"grad {name}")
    assert_compiles_like_eager(lambda a, b: flashinfer.merge_state(a[:, 0], b[:, 0], a[:, 2], b[:, 2], impl=impl)[0],
                               [v.detach().requires_grad_(), s.detach().requires_grad_()])


def test_bad_input_names_the_argument():
    v, s = _states(4, 2, 3, 8)
    for call, error, match in (
            (lambda: flashinfer.merge_states(v[:, 0], s), ValueError, "v must be a .seq_len, num_states"),
            (lambda: flashinfer.merge_state(v[:, 0], s[:, 0].numpy(), v[:, 1], s[:, 1]), TypeError,
             "s_a must be a torch.Tensor"),
            (lambda: flashinfer.merge_state(v[:, 0], s[:, 0], v[:, 1], s[:, 1, :2]), ValueError, "one shape each"),
            (lambda: flashinfer.merge_state_in_place(v[:, 0], s[:, 0], v[:, 1], s[:, 1], torch.ones(4)), ValueError,
             r"mask must be a bool tensor \(4,\)"),
            (lambda: flashinfer.merge_state_in_place(v[:, 0], s[:, 0], v[:, 1], s[:, 1], [True] * 4), TypeError,
             "mask must be a torch.Tensor or None")):
        with pytest.raises(error, match=match):
            call()
