"""Peak extra memory of one call: what it allocates beyond what was live before it (its outputs
included), measured, not estimated."""

import ctypes
import gc

import torch


def _proc_status_kib(field: str):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _release_freed_heap():
    """glibc's malloc_trim: hands freed heap pages back to the kernel, so that a call reusing them
    shows in the resident set again (small tensors come from the heap, not from fresh mappings)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_extra_bytes(fn, device: str):
    """fn() once more after a warm-up call (compilation, lazy init). CUDA: the allocator's peak over
    what was allocated before. CPU: the process's peak resident memory (VmHWM, reset through
    /proc/self/clear_refs) over its resident memory before, freed heap memory handed back first;
    None where Linux's /proc is missing."""
    fn()
    gc.collect()
    _release_freed_heap()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak resident set size
        before = _proc_status_kib("VmRSS")
        fn()
        peak = _proc_status_kib("VmHWM")
    except OSError:
        return None
    if before is None or peak is None:
        return None
    return max(0, peak - before) * 1024
