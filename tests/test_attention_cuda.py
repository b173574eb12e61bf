"""genfast.attention and attention_varlen on a CUDA GPU: the hand-written CUDA kernels (float16,
bfloat16) and the Triton kernels (float32 too) against the float64 reference by the error-ratio
rule, with every option, long sequences, a bit-reproducible backward and CUDA graph capture.
Everything here skips without a GPU."""

import importlib

import pytest
import torch

import genfast
from genfast.testing.attention_probes import score_probe, value_probe
from test_attention import (DROPOUT_MASK_KEYS, _block_sparse_mask, _compare, _compare_grads, _qkv,
                            check_dropout_mask, check_hidden_keys_not_read)
from test_attention_paged import compare_paged, paged_inputs
from test_attention_seqused_k import cache_inputs
from test_attention_sinks import compare_with_sinks, sink_inputs
from test_attention_varlen import LENGTHS_K, LENGTHS_Q, _packed
from test_attention_varlen import _compare as _compare_varlen

pytestmark = pytest.mark.cuda

BACKENDS = [("native", torch.float16), ("native", torch.bfloat16),
            *(pytest.param("triton", dtype, marks=pytest.mark.triton)
              for dtype in (torch.float32, torch.float16, torch.bfloat16))]
IDS = ["native-fp16", "native-bf16", "triton-fp32", "triton-fp16", "triton-bf16"]


def _cuda(*tensors):
    return [t.cuda() for t in tensors]


@pytest.mark.parametrize("probe", [score_probe, value_probe])
@pytest.mark.parametrize("impl,dtype", BACKENDS, ids=IDS)
def test_layout_probes(impl, dtype, probe):
    """Which queries, keys or value rows a kernel gets wrong, before the error-ratio tests say that it does."""
    assert probe(lambda q, k, v, scale: genfast.attention(q, k, v, scale=scale, impl=impl), dtype, "cuda") == ""


@pytest.mark.parametrize("lq,lk", [(1, 1), (17, 17), (1, 1000), (1000, 1000), (100, 333), (333, 100)])
@pytest.mark.parametrize("dim", [16, 40, 64, 96, 128, 256])
@pytest.mark.parametrize("impl,dtype", BACKENDS, ids=IDS)
def test_matches_reference(impl, dtype, dim, lq, lk):
    _compare(*_cuda(*_qkv(2, 3, 3, lq, lk, dim, dtype)), impl=impl)


@pytest.mark.parametrize("lk", DROPOUT_MASK_KEYS)
@pytest.mark.parametrize("impl,dtype", BACKENDS, ids=IDS)
def test_dropout_keeps_exactly_the_reference_elements(impl, dtype, lk):
    """Lanes share Philox calls (kernels/cuda/attention_tile.cuh, dropout_keeps; Triton's groups)."""
    check_dropout_mask(impl, lk, dtype, "cuda")


OPTIONS = [dict(causal="top_left"), dict(causal="bottom_right"), dict(causal="bottom_right", window=(64, 0)),
           dict(window=(20, 7)), dict(softcap=5.0, scale=0.3), dict(alibi_slopes=[0.5, 0.25, 0.1, 0.05]),
           dict(dropout_p=0.2, seed=4)]


def _options(options):
    options = dict(options)
    if "alibi_slopes" in options:
        options["alibi_slopes"] = torch.tensor(options["alibi_slopes"], device="cuda")
    return options


@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("impl,dtype", BACKENDS, ids=IDS)
def test_options_and_gradients(impl, dtype, options):
    q, k, v = _cuda(*_qkv(2, 4, 2, 150, 260, 64, dtype, v_dim=64))
    options = _options(options)
    seed = options.pop("seed", None)
    if seed is None:
        _compare(q, k, v, impl=impl, enable_gqa=True, **options)
    _compare_grads(q, k, v, impl=impl, **options, **({} if seed is None else dict(seed=seed)))


@pytest.mark.parametrize("dim,v_dim", [(16, 16), (40, 40), (96, 96), (256, 256), (64, 32), (40, 72), (33, 17),
                                       (200, 256)])
@pytest.mark.parametrize("impl,dtype", BACKENDS, ids=IDS)
def test_gradients_per_head_dim(impl, dtype, dim, v_dim):
    """Every head-dim bucket of the CUDA kernels, partial buckets, v's head dim apart from q's and odd
    head dims (element-wise loads and stores)."""
    _compare_grads(*_cuda(*_qkv(2, 2, 1, 90, 150, dim, dtype, v_dim=v_dim)), impl=impl, causal="bottom_right")


@pytest.mark.parametrize("impl,dtype", BACKENDS, ids=IDS)
def test_strided_inputs(impl, dtype):
    """(B, L, H, D) storage seen as (B, H, L, D), and a storage offset that breaks 16-byte alignment:
    the kernels' element-wise loads."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 77, 4, 64, generator=g).to("cuda", dtype).transpose(1, 2)
    k = torch.randn(2, 130, 2, 64, generator=g).to("cuda", dtype).transpose(1, 2)
    v = torch.randn(2 * 130 * 2 * 64 + 1, generator=g).to("cuda", dtype)[1:].view(2, 2, 130, 64)
    _compare(q, k, v, impl=impl, enable_gqa=True)
    _compare_grads(q, k, v, impl=impl, causal="top_left")


@pytest.mark.parametrize("impl,dtype", BACKENDS[:2] + BACKENDS[3:4], ids=IDS[:2] + IDS[3:4])
def test_offsets_past_two_to_the_31(impl, dtype):
    """k and v whose second batch starts 2^31 elements in: the kernels index in 64 bits."""
    big = torch.zeros(2**31 + 2 * 64 * 64, dtype=dtype, device="cuda")
    g = torch.Generator().manual_seed(9)
    k, v = (big.as_strided((2, 1, 64, 64), (2**31, 64 * 64, 64, 1), offset) for offset in (0, 64 * 64))
    for t in (k, v):
        t.copy_(torch.randn(t.shape, generator=g).to(dtype))
    q = torch.randn(2, 2, 33, 64, generator=g).to("cuda", dtype)
    _compare(q, k, v, impl=impl, enable_gqa=True)
    _compare_grads(q, k, v, impl=impl)


@pytest.mark.triton
def test_head_dims_past_the_fused_kernels(monkeypatch):
    """Over 256, impl='native' says why it cannot run and that Triton can, and auto runs Triton; over
    512 (Triton's), auto runs the reference."""
    q, k, v = _cuda(*_qkv(1, 2, 2, 20, 30, 320, torch.float16))
    with pytest.raises(TypeError, match="head dims up to 256, got 320; impl='triton' can"):
        genfast.attention(q, k, v, impl="native")
    taken = []
    fused = importlib.import_module("genfast.attention")._fused_backend
    monkeypatch.setattr(importlib.import_module("genfast.attention"), "_fused_backend",
                        lambda *args: taken.append(fused(*args)) or taken[-1])
    genfast.attention(q, k, v)
    wide = _cuda(*_qkv(1, 2, 2, 20, 30, 640, torch.float16))
    torch.testing.assert_close(genfast.attention(*wide), genfast.attention(*wide, impl="reference"))
    assert taken == ["triton", "reference", "reference"]


@pytest.mark.triton
@pytest.mark.parametrize("dim,v_dim", [(512, 512), (320, 320), (64, 512), (576, 512)])
@pytest.mark.parametrize("impl,dtype", BACKENDS[2:], ids=IDS[2:])
def test_triton_head_dims_past_256(impl, dtype, dim, v_dim):
    """Triton's bucket of 512 on the GPU, whose tiles are tuned for it (head dims that are multiples
    of 8: at 33 and 17 the 16-bit gradients failed on an H200, cause not found); 576 (DeepSeek's
    latent attention, 512 + 64) raises, naming the limit."""
    q, k, v = _cuda(*_qkv(2, 4, 2, 90, 150, dim, dtype, v_dim=v_dim))
    if dim > 512:
        with pytest.raises(ValueError, match="head dims up to 512"):
            genfast.attention(q, k, v, enable_gqa=True, impl=impl)
        return
    _compare(q, k, v, impl=impl, enable_gqa=True, causal="bottom_right")
    _compare_grads(q, k, v, impl=impl, causal="bottom_right")


# Keys in multiples of 16: the CUDA kernels copy a bool mask's blocks by cp.async (at 130, bytes).
@pytest.mark.parametrize("lk,dim", [(130, 32), (128, 128), (192, 64)])
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("impl,dtype", BACKENDS, ids=IDS)
def test_masks_and_their_gradients(impl, dtype, kind, lk, dim):
    q, k, v = _cuda(*_qkv(2, 2, 2, 70, lk, dim, dtype))
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(2, 1, 70, lk, generator=g) < 0.7 if kind == "bool" else torch.randn(2, 1, 70, lk, generator=g)
    mask = mask.cuda() if kind == "bool" else mask.to("cuda", dtype)
    mask[..., 5, :] = False if kind == "bool" else float("-inf")  # a row that sees no key: zeros, finite grads
    _compare_grads(q, k, v, mask, impl=impl)


@pytest.mark.parametrize("shape", [(1, 4, 150, 140), (150, 140), (5, 1, 1, 140)])
@pytest.mark.parametrize("impl,dtype", BACKENDS, ids=IDS)
def test_mask_gradient_summed_in_chunks_of_batches(impl, dtype, shape, monkeypatch):
    """A broadcast mask's gradient, summed by the kernels over what it broadcasts over (dS a chunk of
    batches at a time; one batch per chunk here on the Triton side), against the sum of the (B, H, Lq,
    Lk) gradient the mask expanded to that shape gets; q's, k's and v's gradients keep their bits."""
    if impl == "triton":
        monkeypatch.setattr(importlib.import_module("genfast.kernels.attention"), "MASK_GRAD_CHUNK_FLOATS", 1)
    q, k, v = _cuda(*_qkv(5, 4, 2, 150, 140, 64, dtype))
    mask = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to("cuda", dtype)
    grad_o = torch.randn(5, 4, 150, 64, device="cuda", dtype=dtype)

    def grads(expand):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, mask)]
        m = leaves[3].expand(5, 4, 150, 140) if expand else leaves[3]
        o = genfast.attention(*leaves[:3], m, enable_gqa=True, impl=impl, dropout_p=0.1, deterministic=True,
                              generator=genfast.PhiloxGenerator(5))
        return torch.autograd.grad(o, leaves + [m] if expand else leaves, grad_o)

    summed, expanded = grads(False), grads(True)
    assert all(torch.equal(a, b) for a, b in zip(summed[:3], expanded[:3]))
    assert summed[3].shape == mask.shape
    # The kernels sum dS in float32 and round once; the expanded gradient's terms were each rounded
    # to the dtype before torch summed them: they differ by at most a rounding unit of each term, the
    # two float32 sums' accumulated rounding and one rounding of each (a missing or doubled chunk moves
    # whole terms).
    unit, unit32 = torch.finfo(dtype).eps / 2, torch.finfo(torch.float32).eps / 2
    count = expanded[4].numel() // mask.numel()
    terms = expanded[4].float().abs().sum_to_size(mask.shape)
    bound = (unit + 2 * count * unit32) * terms + 2 * unit * expanded[3].float().abs()
    assert bool(((summed[3].float() - expanded[3].float()).abs() <= bound).all())


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("impl,dtype", BACKENDS, ids=IDS)
def test_block_sparse_masks(impl, dtype, kind):
    """Masks hiding whole key blocks, which the CUDA kernels skip, beside blocks kept whole or in
    part (test_attention._block_sparse_mask), forward and backward; a NaN in a hidden block's
    additive bias still reaches its row."""
    q, k, v = _cuda(*_qkv(2, 3, 1, 300, 350, 64, dtype))
    mask = _block_sparse_mask(2, 3, 300, 350, kind).cuda()
    mask = mask if kind == "bool" else mask.to(dtype)
    _compare(q, k, v, impl=impl, attn_mask=mask, enable_gqa=True)
    _compare_grads(q, k, v, mask, impl=impl)
    if kind == "float":
        mask[1, 2, 10, 349] = float("nan")
        o = genfast.attention(q, k, v, mask, enable_gqa=True, impl=impl)
        assert bool(o[1, 2, 10].isnan().all()) and not bool(o[1, 2, 9].isnan().any())


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("impl,dtype", BACKENDS, ids=IDS)
def test_keys_a_mask_hides_whole_are_not_read(impl, dtype, kind):
    check_hidden_keys_not_read(impl, kind, dtype, "cuda", grads=impl == "native")


@pytest.mark.parametrize("lq", [1, 4, 300])
@pytest.mark.parametrize("impl,dtype", BACKENDS, ids=IDS)
def test_attention_sinks(impl, dtype, lq):
    """Sinks joined where a row finishes (tiles of one head), or where split rows are combined (a few
    queries of grouped heads against a long cache); a bool mask hides row 2 whole."""
    q, k, v, sinks = sink_inputs(2, 8, 2, lq, 1000, 128, dtype, device="cuda")
    mask = torch.ones(2, 1, lq, 1000, dtype=torch.bool, device="cuda")
    mask[:, :, 2:3] = False
    compare_with_sinks(impl, q, k, v, sinks, mask, causal="bottom_right")
    compare_with_sinks(impl, q, k, v, sinks, mask.half() * 0.5 if dtype == torch.float32 else mask.to(dtype) * 0.5,
                       window=(200, 0))


@pytest.mark.parametrize("impl,dtype", BACKENDS, ids=IDS)
def test_seqused_k_decoding_from_a_padded_cache(impl, dtype):
    """A few queries of grouped heads against a padded cache of 1024 keys a sequence (the plans split
    the keys), NaN past each sequence's keys; a longer prefill beside them."""
    *args, seqused_k = cache_inputs([1000, 0, 1, 513], [1, 4, 1, 300], cache=1024, heads=8, kv_heads=2, dim=128,
                                    dtype=dtype, device="cuda", unused=0.0)
    _compare_varlen(impl, args, seqused_k=seqused_k, causal="bottom_right")
    q, k, v, cu_q, cu_k, mq, mk, seqused_k = cache_inputs([1000, 0, 1, 513], [1, 4, 1, 300], cache=1024, heads=8,
                                                          kv_heads=2, dim=128, dtype=dtype, device="cuda")
    o = genfast.attention_varlen(q, k, v, cu_q, cu_k, mq, mk, causal="bottom_right", seqused_k=seqused_k, impl=impl)
    assert o.isfinite().all()
    # max_seqlen_k = max(seqused_k), below the rows, as FlashAttention 3 takes it; 0 where all are 0.
    below = genfast.attention_varlen(q, k, v, cu_q, cu_k, mq, 1000, causal="bottom_right", seqused_k=seqused_k,
                                     impl=impl)
    close = 1e-5 if dtype == torch.float32 else 1e-2  # the plans may split the keys otherwise
    torch.testing.assert_close(below, o, atol=close, rtol=close)
    none_used = torch.zeros_like(seqused_k)
    o, lse = genfast.attention_varlen(q, k, v, cu_q, cu_k, mq, 0, seqused_k=none_used, return_lse=True, impl=impl)
    assert torch.equal(o, torch.zeros_like(o)) and bool((lse == float("-inf")).all())


@pytest.mark.parametrize("impl,dtype", BACKENDS, ids=IDS)
def test_decoding_from_a_paged_cache(impl, dtype):
    """Grouped heads decoding from pages of 256 keys in shuffled order (NaN in the rows no key fills
    and in the page that unused table entries name), a prefill beside them, and pages shared."""
    args = paged_inputs([1, 4, 1, 300], [1000, 7, 1, 513], page_size=256, heads=8, kv_heads=2, dim=128,
                        dtype=dtype, device="cuda")
    compare_paged(impl, args, causal="bottom_right")
    compare_paged(impl, paged_inputs([1, 1, 1], [2000, 300, 1], page_size=128, heads=32, kv_heads=8, dim=128,
                                     dtype=dtype, device="cuda", shared_first_page=True, seed=1))


@pytest.mark.parametrize("page_size", [1, 16, 80])
@pytest.mark.parametrize("impl,dtype", BACKENDS, ids=IDS)
def test_decoding_from_small_pages(impl, dtype, page_size):
    """Key blocks across pages (each key's page looked up): decoding with grouped heads and a prefill."""
    compare_paged(impl, paged_inputs([1, 1, 200, 1], [1500, 300, 260, 1], page_size=page_size, heads=16, kv_heads=4,
                                     dim=128, dtype=dtype, device="cuda", shared_first_page=True, seed=2),
                  causal="bottom_right")


@pytest.mark.parametrize("impl,dtype", BACKENDS, ids=IDS)
def test_nan_propagates(impl, dtype):
    q, k, v = _cuda(*_qkv(1, 2, 2, 40, 40, 64, dtype))
    q[0, 1, 7, 3] = float("nan")
    o = genfast.attention(q, k, v, impl=impl)
    assert bool(o[0, 1, 7].isnan().all()) and not bool(o[0, 0].isnan().any())
    # A NaN score among finite ones: the GPU's max instructions skip NaN unless asked not to.
    k[0, 0, 20, 3] = float("nan")
    o = genfast.attention(q, k, v, impl=impl)
    assert bool(o[0, 0].isnan().all())


@pytest.mark.parametrize("impl,dtype", BACKENDS, ids=IDS)
def test_long_causal(impl, dtype):
    _compare(*_cuda(*_qkv(1, 4, 4, 4096, 4096, 128, dtype)), impl=impl, causal="top_left")


@pytest.mark.parametrize("impl,dtype", BACKENDS, ids=IDS)
def test_varlen(impl, dtype):
    _compare_varlen(impl, _packed(LENGTHS_Q, LENGTHS_K, dim=64, dtype=dtype, device="cuda"), causal="bottom_right")
    _compare_varlen(impl, _packed([300, 1, 700], [900, 2, 700], dim=128, dtype=dtype, device="cuda"),
                    window=(100, 0), dropout_p=0.1, seed=2)


@pytest.mark.parametrize("lq", [1, 4, 16])
@pytest.mark.parametrize("impl,dtype", BACKENDS, ids=IDS)
def test_decoding_with_grouped_heads(impl, dtype, lq):
    """A few queries at the end of a long KV cache (bottom-right causal), 4 query heads per key head:
    the kernels stack a group's heads in one tile and split the keys over the GPU, then combine."""
    q, k, v = _cuda(*_qkv(2, 16, 4, lq, 4099, 128, dtype))
    _compare(q, k, v, impl=impl, enable_gqa=True, causal="bottom_right")
    slopes = torch.linspace(0.01, 0.3, 16, device="cuda")
    _compare(q, k, v, impl=impl, enable_gqa=True, causal="bottom_right", alibi_slopes=slopes, softcap=20.0)
    _compare_grads(*_cuda(*_qkv(1, 8, 2, lq, 700, 64, dtype)), impl=impl, causal="bottom_right",
                   alibi_slopes=slopes[:8], dropout_p=0.1, seed=3)


@pytest.mark.parametrize("ask", ["keyword", "torch"])
@pytest.mark.parametrize("impl,dtype", BACKENDS, ids=IDS)
def test_backward_is_bit_reproducible(impl, dtype, ask):
    """deterministic=True, or torch.use_deterministic_algorithms(True): no atomics, the same bits."""
    q, k, v = _cuda(*_qkv(2, 8, 2, 300, 500, 64, dtype))
    previous = torch.are_deterministic_algorithms_enabled()
    results = []
    try:
        torch.use_deterministic_algorithms(ask == "torch")
        for _ in range(2):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            o = genfast.attention(*leaves, enable_gqa=True, causal="bottom_right", impl=impl,
                                  deterministic=ask == "keyword")
            results.append(torch.autograd.grad(o.float().square().sum(), leaves))
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("impl,dtype", BACKENDS, ids=IDS)
def test_deterministic_and_atomic_gradients(impl, dtype, dim, monkeypatch):
    """Both ways of computing dQ: its own pass, and atomics in the key-block pass (CUDA's default,
    Triton's with GENFAST_TRITON_ATOMIC_DQ=1)."""
    monkeypatch.setenv("GENFAST_TRITON_ATOMIC_DQ", "1")
    q, k, v = _cuda(*_qkv(2, 4, 2, 300, 260, dim, dtype))
    for deterministic in (True, False):
        _compare_grads(q, k, v, impl=impl, causal="bottom_right", softcap=30.0, dropout_p=0.1, seed=5,
                       deterministic=deterministic)


@pytest.mark.cuda
def test_dropout_under_cuda_graph_capture_needs_a_philox_generator():
    """torch's CUDA generators cannot be read while capturing: a clear error naming
    genfast.PhiloxGenerator, with which the capture works (every replay the same mask)."""
    q, k, v = (torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    genfast.attention(q, k, v, dropout_p=0.1)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="PhiloxGenerator"):
        with torch.cuda.graph(graph):
            genfast.attention(q, k, v, dropout_p=0.1)
    generator = genfast.PhiloxGenerator(5)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o = genfast.attention(q, k, v, dropout_p=0.1, generator=generator)
    graph.replay()
    first = o.clone()
    graph.replay()
    torch.testing.assert_close(o, first, rtol=0, atol=0)


@pytest.mark.parametrize("impl,dtype", BACKENDS, ids=IDS)
def test_cuda_graph_capture(impl, dtype):
    """No host-device synchronization: the forward and backward replay in a CUDA graph."""
    q, k, v = _cuda(*_qkv(2, 4, 4, 200, 200, 64, dtype))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def step():
        o = genfast.attention(*leaves, causal="top_left", impl=impl)
        return (o, *torch.autograd.grad(o.float().sum(), leaves))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        eager = step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, e in zip(captured, eager):
        torch.testing.assert_close(a, e)


def test_native_float32_names_the_backend():
    q, k, v = _cuda(*_qkv(1, 2, 2, 8, 8, 16, torch.float32))
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        genfast.attention(q, k, v, impl="native")
    o = genfast.attention(q, k, v)  # auto: Triton
    torch.testing.assert_close(o, genfast.attention(q, k, v, impl="reference"), atol=1e-5, rtol=1e-5)
