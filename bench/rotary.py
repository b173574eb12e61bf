"""Benchmark of the rotary embedding of a Llama-style layer's queries and keys against transformers' rotate_half form, its torch.compile, Liger-Kernel and FlashAttention (GPU, where installed) and the eager reference: `python bench/rotary.py [--quick] [--device cuda]`.

The same measurement as `genfast bench --ops rotary` (genfast/benchmarks/rotary.py)."""

import sys

from genfast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--ops", "rotary", *sys.argv[1:]]))
