"""`arcee_fusion` (merge-semantics.md §2.11): keep the other model's changes that matter most.

Δ = x − base. Per row (softmax along the last dim; a 1-D tensor is one row) p = softmax(x) + 1e-8,
q = softmax(base) + 1e-8 and KL_row = Σ p·log(p/q); importance = |Δ|·KL_row. The threshold is
median + 1.5·(Q3 − Q1) of the importance values, with *lower order statistics*: Q(q) = sorted[⌊q·(n−1)⌋]
for q = ¼, ½, ¾ (no interpolation, unlike torch.quantile). out = base + Δ·[importance ≥ threshold].
Rows need the whole tensor, so the method is not chunkable: it gets the whole tensor as views of the mapped
inputs and, above QUANTILE_SAMPLE_SIZE elements, streams it in blocks of whole rows (`_rows`): one pass for
the per-row KL (a vector of rows), the sampled statistics read at their indices, a second pass to merge.

Above 1,000,000 elements the three statistics come from 1,000,000 values sampled with replacement, as in
mergekit 0.1.5. mergebot draws the sample indices from its counter-based hash RNG (mergebot.engine.rng, keyed by the
seed, the tensor name and the model's position), so the result is reproducible from `--random-seed` whatever
the order, threads or device; the sampled quantiles, and so the output of tensors that large, are therefore
not bit-identical to mergekit's (which uses the global torch RNG). Tensors up to 1,000,000 elements are exact.
"""

from __future__ import annotations

import numpy as np
import torch

from mergebot.config.methods import SPECS
from mergebot.engine import rng
from mergebot.engine.fuse import scratch
from mergebot.engine.methods._rows import map_rows_into, row_blocks, threaded_ranges
from mergebot.engine.methods.base import MergeCall, MergeMethod
from mergebot.engine.methods.task_arithmetic.combine import vote_mask, zero_unless

QUANTILE_SAMPLE_SIZE = 1_000_000
KL_EPS = 1e-8
_SECOND_STREAM = 1 << 40  # index offset of the second 32-bit draw per sample (disjoint from the first)


def row_kl(x: torch.Tensor, base: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
    """KL(softmax(x) ‖ softmax(base)) per row (rows along the last dim of `shape`), shape (rows, 1), in `dtype`
    (default x's). The formula's operations in its order, in place in reused buffers: softmax into one, + ε
    into another, p/q, log, ·p (a block's seven fresh temporaries cost a quarter of its time)."""
    dtype = dtype or x.dtype
    rows = (-1, shape[-1]) if len(shape) >= 1 and x.numel() else (1, -1)
    m, dev = x.numel(), x.device
    p = scratch("kl_p", m, dtype, dev).view(rows)
    q = scratch("kl_q", m, dtype, dev).view(rows)
    t = scratch("kl_t", m, dtype, dev).view(rows)
    torch.ops.aten._softmax.out(p.copy_(x.reshape(rows)), -1, False, out=t)
    torch.add(t, KL_EPS, out=p)
    torch.ops.aten._softmax.out(q.copy_(base.reshape(rows)), -1, False, out=t)
    torch.add(t, KL_EPS, out=q)
    return torch.div(p, q, out=q).log_().mul_(p).sum(dim=-1, keepdim=True)


def importance(x: torch.Tensor, base: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """|Δ|·KL_row, flat; rows along the last dim of `shape`."""
    kl = row_kl(x, base, shape)
    width = x.numel() // kl.shape[0] if kl.shape[0] else 0
    return ((x.reshape(-1, width) - base.reshape(-1, width)).abs() * kl).reshape(-1)


def sample_indices(n: int, count: int, key: int, device: torch.device) -> torch.Tensor:
    """`count` uniform indices in [0, n), with replacement, from the hash stream `key` (63 random bits each):
    hash_u32(j) and hash_u32(j + _SECOND_STREAM) for j < count, the latter's high index word being
    _SECOND_STREAM >> 32 (count < 2³¹). Returned sorted: the statistics depend only on the sample's multiset,
    and sorted indices read the tensor in address order (a 1M-index gather from an 11.5M-element matrix in draw
    order took ~3x as long: cache and TLB misses). On the CPU the hash runs in numpy's uint32 lanes."""
    if device.type == "cpu":
        drawn = np.empty(count, dtype=np.uint64)

        def part(a: int, z: int) -> None:  # numpy lets go of the GIL: one range per torch thread
            hi, lo = np.empty(z - a, dtype=np.uint32), np.empty(z - a, dtype=np.uint32)
            rng.hash_words_np(a, key, [0, _SECOND_STREAM >> 32], [hi, lo])
            np.left_shift(hi, np.uint64(31), out=drawn[a:z], dtype=np.uint64)
            np.bitwise_or(drawn[a:z], np.right_shift(lo, np.uint32(1)), out=drawn[a:z], dtype=np.uint64)
            np.remainder(drawn[a:z], np.uint64(max(n, 1)), out=drawn[a:z])

        threaded_ranges(part, count)
        drawn.sort()
        return torch.from_numpy(drawn.view(np.int64))
    j = torch.arange(count, dtype=torch.int32, device=device)
    high, low = rng.hash_u32_words(j, key, [0, _SECOND_STREAM >> 32])
    return torch.sort(((high << 31) | (low >> 1)) % n).values


def threshold(values: torch.Tensor, key: int | None) -> torch.Tensor:
    """median + 1.5·IQR with lower order statistics (sampled above QUANTILE_SAMPLE_SIZE elements). The three
    order statistics come from partial sorts (numpy's introselect; NaN orders last, as in a full sort): a full
    sort of the 1M-element sample was a third of the method's time. One position per partition call, the
    quartiles within the median's halves: numpy's SIMD quickselect serves a single position only (~1 ns per
    element), and several positions in one call ran ~4x slower."""
    flat = values.reshape(-1)
    n = flat.numel()
    if n > QUANTILE_SAMPLE_SIZE:
        flat = flat[sample_indices(n, QUANTILE_SAMPLE_SIZE, key or 0, flat.device)]
        n = QUANTILE_SAMPLE_SIZE
    k1, k2, k3 = (n - 1) // 4, (n - 1) // 2, 3 * (n - 1) // 4
    a = np.array(flat.cpu().numpy())  # a copy: the caller's values keep their order
    a.partition(k2)
    if k1 < k2:
        a[:k2].partition(k1)
    if k3 > k2:
        a[k2 + 1:].partition(k3 - k2 - 1)
    q1, med, q3 = (torch.tensor(a[k], dtype=flat.dtype, device=flat.device) for k in (k1, k2, k3))
    return med + 1.5 * (q3 - q1)


def _apply(call: MergeCall, totals: torch.Tensor | None) -> torch.Tensor:
    other = call.others[0]
    key = call.keys[other] if call.keys else None
    n = call.xs[call.base_at].numel()
    if n > QUANTILE_SAMPLE_SIZE and len(call.shape) >= 2:
        return _streamed(call, other, key)
    return _whole(call, other, key)


def _whole(call: MergeCall, other: int, key: int | None) -> torch.Tensor:
    base = call.xs[call.base_at].reshape(-1).to(call.dtype)
    x = call.xs[other].reshape(-1).to(call.dtype)
    if x.numel() == 0:
        return base
    imp = importance(x, base, call.shape)
    keep = imp >= threshold(imp, key)
    return base + torch.where(keep, x - base, 0.0)


def _streamed(call: MergeCall, other: int, key: int | None) -> torch.Tensor:
    """The same result in bounded memory: per-row KL by row blocks, the sampled importances gathered at their
    indices (|Δⱼ|·KL of j's row), then base + Δ·[importance ≥ threshold] block by block."""
    xv, bv = call.xs[other].reshape(-1), call.xs[call.base_at].reshape(-1)
    n, width = xv.numel(), call.shape[-1]
    kl = torch.cat([row_kl(xv[s:e], bv[s:e], shape, call.dtype)
                    for s, e, shape in row_blocks(call.shape, n, xv.device)])
    j = sample_indices(n, QUANTILE_SAMPLE_SIZE, key or 0, xv.device)
    sampled = (xv[j].to(call.dtype) - bv[j].to(call.dtype)).abs() * kl.reshape(-1)[j // width]
    cut = threshold(sampled, None)

    def block(xs: list[torch.Tensor], shape: tuple[int, ...], s: int, dest: torch.Tensor) -> None:
        """b + (x − b)·[|x − b|·KL_row ≥ cut] in place in reused buffers, masked by integer bit masks
        (combine.zero_unless; torch's where is ~20x an add on the CPU): the formula's bytes."""
        n, dev, dtype = dest.numel(), dest.device, call.dtype
        b = scratch("af_base", n, dtype, dev).copy_(xs[call.base_at])
        d = scratch("af_delta", n, dtype, dev).copy_(xs[other]).sub_(b)
        vote = torch.abs(d, out=scratch("af_vote", n, dtype, dev))
        vote.view(-1, width).mul_(kl[s // width:(s + n) // width])
        vote.ge_(cut)  # 1.0 where kept (NaN importance: 0.0, as where's comparison)
        dest.copy_(zero_unless(d, vote_mask(vote)).add_(b))

    return map_rows_into(call, block)


# not chunkable; uses_rng: only tensors above QUANTILE_SAMPLE_SIZE elements draw
METHOD = MergeMethod.of(SPECS["arcee_fusion"], apply=_apply, chunkable=False, uses_rng=True, fuse=False)  # eager
