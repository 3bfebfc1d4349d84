"""Breadcrumbs' sparsifier (merge-semantics.md §2.7, `magnitude_outliers`), of `breadcrumbs` and `breadcrumbs_ties`.

Each δᵢ = xᵢ − base is sparsified by `magnitude_outliers`: with target = int(densityᵢ·n), n_top = int(gammaᵢ·n) and
n_bot = max(0, n − target − n_top), sort |δ| ascending (in float32) and keep sorted positions [n_bot, n_bot + target):
the n_top largest and the n_bot smallest are dropped (fewer top outliers when gamma is too large). 0.1.5 semantics: a tensor with
fewer than 1/gamma elements (int(gamma·n) == 0) keeps its `target` largest entries; 0.1.4's bug zeroed it.
`rescale: true` multiplies each pruned δᵢ by ‖δᵢ‖₁/‖δᵢ⊙maskᵢ‖₁ (whole tensor, exact sums).

The outlier order is global over the tensor, so a pruned tensor comes whole (as zero-copy views) and is
walked in chunks here, in bounded memory: in descending order the kept band is the top (n − n_bot) minus
the top (n − n_bot − target), two exact cuts found by radix selection in shared passes (`_sparsify`).
Equal magnitudes at a cut go to the earlier element, except where mergekit computes in our precision
(float32/float64 inputs): there its own sort decides (`_sparsify.mergekit_selection`).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from mergebot.engine.fuse import scratch
from mergebot.engine.methods import _sparsify
from mergebot.engine.methods._sparsify import MagnitudeCut, magnitude_bits
from mergebot.engine.methods.base import MergeCall
from mergebot.engine.methods.task_arithmetic.combine import FlatDeltas, Mix, merge_pruned, mergekit_precision, rescales

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


class _Band:
    """One model's kept band as a Pruner: integer masks from the two cuts and where their ties end (see
    `_sparsify.keep_mask_into`), or mergekit's own sort where a cut must choose among equal magnitudes."""

    def __init__(self, j: int, band: Band, chosen: torch.Tensor | None, bits_of: _sparsify.BitsOf, n: int):
        self.tag, self.band, self.chosen = f"band_keep{j}", band, chosen  # each model's mask its own buffer
        self.ends = (0, 0) if chosen is not None else (band[0].tie_end(bits_of, n), band[1].tie_end(bits_of, n))

    def reset(self) -> None:
        pass

    def mask(self, s: int, e: int, delta: torch.Tensor) -> torch.Tensor:
        if self.chosen is not None:
            return self.chosen[s:e]
        bits = magnitude_bits(delta)
        keep = self.band[0].keep_into(bits, s, self.ends[0], scratch(self.tag, bits.numel(), bits.dtype, bits.device))
        top = self.band[1].keep_into(bits, s, self.ends[1], bits)
        return keep.bitwise_and_(top.bitwise_not_())  # in the top n − n_bot, not in the top n − n_bot − target


def apply(call: MergeCall, totals: torch.Tensor | None, mix: Mix) -> torch.Tensor:
    flat = FlatDeltas.of(call, keep=True)
    base, xs, n, delta = flat.base, flat.xs, flat.n, flat.delta

    def bits(x: torch.Tensor, s: int, e: int) -> torch.Tensor:
        return magnitude_bits(delta(x, s, e))

    params = [(float(call.per_input[i]["density"]), float(call.per_input[i]["gamma"])) for i in call.others]
    bands = [outlier_band(partial(bits, x), n, density, gamma)
             for x, (density, gamma) in zip(xs, params)]
    pruners: list[Any] = []
    for j, (x, band) in enumerate(zip(xs, bands)):
        chosen = None  # mergekit's own sort where a cut must choose among equal magnitudes
        if band is not None and (band[0].chooses or band[1].chooses) and mergekit_precision(call) \
                and n <= _sparsify.PARITY_MAX_ELEMS:
            target, n_bot = band_bounds(n, *params[j])
            w = _sparsify.gather_float32(partial(delta, x), n).abs_()
            chosen = _sparsify.mergekit_selection(w, "band", n_bot, n_bot + target).to(base.device)
        pruners.append(None if band is None else _Band(j, band, chosen, partial(bits, x), n))
    scales = rescales(call, base, xs, pruners, flat) if call.shared["rescale"] else [1.0] * len(xs)
    return merge_pruned(call, base, xs, pruners, scales, mix, flat)


def chunkable_when(shared: dict[str, Any], per_input: list[dict[str, Any]]) -> bool:
    """The outlier order is global over the tensor: a pruned tensor comes whole (as zero-copy views)."""
    return all(float(p["density"]) >= 1 for p in per_input if "density" in p)
