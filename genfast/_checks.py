"""Argument checks shared by the public functions: each error names the argument and what was expected."""

import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float_tensor(name: str, tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {tensor.dtype}")


def check_like(name: str, tensor, like: torch.Tensor, like_name: str = "sample") -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.shape != like.shape:
        raise ValueError(f"{name} must have the shape of {like_name} {tuple(like.shape)}, got {tuple(tensor.shape)}")
    if tensor.device != like.device:
        raise ValueError(f"{name} must be on the device of {like_name} ({like.device}), got {tensor.device}")
    if tensor.dtype != like.dtype:
        raise TypeError(f"{name} must have the dtype of {like_name} ({like.dtype}), got {tensor.dtype}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _out_of_range(values, low, high, low_open, high_open):
    """The values outside the range; NaN is never out of range (it propagates)."""
    bad = []
    for v in values:
        below = low is not None and (v <= low if low_open else v < low)
        above = high is not None and (v >= high if high_open else v > high)
        if below or above:
            bad.append(v)
    return bad


def check_schedule_value(name: str, value, sample: torch.Tensor, *, low=None, high=None, low_open=False,
                         high_open=False) -> None:
    """A float, or a tensor with one value or one per sample. Values are range-checked for floats
    and for CPU tensors in eager mode; a CUDA tensor is never read, since that would synchronize."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        batch = sample.shape[0] if sample.dim() > 0 else 1
        if value.numel() not in (1, batch):
            raise ValueError(
                f"{name} must hold one value or one per sample (sample.shape[0] = {batch}), got shape {tuple(value.shape)}"
            )
        if value.device != sample.device:
            raise ValueError(f"{name} must be on the device of sample ({sample.device}), got {value.device}")
        if value.device.type != "cpu" or torch.compiler.is_compiling() or (low is None and high is None):
            return
        values = value.double().reshape(-1).tolist()
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        values = [float(value)]
    else:
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    bad = _out_of_range(values, low, high, low_open, high_open)
    if bad:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        interval = f"{'(' if low_open else '['}{lo}, {hi}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {bad[0]}")
