"""The measurement loop shared by the benchmarks of elementwise update ops: for each size, a copy
bandwidth measured beside it, then each variant's candidates timed side by side."""

import torch

from .timing import copy_bandwidth_gbs, finish_group, time_in_turns


def run_groups(op: str, device: str, sizes, dtypes, quick: bool, progress, make_candidates):
    """make_candidates(numel, dtype) -> {variant: (bytes_moved, [(name, fn), ...])}; the genfast
    candidates' names start with "genfast". Returns one row per candidate, size, dtype and variant."""
    say = progress or (lambda message: None)
    rows = []
    for numel in sizes:
        # Measured beside each size: a shared machine's memory bandwidth drifts over minutes.
        say(f"{op}: copy bandwidth before {numel} elements")
        copy_gbs, copy_measured = copy_bandwidth_gbs(device, quick)
        for dtype in dtypes:
            dtype_name = str(dtype).replace("torch.", "")
            for variant, (bytes_moved, entries) in make_candidates(numel, dtype).items():
                group = []
                timings = time_in_turns(entries, device, quick, lambda message: say(f"{op}: {message}"),
                                        f"{variant}, {numel} x {dtype_name}")
                for (name, fn), timing in zip(entries, timings):
                    gbs = bytes_moved / (timing["median_ms"] * 1e-3) / 1e9
                    group.append(dict(op=op, variant=variant, impl=name, device=device, dtype=dtype_name, numel=numel,
                                      **timing, gb_per_s=gbs, copy_gb_per_s=copy_gbs,
                                      copy_gb_per_s_measured=copy_measured, fraction_of_copy=gbs / copy_gbs))
                rows += finish_group(group, say)
    return rows


def default_dtypes(device: str):
    return [torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16]


def fused_impls(device: str):
    """The genfast backends worth timing here (the Triton interpreter is no benchmark)."""
    from .. import _backend

    return [impl for impl in ("native", "triton") if impl in _backend.available_impls(device)
            and not (impl == "triton" and device == "cpu")]
