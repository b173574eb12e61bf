"""Benchmark of fused attention against torch SDPA's backends, the eager reference and torch.compile: `python bench/attention.py [--quick] [--device cuda]`.

The same measurement as `genfast bench --ops attention` (genfast/benchmarks/attention.py)."""

import sys

from genfast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--ops", "attention", *sys.argv[1:]]))
