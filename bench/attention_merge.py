"""Benchmark of merging two partial attentions (cascade inference, ring attention) against the eager PyTorch merge, its torch.compile, FlashInfer's merge_state (GPU, where installed) and the eager reference: `python bench/attention_merge.py [--quick] [--device cuda]`.

The same measurement as `genfast bench --ops attention_merge` (genfast/benchmarks/attention_merge.py)."""

import sys

from genfast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--ops", "attention_merge", *sys.argv[1:]]))
