"""attn_implementation="genfast" in transformers models built from small configurations (random
weights, no download): logits and parameter gradients against the "eager" implementation by the
error-ratio rule (float64 eager as the exact value, float32 eager as the low-precision one), with
grouped-query heads, padding masks, Gemma 2's soft-capping and sliding window, gpt-oss's attention
sinks, cached generation and continuous batching."""

import copy
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from genfast.reference import attention as reference  # noqa: E402
import genfast.integrations.transformers as genfast_transformers  # noqa: E402
from genfast.testing.tolerances import assert_error_ratio  # noqa: E402
from conftest import devices, fused_impls, skip_unless_supported  # noqa: E402

VOCAB = 97


def _gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)


def _gemma2():
    config = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                       max_position_embeddings=64, attn_logit_softcapping=2.0, sliding_window=8,
                                       bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.Gemma2ForCausalLM(config)


def _gpt_oss():
    """gpt-oss: attention sinks (s_aux) in every layer, a sliding window in every other one."""
    config = transformers.GptOssConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                       num_experts_per_tok=2, sliding_window=8,
                                       layer_types=["sliding_attention", "full_attention"],
                                       max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                       experts_implementation="eager")  # grouped_mm has no float64
    model = transformers.GptOssForCausalLM(config)
    with torch.no_grad():  # sinks of either sign, larger than their initialization's (std 0.02)
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)
    return model


def _deepseek_v32():
    """DeepSeek V3.2: its indexer's top-k keys of each query (3 of up to 21) reach the attention
    function as `indices`, which eager folds into its mask."""
    config = transformers.DeepseekV32Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1, n_routed_experts=4, n_group=1,
        topk_group=1, num_experts_per_tok=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, v_head_dim=8,
        qk_nope_head_dim=8, head_dim=8, index_topk=3, index_head_dim=8, index_n_heads=2, first_k_dense_replace=1,
        max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.DeepseekV32ForCausalLM(config)


MODELS = {"gpt2": _gpt2, "llama-gqa": _llama, "gemma2-softcap-window": _gemma2, "gpt-oss-sinks": _gpt_oss,
          "deepseek-v32-sparse": _deepseek_v32}


def _model(name, attn_implementation, dtype=torch.float32):
    torch.manual_seed(0)
    model = MODELS[name]().to(dtype).eval()
    model.set_attn_implementation(attn_implementation)
    return model


def _logits_and_grads(model, ids, attention_mask, weights):
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=attention_mask).logits
    (logits.double() * weights).sum().backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    return logits.detach(), grads


def _compare(name, impl, ids, attention_mask=None, valid=None, reference="eager"):
    g = torch.Generator().manual_seed(1)
    weights = torch.randn(*ids.shape, VOCAB, generator=g, dtype=torch.float64)
    if valid is not None:
        weights = weights * valid[..., None]
    fused = _model(name, genfast_transformers.register(f"genfast_{impl}", impl))
    got = _logits_and_grads(fused, ids, attention_mask, weights)
    exact = _logits_and_grads(_model(name, reference, torch.float64), ids, attention_mask, weights)
    low = _logits_and_grads(_model(name, reference), ids, attention_mask, weights)
    keep = (lambda t: t[valid.bool()]) if valid is not None else (lambda t: t)
    assert_error_ratio(keep(got[0]), keep(exact[0]), keep(low[0]), msg="logits")
    assert_error_ratio(got[1], exact[1], low[1], ratio=3.0, msg="parameter gradients")


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("impl", fused_impls())
def test_matches_eager(name, impl):
    skip_unless_supported(impl, "cpu")
    ids = torch.randint(1, VOCAB, (2, 21), generator=torch.Generator().manual_seed(2))
    _compare(name, impl, ids)


def test_output_attentions_warns_and_gives_none():
    """The fused kernels never form the weights: output_attentions=True gets None for each layer's,
    with a warning naming eager, as "sdpa" does; the logits are unchanged."""
    model = _model("llama-gqa", genfast_transformers.NAME)
    ids = torch.randint(1, VOCAB, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with pytest.warns(UserWarning, match="eager"):
            out = model(input_ids=ids, output_attentions=True)
    assert out.attentions is not None and all(a is None for a in out.attentions)
    torch.testing.assert_close(out.logits, plain, rtol=0, atol=0)


@pytest.mark.parametrize("impl", fused_impls())
def test_padding_mask_matches_eager(impl):
    """Left padding: transformers' boolean mask, compared where the tokens are real (the padded
    queries' rows mask every key; genfast gives them zeros, the others a uniform average). The
    reference is "sdpa": "eager" in float64 turns those rows into NaN (its additive mask overflows),
    which then reaches every position through the next layer's zero weights."""
    skip_unless_supported(impl, "cpu")
    ids = torch.randint(1, VOCAB, (3, 17), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :11] = 0
    ids = ids.masked_fill(mask == 0, 0)
    _compare("llama-gqa", impl, ids, mask, valid=mask, reference="sdpa")


@pytest.mark.parametrize("impl", fused_impls())
def test_cached_generation_matches_eager(impl):
    """Greedy decoding with the KV cache (one query against the cached keys per step)."""
    skip_unless_supported(impl, "cpu")
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    outputs = []
    for attn in (genfast_transformers.register(f"genfast_{impl}", impl), "eager"):
        model = _model("llama-gqa", attn)
        with torch.no_grad():
            outputs.append(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                          do_sample=False, output_scores=True, return_dict_in_generate=True))
    fused, eager = outputs
    assert torch.equal(fused.sequences, eager.sequences)
    for a, e in zip(fused.scores, eager.scores):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama-gqa", "gpt-oss-sinks"])
@pytest.mark.parametrize("impl", fused_impls())
def test_packed_sequences_run_as_varlen(name, impl, monkeypatch):
    """Three sequences packed into one row without padding, with flash_attn_varlen_func's kwargs (what
    DataCollatorWithFlattening(return_flash_attn_kwargs=True) gives): genfast runs them through
    attention_varlen. Logits and parameter gradients equal, by the error-ratio rule, to "eager"'s
    running each sequence alone (transformers' eager masks of gpt-oss do not read the packing)."""
    skip_unless_supported(impl, "cpu")
    lengths = [7, 9, 5]
    bounds = [0, 7, 16, 21]
    ids = torch.randint(1, VOCAB, (1, sum(lengths)), generator=torch.Generator().manual_seed(6))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor(bounds, dtype=torch.int32)
    calls = []
    real_varlen = genfast_transformers.attention_varlen

    def attention_varlen(*args, **kwargs):
        calls.append(kwargs)
        return real_varlen(*args, **kwargs)

    monkeypatch.setattr(genfast_transformers, "attention_varlen", attention_varlen)
    weights = torch.randn(*ids.shape, VOCAB, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def grads(model):
        return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])

    fused = _model(name, genfast_transformers.register(f"genfast_{impl}", impl))
    logits = fused(input_ids=ids, position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9,
                   max_length_k=9, use_cache=False).logits
    (logits.double() * weights).sum().backward()
    got = (logits.detach(), grads(fused))
    alone = []
    for dtype in (torch.float64, torch.float32):
        model = _model(name, "eager", dtype)
        parts = []
        for a, b in zip(bounds, bounds[1:]):
            part = model(input_ids=ids[:, a:b], use_cache=False).logits
            (part.double() * weights[:, a:b]).sum().backward()  # the gradients add up over the sequences
            parts.append(part.detach())
        alone.append((torch.cat(parts, 1), grads(model)))
    exact, low = alone
    assert calls and all(call["causal"] == "bottom_right" for call in calls)
    assert_error_ratio(got[0], exact[0], low[0], msg="logits")
    assert_error_ratio(got[1], exact[1], low[1], ratio=3.0, msg="parameter gradients")


@pytest.mark.parametrize("page_size", [16, 256])
@pytest.mark.parametrize("name", ["llama-gqa", "gemma2-softcap-window", "gpt-oss-sinks"])
@pytest.mark.parametrize("impl", fused_impls())
def test_continuous_batching_matches_eager_generation(name, impl, page_size, monkeypatch):
    """generate_batch (continuous batching, "paged|" + the model's implementation): prompts longer
    than the sliding window, two of them with a common prefix, prefilled in chunks of 8 tokens
    beside other sequences' decoding steps, each batch one attention_varlen call a layer (causal
    from each sequence's bottom-right corner, the window in the local layers, the full-attention
    layers reading the cache's pages through a block table). The tokens and their log-probabilities
    equal those of greedy "eager" generation of each prompt alone."""
    skip_unless_supported(impl, "cpu")
    pytest.importorskip("psutil")  # transformers sizes the paged cache on the CPU with it
    prompts = [torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (13, 3, 21)]
    prompts.append(prompts[2][:19] + [5])  # a prefix that transformers may share the cached pages of
    new_tokens = 5
    calls = []
    real_varlen = genfast_transformers.attention_varlen

    def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *args, **kwargs):
        calls.append((cu_seqlens_q.tolist(), cu_seqlens_k.tolist(), kwargs["block_table"] is not None,
                      kwargs["causal"], kwargs["window"]))
        return real_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *args, **kwargs)

    monkeypatch.setattr(genfast_transformers, "attention_varlen", attention_varlen)
    model = _model(name, genfast_transformers.register(f"genfast_{impl}", impl))
    config = transformers.ContinuousBatchingConfig(page_size=page_size, num_blocks=32, max_batch_tokens=8,
                                                   return_logprobs=True)
    generation = transformers.GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1,
                                               pad_token_id=0)
    with torch.no_grad():
        outputs = model.generate_batch(inputs=prompts, generation_config=generation,
                                       continuous_batching_config=config)
    assert model.config._attn_implementation == f"genfast_{impl}"  # restored after the batch
    eager = _model(name, "eager")
    assert len(outputs) == len(prompts)
    for prompt, output in zip(prompts, sorted(outputs.values(), key=lambda output: output.request_id)):
        assert output.error is None and output.prompt_ids == prompt
        with torch.no_grad():
            alone = eager.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                                   eos_token_id=-1, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        tokens = alone.sequences[0, len(prompt):]
        assert output.generated_tokens == tokens.tolist()
        logprobs = torch.stack([score[0].log_softmax(-1)[token] for score, token in zip(alone.scores, tokens)])
        torch.testing.assert_close(torch.tensor(output.logprobs), logprobs, atol=1e-4, rtol=1e-4)
    assert all(causal == "bottom_right" for *_, causal, _ in calls)
    chunked = [(cu_q, cu_k) for cu_q, cu_k, *_ in calls if cu_q[-1] > len(cu_q) - 1]  # a prompt's chunk in the batch
    assert any(cu_k[-1] > cu_q[-1] for cu_q, cu_k in chunked), "no chunk read keys cached by an earlier step"
    windows = {window for *_, window in calls}
    assert windows == ({None} if name == "llama-gqa" else {None, (7, 0)})  # sliding_window=8
    assert any(paged for _, _, paged, _, window in calls if window is None), "no layer read the cache's pages"
    assert not any(paged for _, _, paged, _, window in calls if window is not None)  # a ring of pages: read back


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
def test_paged_attention_reads_the_cache_pages(impl, device, dtype):
    """One layer's step from a cache laid out as transformers' full-attention layers lay it out
    (the benchmark's, 64-key pages in shuffled order): decoding sequences beside a prompt's chunk,
    read through the block table, against the reference on the keys read back, by the error-ratio
    rule (on a GPU in bfloat16, the CUDA kernels' dtype)."""
    skip_unless_supported(impl, device, dtype)
    if device == "cuda" and dtype == torch.float32 and impl == "native":
        pytest.skip("the CUDA kernels take float16 and bfloat16")
    from genfast.benchmarks.attention import _PagedCache
    g = torch.Generator().manual_seed(3)
    lengths_q, lengths_k = [1, 1, 70, 1], [300, 9, 150, 64]
    cache = _PagedCache(16, 64, 2, 32, device, dtype, g)
    rows = cache.rows(lengths_k)
    read = torch.tensor([row for sequence in rows for row in sequence], device=device)
    write = torch.tensor([row for sequence, n in zip(rows, lengths_q) for row in sequence[-n:]], device=device)
    q, new_k, new_v = (torch.randn(1, heads, sum(lengths_q), 32, generator=g).to(device=device, dtype=dtype)
                       for heads in (8, 2, 2))
    cu_q, cu_k = (torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
                  for lengths in (lengths_q, lengths_k))
    module = SimpleNamespace(layer_idx=0, scaling=0.2)  # a full-attention layer: no sliding_window
    out, _ = genfast_transformers.paged_attention_forward(
        module, q, new_k, new_v, None, cache=cache, cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k, max_seqlen_q=70,
        max_seqlen_k=300, read_index=[read], write_index=[write], impl=impl)
    k, v = cache.update(new_k, new_v, 0, [read], [write])  # every key, written and read back
    expected = [reference.varlen_attention(q[0].transpose(0, 1).to(precision), k.to(precision), v.to(precision),
                                           cu_q, cu_k, causal="bottom_right", scale=module.scaling, enable_gqa=True)
                for precision in (torch.float64, dtype)]
    assert out.shape == (1, sum(lengths_q), 8, 32) and out.dtype == dtype
    assert_error_ratio(out[0], *expected)


def test_paged_attention_needs_the_cache_and_takes_no_block_table():
    model = _model("llama-gqa", "paged|genfast")
    with pytest.raises(ValueError, match="no paged attention cache"):
        model(input_ids=torch.tensor([[1, 2, 3]]))
    q, k = torch.zeros(1, 4, 2, 16), torch.zeros(1, 2, 2, 16)
    with pytest.raises(ValueError, match="block_table .* is not supported"):
        genfast_transformers.paged_attention_forward(model.model.layers[0].self_attn, q, k, k, None, cache=object(),
                                                     block_table=torch.zeros(1, 2, 1, dtype=torch.int32))


def test_sliding_window_layers_pass_their_window_as_a_band(monkeypatch):
    """Gemma 2's local layers hand the kernels their window beside the mask where the queries are
    the keys' positions (the prefill); its global layers, and the cached decoding steps, do not."""
    calls = []
    real_attention = genfast_transformers.attention

    def attention(query, key, *args, **kwargs):
        calls.append((query.shape[2], key.shape[2], kwargs.get("window")))
        return real_attention(query, key, *args, **kwargs)

    monkeypatch.setattr(genfast_transformers, "attention", attention)
    ids = torch.randint(1, VOCAB, (2, 21), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _model("gemma2-softcap-window", "genfast").generate(ids, attention_mask=torch.ones_like(ids),
                                                            max_new_tokens=2, do_sample=False)
    assert [window for q_length, _, window in calls if q_length == 21] == [(7, 7), None]  # sliding_window=8
    steps = [(k_length, window) for q_length, k_length, window in calls if q_length == 1]
    assert steps and all(window is None for _, window in steps)


def test_registration():
    assert genfast_transformers.register() == "genfast"
    assert "genfast" in transformers.AttentionInterface._global_mapping
    assert "paged|genfast" in transformers.AttentionInterface._global_mapping
    with pytest.raises(ValueError, match="impl must be one of"):
        genfast_transformers.register("genfast_bad", "cuda")
    model = _model("gpt2", "genfast")
    clone = copy.deepcopy(model)
    assert clone.config._attn_implementation == "genfast"
