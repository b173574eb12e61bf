"""Benchmark of the fused Langevin step against its peers: `python bench/langevin_step.py [--quick] [--device cuda]`.

The same measurement as `genfast bench --ops langevin_step` (genfast/benchmarks/langevin_step.py)."""

import sys

from genfast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--ops", "langevin_step", *sys.argv[1:]]))
