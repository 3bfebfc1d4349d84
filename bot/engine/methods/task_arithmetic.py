"""The generalised task-arithmetic family (merge-semantics.md §2.7): one kernel, several presets.

δᵢ = xᵢ − base; optional sparsify (magnitude top-k, or DARE Bernoulli with L1 rescale); weighted deltas
Dᵢ = wᵢ·δᵢ; optional sign consensus ("sum"); optional normalisation by the weights that voted;
out = base + λ·mixed. Computed in float32 (float64 for float64 inputs), cast once.

DARE's rescale matches the L1 norm of the whole tensor (not the paper's 1/p), so it is two-phase:
`reduce` sums ‖δᵢ‖₁ and ‖δᵢ⊙maskᵢ‖₁ over chunks, `apply` uses the totals. The masks are a hash of
(seed, tensor, model position, element index) evaluated inside the kernel (mergebot.engine.rng): the same bits
whatever the chunking, thread count or device, and no separate RNG pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from mergebot.engine import rng
from mergebot.engine.exact import Sums, partials
from mergebot.engine.fuse import fusable
from mergebot.engine.methods import _sparsify
from mergebot.engine.methods.base import MergeCall, MergeMethod, Param

RESCALE_EPS = 1e-7


@dataclass(frozen=True)
class Preset:
    consensus: Literal["sum", None]
    sparsifier: Literal["magnitude", "random", None]
    normalize: bool
    rescale: bool


Streams = list[tuple]  # rng.Stream32.tensors() per non-base model (0-d int32 tensors)


@fusable
def _l1_sums(base: torch.Tensor, xs: list[torch.Tensor], streams: Streams, dtype: torch.dtype) -> torch.Tensor:
    """Exact partial sums (mergebot.engine.exact) of [‖δᵢ‖₁, ‖δᵢ⊙keepᵢ‖₁ for each i] over this chunk: integers, so the
    totals do not depend on how a compiled reduction splits the chunk over threads (float32 accumulators
    did: 58 of 147 tensors of a dare_ties merge changed between 1 and 2 threads)."""
    b = base.reshape(-1).to(dtype)
    idx = torch.arange(b.numel(), dtype=torch.int32, device=b.device)
    terms = []
    for x, stream in zip(xs, streams):
        d = (x.reshape(-1).to(dtype) - b).abs()
        terms.append(d)
        terms.append(torch.where(rng.keep32(idx, *stream), d, 0.0))
    return partials(terms)


def rescale_factor(l1: float, kept: float) -> float:
    """‖δ‖₁/‖δ⊙mask‖₁, or 1 when either norm is below 1e-7 (§2.7)."""
    return l1 / kept if l1 >= RESCALE_EPS and kept >= RESCALE_EPS else 1.0


def _combine(b: torch.Tensor, deltas: list[torch.Tensor], weights: list[float], consensus: bool,
             normalize: bool, lam: float, out_dtype: torch.dtype) -> torch.Tensor:
    """Weighted deltas, sign election, normalisation, λ: the shared tail of every preset."""
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


@fusable
def _kernel_random(base: torch.Tensor, xs: list[torch.Tensor], streams: Streams, scales: list[float],
                   weights: list[float], consensus: bool, normalize: bool, lam: float,
                   dtype: torch.dtype, out_dtype: torch.dtype) -> torch.Tensor:
    """DARE: δᵢ kept where hash < threshold, times its rescale factor (scales), then the common tail."""
    b = base.reshape(-1).to(dtype)
    idx = torch.arange(b.numel(), dtype=torch.int32, device=b.device)
    deltas = [torch.where(rng.keep32(idx, *stream), (x.reshape(-1).to(dtype) - b) * s, 0.0)
              for x, stream, s in zip(xs, streams, scales)]
    return _combine(b, deltas, weights, consensus, normalize, lam, out_dtype)


@fusable
def _kernel_masked(base: torch.Tensor, xs: list[torch.Tensor], masks: list[torch.Tensor | None], scales: list[float],
                   weights: list[float], consensus: bool, normalize: bool, lam: float,
                   dtype: torch.dtype, out_dtype: torch.dtype) -> torch.Tensor:
    """Task arithmetic / TIES: δᵢ (optionally magnitude-masked and L1-rescaled), then the common tail."""
    b = base.reshape(-1).to(dtype)
    deltas = []
    for x, m, s in zip(xs, masks, scales):
        d = x.reshape(-1).to(dtype) - b
        if s != 1.0:
            d = d * s
        deltas.append(d if m is None else torch.where(m.reshape(-1), d, 0.0))
    return _combine(b, deltas, weights, consensus, normalize, lam, out_dtype)


def _bits(x: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (x.reshape(-1).to(dtype) - b).abs().to(torch.float32).view(torch.int32)  # _sparsify.magnitude_bits


@fusable
def _count_equal(base: torch.Tensor, x: torch.Tensor, above: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (_bits(x, base.reshape(-1).to(dtype), dtype) == above).sum()


@fusable
def _kernel_magnitude(base: torch.Tensor, xs: list[torch.Tensor], aboves: list[torch.Tensor | None],
                      tie_ends: list[torch.Tensor], scales: list[float], weights: list[float], consensus: bool,
                      normalize: bool, lam: float, dtype: torch.dtype, out_dtype: torch.dtype) -> torch.Tensor:
    """TIES in one fused pass: δᵢ kept where the float32 bits of |δᵢ| exceed its cut (`aboves`: 0-d int32
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
    return _combine(b, deltas, weights, consensus, normalize, lam, out_dtype)


def _magnitude_apply(call: MergeCall, others: list[int], weights: list[float], consensus: bool, normalize: bool,
                     lam: float) -> torch.Tensor:
    """TIES-style magnitude pruning over the whole tensor, in chunks: exact cut per model first (two
    histogram passes), then, if `rescale`, the kept L1 norm (one pass), then the merge chunk by chunk.

    Where a cut must choose among equal magnitudes and mergekit computes in our precision, the choice is
    mergekit's (its whole-tensor argsort, `_sparsify.mergekit_selection`); otherwise ties go to the earliest
    elements, which the fused kernel encodes as a count (`_tie_end`)."""
    base = call.xs[call.base].reshape(-1)
    xs = [call.xs[i].reshape(-1) for i in others]
    n = base.numel()
    step = _sparsify.CHUNK

    def delta(x: torch.Tensor, s: int, e: int) -> torch.Tensor:
        return x[s:e].to(call.dtype) - base[s:e].to(call.dtype)

    densities = [float(call.per_input[i]["density"]) for i in others]
    cuts = [_sparsify.magnitude_cut(lambda s, e, x=x: _sparsify.magnitude_bits(delta(x, s, e)), n, density)
            for x, density in zip(xs, densities)]
    chosen: list[torch.Tensor | None] = [None] * len(xs)  # mergekit's whole-tensor selection, where it differs
    if mergekit_precision(call) and n <= _sparsify.PARITY_MAX_ELEMS:
        for j, (x, cut) in enumerate(zip(xs, cuts)):
            if cut is not None and cut.chooses:
                w = _sparsify.gather_float32(lambda s, e, x=x: delta(x, s, e).abs(), n)
                chosen[j] = _sparsify.mergekit_selection(w, "top", max(1, int(densities[j] * n))).to(base.device)
    seen = [0] * len(xs)

    def mask(j: int, d: torch.Tensor, s: int, e: int) -> torch.Tensor | None:
        """Model j's keep mask over [s, e) (chunks in order; `seen` carries the ties met so far)."""
        if chosen[j] is not None:
            return chosen[j][s:e]
        if cuts[j] is None:
            return None
        m, seen[j] = cuts[j].mask(_sparsify.magnitude_bits(d), seen[j])
        return m

    scales = [1.0] * len(xs)
    if call.shared["rescale"]:
        for j, x in enumerate(xs):
            if cuts[j] is None:
                continue
            sums = Sums(2)
            seen[j] = 0
            for s in range(0, n, step):
                d = delta(x, s, min(n, s + step))
                sums.add(partials([d.abs(), torch.where(mask(j, d, s, min(n, s + step)), d, 0.0).abs()]))
            scales[j] = rescale_factor(*sums.values().tolist())
    out = call.out if call.out is not None else torch.empty(n, dtype=call.out_dtype, device=base.device)
    if any(m is not None for m in chosen):
        seen = [0] * len(xs)
        for s in range(0, n, step):
            e = min(n, s + step)
            masks = [mask(j, delta(x, s, e), s, e) for j, x in enumerate(xs)]
            _kernel_masked(base[s:e], [x[s:e] for x in xs], masks, scales, weights, consensus, normalize, lam,
                           call.dtype, call.out_dtype, out=out[s:e])
        return out
    # the cut's bit pattern as a tensor (see rng.Stream32.tensors: no 64-bit widening in compiled kernels)
    aboves = [None if cut is None or cut.above < 0 else torch.tensor(cut.above, dtype=torch.int32, device=base.device)
              for cut in cuts]
    ends = [_tie_end(base, x, cut, above, n, step, call.dtype) for x, cut, above in zip(xs, cuts, aboves)]
    for s in range(0, n, step):
        e = min(n, s + step)
        _kernel_magnitude(base[s:e], [x[s:e] for x in xs], aboves,
                          [torch.tensor(min(max(end - s, 0), e - s), dtype=torch.int32) for end in ends],
                          scales, weights, consensus, normalize, lam, call.dtype, call.out_dtype, out=out[s:e])
    return out


def mergekit_precision(call: MergeCall) -> bool:
    """Whether mergekit 0.1.5 computes this call in mergebot's precision: it works in the inputs' dtype, so
    only float32/float64 inputs (after `dtype:`) give it the same deltas, hence the same equal magnitudes."""
    return all(x.dtype == call.dtype for x in call.xs)


def _tie_end(base: torch.Tensor, x: torch.Tensor, cut: _sparsify.MagnitudeCut | None, above: torch.Tensor | None,
             n: int, step: int, dtype: torch.dtype) -> int:
    """The flat index after the last tie the cut keeps: its `ties` entries equal to the cut are the earliest
    ones. Counted chunk by chunk (fused) up to the chunk where they run out, then located in it."""
    if cut is None or above is None or cut.ties <= 0:
        return 0
    need = cut.ties
    for s in range(0, n, step):
        e = min(n, s + step)
        count = int(_count_equal(base[s:e], x[s:e], above, dtype))
        if count >= need:
            eq = _bits(x[s:e], base[s:e].to(dtype), dtype) == above
            return s + int(eq.nonzero()[need - 1]) + 1
        need -= count
    return n


def _make(preset: Preset):
    def streams(call: MergeCall) -> Streams:
        base = call.xs[call.base]
        return [rng.Stream32.of(call.keys[i], call.start, base.numel(),
                                rng.threshold(float(call.per_input[i]["density"]))).tensors(base.device)
                for i in call.others]

    def reduce(call: MergeCall) -> Sums:
        if preset.sparsifier != "random" or not call.shared["rescale"] or not call.others:
            return Sums(0)
        xs = [call.xs[i] for i in call.others]
        return Sums.of(_l1_sums(call.xs[call.base], xs, streams(call), call.dtype))

    def apply(call: MergeCall, totals: torch.Tensor | None) -> torch.Tensor:
        base = call.xs[call.base]
        others = call.others
        if not others:
            return base.to(call.out_dtype).reshape(-1)
        xs = [call.xs[i] for i in others]
        weights = [float(call.per_input[i]["weight"]) for i in others]
        shape_out = base.reshape(-1).shape
        consensus = preset.consensus == "sum"
        normalize = bool(call.shared["normalize"])
        lam = float(call.shared["lambda"])
        if preset.sparsifier == "random" and call.rng == "mergekit":
            masks, scales = _mergekit_order_masks(call, others)
            out = _kernel_masked(base, xs, masks, scales, weights, consensus, normalize, lam, call.dtype,
                                 call.out_dtype, out=call.out)
        elif preset.sparsifier == "random":
            scales = [rescale_factor(float(totals[2 * j]), float(totals[2 * j + 1]))
                      if totals is not None and totals.numel() else 1.0 for j in range(len(weights))]
            out = _kernel_random(base, xs, streams(call), scales, weights, consensus, normalize, lam, call.dtype,
                                 call.out_dtype, out=call.out)
        elif preset.sparsifier == "magnitude":
            out = _magnitude_apply(call, others, weights, consensus, normalize, lam)
        else:
            out = _kernel_masked(base, xs, [None] * len(xs), [1.0] * len(xs), weights, consensus, normalize, lam,
                                 call.dtype, call.out_dtype, out=call.out)
        return out.reshape(shape_out)

    return reduce, apply


def _mergekit_order_masks(call: MergeCall, others: list[int]) -> tuple[list[torch.Tensor | None], list[float]]:
    """DARE masks drawn as mergekit 0.1.5 draws them (§2.7): torch's global RNG (seeded once per run), one
    `bernoulli(full_like(δ, density))` per non-base model in config order, in the work dtype mergekit uses
    on CPU (bf16 stays bf16, other floats float32). The executor visits tensors in sorted-name order, so the
    masks are mergekit's bits; the math after them stays in float32."""
    base = call.xs[call.base].reshape(-1)
    masks: list[torch.Tensor | None] = []
    scales: list[float] = []
    for i in others:
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
            scale = rescale_factor(*Sums.of_terms([d.abs(), torch.where(keep, d, 0.0).abs()]).values().tolist())
        masks.append(keep)
        scales.append(scale)
    return masks, scales


def family_params(normalize: bool, rescale: bool, *extra: Param) -> tuple[Param, ...]:
    """The parameters every generalised task-arithmetic method declares (§2.7), plus its own extras."""
    return (
        Param("weight", float, "non_base"),
        Param("density", float, "non_base", 1.0, lo=0.0, hi=1.0),
        *extra,
        Param("normalize", bool, "shared", normalize),
        Param("rescale", bool, "shared", rescale),
        Param("int8_mask", bool, "shared", False),  # no numerical effect (§2.7)
        Param("lambda", float, "shared", 1.0),
    )


def _preset_method(name: str, pretty: str, url: str, preset: Preset) -> MergeMethod:
    reduce, apply = _make(preset)

    def chunkable_for(shared: dict[str, Any], per_input: list[dict[str, Any]]) -> bool:
        if preset.sparsifier != "magnitude":
            return True
        # Magnitude top-k is global over the tensor: the method then gets the whole tensor (as zero-copy views)
        # and works through it in chunks itself (_magnitude_apply).
        return all(float(p.get("density", 1.0)) >= 1 for p in per_input if "density" in p)

    return MergeMethod(
        name=name,
        pretty=pretty,
        url=url,
        params=family_params(preset.normalize, preset.rescale),
        base="required",
        apply=apply,
        reduce=reduce if preset.sparsifier == "random" else None,
        uses_rng=preset.sparsifier == "random",
        extra={"chunkable_for": chunkable_for, "preset": preset},
    )


METHODS = [
    _preset_method("task_arithmetic", "Task Arithmetic", "https://arxiv.org/abs/2212.04089",
                   Preset(None, None, False, False)),
    _preset_method("ties", "TIES", "https://arxiv.org/abs/2306.01708", Preset("sum", "magnitude", True, False)),
    _preset_method("dare_ties", "DARE TIES", "https://arxiv.org/abs/2311.03099", Preset("sum", "random", False, True)),
    _preset_method("dare_linear", "Linear DARE", "https://arxiv.org/abs/2311.03099", Preset(None, "random", False, True)),
]
