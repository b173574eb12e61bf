"""genfast.kvcache_append, a KV cache's new rows written in place with the rotary embedding fused,
on every backend against reference.attention_kvcache.kvcache_append: the caches and the turned
queries by the error-ratio rule (rows not written bit for bit untouched), every cache layout,
rotary layout and dtype, strided inputs and caches, empty calls, NaN, opcheck, torch.compile and
bad input."""

import pytest
import torch

import genfast
from genfast.reference.attention_kvcache import kvcache_append as reference_append
from genfast.testing.tolerances import assert_error_ratio
from conftest import fused_impls, skip_unless_supported

BATCH, NEW, HEADS, KV_HEADS, DIM, V_DIM, CAPACITY = 3, 4, 6, 2, 16, 8, 20
HELD = [5, 0, 16]


def _inputs(layout, dtype=torch.float32, rotary_dim=DIM, q_rows=NEW, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(BATCH, NEW, KV_HEADS, DIM, generator=g).to(dtype)
    v = torch.randn(BATCH, NEW, KV_HEADS, V_DIM, generator=g).to(dtype)
    q = torch.randn(BATCH, q_rows, HEADS, DIM, generator=g).to(dtype)
    rows = (BATCH * CAPACITY // 4 + 3, 4) if layout == "paged" else (BATCH + 1, CAPACITY)
    k_cache = torch.randn(*rows, KV_HEADS, DIM, generator=g).to(dtype)
    v_cache = torch.randn(*rows, KV_HEADS, V_DIM, generator=g).to(dtype)
    angles = torch.arange(CAPACITY + 2, dtype=torch.float64)[:, None] * 0.6 ** torch.arange(rotary_dim // 2)
    options = dict(rotary_cos=angles.cos().to(dtype), rotary_sin=angles.sin().to(dtype)) if rotary_dim else {}
    if layout == "paged":
        options["block_table"] = torch.randperm(rows[0], generator=g)[:BATCH * CAPACITY // 4].view(BATCH, -1).int()
    elif layout == "cache_batch_idx":
        options["cache_batch_idx"] = torch.tensor([2, 3, 0], dtype=torch.int32)
    return k_cache, v_cache, k, v, torch.tensor(HELD, dtype=torch.int32), q, options


def _run(impl, dtype, inputs, options):
    """(k_cache, v_cache, turned q) after the call on copies, the inputs cast to dtype (None: theirs)."""
    k_cache, v_cache, k, v, held, q, fixed = inputs
    cast = (lambda t: t if dtype is None or t is None else t.to(dtype))
    k_cache, v_cache = cast(k_cache).clone(), cast(v_cache).clone()
    fixed = {key: (cast(val) if key.startswith("rotary") else val) for key, val in fixed.items()}
    q = cast(q) if "rotary_cos" in fixed else None
    if impl == "reference":
        turned = reference_append(k_cache, v_cache, cast(k), cast(v), held, q=q, **fixed, **options)
    else:
        turned = genfast.kvcache_append(k_cache, v_cache, cast(k), cast(v), held, q=q, impl=impl, **fixed, **options)
    return k_cache, v_cache, turned


def _compare(impl, inputs, **options):
    got = _run(impl, None, inputs, options)
    exact = _run("reference", torch.float64, inputs, options)
    low = _run("reference", None, inputs, options)
    for name, a, e, lo in zip(("k_cache", "v_cache", "q"), got, exact, low):
        if e is None:
            assert a is None, f"{name}: no queries were given"
            continue
        assert a.dtype == lo.dtype and a.shape == lo.shape, name
        assert_error_ratio(a, e, lo, msg=name)
    untouched = ~_written_rows(inputs)
    for name, cache, before in (("k_cache", got[0], inputs[0]), ("v_cache", got[1], inputs[1])):
        assert torch.equal(cache[untouched], before[untouched]), f"{name}: rows not written are left as they were"


def _written_rows(inputs):
    """(rows, row_length) bool: the cache rows the call writes."""
    k_cache, _, k, _, held, _, options = inputs
    written = torch.zeros(k_cache.shape[:2], dtype=torch.bool)
    for n in range(k.shape[0]):
        for position in range(int(held[n]), int(held[n]) + k.shape[1]):
            if "block_table" in options:
                written[options["block_table"][n, position // k_cache.shape[1]], position % k_cache.shape[1]] = True
            else:
                written[int(options.get("cache_batch_idx", torch.arange(k.shape[0]))[n]), position] = True
    return written


LAYOUTS = ["padded", "paged", "cache_batch_idx"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rotary", [dict(rotary_interleaved=True), dict(rotary_interleaved=False),
                                    dict(rotary_interleaved=False, queries_in_sequence=False), None], ids=str)
@pytest.mark.parametrize("impl", fused_impls())
def test_matches_reference(layout, rotary, impl):
    skip_unless_supported(impl, "cpu")
    _compare(impl, _inputs(layout, rotary_dim=DIM if rotary is not None else 0), **(rotary or {}))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", fused_impls())
def test_half_precision_rounds_once(dtype, impl):
    """The turn in float32 from the 16-bit inputs and tables, rounded once."""
    skip_unless_supported(impl, "cpu", dtype)
    for layout in LAYOUTS:
        _compare(impl, _inputs(layout, dtype), rotary_interleaved=False)


@pytest.mark.parametrize("impl", fused_impls())
def test_partial_rotary_dim_and_other_query_rows(impl):
    """rotary_dim 6 of 16 (the rest copied), one query row per sequence, and three."""
    skip_unless_supported(impl, "cpu")
    for q_rows in (1, 3):
        for interleaved in (True, False):
            _compare(impl, _inputs("paged", rotary_dim=6, q_rows=q_rows), rotary_interleaved=interleaved)


@pytest.mark.parametrize("impl", fused_impls())
def test_strided_inputs_and_caches(impl):
    """k, v and q transposed views; caches that are slices of longer rows and of more heads."""
    skip_unless_supported(impl, "cpu")
    k_cache, v_cache, k, v, held, q, options = _inputs("padded")
    wide_k = torch.randn(BATCH + 1, CAPACITY + 3, KV_HEADS + 1, DIM)
    wide_v = torch.randn(BATCH + 1, CAPACITY + 3, KV_HEADS + 1, V_DIM)
    wide_k[:, :CAPACITY, :KV_HEADS], wide_v[:, :CAPACITY, :KV_HEADS] = k_cache, v_cache
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v, q)]
    turned = genfast.kvcache_append(wide_k[:, :CAPACITY, :KV_HEADS], wide_v[:, :CAPACITY, :KV_HEADS], *strided[:2],
                                    held, q=strided[2], impl=impl, **options)
    expected = _run("reference", None, (k_cache, v_cache, k, v, held, q, options), {})
    torch.testing.assert_close(wide_k[:, :CAPACITY, :KV_HEADS], expected[0])
    torch.testing.assert_close(wide_v[:, :CAPACITY, :KV_HEADS], expected[1])
    torch.testing.assert_close(turned, expected[2])
    assert turned.is_contiguous()


@pytest.mark.parametrize("impl", fused_impls())
def test_empty_calls_and_nan(impl):
    skip_unless_supported(impl, "cpu")
    k_cache, v_cache, k, v, held, q, options = _inputs("padded")
    before = k_cache.clone()
    genfast.kvcache_append(k_cache, v_cache, k[:, :0], v[:, :0], held, impl=impl)
    assert torch.equal(k_cache, before)
    turned = genfast.kvcache_append(k_cache[:0], v_cache[:0], k[:0], v[:0], held[:0], q=q[:0], impl=impl, **options)
    assert turned.shape == (0, NEW, HEADS, DIM)
    k[1, 2, 0, 3] = float("nan")
    genfast.kvcache_append(k_cache, v_cache, k, v, held, impl=impl, **options)
    nan = k_cache.isnan()
    assert nan[1, 2, 0].any() and int(nan.sum()) <= 2  # the feature and its plane's partner, nothing else


@pytest.mark.parametrize("impl", fused_impls())
def test_opcheck_and_compile(impl):
    skip_unless_supported(impl, "cpu")
    k_cache, v_cache, k, v, held, q, options = _inputs("paged", rotary_dim=8)
    op = torch.ops.genfast.kvcache_append if impl == "native" else torch.ops.genfast.kvcache_append_triton
    torch.library.opcheck(op, (k, v, held, None, options["block_table"], options["rotary_cos"], options["rotary_sin"],
                               False, q, True, k_cache.clone(), v_cache.clone(), torch.empty_like(q)))

    def step(k_cache, v_cache, k, v, q):
        return genfast.kvcache_append(k_cache, v_cache, k, v, held, q=q, impl=impl, **options) * 2

    caches = [(k_cache.clone(), v_cache.clone()) for _ in range(2)]
    expected = step(*caches[0], k, v, q)
    got = torch.compile(step, fullgraph=True)(*caches[1], k, v, q)
    assert torch.equal(got, expected)
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])


def test_bad_input_names_the_argument():
    k_cache, v_cache, k, v, held, q, options = _inputs("padded")
    cos, sin = options["rotary_cos"], options["rotary_sin"]
    for call, error, match in (
            (lambda: genfast.kvcache_append(k_cache, v_cache, k[0], v, held), ValueError, "k must be a 4-d"),
            (lambda: genfast.kvcache_append(k_cache, v_cache, k.int(), v, held), TypeError, "k must be float32"),
            (lambda: genfast.kvcache_append(k_cache, v_cache, k, v[:, :2], held), ValueError, "v must be"),
            (lambda: genfast.kvcache_append(k_cache[..., :8], v_cache, k, v, held), ValueError, "k_cache must be"),
            (lambda: genfast.kvcache_append(k_cache, v_cache, k, v, held.long()), ValueError, "cache_seqlens must"),
            (lambda: genfast.kvcache_append(k_cache, v_cache, k, v, held + 1), ValueError, "must lie in 0 .. 20"),
            (lambda: genfast.kvcache_append(k_cache, v_cache, k, v, held, cache_batch_idx=held[:2]), ValueError,
             "cache_batch_idx must"),
            (lambda: genfast.kvcache_append(k_cache, v_cache, k, v, held, rotary_cos=cos), ValueError,
             "go together"),
            (lambda: genfast.kvcache_append(k_cache, v_cache, k, v, held, rotary_cos=torch.cat((cos, cos[:, :1]), 1),
                                            rotary_sin=torch.cat((sin, sin[:, :1]), 1)), ValueError,
             "rotary_dim <= head_dim"),
            (lambda: genfast.kvcache_append(k_cache, v_cache, k, v, held, rotary_cos=cos[:19], rotary_sin=sin[:19]),
             ValueError, "19 positions"),
            (lambda: genfast.kvcache_append(k_cache, v_cache, k, v, held, q=q), ValueError, "pass rotary_cos"),
            (lambda: genfast.kvcache_append(k_cache, v_cache, k, v, held, q=q.half(), **options), ValueError,
             "q must have k's dtype"),
            (lambda: genfast.kvcache_append(k_cache, v_cache, k.requires_grad_(), v, held), ValueError,
             "no backward")):
        before = k_cache.clone()
        with pytest.raises(error, match=match):
            call()
        assert torch.equal(k_cache, before), "nothing is written before the checks pass"


@pytest.mark.triton
def test_triton_turns_positions_outside_the_tables_by_nothing():
    """Called directly (the Python checks, which a GPU skips, left out), the Triton kernel turns a key
    or query at a position past the rotary tables by nothing, as the CUDA kernel and FlashAttention's
    do, and reads nothing past them: the reference with the tables run on in rows of cos 1, sin 0."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    skip_unless_supported("triton", device)
    k_cache, v_cache, k, v, held, q, options = _inputs("padded")
    short = {key: options[key][:8] for key in ("rotary_cos", "rotary_sin")}  # positions 8.. outside
    identity = dict(rotary_cos=torch.cat([short["rotary_cos"], torch.ones(CAPACITY, DIM // 2)]),
                    rotary_sin=torch.cat([short["rotary_sin"], torch.zeros(CAPACITY, DIM // 2)]))
    expected = [k_cache.clone(), v_cache.clone()]
    expected.append(reference_append(*expected, k, v, held, q=q, rotary_interleaved=False, **identity))
    on = (lambda t: t.to(device))
    got = [on(k_cache), on(v_cache), torch.empty_like(on(q))]
    torch.ops.genfast.kvcache_append_triton(on(k), on(v), on(held), None, None, on(short["rotary_cos"]),
                                            on(short["rotary_sin"]), False, on(q), True, *got)
    assert int(held.max()) + NEW > 8  # the case reaches past the tables
    for name, a, e in zip(("k_cache", "v_cache", "q"), got, expected):
        torch.testing.assert_close(a.cpu(), e, msg=name)


def test_the_native_op_checks_the_rows_itself():
    """Called directly (no Python checks), the CPU op names what does not fit."""
    from genfast import _backend

    if not _backend.native_runs_on("cpu"):
        pytest.skip("genfast._C is not built here")
    k_cache, v_cache, k, v, held, q, options = _inputs("paged")
    op = torch.ops.genfast.kvcache_append
    table = options["block_table"]
    with pytest.raises(ValueError, match=r"cache_seqlens\[2\] \+ seqlen_new \(17 \+ 4\) must lie in 0 .. 20"):
        op(k, v, held + 1, None, table, None, None, True, None, True, k_cache, v_cache, None)
    with pytest.raises(ValueError, match=r"block_table\[0, 1\] = 99 must lie in 0 .. 17"):
        op(k, v, held, None, torch.where(table == table[0, 1], 99, table), None, None, True, None, True, k_cache,
           v_cache, None)
    with pytest.raises(RuntimeError, match="k_cache must have k's dtype"):
        op(k, v, held, None, table, None, None, True, None, True, k_cache.double(), v_cache, None)
