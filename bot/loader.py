"""Reading model weights lazily: memory-mapped safetensors (single or sharded), `.bin` only safely.

safetensors files are mapped copy-on-write (pages stay file-backed, nothing is copied until touched) and
tensors are zero-copy views; `prefetch` asks the kernel to read ahead and `release` drops pages we are
done with, so resident memory tracks the tensor being merged, not the model size (merge-semantics §5.2).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelError

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in ST_DTYPES.items()}
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


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(header dict, offset of the data section)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ModelError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ModelError(f"{path}: not a safetensors file (header size {n})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ModelError(f"{path}: corrupt safetensors header: {e}") from None
    return header, 8 + n


class _Mapped:
    def __init__(self, path: Path):
        self.path = path
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            self.mm = mmap.mmap(fd, size, access=mmap.ACCESS_COPY) if size else None
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
    """All tensors of one model directory, by name."""

    def __init__(self, directory: Path, label: str, discover: bool = True):
        self.directory = directory
        self.label = label
        self.tensors: dict[str, TensorInfo] = {}
        self._maps: dict[Path, _Mapped] = {}
        self._bin: dict[str, torch.Tensor] | None = None
        if discover:
            self._discover()

    @classmethod
    def from_hub_headers(cls, repo_id: str, sha: str, label: str, token: str | None = None,
                         endpoint: str | None = None) -> "ModelWeights":
        """Names, dtypes and shapes read from the safetensors headers on the Hub (HTTP range requests),
        without downloading any tensor data: what `--dry-run` needs."""
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError

        try:
            meta = HfApi(endpoint=endpoint, token=token).get_safetensors_metadata(repo_id, revision=sha)
        except (HfHubHTTPError, OSError, ValueError) as e:
            raise ModelError(f"{label}: cannot read safetensors headers from the Hub: {str(e).splitlines()[0]}") from None
        w = cls(Path(repo_id), label, discover=False)
        for file, fm in meta.files_metadata.items():
            for name, ti in fm.tensors.items():
                dtype = ST_DTYPES.get(ti.dtype)
                if dtype is None:
                    raise ModelError(f"{label}: tensor {name!r} has unsupported dtype {ti.dtype!r}")
                w.tensors[name] = TensorInfo(name, dtype, tuple(ti.shape), Path(file), ti.data_offsets[0], ti.data_offsets[1])
        return w

    def _discover(self) -> None:
        d = self.directory
        index = d / "model.safetensors.index.json"
        single = d / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise ModelError(f"{self.label}: bad {index.name}: {e}") from None
            for file in dict.fromkeys(weight_map.values()):
                self._add_safetensors(d / file)
            missing = [n for n in weight_map if n not in self.tensors]
            if missing:
                raise ModelError(f"{self.label}: {index.name} lists {missing[0]!r} but its shard does not contain it")
        elif single.exists():
            self._add_safetensors(single)
        elif (d / "pytorch_model.bin.index.json").exists() or (d / "pytorch_model.bin").exists():
            self._load_bin()
        else:
            raise ModelError(f"{self.label}: no model.safetensors[.index.json] or pytorch_model.bin[.index.json] in {d}")

    def _add_safetensors(self, path: Path) -> None:
        if not path.exists():
            raise ModelError(f"{self.label}: shard {path.name} is missing")
        header, data_start = read_safetensors_header(path)
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            dtype = ST_DTYPES.get(meta.get("dtype"))
            if dtype is None:
                raise ModelError(f"{self.label}: tensor {name!r} has unsupported dtype {meta.get('dtype')!r}")
            b, e = meta["data_offsets"]
            self.tensors[name] = TensorInfo(name, dtype, tuple(meta["shape"]), path, data_start + b, data_start + e)

    def _load_bin(self) -> None:
        """`.bin` checkpoints: torch.load(weights_only=True, mmap=True) - never arbitrary unpickling."""
        d = self.directory
        files = [d / "pytorch_model.bin"]
        if (d / "pytorch_model.bin.index.json").exists():
            wm = json.loads((d / "pytorch_model.bin.index.json").read_text())["weight_map"]
            files = [d / f for f in dict.fromkeys(wm.values())]
        self._bin = {}
        for f in files:
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - any unpickling failure is the user's file
                raise ModelError(f"{self.label}: cannot read {f.name} safely (weights_only): {e}") from None
            if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
                sd = sd["state_dict"]
            for name, t in sd.items():
                if isinstance(t, torch.Tensor):
                    self._bin[name] = t
                    self.tensors[name] = TensorInfo(name, t.dtype, tuple(t.shape), f, 0, t.numel() * t.element_size())

    def has(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelError(f"{self.label}: tensor {name!r} not present") from None

    def _map(self, path: Path) -> _Mapped:
        m = self._maps.get(path)
        if m is None:
            m = self._maps[path] = _Mapped(path)
        return m

    def get(self, name: str) -> torch.Tensor:
        """A zero-copy, read-only-by-convention view of the tensor."""
        if self._bin is not None:
            return self._bin[name]
        info = self.info(name)
        return self._map(info.file).view(info)

    def prefetch(self, name: str) -> None:
        if self._bin is None and name in self.tensors:
            info = self.tensors[name]
            self._map(info.file).advise(info, mmap.MADV_WILLNEED)

    def release(self, name: str) -> None:
        if self._bin is None and name in self.tensors:
            info = self.tensors[name]
            self._map(info.file).advise(info, mmap.MADV_DONTNEED)
