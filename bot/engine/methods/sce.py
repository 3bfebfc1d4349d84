"""`sce` (merge-semantics.md §2.8): Select, Calculate, Erase — task vectors without per-model weights.

τᵢ = xᵢ − base. If `select_topk` < 1, keep only the k = int(count_nonzero(var)·select_topk) positions of
largest elementwise (population) variance across the τᵢ and zero the rest in every τᵢ (select_topk ≤ 0 keeps
nothing). Matrix weights ωᵢ = mean(τᵢ²)/Σⱼ mean(τⱼ²) (uniform 1/N when that denominator is < 1e-6); erase
mask = the TIES sign election on the unweighted τ (a sum ≥ 0 elects +1; zeros never vote);
out = base + Σ τᵢωᵢmaskᵢ / clamp(Σ ωᵢmaskᵢ, min 1e-6). `int8_mask` has no numerical effect.

With select_topk ≥ 1 the executor streams the method: `reduce` sums Σ τᵢ² and the element count exactly
over chunks, `apply` is elementwise. With select_topk < 1 the top-k selection is global (ties at the k-th
variance go to earlier elements, or where mergekit computes in our precision, to those its own topk picks),
so the method gets the whole tensor as zero-copy views and walks it in chunks itself, in bounded memory: the
variance (elementwise, so the same bits per chunk as whole) is cut exactly over its bit patterns
(`_sparsify.top_k_cuts`: one quickselect over the patterns gathered, or for tensors beyond its budget radix
selection, one pass that also counts the nonzeros and one per further 16 bits), then one pass sums Σ τᵢ² of the
selected τ, then one writes the output.
"""

from __future__ import annotations

from typing import Any

import torch

from mergebot.config.methods import SPECS
from mergebot.engine.exact import BLOCK, Sums, partials, partials_of_rows
from mergebot.engine.fuse import scratch
from mergebot.engine.methods import _sparsify
from mergebot.engine.methods.base import MergeCall, MergeMethod
from mergebot.engine.methods.task_arithmetic.combine import (
    bits_of,
    float32_value,
    mergekit_precision,
    vote_mask,
    zero_unless,
)

UNIFORM_EPS = 1e-6
PIECE = 1 << 18  # elements per in-place step (a multiple of the exact sums' BLOCK): float64 buffers of 2 MB
DIV_EPS = 1e-6


def _deltas(call: MergeCall) -> tuple[torch.Tensor, list[torch.Tensor]]:
    base = call.xs[call.base_at].reshape(-1).to(call.dtype)
    return base, [call.xs[i].reshape(-1).to(call.dtype) - base for i in call.others]


def _variance_bits(taus: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """Bit patterns of the population variance across the τᵢ, elementwise, in the compute dtype (int32 or
    int64 patterns). The formula is torch.var's on CPU (Welford, float64 accumulators, one division at the
    end: the same bits as `torch.var(stack, 0, unbiased=False)`, so the selection is the whole-tensor one),
    written out with elementwise ops so that any chunk, and any device, gives the same bits. `out`: flat bit
    patterns of the right width to write into."""
    n, device = taus[0].numel(), taus[0].device
    var = torch.empty(n, dtype=taus[0].dtype, device=device) if out is None else out.view(taus[0].dtype)
    # in place in reused float64 buffers of one piece (this runs 3-4 times per chunk; fresh float64 temporaries
    # of a whole chunk cost more in allocation than the arithmetic), the same operations in the same order
    for s in range(0, n, PIECE):
        e = min(n, s + PIECE)
        mean, m2, x, d, step = (scratch(f"sce_{tag}", e - s, torch.float64, device)
                                for tag in ("mean", "m2", "x", "d", "step"))
        mean.zero_()
        m2.zero_()
        for i, t in enumerate(taus):
            x.copy_(t.reshape(-1)[s:e])
            torch.sub(x, mean, out=d)  # d = x − mean
            mean.add_(torch.div(d, i + 1, out=step))  # mean + d/(i+1)
            m2.add_(x.sub_(mean).mul_(d))  # m2 + d·(x − mean), as (x − mean)·d
        var[s:e] = m2.div_(len(taus))
    var = var.abs_().reshape(taus[0].shape)
    return var.view(torch.int64 if var.dtype == torch.float64 else torch.int32)


def _sums(taus: list[torch.Tensor]) -> Sums:
    """Σ τᵢ² per model (exact, mergebot.engine.exact), then the element count. The squares are exact in
    float64; whole blocks go through one batched exact sum."""
    n = taus[0].numel() if taus else 0
    if not n or n % BLOCK:
        return Sums.cat(Sums.of(partials([t.to(torch.float64).square() for t in taus], nonneg=True)),
                        Sums.of_counts([n]))
    sums = Sums(len(taus))
    for s in range(0, n, PIECE):
        e = min(n, s + PIECE)
        squares = scratch("sce_squares", len(taus) * (e - s), torch.float64, taus[0].device).view(len(taus), -1)
        for row, t in zip(squares, taus):
            row.copy_(t.reshape(-1)[s:e]).square_()
        sums.add(partials_of_rows(squares, nonneg_rows=len(taus)))
    return Sums.cat(sums, Sums.of_counts([n]))


def _reduce(call: MergeCall) -> Sums:
    if not call.others or float(call.shared["select_topk"]) < 1:
        return Sums(0)
    return _sums(_deltas(call)[1])


def matrix_weights(sums: list[float], numel: float) -> list[float]:
    means = [s / numel if numel else 0.0 for s in sums]
    total = sum(means)
    if total < UNIFORM_EPS:
        return [1.0 / len(means)] * len(means)
    return [m / total for m in means]


def _merge(base: torch.Tensor, taus: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Sign election on the unweighted τ, then the ω-weighted mean of the agreeing τ (§2.8)."""
    total = taus[0]
    for t in taus[1:]:
        total = total + t
    sign = torch.where(total >= 0, 1.0, -1.0).to(base.dtype)
    mixed = torch.zeros_like(base)
    div = torch.zeros_like(base)
    for t, w in zip(taus, weights):
        agree = torch.sign(t) == sign
        mixed = mixed + torch.where(agree, t * w, 0.0)
        div = div + torch.where(agree, w, 0.0)
    return base + mixed / div.clamp(min=DIV_EPS)


def _merge_into(base: torch.Tensor, taus: list[torch.Tensor], weights: list[float], out: torch.Tensor) -> None:
    """`_merge` in place into `out` (the τ, flat and the caller's own, are overwritten), with its roundings: votes as
    float 0/1 and integer masks (combine.combine_into), no bool tensors or where."""
    n, dev, dtype = base.numel(), base.device, base.dtype
    sign = scratch("sce_sign", n, dtype, dev).copy_(taus[0])
    for t in taus[1:]:
        sign.add_(t)
    sign.ge_(0).mul_(2).sub_(1)  # where(total >= 0, 1, -1)
    vote = scratch("sce_vote", n, dtype, dev)
    mask = bits_of(scratch("sce_mask", n, dtype, dev))
    mixed = scratch("sce_mixed", n, dtype, dev).zero_()
    div = scratch("sce_div", n, dtype, dev).zero_()
    for t, w in zip(taus, weights):
        torch.mul(t, sign, out=vote).gt_(0)  # agree: t·sign > 0 (a zero or NaN τ never votes)
        mixed.add_(zero_unless(t.mul_(w), vote_mask(vote, out=mask)))
        div.add_(vote.mul_(float32_value(w)))  # where(agree, w, 0.0) is float32
    out.copy_(mixed.div_(div.clamp_(min=DIV_EPS)).add_(base))


def _apply(call: MergeCall, totals: torch.Tensor | None) -> torch.Tensor:
    if call.others and float(call.shared["select_topk"]) < 1:
        return _apply_selected(call)
    base, taus = _deltas(call)
    if not taus:
        return base
    if totals is None or not totals.numel():
        totals = _sums(taus).values()
    weights = matrix_weights([float(v) for v in totals[:-1]], float(totals[-1]))
    if call.out is None:
        return _merge(base, taus, weights)
    _merge_into(base, taus, weights, call.out.reshape(-1))
    return call.out


def _apply_selected(call: MergeCall) -> torch.Tensor:
    """select_topk < 1 over the whole tensor, chunk by chunk (see the module docstring)."""
    topk = float(call.shared["select_topk"])
    base = call.xs[call.base_at].reshape(-1)
    xs = [call.xs[i].reshape(-1) for i in call.others]
    n = base.numel()
    step = _sparsify.CHUNK
    bits_dtype = torch.int64 if call.dtype == torch.float64 else torch.int32

    def deltas(s: int, e: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        b = base[s:e].to(call.dtype)
        return b, [x[s:e].to(call.dtype) - b for x in xs]

    # every chunk's variance bits, once the first pass has filled them, when they fit in _sparsify.KEEP_BYTES:
    # the variance was computed four times per tensor (histogram, cut, sums, merge), ~40% of an SCE merge
    kept: torch.Tensor | None = None

    def var_bits(s: int, e: int) -> torch.Tensor:
        return kept[s:e] if kept is not None else _variance_bits(deltas(s, e)[1])

    if topk <= 0:
        cut = _sparsify.top_k_cuts(var_bits, n, [0], bits_dtype)[0]  # keeps nothing, without a pass
    else:
        # the first radix pass rides along with the count, unless the cut is selected in one step (_sparsify)
        top = None if _sparsify.selects_whole(n, bits_dtype, base.device) else torch.zeros(1 << 16, dtype=torch.int64)
        nonzero = 0
        width = torch.iinfo(bits_dtype).bits // 8
        filling = scratch("sce_kept", n, bits_dtype, base.device) if n * width <= _sparsify.KEEP_BYTES else None
        for s in range(0, n, step):
            e = min(n, s + step)
            bits = _variance_bits(deltas(s, e)[1], None if filling is None else filling[s:e])
            if top is not None:
                top += _sparsify.top_histogram(bits)
            nonzero += int(torch.count_nonzero(bits))
        kept = filling
        # count·topk as mergekit evaluates it (an int64 0-d tensor times a Python float: float32), so k matches
        k = int(torch.tensor(nonzero, dtype=torch.int64) * topk)
        cut = _sparsify.top_k_cuts(var_bits, n, [k], bits_dtype, top=top)[0]
    chosen = None  # mergekit's topk where the cut must choose among equal variances (_sparsify)
    if topk > 0 and cut.chooses and mergekit_precision(call) and n <= _sparsify.PARITY_MAX_ELEMS:
        var = torch.cat([var_bits(s, min(n, s + step)).view(call.dtype).cpu() for s in range(0, n, step)])
        chosen = _sparsify.mergekit_selection(var, "topk", k).to(base.device)

    masks = None  # the kept variance bits turned, in place, into integer keep masks (_sparsify.keep_into)
    if kept is not None and chosen is None:  # bits_dtype has the compute dtype's width, as zero_unless needs
        masks = cut.keep_into(kept, 0, cut.tie_end(var_bits, n), out=kept)

    def selected(s: int, e: int, seen: int) -> tuple[torch.Tensor, list[torch.Tensor], int]:
        b, taus = deltas(s, e)
        if chosen is not None:
            keep = chosen[s:e]
        elif masks is not None:
            keep = masks[s:e]
        else:
            keep, seen = cut.mask(_variance_bits(taus), seen)
        return b, [zero_unless(t, keep) for t in taus], seen

    sums: Sums | None = None
    seen = 0
    for s in range(0, n, step):
        _, taus, seen = selected(s, min(n, s + step), seen)
        part = _sums(taus)  # Σ τᵢ² per model, then the element count
        sums = part if sums is None else sums + part
    assert sums is not None  # n > 0
    totals = sums.values()
    weights = matrix_weights([float(v) for v in totals[:-1]], float(totals[-1]))
    out = call.out if call.out is not None else torch.empty(n, dtype=call.out_dtype, device=base.device)
    seen = 0
    for s in range(0, n, step):
        e = min(n, s + step)
        b, taus, seen = selected(s, e, seen)
        _merge_into(b, taus, weights, out[s:e])
    return out


def _chunkable_for(shared: dict[str, Any], per_input: list[dict[str, Any]]) -> bool:
    return float(shared.get("select_topk", 1.0)) >= 1


# eager (no fused kernel): configuring the compiler for it would only cost its import
METHOD = MergeMethod.of(SPECS["sce"], apply=_apply, reduce=_reduce, chunkable_when=_chunkable_for, fuse=False)
