"""Magnitude pruning (merge-semantics.md §2.7, `magnitude`) in bounded memory.

Keeping the k = max(1, int(density·n)) largest |δ| needs the k-th largest magnitude of the whole tensor, found
exactly on the bit patterns of non-negative floats (which order like their bits). Up to SELECT_BYTES of
patterns on the CPU are gathered into one array and partitioned in place (numpy's SIMD quickselect: no
values + int64 indices as a top-k or sort allocates). Beyond that (a large embedding), or on a GPU, the
threshold is found by radix selection one chunk at a time, 16 bits per pass: a histogram of the high 16 bits,
then of the next 16 bits inside the one bucket that holds the k-th value, and so on (two passes for float32,
four for float64). Ties at the threshold
(common with bf16 checkpoints, whose deltas repeat) are broken by element order, so exactly k entries
survive, as in mergekit, and deterministically.

`top_k_cuts` serves any such selection: TIES' |δ| (`magnitude_cut`), breadcrumbs' outlier band (two cuts
on the same |δ|, §2.7) and SCE's variance top-k (§2.8).

The random (DARE) sparsifier needs nothing here: its mask is a hash of the element index (mergebot.engine.rng).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mergebot.engine.fuse import scratch
from mergebot.engine.methods._rows import threaded_ranges

CHUNK = 1 << 20  # elements per pass step: 4 MB float32 buffers; a TIES chunk's temporaries stay near 60 MB

# Bytes a whole-tensor selection may keep between its passes over a tensor (SCE's variance bits, TIES' and
# breadcrumbs' deltas) instead of computing them from the parents again in each pass: a 7B model's MLP
# matrices (45M elements, 180 MB in float32 per model) fit for a merge of two fine-tunes; larger tensors are
# computed again per pass, in bounded memory (as every tensor is with MERGEBOT_KEEP_BYTES=0).
KEEP_BYTES = int(os.environ.get("MERGEBOT_KEEP_BYTES", 512 << 20))

BitsOf = Callable[[int, int], torch.Tensor]  # (start, end) -> bit patterns of that chunk (int32 or int64)


@dataclass
class MagnitudeCut:
    """Keep bits > `above`, plus the first `ties` elements (in element order) whose bits == `above`; `equal`
    counts every element whose bits == `above` (more than `ties`: the cut has to choose among equals)."""

    above: int
    ties: int
    equal: int = 0

    @property
    def chooses(self) -> bool:
        """Whether equal magnitudes straddle the cut (a nonzero value: dropping a zero changes nothing)."""
        return self.equal > self.ties > -1 and self.above > 0

    def mask(self, bits: torch.Tensor, ties_seen: int) -> tuple[torch.Tensor, int]:
        """Mask for one chunk, given how many ties earlier chunks kept; returns (mask, ties seen after)."""
        keep = bits > self.above
        if self.ties > ties_seen:
            tie, ties_seen = self.tie_mask(bits, ties_seen)
            keep |= tie
        return keep, ties_seen

    def tie_mask(self, bits: torch.Tensor, ties_seen: int) -> tuple[torch.Tensor, int]:
        """The entries equal to the cut that this chunk keeps (the first `ties` in element order overall)."""
        eq = bits == self.above
        count = int(eq.sum())
        if ties_seen + count <= self.ties:  # every tie here is kept: no ranks needed (all chunks but one)
            return eq, ties_seen + count
        rank = torch.cumsum(eq, 0, dtype=torch.int64) + ties_seen  # 1-based rank of each tie
        return eq & (rank <= self.ties), ties_seen + count

    def tie_end(self, bits_of: BitsOf, n: int) -> int:
        """The flat index after the last tie the cut keeps (its `ties` earliest entries equal to `above`), counted
        chunk by chunk up to the chunk where they run out: with it, `keep_into` needs no running count."""
        if self.ties <= 0 or self.above < 0:
            return 0
        need = self.ties
        for s in range(0, n, CHUNK):
            b = bits_of(s, min(n, s + CHUNK)).reshape(-1)
            count = b.numel() - int(torch.count_nonzero(b - self.above))  # ~5x faster than (b == above).sum()
            if count >= need:
                return s + int((b == self.above).nonzero()[need - 1]) + 1
            need -= count
        return n

    def keep_into(self, bits: torch.Tensor, start: int, tie_end: int, out: torch.Tensor) -> torch.Tensor:
        """The keep mask of the chunk at flat offset `start` as integers, all ones where kept (`keep_mask_into`)."""
        return keep_mask_into(self.above, bits, tie_end - start, out)


def keep_mask_into(above: int, bits: torch.Tensor, ties_before: int, out: torch.Tensor) -> torch.Tensor:
    """Integers of the bits' width, all ones where bits > above or, among the first `ties_before` elements,
    bits == above, else 0 (for `zero_unless`), into `out` (which may be `bits` itself). On non-negative patterns
    (above − bits) >> (width − 1) is all ones exactly where bits > above, and (above − 1 − bits) also where they
    are equal: no bool tensors, which torch's comparisons and where make ~10x slower on the CPU."""
    bits, out = bits.reshape(-1), out.reshape(-1)
    k = min(max(ties_before, 0), bits.numel())
    torch.sub(above - 1, bits[:k], out=out[:k])
    torch.sub(above, bits[k:], out=out[k:])
    return out.bitwise_right_shift_(torch.iinfo(bits.dtype).bits - 1)


def magnitude_bits(delta: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of |δ| in float32 (order-preserving for non-negative floats)."""
    return delta.abs().to(torch.float32).view(torch.int32)


def top_histogram(bits: torch.Tensor) -> torch.Tensor:
    """Counts of the highest 16 bits of one chunk: the first pass of `top_k_cuts`, for callers that need to
    see the values before they know k (SCE counts nonzeros in the same pass)."""
    return _histogram(bits.reshape(-1), torch.iinfo(bits.dtype).bits - 16)


def _histogram(bits: torch.Tensor, shift: int) -> torch.Tensor:
    return torch.bincount((bits >> shift) & 0xFFFF, minlength=1 << 16).cpu()


def _inner_histograms(bits: torch.Tensor, shift: int, prefixes: list[int]) -> list[torch.Tensor]:
    """For each prefix p: counts of the 16 bits at `shift` among the CPU chunk's patterns whose bits above them
    are p (a radix selection's inner passes). numpy selects and counts on one core each, over one range of the
    chunk per thread, the ranges' counts added (exact integers, whatever the split): 2.7x faster than torch's
    comparison into bool and masked select (a first pass over all patterns gains nothing so: np.bincount
    widens them to int64 first)."""
    b = bits.numpy()
    counts: dict[int, list[np.ndarray]] = {}  # range start -> counts per prefix

    def part(a: int, z: int) -> None:
        piece = b[a:z]
        high = piece >> (shift + 16)
        counts[a] = [np.bincount((piece[high == p] >> shift) & 0xFFFF, minlength=1 << 16) for p in prefixes]

    threaded_ranges(part, b.size)
    return [torch.from_numpy(sum(c[i] for c in counts.values())) for i in range(len(prefixes))]


# Bytes of bit patterns a selection may gather to select its cuts in one step (`selected_cuts`) instead of
# radix passes over chunks, and never more than KEEP_BYTES (MERGEBOT_KEEP_BYTES=0 streams every selection). The
# buffer is reused between tensors. Up to 80 MB it pays: a 0.86B model's MLP matrices (46 MB), a 7B model's
# attention (67 MB). Larger tensors take the radix passes, in bounded memory: gathered into fresh buffers,
# a 7B model's MLP matrices (235 MB) ran no faster (page faults) and raised a TIES merge's peak anonymous memory
# by 0.22 GB (0.72 -> 0.94 GB for one 7B-shaped layer), a 0.86B embedding (262 MB) by 0.24 GB.
SELECT_BYTES = 80 << 20


def selects_whole(n: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `top_k_cuts` selects n patterns of `dtype` on `device` in one step (CPU, within SELECT_BYTES)."""
    return device.type == "cpu" and n * (torch.iinfo(dtype).bits // 8) <= min(SELECT_BYTES, KEEP_BYTES)


def selected_cuts(bits_of: BitsOf, n: int, ks: Sequence[int], dtype: torch.dtype,
                  first: torch.Tensor | None = None) -> list[MagnitudeCut]:
    """`top_k_cuts` (0 < k < n each) from all n patterns gathered into one array and partitioned at every n − k
    (numpy's SIMD quickselect, ~0.5 ns per element): the k-th largest pattern v is at n − k, the k − 1 after it
    are ≥ v and the rest ≤ v, so one pass counts those above v (→ ties = k − above) and those equal to it. The
    same cuts as the radix passes, which cost two histogram passes over the chunks (~4 ns per element). `first`:
    the first chunk's patterns, when the caller has them already."""
    buf = scratch("select_bits", n, dtype, torch.device("cpu")).numpy()
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        buf[s:e] = (first if s == 0 and first is not None else bits_of(s, e)).reshape(-1).numpy()
    end = n
    for at in sorted({n - k for k in ks}, reverse=True):  # one position per call: with several, numpy leaves
        buf[:end].partition(at)                            # its SIMD path (~9 instead of ~0.6 ns per element);
        end = at                                           # the part left of a position keeps its side
    cuts = []
    for k in ks:
        at = n - k
        v = buf[at]
        above = int(np.count_nonzero(buf[at + 1:] > v))
        equal = int(np.count_nonzero(buf[:at] == v)) + k - above
        cuts.append(MagnitudeCut(above=int(v), ties=k - above, equal=equal))
    return cuts


def top_k_cuts(bits_of: BitsOf, n: int, ks: Sequence[int], dtype: torch.dtype = torch.int32,
               top: torch.Tensor | None = None) -> list[MagnitudeCut]:
    """Exact cuts keeping the k largest of the n non-negative patterns of `dtype` (int32: float32 values,
    int64: float64), one per k in `ks`; the cuts share their passes over the chunks. `top`: the summed
    `top_histogram` of every chunk, when the caller already made that pass. Patterns on the CPU within
    SELECT_BYTES are gathered and selected in one step instead (`selected_cuts`)."""
    width = torch.iinfo(dtype).bits
    cuts: list[MagnitudeCut | None] = [None] * len(ks)
    state: dict[int, list[int]] = {}  # pending cut -> [prefix of its k-th pattern so far, rank inside prefix]
    for j, k in enumerate(ks):
        if k <= 0:
            cuts[j] = MagnitudeCut(above=torch.iinfo(dtype).max, ties=0)  # no pattern is above this
        elif k >= n:
            cuts[j] = MagnitudeCut(above=-1, ties=0)
        else:
            state[j] = [0, k]
    if state and selects_whole(n, dtype, torch.device("cpu")):
        first = bits_of(0, min(n, CHUNK))
        if first.device.type == "cpu":
            for j, cut in zip(state, selected_cuts(bits_of, n, [ks[j] for j in state], dtype, first)):
                cuts[j] = cut
            return cuts  # type: ignore[return-value]
    equal: dict[int, int] = {}
    for shift in range(width - 16, -1, -16) if state else ():
        prefixes = {p for p, _ in state.values()}
        hists = {p: torch.zeros(1 << 16, dtype=torch.int64) for p in prefixes}
        if shift == width - 16 and top is not None:
            hists[0] = top
        else:
            for s in range(0, n, CHUNK):
                b = bits_of(s, min(n, s + CHUNK)).reshape(-1)
                if shift == width - 16:
                    hists[0] += _histogram(b, shift)
                elif b.device.type == "cpu":
                    order = sorted(prefixes)
                    for p, h in zip(order, _inner_histograms(b, shift, order)):
                        hists[p] += h
                else:
                    for p in prefixes:
                        inside = b[(b >> (shift + 16)) == p]
                        if inside.numel():
                            hists[p] += _histogram(inside, shift)
        for j, st in state.items():
            h = hists[st[0]]
            at_least = torch.flip(torch.cumsum(torch.flip(h, [0]), 0), [0])  # at_least[d]: count with digit >= d
            digit = int((at_least >= st[1]).nonzero().max())
            st[1] -= int(at_least[digit + 1]) if digit + 1 < h.numel() else 0
            st[0] = (st[0] << 16) | digit
            equal[j] = int(h[digit])  # at the last level: the elements whose whole pattern is the cut's
    for j, (above, ties) in state.items():
        cuts[j] = MagnitudeCut(above=above, ties=ties, equal=equal[j])
    return cuts  # type: ignore[return-value]


def magnitude_cut(bits_of: BitsOf, n: int, density: float) -> MagnitudeCut | None:
    """The exact cut keeping k entries; None: keep everything. `bits_of(start, end)` gives a chunk's bits."""
    if density >= 1:
        return None
    if density <= 0 or n == 0:
        return MagnitudeCut(above=(1 << 31) - 1, ties=0)  # no float32 bit pattern is above this
    return top_k_cuts(bits_of, n, [max(1, int(density * n))])[0]


# Equal magnitudes at a cut: mergekit 0.1.5 keeps whichever its unstable torch sort puts first. That order is
# deterministic for a torch build but is no simple rule: measured on torch 2.13 CPU, `argsort(descending=True)`
# keeps the earliest equals for n <= 16 and, above, an arrangement that depends on every value of the tensor
# (its introsort's partitions), neither the first nor the last ones. So where mergekit computes in the same
# precision as mergebot (float32/float64 inputs; in bf16/fp16 its rounded deltas differ anyway), a cut that
# must choose among equal nonzero magnitudes asks torch for the same whole-tensor sort mergekit does, up to
# PARITY_MAX_ELEMS elements (~28 bytes each while it sorts, once per such tensor; large float32 tensors meet
# equal magnitudes often: 16M values share few mantissas); larger tensors keep element order, and so does every
# tensor with MERGEBOT_TIE_SORT_MAX=0 (streaming memory, no sort).
PARITY_MAX_ELEMS = int(os.environ.get("MERGEBOT_TIE_SORT_MAX", 1 << 24))


def gather_float32(values_of: Callable[[int, int], torch.Tensor], n: int) -> torch.Tensor:
    """The whole tensor of float32 magnitudes, assembled chunk by chunk."""
    out = torch.empty(n, dtype=torch.float32)
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        out[s:e] = values_of(s, e).reshape(-1).to(torch.float32).cpu()
    return out


def mergekit_selection(w: torch.Tensor, how: str, a: int, b: int = 0) -> torch.Tensor:
    """mergekit 0.1.5's selection on the float32 magnitudes `w` (flat, CPU), as a bool mask, made by the very
    torch call it makes: 'top' keeps argsort(w, descending=True)[:a] (`magnitude`), 'band' keeps
    sort(w).indices[a:b] (`magnitude_outliers`), 'topk' keeps topk(w, a).indices (SCE's variance)."""
    keep = torch.zeros(w.numel(), dtype=torch.bool)
    if how == "top":
        keep[torch.argsort(w, descending=True)[:a]] = True
    elif how == "band":
        keep[torch.sort(w, descending=False).indices[a:b]] = True
    elif how == "topk":
        keep[torch.topk(w, k=a, largest=True).indices] = True
    else:
        raise ValueError(how)
    return keep
