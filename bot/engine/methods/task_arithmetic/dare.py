"""DARE's sparsifier (merge-semantics.md §2.7, `random`): each δᵢ kept with probability densityᵢ.

The rescale matches the L1 norm of the whole tensor (not the paper's 1/p), so the variant is two-phase:
`reduce` sums ‖δᵢ‖₁ and ‖δᵢ⊙maskᵢ‖₁ over chunks, `apply` uses the totals. The masks are a hash of
(seed, tensor, model position, element index) evaluated inside the kernel (mergebot.engine.rng): the same bits
whatever the chunking, thread count or device, and no separate RNG pass. `--rng mergekit` draws them as
mergekit 0.1.5 does instead (torch's global RNG, whole tensors in sorted-name order).
"""

from __future__ import annotations

import numpy as np
import torch

from mergebot.engine import rng
from mergebot.engine.exact import BLOCK, Sums, partials, partials_of_pairs
from mergebot.engine.fuse import enabled, fusable, fusable_with, scratch
from mergebot.engine.methods import _sparsify
from mergebot.engine.methods._rows import threaded_ranges
from mergebot.engine.methods.base import MergeCall
from mergebot.engine.methods.task_arithmetic.combine import (
    Mix,
    bits_of,
    combine,
    combine_into,
    l1_partials,
    masked,
    rescale_factor,
    zero_unless,
)

Streams = list[tuple]  # rng.Stream32.tensors() per non-base model (0-d int32 tensors)


# a value read by several reductions (here the exact sums' max pass and sum pass) is stored to memory and read
# back once it counts more than 50 ops (Inductor's default), which the hashed mask does: recomputed inside the
# one fused loop instead, the L1 sums of a 16M-element chunk took ~30 ms instead of ~95 ms on the 2-core VM
@fusable_with(realize_cpu_opcount_threshold=100)
def _l1_sums(base: torch.Tensor, xs: list[torch.Tensor], streams: Streams, dtype: torch.dtype) -> torch.Tensor:
    """Exact partial sums (mergebot.engine.exact) of [‖δᵢ‖₁, ‖δᵢ⊙keepᵢ‖₁ for each i] over this chunk: integers,
    so the totals do not depend on how a compiled reduction splits the chunk over threads (float32 accumulators
    did: 58 of 147 tensors of a dare_ties merge changed between 1 and 2 threads)."""
    b = base.reshape(-1).to(dtype)
    idx = torch.arange(b.numel(), dtype=torch.int32, device=b.device)
    terms = []
    for x, stream in zip(xs, streams):
        d = (x.reshape(-1).to(dtype) - b).abs()
        terms.append(d)
        terms.append(torch.where(rng.keep32(idx, *stream), d, 0.0))
    # a kept term is bounded by its whole term: one max pass per model, and the hash stays in the fused loop
    return partials(terms, nonneg=True, bound=[None if k % 2 == 0 else k - 1 for k in range(len(terms))])


@fusable
def _kernel_random(base: torch.Tensor, xs: list[torch.Tensor], streams: Streams, scales: list[float],
                   weights: list[float], consensus: bool, normalize: bool, lam: float,
                   dtype: torch.dtype, out_dtype: torch.dtype) -> torch.Tensor:
    """δᵢ kept where hash < threshold, times its rescale factor (scales), then the common tail."""
    b = base.reshape(-1).to(dtype)
    idx = torch.arange(b.numel(), dtype=torch.int32, device=b.device)
    deltas = [torch.where(rng.keep32(idx, *stream), (x.reshape(-1).to(dtype) - b) * s, 0.0)
              for x, stream, s in zip(xs, streams, scales)]
    return combine(b, deltas, weights, consensus, normalize, lam, out_dtype)


PIECE = 1 << 18  # elements per in-place step (a multiple of the exact sums' BLOCK): buffers that stay in cache


def _pieces(n: int, device: torch.device) -> list[tuple[int, int]]:
    """CPU: cache-sized pieces; a GPU takes the chunk whole (each piece costs ~50 kernel launches)."""
    step = PIECE if device.type == "cpu" else max(n, 1)
    return [(s, min(n, s + step)) for s in range(0, max(n, 1), step)]  # an empty chunk is one empty piece


# Keep flags (0/1 bytes) that a tensor's reduce hashed, for its apply to read instead of hashing again: the hash
# was ~40% of an eager DARE merge, computed once per pass. Keyed by stream and chunk; cleared when a tensor's
# reduce starts (chunk 0), so it holds one tensor's flags at most, within _sparsify.KEEP_BYTES (else recomputed).
_FLAGS: dict[tuple[rng.Stream32, int, int], torch.Tensor] = {}


def _flag_bytes() -> int:
    return sum(f.numel() for f in _FLAGS.values())


class _Eager:
    """DARE without compiled kernels, in place in reused cache-sized buffers, with the kernels' bytes: the hash
    (numpy's uint32 lanes, `rng.keep_flags_np`, split over threads) into integer masks ANDed into the deltas
    (`combine.zero_unless`), the tail by `combine.combine_into`. Before, eager DARE allocated ~40 chunk-sized
    temporaries per model and took 4x its compiled kernel; a fresh runner had to compile that kernel first
    (dare_ties 0.86B: 50 s cold)."""

    def __init__(self, call: MergeCall):
        self.call = call
        base = call.xs[call.base_at]
        self.n, self.dev, self.dtype = base.numel(), base.device, call.dtype
        self.streams = [rng.Stream32.of(call.keys[i], call.start, self.n,
                                        rng.threshold(float(call.per_input[i]["density"]))) for i in call.others]

    def _key(self, j: int) -> tuple[rng.Stream32, int, int]:
        return self.streams[j], self.call.start, self.n

    def _delta(self, j: int, x: torch.Tensor, b: torch.Tensor, s: int, e: int) -> torch.Tensor:
        return scratch(f"dare_d{j}", e - s, self.dtype, self.dev).copy_(x.reshape(-1)[s:e]).sub_(b)

    def _flags(self, j: int, into: torch.Tensor) -> torch.Tensor:
        """Model j's keep flags for the whole chunk into `into` (uint8, CPU): numpy's uint32 hash over one range
        per thread. numpy ufuncs run on one core each and let go of the GIL, but each call costs a GIL hand-off:
        split over threads only ranges of ~256K elements or more run faster (cache-sized pieces ran slower
        split than on one thread), so the flags are hashed here for the whole chunk, not per piece."""
        st = self.streams[j]
        assert st.cut is not None
        h = scratch("dare_h", self.n, torch.int32, self.dev).numpy().view(np.uint32)
        t = scratch("dare_t", self.n, torch.int32, self.dev).numpy().view(np.uint32)
        flags = into.numpy()
        cut = st.cut

        def part(a: int, z: int) -> None:
            rng.keep_flags_np(a, st.lo, st.key, st.hi, cut, h[a:z], t[a:z], flags[a:z])

        threaded_ranges(part, self.n)
        return into

    def _mask(self, j: int, s: int, e: int, like: torch.Tensor, flags: torch.Tensor | None) -> torch.Tensor:
        """The integer mask of piece [s, e) for model j (like `like`'s bits), from the chunk's keep `flags`
        (CPU; None when the density keeps all) or hashed here (GPU)."""
        st, m = self.streams[j], e - s
        mask = scratch(f"dare_mask{like.element_size()}", m, bits_of(like).dtype, self.dev)
        if st.cut is None:
            return mask.fill_(-1)
        if flags is None:
            work = (scratch("dare_h", m, torch.int32, self.dev), scratch("dare_t", m, torch.int32, self.dev))
            wide = scratch("dare_wide", m, torch.int64, self.dev)
            # offsets from the chunk start; lo is the chunk's, so piece s starts at lo + s (int32 wrap, as keep32)
            return rng.keep32_mask_into(rng.offsets32(m, self.dev), rng.signed32(st.lo + s), st.key, st.hi, st.cut,
                                        mask, work, wide)
        np.negative(flags[s:e].numpy().view(np.int8), out=mask.numpy())  # 1 -> all ones, 0 -> 0
        return mask

    def _all_flags(self, keep: bool) -> list[torch.Tensor | None]:
        """Each model's keep flags for the chunk (CPU; None: keeps all, or on a GPU), kept in _FLAGS for the
        apply when `keep` and they fit, else in a scratch buffer."""
        flags: list[torch.Tensor | None] = []
        for j, st in enumerate(self.streams):
            if self.dev.type != "cpu" or st.cut is None:
                flags.append(None)
                continue
            cached = _FLAGS.pop(self._key(j), None) if not keep else None
            if cached is not None:
                flags.append(cached)
            elif keep and _flag_bytes() + self.n <= _sparsify.KEEP_BYTES:
                flags.append(self._flags(j, _FLAGS.setdefault(self._key(j), torch.empty(self.n, dtype=torch.uint8))))
            else:
                flags.append(self._flags(j, scratch(f"dare_flags{j}", self.n, torch.uint8, self.dev)))
        return flags

    def base(self, s: int, e: int) -> torch.Tensor:
        b = self.call.xs[self.call.base_at].reshape(-1)
        return scratch("dare_base", e - s, self.dtype, self.dev).copy_(b[s:e])

    def l1_sums(self) -> torch.Tensor:
        """`_l1_sums`' integers: [‖δᵢ‖₁, ‖δᵢ⊙keepᵢ‖₁] per model, piece by piece (whole BLOCKs, so the same blocks).
        Keeps the chunk's keep flags for `merge` (see _FLAGS) while they fit."""
        if self.call.start == 0:
            _FLAGS.clear()
        flags = self._all_flags(keep=True)
        per_piece = []
        k = 2 * len(self.call.others)
        for s, e in _pieces(self.n, self.dev):
            b = self.base(s, e)
            # rows 2j, 2j+1: |δⱼ| and its kept copy, summed together when the piece is whole blocks
            rows = scratch("dare_rows", k * (e - s), self.dtype, self.dev).view(k, e - s)
            for j, i in enumerate(self.call.others):
                a = rows[2 * j].copy_(self.call.xs[i].reshape(-1)[s:e]).sub_(b).abs_()
                zero_unless(rows[2 * j + 1].copy_(a), self._mask(j, s, e, a, flags[j]))
            if (e - s) % BLOCK == 0:
                per_piece.append(partials_of_pairs(rows))
            else:
                per_piece.append(partials(list(rows), nonneg=True, bound=[None if t % 2 == 0 else t - 1 for t in range(k)]))
        return torch.cat(per_piece, -1)

    def merge(self, scales: list[float], mix: Mix, out: torch.Tensor) -> torch.Tensor:
        flat = out.reshape(-1)
        flags = self._all_flags(keep=False)
        for s, e in _pieces(self.n, self.dev):
            b = self.base(s, e)
            deltas = []
            for j, (i, sc) in enumerate(zip(self.call.others, scales)):
                d = self._delta(j, self.call.xs[i], b, s, e)
                if sc != 1.0:
                    d.mul_(sc)
                deltas.append(zero_unless(d, self._mask(j, s, e, d, flags[j])))
            combine_into(b, deltas, mix.weights, mix.consensus, mix.normalize, mix.lam, flat[s:e])
        return out


def _streams(call: MergeCall) -> Streams:
    base = call.xs[call.base_at]
    return [rng.Stream32.of(call.keys[i], call.start, base.numel(),
                            rng.threshold(float(call.per_input[i]["density"]))).tensors(base.device)
            for i in call.others]


def reduce(call: MergeCall) -> Sums:
    if not call.shared["rescale"] or not call.others:
        return Sums(0)
    if not enabled():
        return Sums.of(_Eager(call).l1_sums())
    xs = [call.xs[i] for i in call.others]
    return Sums.of(_l1_sums(call.xs[call.base_at], xs, _streams(call), call.dtype))


def apply(call: MergeCall, totals: torch.Tensor | None, mix: Mix) -> torch.Tensor:
    base = call.xs[call.base_at]
    xs = [call.xs[i] for i in call.others]
    if call.rng == "mergekit":
        masks, scales = _mergekit_order_masks(call)
        return masked(base, xs, masks, scales, mix, call.dtype, call.out_dtype, call.out)
    scales = [rescale_factor(float(totals[2 * j]), float(totals[2 * j + 1]))
              if totals is not None and totals.numel() else 1.0 for j in range(len(xs))]
    if call.out is not None and not enabled():
        return _Eager(call).merge(scales, mix, call.out)
    return _kernel_random(base, xs, _streams(call), scales, mix.weights, mix.consensus, mix.normalize, mix.lam,
                          call.dtype, call.out_dtype, out=call.out)


def _mergekit_order_masks(call: MergeCall) -> tuple[list[torch.Tensor | None], list[float]]:
    """DARE masks drawn as mergekit 0.1.5 draws them (§2.7): torch's global RNG (seeded once per run), one
    `bernoulli(full_like(δ, density))` per non-base model in config order, in the work dtype mergekit uses
    on CPU (bf16 stays bf16, other floats float32). The executor visits tensors in sorted-name order, so the
    masks are mergekit's bits; the math after them stays in float32."""
    base = call.xs[call.base_at].reshape(-1)
    masks: list[torch.Tensor | None] = []
    scales: list[float] = []
    for i in call.others:
        x = call.xs[i].reshape(-1)
        density = float(call.per_input[i]["density"])
        if density >= 1:
            masks.append(None)
            scales.append(1.0)
            continue
        work = x.dtype if x.dtype in (torch.bfloat16, torch.float64) else torch.float32
        keep = torch.bernoulli(torch.full(x.shape, density, dtype=work, device="cpu")).to(x.device) > 0
        scale = 1.0
        if call.shared["rescale"]:
            d = x.to(call.dtype) - base.to(call.dtype)
            scale = rescale_factor(*Sums.of(l1_partials(d, keep)).values().tolist())
        masks.append(keep)
        scales.append(scale)
    return masks, scales
