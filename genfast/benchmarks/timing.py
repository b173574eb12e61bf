"""Timers and the machine facts every benchmark records beside its figures."""

import math
import os
import platform
import subprocess
import sys

import torch


def time_ms(fn, device: str, quick: bool = False, min_run_time: float | None = None) -> dict:
    """Median time of fn() in milliseconds, with the 20th and 80th percentiles; on the CPU also
    every block's time per call (times_ms).

    GPU: triton.testing.do_bench (falls back to CUDA events); CPU: torch.utils.benchmark, for
    min_run_time seconds (default 0.2 with quick, else 1)."""
    if device == "cuda":
        try:
            from triton.testing import do_bench

            median, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=10 if quick else 25,
                                        rep=30 if quick else 100)
            return {"median_ms": median, "p20_ms": p20, "p80_ms": p80}
        except ImportError:
            pass
        return _cuda_event_timing(fn, 10 if quick else 50)
    from torch.utils import benchmark

    fn()  # warm up
    if min_run_time is None:
        min_run_time = 0.2 if quick else 1.0
    measurement = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time
    )
    return {**_quantiles_ms(measurement.times), "times_ms": [t * 1e3 for t in measurement.times]}


def _quantiles_ms(times_s) -> dict:
    times = sorted(times_s)
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))] * 1e3  # noqa: E731
    middle = len(times) // 2
    median = times[middle] if len(times) % 2 else (times[middle - 1] + times[middle]) / 2
    return {"median_ms": median * 1e3, "p20_ms": pick(0.2), "p80_ms": pick(0.8)}


# On the CPU the candidates of a group are timed in turns, this many rounds, each candidate's
# figures taken over all its rounds: a shared machine's slow spells (a neighbour's burst, a lower
# clock) then fall on every candidate alike, where timing one after the other would put a spell on
# one of them and skew the ratios. A GPU's timer (do_bench) is steady enough in one go.
CPU_ROUNDS = {True: 3, False: 5}


class GenfastCandidateError(RuntimeError):
    """A genfast candidate's call raised while being timed (the error it raised is its cause)."""


def time_in_turns(entries, device: str, quick: bool, say, label: str, skip=()) -> list:
    """entries: [(name, fn), ...]; returns each one's timing, in order, or None for a candidate
    whose call raised one of skip (say, running out of GPU memory), or for a peer (a name without
    "genfast") that raised anything else, said on stderr: one peer's break (another library's
    version) does not end the run. A genfast candidate's error ends it (GenfastCandidateError).
    Neither is called again. say(f"{name}, {label}") is called before each timing, with the round
    where there are several."""
    rounds = CPU_ROUNDS[quick] if device == "cpu" else 1
    per_round = None if rounds == 1 else (0.2 if quick else 1.0) / rounds  # the same measured time per candidate
    measured = [[] for _ in entries]
    for round_index in range(rounds):
        for (name, fn), timings in zip(entries, measured):
            if timings is None:
                continue
            say(f"{name}, {label}" + (f" (round {round_index + 1} of {rounds})" if rounds > 1 else ""))
            try:
                timings.append(time_ms(fn, device, quick, min_run_time=per_round))
            except Exception as error:
                if not isinstance(error, skip) and "genfast" in name:
                    raise GenfastCandidateError(f"{name}, {label}: {type(error).__name__}: {error}") from error
                if not isinstance(error, skip):
                    print(f"\ngenfast bench: {name} left out of {label}: {type(error).__name__}: {error}",
                          file=sys.stderr)
                timings.clear()
                if device == "cuda":
                    torch.cuda.empty_cache()
        measured = [timings or None for timings in measured]
    return [None if timings is None else _pooled(timings) for timings in measured]


def _pooled(timings: list) -> dict:
    """One candidate's rounds as one timing: the quantiles of all its blocks where the rounds give
    them, else the median of the rounds' figures."""
    if len(timings) == 1:
        timing = dict(timings[0])
    elif all("times_ms" in timing for timing in timings):
        timing = _quantiles_ms([t / 1e3 for timing in timings for t in timing["times_ms"]])
    else:
        timing = {key: sorted(t[key] for t in timings)[len(timings) // 2] for key in ("median_ms", "p20_ms", "p80_ms")}
    timing.pop("times_ms", None)
    return timing


def _cuda_event_timing(fn, reps):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return {"median_ms": times[len(times) // 2], "p20_ms": times[len(times) // 5], "p80_ms": times[4 * len(times) // 5]}


# Buffers far larger than any cache, so that the copy measures device memory: 256 MiB each on
# the CPU (some EPYC parts hold hundreds of MiB of L3), 1 GiB on a GPU.
COPY_NUMEL = {"cpu": 1 << 26, "cuda": 1 << 28}


def finish_group(group: list, say) -> list:
    """Each row's time over the fastest genfast candidate's in its group (rows timed side by side);
    the group then goes to say.measured where the progress callback has one (genfast bench --stream)."""
    best = min((row["median_ms"] for row in group if row["impl"].startswith("genfast")), default=math.nan)
    for row in group:
        row["time_over_genfast"] = row["median_ms"] / best
    measured = getattr(say, "measured", None)
    if measured is not None:
        measured(group)
    return group


def copy_bandwidth_gbs(device: str, quick: bool = False, repeats: int = 3):
    """The machine's memory bandwidth as a large float32 copy achieves it (bytes read + written per
    second): the median over `repeats` fresh buffer pairs, since on a virtual machine one pair of
    buffers can land on faster pages than the next. Returns (median, all measurements)."""
    numel = COPY_NUMEL.get(device, 1 << 26)
    measured = []
    for _ in range(repeats):
        src = torch.randn(numel, device=device)
        dst = torch.empty_like(src)
        ms = time_ms(lambda: dst.copy_(src), device, quick)["median_ms"]
        measured.append(2 * numel * 4 / (ms * 1e-3) / 1e9)
        del src, dst
    return sorted(measured)[len(measured) // 2], measured


def _git_sha():
    """The checkout's commit, or GENFAST_GIT_SHA where there is no git repository (a copy of the
    working tree, as on the device tool's machine)."""
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return sha or os.environ.get("GENFAST_GIT_SHA") or None


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str) -> dict:
    import genfast

    info = {
        "device": device,
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "git_sha": _git_sha(),
        "build": genfast.build_info(),
        # PyTorch's huge pages for large CPU allocations: far fewer page faults per fresh output
        "thp_mem_alloc_enable": os.environ.get("THP_MEM_ALLOC_ENABLE"),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info
