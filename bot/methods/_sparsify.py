"""Magnitude pruning (merge-semantics.md §2.7, `magnitude`) in bounded memory.

Keeping the k = max(1, int(density·n)) largest |δ| needs the k-th largest magnitude of the whole tensor. A
plain top-k over a large embedding allocates gigabytes (values + int64 indices); instead the exact threshold
is found by a two-level radix selection over the float32 bit patterns of |δ| (non-negative floats order like
their bits), one chunk at a time: a histogram of the high 16 bits, then of the low 16 bits inside the one
bucket that holds the k-th value. Ties at the threshold (common with bf16 checkpoints, whose deltas repeat)
are broken by element order, so exactly k entries survive, as in mergekit, and deterministically.

The random (DARE) sparsifier needs nothing here: its mask is a hash of the element index (bot.rng).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

CHUNK = 1 << 22


@dataclass
class MagnitudeCut:
    """Keep |δ| bits > `above`, plus the first `ties` elements (in element order) whose bits == `above`."""

    above: int
    ties: int

    def mask(self, bits: torch.Tensor, ties_seen: int) -> tuple[torch.Tensor, int]:
        """Mask for one chunk, given how many ties earlier chunks kept; returns (mask, ties seen after)."""
        keep = bits > self.above
        if self.ties > ties_seen:
            eq = bits == self.above
            rank = torch.cumsum(eq, 0, dtype=torch.int64) + ties_seen  # 1-based rank of each tie
            keep |= eq & (rank <= self.ties)
            ties_seen += int(eq.sum())
        return keep, ties_seen


def magnitude_bits(delta: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of |δ| in float32 (order-preserving for non-negative floats)."""
    return delta.abs().to(torch.float32).view(torch.int32)


def magnitude_cut(bits_of: Callable[[int, int], torch.Tensor], n: int, density: float) -> MagnitudeCut | None:
    """The exact cut keeping k entries; None: keep everything. `bits_of(start, end)` gives a chunk's bits."""
    if density >= 1:
        return None
    if density <= 0 or n == 0:
        return MagnitudeCut(above=(1 << 31) - 1, ties=0)  # no float32 bit pattern is above this
    k = max(1, int(density * n))
    hi = torch.zeros(1 << 15, dtype=torch.int64)
    for s in range(0, n, CHUNK):
        hi += torch.bincount((bits_of(s, min(n, s + CHUNK)) >> 16).reshape(-1), minlength=1 << 15)[: 1 << 15].cpu()
    above = torch.flip(torch.cumsum(torch.flip(hi, [0]), 0), [0])  # above[b] = count with high bits >= b
    bucket = int((above >= k).nonzero().max())
    need = k - (int(above[bucket + 1]) if bucket + 1 < hi.numel() else 0)
    lo = torch.zeros(1 << 16, dtype=torch.int64)
    for s in range(0, n, CHUNK):
        b = bits_of(s, min(n, s + CHUNK)).reshape(-1)
        inside = b[(b >> 16) == bucket]
        if inside.numel():
            lo += torch.bincount((inside & 0xFFFF).long(), minlength=1 << 16).cpu()
    lo_above = torch.flip(torch.cumsum(torch.flip(lo, [0]), 0), [0])
    low = int((lo_above >= need).nonzero().max())
    strictly = int(lo_above[low + 1]) if low + 1 < lo.numel() else 0
    return MagnitudeCut(above=(bucket << 16) | low, ties=need - strictly)
