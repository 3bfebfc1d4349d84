"""`ram` and `ramplus_tl` (merge-semantics.md §2.9): Reinforced Agent Merging.

τᵢ = xᵢ − base; active aᵢ = |τᵢ| > epsilon; per position c = Σᵢ aᵢ. Positions changed by exactly one model
(c == 1) take that model's delta; positions shared by several (c > 1) take the mean of the active deltas:
    ram:        out = base + Σᵢ τᵢaᵢ[c==1] + Σᵢ τᵢaᵢ[c>1]/c
    ramplus_tl: unique terms are scaled by λᵢ = 1 + r·clamp(ρᵢ, 0, alpha),
                ρᵢ = #(aᵢ ∧ shared) / max(#(aᵢ ∧ unique), epsilon), counted over the whole tensor.

`ram` is elementwise. `ramplus_tl`'s counts are global: `reduce` sums them (exact integers) over chunks and
`apply` is elementwise, so both stream tensors of any size.
"""

from __future__ import annotations

import torch

from mergebot.config.methods import SPECS
from mergebot.engine.exact import Sums
from mergebot.engine.fuse import enabled, fusable, scratch
from mergebot.engine.methods.base import MergeCall, MergeMethod


def _parts(base: torch.Tensor, xs: list[torch.Tensor], eps: float, dtype: torch.dtype):
    """The base, the deltas τᵢ, their active masks and the per-position count of active models (pure tensor code:
    traced into both kernels below)."""
    b = base.reshape(-1).to(dtype)
    taus = [x.reshape(-1).to(dtype) - b for x in xs]
    active = [t.abs() > eps for t in taus]
    count = torch.zeros(b.shape, dtype=torch.int32, device=b.device)
    for a in active:
        count = count + a.to(torch.int32)
    return b, taus, active, count


def _merge(base, taus, active, count, lambdas, dtype) -> torch.Tensor:
    unique = count == 1
    shared = count > 1
    denom = count.clamp(min=1).to(dtype)
    out = base
    for t, a, lam in zip(taus, active, lambdas):
        tz = torch.where(a, t, 0.0)
        u = torch.where(unique, tz, 0.0)
        if lam != 1.0:
            u = u * lam
        out = out + u + torch.where(shared, tz, 0.0) / denom
    return out


@fusable
def _kernel(base: torch.Tensor, xs: list[torch.Tensor], eps: float, lambdas: list[float], dtype: torch.dtype,
            out_dtype: torch.dtype) -> torch.Tensor:
    """The whole elementwise merge of a chunk: one fused loop when compiled (eager, ~15 passes)."""
    b, taus, active, count = _parts(base, xs, eps, dtype)
    return _merge(b, taus, active, count, lambdas, dtype).to(out_dtype)


class _InPlace:
    """`_parts` and `_merge` eagerly, in place in reused buffers, with their operations in their order: the
    CPU form when kernels are not compiled (no allocation per pass); tests/engine/methods/test_inplace.py
    holds it to the kernels' bytes."""

    def __init__(self, base: torch.Tensor, xs: list[torch.Tensor], eps: float, dtype: torch.dtype):
        n, k, dev = base.numel(), len(xs), base.device
        self.dtype = dtype
        self.b = scratch("ram_base", n, dtype, dev).copy_(base.reshape(-1))
        self.taus = scratch("ram_taus", k * n, dtype, dev).view(k, n)
        self.active = scratch("ram_active", k * n, torch.bool, dev).view(k, n)
        self.count = scratch("ram_count", n, torch.int32, dev).zero_()
        size = scratch("ram_size", n, dtype, dev)
        for t, a, x in zip(self.taus, self.active, xs):
            t.copy_(x.reshape(-1)).sub_(self.b)
            torch.gt(torch.abs(t, out=size), eps, out=a)
            self.count.add_(a)
        self.unique = torch.eq(self.count, 1, out=scratch("ram_unique", n, torch.bool, dev))
        self.shared = torch.gt(self.count, 1, out=scratch("ram_shared", n, torch.bool, dev))

    def merge(self, lambdas: list[float], out: torch.Tensor) -> torch.Tensor:
        """The merge into `out` (once: it overwrites the deltas)."""
        n, dev = self.b.numel(), self.b.device
        denom = scratch("ram_denom", n, self.dtype, dev).copy_(self.count).clamp_(min=1)
        acc = scratch("ram_acc", n, self.dtype, dev).copy_(self.b)
        u = scratch("ram_u", n, self.dtype, dev)
        zero = torch.zeros((), dtype=self.dtype, device=dev)  # where(·, ·, 0.0)'s +0.0
        for t, a, lam in zip(self.taus, self.active, lambdas):
            tz = torch.where(a, t, zero, out=t)
            torch.where(self.unique, tz, zero, out=u)
            if lam != 1.0:
                u.mul_(lam)
            acc.add_(u).add_(torch.where(self.shared, tz, zero, out=tz).div_(denom))  # (out + u) + shared/denom
        return out.copy_(acc)

    def counts(self) -> list[int]:
        both = scratch("ram_both", self.b.numel(), torch.bool, self.b.device)
        return [int(torch.logical_and(a, m, out=both).sum()) for a in self.active for m in (self.shared, self.unique)]


def _run(call: MergeCall, lambdas: list[float]) -> torch.Tensor:
    base, xs, eps = call.xs[call.base_at], [call.xs[i] for i in call.others], float(call.shared["epsilon"])
    if call.out is not None and not enabled():
        return _InPlace(base, xs, eps, call.dtype).merge(lambdas, call.out)
    return _kernel(base, xs, eps, lambdas, call.dtype, call.out_dtype, out=call.out)


def _apply_ram(call: MergeCall, totals: torch.Tensor | None) -> torch.Tensor:
    return _run(call, [1.0] * len(call.others))


@fusable
def _count_kernel(base: torch.Tensor, xs: list[torch.Tensor], eps: float, dtype: torch.dtype) -> torch.Tensor:
    """[#(aᵢ ∧ shared), #(aᵢ ∧ unique) for each i] of a chunk, as int64 (exact in any order): one fused pass."""
    _, _, active, count = _parts(base, xs, eps, dtype)
    unique, shared = count == 1, count > 1
    return torch.stack([n for a in active for n in ((a & shared).sum(), (a & unique).sum())])


def _reduce_plus(call: MergeCall) -> Sums:
    if not call.others:
        return Sums.of_counts([])
    base, xs, eps = call.xs[call.base_at], [call.xs[i] for i in call.others], float(call.shared["epsilon"])
    if base.device.type == "cpu" and not enabled():
        return Sums.of_counts(_InPlace(base, xs, eps, call.dtype).counts())
    return Sums.of_counts(_count_kernel(base, xs, eps, call.dtype).tolist())


def lambdas_plus(counts: list[float], r: float, alpha: float, eps: float) -> list[float]:
    """λᵢ from [#shared₀, #unique₀, #shared₁, ...] (§2.9)."""
    out = []
    for j in range(0, len(counts), 2):
        rho = counts[j] / max(counts[j + 1], eps)
        out.append(1.0 + r * min(max(rho, 0.0), alpha))
    return out


def _apply_plus(call: MergeCall, totals: torch.Tensor | None) -> torch.Tensor:
    if totals is None or not totals.numel():
        totals = _reduce_plus(call).values()
    lams = lambdas_plus([float(v) for v in totals], float(call.shared["r"]), float(call.shared["alpha"]),
                        float(call.shared["epsilon"]))
    return _run(call, lams)


# compiled for large CPU merges (one fused loop: ~2x faster warm than `_InPlace`, which runs when kernels are
# not compiled: small merges, --compile off, no C++ compiler); the kernels as written run on the GPU
METHODS = [
    MergeMethod.of(SPECS["ram"], apply=_apply_ram),
    MergeMethod.of(SPECS["ramplus_tl"], apply=_apply_plus, reduce=_reduce_plus),
]
