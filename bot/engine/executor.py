"""Runs a plan tensor by tensor: views from mmap'd inputs, bounded chunks, float32 math, results stored
straight into the mmap'd output file.

Large tensors are cut into chunks of CHUNK elements along their flattened order. Elementwise methods run
chunk by chunk; two-phase methods (slerp's norms, DARE's L1 rescale) sum their `reduce` over every chunk
first, then `apply` chunk by chunk; methods that need a whole tensor get it. Memory therefore stays near a
few chunks whatever the model or shard size.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mergebot import startup
from mergebot.engine import exact, fuse
from mergebot.engine.methods.base import MergeCall, MergeMethod
from mergebot.engine.plan import Plan, TensorJob
from mergebot.engine.rng import stream_key
from mergebot.errors import ModelError
from mergebot.io.writer import ShardedWriter
from mergebot.tokenizer.align import align_inputs

CHUNK = 1 << 24  # 16M elements: 64 MB per float32 working tensor; divides 2**32 (see mergebot.engine.rng)
EAGER_CHUNK = 1 << 20  # eager kernels: 4 MB float32 buffers that stay in cache across their passes
# On a GPU every chunk crosses the host-device link once per pass (twice for two-phase methods), while the
# math runs at device-memory speed: chunks as big as a 1B model's embedding (256 MB in float32), so most
# tensors go over once, whole. dare_ties of three 1.1B models on an H100: engine 5.8 s with 1M chunks, 3.6 s.
CUDA_CHUNK = 1 << 26
# chunks are whole blocks of the exact sums, so a reduce gives the same integers whatever the chunking
assert CHUNK % exact.BLOCK == EAGER_CHUNK % exact.BLOCK == CUDA_CHUNK % exact.BLOCK == 0


@dataclass
class RunStats:
    tensors: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    compiled: bool = False


def _inputs(plan: Plan, job: TensorJob, dtype: torch.dtype | None) -> list[torch.Tensor]:
    xs = []
    for inp in job.inputs:
        x = plan.models[inp.model].get(inp.tensor)
        if dtype is not None and x.dtype != dtype and x.dtype.is_floating_point:
            x = x.to(dtype)  # `dtype:` casts every loaded tensor first (§5.2)
        xs.append(x)
    if job.align is not None:  # vocabulary-indexed: one aligned copy per input, before the method (§4.3)
        xs = align_inputs(job.align, xs)
    return xs


def run_plan(plan: Plan, writer: ShardedWriter, *, load_dtype: torch.dtype | None, seed: int,
             device: torch.device, progress: Callable[[int], None] | None = None, compile: str = "auto",
             rng: str = "hash") -> RunStats:
    """`rng="mergekit"`: the plan's jobs must be in sorted-name order (see mergebot.builds.dense); torch's global RNG is
    seeded here once, as mergekit's --random-seed does, and random methods get whole tensors."""
    stats = RunStats()
    mergekit_rng = rng == "mergekit" and plan.method.uses_rng
    stats.compiled = fuse.configure(compile, sum(j.numel * len(j.inputs) for j in plan.jobs),
                                    plan.method.fuse and not mergekit_rng, device.type, plan.method.name)
    startup.settle()  # the imports are done (the compiler's too): the collector runs again, on new objects only
    if mergekit_rng:
        torch.manual_seed(seed)
    start = time.perf_counter()
    method = plan.method
    jobs = plan.jobs
    for k, job in enumerate(jobs):
        if k + 1 < len(jobs):
            for inp in jobs[k + 1].inputs:
                plan.models[inp.model].prefetch(inp.tensor)
        xs = _inputs(plan, job, load_dtype)
        dest = writer.view(job.name)
        if job.copy:
            for inp, x in zip(job.inputs[1:], xs[1:]):
                if not torch.equal(x, xs[0]):
                    raise ModelError(f"non-floating buffer {job.name!r} differs between {job.inputs[0].model} and "
                                     f"{inp.model}; integer buffers cannot be merged (merge-semantics.md §2.0)")
            dest.copy_(xs[0].reshape(-1))
        else:
            if not _merge(method, job, xs, dest, seed, device, rng):
                _refuse_non_finite(job, xs)
        writer.done(job.name)
        for inp in job.inputs:
            plan.models[inp.model].release(inp.tensor)
        stats.tensors += 1
        stats.bytes_written += job.nbytes
        if progress:
            progress(job.nbytes)
    stats.seconds = time.perf_counter() - start
    if device.type == "cpu" and compile != "off" and plan.method.fuse and not mergekit_rng:
        fuse.remember(plan.method.name)  # this cache has met the method: `auto` compiles it from now on
    return stats


# A float is inf or NaN exactly when its exponent bits are all ones: (bits & mask).max() == mask is one integer
# pass and a reduction, ~25x faster on CPU than isfinite(bf16).all() (which had become 40% of a linear merge).
_EXPONENT = {torch.bfloat16: (torch.int16, 0x7F80), torch.float16: (torch.int16, 0x7C00),
             torch.float32: (torch.int32, 0x7F800000), torch.float64: (torch.int64, 0x7FF0000000000000)}


def _all_finite(t: torch.Tensor) -> bool:
    """In 1M-element steps, through a reused buffer: temporaries stay small beside the chunks."""
    flat = t.reshape(-1)
    spec = _EXPONENT.get(flat.dtype)
    if spec is None:  # float8 and the like: rare enough for torch's own test
        return all(bool(torch.isfinite(flat[s:s + EAGER_CHUNK]).all()) for s in range(0, flat.numel(), EAGER_CHUNK))
    itype, mask = spec
    bits = flat.view(itype)
    for s in range(0, bits.numel(), EAGER_CHUNK):
        part = bits[s:s + EAGER_CHUNK]
        exponent = fuse.scratch("finite", part.numel(), itype, part.device)
        if int(torch.bitwise_and(part, mask, out=exponent).max()) == mask:
            return False
    return True


class _Finite:
    """Whether every stored chunk of a tensor is finite, checked as each chunk is stored (still in cache, or on
    the GPU before it crosses the link) rather than in a second pass over the output: that pass took a third of
    a 2B-parameter dare_ties on an H200. On a GPU the flag stays on the device: one sync per tensor."""

    def __init__(self) -> None:
        self.ok = True
        self.flag: torch.Tensor | None = None

    def check(self, t: torch.Tensor) -> None:
        if not t.is_floating_point():
            return
        if t.device.type == "cpu":
            self.ok = self.ok and _all_finite(t)
        else:
            part = torch.isfinite(t).all()
            self.flag = part if self.flag is None else self.flag & part

    def result(self) -> bool:
        return self.ok and (self.flag is None or bool(self.flag))


def _refuse_non_finite(job: TensorJob, xs: list[torch.Tensor]) -> None:
    """A merge of finite inputs must be finite: inf/NaN out of finite weights means a config that divides by
    a zero weight sum or overflows the output dtype, and such a model must never be written or published."""
    if all(_all_finite(x) for x in xs if x.is_floating_point()):
        raise ModelError(f"tensor {job.name!r}: the merge produced inf or NaN from finite inputs (weights summing "
                         "to zero, or values beyond the output dtype's range?); nothing was written")


def _call(job: TensorJob, xs: list[torch.Tensor], dest: torch.Tensor, start: int, count: int, seed: int,
          method: MergeMethod, device: torch.device, rng: str = "hash") -> MergeCall:
    # Always flat (rank 1): the methods here are shape-agnostic, and one rank means one compiled graph.
    chunk = [x.reshape(-1)[start:start + count].to(device, non_blocking=True) for x in xs]
    keys = [stream_key(seed, job.name, i.position) for i in job.inputs] if method.uses_rng else []
    out = dest[start:start + count] if device.type == "cpu" else None
    shape = tuple(job.shape) if count == job.numel else (count,)
    return MergeCall(chunk, job.base, job.shared, job.per_input, dtype=job.compute_dtype, out_dtype=job.out_dtype,
                     start=start, keys=keys, out=out, shape=shape, name=job.name, rng=rng)


def _store(result: torch.Tensor, dest: torch.Tensor, start: int, count: int, finite: _Finite) -> None:
    """Store one chunk's result and check what was stored (in the output dtype: a float32 result may overflow
    a narrower one). A GPU result is cast and checked on the GPU, then crosses the link in the output dtype."""
    target = dest[start:start + count]
    if result.device != target.device:
        stored = result.reshape(-1).to(target.dtype)
        finite.check(stored)
        target.copy_(stored)
        return
    if result.data_ptr() != target.data_ptr():
        target.copy_(result.reshape(-1))
    finite.check(target)


def chunk_override() -> int | None:
    """MERGEBOT_CHUNK_ELEMS: elements per chunk instead of the defaults (a tuning and testing knob; the
    result's bytes never depend on it). A positive multiple of the exact sums' block."""
    raw = os.environ.get("MERGEBOT_CHUNK_ELEMS")
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0 or value % exact.BLOCK:
        raise ModelError(f"MERGEBOT_CHUNK_ELEMS={raw[:40]!r}: must be a positive multiple of {exact.BLOCK}")
    return value


def _merge(method: MergeMethod, job: TensorJob, xs: list[torch.Tensor], dest: torch.Tensor, seed: int,
           device: torch.device, rng: str = "hash") -> bool:
    """Merge one tensor into `dest`; whether every stored value is finite."""
    n = job.numel
    finite = _Finite()
    if device.type != "cpu":
        chunk = CUDA_CHUNK
    else:
        chunk = CHUNK if fuse.enabled() or not method.chunkable_for(job.shared, job.per_input) else EAGER_CHUNK
    chunk = chunk_override() or chunk
    whole = not method.chunkable_for(job.shared, job.per_input) or (rng == "mergekit" and method.uses_rng)
    if n <= max(chunk, method.whole_max) or whole:
        _store(method.merge(_call(job, xs, dest, 0, n, seed, method, device, rng)), dest, 0, n, finite)
        return finite.result()
    bounds = [(s, min(chunk, n - s)) for s in range(0, n, chunk)]
    totals = None
    if method.reduce is not None:
        sums = None
        for s, c in bounds:
            part = method.reduce(_call(job, xs, dest, s, c, seed, method, device))
            sums = part if sums is None else sums + part
        totals = sums.values() if sums is not None else None
    for s, c in bounds:
        _store(method.apply(_call(job, xs, dest, s, c, seed, method, device), totals), dest, s, c, finite)
    return finite.result()
