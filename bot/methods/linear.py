"""`linear` (Model Soups, merge-semantics.md §2.1): out = Σ wᵢ·xᵢ [/ Σ wᵢ], accumulated in float32."""

from __future__ import annotations

import torch

from .base import MergeCall, MergeMethod, Param


def weighted_sum(xs: list[torch.Tensor], weights: list[float], dtype: torch.dtype) -> torch.Tensor:
    """Σ wᵢ·xᵢ in `dtype`, one fused multiply-add per input, without converting whole inputs first."""
    out = torch.empty(xs[0].shape, dtype=dtype, device=xs[0].device)
    torch.mul(xs[0], weights[0], out=out)
    for x, w in zip(xs[1:], weights[1:]):
        out.add_(x, alpha=w)
    return out


def _apply(call: MergeCall, totals: torch.Tensor | None) -> torch.Tensor:
    weights = [float(p["weight"]) for p in call.per_input]
    out = weighted_sum(call.xs, weights, call.dtype)
    if call.shared["normalize"]:
        out.div_(sum(weights))  # no guard for Σw = 0, as in §2.1
    return out


METHOD = MergeMethod(
    name="linear",
    pretty="Linear",
    url="https://arxiv.org/abs/2203.05482",
    params=(Param("weight", float, "input"), Param("normalize", bool, "shared", True)),
    base="ignored",
    apply=_apply,
)
