"""Streaming safetensors output: headers computed from the plan, tensor bytes appended as they come.

Because every output tensor's name, dtype and shape are known before any data exists, each shard's header
(with final offsets) is written first and the data follows in order; RAM never holds a shard (unlike
mergekit, which buffers whole shards, merge-semantics.md §5.4). Writes happen on a background thread so
disk I/O overlaps the math; a bounded queue keeps memory flat.
"""

from __future__ import annotations

import json
import os
import queue
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .loader import DTYPE_NAMES


@dataclass
class ShardEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


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


class ShardedWriter:
    """Writes tensors in plan order into pre-laid-out shards; `close()` fsyncs and writes the index."""

    def __init__(self, directory: Path, entries: list[ShardEntry], max_shard_bytes: int, metadata: dict | None = None):
        self.directory = directory
        self.shards = assign_shards(entries, max_shard_bytes)
        self.names = shard_filenames(len(self.shards))
        self.metadata = metadata or {}
        self._order = [(si, e) for si, s in enumerate(self.shards) for e in s.entries]
        self._pos = 0  # index into _order of the tensor being written
        self._written = 0  # bytes written of the current tensor
        self._files: list[object] = []
        self._q: queue.Queue = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mergebot-writer", daemon=True)
        for name, shard in zip(self.names, self.shards):
            f = open(directory / name, "wb")
            f.write(_header(shard))
            self._files.append(f)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            if self._error is not None:
                continue
            si, data = item
            try:
                self._files[si].write(data)
            except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
                self._error = e

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append (part of) the bytes of tensor `name`; parts must come in order and add up exactly."""
        if self._error is not None:
            raise self._error
        si, entry = self._order[self._pos]
        if entry.name != name:
            raise RuntimeError(f"writer expected {entry.name!r}, got {name!r}")
        if tensor.dtype != entry.dtype:
            raise RuntimeError(f"{name}: dtype {tensor.dtype} != planned {entry.dtype}")
        t = tensor.detach().reshape(-1)
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        data = t.view(torch.uint8).numpy() if t.numel() else b""
        self._written += len(data) if isinstance(data, bytes) else data.nbytes
        if self._written > entry.nbytes:
            raise RuntimeError(f"{name}: more bytes than planned")
        self._q.put((si, data))
        if self._written == entry.nbytes:
            self._pos += 1
            self._written = 0

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._pos != len(self._order):
            raise RuntimeError(f"output incomplete: {len(self._order) - self._pos} tensors not written")
        for f in self._files:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": sum(s.nbytes for s in self.shards), **self.metadata},
                     "weight_map": {e.name: self.names[si] for si, e in self._order}}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=30)
        for f in self._files:
            try:
                f.close()
            except OSError:
                pass
