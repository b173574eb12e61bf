"""The Triton attention kernels (genfast.kernels.attention) under the Triton CPU interpreter, against
the float64 reference genfast.reference.attention: the forward (o and lse) and the backward (dQ, dK,
dV and the additive mask's gradient from dS) for plain, causal (both alignments), windowed, bool
and float masks, ALiBi, soft-capping, dropout, grouped-query heads, fully masked rows, float16 and
strided inputs. Run with TRITON_INTERPRET=1."""

import importlib
import math
import warnings

import pytest
import torch

from genfast import _backend
from genfast.reference import attention as reference

pytestmark = pytest.mark.triton

UNBOUNDED = 1 << 62


def _kernels():
    if not _backend.triton_runs_on("cpu"):
        pytest.skip(_backend.triton_error() or "Triton runs on the CPU only under TRITON_INTERPRET=1")
    from genfast.kernels import attention

    return attention


def _band(lq, lk, causal=None, window=None):
    lo, hi = -UNBOUNDED, UNBOUNDED
    if causal is not None:
        hi = min(hi, 0 if causal == "top_left" else lk - lq)
    if window is not None:
        left, right = window
        if left >= 0:
            lo = max(lo, lk - lq - left)
        if right >= 0:
            hi = min(hi, lk - lq + right)
    return lo, hi


def _inputs(B, H, Hk, Lq, Lk, D, Dv, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g).to(dtype)
    k = torch.randn(B, Hk, Lk, D, generator=g).to(dtype)
    v = torch.randn(B, Hk, Lk, Dv, generator=g).to(dtype)
    return q, k, v


def _mask(kind, B, H, Lq, Lk, seed=3, masked_row=None):
    """The mask in its own (broadcastable) shape, or None."""
    g = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    if kind == "bool":
        m = torch.rand(B, 1, Lq, Lk, generator=g) < 0.7
        m[..., 0] = True  # no accidental fully masked rows
        if masked_row is not None:
            m[:, :, masked_row, :] = False
        return m
    return torch.randn(1, H, Lq, Lk, generator=g)


def _alibi(kind, B, H):
    if kind is None:
        return None
    slopes = torch.tensor([2.0 ** (-(i + 1)) for i in range(H)])
    return slopes if kind == "h" else slopes * torch.linspace(0.5, 1.5, B)[:, None]


def _forward(attn, q, k, v, mask, alibi, scale, softcap, band, dropout_p, seed, offset):
    B, H, Lq, _ = q.shape
    Lk, Dv = k.shape[2], v.shape[3]
    o = torch.empty(B, H, Lq, Dv, dtype=q.dtype)
    lse = torch.empty(B, H, Lq)
    full = None if mask is None else mask.expand(B, H, Lq, Lk)
    attn.launch_attention_forward(q, k, v, full, mask is not None and mask.dtype == torch.bool, alibi, scale,
                                  softcap or 0.0, band[0], band[1], dropout_p, seed, offset, o, lse)
    return o, lse


def _reference(q, k, v, mask, alibi, scale, softcap, causal, window, dropout_p, seed, offset):
    H, Hk = q.shape[1], k.shape[1]
    return reference.attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale, enable_gqa=H != Hk,
                               causal=causal, window=window, alibi_slopes=alibi, softcap=softcap,
                               dropout_seed=seed, dropout_offset=offset, return_lse=True)


# Lengths around the interpreter's tiles of 32 (kernels/triton/attention.py, _INTERPRETER_BLOCKS): 33 is a
# tile and one row, 72 two blocks and part of a third.
# (name, B, H, Hk, Lq, Lk, D, Dv, options)
FORWARD_CASES = [
    ("plain", 2, 2, 2, 33, 72, 24, 24, {}),
    ("plain_one_query", 2, 2, 2, 1, 33, 16, 64, {}),
    ("plain_one_key", 1, 2, 2, 72, 1, 64, 16, {}),
    ("causal_top_left", 2, 2, 2, 33, 72, 16, 16, dict(causal="top_left")),
    ("causal_bottom_right", 2, 2, 2, 33, 72, 16, 16, dict(causal="bottom_right")),
    ("causal_bottom_right_masked_rows", 1, 2, 2, 72, 33, 16, 16, dict(causal="bottom_right")),
    ("causal_top_left_long_q", 1, 2, 2, 72, 33, 16, 16, dict(causal="top_left")),
    ("window", 2, 2, 2, 72, 72, 16, 16, dict(window=(5, 3))),
    ("window_left_causal", 1, 2, 2, 33, 72, 16, 16, dict(window=(6, -1), causal="bottom_right")),
    ("bool_mask", 2, 2, 2, 33, 72, 24, 24, dict(mask="bool")),
    ("bool_mask_masked_row", 2, 2, 2, 33, 33, 16, 16, dict(mask="bool", masked_row=3)),
    ("float_mask", 2, 2, 2, 33, 72, 24, 24, dict(mask="float")),
    ("alibi_h", 2, 2, 2, 33, 72, 16, 16, dict(alibi="h")),
    ("alibi_bh_causal", 2, 2, 2, 72, 33, 16, 16, dict(alibi="bh", causal="top_left")),
    ("softcap", 2, 2, 2, 33, 72, 16, 16, dict(softcap=2.0, scale=0.8)),
    ("dropout", 2, 2, 2, 33, 72, 16, 16, dict(dropout_p=0.3, seed=1234, offset=8)),
    ("gqa", 2, 4, 2, 33, 72, 16, 24, {}),
    ("everything", 2, 4, 2, 33, 72, 24, 16,
     dict(causal="bottom_right", window=(9, -1), mask="float", alibi="bh", softcap=3.0, dropout_p=0.2, seed=7,
          offset=4)),
]


@pytest.mark.triton
@pytest.mark.parametrize("case", FORWARD_CASES, ids=[c[0] for c in FORWARD_CASES])
def test_forward_matches_reference(case):
    attn = _kernels()
    _, B, H, Hk, Lq, Lk, D, Dv, opts = case
    q, k, v = _inputs(B, H, Hk, Lq, Lk, D, Dv)
    mask = _mask(opts.get("mask"), B, H, Lq, Lk, masked_row=opts.get("masked_row"))
    alibi = _alibi(opts.get("alibi"), B, H)
    scale = opts.get("scale", 1.0 / math.sqrt(D))
    causal, window = opts.get("causal"), opts.get("window")
    p, seed, offset = opts.get("dropout_p", 0.0), opts.get("seed", 0), opts.get("offset", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's numpy on -inf lanes
        o, lse = _forward(attn, q, k, v, mask, alibi, scale, opts.get("softcap"), _band(Lq, Lk, causal, window), p,
                          seed, offset)
    ro, rlse = _reference(q.double(), k.double(), v.double(), None if mask is None else mask.double()
                          if mask.dtype != torch.bool else mask, None if alibi is None else alibi.double(), scale,
                          opts.get("softcap"), causal, window, p, seed, offset)
    torch.testing.assert_close(o.double(), ro, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), rlse, atol=2e-5, rtol=1e-5)
    if opts.get("masked_row") is not None or case[0] == "causal_bottom_right_masked_rows":
        assert torch.isinf(lse).any() and (lse[torch.isinf(lse)] < 0).all()
        assert (o[torch.isinf(lse)] == 0).all()


@pytest.mark.triton
def test_forward_float16_and_strided():
    attn = _kernels()
    B, H, Lq, Lk, D = 2, 2, 33, 72, 64
    q, k, v = _inputs(B, H, H, Lq, Lk, D, D, dtype=torch.float16)
    # (B, L, H, D) storage, seen as (B, H, L, D): strided heads and positions.
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    k = k.transpose(1, 2).contiguous().transpose(1, 2)
    band = _band(Lq, Lk, "bottom_right")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        o, lse = _forward(attn, q, k, v, None, None, 0.125, None, band, 0.25, 99, 0)
    assert o.dtype == torch.float16
    ro, rlse = _reference(q.double(), k.double(), v.double(), None, None, 0.125, None, "bottom_right", None, 0.25, 99,
                          0)
    torch.testing.assert_close(o.double(), ro, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.double(), rlse, atol=1e-2, rtol=1e-2)


# (name, B, H, Hk, Lq, Lk, D, Dv, options)
BACKWARD_CASES = [
    ("plain_gqa", 2, 4, 2, 33, 72, 24, 16, {}),
    ("causal_bottom_right_window", 2, 2, 2, 72, 33, 16, 16, dict(causal="bottom_right", window=(5, -1))),
    ("causal_top_left_window", 1, 2, 2, 33, 72, 16, 24, dict(causal="top_left", window=(-1, 2))),
    # dS summed over the batch in chunks of one batch (the test's MASK_GRAD_CHUNK_FLOATS): the second
    # chunk's dropout rows and ALiBi slopes are batch 1's
    ("float_mask", 2, 2, 2, 33, 72, 16, 16, dict(mask="float", alibi="bh", dropout_p=0.25, seed=7, offset=3)),
    ("bool_mask_masked_row", 2, 2, 2, 33, 33, 16, 16, dict(mask="bool", masked_row=5)),
    ("alibi_softcap", 2, 2, 2, 33, 72, 16, 16, dict(alibi="bh", softcap=2.0, scale=0.7)),
    ("dropout_gqa", 2, 4, 2, 33, 72, 16, 16, dict(dropout_p=0.3, seed=42, offset=12)),
    ("everything", 1, 4, 2, 33, 72, 24, 16,
     dict(causal="bottom_right", mask="float", alibi="h", softcap=3.0, dropout_p=0.2, seed=5, offset=0)),
    # dQ from its own pass (the default; the cases above add it in the key-block pass, with atomics)
    ("deterministic_gqa", 2, 4, 2, 33, 72, 24, 16, dict(deterministic=True)),
    ("deterministic_causal_window", 1, 2, 2, 33, 72, 16, 24, dict(causal="top_left", window=(-1, 2),
                                                                  deterministic=True)),
    ("deterministic_dropout_alibi", 2, 4, 2, 33, 72, 16, 16, dict(dropout_p=0.3, seed=42, offset=12, alibi="bh",
                                                                  softcap=2.0, deterministic=True)),
]


@pytest.mark.triton
@pytest.mark.parametrize("case", BACKWARD_CASES, ids=[c[0] for c in BACKWARD_CASES])
def test_backward_matches_autograd(case, monkeypatch):
    attn = _kernels()
    monkeypatch.setattr(attn, "MASK_GRAD_CHUNK_FLOATS", 1)
    monkeypatch.setenv("GENFAST_TRITON_ATOMIC_DQ", "1")  # dQ by atomics where not deterministic
    _, B, H, Hk, Lq, Lk, D, Dv, opts = case
    q, k, v = _inputs(B, H, Hk, Lq, Lk, D, Dv, seed=1)
    mask = _mask(opts.get("mask"), B, H, Lq, Lk, masked_row=opts.get("masked_row"))
    alibi = _alibi(opts.get("alibi"), B, H)
    scale = opts.get("scale", 1.0 / math.sqrt(D))
    softcap = opts.get("softcap")
    causal, window = opts.get("causal"), opts.get("window")
    p, seed, offset = opts.get("dropout_p", 0.0), opts.get("seed", 0), opts.get("offset", 0)
    band = _band(Lq, Lk, causal, window)
    float_mask = mask is not None and mask.dtype != torch.bool
    g = torch.Generator().manual_seed(11)
    grad_o = torch.randn(B, H, Lq, Dv, generator=g)
    grad_lse = torch.randn(B, H, Lq, generator=g)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        o, lse = _forward(attn, q, k, v, mask, alibi, scale, softcap, band, p, seed, offset)
        delta = (grad_o * o).sum(-1) - torch.where(torch.isinf(lse), 0.0, grad_lse)
        grad_q, grad_k, grad_v = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        grad_s = torch.zeros(mask.shape) if float_mask else None  # dS summed to the mask's (1, H, Lq, Lk)
        attn.launch_attention_backward(grad_o, delta, q, k, v, lse, None if mask is None else mask.expand(B, H, Lq, Lk),
                                       mask is not None and not float_mask, alibi, scale, softcap or 0.0, band[0],
                                       band[1], p, seed, offset, grad_q, grad_k, grad_v, grad_s,
                                       deterministic=opts.get("deterministic", False))

    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    m64 = mask.double().requires_grad_() if float_mask else mask
    ro, rlse = _reference(q64, k64, v64, m64, None if alibi is None else alibi.double(), scale, softcap, causal,
                          window, p, seed, offset)
    finite_lse = torch.where(torch.isinf(rlse), torch.zeros_like(rlse), rlse)
    loss = (ro * grad_o.double()).sum() + (finite_lse * grad_lse.double()).sum()
    inputs = [q64, k64, v64] + ([m64] if float_mask else [])
    expected = torch.autograd.grad(loss, inputs)
    actual = [grad_q, grad_k, grad_v]
    if float_mask:
        actual.append(grad_s)
    for name, a, e in zip("qkvm", actual, expected):
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a.double(), e, atol=5e-5, rtol=1e-4, msg=lambda m: f"grad_{name}: {m}")
    if opts.get("masked_row") is not None:
        assert (grad_q[:, :, opts["masked_row"]] == 0).all()


@pytest.mark.triton
def test_backward_float16():
    attn = _kernels()
    B, H, Hk, Lq, Lk, D = 1, 2, 1, 33, 72, 16
    q, k, v = _inputs(B, H, Hk, Lq, Lk, D, D, dtype=torch.float16, seed=2)
    band = _band(Lq, Lk, "bottom_right")
    g = torch.Generator().manual_seed(4)
    grad_o = torch.randn(B, H, Lq, D, generator=g).half()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        o, lse = _forward(attn, q, k, v, None, None, 0.25, None, band, 0.0, 0, 0)
        delta = (grad_o.float() * o.float()).sum(-1)
        grads = [torch.zeros(t.shape) for t in (q, k, v)]
        attn.launch_attention_backward(grad_o, delta, q, k, v, lse, None, False, None, 0.25, 0.0, band[0], band[1],
                                       0.0, 0, 0, *grads, None)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ro = reference.attention(q64, k64, v64, scale=0.25, enable_gqa=True, causal="bottom_right")
    expected = torch.autograd.grad((ro * grad_o.double()).sum(), [q64, k64, v64])
    for a, e in zip(grads, expected):
        torch.testing.assert_close(a.double(), e, atol=2e-2, rtol=2e-2)


@pytest.mark.triton
@pytest.mark.parametrize("v_dim", [0, 5, 64, 200])
def test_row_deltas(v_dim):
    """delta = rowsum(grad_o * o) - grad_lse in float32 from 16-bit and float32 rows, strided ones
    and packed ones, head dims past one column block; NaN in a row reaches its delta alone."""
    attn = _kernels()
    g = torch.Generator().manual_seed(v_dim)
    grad_o = torch.randn(2, 7, 3, v_dim, generator=g).half().transpose(1, 2)  # (B, H, L, Dv) with (B, L, H) storage
    o = torch.randn(2, 3, 7, v_dim, generator=g)
    o[1, 2, 4, :1] = float("nan")
    grad_lse = torch.randn(2, 7, 3, generator=g).transpose(1, 2)
    exact = (grad_o.double() * o.double()).sum(-1)
    for given in (None, grad_lse):
        delta = torch.empty(2, 3, 7)
        attn.launch_attention_row_deltas(grad_o, o, given, delta)
        expected = exact - (0 if given is None else given.double())
        torch.testing.assert_close(delta.double(), expected, atol=1e-5, rtol=1e-5, equal_nan=True)
        assert delta[1, 2, 4].isnan() == (v_dim > 0) and delta.isnan().sum() == (v_dim > 0)
    # Packed: o (total, H, Dv) and delta (H, total), as lse is.
    packed_o, packed_grad_o = o[0].transpose(0, 1).half(), grad_o[0].transpose(0, 1)
    delta = torch.empty(3, 7)
    attn.launch_attention_row_deltas(packed_grad_o, packed_o, grad_lse[0], delta, varlen=True)
    expected = (packed_grad_o.double() * packed_o.double()).sum(-1).T - grad_lse[0].double()
    torch.testing.assert_close(delta.double(), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="delta must be float32 and contiguous"):
        attn.launch_attention_row_deltas(grad_o, o, None, torch.empty(2, 7, 3).transpose(1, 2))


def test_fast_exp_needs_half_precision_and_a_positive_scale(monkeypatch):
    """The base-2 path takes each row's maximum of q.k before the scale: only a positive scale, whose
    product with log2(e) float32 holds, keeps that maximum the scores'."""
    attn = _kernels()
    monkeypatch.delenv("GENFAST_TRITON_FAST_EXP", raising=False)
    assert attn._fast_exp(torch.float16, 0.125) and attn._fast_exp(torch.bfloat16, 3.0)
    assert not attn._fast_exp(torch.float32, 0.125)
    for scale in (0.0, -0.5, float("nan"), float("inf"), 3e38):
        assert not attn._fast_exp(torch.float16, scale)
    monkeypatch.setenv("GENFAST_TRITON_FAST_EXP", "0")
    assert not attn._fast_exp(torch.float16, 0.125)


@pytest.mark.triton
def test_float16_softmax_by_either_exp(monkeypatch):
    """The softmax of 16-bit inputs by ex2.approx (the default) and by the polynomial
    (GENFAST_TRITON_FAST_EXP=0): the forward and the backward against the float64 reference, and
    log-sum-exps that differ in their bits (each ran)."""
    attn = _kernels()
    B, H, Hk, Lq, Lk, D = 2, 2, 1, 33, 72, 32
    q, k, v = _inputs(B, H, Hk, Lq, Lk, D, D, dtype=torch.float16, seed=3)
    band = _band(Lq, Lk, "bottom_right")
    grad_o = torch.randn(B, H, Lq, D, generator=torch.Generator().manual_seed(5)).half()
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ro, rlse = _reference(q64, k64, v64, None, None, 0.25, None, "bottom_right", None, 0.2, 17, 4)
    expected = torch.autograd.grad((ro * grad_o.double()).sum(), [q64, k64, v64])
    lses = []
    for fast in ("0", None):
        if fast is None:
            monkeypatch.delenv("GENFAST_TRITON_FAST_EXP", raising=False)
        else:
            monkeypatch.setenv("GENFAST_TRITON_FAST_EXP", fast)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            o, lse = _forward(attn, q, k, v, None, None, 0.25, None, band, 0.2, 17, 4)
            delta = (grad_o.float() * o.float()).sum(-1)
            grads = [torch.zeros(t.shape) for t in (q, k, v)]
            attn.launch_attention_backward(grad_o, delta, q, k, v, lse, None, False, None, 0.25, 0.0, band[0],
                                           band[1], 0.2, 17, 4, *grads, None)
        torch.testing.assert_close(o.double(), ro.detach(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(lse.double(), rlse.detach(), atol=1e-2, rtol=1e-2)
        for a, e in zip(grads, expected):
            torch.testing.assert_close(a.double(), e, atol=2e-2, rtol=2e-2)
        lses.append(lse)
    assert not torch.equal(*lses)


@pytest.mark.parametrize("hopper", [False, True], ids=["sm_80", "sm_90"])
def test_untuned_gpu_kernels_take_the_first_configuration(monkeypatch, hopper):
    """GENFAST_TRITON_AUTOTUNE=0 (scripts/gpu-check's Triton tests): a GPU's kernels behind one
    configuration, the untuned choice, so that no call times the others; every configuration else,
    Hopper's own among them on a Hopper GPU."""
    attn = _kernels()
    device = torch.device("cuda")
    monkeypatch.setattr(attn, "_hopper", lambda device: hopper)
    monkeypatch.setattr(attn, "_tuned_kernels", {})
    assert len(attn._gpu_blocks(True, 128, True)) > len(attn._gpu_blocks(True, 128, False))
    for backward, kernel in ((False, attn.attention_forward_kernel), (True, attn.attention_backward_kv_kernel)):
        blocks = attn._gpu_blocks(backward, 128, hopper)
        monkeypatch.delenv("GENFAST_TRITON_AUTOTUNE", raising=False)
        assert len(attn._tuned(kernel, device, 128, backward).configs) == len(blocks) > 1
        monkeypatch.setenv("GENFAST_TRITON_AUTOTUNE", "0")
        (config,) = attn._tuned(kernel, device, 128, backward).configs
        assert (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages) == blocks[0]


def test_head_dim_buckets_and_float32_tiles_past_256(monkeypatch):
    """Head dims pad to buckets of 64, 128, 256 and 512; past 256 float32 inputs take their own
    smaller tiles (the 16-bit ones overflow sm_80's shared memory there), which the GPU compile
    check compiles for float32 launches, and the 16-bit ones for the rest."""
    attn = _kernels()
    assert [attn._bucket(d) for d in (16, 64, 128, 256, 512)] == [64, 64, 128, 256, 512]
    assert attn.MAX_HEAD_DIM == importlib.import_module("genfast.attention").FUSED_MAX_HEAD_DIM  # written twice
    monkeypatch.setattr(attn, "_hopper", lambda device: False)
    monkeypatch.setattr(attn, "_tuned_kernels", {})
    monkeypatch.delenv("GENFAST_TRITON_AUTOTUNE", raising=False)
    device = torch.device("cuda")
    for backward, kernel in ((False, attn.attention_forward_kernel), (True, attn.attention_backward_q_kernel)):
        kind = "backward" if backward else "forward"
        for float32, blocks in ((False, attn._GPU_BLOCKS[kind][512]), (True, attn._FLOAT32_512_BLOCKS[kind])):
            configs = attn._tuned(kernel, device, 512, backward, float32).configs
            assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs] == blocks
        assert attn._tuned(kernel, device, 256, backward, True) is attn._tuned(kernel, device, 256, backward, False)
    name = "attention_forward_kernel"
    constexprs = dict(BLOCK_D=512, BLOCK_DV=512, BLOCK_M=16, BLOCK_N=16, DOT_KIND=attn.DOT_F32, INTERPRETED=True)
    assert [v[0]["BLOCK_M"] for v in attn.gpu_variants(name, constexprs, {})] == [16, 16, 32]
    assert len(attn.gpu_variants(name, dict(constexprs, DOT_KIND=attn.DOT_BF16), {})) == 4  # Hopper's too
    split = attn.gpu_variants(name, dict(constexprs, SPLIT=True, STACKED=True, BLOCK_M=64), {})
    assert split == [(dict(BLOCK_M=32, BLOCK_N=16, INTERPRETED=False), 8, 1)]


def test_qv_tiles_past_256(monkeypatch):
    """Forwards with qv (HAS_QV) past head dim 256 take tiles whose loops do not spill beside the qv
    tile: autotuned over _QV_512_BLOCKS (and Hopper's), planned with key blocks of 32 in two stages
    (16-bit) or 16 rows (float32 beside a q past 256 too); below 512, qv changes no tile."""
    attn = _kernels()
    monkeypatch.setattr(attn, "_tuned_kernels", {})
    monkeypatch.delenv("GENFAST_TRITON_AUTOTUNE", raising=False)
    device = torch.device("cuda")
    kernel = attn.attention_forward_kernel
    for hopper, extra in ((False, []), (True, attn._HOPPER_BLOCKS["forward"][512])):
        monkeypatch.setattr(attn, "_hopper", lambda device, hopper=hopper: hopper)
        configs = attn._tuned(kernel, device, 512, False, False, qv=True).configs
        assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                for c in configs] == attn._QV_512_BLOCKS + extra
        assert attn._tuned(kernel, device, 256, False, False, qv=True) is attn._tuned(kernel, device, 256, False)
    name = "attention_forward_kernel"
    bf16 = dict(BLOCK_D=64, BLOCK_DV=512, BLOCK_M=16, BLOCK_N=16, DOT_KIND=attn.DOT_BF16, INTERPRETED=True,
                HAS_QV=True)
    assert [v[0]["BLOCK_N"] for v in attn.gpu_variants(name, bf16, {})] == [32, 16, 32]
    planned = dict(SPLIT=True, STACKED=True, BLOCK_M=64)
    assert attn.gpu_variants(name, dict(bf16, **planned), {}) == [(dict(BLOCK_M=32, BLOCK_N=32, INTERPRETED=False),
                                                                   8, 2)]
    wide_float32 = dict(bf16, BLOCK_D=512, DOT_KIND=attn.DOT_F32, **planned)
    assert attn.gpu_variants(name, wide_float32, {}) == [(dict(BLOCK_M=16, BLOCK_N=16, INTERPRETED=False), 8, 1)]
    narrow_float32 = dict(bf16, DOT_KIND=attn.DOT_F32, **planned)
    assert attn.gpu_variants(name, narrow_float32, {}) == [(dict(BLOCK_M=32, BLOCK_N=16, INTERPRETED=False), 8, 1)]


def test_pages_of_whole_key_blocks():
    """The forward looks up a page a block (PAGED 1) only where every key block lies in one page:
    every forward BLOCK_N, tuned, stacked or interpreted, divides PAGE_BLOCKS."""
    attn = _kernels()
    widths = {n for blocks in (*attn._GPU_BLOCKS["forward"].values(), *attn._HOPPER_BLOCKS["forward"].values())
              for _, n, _, _ in blocks} | {attn._INTERPRETER_BLOCKS[1], 64, 32}
    assert all(attn.PAGE_BLOCKS % n == 0 for n in widths)
    packing = attn._Packing.__new__(attn._Packing)
    packing.pages = None
    assert packing.paged_kind(256) == 0
    packing.pages = torch.zeros(1, 1, dtype=torch.int32)
    assert [packing.paged_kind(size) for size in (128, 256, 16, 1, 100)] == [1, 1, 2, 2, 2]


def test_batch_and_heads_ride_the_grids_first_axis():
    """Every attention kernel's grid holds the (batch, head) programs on its first axis, tiles
    fastest, so that a varlen batch of more sequences times heads than a GPU's 65535 on the other
    axes launches: the forward, planned (stacked heads, split keys) or not, and both backward passes,
    each with the results of the references checked by the tests above."""
    attn = _kernels()
    grids = []

    def wrap(kernel):
        class Recorder:
            def __getitem__(self, grid):
                grids.append(grid)
                return kernel[grid]

        return Recorder()

    q, k, v = _inputs(3, 4, 2, 5, 40, 16, 16)
    for plan in ((1, 1), (2, 1), (1, 3)):
        o, lse = torch.empty(3, 4, 5, 16), torch.empty(3, 4, 5)
        attn.launch_attention_forward(q, k, v, None, False, None, 0.25, 0.0, -UNBOUNDED, UNBOUNDED, 0.0, 0, 0, o, lse,
                                      wrap=wrap, plan=plan)
    grad_q, grad_k, grad_v = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    attn.launch_attention_backward(torch.ones_like(o), torch.zeros_like(lse), q, k, v, lse, None, False, None, 0.25,
                                   0.0, -UNBOUNDED, UNBOUNDED, 0.0, 0, 0, grad_q, grad_k, grad_v, None, wrap=wrap,
                                   deterministic=True)
    meta = dict(BLOCK_M=attn._INTERPRETER_BLOCKS[0], BLOCK_N=attn._INTERPRETER_BLOCKS[1])
    shapes = [grid(meta) if callable(grid) else grid for grid in grids]
    assert len(shapes) >= 5
    # One axis, or the first and the key splits' third (the second 1).
    assert all(len(shape) == 1 or (len(shape) == 3 and shape[1] == 1) for shape in shapes), shapes
    # (1, 1): a tile of BLOCK_M rows a head; (2, 1): a tile of each kv head's 2 heads' 5 rows; (1, 3): 3
    # splits; then the backward's key blocks (40 keys) of each kv head and query tiles of each head.
    key_blocks = -(-40 // meta["BLOCK_N"])
    assert shapes[:3] == [(3 * 4,), (3 * 2, 1, 1), (3 * 4, 1, 3)] and shapes[-2:] == [(3 * key_blocks * 2,),
                                                                                       (3 * 4,)], shapes
