"""Glow's LU-parameterized 1x1 convolution weight and its gradients in Triton: the sums of
kernels/common/lu_weight.h, in the same order, for n x n float32 matrices (n is small, so each
program loops over the summed index for one tile of the output)."""

import triton
import triton.language as tl


@triton.jit
def lower_entry(lower_ptr, n, r, k):
    """L[r, k]: lower's strict lower triangle, 1 on the diagonal, 0 above it."""
    value = tl.load(lower_ptr + r * n + k, mask=k < r, other=0.0).to(tl.float32)
    return tl.where(k == r, 1.0, value)


@triton.jit
def upper_entry(upper_ptr, diag_ptr, n, k, j):
    """U[k, j]: upper's strict upper triangle, diag on the diagonal, 0 below it (and for j >= n)."""
    value = tl.load(upper_ptr + k * n + j, mask=(k < j) & (j < n), other=0.0).to(tl.float32)
    on_diagonal = (k == j) & (j < n)
    # min(k, j) is k on the diagonal, with the block shape of whichever of k and j is a block.
    diagonal = tl.load(diag_ptr + tl.minimum(k, j), mask=on_diagonal, other=0.0).to(tl.float32)
    return tl.where(on_diagonal, diagonal, value)


@triton.jit
def lu_weight_kernel(lower_ptr, upper_ptr, diag_ptr, perm_ptr, weight_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    j = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    i_ok = i < n
    j_ok = j < n
    r = tl.load(perm_ptr + i, mask=i_ok, other=0)
    # W[i, j] sums k <= min(perm[i], j): nothing in this tile goes past k_end.
    k_end = tl.minimum(tl.max(r), tl.minimum(tl.program_id(1).to(tl.int64) * BLOCK + BLOCK, n) - 1) + 1
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for k in range(0, k_end):
        l = lower_entry(lower_ptr, n, r, k)
        u = upper_entry(upper_ptr, diag_ptr, n, k, j)
        # The mask, not the zero entries, leaves out k > min(perm[i], j), so that an inf or NaN
        # entry does not leak into other sums as inf * 0.
        acc += tl.where((k <= r)[:, None] & (k <= j)[None, :], l[:, None] * u[None, :], 0.0)
    tl.store(weight_ptr + i[:, None] * n + j[None, :], acc, mask=i_ok[:, None] & j_ok[None, :])


@triton.jit
def lu_grad_lower_kernel(grad_weight_ptr, upper_ptr, diag_ptr, perm_ptr, grad_lower_ptr, n, BLOCK: tl.constexpr):
    """grad_lower[perm[i], k] = sum_{j >= k} dW[i, j] U[k, j] for k < perm[i], else 0."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    k_first = tl.program_id(1).to(tl.int64) * BLOCK
    k = k_first + tl.arange(0, BLOCK).to(tl.int64)
    i_ok = i < n
    r = tl.load(perm_ptr + i, mask=i_ok, other=0)
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for j in range(k_first, n):
        grad_w = tl.load(grad_weight_ptr + i * n + j, mask=i_ok, other=0.0).to(tl.float32)
        u = upper_entry(upper_ptr, diag_ptr, n, k, j)
        acc += tl.where((j >= k)[None, :], grad_w[:, None] * u[None, :], 0.0)
    acc = tl.where(k[None, :] < r[:, None], acc, 0.0)
    tl.store(grad_lower_ptr + r[:, None] * n + k[None, :], acc, mask=i_ok[:, None] & (k < n)[None, :])


@triton.jit
def lu_grad_upper_kernel(grad_weight_ptr, lower_ptr, perm_ptr, grad_upper_ptr, grad_diag_ptr, n,
                         BLOCK: tl.constexpr):
    """dU[k, j] = sum_i [perm[i] >= k] L[perm[i], k] dW[i, j]: grad_upper off the diagonal (0 below
    it), grad_diag on it."""
    k_first = tl.program_id(0).to(tl.int64) * BLOCK
    j_first = tl.program_id(1).to(tl.int64) * BLOCK
    k = k_first + tl.arange(0, BLOCK).to(tl.int64)
    j = j_first + tl.arange(0, BLOCK).to(tl.int64)
    k_ok = k < n
    j_ok = j < n
    # A tile wholly below the diagonal is all zeros.
    i_end = tl.where(j_first + BLOCK - 1 >= k_first, n, 0)
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for i in range(0, i_end):
        r = tl.load(perm_ptr + i)
        l = lower_entry(lower_ptr, n, r, k)
        grad_w = tl.load(grad_weight_ptr + i * n + j, mask=j_ok, other=0.0).to(tl.float32)
        acc += tl.where((k <= r)[:, None], l[:, None] * grad_w[None, :], 0.0)
    in_matrix = k_ok[:, None] & j_ok[None, :]
    tl.store(grad_upper_ptr + k[:, None] * n + j[None, :], tl.where(j[None, :] > k[:, None], acc, 0.0),
             mask=in_matrix)
    on_diagonal = in_matrix & (j[None, :] == k[:, None])
    tl.store(grad_diag_ptr + k[:, None] + 0 * j[None, :], acc, mask=on_diagonal)


def _tiles(n):
    """(grid, block): square tiles of the n x n matrices."""
    block = min(32, triton.next_power_of_2(n))
    return (triton.cdiv(n, block), triton.cdiv(n, block)), block


def launch_lu_weight(lower, upper, diag, perm, weight):
    """weight = P L U for n x n lower, upper and weight, diag (n,) and int64 perm (n,)."""
    n = lower.shape[0]
    if n > 0:
        grid, block = _tiles(n)
        lu_weight_kernel[grid](lower, upper, diag, perm, weight, n, BLOCK=block)


def launch_lu_weight_backward(grad_weight, lower, upper, diag, perm, grad_lower, grad_upper, grad_diag):
    """grad_lower and grad_upper (n x n, zero outside their strict triangles) and grad_diag (n,),
    the gradient to U's diagonal, from grad_weight."""
    n = lower.shape[0]
    if n > 0:
        grid, block = _tiles(n)
        lu_grad_lower_kernel[grid](grad_weight, upper, diag, perm, grad_lower, n, BLOCK=block)
        lu_grad_upper_kernel[grid](grad_weight, lower, perm, grad_upper, grad_diag, n, BLOCK=block)
