"""The measurement loop shared by the benchmarks of compute-bound ops (NADE, attention): each
variant's candidates timed side by side, with GFLOP/s against a GEMM measured in the same run and
each call's peak extra memory."""

import torch

from .peak_memory import peak_extra_bytes
from .timing import finish_group, time_in_turns, time_ms

GEMM_SIZE = {"cpu": 2048, "cuda": 8192}


def gemm_gflops(device: str, dtype, quick: bool) -> float:
    n = GEMM_SIZE.get(device, 2048)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / (time_ms(lambda: a @ b, device, quick)["median_ms"] * 1e-3) / 1e9


def time_groups(op: str, device: str, dtype, config: str, numel: int, groups: dict, gemm: float, quick: bool, say):
    """groups: {variant: (flops, [(name, fn), ...])}; the genfast candidates' names start with
    "genfast". Returns one row per candidate."""
    rows = []
    dtype_name = str(dtype).replace("torch.", "")
    for variant, (flops, entries) in groups.items():
        group = []
        # An unfused peer that runs out of memory at a long length is left out of the group.
        timings = time_in_turns(entries, device, quick, lambda message: say(f"{op}: {message}"), f"{variant}, {config}",
                                skip=(torch.OutOfMemoryError,))
        for (name, fn), timing in zip(entries, timings):
            if timing is None:
                continue
            try:
                extra = peak_extra_bytes(fn, device)
            except torch.OutOfMemoryError:
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            gflops = flops / (timing["median_ms"] * 1e-3) / 1e9
            group.append(dict(op=op, variant=variant, impl=name, device=device, dtype=dtype_name, numel=numel,
                              config=config, **timing, gflop_per_s=gflops, gemm_gflop_per_s=gemm,
                              fraction_of_gemm=gflops / gemm,
                              peak_extra_mib=None if extra is None else extra / 2 ** 20))
        rows += finish_group(group, say)
    return rows
