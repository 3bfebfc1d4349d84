"""Sparsifiers of the task-arithmetic family (merge-semantics.md §2.7), on one task vector δ.

All return a float mask-applied δ (never in place on the caller's tensor unless said so).
"""

from __future__ import annotations

import torch


def magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = max(1, int(density·n)) entries of largest |δ| (whole tensor)."""
    if density >= 1:
        return delta
    n = delta.numel()
    if density <= 0 or n == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * n))
    flat = delta.reshape(-1)
    keep = torch.topk(flat.abs().float(), k, largest=True, sorted=False).indices
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(delta.shape)


def bernoulli_keep(uniform: torch.Tensor, density: float) -> torch.Tensor:
    """DARE mask: keep an entry with probability `density` (uniform < density)."""
    return uniform < density
