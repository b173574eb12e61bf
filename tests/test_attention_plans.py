"""The Triton attention forward under each plan (heads of a group stacked in a tile, keys split over
programs and combined) against the reference: dense and packed sequences, per-head options (ALiBi,
a per-head mask, dropout), rows that see no key, NaN; and the rule that picks the plan."""

import pytest
import torch

import genfast
from genfast.testing.tolerances import assert_error_ratio
from conftest import devices

pytestmark = pytest.mark.triton

PLANS = [(1, 1), (4, 1), (1, 3), (4, 3), (2, 5)]
UNBOUNDED = 1 << 62


def _launch(q, k, v, plan, mask=None, alibi_slopes=None, band=(-UNBOUNDED, UNBOUNDED), dropout_p=0.0, varlen=None,
            softcap=0.0):
    from genfast.kernels.attention import launch_attention_forward

    if varlen is None:
        o = q.new_empty(*q.shape[:3], v.shape[3])
        lse = torch.empty(q.shape[:3], device=q.device)
    else:
        o = q.new_empty(*q.shape[:2], v.shape[2])
        lse = torch.empty(q.shape[1], q.shape[0], device=q.device)
    launch_attention_forward(q, k, v, mask, mask is not None and mask.dtype == torch.bool, alibi_slopes,
                             q.shape[-1] ** -0.5, softcap, band[0], band[1], dropout_p, 11, 4, o, lse, varlen=varlen,
                             plan=plan)
    return o, lse


def _inputs(device, batch=2, heads=8, kv_heads=2, lq=3, lk=150, dim=32, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, lq, dim, generator=g)
    k = torch.randn(batch, kv_heads, lk, dim, generator=g)
    v = torch.randn(batch, kv_heads, lk, dim, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def _check(got, exact, low):
    for name, a, e, lo in zip(("o", "lse"), got, exact, low):
        assert_error_ratio(a, e, lo.to(a.dtype), msg=name)


@pytest.mark.parametrize("plan", PLANS, ids=str)
@pytest.mark.parametrize("device", devices())
def test_plans_match_reference(device, plan):
    """Bottom-right causal with ALiBi and soft-capping, and a per-head bool mask with a row that
    sees no key: every head of a stacked tile keeps its own slope, mask and output rows."""
    q, k, v = _inputs(device)
    slopes = torch.linspace(0.05, 0.4, 8, device=device)
    options = dict(enable_gqa=True, causal="bottom_right", alibi_slopes=slopes, softcap=3.0)
    lk = k.shape[2]
    got = _launch(q, k, v, plan, alibi_slopes=slopes, band=(-UNBOUNDED, lk - q.shape[2]), softcap=3.0)
    exact = genfast.attention(q.double(), k.double(), v.double(), impl="reference", return_lse=True,
                              **dict(options, alibi_slopes=slopes.double()))
    low = genfast.attention(q, k, v, impl="reference", return_lse=True, **options)
    _check(got, exact, low)

    mask = torch.rand(2, 8, 3, lk, generator=torch.Generator().manual_seed(1)).to(device) < 0.6
    mask[1, 5, 2] = False  # sees no key: o = 0, lse = -inf
    got = _launch(q, k, v, plan, mask=mask)
    assert bool((got[0][1, 5, 2] == 0).all()) and got[1][1, 5, 2] == float("-inf")
    exact = genfast.attention(q.double(), k.double(), v.double(), mask, impl="reference", return_lse=True,
                              enable_gqa=True)
    low = genfast.attention(q, k, v, mask, impl="reference", return_lse=True, enable_gqa=True)
    _check(got, exact, low)

    # Padding that differs by head, on the right of one batch and the left of the other: a stacked
    # tile trims only the key blocks hidden from every head's rows (_shown_keys), and the splits
    # share what is left, some of them nothing.
    j = torch.arange(lk, device=device)
    h = torch.arange(8, device=device)[:, None, None]
    mask = torch.stack([j < 40 + 13 * h, j >= 30 + 9 * h]).expand(2, 8, 3, lk)
    got = _launch(q, k, v, plan, mask=mask)
    exact = genfast.attention(q.double(), k.double(), v.double(), mask, impl="reference", return_lse=True,
                              enable_gqa=True)
    low = genfast.attention(q, k, v, mask, impl="reference", return_lse=True, enable_gqa=True)
    _check(got, exact, low)


@pytest.mark.parametrize("plan", PLANS[1:], ids=str)
@pytest.mark.parametrize("device", devices())
def test_plans_keep_dropout_and_nan(device, plan):
    """The same Philox mask under every plan (it is keyed by element), and NaN in one query row
    reaching only that row, through the combine of the splits."""
    q, k, v = _inputs(device)
    base = _launch(q, k, v, (1, 1), dropout_p=0.3)
    got = _launch(q, k, v, plan, dropout_p=0.3)
    torch.testing.assert_close(got[0], base[0], atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(got[1], base[1], atol=2e-6, rtol=2e-6)
    q[0, 3, 1, 5] = float("nan")
    o, lse = _launch(q, k, v, plan)
    assert bool(o[0, 3, 1].isnan().all()) and bool(lse[0, 3, 1].isnan())
    o[0, 3, 1] = 0.0
    lse[0, 3, 1] = 0.0
    assert not bool(o.isnan().any()) and not bool(lse.isnan().any())


@pytest.mark.parametrize("plan", PLANS, ids=str)
@pytest.mark.parametrize("device", devices())
def test_plans_on_packed_sequences(device, plan):
    """Packed decoding: one or two queries per sequence, a sequence without keys."""
    lengths_q, lengths_k = [1, 2, 1], [60, 0, 130]
    g = torch.Generator().manual_seed(2)
    q = torch.randn(sum(lengths_q), 8, 32, generator=g).to(device)
    k = torch.randn(sum(lengths_k), 2, 32, generator=g).to(device)
    v = torch.randn(sum(lengths_k), 2, 32, generator=g).to(device)
    cu_q, cu_k = (torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
                  for lengths in (lengths_q, lengths_k))
    varlen = (cu_q, cu_k, max(lengths_q), max(lengths_k))
    got = _launch(q, k, v, plan, band=(-UNBOUNDED, 0), varlen=varlen)
    options = dict(causal="bottom_right")
    exact = genfast.attention_varlen(q.double(), k.double(), v.double(), *varlen, impl="reference",
                                     return_lse=True, **options)
    low = genfast.attention_varlen(q, k, v, *varlen, impl="reference", return_lse=True, **options)
    _check(got, exact, low)
    assert bool((got[0][1:3] == 0).all()) and bool((got[1][:, 1:3] == float("-inf")).all())


def test_plan_rule():
    """The rule of kernels/cuda/attention_forward.cu's plan_attention_forward (its emulator test
    checks the same figures)."""
    from genfast.kernels.attention import forward_plan

    assert forward_plan(1, 32, 8, 1, 4096, 132) == (4, 32)  # decoding: a group per tile, 2 key blocks each
    assert forward_plan(2, 8, 8, 1024, 1024, 132) == (1, 1)  # training shapes fill the GPU
    assert forward_plan(2, 8, 8, 1, 64, 132) == (1, 1)  # one key block: nothing to split
    assert forward_plan(1, 14, 2, 3, 130, 132) == (7, 3)
    assert forward_plan(1, 28, 4, 20, 4096, 132)[0] == 1  # 7 heads of 20 queries do not fit 64 rows
    # Packed sequences stack a group's heads however many queries the longest has (up to 16 heads).
    assert forward_plan(8, 32, 8, 512, 4096, 132) == (1, 1)
    assert forward_plan(8, 32, 8, 512, 4096, 132, packed=True) == (4, 1)
    assert forward_plan(1, 28, 4, 20, 4096, 132, packed=True)[0] == 7
    assert forward_plan(4, 64, 2, 300, 4096, 132, packed=True) == (16, 1)
    # Tiles of 32 rows at most (float32 past head dim 256): a group of 64 decoding heads stacks 32.
    assert forward_plan(1, 64, 1, 1, 4096, 132) == (64, 64)  # a key block a split
    assert forward_plan(1, 64, 1, 1, 4096, 132, max_rows=32) == (32, 64)


@pytest.mark.parametrize("device", devices())
def test_plans_past_head_dim_256(device, monkeypatch):
    """Head dim 512 (Triton's largest bucket), decoding 64 heads over one kv head: stacked and split
    plans, and the automatic one, against the reference. A planned tile there holds at most 32 rows
    (64 of float32 take more shared memory than sm_80 has, 64 of 16-bit inputs spill), so the rule
    stacks at most 32 heads and a plan of 64 raises, naming the limit."""
    import genfast.kernels.attention as kernels

    q, k, v = _inputs(device, heads=64, kv_heads=1, lq=1, lk=70, dim=512)
    assert kernels.forward_plan(2, 64, 1, 1, 70, 132, max_rows=32)[0] == 32
    planned = []
    rule = kernels.forward_plan
    monkeypatch.setattr(kernels, "forward_plan", lambda *args: planned.append(rule(*args)) or planned[-1])
    for plan in ((32, 3), (16, 1), None):
        got = _launch(q, k, v, plan)
        exact = genfast.attention(q.double(), k.double(), v.double(), impl="reference", return_lse=True,
                                  enable_gqa=True)
        low = genfast.attention(q, k, v, impl="reference", return_lse=True, enable_gqa=True)
        _check(got, exact, low)
    assert len(planned) == 1 and planned[0][0] == 32
    with pytest.raises(ValueError, match="heads per tile <= 32"):
        _launch(q, k, v, (64, 1))


def test_bad_plan_names_the_limit():
    q, k, v = _inputs("cpu", lq=1)
    with pytest.raises(ValueError, match="heads per tile"):
        _launch(q, k, v, (5, 1))
    with pytest.raises(ValueError, match="splits"):
        _launch(q, k, v, (1, 0))


def _packed_batch(device, lengths_q, lengths_k, heads=8, kv_heads=2, dim=32, seed=3):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lengths_q), heads, dim, generator=g).to(device)
    k = torch.randn(sum(lengths_k), kv_heads, dim, generator=g).to(device)
    v = torch.randn(sum(lengths_k), kv_heads, dim, generator=g).to(device)
    cu_q, cu_k = (torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
                  for lengths in (lengths_q, lengths_k))
    return q, k, v, (cu_q, cu_k, max(lengths_q), max(lengths_k))


@pytest.mark.parametrize("plan", [None, (3, 1), (4, 2)], ids=str)  # None: (4, 1)
@pytest.mark.parametrize("device", devices())
def test_plans_on_a_batch_of_decoding_and_prefill(device, plan):
    """A packed batch of one-query sequences beside prefill ones (the longest too long for a planned
    tile of 64 rows): its plan stacks the group's heads in tiles with BLOCK_M // heads queries of
    each, over several tiles per sequence (a stack of 3 heads leaves rows unused); causal, a window,
    ALiBi and soft-capping, dropout (the same elements kept as by tiles of one head), and NaN in one
    query reaching only its row."""
    from genfast.kernels.attention import forward_plan

    lengths_q, lengths_k = [1, 45, 1, 1, 23, 0], [70, 45, 1, 130, 90, 12]
    heads = 12 if plan == (3, 1) else 8
    q, k, v, varlen = _packed_batch(device, lengths_q, lengths_k, heads=heads)
    if plan is None:
        assert forward_plan(6, heads, 2, 45, 130, 1, packed=True) == (4, 1)
    slopes = torch.linspace(0.05, 0.4, heads, device=device)
    for options, band in ((dict(causal="bottom_right"), (-UNBOUNDED, 0)),
                          (dict(causal="bottom_right", window=(37, 0)), (-37, 0)),
                          (dict(alibi_slopes=slopes, softcap=2.0), (-UNBOUNDED, UNBOUNDED))):
        got = _launch(q, k, v, plan, band=band, varlen=varlen, alibi_slopes=options.get("alibi_slopes"),
                      softcap=options.get("softcap", 0.0))
        exact_options = dict(options, alibi_slopes=slopes.double()) if "alibi_slopes" in options else options
        exact = genfast.attention_varlen(q.double(), k.double(), v.double(), *varlen, impl="reference",
                                         return_lse=True, **exact_options)
        low = genfast.attention_varlen(q, k, v, *varlen, impl="reference", return_lse=True, **options)
        _check(got, exact, low)
        assert bool((got[0][-1:] == 0).all() if lengths_q[-1] else True)
    base = _launch(q, k, v, (1, 1), band=(-UNBOUNDED, 0), varlen=varlen, dropout_p=0.3)
    got = _launch(q, k, v, plan, band=(-UNBOUNDED, 0), varlen=varlen, dropout_p=0.3)
    torch.testing.assert_close(got[0], base[0], atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(got[1], base[1], atol=2e-6, rtol=2e-6)
    q[20, 5, 3] = float("nan")
    o, lse = _launch(q, k, v, plan, band=(-UNBOUNDED, 0), varlen=varlen)
    assert bool(o[20, 5].isnan().all()) and bool(lse[5, 20].isnan())
    o[20, 5] = 0.0
    lse[5, 20] = 0.0
    assert not bool(o.isnan().any()) and not bool(lse.isnan().any())


def test_packed_stacking_can_be_turned_off(monkeypatch):
    """GENFAST_TRITON_PACKED_STACK=0 (what genfast bench times the stacking against) plans a packed
    batch as a dense one."""
    import genfast.kernels.attention as kernels

    plans = []
    monkeypatch.setattr(kernels, "forward_plan", lambda *args: plans.append(args[6]) or (1, 1))
    q, k, v, varlen = _packed_batch("cpu", [1, 2], [3, 2], dim=16)
    for setting in ("0", None):
        if setting is None:
            monkeypatch.delenv("GENFAST_TRITON_PACKED_STACK")
        else:
            monkeypatch.setenv("GENFAST_TRITON_PACKED_STACK", setting)
        _launch(q, k, v, None, varlen=varlen)
    assert plans == [False, True]
