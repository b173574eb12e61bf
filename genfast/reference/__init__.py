"""Plain-PyTorch definitions of every genfast op: the oracle for tests, `genfast check` and benchmarks."""

from . import diffusion, langevin, random

__all__ = ["diffusion", "langevin", "random"]
