"""`breadcrumbs` and `breadcrumbs_ties` (merge-semantics.md §2.7): task arithmetic with outlier pruning.

Presets of the generalised task-arithmetic family, sharing its tail (`task_arithmetic._combine`: weighted
deltas, optional TIES sign election, normalisation, λ). Each δᵢ = xᵢ − base is sparsified by
`magnitude_outliers` (`_sparsify_more.outlier_mask`): with target = int(densityᵢ·n) and
n_top = int(gammaᵢ·n), the n_top largest |δ| and the n − target − n_top smallest are dropped (fewer top
outliers when gamma is too large). 0.1.5 semantics: a tensor with fewer than 1/gamma elements
(int(gamma·n) == 0) keeps its `target` largest entries; 0.1.4's bug zeroed it.
`rescale: true` multiplies each pruned δᵢ by ‖δᵢ‖₁/‖δᵢ⊙maskᵢ‖₁.

| name | consensus | normalize | rescale |
|---|---|---|---|
| breadcrumbs | none | false | false |
| breadcrumbs_ties | sum | false | false |

The outlier order is global over the tensor, so a tensor is chunked only when nothing is pruned.
"""

from __future__ import annotations

from typing import Any

import torch

from ._sparsify_more import l1_rescale, outlier_mask
from .base import MergeCall, MergeMethod, Param
from .task_arithmetic import _combine, family_params


def _make_apply(consensus: bool):
    def apply(call: MergeCall, totals: torch.Tensor | None) -> torch.Tensor:
        b = call.xs[call.base].reshape(-1).to(call.dtype)
        others = call.others
        if not others:
            return b
        rescale = bool(call.shared["rescale"])
        deltas, weights = [], []
        for i in others:
            p = call.per_input[i]
            d = call.xs[i].reshape(-1).to(call.dtype) - b
            keep = outlier_mask(d, float(p["density"]), float(p["gamma"]))
            deltas.append(d if keep is None else l1_rescale(d, keep, rescale))
            weights.append(float(p["weight"]))
        return _combine(b, deltas, weights, consensus, bool(call.shared["normalize"]), float(call.shared["lambda"]),
                        call.dtype)
    return apply


def _chunkable_for(shared: dict[str, Any], per_input: list[dict[str, Any]]) -> bool:
    return all(float(p["density"]) >= 1 for p in per_input if "density" in p)


def _method(name: str, pretty: str, consensus: bool) -> MergeMethod:
    return MergeMethod(
        name=name,
        pretty=pretty,
        url="https://arxiv.org/abs/2312.06795",
        params=family_params(False, False, Param("gamma", float, "non_base", 0.01)),
        base="required",
        apply=_make_apply(consensus),
        extra={"chunkable_for": _chunkable_for, "sparsifier": "magnitude_outliers",
               "consensus": "sum" if consensus else None},
    )


METHODS = [
    _method("breadcrumbs", "Model Breadcrumbs", consensus=False),
    _method("breadcrumbs_ties", "Model Breadcrumbs with TIES", consensus=True),
]
