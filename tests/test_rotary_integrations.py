"""genfast.rotary in others' clothes: FlashAttention's apply_rotary_emb (dense, per-sequence offsets,
packed by cu_seqlens, in place), its in-place qkv and kv forms and its RotaryEmbedding layer (RoPE
and XPos), against the reference at the positions and with the tables FlashAttention defines;
transformers' apply_rotary_pos_emb against transformers' own (Llama's and GPT-NeoX's partial
form), forward and backward, and a Llama model patched in one line against the unpatched one."""

import pytest
import torch

from genfast.integrations import flash_attn as fa
from genfast.reference.rotary import rotary as reference_rotary
from genfast.testing.tolerances import assert_error_ratio
from conftest import fused_impls, skip_unless_supported

BATCH, SEQLEN, HEADS, DIM = 3, 6, 4, 16


def _tables(rotary_dim, positions=24, dtype=torch.float32):
    inverse = 1.0 / 10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * inverse
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _expected(x, cos, sin, positions, interleaved):
    return reference_rotary(x.double(), cos.double(), sin.double(), positions, interleaved).float()


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
@pytest.mark.parametrize("impl", fused_impls() + ["reference"])
def test_flash_attn_apply_rotary_emb(impl, interleaved):
    skip_unless_supported(impl, "cpu")
    cos, sin = _tables(10)
    x = torch.randn(BATCH, SEQLEN, HEADS, DIM)
    steps = torch.arange(SEQLEN)
    for offsets, rows in ((0, steps.expand(BATCH, SEQLEN)), (5, (steps + 5).expand(BATCH, SEQLEN)),
                          (torch.tensor([0, 9, 3], dtype=torch.int32), steps + torch.tensor([[0], [9], [3]]))):
        got = fa.apply_rotary_emb(x, cos, sin, interleaved, seqlen_offsets=offsets, impl=impl)
        torch.testing.assert_close(got, _expected(x, cos, sin, rows, interleaved))
        turned = x.clone()
        assert fa.apply_rotary_emb(turned, cos, sin, interleaved, True, offsets, impl=impl) is turned
        torch.testing.assert_close(turned, got)
    back = fa.apply_rotary(got, cos, sin, offsets, interleaved=interleaved, conjugate=True, impl=impl)
    torch.testing.assert_close(back, x)


@pytest.mark.parametrize("impl", fused_impls())
def test_flash_attn_packed_sequences(impl):
    """x (total, heads, head_dim) packed by cu_seqlens: each token at its place in its sequence, plus
    the sequence's offset; gradients too."""
    skip_unless_supported(impl, "cpu")
    cos, sin = _tables(DIM)
    lengths, offsets = [4, 0, 7, 2], torch.tensor([3, 0, 1, 10])
    cu_seqlens = torch.tensor([0, 4, 4, 11, 13], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) + int(o) for n, o in zip(lengths, offsets)])
    x = torch.randn(13, HEADS, DIM, requires_grad=True)
    got = fa.apply_rotary_emb(x, cos, sin, seqlen_offsets=offsets, cu_seqlens=cu_seqlens, max_seqlen=7, impl=impl)
    grad = torch.randn_like(got)
    got.backward(grad)
    exact_x = x.detach().double().requires_grad_()
    exact = reference_rotary(exact_x, cos.double(), sin.double(), positions, False)
    exact.backward(grad.double())
    low_x = x.detach().requires_grad_()
    low = reference_rotary(low_x, cos, sin, positions, False)
    low.backward(grad)
    assert_error_ratio(got, exact, low, msg="out")
    assert_error_ratio(x.grad, exact_x.grad, low_x.grad, ratio=3.0, msg="grad")
    turned = x.detach().clone()
    fa.apply_rotary_emb(turned, cos, sin, inplace=True, seqlen_offsets=offsets, cu_seqlens=cu_seqlens, impl=impl)
    torch.testing.assert_close(turned, got.detach())


@pytest.mark.parametrize("impl", fused_impls())
def test_flash_attn_qkv_and_kv_in_place(impl):
    """q and k of a packed qkv turned in place, v untouched; grouped heads by num_heads_q; k by its own
    tables; gradients through the in-place turns of a qkv that a layer computed."""
    skip_unless_supported(impl, "cpu")
    cos, sin = _tables(DIM)
    cos_k, sin_k = _tables(8)
    rows = torch.arange(SEQLEN).expand(BATCH, SEQLEN) + 2
    qkv = torch.randn(BATCH, SEQLEN, 3, HEADS, DIM)
    expected = qkv.clone()
    expected[:, :, 0] = _expected(qkv[:, :, 0], cos, sin, rows, True)
    expected[:, :, 1] = _expected(qkv[:, :, 1], cos_k, sin_k, rows, True)
    assert fa.apply_rotary_emb_qkv_(qkv, cos, sin, cos_k, sin_k, interleaved=True, seqlen_offsets=2, impl=impl) is qkv
    torch.testing.assert_close(qkv, expected)
    grouped = torch.randn(BATCH, SEQLEN, HEADS + 2 * 2, DIM)
    expected = grouped.clone()
    expected[:, :, :HEADS] = _expected(grouped[:, :, :HEADS], cos, sin, rows - 2, False)
    expected[:, :, HEADS:HEADS + 2] = _expected(grouped[:, :, HEADS:HEADS + 2], cos, sin, rows - 2, False)
    fa.apply_rotary_emb_qkv_(grouped, cos, sin, num_heads_q=HEADS, impl=impl)
    torch.testing.assert_close(grouped, expected)
    kv = torch.randn(BATCH, SEQLEN, 2, HEADS, DIM)
    expected = kv.clone()
    expected[:, :, 0] = _expected(kv[:, :, 0], cos, sin, rows, False)
    fa.apply_rotary_emb_kv_(kv, cos, sin, seqlen_offsets=2, impl=impl)
    torch.testing.assert_close(kv, expected)

    weight = torch.randn(3 * HEADS * DIM, 8, requires_grad=True)
    inputs = torch.randn(BATCH, SEQLEN, 8)
    for turn in ("genfast", "reference"):
        qkv = (inputs @ weight.T).view(BATCH, SEQLEN, 3, HEADS, DIM)
        if turn == "genfast":
            fa.apply_rotary_emb_qkv_(qkv, cos, sin, impl=impl)
        else:
            qkv = torch.stack((reference_rotary(qkv[:, :, 0], cos, sin, rows - 2, False),
                               reference_rotary(qkv[:, :, 1], cos, sin, rows - 2, False), qkv[:, :, 2]), 2)
        (grad,) = torch.autograd.grad((qkv * torch.linspace(-1, 1, qkv.numel()).view_as(qkv)).sum(), weight)
        if turn == "genfast":
            fused_grad = grad
    torch.testing.assert_close(fused_grad, grad)


def _flash_tables(dim, seqlen, scale_base=None):
    """FlashAttention's RotaryEmbedding tables, written out in float64: (cos, sin) for q, and for k."""
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    freqs = torch.arange(seqlen, dtype=torch.float64)[:, None] * inv_freq
    if scale_base is None:
        return (freqs.cos(), freqs.sin()), (freqs.cos(), freqs.sin())
    scale = ((torch.arange(0, dim, 2, dtype=torch.float64) + 0.4 * dim) / (1.4 * dim)) ** (
        (torch.arange(seqlen, dtype=torch.float64) - seqlen // 2) / scale_base)[:, None]
    return (freqs.cos() * scale, freqs.sin() * scale), (freqs.cos() / scale, freqs.sin() / scale)


@pytest.mark.parametrize("scale_base", [None, 512.0], ids=["rope", "xpos"])
@pytest.mark.parametrize("impl", fused_impls())
def test_flash_attn_rotary_embedding_layer(impl, scale_base):
    """RotaryEmbedding(qkv) and (q, kv), an int offset and one per sequence, grouped heads; its
    tables against FlashAttention's formulas, and the gradient through its in-place turns (XPos's
    scaled turn included: the backward is the transpose, sin negated, for any tables)."""
    skip_unless_supported(impl, "cpu")
    layer = fa.RotaryEmbedding(DIM // 2, scale_base=scale_base, impl=impl)
    rows = torch.arange(SEQLEN).expand(BATCH, SEQLEN)
    qkv = torch.randn(BATCH, SEQLEN, 3, HEADS, DIM)
    (cos, sin), (cos_k, sin_k) = _flash_tables(DIM // 2, SEQLEN + 3, scale_base)
    expected = qkv.clone()
    expected[:, :, 0] = reference_rotary(qkv[:, :, 0].double(), cos, sin, rows + 3, False).float()
    expected[:, :, 1] = reference_rotary(qkv[:, :, 1].double(), cos_k, sin_k, rows + 3, False).float()
    assert layer(qkv, seqlen_offset=3) is qkv
    torch.testing.assert_close(qkv, expected, rtol=1e-5, atol=1e-5)
    assert layer._seq_len_cached == SEQLEN + 3

    offsets = torch.tensor([0, 4, 9])
    (cos, sin), (cos_k, sin_k) = _flash_tables(DIM // 2, 16, scale_base)
    q, kv = torch.randn(BATCH, SEQLEN, HEADS, DIM), torch.randn(BATCH, SEQLEN, 2, 2, DIM)
    expected_q = reference_rotary(q.double(), cos, sin, rows + offsets[:, None], False).float()
    expected_k = reference_rotary(kv[:, :, 0].double(), cos_k, sin_k, rows + offsets[:, None], False).float()
    got_q, got_kv = layer(q, kv, seqlen_offset=offsets, max_seqlen=16)
    torch.testing.assert_close(got_q, expected_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_kv[:, :, 0], expected_k, rtol=1e-5, atol=1e-5)

    weight = torch.randn(3 * HEADS * DIM, 8, dtype=torch.float64, requires_grad=True)
    inputs = torch.randn(BATCH, SEQLEN, 8, dtype=torch.float64)
    grads = []
    # the tables stay those of the longest sequence yet (16): XPos's scale centres on its middle
    (cos, sin), (cos_k, sin_k) = _flash_tables(DIM // 2, layer._seq_len_cached, scale_base)
    for turn in ("layer", "written out"):
        qkv = (inputs @ weight.T).view(BATCH, SEQLEN, 3, HEADS, DIM).float()
        if turn == "layer":
            layer.train()
            layer(qkv)
        else:
            qkv = torch.stack((reference_rotary(qkv[:, :, 0], cos.float(), sin.float(), rows, False),
                               reference_rotary(qkv[:, :, 1], cos_k.float(), sin_k.float(), rows, False),
                               qkv[:, :, 2]), 2)
        grads.append(torch.autograd.grad((qkv.double() * torch.linspace(-1, 1, qkv.numel()).view_as(qkv)).sum(),
                                         weight)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_flash_attn_bad_input():
    cos, sin = _tables(DIM)
    x = torch.randn(BATCH, SEQLEN, HEADS, DIM)
    with pytest.raises(ValueError, match="seqlen_offsets must be an int or a tensor"):
        fa.apply_rotary_emb(x, cos, sin, seqlen_offsets=torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"x must be \(total_seqlen, heads, head_dim\) with cu_seqlens"):
        fa.apply_rotary_emb(x, cos, sin, cu_seqlens=torch.tensor([0, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"qkv must be \(batch, seqlen, 3"):
        fa.apply_rotary_emb_qkv_(x, cos, sin)
    with pytest.raises(ValueError, match=r"kv must be \(batch, seqlen, 2"):
        fa.apply_rotary_emb_kv_(x, cos, sin)
    with pytest.raises(ValueError, match="cos_k and sin_k go together"):
        fa.apply_rotary_emb_qkv_(torch.randn(BATCH, SEQLEN, 3, HEADS, DIM), cos, sin, cos_k=cos)


transformers = pytest.importorskip("transformers")
from transformers.models.llama import modeling_llama  # noqa: E402

import genfast.integrations.transformers as genfast_transformers  # noqa: E402


@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
@pytest.mark.parametrize("impl", fused_impls())
def test_transformers_apply_rotary_pos_emb(impl, unsqueeze_dim):
    """transformers' own function, its tables from LlamaRotaryEmbedding, one batch row or several."""
    skip_unless_supported(impl, "cpu")
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64)
    rotary_embedding = modeling_llama.LlamaRotaryEmbedding(config)
    for position_ids in (torch.arange(SEQLEN)[None], torch.tensor([[0, 1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12]])):
        batch = 2
        shape = (batch, 4, SEQLEN, DIM) if unsqueeze_dim == 1 else (batch, SEQLEN, 4, DIM)
        q = torch.randn(shape, requires_grad=True)
        k = torch.randn(shape[:1] + ((2, SEQLEN) if unsqueeze_dim == 1 else (SEQLEN, 2)) + shape[3:],
                        requires_grad=True)
        cos, sin = rotary_embedding(q, position_ids)
        got = genfast_transformers.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim, impl=impl)
        expected = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        grads = [torch.randn_like(t) for t in expected]
        for a, e, g in zip(got, expected, grads):
            assert a.shape == e.shape
            torch.testing.assert_close(a, e)
            torch.testing.assert_close(torch.autograd.grad(a, (q, k), g, allow_unused=True, retain_graph=True),
                                       torch.autograd.grad(e, (q, k), g, allow_unused=True, retain_graph=True),
                                       equal_nan=True)


@pytest.mark.parametrize("impl", fused_impls())
def test_transformers_partial_rotary_form(impl):
    """GPT-NeoX's and Phi's form, which turns the first cos.shape[-1] features only."""
    skip_unless_supported(impl, "cpu")
    from transformers.models.gpt_neox import modeling_gpt_neox

    config = transformers.GPTNeoXConfig(hidden_size=64, num_attention_heads=4, rotary_pct=0.25,
                                        max_position_embeddings=64)
    rotary_embedding = modeling_gpt_neox.GPTNeoXRotaryEmbedding(config)
    q = torch.randn(2, 4, SEQLEN, DIM, requires_grad=True)
    k = torch.randn(2, 4, SEQLEN, DIM, requires_grad=True)
    cos, sin = rotary_embedding(q, torch.arange(SEQLEN)[None])
    assert cos.shape[-1] == DIM // 4
    got = genfast_transformers.apply_rotary_pos_emb(q, k, cos, sin, impl=impl)
    expected = modeling_gpt_neox.apply_rotary_pos_emb(q, k, cos, sin)
    grads = [torch.randn_like(t) for t in expected]
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e)
    torch.testing.assert_close(torch.autograd.grad(got, (q, k), grads), torch.autograd.grad(expected, (q, k), grads))


@pytest.mark.parametrize("impl", fused_impls())
def test_llama_patched_in_one_line(impl, monkeypatch):
    """modeling_llama.apply_rotary_pos_emb replaced: logits and parameter gradients as before."""
    skip_unless_supported(impl, "cpu")
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(3))

    def logits_and_grads(dtype):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).to(dtype)
        logits = model(input_ids=ids).logits
        logits.double().square().sum().backward()
        return logits.detach(), torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    exact = logits_and_grads(torch.float64)
    low = logits_and_grads(torch.float32)
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb",
                        lambda *args, **kwargs: genfast_transformers.apply_rotary_pos_emb(*args, **kwargs, impl=impl))
    got = logits_and_grads(torch.float32)
    assert_error_ratio(got[0], exact[0], low[0], msg="logits")
    assert_error_ratio(got[1], exact[1], low[1], ratio=3.0, msg="parameter gradients")


def test_transformers_rotary_promotes_as_transformers():
    """16-bit q and k beside float32 cos and sin (a float32 model under autocast): turned in float32,
    as transformers' products promote them."""
    q = torch.randn(2, 4, SEQLEN, DIM, dtype=torch.bfloat16)
    k = torch.randn(2, 2, SEQLEN, DIM, dtype=torch.bfloat16)
    angles = torch.rand(1, SEQLEN, DIM // 2) * 6.0
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    got = genfast_transformers.apply_rotary_pos_emb(q, k, cos, sin)
    expected = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    for a, e in zip(got, expected):
        assert a.dtype == e.dtype == torch.float32
        torch.testing.assert_close(a, e)


def test_transformers_rotary_patch_checks_the_layout(monkeypatch):
    """patch() puts genfast's function into a module of rotate_half's layout (returning the module's
    own) and refuses those of GPT-J's interleaved one, Cohere's and GLM's, leaving them as they are."""
    from genfast.integrations import transformers_rotary
    from transformers.models.cohere import modeling_cohere
    from transformers.models.glm import modeling_glm

    own = modeling_llama.apply_rotary_pos_emb
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", own)  # put back after the test
    assert transformers_rotary.patch(modeling_llama) is own
    assert modeling_llama.apply_rotary_pos_emb is genfast_transformers.apply_rotary_pos_emb
    for module in (modeling_cohere, modeling_glm):
        before = module.apply_rotary_pos_emb
        with pytest.raises(ValueError, match="not rotate_half's"):
            transformers_rotary.patch(module)
        assert module.apply_rotary_pos_emb is before
