"""MADE's fused masked linear layer against the reference, on every backend: values, gradients,
the degree masks, NaN in masked-out weights, opcheck, torch.compile, the module and bad input."""

import pytest
import torch

import genfast
from genfast.nn import MaskedLinear
from genfast.reference import nade
from genfast.testing.tolerances import assert_error_ratio
from conftest import assert_compiles_like_eager, devices, fused_impls, skip_unless_supported

SHAPES = [(5, 13, 9), (1, 1, 1), (33, 64, 70), (17, 40, 3)]


def _inputs(rows, fan_in, fan_out, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, fan_in, generator=g)
    weight = torch.randn(fan_out, fan_in, generator=g) / max(1, fan_in) ** 0.5
    bias = torch.randn(fan_out, generator=g)
    top = max(2, fan_in // 3)
    in_degrees = torch.randint(1, top, (fan_in,), generator=g)
    out_degrees = torch.randint(1, top, (fan_out,), generator=g)
    move = lambda t: t.to(device)  # noqa: E731
    return (move(x.to(dtype)), move(weight.to(dtype)), move(bias.to(dtype)), move(in_degrees), move(out_degrees))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("rows,fan_in,fan_out", SHAPES)
def test_matches_reference(rows, fan_in, fan_out, strict, dtype, impl, device):
    skip_unless_supported(impl, device, dtype)
    x, weight, bias, din, dout = _inputs(rows, fan_in, fan_out, dtype, device)
    got = genfast.made_linear(x, weight, bias, din, dout, strict=strict, impl=impl)
    exact = nade.made_linear(x.double(), weight.double(), bias.double(), din, dout, strict)
    low = nade.made_linear(x, weight, bias, din, dout, strict)
    assert got.dtype == dtype and got.shape == (rows, fan_out)
    assert_error_ratio(got, exact, low)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("rows,fan_in,fan_out", SHAPES)
def test_gradients_match_reference(rows, fan_in, fan_out, strict, dtype, impl, device):
    skip_unless_supported(impl, device, dtype)
    inputs = _inputs(rows, fan_in, fan_out, dtype, device)
    din, dout = inputs[3:]
    grad_y = torch.randn(rows, fan_out, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)

    def grads(fn, cast, **kw):
        leaves = [t.detach().to(cast).requires_grad_() for t in inputs[:3]]
        y = fn(*leaves, din, dout, **kw) if kw else fn(*leaves, din, dout, strict)
        return torch.autograd.grad((y.double() * grad_y).sum(), leaves)

    got = grads(genfast.made_linear, dtype, strict=strict, impl=impl)
    exact = grads(nade.made_linear, torch.float64)
    low = grads(nade.made_linear, dtype)
    mask = nade.degree_mask(din, dout, strict)
    assert not got[1][~mask].any(), "masked-out weights must get no gradient"
    for name, a, e, lo in zip(("x", "weight", "bias"), got, exact, low):
        assert a.shape == e.shape and a.dtype == dtype
        assert_error_ratio(a, e, lo, ratio=3.0, msg=f"grad {name}")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
def test_batch_dims_no_bias_and_strided_inputs(impl, device):
    skip_unless_supported(impl, device)
    x, weight, _, din, dout = _inputs(12, 20, 18, torch.float32, device)
    x3 = x.reshape(3, 4, 20)
    got = genfast.made_linear(x3, weight, None, din, dout, impl=impl)
    assert got.shape == (3, 4, 18)
    torch.testing.assert_close(got, nade.made_linear(x3, weight, None, din, dout))
    strided = genfast.made_linear(torch.cat([x, x], 1)[:, ::2], weight.t().contiguous().t(), None, din, dout,
                                  impl=impl)
    torch.testing.assert_close(strided, nade.made_linear(torch.cat([x, x], 1)[:, ::2], weight, None, din, dout))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
def test_masked_out_nan_takes_no_part(impl, device):
    skip_unless_supported(impl, device)
    x, weight, bias, din, dout = _inputs(6, 10, 8, torch.float32, device)
    mask = nade.degree_mask(din, dout)
    weight = torch.where(mask, weight, torch.full_like(weight, float("nan")))  # every masked-out weight NaN
    got = genfast.made_linear(x, weight, bias, din, dout, impl=impl)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, nade.made_linear(x, weight, bias, din, dout))
    x = x.clone()
    x[2, 3] = float("nan")  # an input NaN reaches its row, as in a matrix product
    assert genfast.made_linear(x, weight, bias, din, dout, impl=impl)[2].isnan().all()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
def test_module_is_autoregressive(impl, device):
    """A MADE of MaskedLinear layers: output d depends only on the inputs before d in the ordering."""
    skip_unless_supported(impl, device)
    dims, ordering = 7, torch.tensor([3, 0, 6, 1, 5, 2, 4])
    degrees = nade.made_degrees(dims, [16, 16], ordering=ordering)
    layers = [MaskedLinear(16 if i else dims, 16 if i < 2 else dims, degrees[i], degrees[i + 1] if i < 2 else degrees[0],
                           strict=i == 2, impl=impl, device=device) for i in range(3)]
    net = torch.nn.Sequential(layers[0], torch.nn.ReLU(), layers[1], torch.nn.ReLU(), layers[2])
    jacobian = torch.autograd.functional.jacobian(net, torch.randn(1, dims, device=device))[0, :, 0, :]
    position = torch.empty(dims, dtype=torch.int64)
    position[ordering] = torch.arange(dims)
    allowed = position[:, None] > position[None, :]  # output d sees input j when j comes earlier
    assert not jacobian.cpu()[~allowed].any()
    assert jacobian.cpu()[allowed].abs().sum() > 0
    assert torch.equal(layers[2].mask().cpu(), nade.made_masks(degrees)[2].bool())


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
def test_opcheck_and_compile(impl, device):
    skip_unless_supported(impl, device)
    x, weight, bias, din, dout = _inputs(5, 9, 6, torch.float32, device)
    name = "made_linear" if impl == "native" else "made_linear_triton"
    leaves = tuple(t.requires_grad_() for t in (x, weight, bias))
    torch.library.opcheck(getattr(torch.ops.genfast, name), (*leaves, din, dout, True))
    torch.library.opcheck(getattr(torch.ops.genfast, name), (leaves[0], leaves[1], None, din, dout, False))
    backward = getattr(torch.ops.genfast, name.replace("made_linear", "made_linear_backward"))
    torch.library.opcheck(backward, (torch.randn(5, 6, device=device), x.detach(), weight.detach(), din, dout, False))

    def layer(x, weight, bias):
        return torch.relu(genfast.made_linear(x, weight, bias, din, dout, impl=impl)).sum()

    assert_compiles_like_eager(layer, leaves)


@pytest.mark.parametrize("impl", ["native", pytest.param("triton", marks=pytest.mark.triton), "reference"])
def test_empty(impl):
    skip_unless_supported(impl, "cpu")
    x, weight, bias, din, dout = _inputs(4, 6, 5, torch.float32, "cpu")
    assert genfast.made_linear(x[:0], weight, bias, din, dout, impl=impl).shape == (0, 5)
    y = genfast.made_linear(x[:, :0], weight[:, :0], bias, din[:0], dout, impl=impl)
    torch.testing.assert_close(y, bias.expand(4, 5))
    leaves = [t.clone().requires_grad_() for t in (weight, bias)]
    genfast.made_linear(x[:0], *leaves, din, dout, impl=impl).sum().backward()
    assert not leaves[0].grad.any() and not leaves[1].grad.any()


def test_bad_input_names_the_argument():
    x, weight, bias, din, dout = _inputs(4, 6, 5, torch.float32, "cpu")
    f = genfast.made_linear
    with pytest.raises(ValueError, match="weight must have shape"):
        f(x, weight[:, :5], bias, din, dout)
    with pytest.raises(ValueError, match="bias must have shape"):
        f(x, weight, bias[:4], din, dout)
    with pytest.raises(ValueError, match="weight must have the dtype"):
        f(x, weight.half(), bias, din, dout)
    with pytest.raises(ValueError, match="in_degrees must have shape"):
        f(x, weight, bias, din[:5], dout)
    with pytest.raises(ValueError, match="out_degrees must have shape"):
        f(x, weight, bias, din, dout[:4])
    with pytest.raises(TypeError, match="in_degrees must be an int64"):
        f(x, weight, bias, din.float(), dout)
    with pytest.raises(TypeError, match="x must be float32"):
        f(x.long(), weight, bias, din, dout)
    with pytest.raises(ValueError, match="out_degrees must have shape"):
        MaskedLinear(6, 5, din, dout[:4])
    if genfast._backend.native_runs_on("cpu"):
        op = torch.ops.genfast.made_linear
        with pytest.raises(RuntimeError, match="in_degrees must have shape"):
            op(x, weight, bias, din[:3], dout, False)
        with pytest.raises(RuntimeError, match="weight must have the dtype"):
            op(x, weight.double(), bias, din, dout, False)
