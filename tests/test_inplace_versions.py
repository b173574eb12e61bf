"""Ops that write into tensors they are given move those tensors' versions, as torch's own in-place
ops do, so that autograd refuses a tensor it saved for a backward that the op then overwrote
(csrc/inplace_versions.cpp for the native ops; torch.library's custom ops for Triton's)."""
import pytest
import torch

import genfast
from conftest import fused_impls, skip_unless_supported


def _written_ops():
    """Every genfast operator overload whose schema writes into an argument (Tensor(a!))."""
    genfast.build_info()  # loads the native ops
    written = []
    for name in torch._C._dispatch_get_all_op_names():
        if not name.startswith("genfast::"):
            continue
        packet = getattr(torch.ops.genfast, name.split("::")[1])
        for overload in packet.overloads():
            schema = getattr(packet, overload)._schema
            if any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
                written.append(name)
    return written


def test_every_op_that_writes_moves_versions():
    written = _written_ops()
    native = {"denoise_step", "langevin_step", "langevin_corrector_step", "mala_accept", "kvcache_append",
              "rotary_", "attention_merge_out"}
    if "cpu" in genfast.build_info()["backends"]:
        assert {f"genfast::{name}" for name in native} <= set(written)
    missing = [name for name in written if not torch._C._dispatch_has_kernel_for_dispatch_key(name, "ADInplaceOrView")]
    assert not missing, f"no ADInplaceOrView kernel (versions left unmoved): {missing}"


def _saved_then_overwritten(shape, write):
    """A tensor autograd saved (exp keeps its output), then written by `write` through a detached
    alias (which shares its version): the version moves and the backward refuses it."""
    leaf = torch.zeros(shape, requires_grad=True)
    saved = leaf.exp()
    version = saved._version
    write(saved.detach())
    assert saved._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()


@pytest.mark.parametrize("impl", fused_impls())
def test_written_tensors_are_refused_by_a_later_backward(impl):
    skip_unless_supported(impl, "cpu")
    g = torch.Generator().manual_seed(0)
    x, grad, noise = (torch.randn(4, 6, generator=g) for _ in range(3))
    _saved_then_overwritten((4, 6), lambda out: genfast.ddpm_step(grad, x, 0.5, 0.7, noise=noise, out=out, impl=impl))
    _saved_then_overwritten((4, 6), lambda out: genfast.langevin_step(x, grad, 0.1, noise=noise, out=out, impl=impl))
    _saved_then_overwritten((4, 6), lambda out: genfast.langevin_corrector_step(grad, x, 0.16, noise=noise, out=out,
                                                                                impl=impl))
    energies = torch.randn(4, generator=g), torch.randn(4, generator=g)
    _saved_then_overwritten((4, 6), lambda x_: genfast.mala_accept(x_, x, grad.clone(), grad, *energies, 0.1,
                                                                   uniform=torch.zeros(4), in_place=True, impl=impl))
    cos, sin = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    _saved_then_overwritten((1, 5, 2, 6), lambda x_: genfast.rotary(x_, cos, sin, inplace=True, impl=impl))
    k = torch.randn(1, 2, 2, 6, generator=g)
    seqlens = torch.tensor([1], dtype=torch.int32)
    _saved_then_overwritten((1, 5, 2, 6), lambda cache: genfast.kvcache_append(cache, torch.zeros(1, 5, 2, 6), k, k,
                                                                               seqlens, impl=impl))
    o, lse = [torch.randn(3, 4, 6, generator=g)] * 2, [torch.randn(3, 4, generator=g)] * 2
    _saved_then_overwritten((3, 4, 6), lambda out: genfast.merge_attention(o, lse, out=(out, None), impl=impl))


def test_inference_tensors_are_written_without_a_version():
    """An inference tensor has no version: written outside inference mode, as torch's increment_version."""
    skip_unless_supported("native", "cpu")
    with torch.inference_mode():
        x = torch.zeros(1, 5, 2, 6)
    cos, sin = torch.ones(8, 3), torch.zeros(8, 3)
    genfast.rotary(x, cos, sin, inplace=True, impl="native")
    assert x.is_inference()
