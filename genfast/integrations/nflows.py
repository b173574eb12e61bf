"""nflows' affine coupling layer computed by genfast's fused affine coupling.

    from genfast.integrations.nflows import AffineCouplingTransform   # instead of nflows'

Same constructor (plus impl=, the backend, as genfast's functions take it), same outputs and
log|det J|: s = sigmoid(u + 2) + 1e-3 with the shift and the unconstrained scale u read straight
from the halves of the transform net's output.
"""

import torch

try:
    from nflows.transforms.coupling import AffineCouplingTransform as _NflowsAffineCouplingTransform
except ImportError as error:
    raise ImportError("genfast.integrations.nflows needs nflows: pip install nflows") from error

from .. import flows

NFLOWS_EPS = 1e-3  # nflows' s = sigmoid(u + 2) + 1e-3


class AffineCouplingTransform(_NflowsAffineCouplingTransform):
    def __init__(self, mask, transform_net_create_fn, unconditional_transform=None, *, impl: str = "auto"):
        super().__init__(mask, transform_net_create_fn, unconditional_transform=unconditional_transform)
        self.impl = impl
        self._indices = {}  # coupling_index per (device, sample shape)

    def forward(self, inputs, context=None):
        self._check(inputs)
        identity = inputs[:, self.identity_features, ...]
        outputs, logabsdet = self._couple(inputs, self.transform_net(identity, context), inverse=False)
        if self.unconditional_transform is not None:
            identity, logabsdet_identity = self.unconditional_transform(identity, context)
            outputs = outputs.index_copy(1, self.identity_features, identity)
            logabsdet = logabsdet + logabsdet_identity
        return outputs, logabsdet

    def inverse(self, inputs, context=None):
        self._check(inputs)
        identity = inputs[:, self.identity_features, ...]
        logabsdet_identity = None
        if self.unconditional_transform is not None:
            identity, logabsdet_identity = self.unconditional_transform.inverse(identity, context)
        outputs, logabsdet = self._couple(inputs, self.transform_net(identity, context), inverse=True)
        if logabsdet_identity is not None:
            outputs = outputs.index_copy(1, self.identity_features, identity)
            logabsdet = logabsdet + logabsdet_identity
        return outputs, logabsdet

    def _couple(self, inputs, transform_params, inverse):
        n = self.num_transform_features
        shift, scale = transform_params[:, :n, ...], transform_params[:, n:, ...]
        return flows.affine_coupling(inputs, shift, scale, self._index(inputs), scale_fn="sigmoid", eps=NFLOWS_EPS,
                                     inverse=inverse, impl=self.impl)

    def _index(self, inputs):
        key = (inputs.device, tuple(inputs.shape[1:]))
        index = self._indices.get(key)
        if index is None:
            mask = torch.zeros(self.features, dtype=torch.bool, device=inputs.device)
            mask[self.transform_features.to(inputs.device)] = True
            index = self._indices[key] = flows.coupling_index(mask, key[1], compact=True)
        return index

    def _check(self, inputs):
        if inputs.dim() not in (2, 4):
            raise ValueError("Inputs must be a 2D or a 4D tensor.")
        if inputs.shape[1] != self.features:
            raise ValueError(f"Expected features = {self.features}, got {inputs.shape[1]}.")


__all__ = ["AffineCouplingTransform"]
