"""genfast.benchmarks.timing.time_in_turns: the candidates of a group timed in turns on the CPU, each
one's figures pooled over its rounds, so that a slow spell of a shared machine falls on all of them."""

import pytest
import torch

from genfast.benchmarks import timing


class FakeTimer:
    """time_ms's stand-in: each call's blocks are taken from a clock that a slow spell can slow."""

    def __init__(self, slow_calls=()):
        self.calls, self.slow_calls = [], set(slow_calls)

    def __call__(self, fn, device, quick=False, min_run_time=None):
        fn()
        self.calls.append((fn.__name__, min_run_time))
        slow = 10.0 if len(self.calls) - 1 in self.slow_calls else 1.0
        base = {"a": 1.0, "b": 2.0, "c": 4.0}[fn.__name__]
        times = [base * slow, base * slow * 1.1]
        return {"median_ms": base * slow, "p20_ms": base * slow, "p80_ms": base * slow * 1.1, "times_ms": times}


def named(name, action=None):
    def fn():
        if action is not None:
            action()
    fn.__name__ = name
    return fn


def test_cpu_candidates_take_turns_and_pool_their_rounds(monkeypatch):
    # Call 4 (b's second round) falls in a slow spell: b's median over its six blocks moves by a
    # tenth (2.0 to 2.2), where timing b in that round alone would have made it ten times slower.
    timer = FakeTimer(slow_calls={4})
    monkeypatch.setattr(timing, "time_ms", timer)
    said = []
    entries = [(name, named(name)) for name in "abc"]
    result = timing.time_in_turns(entries, "cpu", True, said.append, "forward, B=2")
    rounds = timing.CPU_ROUNDS[True]
    assert [name for name, _ in timer.calls] == list("abc") * rounds
    assert all(seconds == pytest.approx(0.2 / rounds) for _, seconds in timer.calls)
    assert said[:3] == [f"{name}, forward, B=2 (round 1 of {rounds})" for name in "abc"]
    assert [r["median_ms"] for r in result] == pytest.approx([1.05, 2.2, 4.2])
    assert result[1]["p80_ms"] == pytest.approx(20.0) and result[1]["p20_ms"] == pytest.approx(2.0)
    assert all("times_ms" not in r for r in result)


def test_full_runs_take_more_rounds_of_the_same_total_time(monkeypatch):
    timer = FakeTimer()
    monkeypatch.setattr(timing, "time_ms", timer)
    timing.time_in_turns([("a", named("a"))], "cpu", False, lambda message: None, "x")
    rounds = timing.CPU_ROUNDS[False]
    assert rounds > timing.CPU_ROUNDS[True]
    assert [seconds for _, seconds in timer.calls] == pytest.approx([1.0 / rounds] * rounds)


def test_a_candidate_that_raises_a_skipped_error_is_left_out_and_not_called_again(monkeypatch):
    timer = FakeTimer()
    monkeypatch.setattr(timing, "time_ms", timer)

    def out_of_memory():
        raise torch.OutOfMemoryError("too long")

    entries = [("a", named("a")), ("b", named("b", out_of_memory)), ("c", named("c"))]
    result = timing.time_in_turns(entries, "cpu", True, lambda message: None, "x", skip=(torch.OutOfMemoryError,))
    assert result[1] is None and result[0] is not None and result[2] is not None
    assert [name for name, _ in timer.calls] == list("ac") * timing.CPU_ROUNDS[True]
    calls = []

    def fails_in_round_two():  # a candidate that fails late loses its earlier rounds too
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("grew")

    entries = [("a", named("a")), ("b", named("b", fails_in_round_two))]
    result = timing.time_in_turns(entries, "cpu", True, lambda message: None, "x", skip=(torch.OutOfMemoryError,))
    assert result[0] is not None and result[1] is None and len(calls) == 2
    # An error not skipped: a peer's leaves it out, genfast's is the caller's.
    assert timing.time_in_turns([("a", named("a", lambda: int("x")))], "cpu", True, lambda message: None,
                                "x") == [None]
    with pytest.raises(timing.GenfastCandidateError, match="ValueError") as raised:
        timing.time_in_turns([("genfast a", named("a", lambda: int("x")))], "cpu", True, lambda message: None, "x")
    assert isinstance(raised.value.__cause__, ValueError)


def test_a_gpu_times_each_candidate_once(monkeypatch):
    """do_bench is steady in one go; its timings have no blocks to pool and pass through as they are."""
    calls = []

    def gpu_timer(fn, device, quick=False, min_run_time=None):
        calls.append((fn.__name__, min_run_time))
        return {"median_ms": 3.0, "p20_ms": 2.5, "p80_ms": 3.5}

    monkeypatch.setattr(timing, "time_ms", gpu_timer)
    said = []
    result = timing.time_in_turns([(name, named(name)) for name in "ab"], "cuda", True, said.append, "fwd")
    assert calls == [("a", None), ("b", None)]
    assert said == ["a, fwd", "b, fwd"]
    assert result == [{"median_ms": 3.0, "p20_ms": 2.5, "p80_ms": 3.5}] * 2


def test_rounds_without_blocks_take_the_median_of_their_figures():
    rounds = [{"median_ms": m, "p20_ms": m - 1, "p80_ms": m + 1} for m in (5.0, 1.0, 3.0)]
    assert timing._pooled(rounds) == {"median_ms": 3.0, "p20_ms": 2.0, "p80_ms": 4.0}


def test_the_real_timer_returns_its_blocks_on_the_cpu():
    result = timing.time_ms(lambda: torch.ones(8).sum(), "cpu", quick=True, min_run_time=0.01)
    assert result["times_ms"] and all(t > 0 for t in result["times_ms"])
    assert result["p20_ms"] <= result["median_ms"] <= result["p80_ms"]
