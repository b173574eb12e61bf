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


def check_schedule_value(name: str, value, sample: torch.Tensor, *, low=None, high=None, low_open=False,
                         high_open=False) -> None:
    """A float, or a tensor with one value or one per sample. Values are range-checked for floats
    and CPU tensors; a CUDA tensor is not read, since that would synchronize with the device."""
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
        if value.device.type != "cpu":
            return
        values = value.double().reshape(-1)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        values = torch.tensor([float(value)], dtype=torch.float64)
    else:
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    finite = values[~torch.isnan(values)]
    bad = torch.zeros_like(finite, dtype=torch.bool)
    if low is not None:
        bad |= (finite <= low) if low_open else (finite < low)
    if high is not None:
        bad |= (finite >= high) if high_open else (finite > high)
    if bool(bad.any()):
        lo_bracket = "(" if low_open else "["
        hi_bracket = ")" if high_open else "]"
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name} must be in {lo_bracket}{lo}, {hi}{hi_bracket}, got {finite[bad][0].item()}")
