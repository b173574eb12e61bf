"""What the drop-ins for fp8 attention calls (FlashAttention 3's, FlashInfer's) share: genfast's
kernels take no float8, so such a call runs on its values widened exactly."""

import torch


def wide_dtype(device: torch.device) -> torch.dtype:
    """float8 widened: bfloat16 on a GPU (as fp8 kernels compute), float32 on the CPU."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16
