"""Plain-PyTorch definitions of every genfast op: the oracle for tests, `genfast check` and benchmarks."""

from . import diffusion, flows, langevin, nade, random

__all__ = ["diffusion", "flows", "langevin", "nade", "random"]
