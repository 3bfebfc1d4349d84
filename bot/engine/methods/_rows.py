"""Row blocks: how the methods whose vectors are rows stream a whole tensor through bounded memory.

DELLA's per-row ranks (merge-semantics.md §2.7), row-wise nuslerp (§2.3) and filter_wise model_stock (§2.10)
are not chunkable: the executor hands them the whole tensor as zero-copy views of the mapped inputs. They walk
it here in blocks of whole dim-0 slices (a row, along dim 1 or the last dim, lies inside one), converting one
block of each input to the compute dtype at a time, so memory stays near one block whatever the tensor size.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from mergebot.engine import exact
from mergebot.engine.methods.base import MergeCall

# Elements per block, rounded down to whole dim-0 slices (at least one). DELLA, the heaviest, holds ~100 bytes
# per block element (float64 ranks, masks, consensus temporaries): 256K elements keep it near 25 MB. On CPU
# 2**18 and 2**20 ran equally fast, bigger blocks slower (DELLA of three 16M-element matrices: 6.0, 5.7 and
# 6.8 s for 2**18, 2**20, 2**22 on 2 threads; 1.4, 1.4, 2.0 s on 8). On a GPU the executor has already moved
# the whole tensor over, so blocks there are only big enough to keep kernel launches few.
ROW_BLOCK_ELEMS = 1 << 18
CUDA_ROW_BLOCK_ELEMS = 1 << 24
ALIGNED_MAX_ELEMS = 1 << 20  # largest block taken to align rows with the exact sums' blocks

Block = tuple[int, int, tuple[int, ...]]  # flat [start, end) and the block's shape


def row_blocks(shape: tuple[int, ...], n: int, device: torch.device) -> list[Block]:
    """Blocks of whole dim-0 slices of a tensor of `shape` (n elements); below 2-D the tensor is one block.

    Exact sums over the blocks (mergebot.engine.exact) must not depend on the device: blocks are whole multiples of the
    sums' aligned BLOCK when a few slices make one (the usual power-of-two-rich shapes), and otherwise are
    the CPU's size on every device."""
    if len(shape) < 2 or n == 0:
        return [(0, n, (n,))]
    row = n // shape[0]
    aligned = exact.BLOCK // math.gcd(row, exact.BLOCK)  # slices per whole number of BLOCKs
    want = ROW_BLOCK_ELEMS if device.type == "cpu" else CUDA_ROW_BLOCK_ELEMS
    if aligned * row <= ALIGNED_MAX_ELEMS:
        step = max(aligned, want // row // aligned * aligned) * row
    else:
        step = max(1, ROW_BLOCK_ELEMS // row) * row
    return [(s, min(n, s + step), ((min(n, s + step) - s) // row, *shape[1:])) for s in range(0, n, step)]


def map_rows(call: MergeCall, fn: Callable[[list[torch.Tensor], tuple[int, ...], int], torch.Tensor]) -> torch.Tensor:
    """out[s:e] = fn([x[s:e] for x in call.xs], block shape, s) for every row block (flat input slices, still in
    their stored dtype). `out` is the executor's destination when it gives one (then nothing is copied again),
    else a new flat tensor of `call.out_dtype`."""
    xs = [x.reshape(-1) for x in call.xs]
    n = xs[0].numel()
    out = call.out if call.out is not None else torch.empty(n, dtype=call.out_dtype, device=xs[0].device)
    for s, e, shape in row_blocks(call.shape, n, out.device):
        out[s:e].copy_(fn([x[s:e] for x in xs], shape, s).reshape(-1))
    return out


def map_rows_into(call: MergeCall, fn: Callable[[list[torch.Tensor], tuple[int, ...], int, torch.Tensor], None]) -> torch.Tensor:
    """`map_rows` for a block function that stores its result itself: fn(xs, shape, s, dest) fills
    dest = out[s:e] (flat, `call.out_dtype`), so no block result is allocated and copied again."""
    xs = [x.reshape(-1) for x in call.xs]
    n = xs[0].numel()
    out = call.out if call.out is not None else torch.empty(n, dtype=call.out_dtype, device=xs[0].device)
    for s, e, shape in row_blocks(call.shape, n, out.device):
        fn([x[s:e] for x in xs], shape, s, out[s:e])
    return out


# numpy work on rows that runs on one thread (its sorts) is split into ranges of rows; below this many
# elements a split costs more than it saves (a thread hand-off is ~50 µs).
PARALLEL_MIN_ELEMS = 1 << 15
_pool: tuple[int, ThreadPoolExecutor] | None = None  # (workers, pool)


def threaded_rows(part: Callable[[int, int], object], rows: int, elems: int) -> None:
    """part(s, e) for ranges of rows covering [0, rows), one per torch thread, run side by side: numpy lets go
    of the GIL in its sorts, ufuncs and takes but runs each on one core, where torch's own ops use them all.
    Each part must write only its rows, so the result does not depend on the split. (torch ops gain nothing
    here: torch's bincount, split so, ran no faster.)"""
    parts = min(torch.get_num_threads(), rows)
    if parts <= 1 or elems < PARALLEL_MIN_ELEMS:
        part(0, rows)
        return
    global _pool
    if _pool is None or _pool[0] < parts - 1:  # a larger --threads after the first use
        size = max(parts, os.cpu_count() or 1) - 1
        _pool = (size, ThreadPoolExecutor(max_workers=size, thread_name_prefix="rows"))
    cuts = [rows * i // parts for i in range(parts + 1)]
    futures = [_pool[1].submit(part, cuts[i], cuts[i + 1]) for i in range(1, parts)]
    part(cuts[0], cuts[1])  # the calling thread takes the first range
    for f in futures:
        f.result()


RANGE_MIN_ELEMS = 1 << 18


def threaded_ranges(part: Callable[[int, int], object], n: int) -> None:
    """part(a, z) over element ranges covering [0, n), one per torch thread but each of RANGE_MIN_ELEMS or more:
    every numpy call hands the GIL over, so cache-sized ranges (64-128K) split over two threads ran slower than
    on one; from ~256K elements each they run twice as fast."""
    parts = min(torch.get_num_threads(), max(1, n // RANGE_MIN_ELEMS))

    def rows(r0: int, r1: int) -> None:
        for r in range(r0, r1):
            part(n * r // parts, n * (r + 1) // parts)

    threaded_rows(rows, parts, parts * RANGE_MIN_ELEMS)
