"""Small data sets that ship with packages, so that models train without a download."""

import torch


def digits(dtype=torch.float32) -> torch.Tensor:
    """scikit-learn's 8x8 digits (1797 images) scaled to [-1, 1], shape (1797, 1, 8, 8)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("genfast.models.data.digits needs scikit-learn") from error
    images = torch.as_tensor(load_digits().images, dtype=dtype)  # values 0..16
    return (images / 8.0 - 1.0).unsqueeze(1)
