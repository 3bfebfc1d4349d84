"""Whole-tensor helpers for the methods of issue 3 (merge-semantics.md §2.3–§2.12).

* `della_keep`: DELLA's `della_magprune` sparsifier (§2.7), drawn from the hash RNG (mergebot.engine.rng).
* `tensor_label`: names the tensor in error messages when the call carries its name.
* `gram`, `lincomb`: exact Gram matrices of flattened tensors and linear combinations of them. Methods
  whose result is a linear combination of their inputs with coefficients that depend only on norms and dot
  products (nuslerp's flattened mode, multislerp, karcher, model_stock) use them to split into `reduce`
  (additive over chunks) and an elementwise `apply`, so they stream tensors of any size.

Magnitude orders are taken on |δ| in float32 as mergekit does (§2.0). Ties are broken by element order, the
earlier element counting as the larger (as `_sparsify.top_k_cuts` does for TIES, breadcrumbs and SCE, in
bounded memory), so results are deterministic where mergekit's unstable sorts are not.
"""

from __future__ import annotations

import torch

from mergebot.engine import rng
from mergebot.engine.exact import Sums, partials
from mergebot.engine.fuse import fusable

GRAM_BLOCK = 1 << 20  # elements per float64 block when accumulating a Gram matrix


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
    # ascending rank (n − 1 − position in the descending order), exact in float64; then in place (fewer
    # buffers per element: della.py calls this block by block) r̂ = rank/(n−1) and p = (density − ε) + r̂·2·ε
    p = torch.empty(order.shape, dtype=torch.float64, device=order.device)
    p.scatter_(-1, order, torch.arange(n - 1, -1, -1, dtype=torch.float64, device=order.device).expand_as(order))
    del order
    if n > 1:
        p.div_(n - 1)
    else:
        p.fill_(0.5)
    p.mul_(2).mul_(epsilon).add_(density - epsilon)
    return p.movedim(-1, 1).reshape(-1)


def della_keep(delta: torch.Tensor, shape: tuple[int, ...], density: float, epsilon: float, key: int,
               start: int = 0) -> torch.Tensor:
    """Bernoulli(p) keep mask of della_magprune, p per element, drawn from the hash stream `key` for elements
    start.. of the flattened tensor: `hash_u32(start + j, key) < ⌊p·2³²⌋`, computed in int32 lanes (rng.keep32,
    the same bits, ~3× faster: DELLA with rescale draws every mask twice, see della.py)."""
    thr = della_probabilities(delta, shape, density, epsilon).mul_(4294967296.0).long()
    n = thr.numel()
    # the int64 form where the block crosses a 2³² index boundary, or where p may round up to 1 (thr = 2³²
    # does not fit keep32's int32 cut; the checked ε keeps p < 1 up to rounding)
    if (start & rng.M32) + n > 1 << 32 or density + epsilon > 1 - 1e-9:
        return rng.hash_u32(torch.arange(n, dtype=torch.int64, device=thr.device) + start, key) < thr
    s = rng.Stream32.of(key, start, n, 0)
    cut = thr.sub_(1 << 31).to(torch.int32)  # keep32 compares unsigned values as signed ones
    del thr
    return rng.keep32(torch.arange(n, dtype=torch.int32, device=cut.device), s.lo, s.key, s.hi, cut)


@fusable
def _gram_partials(flats: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Exact partial sums of vᵢ·vⱼ (i ≤ j, row-major) over one aligned block, products in `dtype`."""
    vs = [f.to(dtype) for f in flats]
    return partials([vs[i] * vs[j] for i in range(len(vs)) for j in range(i, len(vs))])


def gram(vectors: list[torch.Tensor], dtype: torch.dtype) -> Sums:
    """G[i, j] = ⟨vᵢ, vⱼ⟩ of flattened tensors taken in `dtype`: exact sums (mergebot.engine.exact) of the products, so
    the matrix, and every coefficient derived from it, is the same however the tensor is chunked."""
    flats = [v.reshape(-1) for v in vectors]
    k = len(flats)
    n = flats[0].numel() if flats else 0
    upper = [(i, j) for i in range(k) for j in range(i, k)]
    where = {p: m for m, p in enumerate(upper)}
    order = torch.tensor([where[(min(i, j), max(i, j))] for i in range(k) for j in range(k)], dtype=torch.long)
    g = Sums(k * k, (k, k))
    for s in range(0, n, GRAM_BLOCK):
        g.add(_gram_partials([f[s:s + GRAM_BLOCK] for f in flats], dtype).cpu().index_select(0, order))
    return g


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
