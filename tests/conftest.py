import os

import pytest
import torch

from genfast import _backend

if os.environ.get("GENFAST_RECORD_TRITON_LAUNCHES") and os.environ.get("TRITON_INTERPRET") == "1":
    from genfast.testing.triton_gpu_compile import record

    record(os.environ["GENFAST_RECORD_TRITON_LAUNCHES"])  # for scripts/triton-gpu-compile

HAS_CUDA = torch.cuda.is_available()


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected
def pytest_collection_modifyitems(config, items):
    shard = os.environ.get("GENFAST_TEST_SHARD")  # "i/n": every n-th test from the i-th (scripts/test)
    if shard:
        index, count = (int(part) for part in shard.split("/"))
        config.hook.pytest_deselected(items=[item for n, item in enumerate(items) if n % count != index])
        items[:] = items[index::count]
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
        if "triton" in item.keywords:
            device = "cuda" if "cuda" in item.keywords else "cpu"
            if not _backend.triton_runs_on(device):
                why = _backend.triton_error() or "Triton runs on the CPU only under TRITON_INTERPRET=1"
                item.add_marker(pytest.mark.skip(reason=why))


def devices():
    """The devices a test runs on: the CPU always, CUDA as a marked param that skips without a GPU."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def fused_impls():
    """The fused backends, compared with the reference; Triton's are marked so that they skip cleanly."""
    return ["native", pytest.param("triton", marks=pytest.mark.triton)]


def skip_unless_supported(impl, device, dtype=torch.float32):
    """skip_unless_runs, and the Triton interpreter's missing bfloat16."""
    skip_unless_runs(impl, device)
    if impl == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bfloat16")


def skip_unless_runs(impl, device):
    if impl == "native" and not _backend.native_runs_on(device):
        pytest.skip(f"genfast._C has no {device} backend here: {_backend.native_error() or 'not built for it'}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Small batches run faster on one thread, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_compiles_like_eager(fn, leaves):
    """torch.compile(fn, fullgraph=True) gives eager's value and gradients with respect to leaves."""
    eager = fn(*leaves)
    eager_grads = torch.autograd.grad(eager.sum(), leaves)
    compiled = torch.compile(fn, fullgraph=True)(*leaves)
    torch.testing.assert_close(compiled, eager)
    for a, e in zip(torch.autograd.grad(compiled.sum(), leaves), eager_grads):
        torch.testing.assert_close(a, e)
