"""The fused NADE conditionals and their fused backward against the reference. So far they have
C++ CPU kernels only: the CUDA and Triton kernels and the public functions come next (issue 5)."""

import pytest
import torch

import genfast
from genfast.ops import nade_conditionals  # noqa: F401  (registers the fake)
from genfast.reference import nade
from genfast.testing.tolerances import assert_error_ratio
from conftest import skip_unless_runs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(batch, dims, hidden, ordering, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(batch, dims, generator=g) < 0.5).to(dtype)
    W = torch.randn(hidden, dims, generator=g) * 0.3
    c = torch.randn(hidden, generator=g) * 0.3
    V = torch.randn(dims, hidden, generator=g) * 0.3
    b = torch.randn(dims, generator=g) * 0.3
    order = None
    if ordering == "shared":
        order = torch.randperm(dims, generator=g)
    elif ordering == "per_sample":
        order = torch.stack([torch.randperm(dims, generator=g) for _ in range(batch)])
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return move(x), move(W.to(dtype)), move(c.to(dtype)), move(V.to(dtype)), move(b.to(dtype)), move(order)


@pytest.mark.parametrize("device", ["cpu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", nade.ACTIVATIONS)
@pytest.mark.parametrize("ordering", ["natural", "shared", "per_sample"])
@pytest.mark.parametrize("batch,dims,hidden", [(13, 17, 9), (1, 1, 1), (20, 64, 50)])
def test_matches_reference(batch, dims, hidden, ordering, activation, dtype, device):
    skip_unless_runs("native", device)
    x, W, c, V, b, order = _inputs(batch, dims, hidden, ordering, dtype, device)
    got = torch.ops.genfast.nade_conditionals(x, W, c, V, b, order, activation)
    exact = nade.conditionals(x.double(), W.double(), c.double(), V.double(), b.double(), order, activation)
    low = nade.conditionals(x, W, c, V, b, order, activation)
    assert got.dtype == dtype and got.shape == x.shape
    assert_error_ratio(got, exact, low)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("activation", nade.ACTIVATIONS)
@pytest.mark.parametrize("ordering", ["natural", "shared", "per_sample"])
@pytest.mark.parametrize("batch,dims,hidden", [(13, 17, 9), (1, 1, 1), (37, 30, 20)])
def test_gradients_match_reference(batch, dims, hidden, ordering, activation, dtype):
    skip_unless_runs("native", "cpu")
    x, W, c, V, b, order = _inputs(batch, dims, hidden, ordering, dtype, "cpu")
    grad_logits = torch.randn(batch, dims, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def grads(fn, cast):
        leaves = [t.detach().to(cast).requires_grad_() for t in (x, W, c, V, b)]
        logits = fn(*leaves, order, activation)
        return torch.autograd.grad((logits.double() * grad_logits).sum(), leaves)

    got = grads(torch.ops.genfast.nade_conditionals, dtype)
    exact = grads(nade.conditionals, torch.float64)
    low = grads(nade.conditionals, dtype)
    for name, a, e, lo in zip(("x", "W", "c", "V", "b"), got, exact, low):
        assert a.shape == e.shape and a.dtype == dtype
        assert_error_ratio(a, e, lo, ratio=3.0, msg=f"grad {name}")


def test_empty_and_bad_input():
    x, W, c, V, b, order = _inputs(4, 6, 5, "shared", torch.float32, "cpu")
    op = torch.ops.genfast.nade_conditionals
    assert op(x[:0], W, c, V, b, None, "sigmoid").shape == (0, 6)
    with pytest.raises(RuntimeError, match="x must be binary"):
        op(x + 0.5, W, c, V, b, None, "sigmoid")
    with pytest.raises(RuntimeError, match="V must have shape"):
        op(x, W, c, V[:, :4], b, None, "sigmoid")
    with pytest.raises(RuntimeError, match="c must have shape"):
        op(x, W, c[:4], V, b, None, "sigmoid")
    with pytest.raises(RuntimeError, match="permutation"):
        op(x, W, c, V, b, torch.zeros(6, dtype=torch.int64), "sigmoid")
    with pytest.raises(RuntimeError, match="ordering must have shape"):
        op(x, W, c, V, b, order[:5], "sigmoid")
    with pytest.raises(RuntimeError, match="activation must be"):
        op(x, W, c, V, b, None, "tanh")


def test_opcheck():
    if not genfast._backend.native_runs_on("cpu"):
        pytest.skip("no native CPU backend")
    x, W, c, V, b, order = _inputs(5, 7, 6, "per_sample", torch.float32, "cpu")
    leaves = tuple(t.requires_grad_() for t in (x, W, c, V, b))
    torch.library.opcheck(torch.ops.genfast.nade_conditionals, (*leaves, order, "relu"))
    torch.library.opcheck(torch.ops.genfast.nade_conditionals_backward,
                          (torch.randn(5, 7), x.detach(), W.detach(), c.detach(), V.detach(), b.detach(), order,
                           "sigmoid"))
