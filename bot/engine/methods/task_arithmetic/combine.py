"""The steps every variant of the task-arithmetic family shares (merge-semantics.md §2.7).

* `Mix`: the family's tail as one call resolves it: weights Dᵢ = wᵢ·δᵢ, optional sign consensus, optional
  normalisation by the weights that voted, λ (`combine`; `kernel_masked` fuses it with masking);
* the L1 rescale ‖δᵢ‖₁/‖δᵢ⊙maskᵢ‖₁ (not the paper's 1/p), summed exactly over chunks (`l1_partials`,
  `rescale_factor`);
* for the sparsifiers whose masks come from cuts over the whole tensor (TIES' magnitude, breadcrumbs'
  outliers): the chunk loops of the rescale pass and of the merge, given one `Pruner` per model.

Everything is computed in float32 (float64 for float64 inputs) and cast once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from mergebot.config.spec import FamilyVariant
from mergebot.engine.exact import Sums, partials
from mergebot.engine.fuse import enabled, fusable, scratch
from mergebot.engine.methods import _sparsify
from mergebot.engine.methods.base import MergeCall

RESCALE_EPS = 1e-7


@dataclass(frozen=True)
class Mix:
    """The tail of one call: the non-base inputs' weights, the variant's consensus, the shared parameters."""

    weights: list[float]
    consensus: bool
    normalize: bool
    lam: float

    @classmethod
    def of(cls, call: MergeCall, variant: FamilyVariant) -> Mix:
        return cls([float(call.per_input[i]["weight"]) for i in call.others], variant.consensus,
                   bool(call.shared["normalize"]), float(call.shared["lambda"]))


def rescale_factor(l1: float, kept: float) -> float:
    """‖δ‖₁/‖δ⊙mask‖₁, or 1 when either norm is below 1e-7 (§2.7)."""
    return l1 / kept if l1 >= RESCALE_EPS and kept >= RESCALE_EPS else 1.0


def l1_partials(d: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Exact partial sums (mergebot.engine.exact) of ‖δ‖₁ and ‖δ⊙keep‖₁ over one chunk."""
    a = d.abs()
    return partials([a, zero_unless(scratch("l1_kept", a.numel(), a.dtype, a.device).copy_(a.reshape(-1)), keep)],
                    nonneg=True, bound=[None, 0])


def combine(b: torch.Tensor, deltas: list[torch.Tensor], weights: list[float], consensus: bool,
            normalize: bool, lam: float, out_dtype: torch.dtype) -> torch.Tensor:
    """Weighted deltas, sign election, normalisation, λ: the shared tail of every variant."""
    weighted = [d * w for d, w in zip(deltas, weights)]
    if consensus:
        total = weighted[0]
        for d in weighted[1:]:
            total = total + d
        sign = torch.where(total >= 0, 1.0, -1.0).to(b.dtype)
        mixed = torch.zeros_like(b)
        div = torch.zeros_like(b)
        for d, w in zip(weighted, weights):
            agree = torch.sign(d) == sign  # a zero delta never votes (§2.7 step 4)
            mixed = mixed + torch.where(agree, d, 0.0)
            div = div + torch.where(agree, w, 0.0)
        div = torch.where(div == 0, 1.0, div)
        if normalize:
            mixed = mixed / div
    else:
        mixed = weighted[0]
        for d in weighted[1:]:
            mixed = mixed + d
        if normalize:
            s = sum(weights)
            mixed = mixed / (s if abs(s) >= 1e-8 else 1.0)
    if lam != 1.0:
        mixed = mixed * lam
    return (b + mixed).to(out_dtype)


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The same memory as the signed integers of its width (float32 -> int32, float64 -> int64, 16-bit -> int16)."""
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def zero_unless(d: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`torch.where(keep, d, 0.0)` in place: the bits of d ANDed with a mask of all ones where `keep`
    (bool, or already such a mask), the same bytes as where, +0.0 where dropped. On the CPU torch's where and
    masked_fill take ~2 ms per 1M elements, 20x an elementwise add; this takes three integer passes."""
    if keep.dtype == torch.bool:
        keep = scratch("zero_unless", d.numel(), bits_of(d).dtype, d.device).copy_(keep.reshape(-1)).neg_()
    bits_of(d).bitwise_and_(keep)
    return d


def vote_mask(vote: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Float votes of 1.0 or 0.0 as an integer mask for `zero_unless` (all ones or zero), into `out` (else over
    the votes themselves): 1.0's bits shifted right by width − 3 are 1 (0x3F80…, 0x3FF0…, 0x3C00), 0.0's are 0,
    then negated. Votes come from in-place comparisons on floats (`gt_`, `ge_`), which are fast, unlike bool ones."""
    bits = bits_of(vote)
    return torch.bitwise_right_shift(bits, 8 * vote.element_size() - 3, out=bits if out is None else out).neg_()


def float32_value(w: float) -> float:
    """w rounded to float32: what a where(mask, w, 0.0) tensor (default dtype) holds."""
    return float(torch.tensor(w, dtype=torch.float32))


def combine_into(b: torch.Tensor, deltas: list[torch.Tensor], weights: list[float], consensus: bool,
                 normalize: bool, lam: float, out: torch.Tensor) -> torch.Tensor:
    """`combine` eager and in place, with its roundings (its bytes on every input; tests/engine/methods/
    test_inplace.py): the deltas (flat, compute dtype, the caller's own) are overwritten and the temporaries are
    reused buffers, so a row block costs one pass per operation and no allocation. Votes are float 0/1 and
    integer masks, not bool tensors: torch's comparisons into bool and its where are ~10x slower on the CPU."""
    n, dev, dtype = b.numel(), b.device, b.dtype
    for d, w in zip(deltas, weights):
        d.mul_(w)
    mixed = scratch("cb_mixed", n, dtype, dev)
    if consensus:
        sign = scratch("cb_sign", n, dtype, dev).copy_(deltas[0])
        for d in deltas[1:]:
            sign.add_(d)
        sign.ge_(0).mul_(2).sub_(1)  # where(total >= 0, 1, -1): NaN votes -1, as in combine
        vote = scratch("cb_vote", n, dtype, dev)
        mask = bits_of(scratch("cb_mask", n, dtype, dev))
        div = scratch("cb_div", n, dtype, dev).zero_()
        mixed.zero_()
        for d, w in zip(deltas, weights):
            # agree (sign(d) == sign) exactly when d·sign > 0: a zero or NaN delta never votes (§2.7 step 4)
            torch.mul(d, sign, out=vote).gt_(0)
            mixed.add_(zero_unless(d, vote_mask(vote, out=mask)))
            div.add_(vote.mul_(float32_value(w)))  # combine adds where(agree, w, 0.0): float32
        div.add_(vote.copy_(div).eq_(0))  # where(div == 0, 1, div)
        if normalize:
            mixed.div_(div)
    else:
        mixed.copy_(deltas[0])
        for d in deltas[1:]:
            mixed.add_(d)
        if normalize:
            s = sum(weights)
            mixed.div_(s if abs(s) >= 1e-8 else 1.0)
    if lam != 1.0:
        mixed.mul_(lam)
    return out.copy_(mixed.add_(b))


def weighted_deltas_into(base: torch.Tensor, xs: list[torch.Tensor], mix: Mix, dtype: torch.dtype,
                         out: torch.Tensor) -> torch.Tensor:
    """`combine` without consensus or masks, eager and in place in reused buffers, with its roundings:
    Σ (xᵢ − b)·wᵢ in order, / Σw when normalising, · λ, then b + the mix, cast once into `out`."""
    n = out.numel()
    b = scratch("ta_base", n, dtype, out.device).copy_(base.reshape(-1))
    acc = scratch("ta_mix", n, dtype, out.device)
    term = scratch("ta_term", n, dtype, out.device)
    for i, (x, w) in enumerate(zip(xs, mix.weights)):
        into = acc if i == 0 else term
        into.copy_(x.reshape(-1)).sub_(b).mul_(w)
        if i:
            acc.add_(term)
    if mix.normalize:
        s = sum(mix.weights)
        acc.div_(s if abs(s) >= 1e-8 else 1.0)
    if mix.lam != 1.0:
        acc.mul_(mix.lam)
    return out.copy_(acc.add_(b))


@fusable
def kernel_masked(base: torch.Tensor, xs: list[torch.Tensor], masks: list[torch.Tensor | None], scales: list[float],
                  weights: list[float], consensus: bool, normalize: bool, lam: float,
                  dtype: torch.dtype, out_dtype: torch.dtype) -> torch.Tensor:
    """δᵢ (optionally masked and L1-rescaled), then the common tail."""
    b = base.reshape(-1).to(dtype)
    deltas = []
    for x, m, s in zip(xs, masks, scales):
        d = x.reshape(-1).to(dtype) - b
        if s != 1.0:
            d = d * s
        deltas.append(d if m is None else torch.where(m.reshape(-1), d, 0.0))
    return combine(b, deltas, weights, consensus, normalize, lam, out_dtype)


def masked(base: torch.Tensor, xs: list[torch.Tensor], masks: list[torch.Tensor | None], scales: list[float],
           mix: Mix, dtype: torch.dtype, out_dtype: torch.dtype, out: torch.Tensor | None,
           given: list[torch.Tensor | None] | None = None) -> torch.Tensor:
    """`kernel_masked`: compiled when kernels are, else (into `out`) eagerly in place in reused buffers, with the
    kernel's roundings: δᵢ = xᵢ − b, · scaleᵢ, masked, then `combine_into`. `given`: δᵢ already computed
    (FlatDeltas.whole; None for a model: computed here), used and overwritten by the eager form. Masks: bool,
    or integer masks of the compute dtype's width (`zero_unless`) for the eager form."""
    if out is None or enabled():
        masks = [m if m is None or m.dtype == torch.bool else m.ne(0) for m in masks]
        return kernel_masked(base, xs, masks, scales, mix.weights, mix.consensus, mix.normalize, mix.lam, dtype,
                             out_dtype, out=out)
    n, dev = out.numel(), out.device
    b = scratch("mk_base", n, dtype, dev).copy_(base.reshape(-1))
    deltas = []
    for j, (x, m, sc) in enumerate(zip(xs, masks, scales)):
        known = None if given is None else given[j]
        d = known.reshape(-1) if known is not None else scratch(f"mk_d{j}", n, dtype, dev).copy_(x.reshape(-1)).sub_(b)
        if sc != 1.0:
            d.mul_(sc)
        if m is not None:
            zero_unless(d, m)
        deltas.append(d)
    return combine_into(b, deltas, mix.weights, mix.consensus, mix.normalize, mix.lam, out.reshape(-1))


@dataclass(frozen=True)
class FlatDeltas:
    """The base and the other inputs flattened, and δ = x − base of any slice in the compute dtype: what the
    whole-tensor sparsifiers (magnitude, breadcrumbs) walk in chunks, pass after pass.

    With `keep` (`of(call, keep=True)`, when all the deltas fit in `_sparsify.KEEP_BYTES`), each model's δ is
    kept as its first pass computes it, chunk by chunk in order, and later passes read it instead of the
    parents again (the cut's second histogram, its ties, the merge: ~a third of a TIES merge). The slices it
    returns are shared: callers read them, and only the last pass may write them (`whole`)."""

    call: MergeCall
    base: torch.Tensor
    xs: list[torch.Tensor]
    kept: list[torch.Tensor] = field(default_factory=list)
    filled: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, call: MergeCall, keep: bool = False) -> FlatDeltas:
        base = call.xs[call.base_at].reshape(-1)
        xs = [call.xs[i].reshape(-1) for i in call.others]
        width = torch.empty(0, dtype=call.dtype).element_size()
        if not keep or base.numel() * width * len(xs) > _sparsify.KEEP_BYTES:
            return cls(call, base, xs)
        # reused between tensors (`scratch`): fresh buffers this size cost a page fault per 4 KB every tensor
        return cls(call, base, xs, [scratch(f"flat_kept{j}", base.numel(), call.dtype, base.device)
                                    for j in range(len(xs))], [0] * len(xs))

    @property
    def n(self) -> int:
        return self.base.numel()

    def delta(self, x: torch.Tensor, s: int, e: int) -> torch.Tensor:
        j = next((j for j, y in enumerate(self.xs) if y is x), -1) if self.kept else -1
        if j >= 0 and e <= self.filled[j]:
            return self.kept[j][s:e]
        if j < 0 or s != self.filled[j]:  # not kept, or not the next chunk in order: computed, not kept
            into = torch.empty(e - s, dtype=self.call.dtype, device=self.base.device)
        else:
            into = self.kept[j][s:e]
            self.filled[j] = e
        # x − base in the compute dtype: the in-place subtraction widens the stored base exactly, as .to() does,
        # without two converted temporaries (1.6x faster)
        return into.copy_(x[s:e]).sub_(self.base[s:e])

    def whole(self, j: int) -> torch.Tensor | None:
        """Model j's whole δ when it is kept and complete, for a last pass to use (and overwrite); else None."""
        return self.kept[j] if self.kept and self.filled[j] == self.n else None


def mergekit_precision(call: MergeCall) -> bool:
    """Whether mergekit 0.1.5 computes this call in mergebot's precision: it works in the inputs' dtype, so
    only float32/float64 inputs (after `dtype:`) give it the same deltas, hence the same equal magnitudes."""
    return all(x.dtype == call.dtype for x in call.xs)


# ------------------------------------------------------------------------------ masks from whole-tensor cuts

class Pruner(Protocol):
    """One model's keep mask, chunk by chunk in element order (`reset` before each pass over the tensor)."""

    def reset(self) -> None: ...

    def mask(self, s: int, e: int, delta: torch.Tensor) -> torch.Tensor:
        """The mask of elements [s, e), whose delta is `delta`."""
        ...


def chunk_bounds(n: int) -> list[tuple[int, int]]:
    step = _sparsify.CHUNK
    return [(s, min(n, s + step)) for s in range(0, n, step)]


def rescales(call: MergeCall, base: torch.Tensor, xs: list[torch.Tensor],
             pruners: list[Pruner | None], flat: FlatDeltas | None = None) -> list[float]:
    """The L1 rescale factor of each pruned model (one pass over the chunks each); 1 for the others. `flat`:
    the deltas as its passes keep them."""
    scales = [1.0] * len(xs)
    for j, (x, pruner) in enumerate(zip(xs, pruners)):
        if pruner is None:
            continue
        sums = Sums(2)
        pruner.reset()
        for s, e in chunk_bounds(base.numel()):
            d = x[s:e].to(call.dtype) - base[s:e].to(call.dtype) if flat is None else flat.delta(x, s, e)
            sums.add(l1_partials(d, pruner.mask(s, e, d)))
        scales[j] = rescale_factor(*sums.values().tolist())
    return scales


def merge_pruned(call: MergeCall, base: torch.Tensor, xs: list[torch.Tensor], pruners: list[Pruner | None],
                 scales: list[float], mix: Mix, flat: FlatDeltas | None = None) -> torch.Tensor:
    """The merge, chunk by chunk, each model masked by its pruner (None: kept whole). `flat`: the deltas as
    its passes keep them (this last pass overwrites them)."""
    out = call.out if call.out is not None else torch.empty(base.numel(), dtype=call.out_dtype, device=base.device)
    for pruner in pruners:
        if pruner is not None:
            pruner.reset()
    kept = [None if flat is None else flat.whole(j) for j in range(len(xs))]
    for s, e in chunk_bounds(base.numel()):
        masks = [None if p is None else p.mask(s, e, x[s:e].to(call.dtype) - base[s:e].to(call.dtype)
                                               if flat is None else flat.delta(x, s, e)) for x, p in zip(xs, pruners)]
        masked(base[s:e], [x[s:e] for x in xs], masks, scales, mix, call.dtype, call.out_dtype, out[s:e],
               [None if d is None else d[s:e] for d in kept])
    return out
