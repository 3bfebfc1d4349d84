"""`passthrough` (merge-semantics.md §2.6): one input per slice, optionally scaled. Used to stack layers."""

from __future__ import annotations

import torch

from mergebot.config.methods import SPECS
from mergebot.engine.methods.base import MergeCall, MergeMethod


def _apply(call: MergeCall, totals: torch.Tensor | None) -> torch.Tensor:
    x = call.xs[0]
    scale = call.per_input[0].get("scale")
    if scale is None:
        return x
    return x.to(call.dtype) * float(scale)


METHOD = MergeMethod.of(SPECS["passthrough"], apply=_apply, fuse=False)  # a copy: nothing to fuse
