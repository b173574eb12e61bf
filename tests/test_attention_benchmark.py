"""The attention benchmark's FlashAttention peers, through a stand-in module with FlashAttention's
layouts ((batch, length, heads, dim), packed (total, heads, dim)) built on torch SDPA: the peers
hand it the benchmark's tensors in its layout and return SDPA's result. And the decoding rows: every
peer timed on one query against a grouped-query KV cache. And the Hopper candidate's opt-in, scoped
to each call."""

import importlib
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from genfast.benchmarks import attention as bench
from genfast.benchmarks import timing
from conftest import one_call_time_ms


@pytest.fixture
def one_call_timer(monkeypatch):
    monkeypatch.setattr(timing, "time_ms", one_call_time_ms)


@pytest.fixture
def attention_calls(monkeypatch):
    """The options of each call the benchmark makes to genfast.attention; torch.compile made eager
    (its compiles take seconds to minutes here)."""
    calls = []
    real_attention = bench.attention

    def attention(q, k, v, **options):
        calls.append(options)
        return real_attention(q, k, v, **options)

    monkeypatch.setattr(bench, "attention", attention)
    monkeypatch.setattr(bench.torch, "compile", lambda fn, **options: fn)
    return calls


def _stand_in():
    module = types.ModuleType("flash_attn")

    def flash_attn_func(q, k, v, causal=False):
        assert q.dim() == 4 and q.stride(-1) == 1
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
        return o.transpose(1, 2)

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=False):
        assert q.dim() == 3
        assert (max_q, max_k) == tuple(int((cu[1:] - cu[:-1]).max()) for cu in (cu_q, cu_k))
        outs = []
        for a, b, c, d in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
            # causal: from the sequence's bottom-right corner, as FlashAttention aligns it
            mask = torch.ones(b - a, d - c, dtype=torch.bool).tril(d - c - (b - a)) if causal else None
            outs.append(F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[c:d].transpose(0, 1),
                                                       v[c:d].transpose(0, 1), attn_mask=mask, enable_gqa=True))
        return torch.cat([o.transpose(0, 1) for o in outs]), None  # (out, lse), as FlashAttention-3 returns

    module.flash_attn_func = flash_attn_func
    module.flash_attn_varlen_func = flash_attn_varlen_func
    return module


def test_flash_attention_peers_take_and_give_sdpa_layouts(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", _stand_in())
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)  # not installed
    assert bench.flash_attention_peers("cpu") == []
    (name, dense, varlen), = bench.flash_attention_peers("cuda")
    assert name == "FlashAttention-2"
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 16, generator=g) for _ in range(3))
    torch.testing.assert_close(dense(q, k, v, True), F.scaled_dot_product_attention(q, k, v, is_causal=True))
    lengths = [7, 20, 13]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    packed = [torch.randn(sum(lengths), 3, 16, generator=g) for _ in range(3)]
    got = varlen(*packed, cu, max(lengths))
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        expected = F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in packed), is_causal=True)
        torch.testing.assert_close(got[a:b], expected.transpose(0, 1))


def test_continuous_batching_rows_time_each_paged_implementation_on_one_step(monkeypatch):
    """A step of decoding sequences beside a prompt's chunk, from a paged cache: every implementation
    computes the same attention from the same keys (transformers' paged|eager under the step's mask
    as the yardstick; genfast through a block table over the pages), FlashAttention's varlen given
    the keys' own cumulative lengths."""
    pytest.importorskip("transformers")
    for module in ("genfast.integrations.transformers", "transformers.integrations.sdpa_paged",
                   "transformers.integrations.eager_paged", "transformers.generation.continuous_batching.utils"):
        importlib.import_module(module)  # before the stand-in, which transformers' import checks would reject
    monkeypatch.setitem(bench.CONTINUOUS_BATCHING_CONFIGS, "cpu", (4, 2, 16, [30, 5, 17], (6, 9)))
    monkeypatch.setattr(bench, "CONTINUOUS_BATCHING_PAGE_SIZE", 8)  # sequences over several pages
    monkeypatch.setitem(sys.modules, "flash_attn", _stand_in())
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    real_peers = bench.flash_attention_peers
    monkeypatch.setattr(bench, "flash_attention_peers", lambda device: real_peers("cuda"))
    outputs, timed = {}, []

    def time_once(fn, device, quick=False, min_run_time=None):
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        outputs[timed[-1]] = out.reshape(-1, 4, 16)  # (total_q, heads, dim) whatever the layout
        return {"median_ms": 2.0, "p20_ms": 2.0, "p80_ms": 2.0}

    monkeypatch.setattr(timing, "time_ms", time_once)
    rows = bench._continuous_batching_rows("cpu", torch.float32, gemm=1.0, quick=True,
                                           say=lambda message: timed.append(message.split(": ")[1].split(",")[0]))
    names = [row["impl"] for row in rows]
    assert sorted(names) == sorted([f"genfast {impl}" for impl in bench.fused_impls("cpu")]
                                   + ["transformers paged|sdpa", "transformers paged|eager", "FlashAttention-2"])
    assert {row["config"] for row in rows} == {"H=4 H_kv=2 D=16 decoding=3 keys=52 chunk=6+9 pages=8"}
    scores = 30 + 5 + 17 + 6 * 9 + 6 * 7 // 2
    for row in rows:
        assert row["variant"] == "attention continuous batching step"
        assert row["gflop_per_s"] == pytest.approx(4 * 4 * 16 * scores / 2e-3 / 1e9)
    assert outputs["transformers paged|eager"].shape == (3 + 6, 4, 16)
    for name in names:
        torch.testing.assert_close(outputs[name], outputs["transformers paged|eager"], msg=name)


def test_generate_batch_rows_time_the_one_line_change(monkeypatch, one_call_timer):
    """A whole generate_batch of a small Llama-style model: "genfast" per fused backend and
    "paged|sdpa", each generating the same tokens for every prompt, with the model's FLOPs."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("psutil")
    monkeypatch.setitem(bench.GENERATE_BATCH_CONFIGS, "cpu", (32, 1, 4, 2, 3, (5, 20), 4, 16))
    real, calls = transformers.LlamaForCausalLM.generate_batch, []

    def generate_batch(model, inputs, **kwargs):
        outputs = real(model, inputs=inputs, **kwargs)
        calls.append((inputs, {key: output.generated_tokens for key, output in outputs.items()}))
        return outputs

    monkeypatch.setattr(transformers.LlamaForCausalLM, "generate_batch", generate_batch)
    rows = bench._generate_batch_rows("cpu", torch.float32, gemm=1.0, quick=True, say=lambda message: None)
    assert [row["impl"] for row in rows] == [f"genfast {impl}" for impl in bench.fused_impls("cpu")] + [
        "transformers paged|sdpa"]
    inputs, tokens = calls[0]
    assert len(inputs) == 3 and all(5 <= len(prompt) <= 20 for prompt in inputs)
    assert all(call == (inputs, tokens) for call in calls) and all(len(t) == 4 for t in tokens.values())
    weights = 2 * 32 * 32 + 2 * 32 * 2 * 8 + 3 * 32 * 64  # hidden 32, 2 key heads of 8, FFN 64
    through = sum(len(prompt) + 3 for prompt in inputs)
    scores = sum((len(prompt) + 3) * (len(prompt) + 4) // 2 for prompt in inputs)
    flops = 2 * weights * through + 2 * 32 * 1000 * 3 * 4 + 4 * 4 * 8 * scores
    assert all(row["gflop_per_s"] == pytest.approx(flops / 2e-3 / 1e9) for row in rows)


def test_decode_rows_time_every_peer_on_a_grouped_query_cache(monkeypatch):
    monkeypatch.setitem(bench.DECODE_CONFIGS, "cpu", (2, 4, 2, 40, 16))
    calls = []
    real_attention = bench.attention

    def attention(q, k, v, **options):  # the benchmark's tensors: one query, fewer K/V heads
        calls.append((q.shape, k.shape, options))
        return real_attention(q, k, v, **options)

    monkeypatch.setattr(bench, "attention", attention)
    rows = bench._decode_rows("cpu", torch.float32, gemm=1.0, quick=True, say=lambda message: None)
    names = {row["impl"] for row in rows}
    assert {"eager reference", "torch SDPA math"} <= names
    assert {f"genfast {impl}" for impl in bench.fused_impls("cpu")} <= names
    assert all(row["variant"] == "attention decode" and row["config"] == "B=2 H=4 H_kv=2 Lk=40 D=16" for row in rows)
    for row in rows:
        assert row["gflop_per_s"] == pytest.approx(4 * 2 * 4 * 40 * 16 / (row["median_ms"] * 1e-3) / 1e9)
    assert ((2, 4, 1, 16), (2, 2, 40, 16)) in [(tuple(q), tuple(k)) for q, k, _ in calls]
    assert all(options["enable_gqa"] for _, _, options in calls)
    small = bench._decode_rows("cpu", torch.float32, gemm=1.0, quick=True, say=lambda message: None,
                               config=(1, 3, 3, 20, 8))
    assert {row["config"] for row in small} == {"B=1 H=3 H_kv=3 Lk=20 D=8"}
    assert {row["impl"] for row in small} == names


def test_kvcache_step_rows_give_every_peer_the_same_step(monkeypatch):
    """A decoding step of flash_attn_with_kvcache: genfast's (padded and paged caches), a
    FlashAttention stand-in on the reference, SDPA's rotation, cache write and masked attention
    (and its torch.compile, made eager here) all give the eager reference's output; and the
    append alone, genfast.kvcache_append against the same torch ops, their compile and the
    reference, gives the reference's turned queries."""
    from genfast.reference.attention_kvcache import kvcache_attention

    monkeypatch.setitem(bench.CACHE_DECODE_CONFIGS, "cpu", (3, 4, 2, 512, 16))
    stand_in = types.ModuleType("flash_attn")
    stand_in.flash_attn_with_kvcache = lambda q, k_cache, v_cache, k, v, **options: kvcache_attention(
        q, k_cache, v_cache, k, v, **options)
    monkeypatch.setitem(sys.modules, "flash_attn", stand_in)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    real_peers = bench.flash_attention_kvcache_peers
    monkeypatch.setattr(bench, "flash_attention_kvcache_peers", lambda device: real_peers("cuda"))
    monkeypatch.setattr(bench.torch, "compile", lambda fn, **options: fn)
    outputs, timed = {}, []

    def time_once(fn, device, quick=False, min_run_time=None):
        outputs[timed[-1]] = fn()
        return {"median_ms": 2.0, "p20_ms": 2.0, "p80_ms": 2.0}

    monkeypatch.setattr(timing, "time_ms", time_once)
    rows = bench._kvcache_step_rows("cpu", torch.float32, gemm=1.0, quick=True,
                                    say=lambda message: timed.append(tuple(message.split(": ")[1].split(", ")[:2])))
    impls = bench.fused_impls("cpu")
    step, append = "attention decode flash_attn_with_kvcache", "kvcache append, rotary"
    assert {row["impl"] for row in rows if row["variant"] == step} == (
        {f"genfast {impl}" for impl in impls} | {f"genfast {impl} paged 256" for impl in impls}
        | {"FlashAttention-2", "torch SDPA flash", "torch SDPA math", "torch.compile SDPA flash",
           "torch.compile SDPA math", "eager reference"})
    assert {row["impl"] for row in rows if row["variant"] == append} == (
        {f"genfast {impl}" for impl in impls} | {"torch ops", "torch.compile torch ops", "eager reference"})
    used = [512, 64, 256]
    assert {row["config"] for row in rows} == {"B=3 H=4 H_kv=2 Lk=512 used=512/64/256 D=16 rotary=16"}
    for row in rows:
        flops = 4 * 4 * 16 * sum(used) if row["variant"] == step else 6 * 3 * (4 + 2) * 16 // 2
        assert row["gflop_per_s"] == pytest.approx(flops / 2e-3 / 1e9)
    for (name, variant), out in outputs.items():
        assert out.shape == (3, 1, 4, 16)
        torch.testing.assert_close(out, outputs[("eager reference", variant)], atol=2e-5, rtol=2e-5,
                                   msg=f"{name}, {variant}")


def test_decode_rows_time_a_bfloat16_cache_on_the_cpu(monkeypatch, one_call_timer):
    """The CPU decoding rows in bfloat16 too: the native kernel reads such a cache as it is."""
    monkeypatch.setitem(bench.DECODE_CONFIGS, "cpu", (1, 4, 2, 40, 16))
    rows = bench._decode_rows("cpu", torch.bfloat16, gemm=1.0, quick=True, say=lambda message: None)
    assert {row["dtype"] for row in rows} == {"bfloat16"}
    assert {"genfast native", "torch SDPA flash", "eager reference"} <= {row["impl"] for row in rows} | (
        set() if "native" in bench.fused_impls("cpu") else {"genfast native"})


def test_dropout_rows_time_the_peers_that_have_dropout(monkeypatch, one_call_timer, attention_calls):
    monkeypatch.setitem(bench.DROPOUT_CONFIGS, "cpu", (1, 2, 40, 16, False))
    monkeypatch.setitem(sys.modules, "flash_attn", _stand_in())  # no dropout_p: left out
    rows = bench._dropout_rows("cpu", torch.float32, gemm=1.0, quick=True, say=lambda message: None)
    names = {row["impl"] for row in rows}
    # SDPA's CPU flash kernel has no dropout; its math path has.
    assert names == {*(f"genfast {impl}" for impl in bench.fused_impls("cpu")), "torch SDPA math",
                     "eager reference", "torch.compile SDPA"}
    assert {row["variant"] for row in rows} == {"attention forward dropout 0.1",
                                                "attention forward+backward dropout 0.1"}
    assert attention_calls and all(options["dropout_p"] == 0.1 for options in attention_calls)


def _assert_mask_layer_rows(rows, own, config, forward_variant, kept):
    """A layer given as a mask (bench._mask_layer): genfast's `own` form and its mask, and every mask
    peer, in both groups, FlexAttention in the forward's (it has no backward on the CPU); the
    config; the forward's FLOPs those of the `kept` scores of each of the 2 heads, at head dim 16,
    for the one-call timer's 2 ms."""
    impls = bench.fused_impls("cpu")
    peers = {*(f"genfast {impl} {own}" for impl in impls), *(f"genfast {impl} mask" for impl in impls),
             "torch SDPA flash", "torch SDPA math", "eager reference", "torch.compile reference"}
    assert {row["impl"] for row in rows if "backward" in row["variant"]} == peers
    assert {row["impl"] for row in rows if "backward" not in row["variant"]} == peers | {"FlexAttention"}
    assert all(row["config"] == config for row in rows)
    for row in rows:
        if row["variant"] == forward_variant:
            assert row["gflop_per_s"] == pytest.approx(4 * 2 * kept * 16 / 2e-3 / 1e9)


def test_sliding_mask_rows_give_every_peer_the_window_as_a_mask(monkeypatch, one_call_timer):
    monkeypatch.setitem(bench.SLIDING_MASK_CONFIGS, "cpu", (1, 2, 40, 16, 6))
    calls = []
    real_attention = bench.attention

    def attention(q, k, v, mask=None, **options):
        calls.append((mask, options))
        return real_attention(q, k, v, mask, **options)

    monkeypatch.setattr(bench, "attention", attention)
    monkeypatch.setattr(bench.torch, "compile", lambda fn, **options: fn)
    rows = bench._sliding_mask_rows("cpu", torch.float32, gemm=1.0, quick=True, say=lambda message: None)
    kept = 6 * 40 - 15  # row i keeps min(i + 1, 6) keys
    _assert_mask_layer_rows(rows, "band", "B=1 H=2 L=40 D=16 window=6", "attention forward sliding-window mask", kept)
    masks = [mask for mask, options in calls if mask is not None and mask.shape[-1] == 40]
    bands = [options for mask, options in calls if mask is None]
    assert masks and bands and all(options == dict(causal="top_left", window=(5, 0), impl=options["impl"])
                                   for options in bands)
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    band = real_attention(q, k, v, causal="top_left", window=(5, 0))
    torch.testing.assert_close(real_attention(q, k, v, masks[0]), band)


def test_chunked_rows_give_every_peer_the_chunks(monkeypatch, one_call_timer):
    """genfast's attention_chunk and every peer's mask stand for the same layer: the mask the peers
    get gives what attention_chunk does; the FLOPs are those of the keys the chunks keep."""
    monkeypatch.setitem(bench.CHUNKED_CONFIGS, "cpu", (1, 2, 40, 16, 12))
    masks = []
    real_sdpa = bench.F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, **options):
        masks.append(attn_mask)
        return real_sdpa(q, k, v, attn_mask=attn_mask, **options)

    monkeypatch.setattr(bench.F, "scaled_dot_product_attention", sdpa)
    monkeypatch.setattr(bench.torch, "compile", lambda fn, **options: fn)
    rows = bench._chunked_rows("cpu", torch.float32, gemm=1.0, quick=True, say=lambda message: None)
    kept = 3 * (12 * 13 // 2) + 4 * 5 // 2  # chunks of 12, 12, 12 and 4 keys, causal in each
    _assert_mask_layer_rows(rows, "attention_chunk", "B=1 H=2 L=40 D=16 chunk=12", "attention forward chunked causal",
                            kept)
    mask = next(m for m in masks if m is not None and m.shape[-1] == 40)
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    from genfast.integrations.flash_attn_interface import flash_attn_func
    chunked = flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), causal=True, attention_chunk=12)
    torch.testing.assert_close(real_sdpa(q, k, v, attn_mask=mask), chunked.transpose(1, 2))


def test_bias_rows_give_every_peer_the_bias_in_the_inputs_dtype(monkeypatch, one_call_timer):
    monkeypatch.setitem(bench.BIAS_CONFIGS, "cpu", (1, 2, 40, 16))
    masks = []
    real_attention = bench.attention

    def attention(q, k, v, mask=None, **options):
        masks.append(mask)
        return real_attention(q, k, v, mask, **options)

    monkeypatch.setattr(bench, "attention", attention)
    monkeypatch.setattr(bench.torch, "compile", lambda fn, **options: fn)
    rows = bench._bias_rows("cpu", torch.bfloat16, gemm=1.0, quick=True, say=lambda message: None)
    peers = {*(f"genfast {impl}" for impl in bench.fused_impls("cpu")), "torch SDPA flash", "torch SDPA math",
             "eager reference", "torch.compile reference"}
    assert {row["impl"] for row in rows if row["variant"] == "attention forward+backward additive bias"} == peers
    # FlexAttention has no backward on the CPU, SDPA's CPU flash kernel no gradient for the mask.
    assert {row["impl"] for row in rows if "backward" not in row["variant"]} == peers | {"FlexAttention"}
    with_grad = {row["impl"] for row in rows if row["variant"].endswith("and its gradient")}
    assert with_grad == peers - {"torch SDPA flash"}
    assert all(row["config"] == "B=1 H=2 L=40 D=16 bias (1, H, L, L)" and row["dtype"] == "bfloat16" for row in rows)
    full = [mask for mask in masks if mask is not None and mask.shape[-1] == 40]
    assert full and all(mask.shape == (1, 2, 40, 40) and mask.dtype == torch.bfloat16 for mask in full)
    assert any(mask.requires_grad for mask in full) and not all(mask.requires_grad for mask in full)


def test_wide_head_rows_time_every_peer_that_takes_the_head_dim(monkeypatch, one_call_timer, attention_calls):
    monkeypatch.setitem(bench.WIDE_HEAD_CONFIGS, "cpu", (1, 1, 40, 320))
    rows = bench._wide_head_rows("cpu", torch.float32, gemm=1.0, quick=True, say=lambda message: None)
    peers = {*(f"genfast {impl}" for impl in bench.fused_impls("cpu")), "torch SDPA flash", "torch SDPA math",
             "eager reference", "torch.compile reference"}
    for variant in ("attention forward wide head", "attention forward+backward wide head"):
        assert {row["impl"] for row in rows if row["variant"] == variant} == peers
    assert all(row["config"] == "B=1 H=1 L=40 D=320" and row["dtype"] == "float32" for row in rows)
    assert attention_calls and all(options == {"impl": options["impl"]} for options in attention_calls)


def test_bfloat16_rows_time_every_peer_in_bfloat16_on_the_cpu(monkeypatch, one_call_timer, attention_calls):
    """The first CPU configuration again in bfloat16, where the CPU kernel multiplies in bfloat16
    pairs or AMX tiles."""
    monkeypatch.setitem(bench.CONFIGS, "cpu", [(1, 2, 40, 16, False)])
    rows = bench._bfloat16_rows("cpu", gemm=1.0, quick=True, say=lambda message: None)
    peers = {*(f"genfast {impl}" for impl in bench.fused_impls("cpu")), "torch SDPA flash", "torch SDPA math",
             "eager reference", "torch.compile reference"}
    for variant in ("attention forward", "attention forward+backward"):
        assert {row["impl"] for row in rows if row["variant"] == variant} == peers
    assert all(row["config"] == "B=1 H=2 L=40 D=16" and row["dtype"] == "bfloat16" for row in rows)
    assert attention_calls and all(options == {"impl": options["impl"]} for options in attention_calls)


def test_cross_rows_time_every_peer_on_few_keys(monkeypatch, one_call_timer, attention_calls):
    monkeypatch.setitem(bench.CROSS_CONFIGS, "cpu", (2, 2, 40, 7, 16))
    shapes = []
    real_sdpa = bench.F.scaled_dot_product_attention

    def sdpa(q, k, v, **options):
        shapes.append((tuple(q.shape), tuple(k.shape)))
        return real_sdpa(q, k, v, **options)

    monkeypatch.setattr(bench.F, "scaled_dot_product_attention", sdpa)
    rows = bench._cross_rows("cpu", torch.float32, gemm=1.0, quick=True, say=lambda message: None)
    peers = {*(f"genfast {impl}" for impl in bench.fused_impls("cpu")), "torch SDPA flash", "torch SDPA math",
             "eager reference", "torch.compile reference"}
    for variant in ("attention forward cross", "attention forward+backward cross"):
        assert {row["impl"] for row in rows if row["variant"] == variant} == peers
    assert all(row["config"] == "B=2 H=2 Lq=40 Lk=7 D=16" for row in rows)
    for row in rows:
        flops = 4 * 2 * 2 * 40 * 7 * 16 * (3.5 if "backward" in row["variant"] else 1)
        assert row["gflop_per_s"] == pytest.approx(flops / 2e-3 / 1e9)
    assert ((2, 2, 40, 16), (2, 2, 7, 16)) in shapes
    assert attention_calls and all(options == {"impl": options["impl"]} for options in attention_calls)


def test_varlen_rows_time_packed_and_padded_peers(one_call_timer, attention_calls):
    lengths = [20, 7, 13]
    rows = bench._varlen_rows("cpu", torch.float32, 2, 16, lengths, gemm=1.0, quick=True, say=lambda message: None)
    impls = bench.fused_impls("cpu")
    peers = {*(f"genfast {impl}" for impl in impls), *(f"genfast {impl} padded" for impl in impls),
             "torch SDPA per sequence", "torch SDPA padded"}
    for variant in ("attention varlen forward causal", "attention varlen forward+backward causal"):
        assert {row["impl"] for row in rows if row["variant"] == variant} == peers
    # genfast.attention on the padded batch, with the causal padding mask SDPA gets too.
    masks = [options["attn_mask"] for options in attention_calls]
    assert masks and all(mask.shape == (3, 1, 20, 20) for mask in masks)
    position = torch.arange(20)
    expected = (position[:, None] >= position[None, :]) & (position < torch.tensor(lengths)[:, None, None, None])
    assert torch.equal(masks[0], expected)


def test_soft_cap_rows_give_every_peer_the_cap(monkeypatch, one_call_timer, attention_calls):
    monkeypatch.setitem(bench.SOFT_CAP_CONFIGS, "cpu", (1, 2, 40, 16))
    rows = bench._soft_cap_rows("cpu", torch.float32, gemm=1.0, quick=True, say=lambda message: None)
    peers = {*(f"genfast {impl}" for impl in bench.fused_impls("cpu")), "eager reference", "torch.compile reference"}
    assert {row["impl"] for row in rows if row["variant"] == "attention forward+backward causal softcap 50"} == peers
    assert {row["impl"] for row in rows if row["variant"] == "attention forward causal softcap 50"} == peers | {
        "FlexAttention"}
    assert all(row["config"] == "B=1 H=2 L=40 D=16" for row in rows)
    for row in rows:  # causal: half of 4 B H L^2 D; the backward 2.5x the forward
        flops = 2 * 2 * 40 * 40 * 16 * (3.5 if "backward" in row["variant"] else 1)
        assert row["gflop_per_s"] == pytest.approx(flops / 2e-3 / 1e9)
    assert attention_calls and all(options["softcap"] == 50.0 and options["is_causal"] for options in attention_calls)


def test_sink_rows_give_every_peer_the_sinks(monkeypatch, one_call_timer, attention_calls):
    monkeypatch.setitem(bench.SINK_CONFIGS, "cpu", (1, 4, 2, 40, 16))
    rows = bench._sink_rows("cpu", torch.float32, gemm=1.0, quick=True, say=lambda message: None)
    impls = bench.fused_impls("cpu")
    peers = {*(f"genfast {impl}" for impl in impls), *(f"genfast {impl}, sinks joined afterwards" for impl in impls),
             "eager reference", "torch.compile reference"}
    for variant in ("attention forward causal sinks", "attention forward+backward causal sinks"):
        assert {row["impl"] for row in rows if row["variant"] == variant} == peers
    assert all(row["config"] == "B=1 H=4 Hk=2 L=40 D=16" for row in rows)
    fused = [options for options in attention_calls if "sinks" in options]
    joined = [options for options in attention_calls if options.get("return_lse")]
    assert fused and all(options["sinks"].shape == (4,) and options["is_causal"] for options in fused)
    assert joined and not any("sinks" in options for options in joined)
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 4, 40, 16, generator=g), torch.randn(1, 2, 40, 16, generator=g), torch.randn(1, 2, 40, 16,
                                                                                                       generator=g)
    sinks = torch.randn(4, generator=g)
    torch.testing.assert_close(bench._sinks_joined_afterwards(q, k, v, sinks, impls[0]),
                               bench.attention(q, k, v, is_causal=True, enable_gqa=True, sinks=sinks))


def test_flex_attention_peer_computes_the_reference(monkeypatch):
    from genfast.reference import attention as reference

    monkeypatch.setattr(bench.torch, "compile", lambda fn, **options: fn)  # eager: the same function, faster here
    cap = 3.0
    peer = bench.flex_attention_peer("cpu", 40, lambda b, h, i, j: (i >= j) & (i - j < 6),
                                     lambda score, b, h, i, j: cap * torch.tanh(score / cap))
    assert peer is not None
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 16, generator=g) for _ in range(3))
    torch.testing.assert_close(peer(q, k, v), reference.attention(q, k, v, causal="top_left", window=(5, 0),
                                                                  softcap=cap))


def test_flash_attention_peers_pass_the_soft_cap_only_when_asked(monkeypatch):
    seen = []
    module = types.ModuleType("flash_attn")
    module.flash_attn_func = lambda q, k, v, causal=False, **options: seen.append(options) or q
    module.flash_attn_varlen_func = None
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    (_, dense, _), = bench.flash_attention_peers("cuda")
    q = torch.randn(1, 2, 8, 16)
    dense(q, q, q, True)
    dense(q, q, q, True, softcap=30.0)
    dense(q, q, q, False, dropout_p=0.1)
    assert seen == [{}, {"softcap": 30.0}, {"dropout_p": 0.1}]


@pytest.mark.parametrize("before", [None, "0"])
def test_the_hopper_opt_in_lasts_one_call(monkeypatch, before):
    if before is None:
        monkeypatch.delenv("GENFAST_ATTENTION_SM90", raising=False)
    else:
        monkeypatch.setenv("GENFAST_ATTENTION_SM90", before)
    seen = bench.with_hopper(lambda x: (x, os.environ.get("GENFAST_ATTENTION_SM90")))(3)
    assert seen == (3, "1") and os.environ.get("GENFAST_ATTENTION_SM90") == before
    with pytest.raises(ZeroDivisionError):
        bench.with_hopper(lambda: 1 / 0)()
    assert os.environ.get("GENFAST_ATTENTION_SM90") == before
    assert not bench.hopper_available("cpu")


@pytest.mark.parametrize("setting", [None, "1", "0"])
def test_hopper_rows_are_left_out_when_turned_off(monkeypatch, setting):
    """On an sm_90 GPU with a build that has the Hopper kernels, their rows are timed unless
    GENFAST_ATTENTION_SM90=0 (what scripts/gpu-check sets when their tests did not pass)."""
    import genfast

    if setting is None:
        monkeypatch.delenv("GENFAST_ATTENTION_SM90", raising=False)
    else:
        monkeypatch.setenv("GENFAST_ATTENTION_SM90", setting)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *device: (9, 0))
    monkeypatch.setattr(genfast, "build_info", lambda: {"attention_sm90": True})
    assert bench.hopper_available("cuda") == (setting != "0")


def test_padded_cache_decode_rows_compute_one_attention(monkeypatch):
    """One query per sequence against a padded cache and the same keys paged: every candidate,
    FlashInfer's decode wrapper (genfast's drop-in, planned from the block table) among them,
    computes the eager reference's attention over each sequence's keys."""
    monkeypatch.setitem(bench.CACHE_DECODE_CONFIGS, "cpu", (3, 4, 2, 64, 16))
    monkeypatch.setattr(bench, "CACHE_PAGE_SIZES", (16, 8))  # sequences over several pages, the last partial
    outputs, timed = {}, []

    def time_once(fn, device, quick=False, min_run_time=None):
        outputs[timed[-1]] = fn().reshape(3, 4, 16)
        return {"median_ms": 2.0, "p20_ms": 2.0, "p80_ms": 2.0}

    monkeypatch.setattr(timing, "time_ms", time_once)
    rows = bench._cache_decode_rows("cpu", torch.float32, gemm=1.0, quick=True,
                                    say=lambda message: timed.append(message.split(": ")[1].split(",")[0]))
    names = [row["impl"] for row in rows]
    assert [f"genfast {impl} FlashInfer decode wrapper paged 8" for impl in bench.fused_impls("cpu")] == [
        name for name in names if "FlashInfer" in name]
    for name in names:
        torch.testing.assert_close(outputs[name], outputs["eager reference mask"], msg=name)


def test_a_candidates_environment_is_set_for_its_timed_backward_too():
    """with_environment (the Hopper rows' GENFAST_ATTENTION_SM90=1): a forward+backward entry sets
    it around the backward, which reads it at its launches, and restores it after."""
    seen = []

    class Recorded(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            seen.append(os.environ.get("GENFAST_TEST_BACKWARD_VARIABLE"))
            return grad

    fn = bench.with_environment(lambda q, k, v: Recorded.apply(q) + k + v, {"GENFAST_TEST_BACKWARD_VARIABLE": "on"})
    q = torch.randn(1, 1, 4, 8)
    leaves = [q.clone().requires_grad_() for _ in range(3)]
    groups = bench._forward_and_backward_groups("", 1.0, [("recorded", fn)], q, q, q, leaves, torch.ones_like(q))
    for _, entries in groups.values():
        for _, entry in entries:
            entry()
    assert seen == ["on"] and "GENFAST_TEST_BACKWARD_VARIABLE" not in os.environ


def test_probes_run_triton_untuned():
    """_supported's 8-token probe runs Triton's kernels untuned: autotuning keys on neither length,
    so a tile tuned there would serve the full-size rows."""
    seen = []
    q = torch.zeros(1, 1, 16, 8)
    assert bench._supported(lambda q, k, v: seen.append(os.environ.get("GENFAST_TRITON_AUTOTUNE")), q, q, q)
    assert seen == ["0"] and os.environ.get("GENFAST_TRITON_AUTOTUNE") != "0"


def test_rows_of_another_librarys_api_are_left_out_when_it_breaks(capsys):
    """transformers' continuous-batching rows use its private APIs: a version that changed them
    leaves those rows out, said on stderr, and the benchmark goes on."""
    def continuous_batching_rows(*args):
        raise TypeError("update() got an unexpected keyword argument 'read_index'")

    assert bench._rows_or_note(continuous_batching_rows, "cpu", torch.float32, 1.0, True, print) == []
    assert "continuous_batching_rows left out: TypeError" in capsys.readouterr().err
    assert bench._rows_or_note(lambda *args: [{"row": 1}], "cpu", torch.float32, 1.0, True, print) == [{"row": 1}]

    def genfast_failed(*args):  # genfast's own error is not left out
        raise bench.GenfastCandidateError("genfast native, a step: RuntimeError")

    with pytest.raises(bench.GenfastCandidateError):
        bench._rows_or_note(genfast_failed, "cpu", torch.float32, 1.0, True, print)
