"""`karcher` (merge-semantics.md §2.5): the Karcher (Riemannian) mean of the inputs' directions.

Every input is averaged, a configured base included (base policy IGNORED), with αᵢ = 1/N; there are no
weights. nᵢ = ‖xᵢ‖, uᵢ = xᵢ/nᵢ (0 when nᵢ == 0). Inputs with nᵢ > tol are valid and their α is
renormalised (no valid input: the output is 0). m starts at Σ α̃ᵢuᵢ, normalised (the first valid uᵢ if its
norm is < tol); then up to max_iter times T = Σ α̃ᵢ(θᵢ/sin θᵢ)(uᵢ − cᵢm), cᵢ = clamp(⟨m,uᵢ⟩, −1, 1),
θᵢ = acos cᵢ, skipping θᵢ < tol; stop when ‖T‖ < tol; else m ← cos‖T‖·m + sin‖T‖·T/‖T‖, renormalised
when its norm is > tol. out = (Σ_all αᵢnᵢ)·m, so a zero input shrinks the result by (N−1)/N.
A single input is returned as it is.

m and T stay linear combinations of the xᵢ whose coefficients depend only on the Gram matrix, so the
iteration runs in float64 on N coefficients: `reduce` sums the Gram matrix over chunks and `apply` is an
elementwise Σ βᵢxᵢ. Tensors of any size stream; the math is float64 where mergekit keeps unit vectors in
the input dtype (results equal within float32 rounding on float32 inputs).
"""

from __future__ import annotations

import math

import torch

from ._sparsify_more import gram64, lincomb
from .base import MergeCall, MergeMethod, Param


def coefficients(g: torch.Tensor, max_iter: int, tol: float) -> list[float]:
    """β with out = Σ βᵢxᵢ, from the float64 Gram matrix of the inputs (§2.5)."""
    n_in = g.shape[0]
    norms = [math.sqrt(max(float(g[i, i]), 0.0)) for i in range(n_in)]
    alphas = [1.0 / n_in] * n_in
    valid = [i for i in range(n_in) if norms[i] > tol]
    if not valid:
        return [0.0] * n_in
    a_sum = sum(alphas[i] for i in valid)
    a_tilde = {i: alphas[i] / a_sum for i in valid}

    def unit(i: int) -> torch.Tensor:
        e = torch.zeros(n_in, dtype=torch.float64)
        e[i] = 1.0 / norms[i]
        return e

    def norm(c: torch.Tensor) -> float:
        return math.sqrt(max(float(c @ g @ c), 0.0))

    units = {i: unit(i) for i in valid}
    m = sum((a_tilde[i] * units[i] for i in valid), torch.zeros(n_in, dtype=torch.float64))
    m_norm = norm(m)
    m = units[valid[0]].clone() if m_norm < tol else m / m_norm
    for _ in range(max_iter):
        tangent = torch.zeros(n_in, dtype=torch.float64)
        gm = g @ m
        for i in valid:
            c = max(-1.0, min(1.0, float(units[i] @ gm)))
            theta = math.acos(c)
            if theta < tol:
                continue
            tangent = tangent + a_tilde[i] * (theta / math.sin(theta)) * (units[i] - c * m)
        t_norm = norm(tangent)
        if t_norm < tol:
            break
        m = math.cos(t_norm) * m + math.sin(t_norm) * (tangent / t_norm)
        m_norm = norm(m)
        if m_norm > tol:
            m = m / m_norm
    scale = sum(a * n for a, n in zip(alphas, norms))
    return [float(v) * scale for v in m]


def _reduce(call: MergeCall) -> torch.Tensor:
    if len(call.xs) < 2:
        return torch.zeros(0, dtype=torch.float64)
    return gram64(call.xs, call.dtype)


def _apply(call: MergeCall, totals: torch.Tensor | None) -> torch.Tensor:
    if len(call.xs) == 1:
        return call.xs[0].reshape(-1).to(call.dtype)
    g = totals if totals is not None and totals.numel() else gram64(call.xs, call.dtype)
    beta = coefficients(g, int(call.shared["max_iter"]), float(call.shared["tol"]))
    return lincomb(call.xs, beta, call.dtype)


METHOD = MergeMethod(
    name="karcher",
    pretty="Karcher Mean",
    url="https://arxiv.org/abs/2603.04972",
    params=(Param("max_iter", int, "shared", 10), Param("tol", float, "shared", 1e-5)),
    base="ignored",
    apply=_apply,
    reduce=_reduce,
    min_inputs=1,
)
