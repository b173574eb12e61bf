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
