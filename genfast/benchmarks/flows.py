"""The fused affine coupling layer against its peers, forward and forward+backward.

The layer as nflows' AffineCouplingTransform runs it (alternating feature mask, the conditioner's
output split into shift and unconstrained scale, s = sigmoid(u + 2) + 1e-3, y = x * s + t) on a
batch of 256 samples of D features, given the same conditioner outputs to every candidate:
genfast's fused op; the eager reference (genfast.reference.flows); torch.compile of it; nflows'
own split, transform and scatter, where nflows is installed. GB/s counts the bytes any
implementation must move: x, t, u read and y written forward; backward also reads the output
gradient, x, t, u and writes the three input gradients.
"""

import torch

from ..flows import affine_coupling, coupling_index
from ..reference import flows as reference
from .elementwise import default_dtypes, fused_impls, run_groups

BATCH = 256
FEATURES = [64, 1 << 10, 1 << 14, 1 << 18, 1 << 20]
QUICK_FEATURES = [64, 1 << 14, 1 << 18]
EPS = 1e-3


def nflows_transform(features: int, device):
    """nflows' AffineCouplingTransform with an alternating mask (its net is never called here)."""
    try:
        from nflows.transforms.coupling import AffineCouplingTransform
    except ImportError:
        return None
    mask = torch.arange(features) % 2
    return AffineCouplingTransform(mask, lambda n_in, n_out: torch.nn.Identity()).to(device)


def nflows_coupling(transform, inputs, transform_params):
    """nflows' forward without its conditioner: split, transform, scatter (its own methods)."""
    transform_split = inputs[:, transform.transform_features, ...]
    outputs_split, logabsdet = transform._coupling_transform_forward(transform_split, transform_params)
    outputs = torch.empty_like(inputs)
    outputs[:, transform.identity_features, ...] = inputs[:, transform.identity_features, ...]
    outputs[:, transform.transform_features, ...] = outputs_split
    return outputs, logabsdet


def _forward_backward(fn, leaves, grads):
    def run():
        y, logdet = fn(*leaves)
        return torch.autograd.grad((y, logdet), leaves, grads)

    return run


def run(device: str, quick: bool = False, progress=None, dtypes=None, sizes=None):
    """Returns result rows (dicts); `sizes` are element counts, 256 samples of size // 256 features."""
    if sizes is None:
        sizes = [BATCH * f for f in (QUICK_FEATURES if quick else FEATURES)]
    fused = fused_impls(device)

    def eager(x, params, mask):
        n = params.shape[1] // 2
        return reference.affine_coupling(x, params[:, :n], params[:, n:], mask, "sigmoid", EPS)

    compiled = torch.compile(eager, dynamic=False)

    def make_candidates(numel, dtype):
        features = numel // BATCH
        g = torch.Generator().manual_seed(0)
        x = torch.randn(BATCH, features, generator=g).to(device=device, dtype=dtype)
        mask = (torch.arange(features) % 2 == 1).to(device)
        count = int(mask.sum())
        params = torch.randn(BATCH, 2 * count, generator=g).to(device=device, dtype=dtype)
        index = coupling_index(mask, (features,), compact=True)
        transform = nflows_transform(features, device)

        def genfast_fn(impl):
            return lambda x, params: affine_coupling(x, params[:, :count], params[:, count:], index,
                                                     scale_fn="sigmoid", eps=EPS, impl=impl)

        forward = [(f"genfast {impl}", genfast_fn(impl)) for impl in fused]
        forward += [("eager reference", lambda x, params: eager(x, params, mask)),
                    ("torch.compile", lambda x, params: compiled(x, params, mask))]
        if transform is not None:
            forward.append(("nflows", lambda x, params: nflows_coupling(transform, x, params)))

        leaves = (x.clone().requires_grad_(), params.clone().requires_grad_())
        grads = (torch.randn_like(x), torch.randn(BATCH, device=device))
        size = x.element_size()
        return {
            "coupling forward": (3 * numel * size, [(name, lambda fn=fn: fn(x, params)) for name, fn in forward]),
            "coupling forward+backward": (
                8 * numel * size, [(name, _forward_backward(fn, leaves, grads)) for name, fn in forward]),
        }

    # One compilation per size, with and without autograd: more than torch's default limit of 8
    # recompilations, past which it would quietly run the eager code.
    with torch._dynamo.config.patch(recompile_limit=64):
        return run_groups("affine_coupling", device, sizes, dtypes or default_dtypes(device), quick, progress,
                          make_candidates)
