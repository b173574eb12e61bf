"""The definition of genfast's NADE ops, in plain PyTorch (binary NADE, Larochelle & Murray 2011).

x (B, D) in {0, 1}; W (H, D), c (H), V (D, H), b (D). Visiting the dimensions in an ordering o
(o = 0, 1, ..., D - 1 unless given; one ordering for all samples, (D,), or one per sample, (B, D)):

    a_1 = c;   h_k = act(a_k);   logit[o_k] = b[o_k] + V[o_k] . h_k;   a_{k+1} = a_k + W[:, o_k] x[o_k]

so logit[d] is the log-odds of p(x_d = 1 | the dimensions visited before d). act is the sigmoid of
the paper or a ReLU. Everything computes in the dtype of its inputs (float64 for an exact oracle).
"""

import torch
import torch.nn.functional as F

ACTIVATIONS = ("sigmoid", "relu")


def _activation(name: str):
    if name == "sigmoid":
        return torch.sigmoid
    if name == "relu":
        return torch.relu
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def _ordering(ordering, batch: int, dims: int, device) -> torch.Tensor:
    """The ordering as (B, D) int64: row r lists the dimensions in the order sample r visits them."""
    if ordering is None:
        return torch.arange(dims, device=device).expand(batch, dims)
    return ordering.to(device=device, dtype=torch.int64).expand(batch, dims)


def conditionals_loop(x, W, c, V, b, ordering=None, activation="sigmoid"):
    """The formula written directly: at each step the hidden pre-activation is recomputed from all
    the dimensions visited so far, O(D^2 H) per sample. The plainest statement of the model."""
    act = _activation(activation)
    batch, dims = x.shape
    order = _ordering(ordering, batch, dims, x.device)
    logits = torch.empty_like(x)
    rows = torch.arange(batch, device=x.device)
    for k in range(dims):
        seen = order[:, :k]                                               # (B, k)
        a = c + torch.einsum("bhk,bk->bh", W[:, seen].permute(1, 0, 2), x[rows[:, None], seen])
        d = order[:, k]
        logits[rows, d] = b[d] + (V[d] * act(a)).sum(1)
    return logits


def conditionals(x, W, c, V, b, ordering=None, activation="sigmoid"):
    """The O(D H) form, vectorized as PyTorch users write it: the running pre-activations of all
    steps at once from a cumulative sum, which holds a (B, D, H) tensor."""
    act = _activation(activation)
    batch, dims = x.shape
    order = _ordering(ordering, batch, dims, x.device)
    x_ordered = torch.gather(x, 1, order)                                  # (B, D), visiting order
    contributions = W.t()[order] * x_ordered.unsqueeze(2)                  # (B, D, H): W[:, o_k] x[o_k]
    before = torch.cumsum(contributions, dim=1) - contributions            # sums over the steps before k
    h = act(c + before)
    logits_ordered = b[order] + (V[order] * h).sum(2)
    return torch.empty_like(logits_ordered).scatter_(1, order, logits_ordered)


def log_prob(x, W, c, V, b, ordering=None, activation="sigmoid"):
    """log p(x), (B,): the sum over d of log p(x_d | x_<d), stable in the logits."""
    logits = conditionals(x, W, c, V, b, ordering, activation)
    return (x * logits - F.softplus(logits)).sum(1)


def sample(W, c, V, b, uniforms, ordering=None, activation="sigmoid", observed=None, num_observed: int = 0):
    """Samples x (B, D): step k sets x[o_k] = 1 where uniforms[:, o_k] < sigmoid(logit[o_k]), else 0
    (NaN where the logit is NaN).
    Conditional completion: the first num_observed dimensions of the ordering are taken from
    `observed` instead, and the rest are sampled given them."""
    act = _activation(activation)
    batch, dims = uniforms.shape
    order = _ordering(ordering, batch, dims, uniforms.device)
    rows = torch.arange(batch, device=uniforms.device)
    x = torch.zeros_like(uniforms)
    a = c.expand(batch, -1).clone()
    for k in range(dims):
        d = order[:, k]
        if k < num_observed:
            value = observed[rows, d].to(x.dtype)
        else:
            logit = b[d] + (V[d] * act(a)).sum(1)
            drawn = (uniforms[rows, d] < torch.sigmoid(logit)).to(x.dtype)
            value = torch.where(torch.isnan(logit), logit, drawn)
        x[rows, d] = value
        a = a + W[:, d].t() * value[:, None]
    return x


# MADE (Germain et al. 2015): the autoregressive network as an MLP whose weights are masked.

def made_degrees(dims: int, hidden_sizes, ordering=None, generator=None):
    """The degrees of each layer's units: inputs get 1 + their position in the ordering; hidden
    units degrees in [1, D - 1] (cyclically, or at random when a generator is given), each layer's
    no lower than the previous layer's minimum so that every unit keeps an input."""
    position = torch.empty(dims, dtype=torch.int64)
    order = torch.arange(dims) if ordering is None else torch.as_tensor(ordering, dtype=torch.int64)
    position[order] = torch.arange(dims)
    degrees = [position + 1]
    for size in hidden_sizes:
        low = min(int(degrees[-1].min()), dims - 1)
        span = max(1, dims - low)
        if generator is None:
            d = low + torch.arange(size) % span
        else:
            d = torch.randint(low, dims, (size,), generator=generator) if dims > low else torch.full((size,), low)
        degrees.append(d)
    return degrees


def degree_mask(in_degrees, out_degrees, strict: bool = False):
    """The (out, in) bool mask of a MADE layer from its units' degrees: output k sees input j when
    deg_out[k] >= deg_in[j] (hidden layers), or > with strict=True (the output layer)."""
    later, earlier = out_degrees[:, None], in_degrees[None, :]
    return later > earlier if strict else later >= earlier


def made_masks(degrees):
    """Masks (out, in) of the hidden layers (unit k sees unit j when deg(k) >= deg(j)) and of the
    output layer (output d sees unit k when deg_in(d) > deg(k)), as float tensors."""
    masks = [degree_mask(earlier, later).float() for earlier, later in zip(degrees[:-1], degrees[1:])]
    masks.append(degree_mask(degrees[-1], degrees[0], strict=True).float())
    return masks


def masked_linear(x, weight, mask, bias=None):
    """x (W * mask)^T + bias: a MADE layer, with the masked weight materialized. Masked-out weights
    are not connections: they take no part, whatever their value (NaN included)."""
    return F.linear(x, torch.where(mask.bool(), weight, torch.zeros((), dtype=weight.dtype)), bias)


def made_linear(x, weight, bias, in_degrees, out_degrees, strict: bool = False):
    """genfast.made_linear's definition: masked_linear with the mask of degree_mask."""
    return masked_linear(x, weight, degree_mask(in_degrees, out_degrees, strict), bias)
