"""`nearswap` (merge-semantics.md §2.12): take the other model's value where it is near the base's.

w = clamp(t / max(|base − x|, 1e-6), 0, 1), out = w·x + (1−w)·base, elementwise (streams any size).
t = 0 gives the base; entries closer than t to the base become x; distant ones move by about t.

Optional tensors follow §2.0 PASSTHROUGH_BASE_SINGLETON (its `optional_policy`, mergebot.config.methods): a tensor only the base
has is copied from the base; one that only the other model has is an error (the planner's job).
"""

from __future__ import annotations

import torch

from mergebot.config.methods import SPECS
from mergebot.engine.fuse import enabled, fusable, scratch
from mergebot.engine.methods.base import MergeCall, MergeMethod

DIST_EPS = 1e-6


@fusable
def _kernel(base: torch.Tensor, x: torch.Tensor, t: float, dtype: torch.dtype, out_dtype: torch.dtype) -> torch.Tensor:
    """The formula; on the GPU (out of place) it runs as written, on the CPU `_into` gives its bytes in place."""
    b = base.reshape(-1).to(dtype)
    v = x.reshape(-1).to(dtype)
    w = (t / (b - v).abs().clamp(min=DIST_EPS)).clamp(0.0, 1.0)
    return (w * v + (1.0 - w) * b).to(out_dtype)


def _into(base: torch.Tensor, x: torch.Tensor, t: float, dtype: torch.dtype, out: torch.Tensor) -> torch.Tensor:
    """`_kernel`'s roundings, eager and in place in reused buffers (t / d is torch's d.reciprocal()·t)."""
    n = out.numel()
    w = scratch("nearswap_w", n, dtype, out.device).copy_(base.reshape(-1)).sub_(x.reshape(-1))
    w.abs_().clamp_(min=DIST_EPS).reciprocal_().mul_(t).clamp_(0.0, 1.0)
    near = scratch("nearswap_x", n, dtype, out.device).copy_(x.reshape(-1)).mul_(w)  # w·x
    near.add_(w.neg_().add_(1.0).mul_(base.reshape(-1)))  # + (1 − w)·base
    return out.copy_(near)


def _apply(call: MergeCall, totals: torch.Tensor | None) -> torch.Tensor:
    base, x, t = call.xs[call.base_at], call.xs[call.others[0]], float(call.shared["t"])
    if call.out is not None and not enabled():
        return _into(base, x, t, call.dtype, call.out)
    return _kernel(base, x, t, call.dtype, call.out_dtype, out=call.out)


# eager in place in every compile mode: a few in-cache passes cost less than loading a compiled kernel
METHOD = MergeMethod.of(SPECS["nearswap"], apply=_apply, fuse=False)
