"""genfast.kernels.interpreter: Triton's interpreter, with the repeated patching of triton.language
skipped inside a launch, computes what it computed before and leaves triton.language as it found it.
Run with TRITON_INTERPRET=1."""

import pytest
import torch

from genfast import _backend

pytestmark = pytest.mark.triton

try:
    import triton
    import triton.language as tl
except ImportError:  # the tests skip
    triton = None

if triton is not None:  # at module level: the interpreter resolves device functions in the globals

    @triton.jit
    def cube_plus_one(x):
        return x * x * x + 1.0

    @triton.jit
    def twice(x):
        return cube_plus_one(x) + cube_plus_one(x) - 2.0

    @triton.jit
    def kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < n
        x = tl.load(x_ptr + idx, mask=mask, other=0.0)
        tl.store(y_ptr + idx, twice(x) + tl.sum(x, axis=0), mask=mask)


def _interpreter():
    if not _backend.triton_runs_on("cpu"):
        pytest.skip(_backend.triton_error() or "Triton runs on the CPU only under TRITON_INTERPRET=1")
    from triton.runtime import interpreter

    return interpreter


def _run():
    x = torch.linspace(-2, 2, 37)
    y = torch.empty_like(x)
    kernel[(3,)](x, y, x.numel(), BLOCK=16)
    blocks = torch.nn.functional.pad(x, (0, 11)).view(3, 16).sum(1).repeat_interleave(16)[:37]
    return y, 2 * x**3 + blocks


def test_nested_device_calls_compute_the_same_without_patching_again():
    interpreter = _interpreter()
    from genfast.kernels import interpreter as genfast_interpreter

    genfast_interpreter.skip_repeated_patching()
    shortcut, original = interpreter._patch_lang, genfast_interpreter._triton_patch_lang
    assert shortcut.__module__ == "genfast.kernels.interpreter" and original is not None
    patch_builtin = interpreter._patch_builtin
    results, patched_modules = {}, {}
    for name, patch_lang in (("triton's", original), ("genfast's", shortcut)):
        calls = []
        interpreter._patch_lang = patch_lang
        interpreter._patch_builtin = lambda *args: calls.append(args[0]) or patch_builtin(*args)
        try:
            results[name] = _run()
        finally:
            interpreter._patch_lang, interpreter._patch_builtin = shortcut, patch_builtin
        patched_modules[name] = len(calls)
        assert tl.core.is_builtin(tl.load)  # triton.language restored after the launches
    # one launch patches some modules; Triton's own code patches again at each of the 9 device calls
    # (3 per program)
    assert patched_modules["triton's"] >= patched_modules["genfast's"] + 9 > 9
    y, expected = results["genfast's"]
    torch.testing.assert_close(y, expected)
    assert torch.equal(y, results["triton's"][0])


def test_a_device_call_outside_a_launch_still_patches():
    """Only a call whose triton.language is patched already skips the patching."""
    interpreter = _interpreter()
    from genfast.kernels import interpreter as genfast_interpreter

    genfast_interpreter.skip_repeated_patching()
    assert not genfast_interpreter._patched(tl)
    scope = interpreter._patch_lang(kernel.fn)
    try:
        assert genfast_interpreter._patched(tl)
    finally:
        scope.restore()
    assert not genfast_interpreter._patched(tl)
