"""TIES' sparsifier (merge-semantics.md §2.7, `magnitude`): keep the k = max(1, int(densityᵢ·n)) largest |δᵢ| of
the whole tensor, exactly, in bounded memory.

The cut per model is found by one quickselect over the magnitudes' bit patterns gathered, or for tensors beyond
its budget by radix selection over chunks (`_sparsify.magnitude_cut`: two histogram passes),
then, with `rescale`, the kept L1 norm (one pass), then the merge chunk by chunk. Where a cut must choose among
equal magnitudes and mergekit computes in our precision, the choice is mergekit's (its whole-tensor argsort,
`_sparsify.mergekit_selection`); otherwise ties go to the earliest elements, encoded as the index after the last
kept one (`MagnitudeCut.tie_end`), so the merge is one in-place pass per chunk (`_magnitude_into`, the bytes of
the formula `_kernel_magnitude`).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from mergebot.engine.fuse import fusable, scratch
from mergebot.engine.methods import _sparsify
from mergebot.engine.methods.base import MergeCall
from mergebot.engine.methods.task_arithmetic.combine import (
    FlatDeltas,
    Mix,
    combine,
    combine_into,
    merge_pruned,
    mergekit_precision,
    rescales,
    zero_unless,
)


def _bits(x: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (x.reshape(-1).to(dtype) - b).abs().to(torch.float32).view(torch.int32)  # _sparsify.magnitude_bits


@fusable
def _kernel_magnitude(base: torch.Tensor, xs: list[torch.Tensor], aboves: list[torch.Tensor | None],
                      tie_ends: list[torch.Tensor], scales: list[float], weights: list[float], consensus: bool,
                      normalize: bool, lam: float, dtype: torch.dtype, out_dtype: torch.dtype) -> torch.Tensor:
    """TIES' merge as a formula (what `_magnitude_into` computes in place, compared bit for bit in
    tests/engine/methods/test_inplace.py): δᵢ kept where the float32 bits of |δᵢ| exceed its cut (`aboves`: 0-d int32
    tensors, None keeps all), or equal it before chunk offset `tie_ends` (the cut's ties go to the earliest
    elements, _sparsify.MagnitudeCut); then the common tail."""
    b = base.reshape(-1).to(dtype)
    idx = torch.arange(b.numel(), dtype=torch.int32, device=b.device)
    deltas = []
    for x, above, end, s in zip(xs, aboves, tie_ends, scales):
        d = x.reshape(-1).to(dtype) - b
        if above is not None:
            bits = d.abs().to(torch.float32).view(torch.int32)
            d = torch.where((bits > above) | ((bits == above) & (idx < end)), d, 0.0)
        if s != 1.0:
            d = d * s
        deltas.append(d)
    return combine(b, deltas, weights, consensus, normalize, lam, out_dtype)


def _magnitude_into(base: torch.Tensor, xs: list[torch.Tensor], aboves: list[torch.Tensor | None], tie_ends: list[int],
                    scales: list[float], mix: Mix, dtype: torch.dtype, out: torch.Tensor,
                    given: list[torch.Tensor | None] | None = None) -> torch.Tensor:
    """`_kernel_magnitude` eagerly in place in reused buffers (tie_ends as ints), with its roundings: TIES'
    merge pass, as fast as that kernel compiled and with nothing to compile. `given`: δ = x − base already
    computed (FlatDeltas.whole; None for a model: computed here), used and overwritten. The keep test is integer
    arithmetic on the non-negative bit patterns (`_sparsify.keep_mask_into`), and the delta's bits are ANDed
    with it (`zero_unless`): no bool tensors, which torch makes ~10x slower."""
    n, dev = out.numel(), out.device
    b = scratch("tm_base", n, dtype, dev).copy_(base.reshape(-1))
    bits = scratch("tm_bits", n, torch.int32, dev)
    wide = scratch("tm_wide", n, torch.int64, dev) if dtype == torch.float64 else None
    deltas = []
    for j, (x, above, end, sc) in enumerate(zip(xs, aboves, tie_ends, scales)):
        known = None if given is None else given[j]
        d = known.reshape(-1) if known is not None else scratch(f"tm_d{j}", n, dtype, dev).copy_(x.reshape(-1)).sub_(b)
        if above is not None:
            mag = bits.view(torch.float32)
            if dtype == torch.float32:
                torch.abs(d, out=mag)
            else:
                mag.copy_(d.abs())
            keep = _sparsify.keep_mask_into(int(above), bits, end, bits)
            zero_unless(d, keep if wide is None else wide.copy_(keep))
        if sc != 1.0:
            d.mul_(sc)
        deltas.append(d)
    return combine_into(b, deltas, mix.weights, mix.consensus, mix.normalize, mix.lam, out)


class _Cut:
    """One model's magnitude cut as a Pruner: its own cut (ties to the earliest elements), or mergekit's
    whole-tensor selection where the cut must choose among equal magnitudes."""

    def __init__(self, cut: _sparsify.MagnitudeCut, chosen: torch.Tensor | None):
        self.cut, self.chosen, self.seen = cut, chosen, 0

    def reset(self) -> None:
        self.seen = 0

    def mask(self, s: int, e: int, delta: torch.Tensor) -> torch.Tensor:
        if self.chosen is not None:
            return self.chosen[s:e]
        m, self.seen = self.cut.mask(_sparsify.magnitude_bits(delta), self.seen)
        return m


def apply(call: MergeCall, totals: torch.Tensor | None, mix: Mix) -> torch.Tensor:
    flat = FlatDeltas.of(call, keep=True)
    base, xs, n, delta = flat.base, flat.xs, flat.n, flat.delta

    densities = [float(call.per_input[i]["density"]) for i in call.others]
    def bits(x: torch.Tensor, s: int, e: int) -> torch.Tensor:
        return _sparsify.magnitude_bits(delta(x, s, e))

    def size(x: torch.Tensor, s: int, e: int) -> torch.Tensor:
        return delta(x, s, e).abs()

    cuts = [_sparsify.magnitude_cut(partial(bits, x), n, density)
            for x, density in zip(xs, densities)]
    chosen: list[torch.Tensor | None] = [None] * len(xs)  # mergekit's whole-tensor selection, where it differs
    if mergekit_precision(call) and n <= _sparsify.PARITY_MAX_ELEMS:
        for j, (x, cut) in enumerate(zip(xs, cuts)):
            if cut is not None and cut.chooses:
                w = _sparsify.gather_float32(partial(size, x), n)
                chosen[j] = _sparsify.mergekit_selection(w, "top", max(1, int(densities[j] * n))).to(base.device)
    pruners: list[Any] = [None if cut is None else _Cut(cut, c) for cut, c in zip(cuts, chosen)]
    scales = rescales(call, base, xs, pruners) if call.shared["rescale"] else [1.0] * len(xs)
    if any(m is not None for m in chosen):
        return merge_pruned(call, base, xs, pruners, scales, mix)
    out = call.out if call.out is not None else torch.empty(n, dtype=call.out_dtype, device=base.device)
    step = _sparsify.CHUNK
    # the cut's bit pattern as a tensor (see rng.Stream32.tensors: no 64-bit widening in compiled kernels)
    aboves = [None if cut is None or cut.above < 0 else torch.tensor(cut.above, dtype=torch.int32, device=base.device)
              for cut in cuts]
    ends = [0 if cut is None or above is None else cut.tie_end(partial(bits, x), n)
            for x, cut, above in zip(xs, cuts, aboves)]
    kept = [flat.whole(j) for j in range(len(xs))]
    for s in range(0, n, step):
        e = min(n, s + step)
        _magnitude_into(base[s:e], [x[s:e] for x in xs], aboves, [min(max(end - s, 0), e - s) for end in ends],
                        scales, mix, call.dtype, out[s:e], [None if d is None else d[s:e] for d in kept])
    return out


def chunkable_when(shared: dict[str, Any], per_input: list[dict[str, Any]]) -> bool:
    """Magnitude top-k is global over the tensor: a pruned tensor comes whole (as zero-copy views) and is walked
    in chunks here."""
    return all(float(p.get("density", 1.0)) >= 1 for p in per_input if "density" in p)
