"""Order-free sums: the same bits whatever the chunking, thread count, compile mode or device.

A float sum depends on the order of its additions, and that order changes with the number of threads a
reduction is split over, with vector width, with Inductor's loop schedule and between CPU and CUDA. The
global sums the methods need (DARE's L1 norms, slerp's dot product, Gram matrices, ...) decide every output
element, so they must not: each is computed here as an integer.

Every term is cut to fixed point inside aligned blocks of BLOCK elements: with e the exponent of the block's
largest magnitude (|v| < 2^(e+1)), q = trunc(v·2^(FRAC−e)) is an exact integer below 2^(FRAC+1), and the
block's Σq is an exact int64 (BLOCK·2^(FRAC+1) ≤ 2^63). Blocks are aligned to the tensor's element 0 and
every chunk size the executor uses is a multiple of BLOCK, so chunking never changes a block. The block
sums (Σq, e) are added as Python integers and rounded to float64 once. Relative error: below 2^-30 in the
worst case (every term truncated by its full quantum), ~1e-13 in practice; float32 accumulation gave ~1e-7.
A term known to be bounded by another (`partials(bound=...)`, e.g. DARE's kept deltas by all deltas) takes that
term's e: the same guarantees, relative to the bounding term's sum.

Terms must come in float32 or float64; a non-finite term makes that sum NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mergebot.engine.fuse import scratch

BLOCK = 1 << 16
FRAC = 46
NONFINITE = 4096  # exponent marking a block that holds inf or NaN

# per dtype: (bit-pattern dtype, mantissa bits, exponent mask, bias, lowest exponent used): the lowest keeps
# the scale 2^(FRAC−e) a normal number of that dtype (float32: FRAC − e ≤ 127)
_FORMATS = {
    torch.float32: (torch.int32, 23, 0xFF, 127, FRAC - 126),
    torch.float64: (torch.int64, 52, 0x7FF, 1023, FRAC - 1022),
}


def _exponents(v: torch.Tensor, nonneg: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a [rows, width] float tensor: the exponent field of its largest |v| (NaN propagates), and e."""
    bits_dtype, mant, mask, bias, lowest = _FORMATS[v.dtype]
    big = v.amax(1) if nonneg else torch.maximum(v.amax(1), -v.amin(1))
    field = (big.view(bits_dtype) >> mant) & mask
    return field, (field.to(torch.int64) - bias).clamp(min=lowest)


def _rows(v: torch.Tensor, field: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """[2, rows] int64: each row's exponent e and Σ trunc(v·2^(FRAC−e)) (rows of a [rows, width] float tensor
    whose magnitudes stay below 2^(e+1))."""
    bits_dtype, mant, mask, bias, _ = _FORMATS[v.dtype]
    scale = ((bias + FRAC - e) << mant).to(bits_dtype).view(v.dtype)  # 2^(FRAC−e), exactly
    if torch.compiler.is_compiling():
        q = (v * scale[:, None]).to(torch.int64)  # a product by a power of two is exact; the cast truncates
    else:  # eagerly: reused buffers (fresh chunk-sized allocations cost more in page faults than the math)
        f = torch.mul(v, scale[:, None], out=scratch("exact_f", v.numel(), v.dtype, v.device).view_as(v))
        q = scratch("exact_q", v.numel(), torch.int64, v.device).view_as(v).copy_(f)
    e = torch.where(field == mask, NONFINITE, e)  # inf or NaN in the row (q is then meaningless)
    return torch.stack([e, q.sum(1)])


def partials(terms: Sequence[torch.Tensor], *, nonneg: bool | Sequence[bool] = False,
             bound: Sequence[int | None] | None = None) -> torch.Tensor:
    """[k, 2, blocks] int64 for k flat terms of equal length: pure tensor code, so it runs eagerly and inside
    compiled kernels alike (with the same integers).

    `nonneg` (one flag, or one per term): the term is never negative, so its largest magnitude is its max.
    `bound[i] = j` (j < i): |terms[i]| ≤ |terms[j]| everywhere (e.g. a masked copy of term j), so term i's blocks
    take term j's exponent instead of a max pass of their own. That saves a pass and, compiled, keeps the term
    inside the fused loop (a term read by a max and a sum was stored to memory and read back); the integers
    stay exact and deterministic, only the quantum may be coarser (2^-46 of term j's largest in the block)."""
    flags = [nonneg] * len(terms) if isinstance(nonneg, bool) else list(nonneg)
    links = list(bound) if bound is not None else [None] * len(terms)
    out = []
    cuts: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per term, per part: (field, e)
    for i, t in enumerate(terms):
        t = t.reshape(-1)
        n = t.numel()
        full = n - n % BLOCK
        views = [t[:full].view(-1, BLOCK)] if full else []
        if n % BLOCK:
            views.append(t[full:].view(1, -1))
        j = links[i]
        if j is not None and not 0 <= j < i:
            raise ValueError(f"bound[{i}] = {j}: must name an earlier term")
        mine = cuts[j] if j is not None else [_exponents(v, flags[i]) for v in views]
        cuts.append(mine)
        parts = [_rows(v, field, e) for v, (field, e) in zip(views, mine)]
        if not n:
            parts.append(torch.zeros(2, 0, dtype=torch.int64, device=t.device))
        out.append(parts[0] if len(parts) == 1 else torch.cat(parts, 1))
    return torch.stack(out)


def partials_of_rows(terms: torch.Tensor, nonneg_rows: int = 0) -> torch.Tensor:
    """`partials` of k terms held as the rows of one [k, n] tensor, n a multiple of BLOCK, the first
    `nonneg_rows` never negative: the same integers, from a handful of batched operations instead of ~20 per
    term. Eager code on blocks that fit in cache pays per operation, not per element (an exact Gram matrix of
    two task vectors in 256K-element slices: ~50 ms per 16M elements, against 122 ms term by term in 1M slices)."""
    k, n = terms.shape
    if n % BLOCK:
        raise ValueError(f"partials_of_rows: row length {n} is not a multiple of {BLOCK}")
    v = terms.view(-1, BLOCK)  # term-major: rows [t·blocks, (t+1)·blocks) belong to term t
    split = nonneg_rows * (n // BLOCK)
    big = v.amax(1)
    if split < big.numel():  # signed terms: the largest magnitude may be a negative value
        big[split:] = torch.maximum(big[split:], v[split:].amin(1).neg_())
    bits_dtype, mant, mask, bias, lowest = _FORMATS[v.dtype]
    field = (big.view(bits_dtype) >> mant) & mask
    e = (field.to(torch.int64) - bias).clamp(min=lowest)
    return _rows(v, field, e).view(2, k, -1).transpose(0, 1)


def partials_of_pairs(terms: torch.Tensor) -> torch.Tensor:
    """`partials` of 2k non-negative terms held as the rows of one [2k, n] tensor (n a multiple of BLOCK), each
    odd row bounded by the even row before it (`bound=[None, 0, None, 2, ...]`: a masked copy, as DARE's kept
    deltas): the same integers, from one max, one product, one conversion and one sum for all of them instead of
    ~15 small operations per term (eager DARE's sums: ~4 ns per element for two models term by term)."""
    k, n = terms.shape
    if n % BLOCK or k % 2:
        raise ValueError(f"partials_of_pairs: {k} rows of {n}: need an even row count and whole {BLOCK}-blocks")
    v = terms.view(k, n // BLOCK, BLOCK)
    bits_dtype, mant, mask, bias, lowest = _FORMATS[v.dtype]
    field = (v[0::2].amax(2).view(bits_dtype) >> mant) & mask  # [k/2, blocks]: the bounding rows' exponents
    field = field.repeat_interleave(2, 0)
    e = (field.to(torch.int64) - bias).clamp(min=lowest)
    scale = ((bias + FRAC - e) << mant).to(bits_dtype).view(v.dtype)  # 2^(FRAC−e), exactly
    f = torch.mul(v, scale[:, :, None], out=scratch("exact_f", v.numel(), v.dtype, v.device).view_as(v))
    q = scratch("exact_q", v.numel(), torch.int64, v.device).view_as(v).copy_(f)
    e = torch.where(field == mask, NONFINITE, e)
    return torch.stack([e, q.sum(2)], 1)


class Sums:
    """Exact running totals of k quantities (a reduce's result): add chunks' partials in any order, read them
    once as float64. `shape` restores a matrix (e.g. a Gram matrix) from its k entries."""

    __slots__ = ("ints", "nonfinite", "shape")

    def __init__(self, k: int, shape: tuple[int, ...] | None = None):
        self.ints = [0] * k  # Σ q·2^(e − LOW), exactly
        self.nonfinite = [False] * k
        self.shape = shape if shape is not None else (k,)

    LOW = -1200  # below every block exponent (float64 subnormals reach −1074)

    @classmethod
    def of(cls, part: torch.Tensor, shape: tuple[int, ...] | None = None) -> Sums:
        """From `partials(...)` ([k, 2, blocks])."""
        s = cls(part.shape[0], shape)
        s.add(part)
        return s

    @classmethod
    def of_terms(cls, terms: Sequence[torch.Tensor], shape: tuple[int, ...] | None = None) -> Sums:
        return cls.of(partials(terms), shape)

    @classmethod
    def of_counts(cls, counts: Sequence[int]) -> Sums:
        """Integer quantities (e.g. element counts), exact already."""
        s = cls(len(counts))
        s.ints = [int(c) << (FRAC - cls.LOW) for c in counts]  # as if one block with e = FRAC
        return s

    @classmethod
    def cat(cls, *parts: Sums) -> Sums:
        """The quantities of several Sums, one after the other (flat)."""
        s = cls(0)
        for p in parts:
            s.ints += p.ints
            s.nonfinite += p.nonfinite
        s.shape = (len(s.ints),)
        return s

    def add(self, part: torch.Tensor) -> None:
        rows = part.cpu().tolist()
        for j, (exps, qs) in enumerate(rows):
            acc = 0
            for e, q in zip(exps, qs):
                if e == NONFINITE:
                    self.nonfinite[j] = True
                elif q:
                    acc += q << (e - self.LOW)
            self.ints[j] += acc

    def __add__(self, other: Sums) -> Sums:
        out = Sums(len(self.ints), self.shape)
        out.ints = [a + b for a, b in zip(self.ints, other.ints)]
        out.nonfinite = [a or b for a, b in zip(self.nonfinite, other.nonfinite)]
        return out

    def values(self) -> torch.Tensor:
        """The totals as float64 (one rounding each), in `shape`."""
        vals = [math.nan if bad else _to_float(v, self.LOW - FRAC) for v, bad in zip(self.ints, self.nonfinite)]
        return torch.tensor(vals, dtype=torch.float64).reshape(self.shape)


def _to_float(v: int, exp: int) -> float:
    """v·2^exp as a float64 (overflow: ±inf)."""
    if not v:
        return 0.0
    extra = max(0, abs(v).bit_length() - 64)
    try:
        return math.ldexp(float(v >> extra if v > 0 else -((-v) >> extra)), exp + extra)
    except OverflowError:
        return math.copysign(math.inf, v)


def totals(reduced: Sums | torch.Tensor | None) -> torch.Tensor | None:
    """What a method's `apply` receives from its `reduce`: float64 totals (None when there was no reduce)."""
    return reduced.values() if isinstance(reduced, Sums) else reduced
