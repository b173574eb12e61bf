"""genfast.testing.attention_fuzz, behind `genfast check --fuzz`: random attention calls on each
backend against the reference. Its draws cover every option within the backend's limits, a case
repeats from its seed, a wrong backend fails it, and a run of cases passes here."""

import dataclasses

import pytest
import torch

from genfast.cli import main
from genfast.testing import attention_fuzz
from genfast.testing.tolerances import compare_with_reference
from conftest import devices, fused_impls, skip_unless_runs

DRAWS = [attention_fuzz.draw_case(seed, attention_fuzz.LIMITS["cpu"]) for seed in range(400)]


def test_draws_cover_every_option():
    def seen(predicate):
        return any(predicate(case) for case in DRAWS)

    assert seen(lambda c: c.varlen and 0 in c.lengths_q) and seen(lambda c: c.varlen and c.lengths_k != c.lengths_q)
    assert seen(lambda c: not c.varlen and c.q_len <= 4 and c.k_len > attention_fuzz.LIMITS["cpu"].length)
    assert seen(lambda c: c.q_len == 1) and seen(lambda c: c.k_len == 1) and seen(lambda c: c.q_len in (127, 129))
    assert seen(lambda c: c.heads > c.kv_heads > 1) and seen(lambda c: c.kv_heads == 1 < c.heads)
    assert seen(lambda c: c.dim % 8 != 0) and seen(lambda c: c.v_dim != c.dim) and seen(lambda c: c.dim == 256)
    for causal in ("top_left", "bottom_right"):
        assert seen(lambda c: c.causal == causal and not c.varlen) and seen(lambda c: c.causal == causal and c.varlen)
    assert seen(lambda c: c.window and -1 in c.window) and seen(lambda c: c.window and min(c.window) >= 0)
    for kind in ("bool", "additive"):
        assert seen(lambda c: c.mask == kind and len(c.mask_shape) == 4 and 1 in c.mask_shape)
        assert seen(lambda c: c.mask == kind and len(c.mask_shape) < 2)
        for hides in ("rows", "blocks"):
            assert seen(lambda c: c.mask == kind and c.mask_hides == hides)
    assert seen(lambda c: c.alibi == "heads") and seen(lambda c: c.alibi == "batch" and c.varlen)
    assert seen(lambda c: c.softcap) and seen(lambda c: c.scale) and seen(lambda c: c.deterministic)
    assert seen(lambda c: c.dropout_p == 0.7) and seen(lambda c: c.dropout_p and (c.mask or c.varlen))
    for layout in ("transposed", "strided"):
        assert seen(lambda c: c.layout == layout)


def test_draws_keep_to_the_limits():
    for name, limits in attention_fuzz.LIMITS.items():
        for seed in range(200):
            case = attention_fuzz.draw_case(seed, limits)
            assert case.heads % case.kv_heads == 0 and case.heads <= limits.heads, name
            assert 16 <= min(case.dim, case.v_dim) and max(case.dim, case.v_dim) <= limits.dim, name
            assert max(case.q_len, case.k_len) <= max(limits.length, limits.cache) and case.batch <= max(
                limits.batch, 4), name
            if case.varlen:
                assert case.batch == len(case.lengths_q) == len(case.lengths_k) and case.q_len == max(case.lengths_q)


def test_a_case_repeats_from_its_seed():
    case = attention_fuzz.draw_case(123, attention_fuzz.LIMITS["cpu"])
    assert case == attention_fuzz.draw_case(123, attention_fuzz.LIMITS["cpu"])
    assert case.describe().startswith("seed=123 ")
    run = attention_fuzz.make_run(case, torch.float32, "cpu")
    first, again = run("reference"), run("reference")
    for a, b in zip(first, again):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inputs_have_the_drawn_layout_and_mask(dtype, monkeypatch):
    case = dataclasses.replace(DRAWS[0], varlen=False, batch=2, heads=4, kv_heads=2, q_len=70, k_len=130, dim=32,
                               v_dim=24, mask="bool", mask_shape=(1, 70, 130), mask_hides="blocks",
                               layout="transposed")
    captured = []
    original = attention_fuzz.attention

    def spy(q, k, v, mask, **options):
        captured.append((q, v, mask))
        return original(q, k, v, mask, **options)

    monkeypatch.setattr(attention_fuzz, "attention", spy)
    attention_fuzz.make_run(case, dtype, "cpu")("reference")
    attention_fuzz.make_run(dataclasses.replace(case, layout="strided"), dtype, "cpu")("reference")
    (q, v, mask), (strided, _, _) = captured
    assert q.shape == (2, 4, 70, 32) and v.shape == (2, 2, 130, 24) and q.dtype == dtype
    assert q.stride(1) == 32 and q.stride(2) == 4 * 32  # (batch, length, heads, dim) in memory
    assert strided.shape == q.shape and strided.stride(2) == 2 * 32  # every other row
    assert mask.shape == (1, 70, 130) and mask.dtype == torch.bool
    assert any(not mask[0, i:i + 64, j:j + 64].any() for i in (0, 64) for j in (0, 64, 128))


@pytest.mark.parametrize("impl", fused_impls())
def test_fuzz_cases_pass(impl):
    skip_unless_runs(impl, "cpu")
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if impl == "native" else [])
    count = 12 if impl == "native" else 4
    results = list(attention_fuzz.fuzz("cpu", [(impl, dtype) for dtype in dtypes], count, seed=1000))
    assert len(results) == count * len(dtypes)
    failed = [f"{r[0]} {r[1]} {r[2]}: {r[5]}" for r in results if not r[4]]
    assert not failed, failed


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
def test_float16_mask_gradients_of_cases_that_failed(impl, device):
    # With delta taken from the stored float16 o, these mask gradients erred 4 to 26 times as much as
    # the eager float16 one on the CPU and under the interpreter (one key holds a row's weight; the
    # 1x1 mask sums over heads).
    skip_unless_runs(impl, device)
    for seed in (35242, 61001):
        case = attention_fuzz.draw_case(seed, attention_fuzz.LIMITS["cpu"])
        run = attention_fuzz.make_run(case, torch.float16, device)
        error, passed, message = compare_with_reference(run, impl, attention_fuzz.OUTPUTS, grad_floor=1e-6,
                                                        grads=attention_fuzz.GRADS)
        assert passed, f"seed {seed}: {message}"


def test_a_wrong_backend_fails_its_cases(monkeypatch):
    skip_unless_runs("native", "cpu")
    original = attention_fuzz.attention

    def off_by_a_little(*args, impl, **options):
        o, lse = original(*args, impl=impl, **options)
        return (o if impl == "reference" else o + 1e-3), lse

    monkeypatch.setattr(attention_fuzz, "attention", off_by_a_little)
    results = list(attention_fuzz.fuzz("cpu", [("native", torch.float32)], 12, seed=1))
    dense = [r for r in results if "varlen" not in r[0]]
    assert len(dense) >= 4 and all(not r[4] and r[5].startswith("o:") for r in dense)


def test_a_failure_names_the_gradient():
    def run(impl, cast=None):
        values = [torch.linspace(-1, 1, 5, dtype=cast or torch.float32) for _ in range(5)]
        values[3] = values[3] + (0.1 if impl == "wrong" else 0.0)  # the gradient of k
        return values

    error, passed, message = compare_with_reference(run, "wrong", attention_fuzz.OUTPUTS, grads=attention_fuzz.GRADS)
    assert not passed and message.startswith("grad k:") and error == pytest.approx(0.1)


def test_a_refusal_is_a_failure_that_says_why():
    results = list(attention_fuzz.fuzz("cpu", [("cuda-only", torch.float32)], 1))
    assert results[0][4] is False and "impl must be one of" in results[0][5]


def test_check_command_runs_the_fuzzer(capsys):
    assert main(["check", "--device", "cpu", "--fuzz", "2", "--seed", "7"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("attention fuzz")]
    assert lines and all(" ok " in line for line in lines)
    assert any("seed=7 " in line for line in lines) and any("seed=8 " in line for line in lines)
    assert "attention plain" not in out  # --fuzz alone: no fixed cases
    assert main(["check", "--fuzz", "-1"]) == 2
