"""The benchmarks `genfast bench` knows, by op name."""

from . import denoise_step, langevin_step

BENCHMARKS = {"denoise_step": denoise_step.run, "langevin_step": langevin_step.run}
