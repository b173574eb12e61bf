"""genfast.attention_varlen's block_table: keys and values read from a paged KV cache (vLLM's and
FlashAttention's layout) against reference.varlen_attention, and against the same keys packed
without pages, bit for bit; pages in any order, shared between sequences, table entries past a
sequence's keys never read; every option the forward takes, seqused_k, decoding, opcheck,
torch.compile and bad input. A paged cache serves inference: no gradient, no dropout."""

import pytest
import torch

import genfast
from genfast.reference.attention import paged_rows, varlen_attention
from genfast.testing.tolerances import assert_error_ratio
from conftest import RecordedOps, fused_impls, skip_unless_runs, skip_unless_supported

LENGTHS_Q = [3, 1, 0, 20, 1]
LENGTHS_K = [300, 129, 5, 256, 0]


def paged_inputs(lengths_q, lengths_k, page_size=128, heads=4, kv_heads=2, dim=16, v_dim=None, dtype=torch.float32,
                 seed=0, shared_first_page=False, device="cpu"):
    """q packed by lengths_q; k and v a paged cache holding each sequence's keys in pages of page_size
    rows, the pages shuffled, with NaN in every row no key fills and in a spare page that every table
    entry past a sequence's keys names (a kernel that read one would return NaN). With
    shared_first_page every sequence's first page is sequence 0's, as a shared prompt's prefix is.
    Returns (q, k_pages, v_pages, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table)."""
    g = torch.Generator().manual_seed(seed)
    per_sequence = [-(-n // page_size) for n in lengths_k]
    pages = sum(per_sequence) + 1
    order = torch.randperm(pages, generator=g).tolist()
    spare = order.pop()
    k = torch.full((pages, page_size, kv_heads, dim), float("nan"))
    v = torch.full((pages, page_size, kv_heads, v_dim or dim), float("nan"))
    table = torch.full((len(lengths_k), max(per_sequence + [1]) + 1), spare, dtype=torch.int32)
    for n, count in enumerate(lengths_k):
        for p in range(per_sequence[n]):
            page = order.pop()
            if shared_first_page and p == 0 and n > 0:  # sequence 0's first page (full: its keys are longer)
                table[n, p] = table[0, 0]
                continue
            table[n, p] = page
            rows = min(page_size, count - p * page_size)
            k[table[n, p], :rows] = torch.randn(rows, kv_heads, dim, generator=g)
            v[table[n, p], :rows] = torch.randn(rows, kv_heads, v_dim or dim, generator=g)
    q = torch.randn(sum(lengths_q), heads, dim, generator=g)
    cu_q, cu_k = (torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
                  for lengths in (lengths_q, lengths_k))
    q, k, v, cu_q, cu_k, table = (t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
                                  for t in (q, k, v, cu_q, cu_k, table))
    return q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), table


def _reference(args, dtype, **options):
    q, k, v, cu_q, cu_k, _, _, table = args
    floats = {key: (val.to(dtype) if isinstance(val, torch.Tensor) and val.is_floating_point() else val)
              for key, val in options.items()}
    return varlen_attention(q.to(dtype), k.to(dtype), v.to(dtype), cu_q, cu_k, block_table=table, enable_gqa=True,
                            return_lse=True, **floats)


def compare_paged(impl, args, **options):
    """o and lse by the error-ratio rule against the reference in float64 and in the inputs' dtype."""
    q = args[0]
    options.setdefault("scale", q.shape[-1] ** -0.5)
    with torch.no_grad():
        o, lse = genfast.attention_varlen(*args[:7], impl=impl, return_lse=True, block_table=args[7], **options)
    exact = _reference(args, torch.float64, **options)
    low = _reference(args, q.dtype, **options)
    assert o.dtype == q.dtype and lse.dtype == torch.float32
    for name, got, e, lo in zip(("o", "lse"), (o, lse), exact, low):
        assert_error_ratio(got, e, lo.to(got.dtype), ratio=2.0, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", fused_impls())
def test_matches_reference(dtype, impl):
    skip_unless_supported(impl, "cpu", dtype)
    compare_paged(impl, paged_inputs(LENGTHS_Q, LENGTHS_K, dtype=dtype))


@pytest.mark.parametrize("options", [dict(causal="bottom_right"), dict(window=(40, 3)), dict(softcap=2.0, scale=0.4),
                                     dict(alibi_slopes=torch.tensor([0.5, 0.25, 0.1, 0.05])),
                                     dict(sinks=torch.tensor([-1.0, 0.5, 2.0, float("-inf")])),
                                     dict(seqused_k=torch.tensor([200, 128, 0, 255, 0], dtype=torch.int32),
                                          causal="bottom_right")], ids=str)
@pytest.mark.parametrize("impl", fused_impls())
def test_options_match_reference(options, impl):
    skip_unless_supported(impl, "cpu")
    compare_paged(impl, paged_inputs(LENGTHS_Q, LENGTHS_K, v_dim=24), **dict(options))


@pytest.mark.parametrize("page_size", [1, 16, 100, 128, 256])
@pytest.mark.parametrize("impl", fused_impls())
def test_equals_the_keys_packed_without_pages(page_size, impl):
    """The kernels read the same key blocks, in one page or across several: o and lse bit for bit
    those of the keys packed alone; pages shared between sequences included."""
    skip_unless_supported(impl, "cpu")
    args = paged_inputs(LENGTHS_Q, LENGTHS_K, page_size=page_size, shared_first_page=True)
    q, k, v, cu_q, cu_k, mq, mk, table = args
    with torch.no_grad():
        o, lse = genfast.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal="bottom_right", block_table=table,
                                          return_lse=True, impl=impl)
        packed = genfast.attention_varlen(q, paged_rows(k, table, cu_k), paged_rows(v, table, cu_k), cu_q, cu_k, mq,
                                          mk, causal="bottom_right", return_lse=True, impl=impl)
    assert torch.equal(o, packed[0]) and torch.equal(lse, packed[1])
    assert o.isfinite().all()


@pytest.mark.parametrize("page_size", [128, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", fused_impls())
def test_decoding_from_pages(dtype, impl, page_size):
    """One query a sequence, long caches, grouped heads: the plans that stack heads and split keys,
    in pages of whole key blocks and in vLLM's 16-key pages."""
    skip_unless_supported(impl, "cpu", dtype)
    args = paged_inputs([1, 1, 1], [700, 130, 257], page_size=page_size, heads=8, kv_heads=2, dim=32, dtype=dtype,
                        seed=2)
    compare_paged(impl, args, causal="bottom_right")


@pytest.mark.parametrize("page_size", [1, 16, 48])
@pytest.mark.parametrize("impl", fused_impls())
def test_small_pages_match_reference(page_size, impl):
    """Pages smaller than a key block (vLLM's 16, SGLang's 1): blocks read across pages, a page or a
    key at a time."""
    skip_unless_supported(impl, "cpu")
    seqused_k = torch.tensor([200, 128, 0, 255, 0], dtype=torch.int32)
    compare_paged(impl, paged_inputs(LENGTHS_Q, LENGTHS_K, page_size=page_size, v_dim=24), causal="bottom_right",
                  seqused_k=seqused_k)


@pytest.mark.parametrize("impl", fused_impls())
def test_strided_pools_are_read_in_place(impl):
    """Pages that are slices of longer rows (a cache sliced to its live part, as
    flash_attn_with_kvcache passes one) give the same result, and no copy of the pool is made in
    Python (flattening the strided pool for its shapes had copied it)."""
    skip_unless_supported(impl, "cpu")
    q, k, v, *rest = paged_inputs([3, 1], [40, 7], page_size=16)
    wide = [torch.cat([t, torch.full_like(t, float("nan"))], 1) for t in (k, v)]
    strided = [t[:, :16] for t in wide]
    assert not strided[0].is_contiguous()
    with RecordedOps() as ops:
        o = genfast.attention_varlen(q, *strided, *rest[:4], block_table=rest[4], impl=impl)
    copies = ("aten::clone", "aten::_to_copy", "aten::contiguous", "aten::copy", "aten::cat")
    assert [name for name, _, result in ops.calls if name in copies and result.numel() >= k.numel()] == []
    torch.testing.assert_close(o, genfast.attention_varlen(q, k, v, *rest[:4], block_table=rest[4], impl=impl),
                               rtol=0, atol=0)


def test_reference_reads_the_pages():
    """reference.varlen_attention with block_table is that of paged_rows's packing."""
    q, k, v, cu_q, cu_k, mq, mk, table = paged_inputs(LENGTHS_Q, LENGTHS_K)
    o = genfast.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, block_table=table, impl="reference")
    packed = genfast.attention_varlen(q, paged_rows(k, table, cu_k), paged_rows(v, table, cu_k), cu_q, cu_k, mq, mk,
                                      impl="reference")
    assert torch.equal(o, packed) and o.isfinite().all()
    rows = paged_rows(k, table, cu_k)
    assert rows.shape == (sum(LENGTHS_K), 2, 16)
    assert torch.equal(rows[300:300 + 129][128], k[table[1, 1], 0])


@pytest.mark.parametrize("impl", fused_impls())
def test_opcheck_and_compile(impl):
    skip_unless_supported(impl, "cpu")
    q, k, v, cu_q, cu_k, mq, mk, table = paged_inputs([2, 1], [130, 7], heads=2, kv_heads=1, dim=8)
    suffix = "" if impl == "native" else "_triton"
    forward = getattr(torch.ops.genfast, "attention_varlen_forward" + suffix)
    options = (None, 0.3, 0.0, -3, 0, 0.0, 0, 0, False, None, None)
    torch.library.opcheck(forward, (q, k, v, cu_q, cu_k, mq, mk, *options, table))

    def layer(q, k, v):
        return genfast.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal="bottom_right", block_table=table,
                                        impl=impl)

    with torch.no_grad():
        torch.testing.assert_close(torch.compile(layer, fullgraph=True)(q, k, v), layer(q, k, v))


@pytest.mark.parametrize("impl", ["native", pytest.param("triton", marks=pytest.mark.triton), "reference"])
def test_bad_pages_name_the_argument(impl):
    skip_unless_runs(impl, "cpu")
    q, k, v, cu_q, cu_k, mq, mk, table = paged_inputs([2, 1], [130, 7])

    def call(q=q, k=k, v=v, table=table, **options):
        return genfast.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, block_table=table, impl=impl, **options)

    with pytest.raises(ValueError, match=r"as many pages of one page size \(k.shape\[1\]\), at least 1"):
        call(k=k[:, :0], v=v[:, :0])
    with pytest.raises(ValueError, match=r"as many pages of one page size"):
        call(v=v[:, :64])
    with pytest.raises(ValueError, match="with block_table, k must be a paged cache"):
        call(k=k.flatten(0, 1), v=v.flatten(0, 1))
    for bad in (table.long(), table[:1], table[0], table.tolist()):
        with pytest.raises(ValueError, match=r"block_table must be an int32 tensor \(batch, pages per sequence\)"):
            call(table=bad)
    with pytest.raises(ValueError, match=r"fewer than max_seqlen_k \(130\)"):
        call(table=table[:, :1])
    with pytest.raises(ValueError, match="dropout_p must be 0 with block_table"):
        call(dropout_p=0.1)
    with pytest.raises(ValueError, match="serves inference and has no backward"):
        call(q=q.clone().requires_grad_())
    with torch.no_grad():
        call(q=q.clone().requires_grad_())  # no gradient asked: runs


@pytest.mark.parametrize("impl", fused_impls())
def test_ops_check_the_pages(impl):
    """The ops check what the Python API checks (for direct calls), and the CPU's the table's values."""
    skip_unless_supported(impl, "cpu")
    q, k, v, cu_q, cu_k, mq, mk, table = paged_inputs([2, 1], [130, 7])
    options = (None, 0.3, 0.0, -3, 0, 0.0, 0, 0, False, None, None)
    op = getattr(torch.ops.genfast, "attention_varlen_forward" + ("" if impl == "native" else "_triton"))
    if impl == "native":
        for bad in ([[0, 9, 2], [3, 1, 2]], [[0, -1, 2], [3, 1, 2]]):
            with pytest.raises(RuntimeError, match=r"block_table\[0, 1\] must name one of the cache's 4 pages"):
                op(q, k, v, cu_q, cu_k, mq, mk, *options, torch.tensor(bad, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="serves inference and has no backward"):
        op(q.clone().requires_grad_(), k, v, cu_q, cu_k, mq, mk, *options, table)
    with pytest.raises((RuntimeError, ValueError), match="page size"):
        op(q, k[:, :0], v[:, :0], cu_q, cu_k, mq, mk, *options, table)
    with pytest.raises((RuntimeError, ValueError), match=r"fewer than max_seqlen_k \(130\)"):
        op(q, k, v, cu_q, cu_k, mq, mk, *options, table[:, :1])
    with pytest.raises((RuntimeError, ValueError), match="dropout_p must be 0 with block_table"):
        op(q, k, v, cu_q, cu_k, mq, mk, None, 0.3, 0.0, -3, 0, 0.5, 0, 0, False, None, None, table)
