"""The benchmarks `genfast bench` knows, by op name."""

from . import denoise_step

BENCHMARKS = {"denoise_step": denoise_step.run}
