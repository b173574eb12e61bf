"""Benchmark of NADE's fused log-likelihood and sampling and MADE's masked layer against their peers: `python bench/nade.py [--quick] [--device cuda]`.

The same measurement as `genfast bench --ops nade` (genfast/benchmarks/nade.py)."""

import sys

from genfast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--ops", "nade", *sys.argv[1:]]))
