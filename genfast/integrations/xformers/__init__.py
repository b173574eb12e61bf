"""xformers' memory-efficient attention (xformers.ops, xformers.ops.fmha and its attention biases)
on genfast's kernels, for code written against it: change the import and nothing else,

    import xformers.ops as xops
    import genfast.integrations.xformers.ops as xops

    from xformers.ops import fmha
    from genfast.integrations.xformers.ops import fmha

and it runs where xformers does not (the CPU; genfast's Triton kernels with impl="...", a keyword
xformers does not have; float64 with impl="reference"). xformers' own bias objects are taken too. ops/fmha/__init__.py
says what is taken and where genfast differs."""

from . import ops

__all__ = ["ops"]
