"""`linear` (Model Soups, merge-semantics.md §2.1): out = Σ wᵢ·xᵢ [/ Σ wᵢ], accumulated in float32.

Unlike mergekit, Σw = 0 with `normalize` is refused (at validate time when the config decides it, else per
tensor by the planner) instead of writing inf/NaN tensors."""

from __future__ import annotations

from typing import Any

import torch

from mergebot.errors import ModelError
from mergebot.engine.fuse import enabled, fusable, scratch
from mergebot.engine.methods.base import MergeCall, MergeMethod, Param


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
    divisor = sum(weights) if call.shared["normalize"] else 1.0  # Σw = 0 was refused by `validate` below
    if call.out is not None and not enabled():
        return weighted_sum_into(call.xs, weights, divisor, call.dtype, call.out)
    return weighted_sum(call.xs, weights, divisor, call.dtype, call.out_dtype, out=call.out)


def check_weight_sum(method: str, key: str, shared: dict[str, Any], weights: list[Any], where: str) -> None:
    """Normalising by Σw = 0 writes inf/NaN tensors (mergekit has no guard, §2.1): refuse it before anything is
    written. A weight of None (at validate time: it depends on a filter) means "not known": nothing to check."""
    if shared.get(key) is not True or not weights or any(w is None for w in weights):
        return
    total = sum(float(w) for w in weights)
    if abs(total) < 1e-8:
        raise ModelError(f"{method}{where}: the weights ({', '.join(f'{float(w):g}' for w in weights)}) sum to "
                         f"{total:g} and {key}: true divides by that sum; use weights that do not cancel, or set "
                         f"{key}: false")


def validate(name: str, shared: dict[str, Any], per_input: list[dict[str, Any]],
             models: list[str] | None = None) -> None:
    """Plan-time check of one tensor's resolved parameters (extra["validate"])."""
    check_weight_sum("linear", "normalize", shared, [p.get("weight") for p in per_input],
                     f" (tensor {name!r})" if name else "")


METHOD = MergeMethod(
    name="linear",
    pretty="Linear",
    url="https://arxiv.org/abs/2203.05482",
    params=(Param("weight", float, "input"), Param("normalize", bool, "shared", True)),
    base="ignored",
    apply=_apply,
    fuse=False,
    extra={"validate": validate},
)
