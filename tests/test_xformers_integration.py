"""genfast.integrations.xformers, xformers' memory_efficient_attention on genfast's kernels: the
biases' materialize() against xformers' documented masks, every bias (and xformers' own objects,
read by class name) against the reference with the bias materialized (outputs, lse and gradients by
the error-ratio rule), the 3-d and grouped 5-d layouts, the forward/backward/partial/merge family,
dropout, torch.compile, and bad input."""

import math

import pytest
import torch

from genfast.integrations.xformers import ops as xops
from genfast.integrations.xformers.ops import fmha
from genfast.integrations.xformers.ops.fmha import attn_bias as ab
from genfast.reference.attention import attention
from genfast.testing.tolerances import assert_error_ratio
from conftest import devices, fused_impls, skip_unless_supported

HEADS, DIM, DIM_V = 3, 16, 8


def _ones(rows):
    """A 0/1 picture of a mask (1 attends) as xformers' docs print materialize(...).exp()."""
    return torch.tensor(rows, dtype=torch.float32)


def test_materialize_draws_xformers_documented_masks():
    """The masks xformers' docstrings show, written out by hand."""
    local = ab.LocalAttentionFromBottomRightMask(window_left=1, window_right=2)
    assert torch.equal(local.materialize((4, 4)).exp(), _ones([[1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 1, 1],
                                                                [0, 0, 1, 1]]))
    assert torch.equal(local.materialize((4, 5)).exp(), _ones([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1], [0, 0, 1, 1, 1],
                                                                [0, 0, 0, 1, 1]]))
    assert torch.equal(ab.LowerTriangularMask().materialize((2, 3)).exp(), _ones([[1, 0, 0], [1, 1, 0]]))
    assert torch.equal(ab.LowerTriangularFromBottomRightMask().materialize((2, 3)).exp(), _ones([[1, 1, 0],
                                                                                                [1, 1, 1]]))
    assert torch.equal(ab.LowerTriangularFromBottomRightLocalAttentionMask(2).materialize((2, 4)).exp(),
                       _ones([[0, 1, 1, 0], [0, 0, 1, 1]]))
    # blocks of 1 and 2 queries over 2 and 2 keys
    blocks = ab.BlockDiagonalMask.from_seqlens([1, 2], [2, 2], device="cpu")
    assert torch.equal(blocks.materialize((3, 4)).exp(), _ones([[1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]))
    assert torch.equal(blocks.make_causal().materialize((3, 4)).exp(), _ones([[1, 0, 0, 0], [0, 0, 1, 0],
                                                                              [0, 0, 1, 1]]))
    assert torch.equal(blocks.make_causal_from_bottomright().materialize((3, 4)).exp(),
                       _ones([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]))
    square = ab.BlockDiagonalMask.from_seqlens([3], device="cpu")
    assert torch.equal(square.make_local_attention(2).materialize((3, 3)).exp(), _ones([[1, 0, 0], [1, 1, 0],
                                                                                        [0, 1, 1]]))
    # keys padded to 3 rows a block, 2 and 1 of them used; the causal form from each block's end
    padded = ab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens([1, 1], 3, [2, 1], device="cpu")
    assert torch.equal(padded.materialize((2, 6)).exp(), _ones([[1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0]]))
    # keys on pages of 2 rows: block 0's 3 on pages 2 then 0, block 1's 1 on pages 1 then 0; the
    # shape asked is the unpaged one (2 blocks x 4 keys), the columns the pages' (3 pages x 2)
    paged = ab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
        [1, 1], [3, 1], torch.tensor([[2, 0], [1, 0]], dtype=torch.int32), 2, device="cpu")
    assert torch.equal(paged.materialize((2, 8)).exp(), _ones([[1, 0, 0, 0, 1, 1], [0, 0, 1, 0, 0, 0]]))
    full = ab.LowerTriangularMask().materialize((2, 3, 3))
    assert full.is_contiguous() and full.shape == (2, 3, 3)


def _packed_lengths():
    return [5, 1, 9], [7, 3, 9]


# Each bias's rule as xformers' docstrings word it, for query i and key j of a block of lq queries
# and lk keys (x: the query's distance from the block's last query, y: the key's from its last key):
# the tests' own definition, not the band table memory_efficient_attention reads.
def _distances(i, j, lq, lk):
    return lq - 1 - i, lk - 1 - j


RULES = {
    "none": lambda i, j, lq, lk: torch.ones_like(i + j, dtype=torch.bool),
    # "A query Q cannot attend to a key which is farther from the initial key than Q is from the initial query"
    "causal": lambda i, j, lq, lk: j <= i,
    # "... a key which is nearer the final key than Q is to the final query"
    "causal from bottom right": lambda i, j, lq, lk: (lambda x, y: y >= x)(*_distances(i, j, lq, lk)),
    # "... distance from the final query X cannot attend to a key whose distance to the final key is
    # less than X or greater than or equal to X + window_size"
    "local from bottom right": lambda w: lambda i, j, lq, lk: (lambda x, y: (y >= x) & (y < x + w))(
        *_distances(i, j, lq, lk)),
    # "q - window_left <= k + s <= q + window_right, s = num_queries - num_keys"
    "window": lambda left, right: lambda i, j, lq, lk: (i - left <= j + lq - lk) & (j + lq - lk <= i + right),
    # "The ith query in a block only attends to keys in its block with index greater than i - window_size
    # and less than or equal to i"
    "local causal": lambda w: lambda i, j, lq, lk: (j > i - w) & (j <= i),
}


GAPPY_STARTS = [2, 10, 14, 25]  # blocks of 7, 3 and 9 keys with gaps before and between them, 25 rows


def _padded(cls, **fields):
    q_lens, k_lens = _packed_lengths()
    return cls.from_seqlens(q_lens, 10, k_lens, device="cpu") if not fields else cls(
        **vars(ab.BlockDiagonalPaddedKeysMask.from_seqlens(q_lens, 10, k_lens, device="cpu")), **fields)


def _biases():
    """(bias, batch, queries, keys, rule, blocks) of every kind memory_efficient_attention takes;
    blocks: (query start, count, key start, count) of each block, None for one block of them all."""
    q_lens, k_lens = _packed_lengths()
    same = ab.BlockDiagonalMask.from_seqlens(q_lens, device="cpu")
    other = ab.BlockDiagonalMask.from_seqlens(q_lens, k_lens, device="cpu")
    total_q, total_k = sum(q_lens), sum(k_lens)

    def packed(ks):
        return [(sum(q_lens[:n]), q_lens[n], sum(ks[:n]), ks[n]) for n in range(len(q_lens))]
    padded_blocks = [(sum(q_lens[:n]), q_lens[n], 10 * n, k_lens[n]) for n in range(len(q_lens))]
    gappy_blocks = [(sum(q_lens[:n]), q_lens[n], GAPPY_STARTS[n], k_lens[n]) for n in range(len(q_lens))]
    return [
        (None, 2, 13, 21, RULES["none"], None), (ab.LowerTriangularMask(), 2, 13, 13, RULES["causal"], None),
        (ab.LowerTriangularMask(), 2, 13, 21, RULES["causal"], None),
        (ab.LowerTriangularMask(), 2, 21, 13, RULES["causal"], None),
        (ab.LowerTriangularFromBottomRightMask(), 2, 13, 21, RULES["causal from bottom right"], None),
        (ab.LowerTriangularFromBottomRightMask(), 2, 21, 13, RULES["causal from bottom right"], None),
        (ab.LowerTriangularFromBottomRightLocalAttentionMask(4), 2, 13, 21, RULES["local from bottom right"](4),
         None),
        (ab.LocalAttentionFromBottomRightMask(3, 2), 2, 21, 13, RULES["window"](3, 2), None),
        (same, 1, total_q, total_q, RULES["none"], packed(q_lens)),
        (other, 1, total_q, total_k, RULES["none"], packed(k_lens)),
        (same.make_causal(), 1, total_q, total_q, RULES["causal"], packed(q_lens)),
        (other.make_causal(), 1, total_q, total_k, RULES["causal"], packed(k_lens)),
        (other.make_causal_from_bottomright(), 1, total_q, total_k, RULES["causal from bottom right"],
         packed(k_lens)),
        (same.make_local_attention(3), 1, total_q, total_q, RULES["local causal"](3), packed(q_lens)),
        (other.make_local_attention(3), 1, total_q, total_k, RULES["local causal"](3), packed(k_lens)),
        (other.make_local_attention_from_bottomright(2), 1, total_q, total_k, RULES["local from bottom right"](2),
         packed(k_lens)),
        (_padded(ab.BlockDiagonalPaddedKeysMask), 1, total_q, 30, RULES["none"], padded_blocks),
        (_padded(ab.BlockDiagonalCausalWithOffsetPaddedKeysMask), 1, total_q, 30, RULES["causal from bottom right"],
         padded_blocks),
        (_padded(ab.BlockDiagonalPaddedKeysMask).make_local_attention(2, 1), 1, total_q, 30, RULES["window"](2, 1),
         padded_blocks),
        (_padded(ab.BlockDiagonalCausalLocalAttentionPaddedKeysMask, _window_size=3), 1, total_q, 30,
         RULES["local from bottom right"](3), padded_blocks),
        (ab.BlockDiagonalGappyKeysMask.from_seqlens(q_lens, GAPPY_STARTS, k_lens, device="cpu"), 1, total_q, 25,
         RULES["none"], gappy_blocks),
        (ab.BlockDiagonalCausalWithOffsetGappyKeysMask.from_seqlens(q_lens, GAPPY_STARTS, k_lens, device="cpu"), 1,
         total_q, 25, RULES["causal from bottom right"], gappy_blocks),
    ]


def _defined_bias(rule, blocks, lq, lk, dtype=torch.float32):
    """The additive bias (lq, lk) the rule and blocks define: 0 where a query attends, -inf elsewhere."""
    keep = torch.zeros(lq, lk, dtype=torch.bool)
    for q0, nq, k0, nk in blocks or [(0, lq, 0, lk)]:
        keep[q0:q0 + nq, k0:k0 + nk] = rule(torch.arange(nq)[:, None], torch.arange(nk)[None, :], nq, nk)
    return torch.zeros(lq, lk, dtype=dtype).masked_fill(~keep, -math.inf)


@pytest.mark.parametrize("case", range(len(_biases())))
def test_materialize_follows_each_bias_rule(case):
    bias, batch, lq, lk, rule, blocks = _biases()[case]
    if bias is not None:
        assert torch.equal(bias.materialize((batch, HEADS, lq, lk)), _defined_bias(rule, blocks, lq, lk).expand(
            batch, HEADS, lq, lk))


def _inputs(batch, lq, lk, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, lq, HEADS, DIM, generator=g).to(dtype),
            torch.randn(batch, lk, HEADS, DIM, generator=g).to(dtype),
            torch.randn(batch, lk, HEADS, DIM_V, generator=g).to(dtype))


def _reference(q, k, v, bias, scale=None):
    """The reference attention of (batch, seqlen, heads, dim) inputs with an additive bias (a tensor,
    or materialized)."""
    mask = bias
    if bias is not None and not isinstance(bias, torch.Tensor):
        mask = bias.materialize((q.shape[0], q.shape[2], q.shape[1], k.shape[1]), dtype=q.dtype, device=q.device)
    o, lse = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, scale=scale, return_lse=True)
    return o.transpose(1, 2), lse


def _run(fn, q, k, v, dtype):
    """Output, lse and the gradients of q, k and v for fixed upstream gradients."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    o, lse = fn(*leaves)
    g = torch.Generator().manual_seed(9)
    grad_o = torch.randn(o.shape, generator=g, dtype=torch.float64)
    loss = (o.double() * grad_o).sum()
    return (o, lse, *torch.autograd.grad(loss, leaves))


def _compare(got, exact, low, names=("out", "lse", "grad q", "grad k", "grad v")):
    for name, a, e, lo in zip(names, got, exact, low):
        assert a.shape == e.shape, name
        assert_error_ratio(a, e, lo.to(a.dtype), ratio=2.0 if name in ("out", "lse") else 3.0, msg=name)


@pytest.mark.parametrize("case", range(len(_biases())))
@pytest.mark.parametrize("impl", fused_impls())
def test_every_bias_matches_the_reference_with_the_bias_it_defines(case, impl):
    """Outputs in xformers' layout (contiguous), lse and gradients, for each kind of bias, against
    the reference attention with the bias its rule defines; the padded-keys biases pad with keys
    that must not count."""
    skip_unless_supported(impl, "cpu")
    bias, batch, lq, lk, rule, blocks = _biases()[case]
    q, k, v = _inputs(batch, lq, lk)
    defined = _defined_bias(rule, blocks, lq, lk)

    got = _run(lambda *t: fmha.memory_efficient_attention_partial(*t, bias, output_dtype=t[0].dtype, impl=impl),
               q, k, v, torch.float32)
    exact = _run(lambda *t: _reference(*t, defined.double()), q, k, v, torch.float64)
    low = _run(lambda *t: _reference(*t, defined), q, k, v, torch.float32)
    assert got[0].is_contiguous() and got[0].shape == (batch, lq, HEADS, DIM_V)
    assert got[1].shape == (batch, HEADS, lq) and got[1].dtype == torch.float32 and got[1].is_contiguous()
    _compare(got, exact, low)
    assert torch.equal(xops.memory_efficient_attention(q, k, v, bias, impl=impl), got[0].detach())


@pytest.mark.parametrize("impl", fused_impls())
def test_tensor_bias_and_its_gradient(impl):
    """A float bias (batch, heads, queries, keys), alone and under LowerTriangularMask's add_bias,
    with its gradient; a custom scale."""
    skip_unless_supported(impl, "cpu")
    q, k, v = _inputs(2, 11, 11)
    bias = torch.randn(2, HEADS, 11, 11, generator=torch.Generator().manual_seed(3))
    for structured in (False, True):
        def run(q, k, v, b):
            attn_bias = ab.LowerTriangularMask().add_bias(b) if structured else b
            return xops.memory_efficient_attention(q, k, v, attn_bias, scale=0.3, impl=impl)

        def reference(q, k, v, b):
            mask = b + ab.LowerTriangularMask().materialize(b.shape, b.dtype) if structured else b
            return _reference(q, k, v, mask, scale=0.3)[0]
        results = []
        for fn, dtype in ((run, torch.float32), (reference, torch.float64), (reference, torch.float32)):
            leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, bias)]
            o = fn(*leaves)
            grad_o = torch.randn(o.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
            results.append((o, *torch.autograd.grad((o.double() * grad_o).sum(), leaves)))
        _compare(*results, names=("out", "grad q", "grad k", "grad v", "grad bias"))


@pytest.mark.parametrize("impl", fused_impls())
def test_three_and_five_dim_layouts(impl):
    """(batch, seqlen, dim) is one head; (batch, seqlen, groups, heads, dim) with k and v expanded
    over each group's heads is grouped-query attention, equal to the expanded heads."""
    skip_unless_supported(impl, "cpu")
    g = torch.Generator().manual_seed(4)
    q3, k3, v3 = (torch.randn(2, 9, DIM, generator=g) for _ in range(3))
    o3 = xops.memory_efficient_attention(q3, k3, v3, ab.LowerTriangularMask(), impl=impl)
    expected = _reference(q3[:, :, None], k3[:, :, None], v3[:, :, None], ab.LowerTriangularMask())[0][:, :, 0]
    assert o3.shape == (2, 9, DIM)
    torch.testing.assert_close(o3, expected)
    groups, per_group = 2, 3
    q = torch.randn(2, 9, groups, per_group, DIM, generator=g)
    k, v = (torch.randn(2, 12, groups, 1, DIM, generator=g).expand(-1, -1, -1, per_group, -1) for _ in range(2))
    o, lse = fmha.memory_efficient_attention_forward_requires_grad(q, k, v, ab.LowerTriangularFromBottomRightMask(),
                                                                   impl=impl)
    flat = [t.reshape(2, t.shape[1], groups * per_group, DIM) for t in (q, k, v)]
    expected, expected_lse = _reference(*flat, ab.LowerTriangularFromBottomRightMask())
    assert o.shape == q.shape and lse.shape == (2, groups, per_group, 9)
    torch.testing.assert_close(o, expected.view(q.shape))
    torch.testing.assert_close(lse, expected_lse.view(lse.shape))
    # a tensor bias (batch, groups, heads, queries, keys), whole or broadcast over groups or heads
    for shape in ((2, groups, per_group, 9, 12), (2, 1, per_group, 9, 12), (2, groups, 1, 9, 12), (1, 1, 1, 9, 12)):
        bias = torch.randn(shape, generator=g)
        got = xops.memory_efficient_attention(q, k, v, bias, impl=impl)
        expected = _reference(*flat, bias.expand(2, groups, per_group, 9, 12).reshape(2, -1, 9, 12))[0]
        torch.testing.assert_close(got, expected.view(q.shape), msg=str(shape))


class BlockDiagonalCausalFromBottomRightMask:
    """A stand-in for xformers' own class of this name: the fields it has, none of this module's code."""

    def __init__(self, q_seqinfo, k_seqinfo):
        self.q_seqinfo, self.k_seqinfo = q_seqinfo, k_seqinfo


class LowerTriangularMaskWithTensorBias:
    def __init__(self, bias):
        self._bias = bias


def test_xformers_own_bias_objects_are_read_by_class_name():
    q_lens, k_lens = _packed_lengths()
    ours = ab.BlockDiagonalMask.from_seqlens(q_lens, k_lens, device="cpu").make_causal_from_bottomright()
    q, k, v = _inputs(1, sum(q_lens), sum(k_lens))
    theirs = BlockDiagonalCausalFromBottomRightMask(ours.q_seqinfo, ours.k_seqinfo)
    assert torch.equal(xops.memory_efficient_attention(q, k, v, theirs), xops.memory_efficient_attention(q, k, v, ours))
    q, k, v = _inputs(2, 7, 7)
    bias = torch.randn(2, HEADS, 7, 7)
    assert torch.equal(xops.memory_efficient_attention(q, k, v, LowerTriangularMaskWithTensorBias(bias)),
                       xops.memory_efficient_attention(q, k, v, ab.LowerTriangularMask().add_bias(bias)))


@pytest.mark.parametrize("device", devices())
def test_paged_keys_equal_the_padded_cache_they_hold(device):
    """PagedBlockDiagonal*PaddedKeysMask over pages in shuffled order gives the padded cache's result."""
    q_lens, k_lens, page_size, pages_per_block = [2, 1, 3], [5, 1, 8], 4, 2
    padded = ab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(q_lens, page_size * pages_per_block, k_lens,
                                                                         device=device)
    q, k, v = (t.to(device) for t in _inputs(1, sum(q_lens), 3 * page_size * pages_per_block))
    table = torch.randperm(7, generator=torch.Generator().manual_seed(5))[:6].view(3, pages_per_block).int().to(device)
    pool_k, pool_v = (torch.zeros(1, 7 * page_size, *t.shape[2:], device=device) for t in (k, v))
    for pool, t in ((pool_k, k), (pool_v, v)):
        pool.view(7, page_size, *t.shape[2:])[table.flatten().long()] = t.view(6, page_size, *t.shape[2:])
    for paged_type in (ab.PagedBlockDiagonalPaddedKeysMask, ab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask):
        unpaged = paged_type._UNPAGED_TYPE(q_seqinfo=padded.q_seqinfo, k_seqinfo=padded.k_seqinfo)
        paged = unpaged.make_paged(table, page_size, paged_type)
        with torch.no_grad():
            got = xops.memory_efficient_attention(q, pool_k, pool_v, paged)
        torch.testing.assert_close(got, xops.memory_efficient_attention(q, k, v, unpaged))
        physical = paged.materialize((1, HEADS, q.shape[1], k.shape[1]), device=device)
        bias = torch.nn.functional.pad(physical, (0, pool_k.shape[1] - physical.shape[-1]), value=-math.inf)
        torch.testing.assert_close(got, _reference(q, pool_k, pool_v, bias)[0])


@pytest.mark.parametrize("device", devices())
def test_gappy_keys_out_of_order_shared_and_paged(device):
    """Gappy keys whose blocks share keys (a common prefix) or come out of order, and the paged
    forms (make_paged of them), against the reference with the bias their rule defines."""
    q_lens, starts, lengths = [3, 2, 4], [5, 0, 0, 12], [7, 4, 6]
    q, k, v = (t.to(device) for t in _inputs(1, sum(q_lens), 12))
    blocks = [(sum(q_lens[:n]), q_lens[n], starts[n], lengths[n]) for n in range(3)]
    page_size, notional = 4, 12
    table = torch.tensor([[4, 1, 6], [0, 2, 5], [3, 8, 7]], dtype=torch.int32, device=device)
    pool_k, pool_v = (torch.full((1, 9 * page_size, *t.shape[2:]), float("nan"), device=device) for t in (k, v))
    for pool, t in ((pool_k, k), (pool_v, v)):  # block n's table row holds all 12 keys
        for n in range(3):
            pool.view(9, page_size, *t.shape[2:])[table[n].long()] = t.view(3, page_size, *t.shape[2:])
    for causal, rule in ((False, RULES["none"]), (True, RULES["causal from bottom right"])):
        gappy_type = ab.BlockDiagonalCausalWithOffsetGappyKeysMask if causal else ab.BlockDiagonalGappyKeysMask
        gappy = gappy_type.from_seqlens(q_lens, starts, lengths, device=device)
        expected = _reference(q, k, v, _defined_bias(rule, blocks, sum(q_lens), 12).to(device))[0]
        with torch.no_grad():
            torch.testing.assert_close(xops.memory_efficient_attention(q, k, v, gappy), expected)
            # the same keys in each block's own table row (notional rows of 12: block n's from n x 12)
            shifted = gappy_type.from_seqlens(q_lens, [s + n * notional for n, s in enumerate(starts[:3])] + [36],
                                              lengths, device=device)
            paged_type = (ab.PagedBlockDiagonalCausalWithOffsetGappyKeysMask if causal
                          else ab.PagedBlockDiagonalGappyKeysMask)
            paged = shifted.make_paged(table, page_size, notional, paged_type)
            assert paged.k_seqinfo.seqstart_py == starts[:3] + [-1]
            torch.testing.assert_close(xops.memory_efficient_attention(q, pool_k, pool_v, paged), expected)
            physical = paged.materialize((1, HEADS, sum(q_lens), 3 * notional), device=device)  # the pool's 9 pages
            torch.testing.assert_close(_reference(q, pool_k.nan_to_num(), pool_v.nan_to_num(), physical)[0], expected)
            direct = paged_type.from_seqlens(q_lens, starts[:3], lengths, table, page_size)
            torch.testing.assert_close(xops.memory_efficient_attention(q, pool_k, pool_v, direct), expected)


def test_backward_partial_and_merge():
    """memory_efficient_attention_backward equals autograd's gradients; two partial attentions over
    halves of the keys merge (merge_attentions, stacked or listed) into the attention over all."""
    q, k, v = _inputs(2, 9, 14)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = xops.memory_efficient_attention(*leaves, ab.LowerTriangularFromBottomRightMask())
    grad = torch.randn_like(out)
    expected = torch.autograd.grad(out, leaves, grad)
    o, lse = xops.memory_efficient_attention_forward_requires_grad(q, k, v, ab.LowerTriangularFromBottomRightMask())
    assert o.grad_fn is None
    got = xops.memory_efficient_attention_backward(grad, o, lse, q, k, v, ab.LowerTriangularFromBottomRightMask())
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e)
    # 5-d k and v expanded over each group's heads: one gradient a head, as for heads of their own
    g = torch.Generator().manual_seed(6)
    q5 = torch.randn(2, 9, 2, 3, DIM, generator=g)
    k5, v5 = (torch.randn(2, 14, 2, 1, DIM, generator=g).expand(-1, -1, -1, 3, -1) for _ in range(2))
    o5, lse5 = xops.memory_efficient_attention_forward_requires_grad(q5, k5, v5)
    grad5 = torch.randn(o5.shape, generator=g)
    own = [t.contiguous().requires_grad_() for t in (q5, k5, v5)]
    expected5 = torch.autograd.grad(_reference(*(t.flatten(2, 3) for t in own), None)[0].view(o5.shape), own, grad5)
    for a, e in zip(xops.memory_efficient_attention_backward(grad5, o5, lse5, q5, k5, v5), expected5):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e)
    parts = [fmha.memory_efficient_attention_partial(q, k[:, keys], v[:, keys]) for keys in (slice(0, 6), slice(6, 14))]
    full, full_lse = xops.memory_efficient_attention_forward_requires_grad(q, k, v)
    for split in ([p[0] for p in parts], torch.stack([p[0] for p in parts])):
        lses = [p[1] for p in parts] if isinstance(split, list) else torch.stack([p[1] for p in parts])
        merged, merged_lse = fmha.merge_attentions(split, lses, output_dtype=torch.float32)
        torch.testing.assert_close(merged, full)
        torch.testing.assert_close(merged_lse, full_lse)
    assert fmha.merge_attentions([p[0] for p in parts], [p[1] for p in parts], write_lse=False)[1] is None


def test_dropout_keeps_1_minus_p_scaled_and_draws_from_torch_seed():
    """Equal scores (q 0) over values of ones: each output is the kept fraction over 1 - p, mean 1."""
    out = xops.memory_efficient_attention(torch.zeros(4, 64, 2, 8), torch.zeros(4, 256, 2, 8),
                                          torch.ones(4, 256, 2, 8), p=0.25)
    # a row keeps a binomial fraction of 256 keys: sd sqrt(0.25 x 0.75 / 256) / 0.75 = 0.036
    assert abs(out.mean().item() - 1.0) < 0.01 and 0.03 < out.std().item() < 0.043
    q, k, v = _inputs(2, 16, 16)
    torch.manual_seed(1)
    first = xops.memory_efficient_attention(q, k, v, p=0.5)
    torch.manual_seed(1)
    again = xops.memory_efficient_attention(q, k, v, p=0.5)
    assert torch.equal(first, again)
    assert not torch.equal(first, xops.memory_efficient_attention(q, k, v))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", fused_impls())
def test_half_precision(dtype, impl):
    skip_unless_supported(impl, "cpu", dtype)
    q_lens = [6, 11]
    bias = ab.BlockDiagonalMask.from_seqlens(q_lens, device="cpu").make_causal()
    q, k, v = _inputs(1, 17, 17, dtype)
    got = xops.memory_efficient_attention(q, k, v, bias, impl=impl)
    exact = _reference(q.double(), k.double(), v.double(), bias)[0]
    assert got.dtype == dtype
    assert_error_ratio(got, exact, _reference(q, k, v, bias)[0], ratio=2.0)


def test_empty_blocks_and_batches():
    bias = ab.BlockDiagonalMask.from_seqlens([3, 0, 2], [0, 4, 2], device="cpu")
    q, k, v = _inputs(1, 5, 6)
    o = xops.memory_efficient_attention(q, k, v, bias)
    assert torch.equal(o[:, :3], torch.zeros_like(o[:, :3]))  # a block without keys
    torch.testing.assert_close(o, _reference(q, k, v, bias)[0])
    assert xops.memory_efficient_attention(*_inputs(0, 4, 4), ab.LowerTriangularMask()).shape == (0, 4, HEADS, DIM_V)


def test_compiles_with_fullgraph():
    from conftest import assert_compiles_like_eager

    bias = ab.BlockDiagonalMask.from_seqlens([4, 5], device="cpu").make_causal()
    q, k, v = (t.requires_grad_() for t in _inputs(1, 9, 9))
    assert_compiles_like_eager(lambda q, k, v: xops.memory_efficient_attention(q, k, v, bias), [q, k, v])
    assert_compiles_like_eager(lambda q, k, v: xops.memory_efficient_attention(q, k, v, ab.LowerTriangularMask()),
                               [q, k, v])
    # top-left causal blocks of other lengths (block by block), and a tensor bias
    blocks = ab.BlockDiagonalMask.from_seqlens([4, 5], [6, 3], device="cpu").make_causal()
    assert_compiles_like_eager(lambda q, k, v: xops.memory_efficient_attention(q, k, v, blocks), [q, k, v])
    tensor = torch.randn(1, HEADS, 9, 9)
    assert_compiles_like_eager(lambda q, k, v: xops.memory_efficient_attention(q, k, v, tensor), [q, k, v])


def test_bad_input_names_the_argument():
    q, k, v = _inputs(2, 5, 5)
    with pytest.raises(ValueError, match="one dtype"):
        xops.memory_efficient_attention(q, k.double(), v)
    with pytest.raises(ValueError, match="key must be"):
        xops.memory_efficient_attention(q, k[:, :, :2], v[:, :, :2])
    with pytest.raises(ValueError, match="query, key and value must all be"):
        xops.memory_efficient_attention(q[0, 0], k[0, 0], v[0, 0])
    with pytest.raises(ValueError, match="p must lie"):
        xops.memory_efficient_attention(q, k, v, p=1.0)
    with pytest.raises(ValueError, match=r"attn_bias must be an additive floating-point tensor \(2, 3, 5, 5\)"):
        xops.memory_efficient_attention(q, k, v, torch.zeros(2, 5, 5))  # (batch, queries, keys) of 3-d inputs
    with pytest.raises(ValueError, match="attn_bias must be an additive floating-point tensor"):
        xops.memory_efficient_attention(q, k, v, torch.ones(2, 3, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="key must have the 9 rows attn_bias packs, got 7"):
        causal = ab.BlockDiagonalMask.from_seqlens([2, 3], [4, 5], device="cpu").make_causal()
        xops.memory_efficient_attention(*_inputs(1, 5, 7), causal)
    gappy = ab.BlockDiagonalGappyKeysMask.from_seqlens([2, 3], [0, 4, 9], [4, 6], device="cpu")
    with pytest.raises(ValueError, match=r"block 1 has keys 4 .. 10: each block's must lie in 0 .. 9 \(the keys\)"):
        xops.memory_efficient_attention(*_inputs(1, 5, 9), gappy)
    shared = ab.BlockDiagonalGappyKeysMask.from_seqlens([2, 3], [0, 0, 9], [4, 6], device="cpu")
    with pytest.raises(NotImplementedError, match="sharing keys or paged runs for inference"):
        xops.memory_efficient_attention(*(t.requires_grad_() for t in _inputs(1, 5, 9)), shared)
    with pytest.raises(ValueError, match="must lie in its table row of 8 keys"):
        shared.make_paged(torch.zeros(2, 2, dtype=torch.int32), 4, 8, ab.PagedBlockDiagonalGappyKeysMask)
    with pytest.raises(ValueError, match="each of 0 keys or more"):
        ab.BlockDiagonalGappyKeysMask.from_seqlens([2], [0, 9], [-1], device="cpu")
    with pytest.raises(ValueError, match="query is float64: .* impl='reference' runs float64"):
        xops.memory_efficient_attention(q.double(), k.double(), v.double())
    assert xops.memory_efficient_attention(q.double(), k.double(), v.double(), impl="reference").dtype == torch.float64
    with pytest.raises(ValueError, match="attn_bias must be on query's device"):
        xops.memory_efficient_attention(q, k, v, torch.zeros(2, 3, 5, 5, device="meta"))
    paged = ab.PagedBlockDiagonalPaddedKeysMask.from_seqlens([5], [3], torch.zeros(1, 2, dtype=torch.int32), 2,
                                                             device="cpu")
    with pytest.raises(ValueError, match="key must hold whole pages of attn_bias's page_size 2"):
        with torch.no_grad():
            xops.memory_efficient_attention(q[:1], k[:1], v[:1], paged)
    with pytest.raises(TypeError, match="seqlens must be a sequence of ints, not a tensor"):
        ab.BlockDiagonalMask.from_seqlens(torch.tensor([2, 3]), device="cpu")
    with pytest.raises(ValueError, match="batch size 1"):
        xops.memory_efficient_attention(q, k, v, ab.BlockDiagonalMask.from_seqlens([5], device="cpu"))
    with pytest.raises(ValueError, match="query must have the 4 rows"):
        xops.memory_efficient_attention(q[:1], k[:1], v[:1], ab.BlockDiagonalMask.from_seqlens([4], [5], device="cpu"))
    with pytest.raises(NotImplementedError, match="dropout"):
        xops.memory_efficient_attention_forward_requires_grad(q, k, v, p=0.1)
    with pytest.raises(NotImplementedError, match="attn_bias of type object"):
        xops.memory_efficient_attention(q, k, v, object())
    with pytest.raises(ValueError, match="window_left must be >= 0"):
        ab.LocalAttentionFromBottomRightMask(-1, 0)
    with pytest.raises(ValueError, match="block 0 has 2 keys and 3 queries"):
        ab.BlockDiagonalMask.from_seqlens([3], [2], device="cpu").make_causal_from_bottomright()
    with pytest.raises(ValueError, match="attn_bias's sequence starts must be on query's device"):
        xops.memory_efficient_attention(q[:1].to("meta"), k[:1].to("meta"), v[:1].to("meta"),
                                        ab.BlockDiagonalMask.from_seqlens([5], device="cpu"))


@pytest.mark.cuda
def test_biases_on_cuda_in_bfloat16():
    """Every bias on the GPU (CUDA or Triton, as "auto" picks), bfloat16, against the reference."""
    for bias, batch, lq, lk, rule, blocks in _biases():
        bias = None if bias is None else bias.to("cuda")
        defined = _defined_bias(rule, blocks, lq, lk).cuda()
        q, k, v = (t.cuda() for t in _inputs(batch, lq, lk))
        got = xops.memory_efficient_attention(*(t.bfloat16() for t in (q, k, v)), bias)
        exact = _reference(q.double(), k.double(), v.double(), defined.double())[0]
        low = _reference(*(t.bfloat16() for t in (q, k, v)), defined.bfloat16())[0]
        assert_error_ratio(got, exact, low, ratio=2.0, msg=type(bias).__name__)


@pytest.mark.parametrize("masked", [False, True])
def test_diffusers_xformers_processor_runs_on_it(masked, monkeypatch):
    """diffusers' XFormersAttnProcessor with this module as its `xformers` (3-d (batch x heads, seqlen,
    dim) inputs, a padding mask expanded over the queries) equals its AttnProcessor2_0 (SDPA)."""
    diffusers_attention = pytest.importorskip("diffusers.models.attention_processor")
    import genfast.integrations.xformers

    monkeypatch.setattr(diffusers_attention, "xformers", genfast.integrations.xformers)
    g = torch.Generator().manual_seed(1)
    hidden, context = torch.randn(2, 30, 32, generator=g), torch.randn(2, 11, 24, generator=g)
    # diffusers' additive padding mask over the prompt, (batch, 1, keys)
    mask = torch.where(torch.rand(2, 1, 11, generator=g) < 0.3, -1e4, 0.0) if masked else None

    def run(processor, dtype):
        torch.manual_seed(0)
        block = diffusers_attention.Attention(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8).to(dtype)
        block.set_processor(processor)
        x = hidden.to(dtype).requires_grad_()
        out = block(x, encoder_hidden_states=context.to(dtype), attention_mask=None if mask is None else mask.to(dtype))
        return [out, *torch.autograd.grad((out.double() ** 2).sum(), [x, block.to_q.weight, block.to_k.weight])]

    got = run(diffusers_attention.XFormersAttnProcessor(), torch.float32)
    exact = run(diffusers_attention.AttnProcessor2_0(), torch.float64)
    low = run(diffusers_attention.AttnProcessor2_0(), torch.float32)
    for n, (a, e, lo) in enumerate(zip(got, exact, low)):
        assert_error_ratio(a, e, lo, ratio=2.0 if n == 0 else 3.0, msg=f"result {n}")


def test_xformers_operator_names_are_taken_and_ignored():
    """Code that names xformers' operators (diffusers' set_use_memory_efficient_attention_xformers
    passes one) imports them and runs on genfast."""
    q, k, v = _inputs(1, 6, 6)
    for op in (xops.MemoryEfficientAttentionFlashAttentionOp, xops.MemoryEfficientAttentionCutlassOp,
               fmha.ALL_FW_OPS[0], None):
        torch.testing.assert_close(xops.memory_efficient_attention(q, k, v, op=op),
                                   xops.memory_efficient_attention(q, k, v))
    assert ab.BlockDiagonalMask in fmha.VARLEN_BIASES
