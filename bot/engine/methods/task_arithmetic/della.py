"""DELLA's sparsifier (merge-semantics.md §2.7, `della_magprune`), of `della` and `della_linear`: magnitude-ranked
sampling. Each δᵢ = xᵢ − base is sparsified by `della_keep`: per row (along dim 1; a 1-D
tensor is one row) |δ| is ranked ascending, r̂ = rank/(n−1), and every entry is kept with probability
p = (densityᵢ − εᵢ) + r̂·2εᵢ, so larger changes survive more often. density ≥ 1 keeps everything,
density ≤ 0 nothing; otherwise 0 < density − ε and density + ε < 1 are required (mergekit's ValueError,
here a ModelError naming the tensor, the model and the values: mergebot.config.methods.check_epsilon). With
`rescale` (default true) each pruned δᵢ is multiplied by ‖δᵢ‖₁/‖δᵢ⊙maskᵢ‖₁ (not the paper's 1/p).

Randomness (deliberate difference, see the table at the top of merge-semantics.md): the Bernoulli draw of
element j of model position k is `hash_u32(j, stream_key(seed, tensor, k)) < ⌊p·2³²⌋` (mergebot.engine.rng), so the
result depends only on `--random-seed`, the tensor name and the model's position, never on execution order,
thread count or device. mergekit draws from the global torch RNG in sorted-tensor order; its bits are not
reproduced. Ranks are per row, so a tensor is chunked only when nothing is sampled; otherwise the method gets
the whole tensor and walks it in blocks of whole rows (`_rows`): with `rescale` a first pass sums ‖δᵢ‖₁ and
‖δᵢ⊙maskᵢ‖₁ exactly (mergebot.engine.exact), a second draws the masks again (same ranks, same hash) and merges, so memory stays
near one block whatever the tensor size.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mergebot.config.methods import check_epsilon
from mergebot.engine import rng
from mergebot.engine.exact import BLOCK, Sums, partials_of_pairs
from mergebot.engine.fuse import scratch
from mergebot.engine.methods._linalg import tensor_label
from mergebot.engine.methods._rows import map_rows_into, row_blocks, threaded_rows
from mergebot.engine.methods.base import MergeCall
from mergebot.engine.methods.task_arithmetic.combine import Mix, combine_into, l1_partials, rescale_factor, zero_unless


def descending_order(mag: torch.Tensor) -> torch.Tensor:
    """Indices sorting each row of non-negative magnitudes descending, equal values in element order: exactly
    `torch.sort(mag, dim=-1, descending=True, stable=True).indices`.

    On the CPU as one sort of unique 64-bit keys, (0x7FFFFFFF − float32 bits) << 32 | column: the bits of a
    non-negative float order like its value, the column breaks ties in element order, and the sorted keys'
    low words are the order itself. numpy sorts 64-bit integers with its SIMD quicksort: ~6 ns per element on
    one core, against ~19 for the two-pass 16-bit radix argsort this replaced and more for torch's stable
    comparison sort (DELLA's largest cost). numpy sorts on one thread but lets go of the GIL, so the rows are
    split into one range per torch thread (`_rows.threaded_rows`)."""
    if (mag.device.type != "cpu" or mag.dtype != torch.float32 or mag.dim() != 2 or mag.shape[-1] < 2
            or mag.shape[-1] > 1 << 32 or torch.compiler.is_compiling()):
        return torch.sort(mag, dim=-1, descending=True, stable=True).indices
    bits = mag.contiguous().numpy().view(np.uint32)
    out = np.empty(bits.shape, dtype=np.int64)
    tmp = np.empty(bits.shape, dtype=np.uint32)
    threaded_rows(lambda s, e: _sorted_keys_order(bits[s:e], out[s:e], tmp[s:e]), bits.shape[0], bits.size)
    return torch.from_numpy(out)


_COLUMNS: dict[int, np.ndarray] = {}
KEEP_STEP = 1 << 17  # elements per step of `_keep_rows_np` (128K: 3-10% faster than whole ranges, 64K slower)


def _sorted_keys_order(bits: np.ndarray, out: np.ndarray, tmp: np.ndarray) -> None:
    """descending_order of a few rows of float32 bit patterns (uint32; the sign bit is ignored, as |x|) into
    `out` (int64, contiguous), with `tmp` (uint32, like bits) as scratch; numpy only (it runs in a worker
    thread). 0x7FFFFFFF − (bits & 0x7FFFFFFF) = ~bits & 0x7FFFFFFF."""
    n = bits.shape[-1]
    col = _COLUMNS.get(n)
    if col is None:
        col = _COLUMNS[n] = np.arange(n, dtype=np.uint64)
    keys = out.view(np.uint64)
    np.invert(bits, out=tmp)
    np.bitwise_and(tmp, np.uint32(0x7FFFFFFF), out=tmp)
    np.left_shift(tmp, np.uint64(32), out=keys, dtype=np.uint64)
    np.bitwise_or(keys, col, out=keys)
    keys.sort(axis=-1)  # unique keys: any sort is the stable one
    np.bitwise_and(keys, np.uint64(0xFFFFFFFF), out=keys)


def _keep_rows_np(d: torch.Tensor, rows: int, width: int, thr: torch.Tensor, s: rng.Stream32) -> torch.Tensor:
    """della_keep for a block of `rows` contiguous rows of `width` on the CPU, as numpy over one range of rows per
    torch thread, in steps of KEEP_STEP elements: the order of each row (`_sorted_keys_order`, of float32 |δ|),
    the thresholds `thr` (int64, by descending position, below 2³²) scattered to the elements, and the hash of
    the offsets compared with them (`rng.hash_below_np`): the same bits as the torch form, with one hand-off to
    the threads instead of one per operation."""
    n = rows * width
    dev = d.device
    mag = d if d.dtype == torch.float32 else scratch("della_m", n, torch.float32, dev).copy_(d)
    bits = mag.numpy().view(np.uint32).reshape(rows, width)
    order = scratch("della_order", n, torch.int64, dev).numpy()
    cut = scratch("della_cut", n, torch.int32, dev).numpy().view(np.uint32)
    tiled = scratch("della_tiled", n, torch.int32, dev).numpy().view(np.uint32)
    h = scratch("della_h", n, torch.int32, dev).numpy().view(np.uint32)
    t = scratch("della_t", n, torch.int32, dev).numpy().view(np.uint32)
    keep = torch.empty(n, dtype=torch.bool)
    flags = keep.numpy()
    tiled.reshape(rows, width)[:] = thr.numpy().astype(np.uint32)  # position p of every row: thr[p]
    offsets = np.arange(rows, dtype=np.int64)[:, None] * width

    step = max(1, KEEP_STEP // width)  # rows per step: its buffers stay in a core's L2 cache between passes

    def part(r0: int, r1: int) -> None:
        for q0 in range(r0, r1, step):
            q1 = min(r1, q0 + step)
            a, z = q0 * width, q1 * width
            o = order[a:z].reshape(q1 - q0, width)
            _sorted_keys_order(bits[q0:q1], o, t[a:z].reshape(q1 - q0, width))
            o += offsets[: q1 - q0]
            cut[a:z][o.reshape(-1)] = tiled[a:z]
            rng.hash_below_np(a, s.lo, s.key, s.hi, cut[a:z], h[a:z], t[a:z], flags[a:z])

    threaded_rows(part, rows, n)
    return keep


def _ranked(delta: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """δ as rows along dim 1 of the real shape, moved last (a 1-D tensor is one row)."""
    x = delta.reshape(shape) if len(shape) >= 2 else delta.reshape(1, -1)
    return x.movedim(1, -1)


def _by_rank(n: int, density: float, epsilon: float, device: torch.device) -> torch.Tensor:
    """p for each position of a row's descending order (float64): ascending rank n − 1 − position,
    r̂ = rank/(n−1) (½ for a single element), p = (density − ε) + r̂·2·ε."""
    p = torch.arange(n - 1, -1, -1, dtype=torch.float64, device=device)
    if n > 1:
        p.div_(n - 1)
    else:
        p.fill_(0.5)
    return p.mul_(2).mul_(epsilon).add_(density - epsilon)


def _scatter_by_rank(delta: torch.Tensor, shape: tuple[int, ...], values: torch.Tensor) -> torch.Tensor:
    """values[position in its row's descending order of |δ|] at every element, flat: the per-element formula
    of a rank, computed once per position (a row's n values) instead of once per element."""
    x = _ranked(delta, shape)
    order = descending_order(x.abs().float())
    out = torch.empty(order.shape, dtype=values.dtype, device=order.device)
    out.scatter_(-1, order, values.expand_as(order))
    return out.movedim(-1, 1).reshape(-1)


def della_probabilities(delta: torch.Tensor, shape: tuple[int, ...], density: float, epsilon: float) -> torch.Tensor:
    """Per-element keep probabilities of della_magprune (§2.7), float64, flat.

    Rows are along dim 1 of the real shape (a 1-D tensor is one row): ranks 0..n−1 of |δ| ascending,
    r̂ = rank/(n−1), p = (density − ε) + r̂·2·ε. A row of a single element (0/0 in mergekit) gets r̂ = ½,
    i.e. p = density.
    """
    n = _ranked(delta, shape).shape[-1]
    return _scatter_by_rank(delta, shape, _by_rank(n, density, epsilon, delta.device))


def della_keep(delta: torch.Tensor, shape: tuple[int, ...], density: float, epsilon: float, key: int,
               start: int = 0) -> torch.Tensor:
    """Bernoulli(p) keep mask of della_magprune, p per element, drawn from the hash stream `key` for elements
    start.. of the flattened tensor: `hash_u32(start + j, key) < ⌊p·2³²⌋`. The integer threshold is computed per
    rank position and scattered; the hash in 32-bit lanes (the same bits): on the CPU for rows of a 1-D or 2-D
    tensor all of it in numpy (`_keep_rows_np`), elsewhere torch's int32 form (rng.keep32)."""
    n = delta.numel()
    width = _ranked(delta, shape).shape[-1]
    thr = _by_rank(width, density, epsilon, delta.device).mul_(4294967296.0).long()
    # the int64 form where the block crosses a 2³² index boundary, or where p may round up to 1 (thr = 2³²
    # does not fit keep32's int32 cut; the checked ε keeps p < 1 up to rounding)
    if (start & rng.M32) + n > 1 << 32 or density + epsilon > 1 - 1e-9:
        thr_all = _scatter_by_rank(delta, shape, thr)
        return rng.hash_u32(torch.arange(n, dtype=torch.int64, device=thr.device) + start, key) < thr_all
    s = rng.Stream32.of(key, start, n, 0)
    if (n and delta.device.type == "cpu" and delta.dtype in (torch.float32, torch.float64) and len(shape) <= 2
            and delta.is_contiguous() and not torch.compiler.is_compiling()):
        return _keep_rows_np(delta.reshape(-1), n // width, width, thr, s)
    cut = _scatter_by_rank(delta, shape, thr.sub_(1 << 31).to(torch.int32))  # keep32 compares unsigned as signed
    dev = cut.device
    work = (scratch("della_h", n, torch.int32, dev), scratch("della_t", n, torch.int32, dev))
    return rng.keep32_into(rng.offsets32(n, dev), s.lo, s.key, s.hi, cut, torch.empty(n, dtype=torch.bool, device=dev),
                           work)


# Keep masks of the first pass, held for the second while they fit: the per-row ranking and the hash are most
# of DELLA's time, so this halves it for every tensor within the budget. On the CPU a mask is held as bits
# (np.packbits, ~0.2 ns per element each way), so the budget covers 8 elements per byte: a 0.86B model's 262M-
# element embedding and head for two models (65 MB), which as bytes (524 MB) were ranked twice, ~a fifth of its
# time; a 70B model's layers. Elsewhere (a GPU) one byte per element.
MASK_CACHE_BYTES = 256 << 20


class _Masks(dict):
    """(block start, model position) -> the first pass's keep mask of that block, packed to bits on the CPU."""

    def put(self, at: tuple[int, int], keep: torch.Tensor) -> None:
        self[at] = (np.packbits(keep.contiguous().numpy()), keep.numel()) if keep.device.type == "cpu" else keep

    def take(self, at: tuple[int, int]) -> torch.Tensor:
        held = self.pop(at)
        if isinstance(held, torch.Tensor):
            return held
        bits, n = held
        return torch.from_numpy(np.unpackbits(bits, count=n).view(np.bool_))


def _mask_cache(n: int, sampled: int, device: torch.device) -> _Masks | None:
    """An empty mask cache when the masks of `sampled` models over n elements fit MASK_CACHE_BYTES."""
    per_byte = 8 if device.type == "cpu" else 1
    return _Masks() if n * sampled <= MASK_CACHE_BYTES * per_byte else None


def _masked(call: MergeCall, xs: list[torch.Tensor], base: torch.Tensor, i: int, shape: tuple[int, ...],
            s: int, cache: _Masks | None = None,
            tag: str = "della_d") -> tuple[torch.Tensor, torch.Tensor | None]:
    """(δᵢ, keepᵢ) of one row block starting at flat offset s, δᵢ in the reused buffer `tag`; keep None: no
    sampling (density ≥ 1 or ≤ 0)."""
    p = call.per_input[i]
    density, epsilon = float(p["density"]), float(p["epsilon"])
    d = scratch(tag, base.numel(), call.dtype, base.device).copy_(xs[i]).sub_(base)
    if density <= 0:
        return d.zero_(), None
    if density >= 1:
        return d, None
    if cache is not None and (s, i) in cache:
        return d, cache.take((s, i))
    return d, della_keep(d, shape, density, epsilon, call.keys[i], call.start + s)


def _l1_scales(call: MergeCall, sampled: list[int], cache: _Masks | None = None) -> dict[int, float]:
    """‖δᵢ‖₁/‖δᵢ⊙keepᵢ‖₁ over the whole tensor (§2.7), 1 where either norm is below 1e-7: the first pass. The
    sums of all models come from one batched call per block (`exact.partials_of_pairs`: rows |δᵢ| and
    |δᵢ⊙keepᵢ|, the same integers as `l1_partials` term by term) where the block is whole exact-sum blocks."""
    sums = {i: Sums(2) for i in sampled}
    xs = [x.reshape(-1) for x in call.xs]
    k = 2 * len(sampled)
    for s, e, shape in row_blocks(call.shape, xs[0].numel(), xs[0].device):
        block = [x[s:e] for x in xs]
        base = scratch("della_base", e - s, call.dtype, xs[0].device).copy_(block[call.base_at])
        rows = scratch("della_l1", k * (e - s), call.dtype, base.device).view(k, e - s) if (e - s) % BLOCK == 0 else None
        for j, i in enumerate(sampled):
            d, keep = _masked(call, block, base, i, shape, s)
            assert keep is not None  # sampled: 0 < density < 1
            if cache is not None:
                cache.put((s, i), keep)
            if rows is None:
                sums[i].add(l1_partials(d, keep))
            else:
                zero_unless(rows[2 * j + 1].copy_(torch.abs(d, out=rows[2 * j])), keep)
        if rows is not None:
            part = partials_of_pairs(rows)
            for j, i in enumerate(sampled):
                sums[i].add(part[2 * j:2 * j + 2])
    return {i: rescale_factor(*sums[i].values().tolist()) for i in sampled}


def apply(call: MergeCall, totals: torch.Tensor | None, mix: Mix) -> torch.Tensor:
    others = call.others
    sampled = []
    for i in others:
        density, epsilon = float(call.per_input[i]["density"]), float(call.per_input[i]["epsilon"])
        if 0 < density < 1:
            check_epsilon(density, epsilon, f"{tensor_label(call)} (input #{i}, the base being #0)")
            sampled.append(i)
    cache = _mask_cache(call.xs[call.base_at].numel(), len(sampled), call.xs[call.base_at].device)
    scales = _l1_scales(call, sampled, cache) if sampled and call.shared["rescale"] else {}

    def block(xs: list[torch.Tensor], shape: tuple[int, ...], s: int, dest: torch.Tensor) -> None:
        n = dest.numel()
        base = scratch("della_base", n, call.dtype, dest.device).copy_(xs[call.base_at])
        deltas = []
        for j, i in enumerate(others):
            d, keep = _masked(call, xs, base, i, shape, s, cache, f"della_d{j}")
            if keep is not None:
                zero_unless(d, keep)
                if scales.get(i, 1.0) != 1.0:
                    d.mul_(scales[i])
            deltas.append(d)
        combine_into(base, deltas, mix.weights, mix.consensus, mix.normalize, mix.lam, dest)

    return map_rows_into(call, block)


def chunkable_when(shared: dict[str, Any], per_input: list[dict[str, Any]]) -> bool:
    """Ranks are per row: a tensor is chunked only when nothing is sampled."""
    return all(not 0 < float(p["density"]) < 1 for p in per_input if "density" in p)
