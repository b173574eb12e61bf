#!/usr/bin/env python3
"""genfast's GPU attention variants against SDPA's flash and cuDNN backends, bf16, in one process
(scripts/gpu-check's `variants` stage): Triton with ex2.approx and with the polynomial exp
(GENFAST_TRITON_FAST_EXP=0), dQ from its own pass or by atomics (GENFAST_TRITON_ATOMIC_DQ), the CUDA
kernel for sm_80 and the Hopper kernels (GENFAST_ATTENTION_SM90), each forward and
forward+backward, with its error against SDPA flash's result (relative Frobenius norm of o and of
dQ, dK, dV) and its TFLOP/s; a row is printed as it is measured, the Hopper ones
last (a kernel that hangs there leaves the others' rows). --profile: after a warm-up (autotuning),
each variant's forward and backward once between cudaProfilerStart and Stop, for
`ncu --profile-from-start off` (scripts/gpu-check's `profile` stage)."""

import argparse
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import genfast
from genfast.benchmarks.attention import environment, with_environment

# (batch, heads, length, head_dim, causal): the shape, a training one, head dim 256.
SHAPES = [(1, 16, 16384, 128, True), (4, 16, 2048, 128, False), (2, 8, 4096, 256, False)]


def _genfast(impl, env, **options):
    """genfast.attention with the environment `env` (its kernels' options), set around each call and,
    through fn.environment, around the backwards measured below (their launches read it too)."""
    return with_environment(lambda q, k, v, causal: genfast.attention(q, k, v, is_causal=causal, impl=impl,
                                                                      **options), env)


def _sdpa(backend):
    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def variants():
    return [("SDPA flash", _sdpa(SDPBackend.FLASH_ATTENTION)), ("SDPA cuDNN", _sdpa(SDPBackend.CUDNN_ATTENTION)),
            ("genfast triton", _genfast("triton", {})),
            ("genfast triton polynomial exp", _genfast("triton", {"GENFAST_TRITON_FAST_EXP": "0"})),
            ("genfast triton atomic dQ", _genfast("triton", {"GENFAST_TRITON_ATOMIC_DQ": "1"})),
            ("genfast native sm80", _genfast("native", {"GENFAST_ATTENTION_SM90": "0"})),
            ("genfast native sm80 determ.", _genfast("native", {"GENFAST_ATTENTION_SM90": "0"}, deterministic=True))]


def hopper_variants():
    return [("genfast native Hopper", _genfast("native", {"GENFAST_ATTENTION_SM90": "1"})),
            ("genfast native Hopper determ.", _genfast("native", {"GENFAST_ATTENTION_SM90": "1"},
                                                       deterministic=True))]


def _inputs(batch, heads, length, dim):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, heads, length, dim, generator=g).to("cuda", torch.bfloat16) for _ in range(4)]


def _relative(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def measure(shapes, groups):
    from triton.testing import do_bench

    print(f"{'call':44s} {'variant':32s} {'ms':>9s} {'TFLOP/s':>8s}  error against SDPA flash", flush=True)
    reference = _sdpa(SDPBackend.FLASH_ATTENTION)
    for rows in groups:  # the Hopper kernels' after every other row
        for batch, heads, length, dim, causal in shapes:
            q, k, v, grad = _inputs(batch, heads, length, dim)
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            flops = 4 * batch * heads * length * length * dim / (2 if causal else 1)
            name = f"B={batch} H={heads} L={length} D={dim}{' causal' if causal else ''}"
            expected_o = reference(q, k, v, causal)
            expected_grads = torch.autograd.grad(reference(*leaves, causal), leaves, grad)
            for variant, fn in rows:
                with environment(getattr(fn, "environment", {})):
                    o = fn(q, k, v, causal)
                    grads = torch.autograd.grad(fn(*leaves, causal), leaves, grad)
                    forward = do_bench(lambda: fn(q, k, v, causal), warmup=25, rep=100, return_mode="median")
                    both = do_bench(lambda: torch.autograd.grad(fn(*leaves, causal), leaves, grad), warmup=25,
                                    rep=100, return_mode="median")
                error = f"o {_relative(o, expected_o):.1e}, dQ/dK/dV " + "/".join(
                    f"{_relative(a, e):.1e}" for a, e in zip(grads, expected_grads))
                print(f"{'forward ' + name:44s} {variant:32s} {forward:9.3f} {flops / forward / 1e9:8.1f}  {error}",
                      flush=True)
                print(f"{'forward+backward ' + name:44s} {variant:32s} {both:9.3f} {3.5 * flops / both / 1e9:8.1f}",
                      flush=True)


def profile(shape, hopper):
    batch, heads, length, dim, causal = shape
    q, k, v, grad = _inputs(batch, heads, length, dim)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    calls = variants() + (hopper_variants() if hopper else [])
    for _, fn in calls:  # autotuning and module loads outside the profiled range
        with environment(getattr(fn, "environment", {})):
            torch.autograd.grad(fn(*leaves, causal), leaves, grad)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for variant, fn in calls:
        torch.cuda.nvtx.range_push(variant)
        with environment(getattr(fn, "environment", {})):
            torch.autograd.grad(fn(*leaves, causal), leaves, grad)
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--shape", type=int, default=None, help="index into SHAPES (default: all; --profile: 1)")
    parser.add_argument("--no-hopper", action="store_true", help="leave the Hopper kernels out")
    args = parser.parse_args()
    # GENFAST_ATTENTION_SM90=0 (gpu-check sets it when the Hopper tests did not pass) leaves them out too.
    hopper = (not args.no_hopper and os.environ.get("GENFAST_ATTENTION_SM90") != "0"
              and torch.cuda.get_device_capability() == (9, 0) and bool(genfast.build_info().get("attention_sm90")))
    if args.profile:
        profile(SHAPES[1 if args.shape is None else args.shape], hopper)
    else:
        measure(SHAPES if args.shape is None else [SHAPES[args.shape]],
                [variants()] + ([hopper_variants()] if hopper else []))


if __name__ == "__main__":
    main()
