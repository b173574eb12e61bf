"""Attention inputs that make a kernel's layout mistakes readable: each probe returns "" when the
kernel is right, else which queries, keys or value rows it got wrong. A tile or descriptor error
gives a pattern here (every row of one warp, keys of one 8-column chunk, a shifted value row) where
an error ratio would only say "wrong". The GPU tests of a new kernel (tests/test_attention_cuda_sm90.py)
run them first; tests/test_attention_probes.py shows that they pass on the reference and name
planted mistakes.

`attention_fn(q, k, v, scale)` is the kernel under test on (1, 1, L, D) tensors."""

import torch

QUERIES = 200  # two tiles of 128 queries, the second partly filled


def _ranges(indices):
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8" (at most 8 ranges)."""
    spans, start = [], None
    for a, b in zip([None] + indices, indices + [None]):
        if start is None:
            start = b
        elif b is None or b != a + 1:
            spans.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(spans[:8]) + (f", ... ({len(spans)} ranges)" if len(spans) > 8 else "")


def score_probe(attention_fn, dtype, device):
    """V = I over 128 keys, so output row i is query i's probabilities over the keys. A wrong score
    also changes its row's normalization, so each row is first rescaled by its median ratio to the
    exact one: the keys off by more than the dtype allows after that, and the rows whose scale is
    off (a wrong sum or maximum)."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 1, QUERIES, 64, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 128, 64, generator=g, dtype=torch.float64)
    v = torch.eye(128, dtype=torch.float64)[None, None]
    q, k = (t.to(dtype).double() for t in (q, k))  # the rounded inputs define the exact result
    expected = torch.softmax(q[0, 0] @ k[0, 0].T * 0.125, -1)
    got = attention_fn(*(t.to(device=device, dtype=dtype) for t in (q, k, v)), 0.125)[0, 0].double().cpu()
    eps = torch.finfo(dtype).eps
    ratio = torch.where(expected > 1e-3, got / expected, torch.nan).nanmedian(-1, keepdim=True).values
    scaled = got / ratio
    bad = ((scaled - expected).abs() > 4 * eps * expected.amax(-1, keepdim=True) + 1e-6) | ~torch.isfinite(scaled)
    off_scale = ((ratio[:, 0] - 1).abs() > 4 * eps) | ~torch.isfinite(ratio[:, 0])
    if not bool(bad.any()) and not bool(off_scale.any()):
        return ""
    rows = bad.any(1).nonzero().flatten().tolist()
    keys = bad.any(0).nonzero().flatten().tolist()
    scale_rows = off_scale.nonzero().flatten().tolist()
    return (f"{int(bad.sum())} of {bad.numel()} probabilities wrong: queries {_ranges(rows)}; "
            f"keys {_ranges(keys)}; rows with a wrong scale: {_ranges(scale_rows)}")


def value_probe(attention_fn, dtype, device):
    """One-hot q and k with a large scale make query i see key i % 64 alone, so output row i is V's
    row i % 64: the rows that came out as another V row (which), or as no V row."""
    g = torch.Generator().manual_seed(6)
    eye = torch.eye(64, dtype=torch.float64)
    q = eye[torch.arange(QUERIES) % 64][None, None]
    k = eye[None, None]
    v = torch.randn(1, 1, 64, 128, generator=g, dtype=torch.float64).to(dtype).double()
    got = attention_fn(*(t.to(device=device, dtype=dtype) for t in (q, k, v)), 40.0)[0, 0].double().cpu()
    expected_row = torch.arange(QUERIES) % 64
    distance = (got[:, None, :] - v[0, 0][None, :, :]).abs().amax(-1)  # (query, value row)
    nearest = distance.argmin(-1)
    tolerance = 2 * torch.finfo(dtype).eps * v.abs().max()
    right = (nearest == expected_row) & (distance.gather(1, expected_row[:, None])[:, 0] <= tolerance)
    if bool(right.all()):
        return ""
    wrong = (~right).nonzero().flatten().tolist()
    shown = ", ".join(f"{i}->{int(nearest[i])}" if distance[i, nearest[i]] <= tolerance else f"{i}->none"
                      for i in wrong[:12])
    return (f"{len(wrong)} of {QUERIES} output rows wrong: queries {_ranges(wrong)}; "
            f"query->value row got: {shown}")
