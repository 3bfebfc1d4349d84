"""Reading model weights lazily: memory-mapped safetensors (single or sharded), `.bin` only safely.

safetensors files are mapped copy-on-write (pages stay file-backed, nothing is copied until touched) and
tensors are zero-copy views; `prefetch` asks the kernel to read ahead and `release` drops pages we are
done with, so resident memory tracks the tensor being merged, not the model size (merge-semantics §5.2).

Parent files are written by strangers. Every safetensors header - on disk or read from the Hub by HTTP range
requests - goes through one validator, `parse_safetensors_header`, before any byte of tensor data is mapped:
it is as strict as the reference (Rust `safetensors` crate) and stricter where the reference is lax (duplicate
keys, unknown fields, rank). Files are opened only through `confine`, and pickles only with weights_only.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from mergebot.io import confine
from mergebot.errors import MergebotError, ModelError

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in ST_DTYPES.items()}
PAGE = mmap.PAGESIZE

ST_SINGLE = "model.safetensors"
ST_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

# Limits on what a header may declare. The header size cap is the reference's; the others are far above any
# real checkpoint and keep a hostile header from costing minutes or gigabytes before it is refused.
MAX_HEADER = 100_000_000
MAX_TENSORS = 1_000_000
MAX_NAME = 1024
MAX_RANK = 8
MAX_INDEX = 2**63 - 1  # offsets, dimensions and element counts must fit an int64 (torch's size type)
_FIELDS = frozenset({"dtype", "shape", "data_offsets"})
_HUB_FIRST = 100_000  # bytes asked for in the first range request: most headers fit, one round trip


def _clip(value: Any, limit: int = 80) -> str:
    """`repr` of a value from a hostile file, short enough for a one-line error."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _one_line(e: BaseException) -> str:
    """The informative line of an exception's message (torch's unpickler puts its reason in a later
    paragraph), clipped."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    pick = next((ln for ln in lines if re.search(r"unsupported|GLOBAL|error:", ln, re.I)), lines[0])
    return pick if len(pick) <= 200 else pick[:197] + "..."


class _Invalid(Exception):
    """A header violation (its message is the reason); turned into one ModelError line by the validator."""


@dataclass(frozen=True)
class HeaderEntry:
    """One validated tensor entry; offsets are relative to the data section, as in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


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


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: a key given twice is ambiguous (which one would another reader take?), so refused."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Invalid(f"duplicate key {_clip(key)}")
        out[key] = value
    return out


def _no_constant(token: str) -> Any:
    raise _Invalid(f"{token} is not JSON")


def _is_int(value: Any) -> bool:
    return type(value) is int  # bool is an int subclass; JSON true is not an offset


def _check_text(value: str, what: str) -> None:
    """Names and metadata end up in headers we write: they must be encodable as UTF-8 (JSON escapes can spell
    lone surrogates, which the reference refuses)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _Invalid(f"{what} {_clip(value)} is not valid Unicode") from None


def _check_name(name: str) -> None:
    if not name:
        raise _Invalid("empty tensor name")
    if len(name) > MAX_NAME:
        raise _Invalid(f"tensor name {_clip(name)} is longer than {MAX_NAME} characters")
    _check_text(name, "tensor name")
    if not name.isprintable():
        raise _Invalid(f"tensor name {_clip(name)} has control characters")


def _entry(name: str, meta: Any, data_size: int) -> HeaderEntry:
    """Validate one tensor entry on its own: fields, dtype, shape, offsets, and that the span is exactly
    numel x itemsize and lies inside the data section."""
    _check_name(name)
    where = f"tensor {_clip(name)}"
    if not isinstance(meta, dict):
        raise _Invalid(f"{where}: entry is {_clip(meta)}, not an object")
    missing, extra = _FIELDS - meta.keys(), meta.keys() - _FIELDS
    if missing:
        raise _Invalid(f"{where}: missing {', '.join(sorted(missing))}")
    if extra:
        raise _Invalid(f"{where}: unexpected field {_clip(sorted(extra)[0])}")
    dtype = meta["dtype"]
    if not isinstance(dtype, str) or dtype not in ST_DTYPES:
        raise _Invalid(f"{where}: unknown or unsupported dtype {_clip(dtype)}")
    shape = meta["shape"]
    if isinstance(shape, list) and len(shape) > MAX_RANK:
        raise _Invalid(f"{where}: shape has {len(shape)} dimensions (at most {MAX_RANK})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _Invalid(f"{where}: shape {_clip(shape)} is not a list of non-negative integers")
    numel = 1
    for d in shape:  # left to right, like the reference's checked multiply: no absurd intermediate either
        numel *= d
        if numel > MAX_INDEX:
            raise _Invalid(f"{where}: shape {_clip(shape)} has too many elements")
    offsets = meta["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and 0 <= o <= MAX_INDEX
                                                                    for o in offsets)):
        raise _Invalid(f"{where}: data_offsets {_clip(offsets)} is not [begin, end] of non-negative integers")
    begin, end = offsets
    if begin > end:
        raise _Invalid(f"{where}: data_offsets [{begin}, {end}] begin after they end")
    if end > data_size:
        raise _Invalid(f"{where}: data_offsets [{begin}, {end}] run past the end of the file "
                       f"(the data section has {data_size} bytes)")
    need = numel * ST_DTYPES[dtype].itemsize
    if end - begin != need:
        raise _Invalid(f"{where}: data_offsets [{begin}, {end}] span {end - begin} bytes, but {dtype} "
                       f"{_clip(shape)} takes {need}")
    return HeaderEntry(name, dtype, tuple(shape), begin, end)


def _parse(read: Callable[[int, int], bytes], file_size: int) -> tuple[list[HeaderEntry], int]:
    if file_size < 8:
        raise _Invalid(f"the file has {file_size} bytes, fewer than the 8-byte header length")
    (n,) = struct.unpack("<Q", read(0, 8))
    if n == 0:
        raise _Invalid("header length is 0")
    if n > MAX_HEADER:
        raise _Invalid(f"header length {n} is above the {MAX_HEADER}-byte limit")
    if 8 + n > file_size:
        raise _Invalid(f"header length {n} runs past the end of the file ({file_size} bytes)")
    raw = read(8, n)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Invalid(f"header is not UTF-8 (byte {e.start})") from None
    if not text.startswith("{"):
        raise _Invalid(f"header is not a JSON object (it must start with '{{'): {_clip(text[:20])}")
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise _Invalid(f"header is not JSON: {_one_line(e)}") from None
    if not isinstance(header, dict):  # unreachable after the '{' check; kept so the invariant is local
        raise _Invalid(f"header is a {type(header).__name__}, not an object")
    data_size = file_size - 8 - n
    meta = header.pop("__metadata__", None)
    if meta is not None:
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise _Invalid(f"__metadata__ {_clip(meta)} is not an object of strings")
        for k, v in meta.items():
            _check_text(k, "__metadata__ key")
            _check_text(v, "__metadata__ value")
    if len(header) > MAX_TENSORS:
        raise _Invalid(f"{len(header)} tensors (at most {MAX_TENSORS})")
    entries = [_entry(name, m, data_size) for name, m in header.items()]
    pos, previous = 0, None
    for e in sorted(entries, key=lambda e: (e.begin, e.end)):  # the reference's order: by offsets
        if e.begin < pos:
            raise _Invalid(f"tensor {_clip(e.name)} (bytes {e.begin}..{e.end}) overlaps tensor "
                           f"{_clip(previous)} (which ends at byte {pos})")
        if e.begin > pos:
            raise _Invalid(f"bytes {pos}..{e.begin} of the data, before tensor {_clip(e.name)}, belong to no tensor")
        pos, previous = e.end, e.name
    if pos != data_size:
        raise _Invalid(f"the tensors cover {pos} of the {data_size} data bytes; the rest belongs to no tensor")
    return entries, 8 + n


def parse_safetensors_header(read: Callable[[int, int], bytes], file_size: int,
                             where: str) -> tuple[list[HeaderEntry], int]:
    """The one safetensors header validator, for local files and Hub headers alike: (entries, offset of the
    data section). `read(offset, length)` returns exactly those bytes of the file (it is asked only for the
    length prefix and the header); `where` names the file. Every violation is one ModelError line
    `<where>: invalid safetensors header: <reason>`."""
    try:
        return _parse(read, file_size)
    except _Invalid as e:
        raise ModelError(f"{where}: invalid safetensors header: {e}") from None


def read_safetensors_header(path: Path, where: str | None = None) -> tuple[list[HeaderEntry], int, int]:
    """(validated entries, data offset, file size) of a local file that `confine.inside` accepted."""
    where = where or path.name
    fd = _open_regular(path, where)
    try:
        size = os.fstat(fd).st_size

        def read(offset: int, length: int) -> bytes:
            chunks, got = [], 0
            while got < length:
                chunk = os.pread(fd, length - got, offset + got)
                if not chunk:
                    raise ModelError(f"{where}: the file shrank while its header was read")
                chunks.append(chunk)
                got += len(chunk)
            return b"".join(chunks)

        entries, start = parse_safetensors_header(read, size, where)
    finally:
        os.close(fd)
    return entries, start, size


def _open_regular(path: Path, where: str) -> int:
    """A read-only descriptor of `path` that refuses a last-component symlink and anything not a regular file
    (`path` is already a real path from `confine.inside`, so either means it changed under us)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ModelError(f"{where}: cannot open: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ModelError(f"{where}: not a regular file")
    return fd


def hub_safetensors_header(repo_id: str, filename: str, revision: str | None, where: str,
                           token: str | None = None, endpoint: str | None = None) -> tuple[list[HeaderEntry], int]:
    """A Hub file's header by HTTP range requests (no tensor data), validated by `parse_safetensors_header`
    against the file size the server reports (Content-Range)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint)
    headers = build_hf_headers(token=token)

    def get(first: int, last: int) -> tuple[bytes, int]:
        try:
            r = get_session().get(url, headers={**headers, "range": f"bytes={first}-{last}"},
                                  timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT)
            hf_raise_for_status(r)
        except MergebotError:
            raise
        except Exception as e:  # noqa: BLE001 - any network or HTTP failure: we cannot read the header
            raise ModelError(f"{where}: cannot read the header from the Hub: {type(e).__name__}: "
                             f"{_one_line(e)}") from None
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", r.headers.get("content-range", "").strip())
        if r.status_code != 206 or m is None or int(m[1]) != first:
            raise ModelError(f"{where}: the Hub did not answer a range request for the header")
        body, total = r.content, int(m[3])
        if len(body) != int(m[2]) - first + 1 or int(m[2]) >= total:
            raise ModelError(f"{where}: the Hub's answer to a range request has the wrong length")
        return body, total

    head, size = get(0, _HUB_FIRST - 1)

    def read(offset: int, length: int) -> bytes:
        if offset + length <= len(head):
            return head[offset:offset + length]
        data, _ = get(offset, offset + length - 1)
        if len(data) != length:
            raise ModelError(f"{where}: the Hub's answer to a range request has the wrong length")
        return data

    return parse_safetensors_header(read, size, where)


def read_weight_map(directory: Path, index_name: str, label: str) -> dict[str, str]:
    """The weight_map of a `*.index.json`: an object of tensor name -> plain relative file name (no `..`, not
    absolute); where each file points is checked when it is opened (`confine.inside`)."""
    text = confine.read_text(directory, index_name, label)
    if text is None:
        raise ModelError(f"{label}: {index_name} is missing")
    try:
        index = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except _Invalid as e:
        raise ModelError(f"{label}: {index_name}: invalid index: {e}") from None
    except (ValueError, RecursionError) as e:
        raise ModelError(f"{label}: {index_name}: invalid index: not JSON: {_one_line(e)}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelError(f"{label}: {index_name}: invalid index: no weight_map object of tensor name -> file")
    for tensor, file in weight_map.items():
        if not isinstance(file, str) or not file or "\x00" in file or file.startswith(("/", "\\")) \
                or ".." in re.split(r"[/\\]", file) or not file.isprintable():
            raise ModelError(f"{label}: {index_name}: invalid index: tensor {_clip(tensor)} is in {_clip(file)}, "
                             "not a plain relative file name")
    return weight_map


def load_bin_tensors(directory: Path, name: str, label: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """A `.bin` checkpoint's tensors: the unpickler runs only with weights_only=True (no arbitrary objects),
    and anything but a flat dict of tensor name -> plain CPU tensor of a dtype we merge is one ModelError."""
    where = f"{label}: {name}"
    real = confine.inside(directory, name, label)
    if real is None:
        raise ModelError(f"{where} is missing")
    try:
        sd = torch.load(real, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the file's fault
        raise ModelError(f"{where}: cannot read it safely (weights_only): {_one_line(e)}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]  # a training checkpoint: its weights only
    if not isinstance(sd, dict):
        raise ModelError(f"{where}: the pickle holds type {type(sd).__name__}, not a dict of name -> tensor")
    if not sd:
        raise ModelError(f"{where}: holds no tensors")
    for key, t in sd.items():
        if not isinstance(key, str):
            raise ModelError(f"{where}: key {_clip(key)} is not a tensor name")
        try:
            _check_name(key)
        except _Invalid as e:
            raise ModelError(f"{where}: {e}") from None
        if type(t) not in (torch.Tensor, torch.nn.Parameter):
            raise ModelError(f"{where}: {_clip(key)} holds type {type(t).__name__}, not a tensor")
        if t.layout != torch.strided or t.device.type != "cpu" or t.dtype not in DTYPE_NAMES or t.dim() > MAX_RANK:
            raise ModelError(f"{where}: {_clip(key)} is a {t.layout} {t.dtype} tensor of rank {t.dim()}, "
                             "not a dense tensor of a supported dtype")
    return real, {k: t.detach() for k, t in sd.items()}


class _Mapped:
    def __init__(self, path: Path, size: int, where: str):
        self.path = path
        fd = _open_regular(path, where)
        try:
            if os.fstat(fd).st_size != size:  # the header was validated against `size` bytes
                raise ModelError(f"{where}: the file changed after its header was read")
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
        self._files: dict[Path, tuple[int, str]] = {}  # real path -> (size validated, name for errors)
        self._bin: dict[str, torch.Tensor] | None = None
        if discover:
            self._discover()

    @classmethod
    def from_hub_headers(cls, repo_id: str, sha: str, label: str, token: str | None = None,
                         endpoint: str | None = None) -> "ModelWeights":
        """Names, dtypes and shapes read from the safetensors headers on the Hub (HTTP range requests),
        without downloading any tensor data: what `--dry-run` needs."""
        from huggingface_hub import HfApi, hf_hub_download

        api = HfApi(endpoint=endpoint, token=token)
        try:
            if api.file_exists(repo_id, ST_SINGLE, revision=sha):
                files = [ST_SINGLE]
            elif api.file_exists(repo_id, ST_INDEX, revision=sha):
                index = Path(hf_hub_download(repo_id, ST_INDEX, revision=sha, token=token, endpoint=endpoint))
                files = list(dict.fromkeys(read_weight_map(index.parent, ST_INDEX, label).values()))
            else:
                raise ModelError(f"{label}: no {ST_SINGLE} or {ST_INDEX} on the Hub (a dry run reads "
                                 "safetensors headers only)")
        except MergebotError:
            raise
        except Exception as e:  # noqa: BLE001 - any network or HTTP failure: we cannot read the headers
            raise ModelError(f"{label}: cannot read safetensors headers from the Hub: {type(e).__name__}: "
                             f"{_one_line(e)}") from None
        w = cls(Path(repo_id), label, discover=False)
        for file in files:
            w.add_hub_safetensors(repo_id, file, sha, token, endpoint)
        return w

    def add_hub_safetensors(self, repo_id: str, filename: str, revision: str | None, token: str | None = None,
                            endpoint: str | None = None) -> None:
        """The tensors a Hub file's header declares (validated; names and shapes only, nothing mapped)."""
        entries, start = hub_safetensors_header(repo_id, filename, revision, f"{self.label}: {filename}",
                                                token, endpoint)
        self._add_entries(entries, Path(filename), start, filename)

    def _discover(self) -> None:
        d, label = self.directory, self.label
        if confine.inside(d, ST_INDEX, label) is not None:
            weight_map = read_weight_map(d, ST_INDEX, label)
            for file in dict.fromkeys(weight_map.values()):
                self.add_safetensors(file)
            missing = [n for n in weight_map if n not in self.tensors]
            if missing:
                raise ModelError(f"{label}: {ST_INDEX} lists {_clip(missing[0])} but its shard does not contain it")
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
        self._add_entries(entries, real, start, name)

    def _add_safetensors(self, path: Path) -> None:
        """Kept for callers that hold a path: `path.name` confined to `path.parent`."""
        self.add_safetensors(path.name, path.parent)

    def _add_entries(self, entries: list[HeaderEntry], file: Path, start: int, name: str) -> None:
        for e in entries:
            if e.name in self.tensors:
                raise ModelError(f"{self.label}: tensor {_clip(e.name)} is in {name} and in another shard")
            self.tensors[e.name] = TensorInfo(e.name, ST_DTYPES[e.dtype], e.shape, file, start + e.begin,
                                              start + e.end)

    def _load_bin(self) -> None:
        """`.bin` checkpoints: torch.load(weights_only=True, mmap=True) - never arbitrary unpickling."""
        d, label = self.directory, self.label
        files = [BIN_SINGLE]
        if confine.inside(d, BIN_INDEX, label) is not None:
            files = list(dict.fromkeys(read_weight_map(d, BIN_INDEX, label).values()))
        self._bin = {}
        for name in files:
            real, sd = load_bin_tensors(d, name, label)
            for key, t in sd.items():
                if key in self._bin:
                    raise ModelError(f"{label}: tensor {_clip(key)} is in {name} and in another shard")
                self._bin[key] = t
                self.tensors[key] = TensorInfo(key, t.dtype, tuple(t.shape), real, 0, t.numel() * t.element_size())

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
            if path not in self._files:  # names and shapes from the Hub's headers: no data to map
                raise ModelError(f"{self.label}: the tensor data of {path.name} was not downloaded")
            size, where = self._files[path]
            m = self._maps[path] = _Mapped(path, size, where)
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
