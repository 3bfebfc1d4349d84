"""`multislerp` (merge-semantics.md §2.4): barycentric interpolation of N models on the hypersphere.

vᵢ = xᵢ (or xᵢ − base with a base), flattened; w ← w/Σw if `normalize_weights`; nᵢ = ‖vᵢ‖,
uᵢ = vᵢ/(nᵢ+eps), m = Σ wᵢuᵢ. If ‖m‖ < eps: two inputs fall back to w₁v₁ + w₂v₂, more are an error.
Else m̂ = m/‖m‖, tangents τᵢ = uᵢ − ⟨uᵢ,m̂⟩m̂, T = Σ wᵢτᵢ, r = ‖T‖ + eps and
out = (m̂ cos r + T sin r / r)·Σ wᵢnᵢ (+ base). A single non-base input is returned as it is.

Every vector above is a linear combination of the vᵢ, with coefficients that depend only on their Gram
matrix. So `reduce` sums the Gram matrix in float64 over chunks, the coefficients are computed once in
float64, and `apply` is an elementwise Σ βᵢvᵢ: the method streams tensors of any size, and its math is
more accurate than mergekit's input-dtype computation (equal within float32 rounding on float32 inputs).
"""

from __future__ import annotations

import math

import torch

from mergebot.config.methods import SPECS
from mergebot.engine.exact import Sums
from mergebot.engine.methods._linalg import gram, lincomb, others_and_base, tensor_label
from mergebot.engine.methods.base import MergeCall, MergeMethod
from mergebot.errors import ModelError


def _reduce(call: MergeCall) -> Sums:
    if len(call.others) < 2:
        return Sums(0)
    xs, base = others_and_base(call)
    return gram(xs, call.dtype, base)


def coefficients(g: torch.Tensor, weights: list[float], normalize: bool, eps: float) -> list[float] | None:
    """β with out − base = Σ βᵢvᵢ, from the float64 Gram matrix of the vᵢ (§2.4); None: no mean direction."""
    w = torch.tensor(weights, dtype=torch.float64)
    if normalize:
        w = w / w.sum()
    norms = torch.diagonal(g).clamp(min=0).sqrt()
    inv = 1.0 / (norms + eps)  # uᵢ = vᵢ·invᵢ
    mu = w * inv  # m = Σ μᵢvᵢ
    m_norm = math.sqrt(max(float(mu @ g @ mu), 0.0))
    if m_norm < eps:
        if len(weights) == 2:
            return [float(w[0]), float(w[1])]
        return None
    mu = mu / m_norm  # m̂
    dots = inv * (g @ mu)  # ⟨uᵢ, m̂⟩
    gamma = w * inv - (w * dots).sum() * mu  # T = Σ wᵢ(uᵢ − ⟨uᵢ,m̂⟩m̂)
    r = math.sqrt(max(float(gamma @ g @ gamma), 0.0)) + eps
    scale = float((w * norms).sum())
    beta = (mu * math.cos(r) + gamma * (math.sin(r) / r)) * scale
    return [float(b) for b in beta]


def _apply(call: MergeCall, totals: torch.Tensor | None) -> torch.Tensor:
    if len(call.others) == 1:
        return call.xs[call.others[0]].reshape(-1).to(call.dtype)
    xs, base = others_and_base(call)
    g = totals if totals is not None and totals.numel() else gram(xs, call.dtype, base).values()
    weights = [float(call.per_input[i]["weight"]) for i in call.others]
    beta = coefficients(g, weights, bool(call.shared["normalize_weights"]), float(call.shared["eps"]))
    if beta is None:
        raise ModelError(f"multislerp{tensor_label(call)}: the weighted sum of the {len(weights)} input directions is "
                         "zero (antipodal inputs whose weights balance out); change the weights")
    return lincomb(xs, beta, call.dtype, base, call.out)


METHOD = MergeMethod.of(SPECS["multislerp"], apply=_apply, reduce=_reduce, fuse=False)
