"""Linear algebra of flattened tensors for the methods of merge-semantics.md §2.3–§2.12.

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

from mergebot.engine.exact import Sums, partials
from mergebot.engine.fuse import fusable

GRAM_BLOCK = 1 << 20  # elements per float64 block when accumulating a Gram matrix


@fusable
def _gram_partials(flats: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Exact partial sums of vᵢ·vⱼ (i ≤ j, row-major) over one aligned block, products in `dtype`."""
    vs = [f.to(dtype) for f in flats]
    pairs = [(i, j) for i in range(len(vs)) for j in range(i, len(vs))]
    return partials([vs[i] * vs[j] for i, j in pairs], nonneg=[i == j for i, j in pairs])


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
