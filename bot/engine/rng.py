"""Reproducible randomness for DARE-style methods: a counter-based hash, not a stateful generator.

The draw for element j of output tensor T and model position p is a pure function
    h = mix(mix(j_lo ^ key) ^ (j_hi + golden)),  key = crc32(seed, T, p)
of integers only (murmur3's 32-bit finaliser applied twice, keyed), so it is identical whatever the
execution order, chunking, thread count or device (integer math is exact on CPU and CUDA), and it fuses
into the merge kernel under torch.compile instead of costing a separate pass (performance-notes.md: RNG is
the floor of DARE on CPU). An entry is kept with probability p when h < floor(p·2³²).

`hash_u32` keeps all arithmetic inside int64 without overflow (32-bit products split into 16-bit halves);
`keep32` computes the same bits in int32 lanes whose products wrap mod 2³², which vectorises twice as wide
and needs one multiply per step instead of two: the DARE kernels use it (merge kernels are RNG-bound).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np
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


_MIN32 = -(1 << 31)


def signed32(v: int) -> int:
    """v mod 2³² as the int32 value with the same bits."""
    v &= M32
    return v - (1 << 32) if v >= 1 << 31 else v


_C1, _C2 = signed32(0x85EBCA6B), signed32(0xC2B2AE35)


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's finaliser on int32 lanes: logical shifts as arithmetic shift + mask, wrapping products."""
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _C1
    h = h ^ ((h >> 13) & 0x7FFFF)
    h = h * _C2
    return h ^ ((h >> 16) & 0xFFFF)


def hash_u32_words(low: torch.Tensor, key: int, highs: list[int]) -> list[torch.Tensor]:
    """hash_u32(h·2³² + low, key) for each high word h in `highs`, as int64 in [0, 2³²), computed in int32
    lanes (`low`: int32, the index's low word, below 2³¹); the inner mix, which only the low word enters, is
    computed once for all of them. Several times faster eagerly than hash_u32's int64 arithmetic."""
    inner = _mix32(low ^ signed32(key))
    return [_mix32(inner ^ signed32(h + GOLDEN)).to(torch.int64) & M32 for h in highs]


@dataclass(frozen=True)
class Stream32:
    """One stream's constants for `keep32` over the chunk [start, start+count): the int32 forms of the low
    index word, the key, the high-word term and the cut (None: keep all)."""
    lo: int
    key: int
    hi: int
    cut: int | None

    @staticmethod
    def of(key: int, start: int, count: int, thr: int) -> Stream32:
        if (start & M32) + count > 1 << 32:
            raise ValueError(f"chunk [{start}, {start + count}) crosses a 2**32 index boundary")
        cut = None if thr >= 1 << 32 else thr + _MIN32
        return Stream32(signed32(start), signed32(key), signed32((start >> 32) + GOLDEN), cut)

    def args(self) -> tuple[int, int, int, int | None]:
        return self.lo, self.key, self.hi, self.cut

    def tensors(self, device: torch.device | str) -> tuple:
        """The same constants as 0-d int32 tensors, for compiled kernels: Inductor's Triton code takes Python
        ints as 64-bit kernel arguments without narrowing them, which silently turns the hash into 64-bit
        arithmetic (wrong bits on CUDA; found on an H100). Tensors keep their dtype, and need no recompiles."""
        vals = torch.tensor([self.lo, self.key, self.hi, self.cut or 0], dtype=torch.int32, device=device)
        return vals[0], vals[1], vals[2], (None if self.cut is None else vals[3])


def keep32(idx: torch.Tensor, lo, key, hi, cut) -> torch.Tensor:
    """The keep mask `hash_u32(start + idx, key) < thr` for int32 offsets idx = 0..count-1, bit for bit;
    (lo, key, hi, cut) are a Stream32's fields: `args()` (ints) for eager code, `tensors()` in compiled
    kernels."""
    if cut is None:
        return torch.ones_like(idx, dtype=torch.bool)
    h = _mix32((idx + lo) ^ key)
    h = _mix32(h ^ hi)
    return (h ^ _MIN32) < cut  # unsigned h < thr, compared as signed after flipping the top bit


def _mix32_(h: torch.Tensor, t: torch.Tensor) -> None:
    """`_mix32` in place (t: a work buffer like h), the same operations in the same order."""
    for shift, mask, mult in ((16, 0xFFFF, _C1), (13, 0x7FFFF, _C2), (16, 0xFFFF, None)):
        h.bitwise_xor_(torch.bitwise_right_shift(h, shift, out=t).bitwise_and_(mask))
        if mult is not None:
            h.mul_(mult)


def _flipped_hash_into(idx: torch.Tensor, lo: int, key: int, hi: int, work: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """keep32's hash of idx in place in work[0] (work[1]: scratch), top bit flipped: its signed order is the
    hash's unsigned order, so h < cut compares as keep32 does."""
    h, t = work
    torch.add(idx, lo, out=h).bitwise_xor_(key)
    _mix32_(h, t)
    _mix32_(h.bitwise_xor_(hi), t)
    return h.bitwise_xor_(_MIN32)


def keep32_into(idx: torch.Tensor, lo: int, key: int, hi: int, cut: torch.Tensor | int, out: torch.Tensor,
                work: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """`keep32` eagerly into the bool tensor `out`, with two int32 work buffers shaped like idx: the same bits
    with no temporaries (each of keep32's ~20 operations allocated a chunk-sized tensor)."""
    return torch.lt(_flipped_hash_into(idx, lo, key, hi, work), cut, out=out)


def keep32_mask_into(idx: torch.Tensor, lo: int, key: int, hi: int, cut: int | None, mask: torch.Tensor,
                     work: tuple[torch.Tensor, torch.Tensor], wide: torch.Tensor) -> torch.Tensor:
    """`keep32` with a scalar cut as an integer mask (all ones where kept, else 0) in `mask` (int32 or int64,
    shaped like idx): the same bits, with no bool tensor (torch's comparisons into bool are ~6x slower than an
    integer pass on the CPU). The signed compare h < cut is the sign of h − cut in int64 (`wide`: no overflow)."""
    if cut is None:
        return mask.fill_(-1)
    wide.copy_(_flipped_hash_into(idx, lo, key, hi, work)).sub_(cut).bitwise_right_shift_(63)
    return wide if mask is wide else mask.copy_(wide)


_C1U, _C2U = np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35)
_IDX_NP: list[np.ndarray] = [np.arange(1 << 16, dtype=np.uint32)]


def _mix_np(h: np.ndarray, t: np.ndarray) -> None:
    """murmur3's finaliser in place on uint32 lanes (t: scratch like h): wrapping products and logical shifts
    are numpy's uint32 arithmetic, so each step is one pass (the int32 torch form needs a mask per shift)."""
    for shift, mult in ((16, _C1U), (13, _C2U), (16, None)):
        np.bitwise_xor(h, np.right_shift(h, shift, out=t), out=h)
        if mult is not None:
            np.multiply(h, mult, out=h)


HASH_STEP = 1 << 18  # elements per step of hash_below_np (2 MB of work arrays; shorter steps cost more in calls)


def hash_np(first: int, lo: int, key: int, hi: int, h: np.ndarray, t: np.ndarray) -> np.ndarray:
    """keep32's hash of the int32 offsets first .. first+len(h)-1 of a stream (a Stream32's int fields) as
    uint32 in `h` (t: uint32 scratch of the same length): the same bits as `hash_u32`. numpy runs it on one core
    at ~1.7 ns per element, twice torch's int32 form per core, and lets go of the GIL, so callers split a
    piece over threads (each a disjoint range)."""
    n = h.shape[0]
    idx = _IDX_NP[0]  # one read: threads may grow it side by side
    if idx.shape[0] < n:
        idx = _IDX_NP[0] = np.arange(max(n, 2 * idx.shape[0]), dtype=np.uint32)
    np.add(idx[:n], np.uint32((lo + first) & M32), out=h)
    np.bitwise_xor(h, np.uint32(key & M32), out=h)
    _mix_np(h, t)
    np.bitwise_xor(h, np.uint32(hi & M32), out=h)
    _mix_np(h, t)
    return h


def hash_words_np(first: int, key: int, highs: list[int], outs: list[np.ndarray]) -> None:
    """`hash_u32_words` of the low words first .. first+len(outs[0])-1 (below 2³¹) into the uint32 arrays `outs`,
    one per high word, in numpy's uint32 lanes: the inner mix once, then one outer mix per high word. Several
    times faster per core than the torch form eagerly, which was a fifth of an arcee_fusion merge (1M sample
    indices per tensor); it lets go of the GIL, so callers split a range over threads."""
    inner = np.arange(outs[0].shape[0], dtype=np.uint32)
    np.add(inner, np.uint32(first & M32), out=inner)
    np.bitwise_xor(inner, np.uint32(key & M32), out=inner)
    work = np.empty_like(inner)
    _mix_np(inner, work)
    for h, out in zip(highs, outs):
        np.bitwise_xor(inner, np.uint32((h + GOLDEN) & M32), out=out)
        _mix_np(out, work)


def keep_flags_np(first: int, lo: int, key: int, hi: int, cut: int, h: np.ndarray, t: np.ndarray,
                  flags: np.ndarray) -> np.ndarray:
    """keep32 for the int32 offsets first .. first+len(flags)-1 of a stream (a Stream32's int fields, cut not
    None) as 0/1 bytes in `flags` (bool or uint8), with uint32 work arrays h and t of the same length: the
    same bits as `keep32` (`hash_below_np` with the cut as an unsigned threshold)."""
    return hash_below_np(first, lo, key, hi, np.uint32(cut - _MIN32), h, t, flags.view(np.bool_))


def hash_below_np(first: int, lo: int, key: int, hi: int, thr: np.uint32 | np.ndarray, h: np.ndarray,
                  t: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = `hash_np`(offsets first..) < thr (one unsigned threshold, or one per element as a uint32 array like
    h), in steps of HASH_STEP elements whose two work arrays stay in a core's L2 cache between the ~20 passes
    (a 4M-element range on 2 threads: 2.5 -> 1.7-2.0 ns per element)."""
    for a in range(0, out.shape[0], HASH_STEP):
        z = min(out.shape[0], a + HASH_STEP)
        np.less(hash_np(first + a, lo, key, hi, h[a:z], t[a:z]), thr[a:z] if isinstance(thr, np.ndarray) else thr,
                out=out[a:z])
    return out


_offsets: dict[str, torch.Tensor] = {}


def offsets32(count: int, device: torch.device) -> torch.Tensor:
    """0..count-1 as int32, from one cached tensor (a view: never write to it)."""
    have = _offsets.get(str(device))
    if have is None or have.numel() < count:
        have = _offsets[str(device)] = torch.arange(max(count, 1 << 16), dtype=torch.int32, device=device)
    return have[:count]


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
