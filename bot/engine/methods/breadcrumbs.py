"""`breadcrumbs` and `breadcrumbs_ties` (merge-semantics.md §2.7): task arithmetic with outlier pruning.

Presets of the generalised task-arithmetic family, sharing its tail (`task_arithmetic._kernel_masked`:
weighted deltas, optional TIES sign election, normalisation, λ). Each δᵢ = xᵢ − base is sparsified by
`magnitude_outliers`: with target = int(densityᵢ·n), n_top = int(gammaᵢ·n) and
n_bot = max(0, n − target − n_top), sort |δ| ascending (in float32) and keep sorted positions [n_bot, n_bot + target): the n_top largest and the
n_bot smallest are dropped (fewer top outliers when gamma is too large). 0.1.5 semantics: a tensor with
fewer than 1/gamma elements (int(gamma·n) == 0) keeps its `target` largest entries; 0.1.4's bug zeroed it.
`rescale: true` multiplies each pruned δᵢ by ‖δᵢ‖₁/‖δᵢ⊙maskᵢ‖₁ (whole tensor, exact sums).

| name | consensus | normalize | rescale |
|---|---|---|---|
| breadcrumbs | none | false | false |
| breadcrumbs_ties | sum | false | false |

The outlier order is global over the tensor, so a pruned tensor comes whole (as zero-copy views) and is
walked in chunks here, in bounded memory: in descending order the kept band is the top (n − n_bot) minus
the top (n − n_bot − target), two exact cuts found by radix selection in shared passes (`_sparsify`).
Equal magnitudes at a cut go to the earlier element, except where mergekit computes in our precision
(float32/float64 inputs): there its own sort decides (`_sparsify.mergekit_selection`).
"""

from __future__ import annotations

from typing import Any

import torch

from mergebot.engine.exact import Sums, partials
from mergebot.engine.methods import _sparsify
from mergebot.engine.methods._sparsify import MagnitudeCut, magnitude_bits
from mergebot.engine.methods.base import MergeCall, MergeMethod, Param
from mergebot.engine.methods.task_arithmetic import _kernel_masked, family_params, mergekit_precision, rescale_factor

Band = tuple[MagnitudeCut, MagnitudeCut]  # keep the top `upper`, minus the top `lower`


def band_bounds(n: int, density: float, gamma: float) -> tuple[int, int]:
    """(target, n_bot): magnitude_outliers keeps ascending sorted positions [n_bot, n_bot + target)."""
    target = max(0, int(density * n))
    return target, max(0, n - target - int(gamma * n))


def outlier_band(bits_of: _sparsify.BitsOf, n: int, density: float, gamma: float) -> Band | None:
    """magnitude_outliers' kept band as two cuts; None: keep everything (density ≥ 1)."""
    if density >= 1:
        return None
    target, n_bot = band_bounds(n, density, gamma)
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

        params = [(float(call.per_input[i]["density"]), float(call.per_input[i]["gamma"])) for i in others]
        bands = [outlier_band(lambda s, e, x=x: bits(x, s, e), n, density, gamma)
                 for x, (density, gamma) in zip(xs, params)]
        chosen = [None] * len(xs)  # mergekit's own sort where a cut must choose among equal magnitudes
        if mergekit_precision(call) and n <= _sparsify.PARITY_MAX_ELEMS:
            for j, (x, band) in enumerate(zip(xs, bands)):
                if band is not None and (band[0].chooses or band[1].chooses):
                    target, n_bot = band_bounds(n, *params[j])
                    w = _sparsify.gather_float32(
                        lambda s, e, x=x: x[s:e].to(call.dtype) - base[s:e].to(call.dtype), n).abs_()
                    chosen[j] = _sparsify.mergekit_selection(w, "band", n_bot, n_bot + target).to(base.device)

        def mask(j: int, s: int, e: int, seen: list[int]) -> torch.Tensor | None:
            if chosen[j] is not None:
                return chosen[j][s:e]
            return None if bands[j] is None else _band_mask(bands[j], bits(xs[j], s, e), seen)

        scales = [1.0] * len(xs)
        if call.shared["rescale"]:
            for j, (x, band) in enumerate(zip(xs, bands)):
                if band is None:
                    continue
                sums = Sums(2)
                seen = [0, 0]
                for s in range(0, n, step):
                    d = x[s:s + step].to(call.dtype) - base[s:s + step].to(call.dtype)
                    sums.add(partials([d.abs(), torch.where(mask(j, s, min(n, s + step), seen), d, 0.0).abs()]))
                scales[j] = rescale_factor(*sums.values().tolist())
        weights = [float(call.per_input[i]["weight"]) for i in others]
        out = call.out if call.out is not None else torch.empty(n, dtype=call.out_dtype, device=base.device)
        seens = [[0, 0] for _ in xs]
        for s in range(0, n, step):
            e = min(n, s + step)
            masks = [mask(j, s, e, seen) for j, seen in enumerate(seens)]
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
