"""`genfast check`: every op on every backend available here against the reference."""

import torch

from .. import _backend
from . import attention as attention_samples
from . import attention_merge as attention_merge_samples
from . import attention_fuzz
from . import denoise_step as denoise_samples
from . import flows as flow_samples
from . import langevin_step as langevin_samples
from . import nade as nade_samples
from . import rotary as rotary_samples
from .tolerances import assert_close_elementwise, compare_with_reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _runnable(impl, device, dtype):
    if impl == "native":
        return _backend.native_runs_on(device)
    if impl == "triton":
        return _backend.triton_runs_on(device) and not (device == "cpu" and dtype == torch.bfloat16)
    return False


def _max_error(actual, expected):
    finite = torch.isfinite(expected)
    if not bool(finite.any()):
        return 0.0
    return (actual.double() - expected.double())[finite].abs().max().item()


def _check_cases(cases, make_inputs, device):
    """Yields (case, impl, dtype, max_error, passed, message) for each runnable combination."""
    for case in cases:
        for impl in ("native", "triton"):
            for dtype in DTYPES:
                if not _runnable(impl, device, dtype):
                    continue
                args, kwargs = make_inputs(case, (4, 3, 17, 9), dtype, device, per_sample_schedule=True)
                got = case.fn(*args, **kwargs, impl=impl)
                expected = case.fn(*args, **kwargs, impl="reference")
                try:
                    assert_close_elementwise(got, expected)
                    passed, message = True, ""
                except AssertionError as error:
                    passed, message = False, str(error).splitlines()[0]
                yield case.name, impl, dtype, _max_error(got, expected), passed, message


def check_denoise_step(device):
    return _check_cases(denoise_samples.DENOISE_CASES, denoise_samples.make_denoise_inputs, device)


def check_langevin_step(device):
    return _check_cases(langevin_samples.LANGEVIN_CASES, langevin_samples.make_langevin_inputs, device)


def _check_trainable(samples, device, runs=_runnable):
    for case, dtype, run, outputs in samples.cases(device, DTYPES):
        for impl in ("native", "triton"):
            if runs(impl, device, dtype):
                yield (case, impl, dtype) + compare_with_reference(run, impl, outputs,
                                                                   grads=getattr(samples, "GRADS", ()))


def check_flows(device):
    return _check_trainable(flow_samples, device)


def check_nade(device):
    return _check_trainable(nade_samples, device)


def check_rotary(device):
    return _check_trainable(rotary_samples, device)


def check_attention_merge(device):
    return _check_trainable(attention_merge_samples, device)


def _attention_runs(impl, device, dtype):
    # The CUDA kernels take float16 and bfloat16 (Triton runs float32 there).
    return _runnable(impl, device, dtype) and not (device != "cpu" and impl == "native" and dtype == torch.float32)


def check_attention(device):
    return _check_trainable(attention_samples, device, _attention_runs)


def fuzz_attention(device, count, seed=0):
    runs = [(impl, dtype) for impl in ("native", "triton") for dtype in DTYPES if _attention_runs(impl, device, dtype)]
    return attention_fuzz.fuzz(device, runs, count, seed)


CHECKS = {"denoise_step": check_denoise_step, "langevin_step": check_langevin_step, "flows": check_flows,
          "nade": check_nade, "rotary": check_rotary, "attention": check_attention,
          "attention_merge": check_attention_merge}


def run(devices, ops, out=print, fuzz=0, seed=0) -> int:
    """Prints one line per check and returns the number of failures; with fuzz, the checks of ops
    and then fuzz random attention calls per backend and dtype (case n drawn from seed + n)."""
    failures = 0
    for device in devices:
        checks = [(op, CHECKS[op](device)) for op in ops]
        if fuzz:
            checks.append(("attention fuzz", fuzz_attention(device, fuzz, seed)))
        for op, results in checks:
            for case, impl, dtype, error, passed, message in results:
                failures += not passed
                dtype_name = str(dtype).replace("torch.", "")
                status = "ok" if passed else f"FAIL {message}"
                result = f"{impl:7s} {device:5s} {dtype_name:9s} max|err| {error:.2e}  {status}"
                # A fuzz case's description is long: last.
                out(f"{op:14s} {result}  {case}" if op == "attention fuzz" else f"{op:14s} {case:34s} {result}")
    return failures
