import fcntl
import json
import os
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from genfast import _backend

if os.environ.get("GENFAST_RECORD_TRITON_LAUNCHES") and os.environ.get("TRITON_INTERPRET") == "1":
    from genfast.testing.triton_gpu_compile import record

    record(os.environ["GENFAST_RECORD_TRITON_LAUNCHES"])  # for scripts/triton-gpu-compile

HAS_CUDA = torch.cuda.is_available()


# Seconds each Triton test of SHORT_TEST_SECONDS or more takes under the interpreter on one core, to
# split the tests into shards of equal time (GENFAST_TEST_SHARD); a test not listed counts as
# SHORT_TEST_DEFAULT. To remake it, in tests/:
#   TRITON_INTERPRET=1 OMP_NUM_THREADS=1 GENFAST_RECORD_TEST_DURATIONS=triton_interpreter_durations.json \
#     python -m pytest -m triton
TRITON_DURATIONS = Path(__file__).with_name("triton_interpreter_durations.json")
SHORT_TEST_SECONDS = 0.5
SHORT_TEST_DEFAULT = 0.05


def shard_items(items, index, count, durations):
    """The items of shard index of count: the longest first, each to the shard with the least time so
    far. The items keep their order within a shard."""
    seconds = [durations.get(item.nodeid, SHORT_TEST_DEFAULT) for item in items]
    loads = [0.0] * count
    chosen = set()
    for n in sorted(range(len(items)), key=lambda n: -seconds[n]):
        shard = min(range(count), key=lambda s: (loads[s], s))
        loads[shard] += seconds[n]
        if shard == index:
            chosen.add(n)
    return [item for n, item in enumerate(items) if n in chosen]


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected
def pytest_collection_modifyitems(config, items):
    shard = os.environ.get("GENFAST_TEST_SHARD")  # "i/n": one of n shards of equal time (scripts/test)
    if shard:
        index, count = (int(part) for part in shard.split("/"))
        durations = json.loads(TRITON_DURATIONS.read_text()) if TRITON_DURATIONS.exists() else {}
        kept = shard_items(items, index, count, durations)
        kept_ids = {id(item) for item in kept}
        config.hook.pytest_deselected(items=[item for item in items if id(item) not in kept_ids])
        items[:] = kept
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


class RecordedOps(TorchDispatchMode):
    """The ops a call dispatches (aten's and genfast's), as (schema name, args, result)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        self.calls.append((func._schema.name, args, result))
        return result


def capture_cuda_graph(fn):
    """fn() called once (its kernels compiled before capture), then captured in a CUDA graph on a side
    stream: the graph and the captured call's result, which each replay rewrites."""
    fn()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            result = fn()
    return graph, result


def one_call_time_ms(fn, device, quick=False, min_run_time=None):
    """A stand-in for genfast.benchmarks' time_ms: fn called once, timed at 2 ms, for tests of what
    a benchmark's rows hold rather than how fast."""
    fn()
    return {"median_ms": 2.0, "p20_ms": 2.0, "p80_ms": 2.0}


def assert_compiles_like_eager(fn, leaves):
    """torch.compile(fn, fullgraph=True) gives eager's value and gradients with respect to leaves."""
    eager = fn(*leaves)
    eager_grads = torch.autograd.grad(eager.sum(), leaves)
    compiled = torch.compile(fn, fullgraph=True)(*leaves)
    torch.testing.assert_close(compiled, eager)
    for a, e in zip(torch.autograd.grad(compiled.sum(), leaves), eager_grads):
        torch.testing.assert_close(a, e)


_durations = {}


@pytest.hookimpl(trylast=True)  # after the terminal reporter is registered
def pytest_configure(config):
    global _terminal
    _terminal = config.pluginmanager.get_plugin("terminalreporter")


_terminal = None


def pytest_runtest_logreport(report):
    if os.environ.get("GENFAST_RECORD_TEST_DURATIONS"):
        _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration
    # scripts/gpu-check: each failure's traceback as it happens, which a run stopped at its time
    # limit would otherwise never print.
    if os.environ.get("GENFAST_PRINT_FAILURES_AT_ONCE") and report.failed and _terminal is not None:
        _terminal.write_line(f"\n____ {report.nodeid} ({report.when}) ____\n{report.longreprtext}", flush=True)


def pytest_sessionfinish(session):
    path = os.environ.get("GENFAST_RECORD_TEST_DURATIONS")
    if path and _durations:
        with open(path, "a+") as file:  # shards side by side add to one file, one at a time
            fcntl.flock(file, fcntl.LOCK_EX)
            file.seek(0)
            text = file.read()
            recorded = json.loads(text) if text.strip() else {}
            for nodeid, seconds in _durations.items():
                if seconds >= SHORT_TEST_SECONDS:
                    recorded[nodeid] = round(seconds, 1)
                else:
                    recorded.pop(nodeid, None)
            file.seek(0)
            file.truncate()
            file.write(json.dumps(dict(sorted(recorded.items())), indent=0) + "\n")
