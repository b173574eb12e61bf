"""The genfast command: `genfast info | check | bench`."""

import argparse
import csv
import json
import os
import sys
import time

import torch


def _best_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _progress_bar(total, stream=False, on_group=None):
    """A one-line progress bar on stderr (no dependency); returns the per-step callback. With
    stream, each group of rows is printed to stdout as soon as it is measured instead (the callback's
    measured), for a log that a run stopped part way keeps; on_group(rows), where given, gets each
    group too."""
    state = {"done": 0, "start": time.time()}
    width = 30

    def step(message):
        state["done"] += 1
        if stream:
            return
        filled = int(width * min(state["done"], total) / max(total, 1))
        elapsed = time.time() - state["start"]
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {elapsed:6.1f}s {message[:70]:70s}")
        sys.stderr.flush()

    def measured(rows):
        if stream:
            for row in rows:
                print(_row_line(row), flush=True)
        if on_group is not None:
            on_group(rows)

    if stream or on_group is not None:
        step.measured = measured
    return step


def cmd_info(args):
    import genfast
    from genfast import _backend

    info = genfast.build_info()
    print(f"genfast {info['genfast_version']}  torch {torch.__version__}  triton {info['triton_version']}")
    print(f"native extension: {info['backends'] or 'not built: ' + str(info.get('native_error'))}")
    if info.get("cuda_archs"):
        print(f"  CUDA {info['cuda_version']} archs {info['cuda_archs']}; built with torch {info['torch_version']}")
    print(f"triton: {info['triton_error'] or 'ok'}{' (TRITON_INTERPRET=1)' if info['triton_interpret'] else ''}")
    capability = f"; kernels for {info['cpu_capability']}" if info.get("cpu_capability") else ""
    print(f"cpu: {torch.get_num_threads()} threads{capability}; backends {_backend.available_impls('cpu')}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i}: {torch.cuda.get_device_name(i)}; backends {_backend.available_impls('cuda')}")
    else:
        print("cuda: no GPU visible")
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    return 0


def cmd_check(args):
    from genfast.testing import check

    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    ops = args.ops.split(",") if args.ops else [] if args.fuzz else list(check.CHECKS)
    unknown = [op for op in ops if op not in check.CHECKS]
    if unknown:
        print(f"genfast check: unknown op(s) {unknown}; known: {list(check.CHECKS)}", file=sys.stderr)
        return 2
    if args.fuzz < 0:
        print(f"genfast check: --fuzz takes a count >= 0, got {args.fuzz}", file=sys.stderr)
        return 2
    failures = check.run(devices, ops, fuzz=args.fuzz, seed=args.seed)
    print(f"genfast check: {'all passed' if failures == 0 else f'{failures} FAILED'}")
    return 1 if failures else 0


def _print_table(rows):
    bandwidth = [r for r in rows if "gb_per_s" in r]
    compute = [r for r in rows if "gflop_per_s" in r]
    if bandwidth:
        _print_bandwidth_table(bandwidth)
    if compute:
        _print_compute_table(compute)


def _print_compute_table(rows):
    header = f"{'variant':38s} {'impl':34s} {'dtype':9s} {'shape':20s} {'median ms':>10s} {'GFLOP/s':>8s} " \
             f"{'of GEMM':>8s} {'peak MiB':>9s} {'x genfast':>9s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(_row_line(r))


def _print_bandwidth_table(rows):
    header = f"{'op':20s} {'variant':37s} {'impl':18s} {'dtype':9s} {'elements':>10s} {'median ms':>10s} " \
             f"{'GB/s':>8s} {'of copy':>8s} {'x genfast':>9s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(_row_line(r))


def _row_line(r):
    """A row of the compute table (GFLOP/s) or of the bandwidth table (GB/s)."""
    if "gb_per_s" in r:
        return (f"{r['op']:20s} {r['variant']:37s} {r['impl']:18s} {r['dtype']:9s} {r['numel']:>10d} "
                f"{r['median_ms']:>10.4f} {r['gb_per_s']:>8.1f} {r['fraction_of_copy']:>8.0%} "
                f"{r['time_over_genfast']:>8.2f}x")
    memory = "-" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.1f}"
    return (f"{r['variant']:38s} {r['impl']:34s} {r['dtype']:9s} {r['config']:20s} {r['median_ms']:>10.3f} "
            f"{r['gflop_per_s']:>8.1f} {r['fraction_of_gemm']:>8.1%} {memory:>9s} {r['time_over_genfast']:>8.2f}x")


def cmd_bench(args):
    from genfast.benchmarks import registry, timing

    device = args.device or _best_device()
    if device == "cuda" and not torch.cuda.is_available():
        print("genfast bench: --device cuda but no GPU is visible", file=sys.stderr)
        return 2
    ops = args.ops.split(",") if args.ops else list(registry.BENCHMARKS)
    unknown = [op for op in ops if op not in registry.BENCHMARKS]
    if unknown:
        print(f"genfast bench: unknown op {unknown[0]!r}; known: {list(registry.BENCHMARKS)}", file=sys.stderr)
        return 2
    machine = timing.machine(device)
    rows, measured = [], []

    def on_group(group):  # the files hold every group measured so far: a run stopped part way keeps them
        measured.extend(group)
        _write_results(args, machine, measured, complete=False)

    for op in ops:
        sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else None
        progress = _progress_bar(total=(len(sizes) if sizes else 2 if args.quick else 4) * 19, stream=args.stream,
                                 on_group=on_group if args.json or args.csv else None)
        rows += registry.BENCHMARKS[op](device, quick=args.quick, progress=progress, sizes=sizes)
        if not args.stream:
            sys.stderr.write("\n")
    print(f"genfast bench on {machine.get('gpu', machine['cpu'])} ({device}, {machine['cpu_threads']} CPU threads), "
          f"torch {machine['torch']}, git {str(machine['git_sha'])[:10]}")
    copies = sorted({round(r["copy_gb_per_s"], 1) for r in rows if "copy_gb_per_s" in r})
    if copies:
        print(f"copy bandwidth, measured with large float32 copies before each size: {copies} GB/s; "
              "'of copy' is each row's GB/s over the figure measured beside it")
    gemms = sorted({round(r["gemm_gflop_per_s"], 1) for r in rows if "gemm_gflop_per_s" in r})
    if gemms:
        print(f"GEMM throughput measured in this run: {gemms} GFLOP/s; 'of GEMM' is each row's GFLOP/s over it; "
              "'peak MiB': the peak extra memory of one call, outputs included")
    print("x genfast: the row's time over the fastest genfast backend's in its group (higher: genfast is faster)")
    _print_table(rows)
    for path in _write_results(args, machine, rows, complete=True):
        print(f"wrote {path}")
    return 0


def _write_results(args, machine, rows, complete: bool):
    """The rows to args.json and args.csv (where given), each replaced whole (written beside, then
    renamed: a run stopped mid-write leaves the last whole file); the JSON says whether the run
    completed. Returns the paths written."""
    written = []
    for path, write in ((args.json, _write_json), (args.csv, _write_csv)):
        if not path:
            continue
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".partial", "w", newline="") as f:
            write(f, machine, rows, complete)
        os.replace(path + ".partial", path)
        written.append(path)
    return written


def _write_json(f, machine, rows, complete):
    json.dump({"machine": machine, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "complete": complete, "rows": rows}, f, indent=1, default=str)


def _write_csv(f, machine, rows, complete):
    fields = list(dict.fromkeys(key for row in rows for key in row))  # ops record different columns
    writer = csv.DictWriter(f, fieldnames=fields + ["machine", "git_sha"], extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "machine": machine.get("gpu", machine["cpu"]), "git_sha": machine["git_sha"]})


def main(argv=None):
    parser = argparse.ArgumentParser(prog="genfast", description="fused kernels for generative models")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="what was built, and the devices here")
    info.add_argument("--json", action="store_true", help="also print the build info as JSON")
    check = sub.add_parser("check", help="every op on every backend here against the reference")
    check.add_argument("--device", choices=["cpu", "cuda"])
    check.add_argument("--ops", help="comma-separated op names (default: all, or none with --fuzz)")
    check.add_argument("--fuzz", type=int, default=0, metavar="N",
                       help="also N random attention calls (shapes, options, layouts) per backend and dtype")
    check.add_argument("--seed", type=int, default=0,
                       help="the first fuzz case's seed; case n has seed + n (--seed S --fuzz 1 repeats case S)")
    bench = sub.add_parser("bench", help="every op against its peers on the best device present")
    bench.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when a GPU is visible")
    bench.add_argument("--ops", help="comma-separated op names (default: all)")
    bench.add_argument("--quick", action="store_true", help="fewer sizes, shorter timing")
    bench.add_argument("--sizes", help="comma-separated element counts, multiples of 4096 (default: 64K to 64M)")
    bench.add_argument("--json", metavar="PATH", help="save the results as JSON")
    bench.add_argument("--csv", metavar="PATH", help="save the results as CSV")
    bench.add_argument("--stream", action="store_true",
                       help="print each group of rows as it is measured (for logs), not a progress bar")
    args = parser.parse_args(argv)
    return {"info": cmd_info, "check": cmd_check, "bench": cmd_bench}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
