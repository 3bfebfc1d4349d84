"""Reading model weights lazily: memory-mapped safetensors (single or sharded), `.bin` only safely.

safetensors files are mapped copy-on-write (pages stay file-backed, nothing is copied until touched) and
tensors are zero-copy views; `prefetch` asks the kernel to read ahead and `release` drops pages we are
done with, so resident memory tracks the tensor being merged, not the model size (merge-semantics §5.2).
Headers are validated first (mergebot.io.safetensors). `ModelWeights` is a `TensorReader`.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import KeysView
from dataclasses import dataclass
from pathlib import Path

import torch

from mergebot.errors import ModelError
from mergebot.io import confine
from mergebot.io.local import ResolvedModel
from mergebot.io.safetensors import (
    BIN_INDEX,
    BIN_SINGLE,
    ST_DTYPES,
    ST_INDEX,
    ST_SINGLE,
    HeaderEntry,
    clip,
    load_bin_tensors,
    open_regular,
    read_safetensors_header,
    read_weight_map,
)

PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class _Mapped:
    def __init__(self, path: Path, size: int, where: str):
        self.path = path
        fd = open_regular(path, where)
        try:
            if os.fstat(fd).st_size != size:  # the header was validated against `size` bytes
                raise ModelError(f"{where}: the file changed after its header was read")
            self.mm = mmap.mmap(fd, size, access=mmap.ACCESS_COPY) if size else None
        except OSError as e:  # a map keeps its own descriptor: thousands of shards can exhaust `ulimit -n`
            hint = (" (each shard of each parent stays open while the merge runs: raise the limit with ulimit -n)"
                    if e.errno in (errno.EMFILE, errno.ENFILE) else "")
            raise ModelError(f"{where}: cannot map it: {e.strerror or e}{hint}") from None
        finally:
            os.close(fd)

    def view(self, info: TensorInfo) -> torch.Tensor:
        count = 1
        for d in info.shape:
            count *= d
        if count == 0 or self.mm is None:
            return torch.empty(info.shape, dtype=info.dtype)
        t = torch.frombuffer(self.mm, dtype=info.dtype, count=count, offset=info.start)
        return t.reshape(info.shape)

    def advise(self, info: TensorInfo, advice: int) -> None:
        if self.mm is None or info.nbytes == 0:
            return
        start = info.start - info.start % PAGE
        length = info.end - start
        try:
            self.mm.madvise(advice, start, length)
        except (OSError, ValueError):
            pass


class ModelWeights:
    """All tensors of one model directory, by name (`tensors`: the validated header of each)."""

    adapter: ResolvedModel | None = None  # no LoRA folded in (mergebot.io.lora.LoraWeights has one)

    def __init__(self, directory: Path, label: str, discover: bool = True):
        self.directory = directory
        self.label = label
        self.tensors: dict[str, TensorInfo] = {}
        self._maps: dict[Path, _Mapped] = {}
        self._files: dict[Path, tuple[int, str]] = {}  # real path -> (size validated, name for errors)
        self._bin: dict[str, torch.Tensor] | None = None
        if discover:
            self._discover()

    def _discover(self) -> None:
        d, label = self.directory, self.label
        if confine.inside(d, ST_INDEX, label) is not None:
            weight_map = read_weight_map(d, ST_INDEX, label)
            for file in dict.fromkeys(weight_map.values()):
                self.add_safetensors(file)
            missing = [n for n in weight_map if n not in self.tensors]
            if missing:
                raise ModelError(f"{label}: {ST_INDEX} lists {clip(missing[0])} but its shard does not contain it")
        elif confine.inside(d, ST_SINGLE, label) is not None:
            self.add_safetensors(ST_SINGLE)
        elif confine.inside(d, BIN_INDEX, label) is not None or confine.inside(d, BIN_SINGLE, label) is not None:
            self._load_bin()
        else:
            raise ModelError(f"{label}: no {ST_SINGLE}[.index.json] or {BIN_SINGLE}[.index.json] in {d}")

    def add_safetensors(self, name: str, directory: Path | None = None) -> None:
        """Add the tensors of `directory/name` (default: the model directory): the file is opened only if
        `confine.inside` accepts it, and its header is validated before anything is mapped."""
        directory = self.directory if directory is None else directory
        real = confine.inside(directory, name, self.label)
        if real is None:
            raise ModelError(f"{self.label}: shard {name} is missing")
        entries, start, size = read_safetensors_header(real, f"{self.label}: {name}")
        self._files[real] = (size, f"{self.label}: {name}")
        self.add_entries(entries, real, start, name)

    def add_entries(self, entries: list[HeaderEntry], file: Path, start: int, name: str) -> None:
        """Declare validated header entries of `file` (its data section at `start`); entries of a header read
        from the Hub (mergebot.hub.fetch) have names and shapes only: nothing can be mapped."""
        for e in entries:
            if e.name in self.tensors:
                raise ModelError(f"{self.label}: tensor {clip(e.name)} is in {name} and in another shard")
            self.tensors[e.name] = TensorInfo(e.name, ST_DTYPES[e.dtype], e.shape, file, start + e.begin,
                                              start + e.end)

    def _load_bin(self) -> None:
        """`.bin` checkpoints: torch.load(weights_only=True, mmap=True) - never arbitrary unpickling."""
        d, label = self.directory, self.label
        files = [BIN_SINGLE]
        if confine.inside(d, BIN_INDEX, label) is not None:
            files = list(dict.fromkeys(read_weight_map(d, BIN_INDEX, label).values()))
        for name in files:
            self.add_bin(name)

    def add_bin(self, name: str) -> None:
        """The tensors of a `.bin` file of the model directory (weights_only, a flat dict only)."""
        real, sd = load_bin_tensors(self.directory, name, self.label)
        if self._bin is None:
            self._bin = {}
        for key, t in sd.items():
            if key in self._bin:
                raise ModelError(f"{self.label}: tensor {clip(key)} is in {name} and in another shard")
            self._bin[key] = t
            self.tensors[key] = TensorInfo(key, t.dtype, tuple(t.shape), real, 0, t.numel() * t.element_size())

    # --------------------------------------------------------------------------------------- TensorReader
    def keys(self) -> KeysView[str]:
        return self.tensors.keys()

    def header(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelError(f"{self.label}: tensor {name!r} not present") from None

    def _map(self, path: Path) -> _Mapped:
        m = self._maps.get(path)
        if m is None:
            if path not in self._files:  # names and shapes from the Hub's headers: no data to map
                raise ModelError(f"{self.label}: the tensor data of {path.name} was not downloaded")
            size, where = self._files[path]
            m = self._maps[path] = _Mapped(path, size, where)
        return m

    def get(self, name: str) -> torch.Tensor:
        """A zero-copy, read-only-by-convention view of the tensor."""
        if self._bin is not None:
            return self._bin[name]
        info = self.header(name)
        return self._map(info.file).view(info)

    def prefetch(self, name: str) -> None:
        if self._bin is None and name in self.tensors:
            info = self.tensors[name]
            self._map(info.file).advise(info, mmap.MADV_WILLNEED)

    def release(self, name: str) -> None:
        if self._bin is None and name in self.tensors:
            info = self.tensors[name]
            self._map(info.file).advise(info, mmap.MADV_DONTNEED)
