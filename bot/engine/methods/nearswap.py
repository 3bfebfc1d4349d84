"""`nearswap` (merge-semantics.md §2.12): take the other model's value where it is near the base's.

w = clamp(t / max(|base − x|, 1e-6), 0, 1), out = w·x + (1−w)·base, elementwise (streams any size).
t = 0 gives the base; entries closer than t to the base become x; distant ones move by about t.

Optional tensors follow §2.0 PASSTHROUGH_BASE_SINGLETON (its `optional_policy`, mergebot.config.methods): a tensor only the base
has is copied from the base; one that only the other model has is an error (the planner's job).
"""

from __future__ import annotations

import torch

from mergebot.config.methods import SPECS
from mergebot.engine.fuse import fusable
from mergebot.engine.methods.base import MergeCall, MergeMethod

DIST_EPS = 1e-6


@fusable
def _kernel(base: torch.Tensor, x: torch.Tensor, t: float, dtype: torch.dtype, out_dtype: torch.dtype) -> torch.Tensor:
    """One fused loop when compiled (eager: six passes over the chunk)."""
    b = base.reshape(-1).to(dtype)
    v = x.reshape(-1).to(dtype)
    w = (t / (b - v).abs().clamp(min=DIST_EPS)).clamp(0.0, 1.0)
    return (w * v + (1.0 - w) * b).to(out_dtype)


def _apply(call: MergeCall, totals: torch.Tensor | None) -> torch.Tensor:
    return _kernel(call.xs[call.base_at], call.xs[call.others[0]], float(call.shared["t"]), call.dtype,
                   call.out_dtype, out=call.out)


METHOD = MergeMethod.of(SPECS["nearswap"], apply=_apply)
