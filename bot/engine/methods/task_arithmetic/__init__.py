"""The generalised task-arithmetic family (merge-semantics.md §2.7): one algorithm, eight variants.

δᵢ = xᵢ − base; optional sparsify; weighted deltas Dᵢ = wᵢ·δᵢ; optional sign consensus ("sum"); optional
normalisation by the weights that voted; out = base + λ·mixed. Computed in float32 (float64 for float64
inputs), cast once.

Which steps a variant takes is its row of mergebot.config.methods.FAMILY (task_arithmetic, ties, dare_ties,
dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear). Each sparsifier is one module here
(`magnitude`: TIES' top-k, `dare`: random, `outliers`: breadcrumbs, `della`: magnitude-ranked sampling); the
steps they share (the tail, the L1 rescale, the chunk loops over whole-tensor masks) are in `combine`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mergebot.config.methods import FAMILY, SPECS
from mergebot.config.spec import FamilyVariant
from mergebot.engine.methods.base import MergeCall, MergeMethod
from mergebot.engine.methods.task_arithmetic import dare, della, magnitude, outliers
from mergebot.engine.methods.task_arithmetic.combine import Mix, masked, weighted_deltas_into

Apply = Callable[[MergeCall, "torch.Tensor | None", Mix], torch.Tensor]


def _unpruned(call: MergeCall, totals: torch.Tensor | None, mix: Mix) -> torch.Tensor:
    """Task arithmetic itself, and TIES-style consensus without sparsification: every δᵢ whole. Without
    consensus it is a linear combination, computed eagerly in place (`combine.weighted_deltas_into`): a few
    in-cache passes cost less than loading a compiled kernel, and nothing to compile on a fresh runner."""
    xs = [call.xs[i] for i in call.others]
    if not mix.consensus and call.out is not None:
        return weighted_deltas_into(call.xs[call.base_at], xs, mix, call.dtype, call.out)
    return masked(call.xs[call.base_at], xs, [None] * len(xs), [1.0] * len(xs), mix, call.dtype, call.out_dtype,
                  call.out)


# sparsifier -> (apply, extra kernel fields)
_SPARSIFIERS: dict[str | None, tuple[Apply, dict[str, Any]]] = {
    None: (_unpruned, {"fuse": False}),
    # TIES, breadcrumbs and DELLA run eagerly in place (combine.combine_into, integer masks): as fast as their
    # compiled kernels warm (0.86B TIES 17-21 s either way), and nothing to compile on a fresh runner
    "magnitude": (magnitude.apply, {"chunkable_when": magnitude.chunkable_when, "fuse": False}),
    "random": (dare.apply, {"reduce": dare.reduce, "uses_rng": True}),
    "magnitude_outliers": (outliers.apply, {"chunkable_when": outliers.chunkable_when, "fuse": False}),
    "della_magprune": (della.apply, {"chunkable_when": della.chunkable_when, "uses_rng": True, "fuse": False}),
}


def _method(name: str) -> MergeMethod:
    spec = SPECS[name]
    variant: FamilyVariant | None = spec.family
    assert variant is not None
    sparsify, kernel = _SPARSIFIERS[variant.sparsifier]

    def apply(call: MergeCall, totals: torch.Tensor | None) -> torch.Tensor:
        if not call.others:  # only the base has this tensor
            return call.xs[call.base_at].to(call.out_dtype).reshape(-1)
        return sparsify(call, totals, Mix.of(call, variant)).reshape(-1)

    return MergeMethod.of(spec, apply=apply, **kernel)


METHODS = [_method(name) for name in FAMILY]
