"""`linear` (Model Soups, merge-semantics.md §2.1): out = Σ wᵢ·xᵢ [/ Σ wᵢ], accumulated in float32.

Unlike mergekit, Σw = 0 with `normalize` is refused (at validate time when the config decides it, else per
tensor by the planner) instead of writing inf/NaN tensors."""

from __future__ import annotations

import torch

from mergebot.config.methods import SPECS
from mergebot.engine.fuse import enabled, fusable, scratch
from mergebot.engine.methods.base import MergeCall, MergeMethod


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
    divisor = sum(weights) if call.shared["normalize"] else 1.0  # Σw = 0 was refused (config.methods)
    if call.out is not None and not enabled():
        return weighted_sum_into(call.xs, weights, divisor, call.dtype, call.out)
    return weighted_sum(call.xs, weights, divisor, call.dtype, call.out_dtype, out=call.out)


METHOD = MergeMethod.of(SPECS["linear"], apply=_apply, fuse=False)
