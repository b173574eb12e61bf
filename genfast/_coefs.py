"""Per-call coefficients of the fused update kernels: Python floats when every schedule value is a
float (no tensor work at all), else one float32 row per sample, built on the device without a
host synchronization."""

import math

import torch


def is_zero(value) -> bool:
    return not isinstance(value, torch.Tensor) and value == 0


def sqrt(value):
    return value.sqrt() if isinstance(value, torch.Tensor) else math.sqrt(value)


def as_float64(value):
    """A schedule value as a float, or as a flat float64 tensor (one value or one per sample)."""
    if isinstance(value, torch.Tensor):
        return value.to(torch.float64).reshape(-1)
    return float(value)


def pack_rows(coefs, device):
    """(row_coefs or None, floats): a (rows, len(coefs)) float32 tensor when any value is a tensor
    (the scalar list is then zeros and unused), else None and the values as floats."""
    tensors = [c for c in coefs if isinstance(c, torch.Tensor)]
    if not tensors:
        return None, [float(c) for c in coefs]
    rows = max(t.numel() for t in tensors)
    columns = [c.expand(rows) if isinstance(c, torch.Tensor) else
               torch.full((rows,), float(c), dtype=torch.float64, device=device) for c in coefs]
    return torch.stack(columns, dim=1).to(torch.float32).contiguous(), [0.0] * len(coefs)
