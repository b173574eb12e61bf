#!/usr/bin/env python3
"""The instructions of the Triton attention kernels' loops, compiled for an NVIDIA GPU on a machine
without one (Triton's own ptxas and nvdisasm), as a GPU launch would specialize them (16-byte-aligned
pointers, strides and lengths that 16 divides). Where a loop is issue-bound (the H200 run's forward:
bench/results/20261204-NVIDIA-H200-45ea074), its instruction count per step, against the cycles of
its matrix products, is a proxy for its speed between GPU runs. Prints each loop that holds matrix
products: its instructions, its products and its commonest opcodes.

    scripts/triton-attention-sass.py forward --head-dim 128 --block 128 32 --warps 8
    scripts/triton-attention-sass.py backward_kv --set FAST_EXP=0
"""

import argparse
import os
import re
import sys

import sass_loops

KERNELS = {"forward": "attention_forward_kernel", "backward_kv": "attention_backward_kv_kernel",
           "backward_q": "attention_backward_q_kernel"}
FLOAT32_POINTERS = {"lse_ptr", "delta_ptr", "dk_ptr", "dv_ptr", "dq_ptr", "ds_ptr", "alibi_ptr", "sinks_ptr"}
FLOATS = {"scale", "softcap", "dropout_p", "keep_scale"}
INT32_POINTERS = {"cu_q_ptr", "cu_k_ptr", "used_k_ptr", "pages_ptr"}
NOT_SIZES = FLOATS | {"seed_lo", "seed_hi", "base_lo", "base_hi", "band_lo", "band_hi", "splits", "split_rows",
                      "heads_per_tile", "rows_per_head", "head_chunks", "GROUP", "HK", "b_first", "alibi_bs",
                      "pages_per_sequence"}


def _signature(fn, dtype, constexprs):
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in INT32_POINTERS:
            signature[name] = "*i32"
        elif name == "mask_ptr" and constexprs.get("MASK_KIND") == 1:
            signature[name] = "*u8"  # a bool mask, read as bytes
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in FLOAT32_POINTERS else "*" + dtype
        elif name in FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def compile_kernel(kernel, dtype, head_dim, block, warps, stages, arch, overrides):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from genfast.kernels import attention

    fn = getattr(attention, KERNELS[kernel])
    padded = triton.next_power_of_2(max(head_dim, 16))
    constexprs = {name: False for name in ("SOFTCAP", "HAS_ALIBI", "VARLEN", "STACKED", "SPLIT", "ATOMIC_DQ",
                                           "WRITE_DS", "INTERPRETED", "PRECISE_PV", "HAS_SINKS", "SEQUSED_K", "PAGED",
                                           "HAS_QV")
                  if name in fn.arg_names}
    constexprs.update(MASK_KIND=0, DROPOUT=0, DOT_KIND={"bf16": 2, "fp16": 1, "fp32": 0}[dtype], BLOCK_D=padded,
                      BLOCK_DV=padded, BLOCK_M=block[0], BLOCK_N=block[1],
                      FAST_EXP=dtype != "fp32" and os.environ.get("GENFAST_TRITON_FAST_EXP") != "0")
    for item in overrides:
        name, value = item.split("=", 1)
        constexprs[name] = int(value) if value.lstrip("-").isdigit() else value == "True"
    if constexprs["MASK_KIND"] != 0:
        constexprs.setdefault("smn", 1)  # a mask contiguous along the keys: Triton specializes a stride of 1
    signature = _signature(fn, dtype, constexprs)
    aligned = head_dim % 16 == 0
    divisible = [name for name, kind in signature.items()
                 if (kind.startswith("*") and name not in INT32_POINTERS)
                 or (aligned and kind == "i32" and name not in NOT_SIZES)]
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))


def disassemble(cubin, path):
    with open(path, "wb") as file:
        file.write(cubin)
    return sass_loops.disassemble(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kernel", choices=sorted(KERNELS))
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block", type=int, nargs=2, default=None, metavar=("M", "N"),
                        help="default: the first (untuned) configuration of the head dim's bucket")
    parser.add_argument("--warps", type=int, default=None)
    parser.add_argument("--stages", type=int, default=None)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--set", action="append", default=[], metavar="CONSTEXPR=VALUE",
                        help="a constexpr of the kernel, e.g. FAST_EXP=False, MASK_KIND=2, SOFTCAP=True")
    parser.add_argument("--sass", default="/tmp/genfast-attention.cubin", help="where the cubin is written")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    from genfast.kernels import attention

    bucket = attention._bucket(triton.next_power_of_2(max(args.head_dim, 16)))
    qv = any(item.split("=", 1)[0] == "HAS_QV" and item.split("=", 1)[1] in ("1", "True") for item in args.set)
    first = attention._gpu_blocks(args.kernel != "forward", bucket, args.arch == 90, args.dtype == "fp32", qv)[0]
    block = args.block or first[:2]
    warps, stages = args.warps or first[2], args.stages or first[3]
    compiled = compile_kernel(args.kernel, args.dtype, args.head_dim, block, warps, stages, args.arch, args.set)
    sass = disassemble(compiled.asm["cubin"], args.sass)
    spills = len(re.findall(r"\b(?:LDL|STL)", sass))
    print(f"{KERNELS[args.kernel]} sm_{args.arch} {args.dtype} head dim {args.head_dim}, blocks {block[0]} x "
          f"{block[1]}, {warps} warps, {stages} stages, {compiled.metadata.shared} B shared, "
          f"{spills} local loads and stores (spills), Triton {triton.__version__}:")
    sass_loops.print_loops(sass)
    return 0


if __name__ == "__main__":
    sys.exit(main())
