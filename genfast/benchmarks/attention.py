"""Fused attention against its peers, forward and forward+backward.

Candidates: genfast's fused backends (on an sm_90 GPU also its CUDA Hopper kernels, which are
opt-in: GENFAST_ATTENTION_SM90=1; on a GPU the backward also with deterministic=True); torch's
scaled_dot_product_attention with each backend it has for the device (on the CPU its flash kernel
and its math path); FlashAttention 2 (flash_attn) and 3 (flash_attn_interface) where installed, on
a GPU; the eager reference (genfast.reference.attention); torch.compile of the reference. FLOPs:
forward 4 B H Lq Lk D, halved when causal; forward+backward 3.5x the forward (the backward 2.5x).
Dense (on the CPU in float32 and in bfloat16), packed variable-length and decoding (one query
against a grouped-query KV cache, on the CPU in float32 and in bfloat16; a padded cache of
sequences of other lengths, and the same keys paged, also through FlashInfer's decode wrapper
(genfast's drop-in, and FlashInfer's own where installed, on a GPU); a step of
flash_attn_with_kvcache, which appends a rotated key first) shapes;
in full runs also a small model's decoding step, one layer's attention in a step of transformers'
continuous batching (decoding sequences beside a prompt's chunk; peers transformers' paged|sdpa and
paged|eager, FlashAttention's varlen where installed) and a whole generate_batch of a small
Llama-style model (against paged|sdpa and FlashAttention 2), dense with dropout, a sliding-window
layer given its window as a mask, a chunked causal layer (Llama 4's attention_chunk), a soft-capped
causal layer and a layer adding a bfloat16 (on a GPU, the inputs' dtype) relative-position bias
(whose forward+backward is timed again with the bias's gradient), the last four with torch's
FlexAttention as a peer too (forward only on the CPU, where it has no backward).
"""

import contextlib
import importlib.util
import os
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..attention import FUSED_MAX_HEAD_DIM, attention, attention_varlen
from ..reference import attention as reference
from .compute import gemm_gflops, time_groups
from .timing import GenfastCandidateError
from .elementwise import fused_impls

# (batch, heads, length, head_dim, causal)
CONFIGS = {"cpu": [(2, 8, 1024, 64, False), (2, 8, 1024, 64, True)],
           # The shape (16k causal, head dim 128), a training one, and head dim 256 (Gemma-style).
           "cuda": [(1, 16, 16384, 128, True), (4, 16, 2048, 128, False), (2, 8, 4096, 256, False)]}
QUICK_CONFIGS = {"cpu": [(2, 8, 1024, 64, False)], "cuda": [(4, 16, 2048, 128, False)]}
# Packed causal sequences (heads, head_dim, lengths), as in language-model training on packed documents.
VARLEN_CONFIGS = {"cpu": (8, 64, [1024, 200, 700, 64, 512, 900, 333, 300]),
                  "cuda": (16, 128, [16384, 1000, 7000, 300, 4000, 12000, 2500, 9000])}
# One new token per sequence against a KV cache (batch, heads, kv_heads, cache length, head_dim),
# grouped-query as in Llama-style models: decoding, bound by reading K and V.
DECODE_CONFIGS = {"cpu": (1, 32, 8, 4096, 128), "cuda": (16, 32, 8, 8192, 128)}
# A batch decoding from a padded KV cache, (batch, heads, kv_heads, cache length, head_dim): the
# sequences hold from an eighth of the cache to all of it (CACHE_DECODE_USED).
CACHE_DECODE_CONFIGS = {"cpu": (4, 32, 8, 2048, 128), "cuda": (16, 32, 8, 8192, 128)}
CACHE_DECODE_USED = [1.0, 0.125, 0.5, 0.3, 0.8, 0.2, 0.65, 0.4]
# Multi-head latent attention's decoding (DeepSeek V3's, its 128 heads over 8 GPUs): (batch, heads,
# cache length, rope dim, latent dim), one kv head, a padded cache whose sequences hold
# CACHE_DECODE_USED of it.
MLA_DECODE_CONFIGS = {"cpu": (4, 16, 2048, 64, 512), "cuda": (32, 16, 8192, 64, 512)}
CACHE_PAGE_SIZES = (256, 16)  # the same cache in pages of these many keys, shuffled (vLLM's layout; 16 its default)
# One layer's attention in a step of transformers' continuous batching (generate_batch): decoding
# sequences (one new token each, against these many keys) beside the chunk of a prompt (its new
# tokens, and the tokens cached by its earlier chunks): (heads, kv_heads, head_dim, keys, chunk).
CONTINUOUS_BATCHING_CONFIGS = {
    "cpu": (16, 4, 64, [1500, 300, 900, 2000, 650, 1200, 400, 1000], (256, 512)),
    "cuda": (32, 8, 128, [int(4096 * used) for used in CACHE_DECODE_USED] * 4, (512, 1536))}
CONTINUOUS_BATCHING_PAGE_SIZE = 256  # transformers' default
# And a whole generate_batch (continuous batching) of a Llama-style model with random weights:
# (hidden, layers, heads, kv_heads, prompts, their lengths' range, new tokens per prompt, tokens a
# step). The cache holds every prompt at once; the step's token budget is given, as transformers
# would otherwise size it (and paged|sdpa's mask, a step's tokens by the cache's) from free memory.
GENERATE_BATCH_CONFIGS = {"cpu": (512, 4, 8, 2, 16, (200, 1000), 32, 256),
                          "cuda": (2048, 8, 16, 4, 16, (500, 2000), 32, 2048)}
# And a small model's step (GPT-2's heads and head dim, a short cache), where a call's own cost
# (argument checks, dispatch, autograd) is as large as the kernel's: full runs.
SMALL_DECODE_CONFIGS = {"cpu": (1, 12, 12, 512, 64), "cuda": (1, 12, 12, 512, 64)}
# A diffusion U-Net's cross-attention to its text encoder's 77 tokens (batch, heads, queries, keys,
# head_dim): Stable Diffusion 1.5's first level on the CPU (a 64 x 64 latent, 8 heads of 40), SDXL's
# second on the GPU (10 heads of 64); batch 2 for classifier-free guidance.
CROSS_CONFIGS = {"cpu": (2, 8, 4096, 77, 40), "cuda": (2, 10, 4096, 77, 64)}
# A diffusion VAE's mid-block attention (batch, heads, length, head_dim): one head of 512 channels
# over a 64 x 64 latent's tokens on the GPU (Stable Diffusion's at 512 pixels), 32 x 64 on the CPU;
# past the CUDA kernels' and SDPA flash's head dims, so that Triton runs it on a GPU.
WIDE_HEAD_CONFIGS = {"cpu": (1, 1, 2048, 512), "cuda": (1, 1, 4096, 512)}
# Attention dropout in training (batch, heads, length, head_dim, causal), at DROPOUT_P.
DROPOUT_CONFIGS = {"cpu": (2, 8, 1024, 64, False), "cuda": (4, 16, 2048, 128, False)}
DROPOUT_P = 0.1
# A local layer of a model with sliding-window attention (Gemma 2 and 3, Mistral) as transformers
# runs it through an attention interface such as "sdpa" or "genfast": a boolean (B, 1, L, L) mask
# that keeps keys i - window < j <= i (batch, heads, length, head_dim, window).
SLIDING_MASK_CONFIGS = {"cpu": (2, 8, 2048, 64, 256), "cuda": (2, 16, 8192, 128, 1024)}
# (B, H, L, D, attention_chunk): Llama 4's chunked causal layers, chunks of 8192 keys at 16k and more.
CHUNKED_CONFIGS = {"cpu": (1, 8, 4096, 64, 1024), "cuda": (1, 16, 16384, 128, 8192)}
# A causal layer with soft-capped logits, as Gemma 2's: (batch, heads, length, head_dim), cap SOFT_CAP.
SOFT_CAP_CONFIGS = {"cpu": (2, 8, 1024, 64), "cuda": (2, 16, 4096, 256)}
SOFT_CAP = 50.0
# A layer adding a relative-position bias per head to its logits, as T5's and Swin's do: (batch, heads,
# length, head_dim), the bias (1, heads, length, length) in the inputs' dtype (bfloat16 on the CPU too).
# gpt-oss's attention: causal, grouped-query, a sink per head: (batch, heads, kv_heads, length, head_dim).
SINK_CONFIGS = {"cpu": (1, 16, 2, 1024, 64), "cuda": (2, 64, 8, 4096, 64)}
BIAS_CONFIGS = {"cpu": (1, 8, 2048, 64), "cuda": (2, 16, 4096, 128)}
SDPA_BACKENDS = {"cpu": [("flash", SDPBackend.FLASH_ATTENTION), ("math", SDPBackend.MATH)],
                 "cuda": [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)]}


def _sdpa(backend, argument=None, **options):
    """SDPA under one backend with fixed options; argument names the keyword a row's candidates
    pass after q, k and v (is_causal or attn_mask), if they pass one."""
    def run(q, k, v, *value):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, **options, **({argument: value[0]} if argument else {}))

    return run


def flex_attention_peer(device: str, length: int, mask_mod, score_mod=None):
    """torch's FlexAttention, compiled, for (B, H, length, D) inputs, with mask_mod's block mask built
    once, outside the timing (as a model builds it once per forward for all its layers); None where
    torch has no FlexAttention."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    block_mask = create_block_mask(mask_mod, None, None, length, length, device=device)

    # One compiled function for inference and one for training: a call that fails in compiling (no
    # backward on the CPU) leaves its function running eagerly from then on, 10x slower.
    def inference(q, k, v):
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)

    def training(q, k, v):
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)

    compiled_inference, compiled_training = (torch.compile(fn, dynamic=False) for fn in (inference, training))

    def run(q, k, v, *_):
        grads = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        return (compiled_training if grads else compiled_inference)(q, k, v)

    return run


def _runs(fn) -> bool:
    """Whether a peer runs a call at its full size: FlexAttention's block mask is made for that size
    (so _supported's short probe does not fit it), and it has no backward on the CPU."""
    try:
        fn()
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


# FlashAttention's packages, where installed: (name, module), each with flash_attn_func and
# flash_attn_varlen_func on (batch, length, heads, dim) and packed (total, heads, dim) tensors.
FLASH_ATTENTION_MODULES = [("FlashAttention-2", "flash_attn"), ("FlashAttention-3", "flash_attn_interface")]


def hopper_available(device: str) -> bool:
    """Whether genfast's CUDA attention has its Hopper kernels here: an sm_90 GPU and a build with
    sm_90a code. They are opt-in (GENFAST_ATTENTION_SM90=1), and GENFAST_ATTENTION_SM90=0 leaves
    their rows out of the benchmark too (scripts/gpu-check sets it when their tests did not pass)."""
    from .. import build_info

    return (device == "cuda" and os.environ.get("GENFAST_ATTENTION_SM90") != "0" and torch.cuda.is_available()
            and torch.cuda.get_device_capability() == (9, 0) and bool(build_info().get("attention_sm90")))


@contextlib.contextmanager
def environment(values: dict):
    """The environment variables `values` set for the block, then as they were."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def with_environment(fn, values: dict):
    """fn with `values` set around each call, and kept as fn.environment: a timed forward+backward
    sets them around the backward too (in_environment), which reads them at its launches."""
    def run(*args):
        with environment(values):
            return fn(*args)

    run.environment = values
    return run


def in_environment(fn, thunk):
    """thunk, run with fn's environment (with_environment's) set around it, where fn has one."""
    values = getattr(fn, "environment", None)
    if not values:
        return thunk

    def run():
        with environment(values):
            return thunk()

    return run


def with_hopper(fn):
    """fn with the Hopper kernels opted into (GENFAST_ATTENTION_SM90=1), for its backward too."""
    return with_environment(fn, {"GENFAST_ATTENTION_SM90": "1"})


def _output(result):
    """FlashAttention-3 returns (out, lse) in some versions, out alone in others."""
    return result[0] if isinstance(result, tuple) else result


def flash_attention_peers(device: str):
    """[(name, dense(q, k, v, causal, dropout_p=0.0), varlen(q, k, v, cu, longest[, cu_k,
    longest_k]))] for each FlashAttention package importable here; dense takes and returns (B, H, L,
    D) like SDPA, varlen packed tensors (causal from each sequence's bottom-right corner)."""
    if device != "cuda":
        return []
    peers = []
    for name, module_name in FLASH_ATTENTION_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue

        def dense(q, k, v, causal, dropout_p=0.0, softcap=0.0, module=module):
            # Options only when asked for: FlashAttention-3 has no dropout, older FlashAttention-2 no softcap.
            options = {name: value for name, value in (("dropout_p", dropout_p), ("softcap", softcap)) if value}
            out = module.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                                         **options)
            return _output(out).transpose(1, 2)

        def varlen(q, k, v, cu, longest, cu_k=None, longest_k=None, module=module):
            cu_k, longest_k = (cu, longest) if cu_k is None else (cu_k, longest_k)
            return _output(module.flash_attn_varlen_func(q, k, v, cu, cu_k, longest, longest_k, causal=True))

        peers.append((name, dense, varlen))
    return peers


def _rows_or_note(rows_of, device, dtype, gemm, quick, say):
    """rows_of's rows; none where it raises (another library's API changed), said on stderr, so that
    the rows after it are still measured."""
    try:
        return rows_of(device, dtype, gemm, quick, say)
    except GenfastCandidateError:
        raise
    except Exception as error:  # noqa: BLE001 - any break of the other library's API
        print(f"\ngenfast bench: {rows_of.__name__} left out: {type(error).__name__}: {error}", file=sys.stderr)
        return []


def _supported(fn, q, k, v, *args) -> bool:
    """Whether fn runs on the first 8 queries and keys. Triton's kernels run untuned there: autotuning
    keys on neither length, so a tile tuned on the probe would serve every full-size row."""
    try:
        with environment({"GENFAST_TRITON_AUTOTUNE": "0"}):
            fn(q[:, :, :8], k[:, :, :8], v[:, :, :8], *args)
        return True
    except (RuntimeError, TypeError):  # TypeError: an option the peer does not take
        return False


def run(device: str, quick: bool = False, progress=None, dtypes=None, sizes=None):
    """Result rows; `sizes`, if given, are element counts of q (B H L D) at the device's first
    configuration's B, H and D."""
    say = progress or (lambda message: None)
    configs = (QUICK_CONFIGS if quick else CONFIGS).get(device, CONFIGS["cpu"])
    if sizes:
        batch, heads, _, dim, causal = configs[0]
        configs = [(batch, heads, max(1, int(size) // (batch * heads * dim)), dim, causal) for size in sizes]
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    say("attention: GEMM throughput")
    gemm = gemm_gflops(device, dtype, quick)
    compiled = torch.compile(reference.attention, dynamic=False)
    candidates = [(f"genfast {impl}", lambda q, k, v, c, impl=impl: attention(q, k, v, is_causal=c, impl=impl))
                  for impl in fused_impls(device)]
    if hopper_available(device):
        candidates += [("genfast native Hopper",
                        with_hopper(lambda q, k, v, c: attention(q, k, v, is_causal=c, impl="native")))]
    candidates += [(f"torch SDPA {name}", _sdpa(backend, "is_causal"))
                   for name, backend in SDPA_BACKENDS.get(device, [])]
    candidates += [(name, dense) for name, dense, _ in flash_attention_peers(device)]
    candidates += [("eager reference", lambda q, k, v, c: reference.attention(q, k, v, is_causal=c)),
                   ("torch.compile reference", lambda q, k, v, c: compiled(q, k, v, is_causal=c))]
    # The CUDA backward adds dQ with atomics by default; the deterministic forms, for the backward's rows.
    deterministic = [(f"genfast {impl} deterministic",
                      lambda q, k, v, c, impl=impl: attention(q, k, v, is_causal=c, impl=impl, deterministic=True))
                     for impl in fused_impls(device)] if device == "cuda" else []
    rows = []
    with torch._dynamo.config.patch(recompile_limit=64):
        for batch, heads, length, dim, causal in configs:
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(batch, heads, length, dim, generator=g).to(device=device, dtype=dtype)
                       for _ in range(3))
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            grad = torch.randn_like(q)
            usable = [(name, fn) for name, fn in candidates if _supported(fn, q, k, v, causal)]
            flops = 4 * batch * heads * length * length * dim / (2 if causal else 1)
            groups = _forward_and_backward_groups(
                "causal" if causal else "", flops, usable, q, k, v, leaves, grad, causal,
                backward_only=[(name, fn) for name, fn in deterministic if _supported(fn, q, k, v, causal)])
            config = f"B={batch} H={heads} L={length} D={dim}"
            rows += time_groups("attention", device, dtype, config, batch * heads * length * dim, groups, gemm, quick,
                                say)
        heads, dim, lengths = VARLEN_CONFIGS.get(device, VARLEN_CONFIGS["cpu"])
        if sizes:  # the same total of tokens as the first size, in three sequences
            total = max(3, int(sizes[0]) // (heads * dim))
            lengths = [total // 2, total // 3, total - total // 2 - total // 3]
        rows += _varlen_rows(device, dtype, heads, dim, lengths, gemm, quick, say)
        if not sizes:
            rows += _decode_rows(device, dtype, gemm, quick, say)
            rows += _cache_decode_rows(device, dtype, gemm, quick, say)
            rows += _kvcache_step_rows(device, dtype, gemm, quick, say)
            rows += _mla_decode_rows(device, dtype, gemm, quick, say)
            if not quick:  # transformers' private APIs, which its versions change: a break leaves them out
                for rows_of in (_continuous_batching_rows, _generate_batch_rows):
                    rows += _rows_or_note(rows_of, device, dtype, gemm, quick, say)
            if device == "cpu":  # a bfloat16 KV cache too, which the CPU kernel reads without a float32 copy
                rows += _decode_rows(device, torch.bfloat16, gemm, quick, say)
                rows += _bfloat16_rows(device, gemm_gflops(device, torch.bfloat16, quick), quick, say)
            if not quick:
                rows += _decode_rows(device, dtype, gemm, quick, say,
                                     SMALL_DECODE_CONFIGS.get(device, SMALL_DECODE_CONFIGS["cpu"]))
                rows += _cross_rows(device, dtype, gemm, quick, say)
                rows += _wide_head_rows(device, torch.float32, gemm, quick, say)
                rows += _dropout_rows(device, dtype, gemm, quick, say)
                # Its compiled reference recompiles for each shape and grad mode: under the raised limit too.
                rows += _sliding_mask_rows(device, dtype, gemm, quick, say)
                rows += _chunked_rows(device, dtype, gemm, quick, say)
                rows += _soft_cap_rows(device, dtype, gemm, quick, say)
                rows += _sink_rows(device, dtype, gemm, quick, say)
                rows += _bias_rows(device, torch.bfloat16 if device == "cpu" else dtype, gemm, quick, say)
    return rows


def _mask_layer(device, dtype, shape, mask, own, variant, kept, flex):
    """(q, k, v, groups) of a layer given as a boolean mask (batch, 1, L, L): the candidates `own`
    (each called as fn(q, k, v, mask)), genfast's fused backends with the mask, every peer that
    takes a mask (SDPA's backends, the eager and compiled reference) and FlexAttention (flex, or
    None); FLOPs those of the `kept` scores a head."""
    batch, heads, length, dim = shape
    compiled = torch.compile(reference.attention, dynamic=False)
    candidates = [*own, *((f"genfast {impl} mask", lambda q, k, v, m, impl=impl: attention(q, k, v, m, impl=impl))
                          for impl in fused_impls(device))]
    candidates += [(f"torch SDPA {name}", _sdpa(backend, "attn_mask"))
                   for name, backend in SDPA_BACKENDS.get(device, [])]
    candidates += [("eager reference", lambda q, k, v, m: reference.attention(q, k, v, m)),
                   ("torch.compile reference", lambda q, k, v, m: compiled(q, k, v, m))]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, dim, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grad = torch.randn_like(q)
    usable = [(name, fn) for name, fn in candidates if _supported(fn, q, k, v, mask[..., :8, :8])]
    return q, k, v, _forward_and_backward_groups(variant, 4 * batch * heads * kept * dim, usable, q, k, v, leaves,
                                                 grad, mask, flex=flex)


def _sliding_mask_rows(device, dtype, gemm, quick, say):
    """A sliding-window layer given its window as a boolean mask, as transformers' models give it:
    every peer that takes a mask, and genfast with the window as a band (window=, what the mask
    says), the figure a mask can approach by skipping the blocks it hides. FLOPs: those of the keys
    the mask keeps."""
    batch, heads, length, dim, window = SLIDING_MASK_CONFIGS.get(device, SLIDING_MASK_CONFIGS["cpu"])
    position = torch.arange(length, device=device)
    distance = position[:, None] - position[None, :]
    mask = ((distance >= 0) & (distance < window)).expand(batch, 1, length, length)
    flex = flex_attention_peer(device, length, lambda b, h, i, j: (i >= j) & (i - j < window))
    bands = [(f"genfast {impl} band", lambda q, k, v, m, impl=impl: attention(
        q, k, v, causal="top_left", window=(window - 1, 0), impl=impl)) for impl in fused_impls(device)]
    kept = window * length - window * (window - 1) // 2
    groups = _mask_layer(device, dtype, (batch, heads, length, dim), mask, bands, "sliding-window mask", kept,
                         flex)[3]
    config = f"B={batch} H={heads} L={length} D={dim} window={window}"
    return time_groups("attention", device, dtype, config, batch * heads * length * dim, groups, gemm, quick, say)


def _chunked_rows(device, dtype, gemm, quick, say):
    """A chunked causal layer (Llama 4's: a query sees the keys of its own chunk up to itself):
    genfast through FlashAttention 3's attention_chunk (genfast.integrations.flash_attn_interface),
    FlashAttention 3's own where installed (forward only: it has no backward there), and the peers
    that take the chunks as a mask (genfast's mask too, the figure skipping the blocks a mask hides
    reaches): SDPA, FlexAttention with the chunks as its mask_mod, the eager and compiled
    reference. FLOPs: those of the keys kept."""
    from ..integrations import flash_attn_interface as genfast_fa3

    batch, heads, length, dim, chunk = CHUNKED_CONFIGS.get(device, CHUNKED_CONFIGS["cpu"])
    position = torch.arange(length, device=device)
    mask = ((position[:, None] >= position[None, :]) & (position[:, None] // chunk == position[None, :] // chunk))
    mask = mask.expand(batch, 1, length, length)
    flex = flex_attention_peer(device, length, lambda b, h, i, j: (i >= j) & (i // chunk == j // chunk))

    def chunked(module, **options):
        return lambda q, k, v, m: _output(module.flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, attention_chunk=chunk,
            **options)).transpose(1, 2)

    own = [(f"genfast {impl} attention_chunk", chunked(genfast_fa3, impl=impl)) for impl in fused_impls(device)]
    q, k, v, groups = _mask_layer(device, dtype, (batch, heads, length, dim), mask, own, "chunked causal",
                                  int(mask[0, 0].sum()), flex)
    if device == "cuda" and importlib.util.find_spec("flash_attn_interface") is not None:
        # Its forward alone: FlashAttention 3 has no backward with attention_chunk.
        fa3 = chunked(importlib.import_module("flash_attn_interface"))
        if _supported(fa3, q, k, v, None):
            groups["attention forward chunked causal"][1].append(
                ("FlashAttention-3 attention_chunk", lambda: fa3(q, k, v, mask)))
    config = f"B={batch} H={heads} L={length} D={dim} chunk={chunk}"
    return time_groups("attention", device, dtype, config, batch * heads * length * dim, groups, gemm, quick, say)


def _forward_and_backward_groups(variant, flops, usable, q, k, v, leaves, grad, *args, flex=None,
                                 backward_only=()):
    """A row's two groups, forward and forward+backward (3.5x the flops), of the usable candidates
    (each called as fn(q, k, v, *args)), the backward_only ones in the second, and FlexAttention
    (flex, or None) in each group where it runs."""
    groups = {}
    for name, call, group_flops, extra in (
            ("forward", lambda fn: fn(q, k, v, *args), flops, ()),
            ("forward+backward", lambda fn: torch.autograd.grad(fn(*leaves, *args), leaves, grad), 3.5 * flops,
             backward_only)):
        entries = [(peer, in_environment(fn, lambda fn=fn, call=call: call(fn))) for peer, fn in [*usable, *extra]]
        if flex is not None and _runs(lambda: call(flex)):
            entries.append(("FlexAttention", lambda call=call: call(flex)))
        groups[f"attention {name} {variant}".rstrip()] = (group_flops, entries)
    return groups


def _soft_cap_rows(device, dtype, gemm, quick, say):
    """A causal layer with its logits soft-capped (Gemma 2's attention): SDPA cannot cap, so the
    peers are FlexAttention with the cap as its score_mod (transformers' flex_attention path for
    Gemma 2), FlashAttention's softcap where installed, the eager reference (transformers' eager path)
    and its torch.compile."""
    batch, heads, length, dim = SOFT_CAP_CONFIGS.get(device, SOFT_CAP_CONFIGS["cpu"])
    cap = SOFT_CAP
    compiled = torch.compile(reference.attention, dynamic=False)

    def score_mod(score, b, h, i, j):
        return cap * torch.tanh(score / cap)

    flex = flex_attention_peer(device, length, lambda b, h, i, j: i >= j, score_mod)
    candidates = [(f"genfast {impl}", lambda q, k, v, impl=impl: attention(q, k, v, is_causal=True, softcap=cap,
                                                                           impl=impl))
                  for impl in fused_impls(device)]
    candidates += [(name, lambda q, k, v, fn=dense: fn(q, k, v, True, softcap=cap))
                   for name, dense, _ in flash_attention_peers(device)]
    candidates += [("eager reference", lambda q, k, v: reference.attention(q, k, v, is_causal=True, softcap=cap)),
                   ("torch.compile reference", lambda q, k, v: compiled(q, k, v, is_causal=True, softcap=cap))]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, dim, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grad = torch.randn_like(q)
    usable = [(name, fn) for name, fn in candidates if _supported(fn, q, k, v)]
    flops = 2 * batch * heads * length * length * dim  # causal: half of 4 B H L^2 D
    groups = _forward_and_backward_groups(f"causal softcap {cap:g}", flops, usable, q, k, v, leaves, grad, flex=flex)
    config = f"B={batch} H={heads} L={length} D={dim}"
    return time_groups("attention", device, dtype, config, batch * heads * length * dim, groups, gemm, quick, say)


def _sinks_joined_afterwards(q, k, v, sinks, impl):
    """Attention sinks joined to a sink-less kernel's output through its lse, as transformers' flex
    path joins them: lse' = logaddexp(lse, sink), o' = o e^(lse - lse')."""
    o, lse = attention(q, k, v, is_causal=True, enable_gqa=True, return_lse=True, impl=impl)
    joined = torch.logaddexp(lse, sinks.float()[:, None])
    return o * torch.exp(lse - joined)[..., None].to(o.dtype)


def _sink_rows(device, dtype, gemm, quick, say):
    """A causal grouped-query layer with attention sinks (gpt-oss's, SINK_CONFIGS). SDPA and
    FlashAttention 2 have no sinks, so the peers are the eager reference (transformers' eager path:
    the sink as one more column of the scores), its torch.compile, and the sinks joined afterwards
    from a sink-less kernel's lse (transformers' flex path joins them so), genfast's own kernel being
    that kernel: what joining them in the kernels saves."""
    batch, heads, kv_heads, length, dim = SINK_CONFIGS.get(device, SINK_CONFIGS["cpu"])
    compiled = torch.compile(reference.attention, dynamic=False)
    candidates = [(f"genfast {impl}", lambda q, k, v, s, impl=impl: attention(q, k, v, is_causal=True,
                                                                              enable_gqa=True, sinks=s, impl=impl))
                  for impl in fused_impls(device)]
    candidates += [(f"genfast {impl}, sinks joined afterwards",
                    lambda q, k, v, s, impl=impl: _sinks_joined_afterwards(q, k, v, s, impl))
                   for impl in fused_impls(device)]
    candidates += [("eager reference", lambda q, k, v, s: reference.attention(q, k, v, is_causal=True,
                                                                              enable_gqa=True, sinks=s)),
                   ("torch.compile reference", lambda q, k, v, s: compiled(q, k, v, is_causal=True, enable_gqa=True,
                                                                           sinks=s))]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, length, dim, generator=g).to(device=device, dtype=dtype)
    k, v = (torch.randn(batch, kv_heads, length, dim, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    sinks = torch.randn(heads, generator=g).to(device=device, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grad = torch.randn_like(q)
    usable = [(name, fn) for name, fn in candidates if _supported(fn, q, k, v, sinks)]
    flops = 2 * batch * heads * length * length * dim  # causal: half of 4 B H L^2 D
    groups = _forward_and_backward_groups("causal sinks", flops, usable, q, k, v, leaves, grad, sinks)
    config = f"B={batch} H={heads} Hk={kv_heads} L={length} D={dim}"
    return time_groups("attention", device, dtype, config, batch * heads * length * dim, groups, gemm, quick, say)


def _bias_rows(device, dtype, gemm, quick, say):
    """A layer with an additive (1, H, L, L) bias in the inputs' dtype (BIAS_CONFIGS): every peer that
    takes a float mask, FlexAttention with the bias added by its score_mod, the eager reference and
    its torch.compile; and forward+backward with the bias's gradient too. genfast's kernels read the
    bias as it is, with no float32 copy."""
    batch, heads, length, dim = BIAS_CONFIGS.get(device, BIAS_CONFIGS["cpu"])
    compiled = torch.compile(reference.attention, dynamic=False)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, dim, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    bias = torch.randn(1, heads, length, length, generator=g).to(device=device, dtype=dtype)

    def score_mod(score, b, h, i, j):
        return score + bias[0, h, i, j]

    flex = flex_attention_peer(device, length, lambda b, h, i, j: j >= 0, score_mod)
    candidates = [(f"genfast {impl}", lambda q, k, v, m, impl=impl: attention(q, k, v, m, impl=impl))
                  for impl in fused_impls(device)]
    candidates += [(f"torch SDPA {name}", _sdpa(backend, "attn_mask"))
                   for name, backend in SDPA_BACKENDS.get(device, [])]
    candidates += [("eager reference", lambda q, k, v, m: reference.attention(q, k, v, m)),
                   ("torch.compile reference", lambda q, k, v, m: compiled(q, k, v, m))]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grad = torch.randn_like(q)
    usable = [(name, fn) for name, fn in candidates if _supported(fn, q, k, v, bias[..., :8, :8])]
    flops = 4 * batch * heads * length * length * dim
    groups = _forward_and_backward_groups("additive bias", flops, usable, q, k, v, leaves, grad, bias, flex=flex)
    # Training the bias too (T5's and Swin's relative positions): its gradient, dS summed over the
    # batch, beside q's, k's and v's; every peer that gives it.
    bias_leaf = bias.clone().requires_grad_()

    def with_bias_grad(fn):
        return torch.autograd.grad(fn(*leaves, bias_leaf), [*leaves, bias_leaf], grad)

    groups["attention forward+backward additive bias and its gradient"] = (
        3.5 * flops, [(name, lambda fn=fn: with_bias_grad(fn)) for name, fn in usable
                      if _runs(lambda fn=fn: with_bias_grad(fn))])
    config = f"B={batch} H={heads} L={length} D={dim} bias (1, H, L, L)"
    return time_groups("attention", device, dtype, config, batch * heads * length * dim, groups, gemm, quick, say)


def _plain_attention_peers(device):
    """(name, fn(q, k, v)) of every peer of an attention without options: genfast's backends,
    SDPA's, FlashAttention's where installed, the eager and the compiled reference."""
    compiled = torch.compile(reference.attention, dynamic=False)
    candidates = [(f"genfast {impl}", lambda q, k, v, impl=impl: attention(q, k, v, impl=impl))
                  for impl in fused_impls(device)]
    candidates += [(f"torch SDPA {name}", _sdpa(backend)) for name, backend in SDPA_BACKENDS.get(device, [])]
    candidates += [(name, lambda q, k, v, fn=dense: fn(q, k, v, False))
                   for name, dense, _ in flash_attention_peers(device)]
    return candidates + [("eager reference", lambda q, k, v: reference.attention(q, k, v)),
                         ("torch.compile reference", lambda q, k, v: compiled(q, k, v))]


def _plain_attention_rows(device, dtype, gemm, quick, say, variant, config, batch, heads, q_len, k_len, dim):
    """Forward and forward+backward rows of an attention without options, q (batch, heads, q_len,
    dim) over k_len keys, timed for every peer that takes it (_plain_attention_peers)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, q_len, dim, generator=g).to(device=device, dtype=dtype)
    k, v = (torch.randn(batch, heads, k_len, dim, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grad = torch.randn_like(q)
    usable = [(name, fn) for name, fn in _plain_attention_peers(device) if _supported(fn, q, k, v)]
    flops = 4 * batch * heads * q_len * k_len * dim
    groups = _forward_and_backward_groups(variant, flops, usable, q, k, v, leaves, grad)
    return time_groups("attention", device, dtype, config, batch * heads * q_len * dim, groups, gemm, quick, say)


def _bfloat16_rows(device, gemm, quick, say):
    """The first dense configuration in bfloat16 on the CPU, whose products take bfloat16 pairs, or AMX
    tiles where the CPU has them (torch's SDPA flash takes AMX too, through oneDNN); gemm: a bfloat16
    GEMM's GFLOP/s."""
    batch, heads, length, dim, _ = CONFIGS["cpu"][0]
    return _plain_attention_rows(device, torch.bfloat16, gemm, quick, say, "",
                                 f"B={batch} H={heads} L={length} D={dim}", batch, heads, length, length, dim)


def _cross_rows(device, dtype, gemm, quick, say):
    """Cross-attention of many queries to a few keys (CROSS_CONFIGS), as a text-conditioned
    diffusion U-Net runs it in sampling (forward) and training: every peer that takes Lq != Lk."""
    batch, heads, q_len, k_len, dim = CROSS_CONFIGS.get(device, CROSS_CONFIGS["cpu"])
    return _plain_attention_rows(device, dtype, gemm, quick, say, "cross",
                                 f"B={batch} H={heads} Lq={q_len} Lk={k_len} D={dim}", batch, heads, q_len, k_len, dim)


def _wide_head_rows(device, dtype, gemm, quick, say):
    """A head dim of 512 (WIDE_HEAD_CONFIGS), in float32 as VAEs often run (SDXL's upcasts): every
    peer that takes it (on a GPU Triton and SDPA's efficient and math kernels; not SDPA flash,
    FlashAttention or the CUDA kernels, which stop at 256)."""
    batch, heads, length, dim = WIDE_HEAD_CONFIGS.get(device, WIDE_HEAD_CONFIGS["cpu"])
    return _plain_attention_rows(device, dtype, gemm, quick, say, "wide head",
                                 f"B={batch} H={heads} L={length} D={dim}", batch, heads, length, length, dim)


def _dropout_rows(device, dtype, gemm, quick, say):
    """Training with attention dropout (GPT-2's and BERT's 0.1): every peer that has dropout, each
    drawing its own mask. The compiled peer is torch.compile of SDPA, which a compiled model gets:
    inductor takes minutes over the reference's Philox."""
    compiled = torch.compile(F.scaled_dot_product_attention, dynamic=False)
    batch, heads, length, dim, causal = DROPOUT_CONFIGS.get(device, DROPOUT_CONFIGS["cpu"])
    p = DROPOUT_P
    candidates = [(f"genfast {impl}",
                   lambda q, k, v, c, impl=impl: attention(q, k, v, dropout_p=p, is_causal=c, impl=impl))
                  for impl in fused_impls(device)]
    if hopper_available(device):
        candidates += [("genfast native Hopper",
                        with_hopper(lambda q, k, v, c: attention(q, k, v, dropout_p=p, is_causal=c, impl="native")))]
    candidates += [(f"torch SDPA {name}", _sdpa(backend, "is_causal", dropout_p=p))
                   for name, backend in SDPA_BACKENDS.get(device, [])]
    candidates += [(name, lambda q, k, v, c, fn=dense: fn(q, k, v, c, dropout_p=p))
                   for name, dense, _ in flash_attention_peers(device)]
    candidates += [("eager reference", lambda q, k, v, c: reference.attention(q, k, v, dropout_p=p, is_causal=c)),
                   ("torch.compile SDPA", lambda q, k, v, c: compiled(q, k, v, dropout_p=p, is_causal=c))]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, dim, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grad = torch.randn_like(q)
    usable = [(name, fn) for name, fn in candidates if _supported(fn, q, k, v, causal)]
    flops = 4 * batch * heads * length * length * dim / (2 if causal else 1)
    groups = _forward_and_backward_groups(f"{'causal ' if causal else ''}dropout {p}", flops, usable, q, k, v,
                                          leaves, grad, causal)
    config = f"B={batch} H={heads} L={length} D={dim}"
    return time_groups("attention", device, dtype, config, batch * heads * length * dim, groups, gemm, quick, say)


def _decode_rows(device, dtype, gemm, quick, say, config=None):
    """Decoding: one query per sequence against a KV cache, by default a long one with fewer K/V
    heads (enable_gqa); config (batch, heads, kv_heads, cache length, head_dim) gives another."""
    batch, heads, kv_heads, length, dim = config or DECODE_CONFIGS.get(device, DECODE_CONFIGS["cpu"])
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, 1, dim, generator=g).to(device=device, dtype=dtype)
    k, v = (torch.randn(batch, kv_heads, length, dim, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    candidates = [(f"genfast {impl}", lambda q, k, v, impl=impl: attention(q, k, v, enable_gqa=True, impl=impl))
                  for impl in fused_impls(device)]
    candidates += [(f"torch SDPA {name}", _sdpa(backend, enable_gqa=True))
                   for name, backend in SDPA_BACKENDS.get(device, [])]
    candidates += [(name, lambda q, k, v, fn=dense: fn(q, k, v, False))
                   for name, dense, _ in flash_attention_peers(device)]
    candidates += [("eager reference", lambda q, k, v: reference.attention(q, k, v, enable_gqa=True))]
    usable = [(name, fn) for name, fn in candidates if _supported(fn, q, k, v)]
    groups = {"attention decode": (4 * batch * heads * length * dim,  # without autograd, as generation runs
                                   [(name, torch.no_grad()(lambda fn=fn: fn(q, k, v))) for name, fn in usable])}
    config = f"B={batch} H={heads} H_kv={kv_heads} Lk={length} D={dim}"
    return time_groups("attention", device, dtype, config, batch * kv_heads * length * dim, groups, gemm, quick, say)


def _cache_decode_rows(device, dtype, gemm, quick, say):
    """One new token per sequence against a padded KV cache (batch, length, kv_heads, dim) whose
    sequences hold different counts of keys: attention_varlen with seqused_k (no mask), and with
    the same keys in a paged cache (pages of each of CACHE_PAGE_SIZES keys in shuffled order, a block table),
    against genfast.attention, SDPA and the eager reference on the cache viewed (batch, kv_heads,
    length, dim) with a padding mask, as a transformers model with a static cache calls them."""
    batch, heads, kv_heads, length, dim = CACHE_DECODE_CONFIGS.get(device, CACHE_DECODE_CONFIGS["cpu"])
    used = [max(1, int(length * CACHE_DECODE_USED[n % len(CACHE_DECODE_USED)])) for n in range(batch)]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, dim, generator=g).to(device=device, dtype=dtype)
    k, v = (torch.randn(batch, length, kv_heads, dim, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    cu_q = torch.arange(batch + 1, device=device, dtype=torch.int32)
    cu_k = cu_q * length
    seqused_k = torch.tensor(used, device=device, dtype=torch.int32)
    mask = (torch.arange(length, device=device)[None, :] < seqused_k[:, None])[:, None, None, :]
    q4, k4, v4 = q[:, :, None], k.transpose(1, 2), v.transpose(1, 2)

    def cached(impl):
        return lambda: attention_varlen(q, k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, 1, length,
                                        causal="bottom_right", seqused_k=seqused_k, impl=impl)

    cu_used = torch.tensor([0] + used, device=device).cumsum(0).to(torch.int32)

    def pages(page_size):
        per_sequence = length // page_size
        order = torch.randperm(batch * per_sequence, generator=g).to(device)
        k_pages, v_pages = (t.reshape(batch * per_sequence, page_size, kv_heads, dim)[order] for t in (k, v))
        return k_pages, v_pages, torch.argsort(order).view(batch, per_sequence).to(torch.int32)

    def paged(impl, page_size):
        k_pages, v_pages, block_table = pages(page_size)
        return lambda: attention_varlen(q, k_pages, v_pages, cu_q, cu_used, 1, max(used), causal="bottom_right",
                                        block_table=block_table, impl=impl)

    def flashinfer_decode(module, page_size, **impl):
        """FlashInfer's decode wrapper (genfast's drop-in, or FlashInfer's own where installed),
        planned once outside the timing, from the block table's first pages of each sequence."""
        k_pages, v_pages, block_table = pages(page_size)
        counts = [-(-n // page_size) for n in used]
        indices = torch.cat([block_table[b, :count] for b, count in enumerate(counts)])
        indptr = torch.tensor([0] + counts).cumsum(0).to(torch.int32)
        last = torch.tensor([n - (count - 1) * page_size for n, count in zip(used, counts)], dtype=torch.int32)
        workspace = torch.empty(128 << 20, dtype=torch.uint8, device=device)
        wrapper = module.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", **impl)
        wrapper.plan(indptr.to(device), indices, last.to(device), heads, kv_heads, dim, page_size,
                     q_data_type=dtype, kv_data_type=dtype)
        return lambda: wrapper.run(q, (k_pages, v_pages))

    candidates = [(f"genfast {impl} seqused_k", cached(impl)) for impl in fused_impls(device)]
    candidates += [(f"genfast {impl} paged {size}", paged(impl, size)) for size in CACHE_PAGE_SIZES
                   for impl in fused_impls(device)]
    from ..integrations import flashinfer as flashinfer_drop_in

    candidates += [(f"genfast {impl} FlashInfer decode wrapper paged {CACHE_PAGE_SIZES[-1]}",
                    flashinfer_decode(flashinfer_drop_in, CACHE_PAGE_SIZES[-1], impl=impl))
                   for impl in fused_impls(device)]
    if device == "cuda" and importlib.util.find_spec("flashinfer") is not None:
        candidates += [(f"FlashInfer paged {CACHE_PAGE_SIZES[-1]}",
                        flashinfer_decode(importlib.import_module("flashinfer"), CACHE_PAGE_SIZES[-1]))]
    candidates += [(f"genfast {impl} mask", lambda impl=impl: attention(q4, k4, v4, mask, enable_gqa=True, impl=impl))
                   for impl in fused_impls(device)]
    candidates += [(f"torch SDPA {name} mask",
                    lambda fn=_sdpa(backend, "attn_mask", enable_gqa=True): fn(q4, k4, v4, mask))
                   for name, backend in SDPA_BACKENDS.get(device, [])]
    candidates += [("eager reference mask", lambda: reference.attention(q4, k4, v4, mask, enable_gqa=True))]
    usable = [(name, fn) for name, fn in candidates if _runs(fn)]
    groups = {"attention decode padded cache": (4 * heads * dim * sum(used),
                                                [(name, torch.no_grad()(fn)) for name, fn in usable])}
    config = f"B={batch} H={heads} H_kv={kv_heads} Lk={length} used={'/'.join(map(str, used))} D={dim}"
    return time_groups("attention", device, dtype, config, kv_heads * sum(used) * dim, groups, gemm, quick, say)


def _mla_decode_rows(device, dtype, gemm, quick, say):
    """A decoding step of multi-head latent attention (MLA_DECODE_CONFIGS), its cache laid out as
    vLLM lays it out: each key's latent row (which is also its value) and rope row side by side, one
    row of latent + rope channels. attention_varlen with qv (the absorbed latent query over the
    latent rows, q over the rope rows, both read in place where the backend takes qv) and seqused_k,
    against attention over the whole rows as keys (of head dim latent + rope) with the latent rows as
    values (what a model runs without qv: each step's query concatenated, the cache read in place):
    attention_varlen, and SDPA and the eager reference with the heads as the one kv head's queries
    (no copy of the cache per head) and a padding mask; attention_varlen with the latent and rope
    rows concatenated each step (a model whose two caches lie apart; genfast's qv until it read qv in
    place); FlashAttention 3's flash_attn_with_kvcache with qv where installed. On a GPU genfast's
    kernels take no head dim of latent + rope past 512 (DeepSeek's 576): qv alone runs there."""
    batch, heads, length, dim, v_dim = MLA_DECODE_CONFIGS.get(device, MLA_DECODE_CONFIGS["cpu"])
    used = [max(1, int(length * CACHE_DECODE_USED[n % len(CACHE_DECODE_USED)])) for n in range(batch)]
    g = torch.Generator().manual_seed(0)
    q, qv = (torch.randn(batch, heads, d, generator=g).to(device=device, dtype=dtype) for d in (dim, v_dim))
    cache = torch.randn(batch, length, 1, v_dim + dim, generator=g).to(device=device, dtype=dtype)
    latent, rope = cache[..., :v_dim], cache[..., v_dim:]
    cu_q = torch.arange(batch + 1, device=device, dtype=torch.int32)
    seqused_k = torch.tensor(used, device=device, dtype=torch.int32)
    scale = (dim + v_dim) ** -0.5
    common = dict(scale=scale, causal="bottom_right", seqused_k=seqused_k)
    mask = (torch.arange(length, device=device)[None, :] < seqused_k[:, None])[:, None, None, :]

    def absorbed(impl):
        return lambda: attention_varlen(q, rope.flatten(0, 1), latent.flatten(0, 1), cu_q, cu_q * length, 1, length,
                                        qv=qv, impl=impl, **common)

    def whole_rows(impl, rows=lambda: cache):  # rows: the keys, made each step
        return lambda: attention_varlen(torch.cat((qv, q), -1), rows().flatten(0, 1), latent.flatten(0, 1), cu_q,
                                        cu_q * length, 1, length, impl=impl, **common)

    def dense_whole_rows(fn):
        return lambda: fn(torch.cat((qv, q), -1)[:, None], cache.transpose(1, 2), latent.transpose(1, 2), mask)

    candidates = [(f"genfast {impl} qv", absorbed(impl)) for impl in fused_impls(device)]
    if device != "cuda" or dim + v_dim <= FUSED_MAX_HEAD_DIM:
        candidates += [(f"genfast {impl} whole rows", whole_rows(impl)) for impl in fused_impls(device)]
        candidates += [(f"genfast {impl} concatenated", whole_rows(impl, lambda: torch.cat((latent, rope), -1)))
                       for impl in fused_impls(device)]
    candidates += [(f"torch SDPA {name} whole rows", dense_whole_rows(_sdpa(backend, "attn_mask", scale=scale)))
                   for name, backend in SDPA_BACKENDS.get(device, [])]
    candidates += [("eager reference", dense_whole_rows(
        lambda q4, k4, v4, m: reference.attention(q4, k4, v4, m, scale=scale)))]
    candidates += [(f"{name} qv", lambda fn=fn: fn(q[:, None], rope, latent, qv=qv[:, None], cache_seqlens=seqused_k,
                                                   softmax_scale=scale))
                   for name, fn in flash_attention_kvcache_peers(device) if name == "FlashAttention-3"]
    usable = [(name, fn) for name, fn in candidates if _runs(fn)]
    groups = {"attention MLA decode": (2 * heads * (dim + 2 * v_dim) * sum(used),
                                       [(name, torch.no_grad()(fn)) for name, fn in usable])}
    config = f"B={batch} H={heads} H_kv=1 Lk={length} used={'/'.join(map(str, used))} D={dim} Dv={v_dim}"
    return time_groups("attention", device, dtype, config, sum(used) * (dim + v_dim), groups, gemm, quick, say)


def flash_attention_kvcache_peers(device: str):
    """[(name, flash_attn_with_kvcache)] for each FlashAttention package importable here (GPU only)."""
    if device != "cuda":
        return []
    peers = []
    for name, module_name in FLASH_ATTENTION_MODULES:
        try:
            peers.append((name, importlib.import_module(module_name).flash_attn_with_kvcache))
        except (ImportError, AttributeError):
            continue
    return peers


def _kvcache_step_rows(device, dtype, gemm, quick, say):
    """One decoding step as flash_attn_with_kvcache runs it: each sequence of CACHE_DECODE_CONFIGS's
    padded cache appends one token's key and value (the key and the query rotated, Llama's rotary
    layout) and attends its keys. genfast.integrations.flash_attn's flash_attn_with_kvcache (the
    padded cache, and the same keys in pages of CACHE_PAGE_SIZES[0]) against FlashAttention's where
    installed, and the step as a model without FlashAttention writes it: the rotation, the cache's
    rows written by index, SDPA over the cache with a mask of each sequence's keys (each SDPA
    backend, and its torch.compile); the eager reference (reference.attention_kvcache). And the
    step's first half alone: genfast.kvcache_append against the same torch ops, their torch.compile
    and the reference."""
    from ..integrations import flash_attn as genfast_flash_attn
    from ..kvcache import kvcache_append as genfast_kvcache_append
    from ..reference.attention_kvcache import kvcache_append as reference_kvcache_append, kvcache_attention
    from ..reference.rotary import rotary

    batch, heads, kv_heads, length, dim = CACHE_DECODE_CONFIGS.get(device, CACHE_DECODE_CONFIGS["cpu"])
    used = [max(1, int(length * CACHE_DECODE_USED[n % len(CACHE_DECODE_USED)])) for n in range(batch)]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, 1, heads, dim, generator=g).to(device=device, dtype=dtype)
    new_k, new_v = (torch.randn(batch, 1, kv_heads, dim, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    k_cache, v_cache = (torch.randn(batch, length, kv_heads, dim, generator=g).to(device=device, dtype=dtype)
                        for _ in range(2))
    held = torch.tensor(used, device=device, dtype=torch.int32) - 1  # the step's token makes `used` keys
    angles = torch.arange(length, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, dim, 2) / dim)
    cos, sin = (t.to(device=device, dtype=dtype) for t in (angles.cos(), angles.sin()))
    step = dict(rotary_cos=cos, rotary_sin=sin, cache_seqlens=held, causal=True, rotary_interleaved=False)
    page_size = CACHE_PAGE_SIZES[0]
    order = torch.randperm(batch * length // page_size, generator=g).to(device)
    k_pages, v_pages = (t.reshape(-1, page_size, kv_heads, dim)[order] for t in (k_cache, v_cache))
    block_table = torch.argsort(order).view(batch, length // page_size).to(torch.int32)
    candidates = [(f"genfast {impl}", lambda impl=impl: genfast_flash_attn.flash_attn_with_kvcache(
        q, k_cache, v_cache, new_k, new_v, impl=impl, **step)) for impl in fused_impls(device)]
    candidates += [(f"genfast {impl} paged {page_size}", lambda impl=impl: genfast_flash_attn.flash_attn_with_kvcache(
        q, k_pages, v_pages, new_k, new_v, block_table=block_table, impl=impl, **step)) for impl in fused_impls(device)]
    candidates += [(name, lambda fn=fn: fn(q, k_cache, v_cache, new_k, new_v, **step))
                   for name, fn in flash_attention_kvcache_peers(device)]
    rows = torch.arange(batch, device=device)

    def torch_append(q, k_cache, v_cache, new_k, new_v, held):
        """The rotation and the cache's rows written, as torch ops: returns q turned."""
        position = held.long()[:, None]
        q, new_k = (rotary(t, cos, sin, position, interleaved=False) for t in (q, new_k))
        k_cache[rows, held.long()] = new_k[:, 0]
        v_cache[rows, held.long()] = new_v[:, 0]
        return q

    def sdpa_step(q, k_cache, v_cache, new_k, new_v, held, backend):
        q = torch_append(q, k_cache, v_cache, new_k, new_v, held)
        mask = (torch.arange(length, device=device)[None, :] <= held.long()[:, None])[:, None, None, :]
        with sdpa_kernel(backend):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                                               mask, enable_gqa=True)
        return o.transpose(1, 2)

    compiled = torch.compile(sdpa_step, dynamic=False)
    for name, backend in SDPA_BACKENDS.get(device, []):
        candidates += [(f"torch SDPA {name}", lambda backend=backend: sdpa_step(q, k_cache, v_cache, new_k, new_v,
                                                                                 held, backend)),
                       (f"torch.compile SDPA {name}", lambda backend=backend: compiled(q, k_cache, v_cache, new_k,
                                                                                        new_v, held, backend))]
    candidates += [("eager reference", lambda: kvcache_attention(
        q, k_cache, v_cache, new_k, new_v, cache_seqlens=held, causal=True, rotary_cos=cos, rotary_sin=sin,
        rotary_interleaved=False))]
    usable = [(name, fn) for name, fn in candidates if _runs(fn)]
    append_options = dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=False, q=q)
    compiled_append = torch.compile(torch_append, dynamic=False)
    appends = [(f"genfast {impl}", lambda impl=impl: genfast_kvcache_append(k_cache, v_cache, new_k, new_v, held,
                                                                            impl=impl, **append_options))
               for impl in fused_impls(device)]
    appends += [("torch ops", lambda: torch_append(q, k_cache, v_cache, new_k, new_v, held)),
                ("torch.compile torch ops", lambda: compiled_append(q, k_cache, v_cache, new_k, new_v, held)),
                ("eager reference", lambda: reference_kvcache_append(k_cache, v_cache, new_k, new_v, held,
                                                                     **append_options))]
    turns = 6 * batch * (heads + kv_heads) * dim // 2  # 4 products and 2 sums a plane
    groups = {"attention decode flash_attn_with_kvcache": (4 * heads * dim * sum(used),
                                                          [(name, torch.no_grad()(fn)) for name, fn in usable]),
              "kvcache append, rotary": (turns, [(name, torch.no_grad()(fn)) for name, fn in appends if _runs(fn)])}
    config = f"B={batch} H={heads} H_kv={kv_heads} Lk={length} used={'/'.join(map(str, used))} D={dim} rotary={dim}"
    return time_groups("attention", device, dtype, config, kv_heads * sum(used) * dim, groups, gemm, quick, say)


class _PagedCache:
    """transformers' continuous-batching cache as it lays out a full-attention layer
    (FullAttentionCacheAllocator): blocks of page_size tokens, each a page of keys and then a page of
    values, handed out in shuffled order; update writes the step's tokens at write_index and reads
    read_index back into one tensor, as transformers' update does; get_cache_for_block_table gives
    the page views its block tables index."""

    def __init__(self, blocks, page_size, kv_heads, dim, device, dtype, generator):
        flat = torch.randn(blocks * 2 * page_size, kv_heads, dim, generator=generator).to(device=device, dtype=dtype)
        self.page_size, self.k_tokens, self.v_tokens = page_size, flat, flat[page_size:]
        k_pages, v_pages = (t.view(-1, page_size, kv_heads, dim) for t in (self.k_tokens, self.v_tokens))
        self.k_pages, self.v_pages = k_pages[:v_pages.shape[0]], v_pages
        self.order = torch.randperm(blocks, generator=generator).tolist()

    def rows(self, lengths):
        """The token rows of sequences of these many tokens, each in blocks of its own: (rows per sequence)."""
        blocks, out = iter(self.order), []
        for length in lengths:
            mine = [next(blocks) for _ in range(-(-length // self.page_size))]
            out.append([mine[j // self.page_size] * 2 * self.page_size + j % self.page_size for j in range(length)])
        return out

    def update(self, key_states, value_states, layer_idx, read_index, write_index):
        self.k_tokens.index_copy_(0, write_index[0], key_states.transpose(1, 2).squeeze(0))
        self.v_tokens.index_copy_(0, write_index[0], value_states.transpose(1, 2).squeeze(0))
        if read_index[0].numel() == 0:
            return key_states.transpose(1, 2).squeeze(0), value_states.transpose(1, 2).squeeze(0)
        return self.k_tokens.index_select(0, read_index[0]), self.v_tokens.index_select(0, read_index[0])

    def get_cache_for_block_table(self, layer_idx):
        return 0, self.k_pages, self.v_pages


def _continuous_batching_rows(device, dtype, gemm, quick, say):
    """One layer's attention in a step of transformers' continuous batching, as each paged attention
    implementation runs it from the cache (_PagedCache; 256-token pages, transformers' default):
    "paged|genfast" writes the step's keys and values and reads the others from the cache's pages
    through a block table (attention_varlen); "paged|sdpa" and "paged|eager" write them, read every
    key back into one tensor, repeat the key heads and compute the batch's (total_q, total_k) square
    under the block-diagonal causal mask the step builds (timed apart from it: a step builds it once
    for all layers); FlashAttention's varlen where installed, after the same read back (transformers'
    flash path). Needs transformers."""
    try:
        import genfast.integrations.transformers as genfast_transformers
        from transformers.generation.continuous_batching.utils import build_attention_mask
        from transformers.integrations.eager_paged import eager_paged_attention_forward
        from transformers.integrations.sdpa_paged import sdpa_attention_paged_forward
    except ImportError:
        say("attention: continuous batching rows left out (transformers is not installed)")
        return []
    heads, kv_heads, dim, contexts, (chunk, chunk_cached) = CONTINUOUS_BATCHING_CONFIGS.get(
        device, CONTINUOUS_BATCHING_CONFIGS["cpu"])
    lengths_q, lengths_k = [1] * len(contexts) + [chunk], contexts + [chunk_cached + chunk]
    cu_q, cu_k = ([0] + torch.tensor(lengths).cumsum(0).tolist() for lengths in (lengths_q, lengths_k))
    g = torch.Generator().manual_seed(0)
    page_size = CONTINUOUS_BATCHING_PAGE_SIZE
    cache = _PagedCache(sum(-(-n // page_size) for n in lengths_k) + 8, page_size, kv_heads, dim, device, dtype, g)
    rows = cache.rows(lengths_k)
    read_index = torch.tensor([row for sequence in rows for row in sequence], device=device)
    write_index = torch.tensor([row for sequence, n in zip(rows, lengths_q) for row in sequence[len(sequence) - n:]],
                               device=device)
    q = torch.randn(1, heads, cu_q[-1], dim, generator=g).to(device=device, dtype=dtype)
    new_k, new_v = (torch.randn(1, kv_heads, cu_q[-1], dim, generator=g).to(device=device, dtype=dtype)
                    for _ in range(2))
    mask = torch.full((1, 1, cu_q[-1], cu_k[-1]), torch.finfo(dtype).min, device=device, dtype=dtype)
    build_attention_mask(mask, cu_q, cu_k)
    module = SimpleNamespace(layer_idx=0, scaling=dim ** -0.5, num_key_value_groups=heads // kv_heads)
    step = dict(scaling=module.scaling, cache=cache, read_index=[read_index], write_index=[write_index])
    cu_q_t, cu_k_t = (torch.tensor(cu, device=device, dtype=torch.int32) for cu in (cu_q, cu_k))
    varlen = dict(cu_seq_lens_q=cu_q_t, cu_seq_lens_k=cu_k_t, max_seqlen_q=max(lengths_q),
                  max_seqlen_k=max(lengths_k))
    candidates = [(f"genfast {impl}", lambda impl=impl: genfast_transformers.paged_attention_forward(
        module, q, new_k, new_v, None, impl=impl, **step, **varlen)) for impl in fused_impls(device)]
    if device == "cuda" and "triton" in fused_impls(device):
        # The Triton forward's tiles of one head for the packed batch (its longest sequence does not fit
        # a stacked tile), where by default they stack the group's heads: what the stacking gains.
        # GENFAST_TRITON_PACKED_STACK=0: kernels/triton/attention.py's _packed_stack off
        one_head_tiles = {"GENFAST_TRITON_PACKED_STACK": "0"}
        candidates.append(("genfast triton, tiles of one head", with_environment(
            lambda: genfast_transformers.paged_attention_forward(module, q, new_k, new_v, None, impl="triton",
                                                                 **step, **varlen), one_head_tiles)))
    candidates += [("transformers paged|sdpa", lambda: sdpa_attention_paged_forward(module, q, new_k, new_v, mask,
                                                                                   **step)),
                   ("transformers paged|eager", lambda: eager_paged_attention_forward(module, q, new_k, new_v, mask,
                                                                                     **step))]

    def read_back_then(fn):
        def run():
            k, v = cache.update(new_k, new_v, 0, [read_index], [write_index])
            return fn(q[0].transpose(0, 1), k, v, cu_q_t, max(lengths_q), cu_k_t, max(lengths_k))
        return run

    candidates += [(name, read_back_then(fn)) for name, _, fn in flash_attention_peers(device)]
    scores = sum(n * (m - n) + n * (n + 1) // 2 for n, m in zip(lengths_q, lengths_k))  # causal, bottom-right
    groups = {"attention continuous batching step": (4 * heads * dim * scores,
                                                     [(name, torch.no_grad()(fn)) for name, fn in candidates])}
    config = (f"H={heads} H_kv={kv_heads} D={dim} decoding={len(contexts)} keys={sum(contexts)} "
              f"chunk={chunk}+{chunk_cached} pages={page_size}")
    return time_groups("attention", device, dtype, config, cu_k[-1] * kv_heads * dim, groups, gemm, quick, say)


def _generate_batch_rows(device, dtype, gemm, quick, say):
    """transformers' generate_batch end to end (GENERATE_BATCH_CONFIGS; greedy, 256-token pages):
    the one-line change, attn_implementation "genfast" (whose batch runs as "paged|genfast") against
    "paged|sdpa", and "paged|flash_attention_2" where flash_attn is installed. FLOPs: the layers'
    and the LM head's weights twice over the tokens through them (the LM head on the sampled
    positions alone, as transformers computes it), and attention's causal scores. Needs
    transformers (and on the CPU psutil, which its cache sizing asks for)."""
    try:
        import genfast.integrations.transformers as genfast_transformers
        import transformers
        if device == "cpu":
            import psutil  # noqa: F401
    except ImportError as error:
        say(f"attention: generate_batch rows left out ({error.name} is not installed)")
        return []
    hidden, layers, heads, kv_heads, prompts, (shortest, longest), new_tokens, step_tokens = \
        GENERATE_BATCH_CONFIGS.get(device, GENERATE_BATCH_CONFIGS["cpu"])
    vocab, ffn, dim = 1000, 2 * hidden, hidden // heads
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=kv_heads, max_position_embeddings=longest + new_tokens)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(shortest, longest + 1, (prompts,), generator=g).tolist()
    inputs = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]
    generation = transformers.GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1,
                                               pad_token_id=0)
    page_size = CONTINUOUS_BATCHING_PAGE_SIZE
    batching = transformers.ContinuousBatchingConfig(
        page_size=page_size, max_batch_tokens=step_tokens,
        num_blocks=sum(-(-(n + new_tokens) // page_size) for n in lengths) + prompts)
    names = [(f"genfast {impl}", genfast_transformers.register(f"genfast_{impl}", impl))
             for impl in fused_impls(device)]
    names += [("transformers paged|sdpa", "paged|sdpa")]
    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        names += [("transformers paged|flash_attention_2", "paged|flash_attention_2")]

    def generate(name):
        model.set_attn_implementation(name)
        with torch.no_grad():
            return model.generate_batch(inputs=inputs, generation_config=generation,
                                        continuous_batching_config=batching)

    # Through the layers: each prompt token and each new token but the last; sampled: one a new token.
    through = sum(lengths) + prompts * (new_tokens - 1)
    weights = layers * (2 * hidden * hidden + 2 * hidden * kv_heads * dim + 3 * hidden * ffn)
    scores = sum((n + new_tokens - 1) * (n + new_tokens) // 2 for n in lengths)
    flops = 2 * weights * through + 2 * hidden * vocab * prompts * new_tokens + 4 * layers * heads * dim * scores
    groups = {"attention transformers generate_batch": (flops, [(label, lambda name=name: generate(name))
                                                                for label, name in names])}
    shape = (f"Llama hidden={hidden} layers={layers} H={heads} H_kv={kv_heads} prompts={prompts}x"
             f"{shortest}-{longest} new={new_tokens} step={step_tokens}")
    return time_groups("attention", device, dtype, shape, sum(lengths), groups, gemm, quick, say)


def _varlen_rows(device, dtype, heads, dim, lengths, gemm, quick, say):
    """Packed causal sequences: genfast.attention_varlen against SDPA on the batch padded to the
    longest sequence (with its padding mask) and against SDPA called once per sequence; and
    genfast.attention on the padded batch with that mask, as a transformers model with padding
    calls it (the kernels skip the key blocks the mask hides whole)."""
    g = torch.Generator().manual_seed(0)
    total, longest = sum(lengths), max(lengths)
    q, k, v = (torch.randn(total, heads, dim, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    starts = cu.tolist()
    padded = [torch.zeros(len(lengths), heads, longest, dim, device=device, dtype=dtype) for _ in range(3)]
    for n, length in enumerate(lengths):
        for dst, src in zip(padded, (q, k, v)):
            dst[n, :, :length] = src[starts[n]:starts[n + 1]].transpose(0, 1)
    position = torch.arange(longest, device=device)
    real = position[None, :] < torch.tensor(lengths, device=device)[:, None]
    mask = (position[:, None] >= position[None, :])[None, None] & real[:, None, None, :]

    def packed(q, k, v, impl):
        return attention_varlen(q, k, v, cu, cu, longest, longest, causal="top_left", impl=impl)

    def per_sequence(q, k, v):
        outs = [F.scaled_dot_product_attention(*(t[starts[n]:starts[n + 1]].transpose(0, 1) for t in (q, k, v)),
                                               is_causal=True) for n in range(len(lengths))]
        return torch.cat([o.transpose(0, 1) for o in outs])

    candidates = [(f"genfast {impl}", lambda q, k, v, impl=impl: packed(q, k, v, impl)) for impl in fused_impls(device)]
    if hopper_available(device):
        candidates += [("genfast native Hopper", with_hopper(lambda q, k, v: packed(q, k, v, "native")))]
    candidates += [("torch SDPA per sequence", per_sequence)]
    candidates += [(name, lambda q, k, v, fn=varlen: fn(q, k, v, cu, longest))
                   for name, _, varlen in flash_attention_peers(device)]
    flops = sum(2 * heads * n * n * dim for n in lengths)  # causal: half of 4 H n^2 D each
    packed_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    padded_leaves = [t.clone().requires_grad_() for t in padded]
    grad, padded_grad = torch.randn_like(q), torch.randn_like(padded[0])

    padded_candidates = [(f"genfast {impl} padded",
                          lambda q, k, v, impl=impl: attention(q, k, v, attn_mask=mask, impl=impl))
                         for impl in fused_impls(device)]
    padded_candidates += [("torch SDPA padded", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, mask))]
    groups = {
        "attention varlen forward causal": (
            flops, [(name, lambda fn=fn: fn(q, k, v)) for name, fn in candidates]
            + [(name, lambda fn=fn: fn(*padded)) for name, fn in padded_candidates]),
        "attention varlen forward+backward causal": (
            3.5 * flops, [(name, in_environment(fn, lambda fn=fn: torch.autograd.grad(fn(*packed_leaves),
                                                                                        packed_leaves, grad)))
                          for name, fn in candidates]
            + [(name, lambda fn=fn: torch.autograd.grad(fn(*padded_leaves), padded_leaves, padded_grad))
               for name, fn in padded_candidates]),
    }
    config = f"H={heads} D={dim} lengths={'/'.join(map(str, lengths))}"
    return time_groups("attention", device, dtype, config, total * heads * dim, groups, gemm, quick, say)
