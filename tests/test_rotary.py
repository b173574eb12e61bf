"""genfast.rotary, the rotary position embedding with its backward, on every backend against
reference.rotary: outputs by the error-ratio rule (2x) and gradients (3x), both plane layouts,
partial rotary dims, the inverse turn, float32/16/bfloat16, strided inputs, broadcast and int64
positions, in place (with and without autograd), empty tensors, NaN, opcheck, torch.compile, CUDA
graphs and bad input. The reference itself: gradcheck in float64, and its inverse undoing it."""

import pytest
import torch

import genfast
from genfast.reference.rotary import rotary as reference_rotary
from genfast.testing.tolerances import assert_error_ratio
from conftest import assert_compiles_like_eager, capture_cuda_graph, devices, fused_impls, skip_unless_supported

BATCH, SEQLEN, HEADS, DIM, POSITIONS = 2, 7, 3, 16, 20


def _tables(rotary_dim=DIM, dtype=torch.float32, device="cpu", positions=POSITIONS):
    inverse = 1.0 / 10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / max(rotary_dim, 1))
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * inverse
    return angles.cos().to(dtype).to(device), angles.sin().to(dtype).to(device)


def _positions(device="cpu"):
    return torch.tensor([[3, 0, 19, 7, 7, 1, 12], [5, 6, 7, 8, 9, 10, 11]], dtype=torch.int32, device=device)


def _compare(impl, device, dtype, x, cos, sin, positions, **options):
    """Output and gradient of genfast.rotary against the float64 reference and the reference in dtype."""
    x = x.detach().requires_grad_()
    out = genfast.rotary(x, cos, sin, positions, impl=impl, **options)
    grad = torch.randn_like(out)
    (grad_x,) = torch.autograd.grad(out, x, grad)
    results = {}
    for name, cast in (("exact", torch.float64), ("low", dtype)):
        xr = x.detach().to(cast).requires_grad_()
        r = genfast.rotary(xr, cos.to(cast), sin.to(cast), positions, impl="reference", **options)
        results[name] = (r, torch.autograd.grad(r, xr, grad.to(cast))[0])
    assert out.dtype == dtype and out.shape == x.shape
    assert_error_ratio(out, results["exact"][0], results["low"][0], msg="out")
    assert_error_ratio(grad_x, results["exact"][1], results["low"][1], ratio=3.0, msg="grad_x")
    return out


def test_reference_gradcheck_and_inverse():
    x = torch.randn(BATCH, SEQLEN, HEADS, DIM, dtype=torch.float64, requires_grad=True)
    cos, sin = _tables(12, torch.float64)
    for interleaved in (True, False):
        for inverse in (False, True):
            assert torch.autograd.gradcheck(lambda t: reference_rotary(t, cos, sin, _positions(), interleaved,
                                                                       inverse), (x,))
        turned = reference_rotary(x, cos, sin, _positions(), interleaved)
        torch.testing.assert_close(reference_rotary(turned, cos, sin, _positions(), interleaved, inverse=True), x)


@pytest.mark.parametrize("rotary_dim", [DIM, 10, 0])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
def test_matches_reference(impl, device, inverse, interleaved, rotary_dim):
    skip_unless_supported(impl, device)
    x = torch.randn(BATCH, SEQLEN, HEADS, DIM, device=device)
    cos, sin = _tables(rotary_dim, device=device)
    _compare(impl, device, torch.float32, x, cos, sin, _positions(device), interleaved=interleaved, inverse=inverse)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
def test_half_precision_rounds_once(impl, device, dtype):
    skip_unless_supported(impl, device, dtype)
    x = (torch.randn(BATCH, SEQLEN, HEADS, DIM) * 4).to(dtype).to(device)
    cos, sin = _tables(DIM, dtype, device)
    for interleaved in (False, True):
        _compare(impl, device, dtype, x, cos, sin, _positions(device), interleaved=interleaved)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
@pytest.mark.parametrize("impl", fused_impls())
def test_16_bit_results_round_to_nearest_even(impl, interleaved, dtype):
    """With cos 1 and sin a power of two, the turn's float32 values are the same fused or not; each
    must then round to the nearest 16-bit value, ties to even, as torch rounds: subnormals, overflow
    to infinity, infinities and NaN included, in full vectors and in a row's tail."""
    skip_unless_supported(impl, "cpu", dtype)
    g = torch.Generator().manual_seed(5)
    dim = 2 * 36 + 6  # 36 planes, 72 features turned: four vectors of 16 and a tail of 8; 6 copied
    scales = torch.tensor([1.0, 3e-5, 2e-7, 6e4, 1e38 if dtype == torch.bfloat16 else 1.0])
    x = torch.randn(2, 5, 3, dim, generator=g) * scales[torch.randint(0, 5, (2, 5, 3, dim), generator=g)]
    x.view(-1)[::37] = float("inf")
    x.view(-1)[5::41] = float("nan")
    x = x.to(dtype)
    cos = torch.ones(4, 36, dtype=dtype)
    sin = (2.0 ** -torch.randint(0, 12, (4, 36), generator=g).double()).to(dtype)
    positions = torch.randint(0, 4, (2, 5), generator=g, dtype=torch.int32)
    got = genfast.rotary(x, cos, sin, positions, interleaved=interleaved, impl=impl)
    expected = reference_rotary(x.float(), cos.float(), sin.float(), positions, interleaved).to(dtype)
    assert torch.equal(got.isnan(), expected.isnan())
    kept = ~expected.isnan()
    assert torch.equal(got[kept].view(torch.int16), expected[kept].view(torch.int16))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls())
def test_layouts_and_positions(impl, device):
    """x as a transposed view (the output keeps its layout), a slice of a packed qkv (the output is
    contiguous), strided features; positions broadcast from one row, int64, and by default 0 .. L-1."""
    skip_unless_supported(impl, device)
    cos, sin = _tables(DIM, device=device)
    bhld = torch.randn(BATCH, HEADS, SEQLEN, DIM, device=device)
    x = bhld.transpose(1, 2)
    out = _compare(impl, device, torch.float32, x, cos, sin, _positions(device))
    assert out.stride() == x.stride(), "a transposed view gives a transposed view"
    qkv = torch.randn(BATCH, SEQLEN, 3, HEADS, DIM, device=device)
    out = _compare(impl, device, torch.float32, qkv[:, :, 1], cos, sin, _positions(device))
    assert out.is_contiguous()
    features_strided = torch.randn(BATCH, SEQLEN, HEADS, DIM, 2, device=device)[..., 0]
    _compare(impl, device, torch.float32, features_strided, cos, sin, _positions(device))
    x = torch.randn(BATCH, SEQLEN, HEADS, DIM, device=device)
    row = _positions(device)[1:]
    expected = reference_rotary(x, cos, sin, row.expand(BATCH, SEQLEN), False)
    torch.testing.assert_close(genfast.rotary(x, cos, sin, row, impl=impl), expected)
    torch.testing.assert_close(genfast.rotary(x, cos, sin, row[0].long(), impl=impl), expected)
    default = reference_rotary(x, cos, sin, torch.arange(SEQLEN, device=device).expand(BATCH, SEQLEN), False)
    torch.testing.assert_close(genfast.rotary(x, cos, sin, impl=impl), default)
    wide = torch.stack(_tables(DIM, device=device), 1)  # (positions, 2, half): tables with row stride DIM
    torch.testing.assert_close(genfast.rotary(x, wide[:, 0], wide[:, 1], row, impl=impl), expected)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("impl", fused_impls() + ["reference"])
def test_in_place(impl, device):
    """inplace turns x itself (the in-place operator without autograd; with it, a tracked copy)."""
    skip_unless_supported(impl, device)
    cos, sin = _tables(10, device=device)
    for make in (lambda t: t, lambda t: t.transpose(1, 2).contiguous().transpose(1, 2),
                 lambda t: torch.stack((t, t), -1)[..., 0]):
        x = make(torch.randn(BATCH, SEQLEN, HEADS, DIM, device=device))
        expected = reference_rotary(x, cos, sin, _positions(device), True)
        pointer = x.data_ptr()
        got = genfast.rotary(x, cos, sin, _positions(device), interleaved=True, inplace=True, impl=impl)
        assert got is x and x.data_ptr() == pointer
        torch.testing.assert_close(x, expected)
    leaf = torch.randn(BATCH, SEQLEN, HEADS, DIM, device=device, requires_grad=True)
    x = leaf * 1.0
    genfast.rotary(x, cos, sin, _positions(device), inplace=True, impl=impl)
    grad = torch.randn_like(x)
    x.backward(grad)
    expected_leaf = leaf.detach().requires_grad_()
    reference_rotary(expected_leaf, cos, sin, _positions(device), False).backward(grad)
    torch.testing.assert_close(leaf.grad, expected_leaf.grad)


@pytest.mark.parametrize("impl", fused_impls())
def test_empty_tensors_and_nan(impl):
    skip_unless_supported(impl, "cpu")
    cos, sin = _tables(DIM)
    for shape in ((0, SEQLEN, HEADS, DIM), (BATCH, 0, HEADS, DIM), (BATCH, SEQLEN, 0, DIM)):
        x = torch.randn(shape)
        positions = torch.zeros(shape[:2], dtype=torch.int32)
        assert genfast.rotary(x, cos, sin, positions, impl=impl).shape == shape
        genfast.rotary(x, cos, sin, positions, impl=impl, inplace=True)
    x = torch.randn(BATCH, SEQLEN, HEADS, DIM)
    x[1, 2, 0, 3] = float("nan")
    nan = genfast.rotary(x, cos, sin, _positions(), impl=impl).isnan()
    assert bool(nan[1, 2, 0, 3]) and bool(nan[1, 2, 0, 3 + DIM // 2]) and int(nan.sum()) == 2
    nan = genfast.rotary(x, cos, sin, _positions(), interleaved=True, impl=impl).isnan()
    assert bool(nan[1, 2, 0, 2]) and bool(nan[1, 2, 0, 3]) and int(nan.sum()) == 2


@pytest.mark.parametrize("impl", fused_impls())
def test_opcheck_and_compile(impl):
    skip_unless_supported(impl, "cpu")
    cos, sin = _tables(10)
    x = torch.randn(BATCH, HEADS, SEQLEN, DIM).transpose(1, 2)
    positions = _positions()
    functional = torch.ops.genfast.rotary if impl == "native" else torch.ops.genfast.rotary_triton
    in_place = torch.ops.genfast.rotary_ if impl == "native" else torch.ops.genfast.rotary_triton_
    for interleaved, inverse in ((False, False), (True, True)):
        torch.library.opcheck(functional, (x.clone().requires_grad_(), cos, sin, positions, interleaved, inverse))
        torch.library.opcheck(in_place, (x.clone(), cos, sin, positions, interleaved, inverse))
    assert_compiles_like_eager(lambda t: genfast.rotary(t, cos, sin, positions, impl=impl).square(),
                               [x.clone().requires_grad_()])


@pytest.mark.cuda
@pytest.mark.parametrize("impl", fused_impls())
def test_replays_in_a_cuda_graph(impl):
    """No host-device synchronisation: captured once, replayed with new positions and inputs."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    skip_unless_supported(impl, "cuda")
    cos, sin = _tables(DIM, torch.bfloat16, "cuda")
    x = torch.randn(BATCH, SEQLEN, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    positions = _positions("cuda")
    graph, out = capture_cuda_graph(lambda: genfast.rotary(x, cos, sin, positions, impl=impl))
    x.copy_(torch.randn_like(x))
    positions.copy_(positions.flip(1))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, reference_rotary(x, cos, sin, positions, False))


@pytest.mark.cuda
@pytest.mark.parametrize("impl", fused_impls())
def test_a_gpu_turns_positions_outside_the_tables_by_nothing(impl):
    """Unchecked on a GPU (no synchronisation), as in FlashAttention: never read past the tables; an
    int64 position past int32 is not narrowed back into them."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    skip_unless_supported(impl, "cuda")
    cos, sin = _tables(DIM, device="cuda")
    x = torch.randn(BATCH, SEQLEN, HEADS, DIM, device="cuda")
    positions = _positions("cuda")
    positions = positions.long()
    positions[0, 1], positions[1, 3] = -1, POSITIONS + (1 << 32)  # the second int32 wraps back into the tables
    got = genfast.rotary(x, cos, sin, positions, impl=impl)
    torch.testing.assert_close(got[0, 1], x[0, 1])
    torch.testing.assert_close(got[1, 3], x[1, 3])
    kept = torch.ones(BATCH, SEQLEN, dtype=torch.bool)
    kept[0, 1] = kept[1, 3] = False
    expected = reference_rotary(x, cos, sin, positions.clamp(0, POSITIONS - 1), False)
    torch.testing.assert_close(got[kept.cuda()], expected[kept.cuda()])


@pytest.mark.parametrize("impl", fused_impls() + ["reference"])
def test_bad_input_names_the_argument(impl):
    skip_unless_supported(impl, "cpu")
    x = torch.randn(BATCH, SEQLEN, HEADS, DIM)
    cos, sin = _tables(DIM)
    positions = _positions()
    for call, error, match in (
            (lambda: genfast.rotary(x[0], cos, sin, impl=impl), ValueError, r"x must be \(batch, seqlen"),
            (lambda: genfast.rotary(x.int(), cos, sin, impl=impl), TypeError, "x must be float32"),
            (lambda: genfast.rotary(x, cos[:, None], sin, impl=impl), ValueError, "cos must be a 2-d"),
            (lambda: genfast.rotary(x, cos, sin[:, :4], impl=impl), ValueError, "cos and sin must be"),
            (lambda: genfast.rotary(x, torch.cat((cos, cos), 1), torch.cat((sin, sin), 1), impl=impl), ValueError,
             "rotary_dim <= head_dim"),
            (lambda: genfast.rotary(x, cos.half(), sin, impl=impl), ValueError, "cos must have x's dtype"),
            (lambda: genfast.rotary(x, cos, sin, positions.float(), impl=impl), TypeError, "positions must be an int"),
            (lambda: genfast.rotary(x, cos, sin, positions[:, :3], impl=impl), ValueError, "must broadcast"),
            (lambda: genfast.rotary(x, cos[:19], sin[:19], positions, impl=impl), ValueError,
             r"positions.* must lie in 0 .. 18"),
            (lambda: genfast.rotary(x, cos, sin, positions - 4, impl=impl), ValueError, "positions.* must lie in"),
            (lambda: genfast.rotary(x, cos, sin, positions.long() + 2 ** 32, impl=impl), ValueError,
             "positions.* must lie in"),
            (lambda: genfast.rotary(x[:, :, :1].expand(-1, -1, HEADS, -1), cos, sin, inplace=True, impl=impl),
             ValueError, "must not overlap itself"),
            (lambda: genfast.rotary(x, cos.requires_grad_(), sin, impl=impl), ValueError,
             "no gradient for cos and sin")):
        with pytest.raises(error, match=match):
            call()
        cos.requires_grad_(False)


def test_the_native_op_checks_positions_itself():
    from genfast import _backend

    if not _backend.native_runs_on("cpu"):
        pytest.skip("genfast._C is not built here")
    x = torch.randn(BATCH, SEQLEN, HEADS, DIM)
    cos, sin = _tables(DIM)
    with pytest.raises(ValueError, match=r"positions\[0, 2\] = 19 must lie in 0 .. 18"):
        torch.ops.genfast.rotary(x, cos[:19], sin[:19], _positions(), False, False)
    with pytest.raises(RuntimeError, match=r"positions must be an int32 tensor \(batch, seqlen\)"):
        torch.ops.genfast.rotary(x, cos, sin, _positions().long(), False, False)
    with pytest.raises(RuntimeError, match="sin must have x's dtype"):
        torch.ops.genfast.rotary(x, cos, sin.double(), _positions(), False, False)
