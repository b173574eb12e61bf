"""Compiles genfast's Triton kernels for NVIDIA GPUs on a machine without one, with the arguments
the tests launch them with, so that CI catches what only GPU compilation sees (types that the
interpreter lets through, dot shapes, loop-carried values, register and shared-memory limits).

Two steps, because the interpreter replaces triton.jit:
1. `record(path)` (under TRITON_INTERPRET=1, e.g. from tests/conftest.py when
   GENFAST_RECORD_TRITON_LAUNCHES is set) appends each launch's kernel, argument types,
   constexprs, num_warps and num_stages to a JSON-lines file;
2. `python -m genfast.testing.triton_gpu_compile FILE` (without the interpreter) compiles, per
   kernel, a few launches that together show every argument type and constexpr value recorded, for
   sm_80 and sm_90. A kernel module may define gpu_variants(name, constexprs, ints) (ints: the
   launch's integer arguments): the block sizes, warps and stages a GPU launch would take in place
   of the interpreter's (autotuned configurations, for one), None for the launch's own;
   each covering launch compiles with its first variant and with those no launch before it took,
   which covers each branch and each configuration without their product.
"""

import argparse
import atexit
import importlib
import json
import sys
import time

TARGETS = [("cuda", 80), ("cuda", 90)]
_TENSOR_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int64": "i64",
                 "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}


def _arg_type(value):
    """The signature entry of a runtime argument, as triton.jit types it."""
    import torch

    if isinstance(value, torch.Tensor):
        return "*" + _TENSOR_TYPES[str(value.dtype).removeprefix("torch.")]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64" if value < 2**63 else "u64"
    if isinstance(value, float):
        return "fp32"
    if value is None:
        return "constexpr"
    raise TypeError(f"no signature type for {type(value).__name__}")


def _not_specialized(interpreted):
    """The argument names of a kernel's do_not_specialize (given as names or positions)."""
    names = interpreted.kwargs.get("do_not_specialize") or []
    return {interpreted.arg_names[n] if isinstance(n, int) else n for n in names}


def _constexpr_names(fn):
    import triton.language as tl

    return {name for name, annotation in fn.__annotations__.items() if annotation in (tl.constexpr, "tl.constexpr")}


def record(path, prefix="genfast."):
    """From now on, each interpreted launch of a kernel from a module named prefix... is saved, as one
    line of `path` when the process exits."""
    import inspect

    from triton.runtime.interpreter import InterpretedFunction

    launches = {}
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        if fn.__module__.startswith(prefix):
            params = inspect.signature(fn).parameters
            bound = dict(zip(self.arg_names, args))
            options = {key: kwargs.pop(key) for key in ("num_warps", "num_stages") if key in kwargs}
            bound.update(kwargs)
            constexprs = _constexpr_names(fn)
            runtime = _not_specialized(self)
            signature, values, ints = {}, {}, {}
            for name, param in params.items():
                value = bound.get(name, param.default)
                # triton.jit makes an int argument of 1 a constant (which has no .to()), unless told not to
                specialized = type(value) is int and value == 1 and name not in runtime
                if name in constexprs or value is None or specialized:
                    signature[name] = "constexpr"
                    values[name] = value
                    if specialized:
                        ints[name] = value
                else:
                    signature[name] = _arg_type(value)
                    if isinstance(value, int) and not isinstance(value, bool):
                        ints[name] = value
            entry = dict(module=fn.__module__, name=fn.__name__, signature=signature, constexprs=values, ints=ints,
                         **options)
            launches[json.dumps(entry, sort_keys=True)] = None
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run

    def save():
        with open(path, "a") as out:
            for line in launches:
                out.write(line + "\n")

    atexit.register(save)


def _variants(module, entry):
    hook = getattr(module, "gpu_variants", None)
    variants = hook(entry["name"], entry["constexprs"], entry["ints"]) if hook is not None else None
    return variants or [({}, None, None)]


def _covering(entries):
    """A few entries that together show every (argument, type or constexpr value) pair any entry has,
    and every list of GPU variants (an entry's "variants", where it has them: each head-dim bucket's
    or dtype's tiles), picked greedily: each branch a constexpr selects compiles without every
    combination of them. Entries carry their constexprs as a GPU launch takes them (the first GPU
    variant's sizes)."""
    pairs = [{(key, json.dumps(value)) for key, value in (*e["signature"].items(), *e["constexprs"].items(),
                                                          ("variants", e.get("variants")))}
             for e in entries]
    uncovered = set().union(*pairs)
    chosen = []
    while uncovered:
        best = max(range(len(entries)), key=lambda i: len(pairs[i] & uncovered))
        chosen.append(entries[best])
        uncovered -= pairs[best]
    return chosen


def plan(lines):
    """The compilations (module, name, signature, constexprs, num_warps, num_stages): per kernel, each
    covering launch with its first GPU variant and with the variants no launch before it took."""
    by_kernel = {}
    for line in lines:
        entry = json.loads(line)
        by_kernel.setdefault((entry["module"], entry["name"]), []).append(entry)
    jobs = {}
    for (module_name, name), entries in sorted(by_kernel.items()):
        module = importlib.import_module(module_name)
        as_gpu = []
        for entry in entries:  # the interpreter's sizes replaced by the GPU's, so that they cover nothing
            variants = _variants(module, entry)
            as_gpu.append(dict(entry, constexprs=dict(entry["constexprs"], **variants[0][0]), variants=variants))
        compiled = set()
        for entry in _covering(as_gpu):
            variants = entry["variants"]
            # A variant counts as compiled within its list: launches with other lists (another head-dim
            # bucket, or dtype, whose tiles differ) compile theirs, whatever overrides they share.
            keys = [json.dumps([variants, v], sort_keys=True) for v in variants]
            fresh = [v for v, key in zip(variants[1:], keys[1:]) if key not in compiled]
            compiled.update(keys)
            for overrides, warps, stages in [variants[0], *fresh]:
                constexprs = dict(entry["constexprs"], **overrides)
                job = (module_name, name, json.dumps(entry["signature"], sort_keys=True),
                       json.dumps(constexprs, sort_keys=True), warps or entry.get("num_warps", 4),
                       stages or entry.get("num_stages", 3))
                jobs[job] = None
    return list(jobs)


def _compile(job, backend, arch):
    """One compilation: a line to print, and whether it failed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module_name, name, signature, constexprs, warps, stages = job
    fn = getattr(importlib.import_module(module_name), name)
    source = ASTSource(fn=fn, signature=json.loads(signature), constexprs=json.loads(constexprs))
    start = time.perf_counter()
    what = f"{name} sm_{arch} warps={warps} stages={stages}"
    try:
        kernel = triton.compile(source, target=GPUTarget(backend, arch, 32),
                                options=dict(num_warps=warps, num_stages=stages))
    except Exception as error:  # reported with its launch, then the run fails
        last = str(error).strip().splitlines()[-1:] or [type(error).__name__]
        return f"FAIL {what} {constexprs}: {last[0]}", True
    return f"{what}: {kernel.metadata.shared} B shared, {time.perf_counter() - start:.1f} s", False


def compile_all(jobs, targets=TARGETS, workers=2, say=print):
    """Compiles every job for every target in `workers` processes; says each line (failures among
    them); returns the failures' lines."""
    from concurrent.futures import ProcessPoolExecutor

    failures = []
    with ProcessPoolExecutor(workers) as pool:
        futures = [pool.submit(_compile, job, backend, arch) for job in jobs for backend, arch in targets]
        for future in futures:
            line, failed = future.result()
            say(line)
            if failed:
                failures.append(line)
    return failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("launches", help="the JSON-lines file record() wrote")
    parser.add_argument("--workers", type=int, default=2, help="compiling processes")
    parser.add_argument("--verbose", action="store_true", help="a line per compilation, not only failures")
    args = parser.parse_args(argv)
    with open(args.launches) as lines:
        jobs = plan(lines)
    start = time.perf_counter()
    failures = compile_all(jobs, workers=args.workers,
                           say=print if args.verbose else lambda line: line.startswith("FAIL") and print(line))
    print(f"{len(jobs)} kernel variants x {len(TARGETS)} targets compiled in {time.perf_counter() - start:.0f} s, "
          f"{len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
