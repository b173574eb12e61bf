"""torch.ops.genfast.nade_conditionals (native, from _C): its fake. The public functions, the
backward and the other backends come with the rest of the NADE family."""

import torch

from .. import _backend


def _fake(x, W, c, V, b, ordering, activation):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


if _backend.native_module() is not None:
    torch.library.register_fake("genfast::nade_conditionals")(_fake)
