"""`sce` (merge-semantics.md §2.8): Select, Calculate, Erase — task vectors without per-model weights.

τᵢ = xᵢ − base. If `select_topk` < 1, keep only the k = int(count_nonzero(var)·select_topk) positions of
largest elementwise (population) variance across the τᵢ and zero the rest in every τᵢ (select_topk ≤ 0 keeps
nothing). Matrix weights ωᵢ = mean(τᵢ²)/Σⱼ mean(τⱼ²) (uniform 1/N when that denominator is < 1e-6); erase
mask = the TIES sign election on the unweighted τ (a sum ≥ 0 elects +1; zeros never vote);
out = base + Σ τᵢωᵢmaskᵢ / clamp(Σ ωᵢmaskᵢ, min 1e-6). `int8_mask` has no numerical effect.

With select_topk ≥ 1 the method streams: `reduce` sums Σ τᵢ² and the element count in float64 over chunks,
`apply` is elementwise. The top-k selection is global, so select_topk < 1 needs the whole tensor.
"""

from __future__ import annotations

from typing import Any

import torch

from ._sparsify_more import topk_mask
from .base import MergeCall, MergeMethod, Param

UNIFORM_EPS = 1e-6
DIV_EPS = 1e-6


def _deltas(call: MergeCall) -> tuple[torch.Tensor, list[torch.Tensor]]:
    base = call.xs[call.base].reshape(-1).to(call.dtype)
    return base, [call.xs[i].reshape(-1).to(call.dtype) - base for i in call.others]


def _select(taus: list[torch.Tensor], topk: float) -> list[torch.Tensor]:
    if topk >= 1:
        return taus
    if topk <= 0:
        return [torch.zeros_like(t) for t in taus]
    var = torch.var(torch.stack(taus), dim=0, unbiased=False)
    # count·topk as mergekit evaluates it (an int64 0-d tensor times a Python float: float32), so k matches
    k = int(torch.count_nonzero(var).cpu() * topk)
    keep = topk_mask(var.abs(), k)
    return [torch.where(keep, t, 0.0) for t in taus]


def _sums(taus: list[torch.Tensor]) -> torch.Tensor:
    n = taus[0].numel() if taus else 0
    return torch.stack([t.to(torch.float64).square().sum() for t in taus]
                       + [torch.tensor(float(n), dtype=torch.float64, device=taus[0].device)]).cpu()


def _reduce(call: MergeCall) -> torch.Tensor:
    if not call.others or float(call.shared["select_topk"]) < 1:
        return torch.zeros(0, dtype=torch.float64)
    return _sums(_deltas(call)[1])


def matrix_weights(sums: list[float], numel: float) -> list[float]:
    means = [s / numel if numel else 0.0 for s in sums]
    total = sum(means)
    if total < UNIFORM_EPS:
        return [1.0 / len(means)] * len(means)
    return [m / total for m in means]


def _apply(call: MergeCall, totals: torch.Tensor | None) -> torch.Tensor:
    base, taus = _deltas(call)
    if not taus:
        return base
    topk = float(call.shared["select_topk"])
    taus = _select(taus, topk)
    if totals is None or not totals.numel():
        totals = _sums(taus)
    weights = matrix_weights([float(v) for v in totals[:-1]], float(totals[-1]))
    total = taus[0]
    for t in taus[1:]:
        total = total + t
    sign = torch.where(total >= 0, 1.0, -1.0).to(call.dtype)
    mixed = torch.zeros_like(base)
    div = torch.zeros_like(base)
    for t, w in zip(taus, weights):
        agree = torch.sign(t) == sign
        mixed = mixed + torch.where(agree, t * w, 0.0)
        div = div + torch.where(agree, w, 0.0)
    return base + mixed / div.clamp(min=DIV_EPS)


def _chunkable_for(shared: dict[str, Any], per_input: list[dict[str, Any]]) -> bool:
    return float(shared.get("select_topk", 1.0)) >= 1


METHOD = MergeMethod(
    name="sce",
    pretty="SCE",
    url="https://arxiv.org/abs/2408.07990",
    params=(
        Param("select_topk", float, "shared", 1.0),
        Param("int8_mask", bool, "shared", False),  # no numerical effect (§2.8)
    ),
    base="required",
    apply=_apply,
    reduce=_reduce,
    extra={"chunkable_for": _chunkable_for},
)
