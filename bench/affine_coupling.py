"""Benchmark of the fused affine coupling layer against its peers: `python bench/affine_coupling.py [--quick] [--device cuda]`.

The same measurement as `genfast bench --ops affine_coupling` (genfast/benchmarks/flows.py)."""

import sys

from genfast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--ops", "affine_coupling", *sys.argv[1:]]))
