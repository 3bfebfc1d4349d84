"""`breadcrumbs` and `breadcrumbs_ties` (merge-semantics.md §2.7): task arithmetic with outlier pruning.

Presets of the generalised task-arithmetic family, sharing its tail (`task_arithmetic._kernel_masked`:
weighted deltas, optional TIES sign election, normalisation, λ). Each δᵢ = xᵢ − base is sparsified by
`magnitude_outliers`: with target = int(densityᵢ·n), n_top = int(gammaᵢ·n) and
n_bot = max(0, n − target − n_top), sort |δ| ascending (in float32, ties by element order, the earlier
element counting as the larger) and keep sorted positions [n_bot, n_bot + target): the n_top largest and the
n_bot smallest are dropped (fewer top outliers when gamma is too large). 0.1.5 semantics: a tensor with
fewer than 1/gamma elements (int(gamma·n) == 0) keeps its `target` largest entries; 0.1.4's bug zeroed it.
`rescale: true` multiplies each pruned δᵢ by ‖δᵢ‖₁/‖δᵢ⊙maskᵢ‖₁ (whole tensor, float64 sums).

| name | consensus | normalize | rescale |
|---|---|---|---|
| breadcrumbs | none | false | false |
| breadcrumbs_ties | sum | false | false |

The outlier order is global over the tensor, so a pruned tensor comes whole (as zero-copy views) and is
walked in chunks here, in bounded memory: in descending order the kept band is the top (n − n_bot) minus
the top (n − n_bot − target), two exact cuts found by radix selection in shared passes (`_sparsify`).
"""

from __future__ import annotations

from typing import Any

import torch

from . import _sparsify
from ._sparsify import MagnitudeCut, magnitude_bits
from .base import MergeCall, MergeMethod, Param
from .task_arithmetic import RESCALE_EPS, _kernel_masked, family_params

Band = tuple[MagnitudeCut, MagnitudeCut]  # keep the top `upper`, minus the top `lower`


def outlier_band(bits_of: _sparsify.BitsOf, n: int, density: float, gamma: float) -> Band | None:
    """magnitude_outliers' kept band as two cuts; None: keep everything (density ≥ 1)."""
    if density >= 1:
        return None
    target = max(0, int(density * n))
    n_bot = max(0, n - target - int(gamma * n))
    upper, lower = _sparsify.top_k_cuts(bits_of, n, [n - n_bot, n - n_bot - target])
    return upper, lower


def _band_mask(band: Band, bits: torch.Tensor, seen: list[int]) -> torch.Tensor:
    """The band's mask for one chunk; `seen` carries the ties each cut met in earlier chunks."""
    keep, seen[0] = band[0].mask(bits, seen[0])
    top, seen[1] = band[1].mask(bits, seen[1])
    return keep & ~top


def _make_apply(consensus: bool):
    def apply(call: MergeCall, totals: torch.Tensor | None) -> torch.Tensor:
        base = call.xs[call.base].reshape(-1)
        others = call.others
        if not others:
            return base
        xs = [call.xs[i].reshape(-1) for i in others]
        n = base.numel()
        step = _sparsify.CHUNK

        def bits(x: torch.Tensor, s: int, e: int) -> torch.Tensor:
            return magnitude_bits(x[s:e].to(call.dtype) - base[s:e].to(call.dtype))

        bands = [outlier_band(lambda s, e, x=x: bits(x, s, e), n, float(call.per_input[i]["density"]),
                              float(call.per_input[i]["gamma"])) for x, i in zip(xs, others)]
        scales = [1.0] * len(xs)
        if call.shared["rescale"]:
            for j, (x, band) in enumerate(zip(xs, bands)):
                if band is None:
                    continue
                l1 = kept = 0.0
                seen = [0, 0]
                for s in range(0, n, step):
                    d = x[s:s + step].to(call.dtype) - base[s:s + step].to(call.dtype)
                    m = _band_mask(band, magnitude_bits(d), seen)
                    l1 += float(d.abs().sum(dtype=torch.float64))
                    kept += float(torch.where(m, d, 0.0).abs().sum(dtype=torch.float64))
                if l1 >= RESCALE_EPS and kept >= RESCALE_EPS:
                    scales[j] = l1 / kept
        weights = [float(call.per_input[i]["weight"]) for i in others]
        out = call.out if call.out is not None else torch.empty(n, dtype=call.out_dtype, device=base.device)
        seens = [[0, 0] for _ in xs]
        for s in range(0, n, step):
            e = min(n, s + step)
            masks = [None if band is None else _band_mask(band, bits(x, s, e), seen)
                     for x, band, seen in zip(xs, bands, seens)]
            _kernel_masked(base[s:e], [x[s:e] for x in xs], masks, scales, weights, consensus,
                           bool(call.shared["normalize"]), float(call.shared["lambda"]), call.dtype, call.out_dtype,
                           out=out[s:e])
        return out
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
