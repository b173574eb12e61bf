#!/usr/bin/env python3
"""The instructions of a step of the CUDA attention kernels (mma.sync, sm_80 and later) on whole
tiles, compiled on a machine without a GPU (nvcc, then Triton's nvdisasm). With
GENFAST_FAST_PATH_ONLY every test that sends whole tiles to a fast path holds (kernels/cuda/
attention_tile.cuh), so that a kernel's main loop is its steady step: its instruction count against
its matrix products is a speed proxy between GPU runs. --as-built keeps every path.

    scripts/cuda-attention-sass.py forward --head-dim 128
    scripts/cuda-attention-sass.py backward --kernel backward_kv --general --arch 80
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

import sass_loops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = {"forward": "attention_forward.cu", "backward": "attention_backward.cu"}
KERNELS = {"forward": "attention_forward_kernel", "backward_kv": "attention_backward_kv_kernel",
           "backward_q": "attention_backward_q_kernel"}
BUCKET_BITS = {32: 1, 64: 2, 128: 4, 256: 8}  # setup.py's GENFAST_ATTENTION_BUCKETS


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", choices=sorted(SOURCES))
    parser.add_argument("--kernel", choices=sorted(KERNELS), help="default: each of the source's")
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--head-dim", type=int, choices=sorted(BUCKET_BITS), default=128, help="the bucket")
    parser.add_argument("--general", action="store_true",
                        help="the kernels for soft-cap, ALiBi, masks and dropout (default: the plain ones)")
    parser.add_argument("--arch", default="90a")
    parser.add_argument("--as-built", action="store_true", help="every path, as a build compiles it")
    args = parser.parse_args(argv)
    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    defines = [f"-DGENFAST_ATTENTION_BUCKETS={BUCKET_BITS[args.head_dim]}"]
    if args.arch == "90a":
        defines.append("-DGENFAST_ATTENTION_SM90")
    if not args.as_built:
        defines.append("-DGENFAST_FAST_PATH_ONLY")
    with tempfile.TemporaryDirectory() as scratch:
        cubin = os.path.join(scratch, "kernels.cubin")
        subprocess.run([nvcc, f"-arch=sm_{args.arch}", "-O3", "-std=c++17", *defines, "-cubin", "-o", cubin,
                        os.path.join(ROOT, "kernels", "cuda", SOURCES[args.source])], check=True)
        functions = sass_loops.functions(sass_loops.disassemble(cubin))
    dtype = {"bf16": "13__nv_bfloat16", "fp16": "6__half"}[args.dtype]
    names = [KERNELS[args.kernel]] if args.kernel else [k for n, k in KERNELS.items() if n.startswith(args.source)]
    for name in names:
        pattern = re.compile(f"{name}I{dtype}Li{args.head_dim}ELb{0 if args.general else 1}E")
        for function, sass in functions.items():
            if pattern.search(function):
                print(f"{name} sm_{args.arch} {args.dtype} head dim {args.head_dim}, "
                      f"{'general' if args.general else 'plain'}, {'as built' if args.as_built else 'whole tiles'}:")
                sass_loops.print_loops(sass)
    return 0


if __name__ == "__main__":
    sys.exit(main())
