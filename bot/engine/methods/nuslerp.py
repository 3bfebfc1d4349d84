"""`nuslerp` (merge-semantics.md §2.3): slerp of two models by relative weight, optionally of task vectors.

t = w₂/(w₁+w₂) over the two non-base inputs in config order (t = ½ when |w₁+w₂| < 1e-6). Without a base
out = S(t, x₁, x₂); with one out = base + S(t, x₁−base, x₂−base). S interpolates spherically with
unit vectors normalised by max(‖v‖, 1e-7), c = clamp(⟨û₀,û₁⟩, −1, 1), and falls back to (1−t)v₀ + t v₁
where 1 − c² ≤ (1e-8)² (0.1.5's colinear test). That bound is below float resolution, so it holds only when
c is exactly ±1; c is computed here as ⟨v₀,v₁⟩/√(‖v₀‖²‖v₁‖²) in float64, which is exactly ±1 for exactly
parallel or antipodal inputs. (mergekit's float32 c lands on ±1 or one ulp inside it depending on summation
rounding; for exactly antipodal inputs it then gives either the lerp or the slerp formula's limit, e.g.
≈0.31·v₀ instead of 0.2·v₀ at t = 0.4. mergebot always gives the documented lerp there.)

Vectors are, by mode:
* `nuslerp_flatten: true` (default): the whole flattened tensor. Norms and the dot product are summed in
  exactly by `reduce` (mergebot.engine.exact, additive over chunks), so the method streams tensors of any size;
* otherwise rows `W[i, :]` (along the last dim) when `nuslerp_row_wise: false`, and columns `W[:, j]`
  (along dim 0) when `nuslerp_row_wise: true`. The naming is inverted with respect to mergekit's docs;
  this is what its code does (§2.3). These modes need whole vectors (not chunkable): the method gets the whole
  tensor and walks it in blocks of whole dim-0 slices (`_rows`). Rows lie inside a block, so each block is
  merged on its own; columns cross every block, so a first pass sums their float64 norms and dot products
  over the blocks, and a second applies the coefficients. Memory stays near one block either way.
"""

from __future__ import annotations

from typing import Any

import torch

from mergebot.config.methods import SPECS
from mergebot.engine.exact import Sums
from mergebot.engine.methods._linalg import gram, lincomb, others_and_base
from mergebot.engine.methods._rows import map_rows, row_blocks
from mergebot.engine.methods.base import MergeCall, MergeMethod

EPS = 1e-8
NORM_EPS = 1e-7


def interpolation_t(w1: float, w2: float) -> float:
    s = w1 + w2
    return 0.5 if abs(s) < 1e-6 else w2 / s


def _vectors(call: MergeCall, xs: list[torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """v0, v1 (task vectors when there is a base) and the base, flat in the compute dtype, of `xs` (flat
    slices of the inputs, by default the whole call)."""
    xs = [x.reshape(-1) for x in call.xs] if xs is None else xs
    i1, i2 = call.others
    v0 = xs[i1].to(call.dtype)
    v1 = xs[i2].to(call.dtype)
    base = None
    if call.base is not None:
        base = xs[call.base].to(call.dtype)
        v0, v1 = v0 - base, v1 - base
    return v0, v1, base


def _t(call: MergeCall) -> float:
    i1, i2 = call.others
    return interpolation_t(float(call.per_input[i1]["weight"]), float(call.per_input[i2]["weight"]))


def coefficients(t: float, aa: torch.Tensor, bb: torch.Tensor, ab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c0, c1) with S = c0·v0 + c1·v1, from float64 sums ‖v0‖², ‖v1‖², ⟨v0,v1⟩ (any broadcastable shape)."""
    na, nb = aa.sqrt(), bb.sqrt()
    tiny = (na < NORM_EPS) | (nb < NORM_EPS)
    # √(‖v0‖²‖v1‖²) rather than ‖v0‖·‖v1‖: exactly (anti)parallel inputs then give c = ±1 exactly, so the
    # colinear test (1 − c² ≤ 1e-16, below float resolution) catches them instead of dividing by sin θ ≈ 0.
    denom = torch.where(tiny, na.clamp(min=NORM_EPS) * nb.clamp(min=NORM_EPS), (aa * bb).sqrt())
    c = (ab / denom).clamp(-1.0, 1.0)
    colinear = 1.0 - c * c <= EPS * EPS
    theta = torch.acos(c)
    s = torch.sin(theta)
    safe = torch.where(colinear, 1.0, s)
    c0 = torch.where(colinear, 1.0 - t, torch.sin((1.0 - t) * theta) / safe)
    c1 = torch.where(colinear, torch.full_like(c, t), torch.sin(t * theta) / safe)
    return c0, c1


def _reduce(call: MergeCall) -> Sums:
    """Flattened mode: the Gram matrix [[‖v0‖², ⟨v0,v1⟩], [⟨v0,v1⟩, ‖v1‖²]], exact."""
    if not call.shared["nuslerp_flatten"]:
        return Sums(0)
    xs, base = others_and_base(call)
    return gram(xs, call.dtype, base)


def _apply(call: MergeCall, totals: torch.Tensor | None) -> torch.Tensor:
    t = _t(call)
    if not call.shared["nuslerp_flatten"] and len(call.shape) >= 2:
        return _apply_vectors(call, t)
    xs, base = others_and_base(call)
    g = totals if totals is not None and totals.numel() else gram(xs, call.dtype, base).values()
    c0, c1 = coefficients(t, g[0, 0], g[1, 1], g[0, 1])
    return lincomb(xs, [float(c0), float(c1)], call.dtype, base, call.out)  # c0·v0 + c1·v1 (+ base)


def _sums(a: torch.Tensor, b: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 ‖a‖², ‖b‖², ⟨a,b⟩ along `dim` (kept)."""
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    return ((a64 * a64).sum(dim, keepdim=True), (b64 * b64).sum(dim, keepdim=True),
            (a64 * b64).sum(dim, keepdim=True))


def _apply_vectors(call: MergeCall, t: float) -> torch.Tensor:
    """Non-flattened modes, block by block of whole dim-0 slices: rows (along the last dim) are merged per
    block; columns (along dim 0, `nuslerp_row_wise`) need their sums over every block first."""
    columns = bool(call.shared["nuslerp_row_wise"])
    if columns:
        totals: tuple[torch.Tensor, ...] | None = None
        xs = [x.reshape(-1) for x in call.xs]
        for s, e, shape in row_blocks(call.shape, xs[0].numel(), xs[0].device):
            v0, v1, _ = _vectors(call, [x[s:e] for x in xs])
            part = _sums(v0.reshape(shape), v1.reshape(shape), 0)
            totals = part if totals is None else tuple(x + y for x, y in zip(totals, part))
        assert totals is not None  # a tensor has at least one row block
        c0, c1 = coefficients(t, *totals)
        c0, c1 = c0.to(call.dtype), c1.to(call.dtype)

    def block(xs: list[torch.Tensor], shape: tuple[int, ...], s: int) -> torch.Tensor:
        v0, v1, base = _vectors(call, xs)
        a, b = v0.reshape(shape), v1.reshape(shape)
        if columns:
            out = a * c0 + b * c1
        else:
            r0, r1 = coefficients(t, *_sums(a, b, -1))
            out = a * r0.to(call.dtype) + b * r1.to(call.dtype)
        out = out.reshape(-1)
        return out if base is None else base + out

    return map_rows(call, block)


def _chunkable_for(shared: dict[str, Any], per_input: list[dict[str, Any]]) -> bool:
    return bool(shared.get("nuslerp_flatten", True))


METHOD = MergeMethod.of(SPECS["nuslerp"], apply=_apply, reduce=_reduce, chunkable_when=_chunkable_for, fuse=False)
