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


# Binarized digits, for binary autoregressive models (NADE, MADE).
DIGITS_THRESHOLD = 8
DIGITS_NUM_TEST = 297


def binarized_digits(dtype=torch.float32) -> torch.Tensor:
    """scikit-learn's 8x8 digits thresholded at 8: a pixel is 1 where its intensity (0..16) is >= 8,
    else 0; shape (1797, 64), each image flattened row by row."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("genfast.models.data.binarized_digits needs scikit-learn") from error
    images = torch.as_tensor(load_digits().images)  # values 0..16
    return (images >= DIGITS_THRESHOLD).reshape(images.shape[0], -1).to(dtype)


def train_test_split(data: torch.Tensor, num_test: int = DIGITS_NUM_TEST):
    """(train, test): the last num_test rows are the test set (deterministic; for the digits, the
    last 297 of 1797 images, the classes cycling through the whole set), the others the train set."""
    if not 0 < num_test < data.shape[0]:
        raise ValueError(f"num_test must be in (0, {data.shape[0]}), got {num_test}")
    return data[:-num_test], data[-num_test:]


def python_text(limit: int = 1 << 17) -> bytes:
    """English text that ships with Python (pydoc's topics), as UTF-8 bytes, at most `limit` of them."""
    import pydoc_data.topics

    return "".join(pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics)).encode()[:limit]
