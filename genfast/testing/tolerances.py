"""The one place tests take tolerances from (see ARCHITECTURE.md, Numerics)."""

import torch

# Box-Muller in genfast's polynomials against torch's float64 log/sin/cos, per normal.
NORMAL_STREAM_ATOL = 2e-6
NORMAL_STREAM_RTOL = 2e-6


def assert_close_elementwise(actual, expected, *, scale=1.0, msg=None):
    """Elementwise ops computed in fp32 inside the kernel: torch's per-dtype defaults, widened by
    `scale` where schedule coefficients magnify fp32 rounding (e.g. 1 / sqrt(alpha) ~ 100)."""
    rtol, atol = {
        torch.float32: (1.3e-6, 1e-5),
        torch.float16: (1e-3, 1e-5),
        torch.bfloat16: (1.6e-2, 1e-5),
        torch.float64: (1e-7, 1e-7),
    }[expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol * scale, atol=atol * scale, equal_nan=True, msg=msg)


def assert_same_normals(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=NORMAL_STREAM_RTOL, atol=NORMAL_STREAM_ATOL)


def assert_error_ratio(actual, exact, low_precision, *, ratio=2.0, floor=1e-6, msg=""):
    """flash-attention's rule for reductions and matmul-like ops: the fused result's error against
    an exact reference (float64) is at most `ratio` times the error of the same reference run in the
    input's precision, plus a floor relative to the values' scale (at least one unit of rounding of
    the result's dtype, which every result stored in it may carry). NaN and infinities must match."""
    if actual.dtype.is_floating_point:
        floor = max(floor, torch.finfo(actual.dtype).eps)
    exact = exact.double()
    actual, low_precision = actual.double(), low_precision.double()
    finite = torch.isfinite(exact)
    assert torch.equal(torch.isfinite(actual), finite), f"{msg}: non-finite values differ from the reference"
    assert torch.equal(actual.isnan(), exact.isnan()), f"{msg}: NaNs differ from the reference"
    if not bool(finite.any()):
        return
    error = (actual - exact)[finite].abs().max().item()
    low_error = (low_precision - exact)[finite].abs().max().item()
    scale = exact[finite].abs().max().item()
    bound = ratio * low_error + floor * max(1.0, scale)
    assert error <= bound, f"{msg}: max error {error:.3e} > {ratio} x {low_error:.3e} + floor ({bound:.3e})"


def compare_with_reference(run, impl, outputs=("y", "logdet"), grad_floor=1e-6, grads=()):
    """(max error, passed, message) of run(impl) against run("reference", torch.float64), by the
    error-ratio rule: 2x for the first len(outputs) results, 3x for the gradients after them (with
    grad_floor as their floor; named in a failure's message by grads where given)."""
    got = run(impl)
    exact = run("reference", torch.float64)
    low = run("reference")
    error = max([(a.double() - e).nan_to_num().abs().max().item() for a, e in zip(got, exact) if e.numel()] or [0.0])
    try:
        for k, (a, e, lo) in enumerate(zip(got, exact, low)):
            name = outputs[k] if k < len(outputs) else (grads[k - len(outputs)] if grads else "grad")
            if k < len(outputs):
                assert_error_ratio(a, e, lo, ratio=2.0, msg=name)
            else:
                assert_error_ratio(a, e, lo, ratio=3.0, floor=grad_floor, msg=name)
    except AssertionError as failure:
        return error, False, str(failure).splitlines()[0]
    return error, True, ""
