"""Reproducible randomness for DARE-style methods: a counter-based hash, not a stateful generator.

The draw for element j of output tensor T and model position p is a pure function
    h = mix(mix(j_lo ^ key) ^ (j_hi + golden)),  key = crc32(seed, T, p)
of integers only (murmur3's 32-bit finaliser applied twice, keyed), so it is identical whatever the
execution order, chunking, thread count or device (integer math is exact on CPU and CUDA), and it fuses
into the merge kernel under torch.compile instead of costing a separate pass (performance-notes.md: RNG is
the floor of DARE on CPU). An entry is kept with probability p when h < floor(p·2³²).

All arithmetic stays inside int64 without overflow: 32-bit products are split into 16-bit halves.
"""

from __future__ import annotations

import struct
import zlib

import torch

M32 = 0xFFFFFFFF
M16 = 0xFFFF
GOLDEN = 0x9E3779B9


def stream_key(seed: int, tensor: str, position: int) -> int:
    """32-bit key of one (seed, tensor name, model position) stream."""
    data = struct.pack("<QI", seed & 0xFFFFFFFFFFFFFFFF, position & M32) + tensor.encode()
    return zlib.crc32(data) ^ ((seed >> 32) & M32)


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    lo = h * (c & M16)
    hi = ((h * (c >> 16)) & M16) << 16
    return (lo + hi) & M32


def _mix(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def hash_u32(index: torch.Tensor, key: torch.Tensor | int) -> torch.Tensor:
    """Uniform 32-bit integers (in int64) for element indices `index` of the stream `key`."""
    h = _mix((index & M32) ^ key)
    return _mix(h ^ ((index >> 32) + GOLDEN))


def indices(start: torch.Tensor | int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.arange(count, dtype=torch.int64, device=device) + start


def threshold(p: float) -> int:
    """Integer threshold: keep iff hash < threshold, i.e. with probability p (resolution 2⁻³²)."""
    if p <= 0:
        return 0
    if p >= 1:
        return 1 << 32
    return int(p * 4294967296.0)


def keep_mask(start: int, count: int, key: int, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bernoulli(p) keep mask for elements [start, start+count) of one stream (eager helper for tests)."""
    return hash_u32(indices(start, count, device), key) < threshold(p)
