"""Timers and the machine facts every benchmark records beside its figures."""

import math
import os
import platform
import subprocess
import sys

import torch


def time_ms(fn, device: str, quick: bool = False) -> dict:
    """Median time of fn() in milliseconds, with the 20th and 80th percentiles.

    GPU: triton.testing.do_bench (falls back to CUDA events); CPU: torch.utils.benchmark."""
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
    measurement = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=0.2 if quick else 1.0
    )
    times = sorted(measurement.times)
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))] * 1e3  # noqa: E731
    return {"median_ms": measurement.median * 1e3, "p20_ms": pick(0.2), "p80_ms": pick(0.8)}


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
