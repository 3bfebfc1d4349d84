"""Linear algebra of flattened tensors for the methods of merge-semantics.md §2.3–§2.12.

* `tensor_label`: names the tensor in error messages when the call carries its name.
* `gram`, `lincomb`: exact Gram matrices of flattened tensors (or of their offsets from a base) and linear
  combinations of them. Methods whose result is a linear combination of their inputs with coefficients that
  depend only on norms and dot products (nuslerp's flattened mode, multislerp, karcher, model_stock) use them
  to split into `reduce` (additive over chunks) and an elementwise `apply`, so they stream tensors of any size.
  These methods run eagerly in every compile mode (`fuse=False`): their apply is a few in-place passes over
  reused buffers, and compiled kernels cost more to load than they saved (multislerp of three 0.86B models:
  34 s compiled, 17.6 s eager; same bytes).

Magnitude orders are taken on |δ| in float32 as mergekit does (§2.0). Ties are broken by element order, the
earlier element counting as the larger (as `_sparsify.top_k_cuts` does for TIES, breadcrumbs and SCE, in
bounded memory), so results are deterministic where mergekit's unstable sorts are not.
"""

from __future__ import annotations

import torch

from mergebot.engine.exact import BLOCK, Sums, partials, partials_of_rows
from mergebot.engine.fuse import scratch

# Elements per slice when accumulating a Gram matrix: few enough slices that the ~20 small per-slice operations
# (block exponents, scales) stay cheap, small enough that the buffers stay near the cache. Three 16M-element bf16
# tensors (two task vectors), best of 7 on this 2-core VM (Sapphire Rapids): 62-71 ms per Gram matrix with 512K,
# 70-82 ms with 256K, 70-76 with 1M, 100-119 with 2M-4M, 119-142 with 64K; whole 0.86B merges, alternated:
# slerp 8.3-10.6 s against 9.4-10.9, model_stock 10.2-11.2 against 11.4-11.8 (the same bytes).
GRAM_BLOCK = 1 << 19
CUDA_GRAM_BLOCK = 1 << 24  # on a GPU: few kernel launches and host syncs per chunk (the sums are the same)


def _gram_block(flats: list[torch.Tensor], dtype: torch.dtype, base: torch.Tensor | None) -> torch.Tensor:
    """Exact partial sums of vᵢ·vⱼ over one slice of GRAM_BLOCK elements or fewer, [pairs, 2, blocks] with the
    squares first and then the cross terms (i < j); vᵢ = flatsᵢ − base when a base is given, products in
    `dtype`. Eager, in reused buffers: the vectors once, each product once, one batched exact sum."""
    k, m = len(flats), flats[0].numel()
    squares_first = [(i, i) for i in range(k)] + [(i, j) for i in range(k) for j in range(i + 1, k)]
    vs = scratch("gram_vectors", k * m, dtype, flats[0].device).view(k, m)
    b = None if base is None else scratch("gram_base", m, dtype, base.device).copy_(base)  # converted once
    for i, f in enumerate(flats):
        vs[i].copy_(f)
        if b is not None:
            vs[i].sub_(b)
    if m % BLOCK:  # a tensor's ragged end: the general form
        return partials([vs[i] * vs[j] for i, j in squares_first], nonneg=[i == j for i, j in squares_first])
    prods = scratch("gram_products", len(squares_first) * m, dtype, flats[0].device).view(-1, m)
    for t, (i, j) in enumerate(squares_first):
        torch.mul(vs[i], vs[j], out=prods[t])
    return partials_of_rows(prods, nonneg_rows=k)


def gram(vectors: list[torch.Tensor], dtype: torch.dtype, base: torch.Tensor | None = None) -> Sums:
    """G[i, j] = ⟨vᵢ, vⱼ⟩ of flattened tensors taken in `dtype` (vᵢ − base for each when a base is given,
    formed block by block): exact sums (mergebot.engine.exact) of the products, so the matrix, and every
    coefficient derived from it, is the same however the tensor is chunked."""
    flats = [v.reshape(-1) for v in vectors]
    flat_base = None if base is None else base.reshape(-1)
    k = len(flats)
    n = flats[0].numel() if flats else 0
    squares_first = [(i, i) for i in range(k)] + [(i, j) for i in range(k) for j in range(i + 1, k)]
    where = {p: m for m, p in enumerate(squares_first)}
    order = torch.tensor([where[(min(i, j), max(i, j))] for i in range(k) for j in range(k)], dtype=torch.long)
    g = Sums(k * k, (k, k))
    step = GRAM_BLOCK if not flats or flats[0].device.type == "cpu" else CUDA_GRAM_BLOCK
    for s in range(0, n, step):
        part = _gram_block([f[s:s + step] for f in flats], dtype,
                           None if flat_base is None else flat_base[s:s + step])
        g.add(part.cpu().index_select(0, order))
    return g


def others_and_base(call) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """A call's non-base inputs and its base (None without one), as stored: `gram` and `lincomb` form the task
    vectors xᵢ − base slice by slice."""
    return [call.xs[i] for i in call.others], None if call.base is None else call.xs[call.base]


def tensor_label(call) -> str:
    """' for tensor NAME' when the executor tells the call its tensor's name (MergeCall.name), else ''."""
    name = getattr(call, "name", None)
    return f" for tensor {name!r}" if name else ""


def lincomb(vectors: list[torch.Tensor], coeffs: list[float], dtype: torch.dtype, base: torch.Tensor | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """Σ cᵢ·vᵢ in `dtype` (flat), with vᵢ = vectorsᵢ − base and base added back at the end when a base is given:
    each product rounded, then added in order (c₀v₀ + c₁v₁ + …, then + base). Eager and in place in reused
    buffers, one pass per operation and no allocation; the result is stored into `out` when given (cast to
    its dtype), else returned as a new tensor."""
    first = vectors[0].reshape(-1)
    acc = scratch("lincomb", first.numel(), dtype, first.device)
    term = scratch("lincomb_term", first.numel(), dtype, first.device)
    flat_base = None if base is None else scratch("lincomb_base", first.numel(), dtype, first.device).copy_(base.reshape(-1))
    for i, (v, c) in enumerate(zip(vectors, coeffs)):
        into = acc if i == 0 else term
        into.copy_(v.reshape(-1))
        if flat_base is not None:
            into.sub_(flat_base)
        into.mul_(c)
        if i:
            acc.add_(term)
    if flat_base is not None:
        acc.add_(flat_base)
    return acc.clone() if out is None else out.copy_(acc)
