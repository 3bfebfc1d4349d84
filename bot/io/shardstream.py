"""Output shards handed off as they finish, so the disk holds about one at a time (issue 15, `--stream`).

`StreamingShardWriter` lays shards out exactly as `ShardedWriter` does (same assignment, same headers, tensors
computed into the mapped file: the bytes are identical), but creates a shard's file only when its first tensor
is written and, once its last tensor is done, closes it and gives it to `on_shard` (mergebot.hub.stream
uploads and deletes it; before creating the next one it waits for that upload when the disk could not hold
both). `close()` waits for `on_close` (every upload done: the work directory is renamed
next) and writes the index as `ShardedWriter` does.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Callable
from pathlib import Path

import torch

from mergebot.io.writer import PAGE, ShardedWriter, ShardEntry, _header, _reserve, _Slot, assign_shards, shard_filenames


class StreamingShardWriter(ShardedWriter):
    """ShardedWriter's interface (view / done / close / abort) with one shard file open at a time."""

    def __init__(self, directory: Path, entries: list[ShardEntry], max_shard_bytes: int,
                 on_shard: Callable[[Path, str], None], metadata: dict | None = None,
                 on_create: Callable[[int], None] | None = None, on_close: Callable[[], object] | None = None,
                 before_create: Callable[[Path, int], None] | None = None):
        self.directory = directory
        self.before_create = before_create
        self.shards = assign_shards(entries, max_shard_bytes)
        self.names = shard_filenames(len(self.shards))
        self.metadata = metadata or {}
        self.on_shard, self.on_create, self.on_close = on_shard, on_create, on_close
        self.slots: dict[str, _Slot] = {}
        self._left = [len(s.entries) for s in self.shards]
        self._open: dict[int, tuple[int, mmap.mmap | None]] = {}
        self._finished: set[int] = set()
        for si, shard in enumerate(self.shards):
            off = len(_header(shard))
            for e in shard.entries:
                if e.name in self.slots:
                    raise RuntimeError(f"output tensor {e.name!r} planned twice")
                self.slots[e.name] = _Slot(si, e, off)
                off += e.nbytes

    def _shard(self, si: int) -> mmap.mmap | None:
        """The shard's mapping, creating its file (full size, header in place) on first use."""
        if si not in self._open:
            if si in self._finished:
                raise RuntimeError(f"shard {self.names[si]} written to after it was handed off")
            header = _header(self.shards[si])
            size = len(header) + self.shards[si].nbytes
            if self.before_create is not None:  # e.g. wait until the disk has room (mergebot.hub.stream)
                self.before_create(self.directory, size)
            fd = os.open(self.directory / self.names[si], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.ftruncate(fd, size)
                _reserve(fd, size)
                os.pwrite(fd, header, 0)
                mm = (mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                      if self.shards[si].nbytes else None)
            except BaseException:
                os.close(fd)
                raise
            self._open[si] = (fd, mm)
            if self.on_create is not None:
                self.on_create(size)
        return self._open[si][1]

    def view(self, name: str) -> torch.Tensor:
        slot = self.slots[name]
        mm = self._shard(slot.shard)
        e = slot.entry
        if e.numel == 0 or mm is None:
            return torch.empty(0, dtype=e.dtype)
        return torch.frombuffer(mm, dtype=e.dtype, count=e.numel, offset=slot.offset)

    def done(self, name: str) -> None:
        slot = self.slots[name]
        self._left[slot.shard] -= 1
        if self._left[slot.shard] == 0:
            self._finish(slot.shard)
            return
        mm = self._open[slot.shard][1]
        if mm is not None and slot.entry.nbytes:
            start = slot.offset - slot.offset % PAGE
            end = slot.offset + slot.entry.nbytes
            end -= end % PAGE
            if end > start:
                try:
                    mm.madvise(mmap.MADV_DONTNEED, start, end - start)
                except (OSError, ValueError):
                    pass

    def _finish(self, si: int) -> None:
        self._shard(si)  # a shard whose tensors are all empty still gets its file
        fd, mm = self._open.pop(si)
        try:
            if mm is not None:
                mm.flush()
                mm.close()
            os.fsync(fd)
        finally:
            os.close(fd)
        self._finished.add(si)
        self.on_shard(self.directory / self.names[si], self.names[si])

    def close(self) -> None:
        for si in range(len(self.shards)):
            if si not in self._finished:
                self._finish(si)
        if self.on_close is not None:  # the shards' files must stay where they are until they are handed off
            self.on_close()
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": sum(s.nbytes for s in self.shards), **self.metadata},
                     "weight_map": {name: self.names[slot.shard] for name, slot in self.slots.items()}}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        for fd, mm in self._open.values():
            try:
                if mm is not None:
                    mm.close()
            except (BufferError, ValueError):
                pass
            try:
                os.close(fd)
            except OSError:
                pass
        self._open.clear()
