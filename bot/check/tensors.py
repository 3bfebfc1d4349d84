"""Check 1: every output tensor finite, and its L2 norm in a sane range of the same tensor in the parents.

A non-finite value anywhere makes the model unusable (one NaN spreads through every later layer), so it rejects
the merge outright. A norm far from every parent's is only flagged: methods like task arithmetic legitimately
move norms, but a factor of ten usually means weights that overflowed or a sign that flipped. Tensors are read
in bounded chunks from the mmap'd files, so this costs one sequential read of each model and no memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mergebot.io.weights import ModelWeights

CHUNK = 1 << 22  # elements converted to float32 at a time
MAX_LISTED = 20


@dataclass
class NormFlag:
    tensor: str
    ratio: float | None  # None: infinite (the parents' tensor is all zeros, the merge's is not)


@dataclass
class TensorReport:
    """The result of check 1. `worst_ratio` is the merge's norm over the nearest parent norm (nearest in log
    scale), for the tensor where that ratio is farthest from 1."""

    tensors: int = 0
    compared: int = 0
    non_finite_count: int = 0
    non_finite: list[str] = field(default_factory=list)  # the first MAX_LISTED names
    worst_ratio: float | None = None
    worst_tensor: str | None = None
    flagged_count: int = 0
    flagged: list[NormFlag] = field(default_factory=list)
    norm_range: tuple[float, float] = (0.1, 10.0)

    @property
    def finite(self) -> bool:
        return self.non_finite_count == 0


def _stats(weights: ModelWeights, name: str, buf: torch.Tensor) -> tuple[int, float]:
    """(number of non-finite values, sum of squares) of one tensor, chunk by chunk. Chunks of other dtypes are
    converted into `buf`, reused: a fresh float32 allocation per chunk costs more than the arithmetic."""
    flat = weights.get(name).reshape(-1)
    bad, total = 0, 0.0
    for start in range(0, flat.numel(), CHUNK):
        part = flat[start:start + CHUNK]
        chunk = part if part.dtype == torch.float32 else buf[:part.numel()].copy_(part)
        sq = float(torch.dot(chunk, chunk))
        if not math.isfinite(sq):  # a NaN or inf value, or finite values whose squares overflow float32
            here = int((~torch.isfinite(chunk)).sum())
            bad += here
            if here == 0:
                sq = float(torch.dot(chunk.double(), chunk.double()))
        total += sq
    weights.release(name)
    return bad, total


def _floating(weights: ModelWeights, name: str) -> bool:
    return weights.header(name).dtype.is_floating_point


def check_tensors(merge: ModelWeights, parents: list[ModelWeights], norm_range: tuple[float, float]) -> TensorReport:
    lo, hi = norm_range
    report = TensorReport(norm_range=(lo, hi))
    worst_log = -1.0
    buf = torch.empty(CHUNK, dtype=torch.float32)
    for name in sorted(merge.keys()):
        if not _floating(merge, name):
            continue
        report.tensors += 1
        bad, sq = _stats(merge, name, buf)
        if bad:
            report.non_finite_count += 1
            if len(report.non_finite) < MAX_LISTED:
                report.non_finite.append(name)
            continue
        norm = math.sqrt(sq)
        shape = merge.header(name).shape
        parent_norms = []
        for p in parents:
            if name in p.keys() and p.header(name).shape == shape and _floating(p, name):
                pbad, psq = _stats(p, name, buf)
                if not pbad:
                    parent_norms.append(math.sqrt(psq))
        if not parent_norms:
            continue
        report.compared += 1
        ratio = _nearest_ratio(norm, parent_norms)
        distance = math.inf if ratio is None or ratio == 0 else abs(math.log(ratio))
        if distance > worst_log:
            worst_log, report.worst_ratio, report.worst_tensor = distance, ratio, name
        if ratio is None or not lo <= ratio <= hi:
            report.flagged_count += 1
            if len(report.flagged) < MAX_LISTED:
                report.flagged.append(NormFlag(name, ratio))
    return report


def _nearest_ratio(norm: float, parent_norms: list[float]) -> float | None:
    """norm / the parent norm closest to it in log scale; 1.0 when all are zero, None when only parents are."""
    if norm == 0:
        return 1.0 if any(p == 0 for p in parent_norms) else 0.0
    ratios = [norm / p for p in parent_norms if p > 0]
    if not ratios:
        return None
    return min(ratios, key=lambda r: abs(math.log(r)))
