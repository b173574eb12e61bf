"""The benchmarks `genfast bench` knows, by op name."""

from . import attention, attention_merge, denoise_step, flows, langevin_step, nade, rotary

BENCHMARKS = {"denoise_step": denoise_step.run, "langevin_step": langevin_step.run, "affine_coupling": flows.run,
              "nade": nade.run, "rotary": rotary.run, "attention": attention.run,
              "attention_merge": attention_merge.run}
