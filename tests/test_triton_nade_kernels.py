"""The Triton NADE kernels (genfast.kernels.nade) under the Triton CPU interpreter, against the
float64 reference genfast.reference.nade: conditionals, their backward, sampling (given uniforms,
the Philox stream, conditional completion). Run with TRITON_INTERPRET=1."""

import pytest
import torch

from genfast import _backend
from genfast.reference import nade as reference
from genfast.reference.random import philox_uniform

pytestmark = pytest.mark.triton

ORDERINGS = ["none", "shared", "per_row"]
ACTIVATIONS = ["sigmoid", "relu"]


def _kernels():
    if not _backend.triton_runs_on("cpu"):
        pytest.skip(_backend.triton_error() or "Triton runs on the CPU only under TRITON_INTERPRET=1")
    from genfast.kernels import nade

    return nade


def _params(dims, hidden, seed=0, scale=1.0):
    """W (H, D), c (H), V (D, H), b (D) in float32."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(hidden, dims, generator=g) * scale
    c = torch.randn(hidden, generator=g) * scale
    V = torch.randn(dims, hidden, generator=g) * scale
    b = torch.randn(dims, generator=g) * scale
    return W, c, V, b


def _ordering(kind, batch, dims, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None, False
    if kind == "shared":
        return torch.randperm(dims, generator=g), False
    return torch.stack([torch.randperm(dims, generator=g) for _ in range(batch)]), True


def _binary(batch, dims, dtype, seed=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, dims, generator=g) < 0.5).to(dtype)


def _conditionals(nade, x, W, c, V, b, ordering, per_row, activation):
    logits = torch.empty_like(x)
    nade.launch_nade_conditionals(x, W.t().contiguous(), c, V, b, ordering, per_row, activation == "relu", logits)
    return logits


def _reference_logits(x, W, c, V, b, ordering, activation):
    return reference.conditionals(x.double(), W.double(), c.double(), V.double(), b.double(), ordering, activation)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("order_kind", ORDERINGS)
def test_conditionals_match_reference(order_kind, activation, dtype):
    nade = _kernels()
    batch, dims, hidden = 7, 6, 37  # two blocks of 4 rows, the second partial; H not a power of two
    W, c, V, b = _params(dims, hidden)
    ordering, per_row = _ordering(order_kind, batch, dims)
    x = _binary(batch, dims, dtype)
    logits = _conditionals(nade, x, W, c, V, b, ordering, per_row, activation)
    expected = _reference_logits(x, W, c, V, b, ordering, activation)
    assert logits.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(logits, expected.to(dtype), rtol=2e-3, atol=1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("order_kind", ORDERINGS)
def test_backward_matches_autograd_of_reference(order_kind, activation, dtype):
    nade = _kernels()
    batch, dims, hidden = 7, 6, 37
    W, c, V, b = _params(dims, hidden, seed=3)
    ordering, per_row = _ordering(order_kind, batch, dims, seed=4)
    x = _binary(batch, dims, dtype, seed=5)
    grad_logits = torch.randn(batch, dims, generator=torch.Generator().manual_seed(6)).to(dtype)

    grad_w_t, grad_v = torch.zeros(dims, hidden), torch.zeros(dims, hidden)
    grad_b, grad_c, grad_x = torch.zeros(dims), torch.zeros(hidden), torch.zeros(batch, dims)
    nade.launch_nade_conditionals_backward(grad_logits, x, W.t().contiguous(), c, V, b, ordering, per_row,
                                           activation == "relu", grad_w_t, grad_v, grad_b, grad_c, grad_x)

    leaves = [t.double().requires_grad_() for t in (x, W, c, V, b)]
    logits = reference.conditionals(*leaves, ordering, activation)
    ex, eW, ec, eV, eb = torch.autograd.grad(logits, leaves, grad_logits.double())
    tol = dict(rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(grad_w_t.double(), eW.t(), **tol)
    torch.testing.assert_close(grad_v.double(), eV, **tol)
    torch.testing.assert_close(grad_b.double(), eb, **tol)
    torch.testing.assert_close(grad_c.double(), ec, **tol)
    torch.testing.assert_close(grad_x.double(), ex, **tol)


def _sample(nade, W, c, V, b, shape, dtype, uniforms=None, seed=0, offset=0, ordering=None, per_row=False,
            activation="sigmoid", observed=None, num_observed=0):
    x = torch.full(shape, -1.0, dtype=dtype)
    nade.launch_nade_sample(W.t().contiguous(), c, V, b, uniforms, seed, offset, ordering, per_row,
                            activation == "relu", observed, num_observed, x)
    return x


def _assert_sample_equals_reference(x, W, c, V, b, uniforms, ordering, activation, observed=None, num_observed=0):
    """x equals reference.sample on the same uniforms, after checking that no sampled step of the
    reference's path is a near tie (|u - p| tiny), where float32 could round the other way."""
    expected = reference.sample(W.double(), c.double(), V.double(), b.double(), uniforms, ordering, activation,
                                observed.double() if observed is not None else None, num_observed)
    p = torch.sigmoid(_reference_logits(expected, W, c, V, b, ordering, activation))
    batch, dims = uniforms.shape
    order = reference._ordering(ordering, batch, dims, "cpu")
    sampled = torch.zeros(batch, dims, dtype=torch.bool).scatter_(1, order[:, num_observed:], True)
    margin = (uniforms - p).abs()[sampled]
    assert margin.min() > 1e-5, "a near tie: choose other parameters for this test"
    assert torch.equal(x.double(), expected)
    assert 0 < expected[sampled].sum() < sampled.sum(), "a degenerate sample (all zeros or all ones)"


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("order_kind", ORDERINGS)
def test_sample_with_uniforms_matches_reference(order_kind, activation, dtype):
    nade = _kernels()
    batch, dims, hidden = 9, 7, 37
    W, c, V, b = _params(dims, hidden, seed=7, scale=0.7)
    ordering, per_row = _ordering(order_kind, batch, dims, seed=8)
    uniforms = torch.rand(batch, dims, generator=torch.Generator().manual_seed(9))
    x = _sample(nade, W, c, V, b, (batch, dims), dtype, uniforms=uniforms, ordering=ordering, per_row=per_row,
                activation=activation)
    assert x.dtype == dtype
    _assert_sample_equals_reference(x, W, c, V, b, uniforms.double(), ordering, activation)


@pytest.mark.triton
@pytest.mark.parametrize("order_kind", ORDERINGS)
@pytest.mark.parametrize("seed, offset", [(0, 0), ((1 << 63) + 12345, (1 << 34) + 8), (0xDEADBEEF, 6)])
def test_sample_with_philox_matches_reference_stream(seed, offset, order_kind):
    nade = _kernels()
    batch, dims, hidden = 9, 7, 37
    W, c, V, b = _params(dims, hidden, seed=10, scale=0.7)
    ordering, per_row = _ordering(order_kind, batch, dims, seed=11)
    x = _sample(nade, W, c, V, b, (batch, dims), torch.float32, seed=seed, offset=offset, ordering=ordering,
                per_row=per_row, activation="sigmoid")
    uniforms = philox_uniform((batch, dims), seed, offset, torch.float64)
    _assert_sample_equals_reference(x, W, c, V, b, uniforms, ordering, "sigmoid")


@pytest.mark.triton
@pytest.mark.parametrize("philox", [False, True], ids=["uniforms", "philox"])
@pytest.mark.parametrize("order_kind", ["none", "per_row"])
def test_conditional_completion(order_kind, philox):
    nade = _kernels()
    batch, dims, hidden, num_observed = 9, 7, 37, 3
    W, c, V, b = _params(dims, hidden, seed=12, scale=0.7)
    ordering, per_row = _ordering(order_kind, batch, dims, seed=13)
    observed = _binary(batch, dims, torch.float16, seed=14)
    seed, offset = 77, 12
    uniforms = None if philox else torch.rand(batch, dims, generator=torch.Generator().manual_seed(15))
    x = _sample(nade, W, c, V, b, (batch, dims), torch.float16, uniforms=uniforms, seed=seed, offset=offset,
                ordering=ordering, per_row=per_row, activation="relu", observed=observed, num_observed=num_observed)
    order = reference._ordering(ordering, batch, dims, "cpu")
    kept = order[:, :num_observed]
    assert torch.equal(x.gather(1, kept), observed.gather(1, kept))
    u = philox_uniform((batch, dims), seed, offset, torch.float64) if philox else uniforms.double()
    _assert_sample_equals_reference(x, W, c, V, b, u, ordering, "relu", observed, num_observed)


@pytest.mark.triton
def test_relu_propagates_nan():
    nade = _kernels()
    batch, dims, hidden = 5, 4, 37
    W, c, V, b = _params(dims, hidden, seed=16)
    c[3] = float("nan")
    x = _binary(batch, dims, torch.float32, seed=17)
    logits = _conditionals(nade, x, W, c, V, b, None, False, "relu")
    expected = _reference_logits(x, W, c, V, b, None, "relu")
    assert expected.isnan().all()
    torch.testing.assert_close(logits.double(), expected, equal_nan=True)


@pytest.mark.triton
@pytest.mark.parametrize("batch, dims, hidden, block_b", [(1, 1, 1, None), (3, 5, 64, 1), (10, 3, 5, 8)])
def test_edge_sizes_and_blocks(batch, dims, hidden, block_b):
    nade = _kernels()
    W, c, V, b = _params(dims, hidden, seed=18)
    ordering, per_row = _ordering("per_row", batch, dims, seed=19)
    x = _binary(batch, dims, torch.float32, seed=20)
    logits = torch.empty_like(x)
    nade.launch_nade_conditionals(x, W.t().contiguous(), c, V, b, ordering, per_row, False, logits, block_b=block_b)
    torch.testing.assert_close(logits.double(), _reference_logits(x, W, c, V, b, ordering, "sigmoid"),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.triton
def test_empty_inputs_launch_nothing_and_large_hidden_is_refused():
    nade = _kernels()
    W, c, V, b = _params(3, 8)
    w_t = W.t().contiguous()
    nade.launch_nade_conditionals(torch.zeros(0, 3), w_t, c, V, b, None, False, False, torch.zeros(0, 3))
    grads = [torch.zeros(3, 8), torch.zeros(3, 8), torch.zeros(3), torch.zeros(8), torch.zeros(0, 3)]
    nade.launch_nade_conditionals_backward(torch.zeros(0, 3), torch.zeros(0, 3), w_t, c, V, b, None, False, False,
                                           *grads)
    assert all(not g.any() for g in grads)
    W0, c0, V0, b0 = _params(0, 8)
    nade.launch_nade_sample(W0.t().contiguous(), c0, V0, b0, None, 0, 0, None, False, False, None, 0,
                            torch.zeros(4, 0))
    big = nade.MAX_HIDDEN + 1
    W, c, V, b = _params(2, big)
    with pytest.raises(ValueError, match=f"H = {big}"):
        nade.launch_nade_conditionals(torch.zeros(1, 2), W.t().contiguous(), c, V, b, None, False, False,
                                      torch.zeros(1, 2))


@pytest.mark.triton
@pytest.mark.parametrize("kind", ["none", "shared", "per_row"])
def test_many_blocks_of_rows_agree_with_one(kind):
    """Blocks of 4 rows (several programs, a partial last block, atomic sums across programs)
    against one block of all rows."""
    nade = _kernels()
    batch, dims, hidden = 10, 7, 12
    W, c, V, b = _params(dims, hidden, seed=21)
    w_t = W.t().contiguous()
    ordering, per_row = _ordering(kind, batch, dims, seed=22)
    x = _binary(batch, dims, torch.float32, seed=23)
    grad_logits = torch.randn(batch, dims, generator=torch.Generator().manual_seed(24))

    def backward(block_b):
        grads = [torch.zeros(dims, hidden), torch.zeros(dims, hidden), torch.zeros(dims), torch.zeros(hidden),
                 torch.zeros(batch, dims)]
        nade.launch_nade_conditionals_backward(grad_logits, x, w_t, c, V, b, ordering, per_row, False, *grads,
                                               block_b=block_b)
        return grads

    for many, one in zip(backward(4), backward(16)):
        torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-6)

    def sample(block_b):
        out = torch.empty(batch, dims)
        nade.launch_nade_sample(w_t, c, V, b, None, 5, 9, ordering, per_row, False, None, 0, out, block_b=block_b)
        return out

    assert torch.equal(sample(4), sample(16))
