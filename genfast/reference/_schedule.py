"""Schedule values as the reference functions use them."""

import torch


def per_sample(value, like: torch.Tensor):
    """A schedule value as a float64 tensor broadcastable against `like` (one value per sample)."""
    if not isinstance(value, torch.Tensor):
        return torch.tensor(float(value), dtype=torch.float64, device=like.device)
    value = value.to(device=like.device, dtype=torch.float64)
    if value.numel() == 1:
        return value.reshape(())
    return value.reshape((value.numel(),) + (1,) * (like.dim() - 1))
