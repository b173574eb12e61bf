"""Benchmark of the fused denoise step against its peers: `python bench/denoise_step.py [--quick] [--device cuda]`.

The same measurement as `genfast bench --ops denoise_step` (genfast/benchmarks/denoise_step.py)."""

import sys

from genfast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--ops", "denoise_step", *sys.argv[1:]]))
