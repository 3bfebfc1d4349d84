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
from mergebot.engine.methods.task_arithmetic.combine import vote_mask, zero_unless


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
    """`_parts` and `_merge` eagerly, in place in reused cache-sized buffers (PIECE elements at a time), with their
    operations in their order: the CPU form when kernels are not compiled; tests/engine/methods/test_inplace.py
    holds it to the kernels' bytes. Masks are float 0/1 votes turned into integer masks ANDed into the deltas
    (`combine.zero_unless`), not bool tensors and `where`, which are ~10x slower on the CPU: the same bytes
    (+0.0 where a mask is off, as where(·, ·, 0.0) gives)."""

    PIECE = 1 << 18

    def __init__(self, base: torch.Tensor, xs: list[torch.Tensor], eps: float, dtype: torch.dtype):
        self.base, self.xs, self.eps, self.dtype = base.reshape(-1), [x.reshape(-1) for x in xs], eps, dtype
        self.n, self.dev = self.base.numel(), self.base.device

    def _pieces(self) -> list[tuple[int, int]]:
        return [(s, min(self.n, s + self.PIECE)) for s in range(0, self.n, self.PIECE)]

    def _parts(self, s: int, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The piece's base, deltas τᵢ (rows), active votes |τᵢ| > eps (rows of 1.0/0.0) and their count (float)."""
        m, k, dtype, dev = e - s, len(self.xs), self.dtype, self.dev
        b = scratch("ram_base", m, dtype, dev).copy_(self.base[s:e])
        taus = scratch("ram_taus", k * m, dtype, dev).view(k, m)
        active = scratch("ram_active", k * m, dtype, dev).view(k, m)
        count = scratch("ram_count", m, dtype, dev).zero_()
        for t, a, x in zip(taus, active, self.xs):
            t.copy_(x[s:e]).sub_(b)
            torch.abs(t, out=a).gt_(self.eps)  # the float comparison `abs(t) > eps` makes, as 1.0/0.0
            count.add_(a)  # small integers: exact in any float
        return b, taus, active, count

    def _flags(self, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(count == 1, count > 1) as 1.0/0.0 votes."""
        m = count.numel()
        unique = scratch("ram_unique", m, self.dtype, self.dev).copy_(count).eq_(1)
        shared = scratch("ram_shared", m, self.dtype, self.dev).copy_(count).gt_(1)
        return unique, shared

    def merge(self, lambdas: list[float], out: torch.Tensor) -> torch.Tensor:
        """The merge into `out`."""
        flat = out.reshape(-1)
        for s, e in self._pieces():
            b, taus, active, count = self._parts(s, e)
            unique, shared = (vote_mask(f) for f in self._flags(count))
            denom = count.clamp_(min=1)  # count.clamp(min=1) in the compute dtype
            acc = b  # out = base, then + u + shared/denom per model
            u = scratch("ram_u", e - s, self.dtype, self.dev)
            for t, a, lam in zip(taus, active, lambdas):
                tz = zero_unless(t, vote_mask(a))
                zero_unless(u.copy_(tz), unique)
                if lam != 1.0:
                    u.mul_(lam)
                acc.add_(u).add_(zero_unless(tz, shared).div_(denom))  # (out + u) + shared/denom
            flat[s:e].copy_(acc)
        return out

    def counts(self) -> list[int]:
        """[#(aᵢ ∧ shared), #(aᵢ ∧ unique) for each i], as Python integers."""
        totals = [0] * (2 * len(self.xs))
        for s, e in self._pieces():
            _, _, active, count = self._parts(s, e)
            unique, shared = self._flags(count)
            for i, a in enumerate(active):
                # dot products of 0/1 votes: whole numbers below 2**24 per piece, exact in float32
                totals[2 * i] += int(torch.dot(a, shared))
                totals[2 * i + 1] += int(torch.dot(a, unique))
        return totals


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
