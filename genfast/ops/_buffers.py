"""Contiguous views for the Triton launchers, which address memory as flat arrays."""

import torch


def contiguous_inputs(*tensors):
    return [t.contiguous() if t is not None else None for t in tensors]


def output_buffers(*outputs):
    """Each output itself when contiguous (or None), else a contiguous buffer for copy_back."""
    return [o if o is None or o.is_contiguous() else torch.empty_like(o, memory_format=torch.contiguous_format)
            for o in outputs]


def copy_back(buffers, outputs):
    for buffer, out in zip(buffers, outputs):
        if buffer is not out:
            out.copy_(buffer)
