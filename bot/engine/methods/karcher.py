"""`karcher` (merge-semantics.md §2.5): the Karcher (Riemannian) mean of the inputs' directions.

Every input is averaged, a configured base included (base policy IGNORED), with αᵢ = 1/N; there are no
weights. nᵢ = ‖xᵢ‖, uᵢ = xᵢ/nᵢ (0 when nᵢ == 0). Inputs with nᵢ > tol are valid and their α is
renormalised (no valid input: the output is 0). m starts at Σ α̃ᵢuᵢ, normalised (the first valid uᵢ if its
norm is < tol); then up to max_iter times T = Σ α̃ᵢ(θᵢ/sin θᵢ)(uᵢ − cᵢm), cᵢ = clamp(⟨m,uᵢ⟩, −1, 1),
θᵢ = acos cᵢ, skipping θᵢ < tol; stop when ‖T‖ < tol; else m ← cos‖T‖·m + sin‖T‖·T/‖T‖, renormalised
when its norm is > tol. out = (Σ_all αᵢnᵢ)·m, so a zero input shrinks the result by (N−1)/N.
A single input is returned as it is.

Two forms, one result up to rounding:
* tensors up to MERGEKIT_FORM_MAX elements (norms, biases, small matrices) run mergekit's own float32
  arithmetic, op for op, on the CPU. Near convergence its float32 noise decides: θ = acos(c) of a float32 c
  near 1 jumps in steps of ~3e-4, and whether ‖T‖ < tol or θ < tol holds flips the iteration count, which
  moves the result by up to ~2e-3 for near-parallel inputs (layernorm weights of fine-tunes of one base: all
  near 1.0). Following its arithmetic is the only way to land on its numbers. It runs on one thread (BLAS
  splits dot products of 8192 elements or more over threads, which moves their last bits), so these bytes do
  not depend on the thread count, and equal mergekit's run on one thread (on more, its own bytes vary);
* larger tensors stream: m and T stay linear combinations of the xᵢ whose coefficients depend only on the
  Gram matrix, so the iteration runs in float64 on N coefficients, `reduce` sums the Gram matrix exactly
  over chunks (mergebot.engine.exact) and `apply` is an elementwise Σ βᵢxᵢ; the same bytes for any chunking, thread count
  or device, within float32 rounding of mergekit except where its float32 convergence test is borderline.
"""

from __future__ import annotations

import math

import torch

from mergebot.config.methods import SPECS
from mergebot.engine.exact import Sums
from mergebot.engine.methods._linalg import gram, lincomb
from mergebot.engine.methods.base import MergeCall, MergeMethod


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


def _reduce(call: MergeCall) -> Sums:
    if len(call.xs) < 2 or (call.xs[0].numel() <= MERGEKIT_FORM_MAX and call.start == 0):
        return Sums(0)
    return gram(call.xs, call.dtype)


MERGEKIT_FORM_MAX = 1 << 15


def mergekit_form(xs: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """The Karcher mean in mergekit 0.1.5's own arithmetic (§2.5): unit vectors and the iterate in the inputs'
    dtype, norms and dot products as float32 (float64 for float64 inputs) torch reductions, scalar tests on
    their rounded values."""
    wide = torch.float64 if xs[0].dtype == torch.float64 else torch.float32
    n_in = len(xs)
    norms = [torch.linalg.vector_norm(x.to(wide)) for x in xs]
    units = [torch.zeros_like(x) if float(nrm) == 0.0 else (x / nrm).to(x.dtype) for x, nrm in zip(xs, norms)]
    valid = [i for i in range(n_in) if float(norms[i]) > tol]
    if not valid:
        return xs[0] * 0
    alphas = [1.0 / n_in] * n_in
    a_sum = sum(alphas[i] for i in valid)
    weights = [alphas[i] / a_sum for i in valid]
    mean = torch.zeros_like(units[valid[0]])
    for w, i in zip(weights, valid):
        mean += w * units[i]
    size = torch.linalg.vector_norm(mean.to(wide))
    mean = units[valid[0]].clone() if float(size) < tol else (mean / size).to(mean.dtype)
    for _ in range(max_iter):
        step = torch.zeros_like(mean)
        for w, i in zip(weights, valid):
            c = torch.clamp(torch.dot(mean.flatten(), units[i].flatten()), -1.0, 1.0)
            theta = torch.arccos(c)
            if float(theta) < tol:
                continue
            step += w * (theta / torch.sin(theta)) * (units[i] - c * mean)
        length = torch.linalg.vector_norm(step.to(wide))
        if float(length) < tol:
            break
        mean = (torch.cos(length) * mean + torch.sin(length) * (step / length)).to(mean.dtype)
        size = torch.linalg.vector_norm(mean.to(wide))
        if float(size) > tol:
            mean = (mean / size).to(mean.dtype)
    return sum(a * nrm for a, nrm in zip(alphas, norms)) * mean


def _apply(call: MergeCall, totals: torch.Tensor | None) -> torch.Tensor:
    if len(call.xs) == 1:
        return call.xs[0].reshape(-1).to(call.dtype)
    n = call.xs[0].numel()
    if n <= MERGEKIT_FORM_MAX and call.start == 0:  # the executor hands such tensors over whole (whole_max)
        xs = [x.reshape(-1).to(call.dtype).cpu() for x in call.xs]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # BLAS splits dot products from 8192 elements on: one order, every machine
        try:
            out = mergekit_form(xs, int(call.shared["max_iter"]), float(call.shared["tol"]))
        finally:
            torch.set_num_threads(threads)
        return out.to(call.xs[0].device)
    g = totals if totals is not None and totals.numel() else gram(call.xs, call.dtype).values()
    beta = coefficients(g, int(call.shared["max_iter"]), float(call.shared["tol"]))
    return lincomb(call.xs, beta, call.dtype, out=call.out)


METHOD = MergeMethod.of(SPECS["karcher"], apply=_apply, reduce=_reduce, whole_max=MERGEKIT_FORM_MAX, fuse=False)
