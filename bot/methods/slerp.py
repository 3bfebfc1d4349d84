"""`slerp` (merge-semantics.md §2.2): spherical interpolation of the whole flattened tensor.

t = 0 gives the base, t = 1 the other model. The angle needs global norms and a dot product, so the
method is split into `reduce` (Σa², Σb², Σab in float64, additive over chunks) and an elementwise `apply`.
"""

from __future__ import annotations

import math

import torch

from .base import MergeCall, MergeMethod, Param

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def _pair(call: MergeCall) -> tuple[torch.Tensor, torch.Tensor]:
    other = call.others[0]
    return call.xs[call.base], call.xs[other]


def _reduce(call: MergeCall) -> torch.Tensor:
    a, b = (x.reshape(-1).to(torch.float64) for x in _pair(call))
    return torch.stack([a.dot(a), b.dot(b), a.dot(b)]).cpu()


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
    aa, bb, ab = (float(v) for v in totals)
    c0, c1 = coefficients(float(call.shared["t"]), aa, bb, ab)
    a, b = _pair(call)
    out = torch.empty(a.shape, dtype=call.dtype, device=a.device)
    torch.mul(a, c0, out=out)
    return out.add_(b, alpha=c1)


METHOD = MergeMethod(
    name="slerp",
    pretty="SLERP",
    url="https://en.wikipedia.org/wiki/Slerp",
    params=(Param("t", float, "shared"),),
    base="required",
    apply=_apply,
    reduce=_reduce,
    min_inputs=2,
    max_inputs=2,
    min_non_base=1,
    max_non_base=1,
    singleton_passthrough=True,
)
