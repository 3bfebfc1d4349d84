"""Streaming safetensors output: headers computed from the plan, tensors computed straight into the file.

Every output tensor's name, dtype and shape are known before any data exists, so each shard is created at
its final size with its header in place, and memory-mapped. The merge kernels write their results directly
into the mapped file pages (no output buffer, no extra copy, nothing like mergekit's whole-shard buffer,
merge-semantics.md §5.4); pages of a finished tensor are unmapped at once (they stay in the page cache to
be written back), so resident memory does not grow with the output.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergebot.io.safetensors import DTYPE_NAMES

PAGE = mmap.PAGESIZE


@dataclass
class ShardEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Shard:
    entries: list[ShardEntry] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


def assign_shards(entries: list[ShardEntry], max_bytes: int) -> list[Shard]:
    """Greedy in write order: start a new shard when the next tensor would pass max_bytes (§5.4)."""
    shards = [Shard()]
    for e in entries:
        cur = shards[-1]
        if cur.entries and cur.nbytes + e.nbytes > max_bytes:
            cur = Shard()
            shards.append(cur)
        cur.entries.append(e)
    return shards


def shard_filenames(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _header(shard: Shard) -> bytes:
    meta: dict[str, object] = {"__metadata__": {"format": "pt"}}
    off = 0
    for e in shard.entries:
        meta[e.name] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [off, off + e.nbytes]}
        off += e.nbytes
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _check_free_space(directory: Path, need: int) -> None:
    """A clean error before any data is written when the output cannot fit (instead of a SIGBUS when a
    mapped page finds the disk full half-way)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise OSError(errno.ENOSPC, f"no space left on device: the output needs {need / 1e9:.2f} GB, "
                                    f"{free / 1e9:.2f} GB free", str(directory))


def _reserve(fd: int, size: int) -> None:
    """Allocate the shard's blocks now (posix_fallocate): writes through the mapping can then never hit a
    full disk. Filesystems without fallocate keep the sparse file."""
    if size <= 0:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return
        raise


@dataclass
class _Slot:
    shard: int
    entry: ShardEntry
    offset: int  # absolute byte offset in the shard file


class ShardedWriter:
    """Pre-laid-out shards; `view(name)` is the tensor's place in the file; `close()` syncs and indexes."""

    def __init__(self, directory: Path, entries: list[ShardEntry], max_shard_bytes: int, metadata: dict | None = None):
        self.directory = directory
        self.shards = assign_shards(entries, max_shard_bytes)
        self.names = shard_filenames(len(self.shards))
        self.metadata = metadata or {}
        self.slots: dict[str, _Slot] = {}
        self._fds: list[int] = []
        self._maps: list[mmap.mmap | None] = []
        headers = [_header(shard) for shard in self.shards]
        need = sum(len(h) + s.nbytes for h, s in zip(headers, self.shards))
        _check_free_space(directory, need)
        for si, (name, shard, header) in enumerate(zip(self.names, self.shards, headers)):
            size = len(header) + shard.nbytes
            fd = os.open(directory / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.ftruncate(fd, size)
            _reserve(fd, size)
            os.pwrite(fd, header, 0)
            self._maps.append(mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) if shard.nbytes else None)
            off = len(header)
            for e in shard.entries:
                if e.name in self.slots:
                    raise RuntimeError(f"output tensor {e.name!r} planned twice")
                self.slots[e.name] = _Slot(si, e, off)
                off += e.nbytes

    def view(self, name: str) -> torch.Tensor:
        """The flat destination of tensor `name` in its shard: write into it."""
        slot = self.slots[name]
        e = slot.entry
        if e.numel == 0:
            return torch.empty(0, dtype=e.dtype)
        return torch.frombuffer(self._maps[slot.shard], dtype=e.dtype, count=e.numel, offset=slot.offset)

    def done(self, name: str) -> None:
        """Unmap a finished tensor's pages: the data stays in the page cache (dirty, written back later)."""
        slot = self.slots[name]
        mm = self._maps[slot.shard]
        if mm is None or slot.entry.nbytes == 0:
            return
        start = slot.offset - slot.offset % PAGE
        end = slot.offset + slot.entry.nbytes
        end -= end % PAGE  # whole pages only: a neighbour may still be written
        if end > start:
            try:
                mm.madvise(mmap.MADV_DONTNEED, start, end - start)
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        for mm in self._maps:
            if mm is not None:
                mm.flush()
                mm.close()
        for fd in self._fds:
            os.fsync(fd)
            os.close(fd)
        self._maps, self._fds = [], []
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": sum(s.nbytes for s in self.shards), **self.metadata},
                     "weight_map": {name: self.names[slot.shard] for name, slot in self.slots.items()}}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        for mm in self._maps:
            if mm is not None:
                try:
                    mm.close()
                except (BufferError, ValueError):
                    pass
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._maps, self._fds = [], []
