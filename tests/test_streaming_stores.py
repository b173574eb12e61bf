"""genfast._C.pages_resident, which decides where the CPU kernels write large float32 outputs with
streaming stores: into memory written before, not into a new mapping whose first touch clears each
page into the cache."""

import mmap
import sys

import pytest
import torch

import genfast
from conftest import skip_unless_runs


def _resident(t):
    return genfast._C.pages_resident(t.data_ptr(), t.numel() * t.element_size())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore is Linux's; elsewhere it says True")
def test_pages_resident_tells_a_new_mapping_from_written_memory():
    skip_unless_runs("native", "cpu")
    # A mapping of our own: an allocator may hand back memory written before (glibc's tunables,
    # a preloaded jemalloc), which is resident.
    fresh = torch.frombuffer(mmap.mmap(-1, 64 << 20), dtype=torch.float32)
    assert not _resident(fresh)
    fresh[:16] = 1  # the first page only, where an allocator writes its header
    assert not _resident(fresh)
    fresh[: fresh.numel() // 2 + 1024] = 1  # past the middle page, short of the last
    assert not _resident(fresh)
    fresh[-1] = 1
    assert _resident(fresh)
    assert _resident(torch.ones(5))
    assert genfast._C.pages_resident(fresh.data_ptr(), 0)  # nothing to tell
