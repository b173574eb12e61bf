"""genfast.testing.triton_gpu_compile, the CI step that compiles the Triton kernels for sm_80 and
sm_90 without a GPU: a launch recorded under the interpreter compiles, and a kernel that only the
GPU compiler rejects (a loop-carried value changing type, which the interpreter runs) fails it."""

import json
import os
import subprocess
import sys

import numpy
import pytest
import triton
import triton.language as tl

from genfast import _backend
from genfast.testing.triton_gpu_compile import _covering, compile_all, plan

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="compiles for a GPU, which needs triton.jit's own functions")
_INTERPRETER_ERROR = _backend.interpreter_error(triton.__version__, numpy.__version__)


@triton.jit
def steady_loop_kernel(out_ptr, n, BLOCK: tl.constexpr):
    total = tl.zeros((BLOCK,), tl.float32)
    for _ in range(n):
        total += 0.5
    tl.store(out_ptr + tl.arange(0, BLOCK), total)


@triton.jit
def drifting_loop_kernel(out_ptr, n):
    total = 0
    for _ in range(n):
        total = total + 0.5  # int32 becomes float32: only the compiler says so
    tl.store(out_ptr, total)


RECORD = """
import torch
from genfast.testing.triton_gpu_compile import record
record({path!r}, prefix="test_triton_gpu_compile")
import test_triton_gpu_compile as kernels
out = torch.zeros(16)
kernels.steady_loop_kernel[(1,)](out, 3, BLOCK=16)
assert float(out[0]) == 1.5
kernels.drifting_loop_kernel[(1,)](out, 3)
assert float(out[0]) == 1.5  # the interpreter runs it
"""


@pytest.mark.skipif(_INTERPRETER_ERROR is not None, reason=f"records under the interpreter: {_INTERPRETER_ERROR}")
def test_recorded_launches_compile_and_a_gpu_only_error_fails(tmp_path):
    path = tmp_path / "launches.jsonl"
    here = os.path.dirname(__file__)
    subprocess.run([sys.executable, "-c", RECORD.format(path=str(path))], cwd=here, check=True,
                   env=dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=here))
    with open(path) as lines:
        jobs = plan(lines)
    assert sorted(job[1] for job in jobs) == ["drifting_loop_kernel", "steady_loop_kernel"]
    steady = [job for job in jobs if job[1] == "steady_loop_kernel"]
    assert json.loads(steady[0][2]) == {"out_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}
    assert json.loads(steady[0][3]) == {"BLOCK": 16}
    lines = []
    failures = compile_all(jobs, targets=[("cuda", 90)], workers=1, say=lines.append)
    assert len(lines) == 2 and len(failures) == 1
    assert "drifting_loop_kernel" in failures[0] and "Loop-carried variable" in failures[0]


def test_covering_shows_every_value_once_at_least():
    entries = [dict(signature={"x": "*fp32"}, constexprs={"A": a, "B": b}) for a in (0, 1, 2) for b in (False, True)]
    chosen = _covering(entries)
    assert len(chosen) == 3
    assert {e["constexprs"]["A"] for e in chosen} == {0, 1, 2}
    assert {e["constexprs"]["B"] for e in chosen} == {False, True}
    # Every list of GPU variants too (a bucket's or dtype's tiles), though its values are covered.
    for e in entries:
        e["variants"] = [[{"M": 16}, 4, 1]] if e["constexprs"] == {"A": 1, "B": False} else [[{"M": 64}, 4, 1]]
    chosen = _covering(entries)
    assert {"A": 1, "B": False} in [e["constexprs"] for e in chosen] and len(chosen) == 3
