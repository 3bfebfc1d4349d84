"""`linear` (Model Soups, merge-semantics.md §2.1): out = Σ wᵢ·xᵢ [/ Σ wᵢ], accumulated in float32."""

from __future__ import annotations

import torch

from ..fuse import enabled, fusable, scratch
from .base import MergeCall, MergeMethod, Param


@fusable
def weighted_sum(xs: list[torch.Tensor], weights: list[float], divisor: float, dtype: torch.dtype,
                 out_dtype: torch.dtype) -> torch.Tensor:
    """(Σ wᵢ·xᵢ) / divisor in `dtype`, cast to out_dtype; one fused loop when compiled."""
    out = xs[0].to(dtype) * weights[0]
    for x, w in zip(xs[1:], weights[1:]):
        out = out + x.to(dtype) * w
    return (out / divisor).to(out_dtype)


def weighted_sum_into(xs: list[torch.Tensor], weights: list[float], divisor: float, dtype: torch.dtype,
                      out: torch.Tensor) -> torch.Tensor:
    """The same sum, eager and in place in a reused buffer: one read of each input, no allocation."""
    acc = scratch("linear", out.numel(), dtype, out.device)
    acc.copy_(xs[0].reshape(-1)).mul_(weights[0])
    for x, w in zip(xs[1:], weights[1:]):
        acc.add_(x.reshape(-1), alpha=w)
    if divisor != 1.0:
        acc.div_(divisor)
    return out.copy_(acc)


def _apply(call: MergeCall, totals: torch.Tensor | None) -> torch.Tensor:
    weights = [float(p["weight"]) for p in call.per_input]
    divisor = sum(weights) if call.shared["normalize"] else 1.0  # no guard for Σw = 0, as in §2.1
    if call.out is not None and not enabled():
        return weighted_sum_into(call.xs, weights, divisor, call.dtype, call.out)
    return weighted_sum(call.xs, weights, divisor, call.dtype, call.out_dtype, out=call.out)


METHOD = MergeMethod(
    name="linear",
    pretty="Linear",
    url="https://arxiv.org/abs/2203.05482",
    params=(Param("weight", float, "input"), Param("normalize", bool, "shared", True)),
    base="ignored",
    apply=_apply,
    fuse=False,
)
