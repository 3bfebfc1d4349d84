"""Whole-tensor helpers for the methods of issue 3 (merge-semantics.md §2.3–§2.12).

* `outlier_mask`: breadcrumbs' `magnitude_outliers` sparsifier (§2.7).
* `della_keep`: DELLA's `della_magprune` sparsifier (§2.7), drawn from the hash RNG (bot.rng).
* `l1_rescale`: the L1 rescale every sparsifier uses when `rescale: true` (§2.7, not the paper's 1/p).
* `topk_mask`: exactly k largest entries (SCE's variance selection, §2.8).
* `tensor_label`: names the tensor in error messages when the call carries its name.
* `gram64`, `lincomb`: float64 Gram matrices of flattened tensors and linear combinations of them. Methods
  whose result is a linear combination of their inputs with coefficients that depend only on norms and dot
  products (nuslerp's flattened mode, multislerp, karcher, model_stock) use them to split into `reduce`
  (additive over chunks) and an elementwise `apply`, so they stream tensors of any size.

Magnitude orders are taken on |δ| in float32 as mergekit does (§2.0). Ties are broken by element order, the
earlier element counting as the larger (as `_sparsify.magnitude_cut` does for TIES), so results are
deterministic where mergekit's unstable sorts are not.
"""

from __future__ import annotations

import torch

from .. import rng

RESCALE_EPS = 1e-7
GRAM_BLOCK = 1 << 20  # elements per float64 block when accumulating a Gram matrix


def outlier_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor | None:
    """magnitude_outliers (§2.7, 0.1.5): drop the n_top largest and the n_bot smallest |δ|.

    target = int(density·n), n_top = int(gamma·n), n_bot = max(0, n − target − n_top); ascending sort by
    |δ|, keep sorted positions [n_bot, n_bot + target). None means keep everything (density ≥ 1).
    (The 0.1.4 bug `[n_bot:-n_top]`, which kept nothing when int(gamma·n) == 0, is not reproduced.)
    """
    if density >= 1:
        return None
    flat = delta.reshape(-1)
    n = flat.numel()
    target = max(0, int(density * n))
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    keep = torch.zeros(n, dtype=torch.bool, device=flat.device)
    if target > 0:
        # ascending positions [n_bot, n_bot + target) are descending positions [skip, skip + target)
        skip = n - n_bot - target
        order = torch.sort(flat.abs().float(), descending=True, stable=True).indices
        keep[order[skip:skip + target]] = True
    return keep


def della_probabilities(delta: torch.Tensor, shape: tuple[int, ...], density: float, epsilon: float) -> torch.Tensor:
    """Per-element keep probabilities of della_magprune (§2.7), float64, flat.

    Rows are along dim 1 of the real shape (a 1-D tensor is one row): ranks 0..n−1 of |δ| ascending,
    r̂ = rank/(n−1), p = (density − ε) + r̂·2·ε. A row of a single element (0/0 in mergekit) gets r̂ = ½,
    i.e. p = density.
    """
    x = delta.reshape(shape) if len(shape) >= 2 else delta.reshape(1, -1)
    x = x.movedim(1, -1)  # rank along dim 1 (the last dim of a matrix)
    n = x.shape[-1]
    order = torch.sort(x.abs().float(), dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)  # ascending rank: n − 1 − position in the descending order
    ranks.scatter_(-1, order, torch.arange(n - 1, -1, -1, device=order.device).expand_as(order))
    if n > 1:
        rhat = ranks.to(torch.float64) / (n - 1)
    else:
        rhat = torch.full(ranks.shape, 0.5, dtype=torch.float64, device=ranks.device)
    p = (density - epsilon) + rhat * 2 * epsilon
    return p.movedim(-1, 1).reshape(-1)


def della_keep(delta: torch.Tensor, shape: tuple[int, ...], density: float, epsilon: float, key: int,
               start: int = 0) -> torch.Tensor:
    """Bernoulli(p) keep mask of della_magprune, p per element, drawn from the hash stream `key`."""
    p = della_probabilities(delta, shape, density, epsilon)
    idx = torch.arange(p.numel(), dtype=torch.int64, device=p.device) + start
    return rng.hash_u32(idx, key) < (p * 4294967296.0).long()


def l1_rescale(delta: torch.Tensor, keep: torch.Tensor, rescale: bool) -> torch.Tensor:
    """δ⊙keep, times ‖δ‖₁/‖δ⊙keep‖₁ when `rescale` and both norms are ≥ 1e-7 (§2.7)."""
    masked = torch.where(keep, delta, 0.0)
    if not rescale:
        return masked
    before = float(delta.abs().sum(dtype=torch.float64))
    after = float(masked.abs().sum(dtype=torch.float64))
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return masked
    return masked * (before / after)


def topk_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly the k largest entries of `values` (flat bool); ties at the k-th value go to earlier elements."""
    flat = values.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=flat.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=flat.device)
    order = torch.sort(flat, descending=True, stable=True).indices
    keep = torch.zeros(n, dtype=torch.bool, device=flat.device)
    keep[order[:k]] = True
    return keep


def gram64(vectors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """G[i, j] = ⟨vᵢ, vⱼ⟩ of flattened tensors, each taken in `dtype` and accumulated in float64 (CPU)."""
    flats = [v.reshape(-1) for v in vectors]
    k = len(flats)
    n = flats[0].numel() if flats else 0
    g = torch.zeros(k, k, dtype=torch.float64, device=flats[0].device if flats else "cpu")
    for s in range(0, n, GRAM_BLOCK):
        block = torch.stack([f[s:s + GRAM_BLOCK].to(dtype).to(torch.float64) for f in flats])
        g += block @ block.T
    return g.cpu()


def tensor_label(call) -> str:
    """' for tensor NAME' when the executor tells the call its tensor's name (MergeCall.name), else ''."""
    name = getattr(call, "name", None)
    return f" for tensor {name!r}" if name else ""


def lincomb(vectors: list[torch.Tensor], coeffs: list[float], dtype: torch.dtype) -> torch.Tensor:
    """Σ cᵢ·vᵢ in `dtype` (flat)."""
    out = vectors[0].reshape(-1).to(dtype) * coeffs[0]
    for v, c in zip(vectors[1:], coeffs[1:]):
        out = out + v.reshape(-1).to(dtype) * c
    return out
