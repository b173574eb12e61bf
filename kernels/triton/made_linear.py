"""MADE's masked linear layer in Triton: one masked matrix product, C = A B, whose connectivity
mask (kernels/common/made_linear.h) is computed from the units' degrees in the tile, never read.

The three products of the layer are the same kernel with the mask on a different operand:
- forward      y = x (W * M)^T:   A = x,      B = W^T, mask on B, outputs along N;
- grad_x         = g (W * M):     A = g,      B = W,   mask on B, outputs along K;
- grad_weight    = (g^T x) * M:   A = g^T,    B = x,   mask on C, outputs along M.
Products accumulate in float32 (IEEE, no TF32).
"""

import triton
import triton.language as tl

from .common import check_grid_axis1

MASK_B_OUT_N, MASK_B_OUT_K, MASK_C_OUT_M = (tl.constexpr(mode) for mode in range(3))


@triton.jit
def _connected(out_degrees, in_degrees, STRICT: tl.constexpr):
    if STRICT:
        return out_degrees > in_degrees
    else:
        return out_degrees >= in_degrees


@triton.jit
def masked_matmul_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, out_deg_ptr, in_deg_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    MODE: tl.constexpr, STRICT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rn = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if MODE == 0:
        n_degrees = tl.load(out_deg_ptr + rn, mask=n_ok, other=0)
    if MODE == 1:
        n_degrees = tl.load(in_deg_ptr + rn, mask=n_ok, other=0)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_ok = rk < K
        a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak, mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        b = tl.load(b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn, mask=k_ok[:, None] & n_ok[None, :],
                    other=0.0)
        if MODE == 0:
            k_degrees = tl.load(in_deg_ptr + rk, mask=k_ok, other=0)
            b = tl.where(_connected(n_degrees[None, :], k_degrees[:, None], STRICT), b, 0.0)
        if MODE == 1:
            k_degrees = tl.load(out_deg_ptr + rk, mask=k_ok, other=0)
            b = tl.where(_connected(k_degrees[:, None], n_degrees[None, :], STRICT), b, 0.0)
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if MODE == 2:
        m_degrees = tl.load(out_deg_ptr + rm, mask=m_ok, other=0)
        n_degrees = tl.load(in_deg_ptr + rn, mask=n_ok, other=0)
        acc = tl.where(_connected(m_degrees[:, None], n_degrees[None, :], STRICT), acc, 0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _blocks(device):
    """BLOCK_M, BLOCK_N, BLOCK_K: small tiles under the interpreter (its cost is per program and step)."""
    block, block_k = (16, 16) if device.type == "cpu" else (64, 32)
    return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_K=block_k)


def gpu_variants(name, constexprs, ints):
    """The tiles a GPU launch takes (genfast.testing.triton_gpu_compile)."""
    import torch

    return [(_blocks(torch.device("cuda")), 4, None)]


def _launch(a, b, c, bias, out_degrees, in_degrees, mode, strict, wrap=None):
    """c (M, N) = a (M, K) @ b (K, N), masked; any strides."""
    (M, K), N = a.shape, b.shape[1]
    if M == 0 or N == 0:
        return
    blocks = _blocks(a.device)
    check_grid_axis1(a.device, "made_linear", "a layer's feature count", N, blocks["BLOCK_N"])
    kernel = masked_matmul_kernel if wrap is None else wrap(masked_matmul_kernel)
    kernel[(triton.cdiv(M, blocks["BLOCK_M"]), triton.cdiv(N, blocks["BLOCK_N"]))](
        a, b, c, bias if bias is not None else c, out_degrees, in_degrees, M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        MODE=mode, STRICT=bool(strict), HAS_BIAS=bias is not None, **blocks, num_warps=4,
    )


def launch_made_linear(x, weight, bias, in_degrees, out_degrees, strict, y, wrap=None):
    """y (rows, out) = x (rows, in) (weight * M)^T + bias; degrees int32, contiguous."""
    _launch(x, weight.t(), y, bias, out_degrees, in_degrees, 0, strict, wrap)


def launch_made_linear_backward(grad_y, x, weight, in_degrees, out_degrees, strict, grad_x, grad_weight, wrap=None):
    """grad_x (rows, in) = grad_y (weight * M); grad_weight (out, in) = (grad_y^T x) * M."""
    _launch(grad_y, weight, grad_x, None, out_degrees, in_degrees, 1, strict, wrap)
    _launch(grad_y.t(), x, grad_weight, None, out_degrees, in_degrees, 2, strict, wrap)


__all__ = ["launch_made_linear", "launch_made_linear_backward"]
