"""Sparsifiers of the task-arithmetic family (merge-semantics.md §2.7) that need a whole tensor.

The random (DARE) sparsifier needs no helper here: its mask is a hash of the element index, computed
inside the fused kernel (bot.rng).
"""

from __future__ import annotations

import torch


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor | None:
    """Keep exactly k = max(1, int(density·n)) entries of largest |δ| (None: keep everything).

    Ties at the k-th magnitude (common with bf16 checkpoints, whose deltas repeat) are broken by
    element order, so the count is exactly k as in mergekit, and the choice is deterministic.
    """
    if density >= 1:
        return None
    flat = delta.reshape(-1)
    n = flat.numel()
    if density <= 0 or n == 0:
        return torch.zeros(delta.shape, dtype=torch.bool, device=delta.device)
    k = max(1, int(density * n))
    mag = flat.abs().float()
    kth = torch.topk(mag, k, largest=True, sorted=False).values.min()
    keep = mag > kth
    short = k - int(keep.sum())
    if short > 0:
        ties = torch.nonzero(mag == kth).flatten()[:short]
        keep[ties] = True
    return keep.reshape(delta.shape)
