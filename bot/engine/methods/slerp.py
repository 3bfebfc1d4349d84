"""`slerp` (merge-semantics.md §2.2): spherical interpolation of the whole flattened tensor.

t = 0 gives the base, t = 1 the other model. The angle needs global norms and a dot product, so the
method is split into `reduce` (Σa², Σb², Σab: the exact Gram matrix over chunks, mergebot.engine.exact) and an elementwise
`apply`: the coefficients, so the bytes, do not depend on chunking, threads or device.
"""

from __future__ import annotations

import math

import torch

from mergebot.config.methods import SPECS
from mergebot.engine.exact import Sums
from mergebot.engine.fuse import enabled, fusable, scratch
from mergebot.engine.methods._linalg import gram
from mergebot.engine.methods.base import MergeCall, MergeMethod

DOT_THRESHOLD = 0.9995
EPS = 1e-8


@fusable
def _combine(a: torch.Tensor, b: torch.Tensor, c0: float, c1: float, dtype: torch.dtype,
             out_dtype: torch.dtype) -> torch.Tensor:
    return (a.to(dtype) * c0 + b.to(dtype) * c1).to(out_dtype)


def _pair(call: MergeCall) -> tuple[torch.Tensor, torch.Tensor]:
    return call.xs[call.base_at], call.xs[call.others[0]]


def _reduce(call: MergeCall) -> Sums:
    """The Gram matrix of (a, b): ‖a‖², ⟨a,b⟩ and ‖b‖², exact."""
    return gram(list(_pair(call)), call.dtype)


def coefficients(t: float, aa: float, bb: float, ab: float) -> tuple[float, float]:
    """(c_base, c_other) such that out = c_base·a + c_other·b."""
    na, nb = math.sqrt(aa), math.sqrt(bb)
    na = 1.0 if na <= EPS else na
    nb = 1.0 if nb <= EPS else nb
    d = max(-1.0, min(1.0, ab / (na * nb)))
    if abs(d) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(d)
    s = math.sin(theta)
    return math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s


def _apply(call: MergeCall, totals: torch.Tensor | None) -> torch.Tensor:
    assert totals is not None
    aa, bb, ab = float(totals[0, 0]), float(totals[1, 1]), float(totals[0, 1])
    c0, c1 = coefficients(float(call.shared["t"]), aa, bb, ab)
    a, b = _pair(call)
    if call.out is not None and not enabled():
        # a·c0 and b·c1 rounded each, then added: the compiled form's and the GPU's roundings (an alpha-add
        # would fuse the second product into the sum on the CPU only)
        acc = scratch("slerp", a.numel(), call.dtype, a.device)
        tmp = scratch("slerp_b", b.numel(), call.dtype, b.device)
        acc.copy_(a.reshape(-1)).mul_(c0)
        torch.mul(tmp.copy_(b.reshape(-1)), c1, out=tmp)
        return call.out.copy_(acc.add_(tmp))
    return _combine(a, b, c0, c1, call.dtype, call.out_dtype, out=call.out)


METHOD = MergeMethod.of(SPECS["slerp"], apply=_apply, reduce=_reduce, fuse=False)
