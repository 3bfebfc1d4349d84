"""safetensors headers, validated before any byte of tensor data is mapped; index files; safe `.bin` loading.

Parent files are written by strangers. Every safetensors header - on disk or read from the Hub by HTTP range
requests (mergebot.hub.fetch) - goes through one validator, `parse_safetensors_header`: it is as strict as the
reference (Rust `safetensors` crate) and stricter where the reference is lax (duplicate keys, unknown fields,
rank). Files are opened only through `confine`, and pickles only with weights_only.
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergebot.errors import ModelError
from mergebot.io import confine

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in ST_DTYPES.items()}

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


def clip(value: Any, limit: int = 80) -> str:
    """`repr` of a value from a hostile file, short enough for a one-line error."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def one_line(e: BaseException) -> str:
    """The informative line of an exception's message (torch's unpickler puts its reason in a later
    paragraph), clipped."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    pick = next((ln for ln in lines if re.search(r"unsupported|GLOBAL|error:", ln, re.I)), lines[0])
    return pick if len(pick) <= 200 else pick[:197] + "..."


class Invalid(Exception):
    """A header violation (its message is the reason); turned into one ModelError line by the validator."""


@dataclass(frozen=True)
class HeaderEntry:
    """One validated tensor entry; offsets are relative to the data section, as in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int



def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: a key given twice is ambiguous (which one would another reader take?), so refused."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise Invalid(f"duplicate key {clip(key)}")
        out[key] = value
    return out


def no_constant(token: str) -> Any:
    raise Invalid(f"{token} is not JSON")


def _is_int(value: Any) -> bool:
    return type(value) is int  # bool is an int subclass; JSON true is not an offset


def _check_text(value: str, what: str) -> None:
    """Names and metadata end up in headers we write: they must be encodable as UTF-8 (JSON escapes can spell
    lone surrogates, which the reference refuses)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Invalid(f"{what} {clip(value)} is not valid Unicode") from None


def check_name(name: str) -> None:
    if not name:
        raise Invalid("empty tensor name")
    if len(name) > MAX_NAME:
        raise Invalid(f"tensor name {clip(name)} is longer than {MAX_NAME} characters")
    _check_text(name, "tensor name")
    if not name.isprintable():
        raise Invalid(f"tensor name {clip(name)} has control characters")


def _entry(name: str, meta: Any, data_size: int) -> HeaderEntry:
    """Validate one tensor entry on its own: fields, dtype, shape, offsets, and that the span is exactly
    numel x itemsize and lies inside the data section."""
    check_name(name)
    where = f"tensor {clip(name)}"
    if not isinstance(meta, dict):
        raise Invalid(f"{where}: entry is {clip(meta)}, not an object")
    missing, extra = _FIELDS - meta.keys(), meta.keys() - _FIELDS
    if missing:
        raise Invalid(f"{where}: missing {', '.join(sorted(missing))}")
    if extra:
        raise Invalid(f"{where}: unexpected field {clip(sorted(extra)[0])}")
    dtype = meta["dtype"]
    if not isinstance(dtype, str) or dtype not in ST_DTYPES:
        raise Invalid(f"{where}: unknown or unsupported dtype {clip(dtype)}")
    shape = meta["shape"]
    if isinstance(shape, list) and len(shape) > MAX_RANK:
        raise Invalid(f"{where}: shape has {len(shape)} dimensions (at most {MAX_RANK})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise Invalid(f"{where}: shape {clip(shape)} is not a list of non-negative integers")
    numel = 1
    for d in shape:  # left to right, like the reference's checked multiply: no absurd intermediate either
        numel *= d
        if numel > MAX_INDEX:
            raise Invalid(f"{where}: shape {clip(shape)} has too many elements")
    offsets = meta["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and 0 <= o <= MAX_INDEX
                                                                    for o in offsets)):
        raise Invalid(f"{where}: data_offsets {clip(offsets)} is not [begin, end] of non-negative integers")
    begin, end = offsets
    if begin > end:
        raise Invalid(f"{where}: data_offsets [{begin}, {end}] begin after they end")
    if end > data_size:
        raise Invalid(f"{where}: data_offsets [{begin}, {end}] run past the end of the file "
                       f"(the data section has {data_size} bytes)")
    need = numel * ST_DTYPES[dtype].itemsize
    if end - begin != need:
        raise Invalid(f"{where}: data_offsets [{begin}, {end}] span {end - begin} bytes, but {dtype} "
                       f"{clip(shape)} takes {need}")
    return HeaderEntry(name, dtype, tuple(shape), begin, end)


def _parse(read: Callable[[int, int], bytes], file_size: int) -> tuple[list[HeaderEntry], int]:
    if file_size < 8:
        raise Invalid(f"the file has {file_size} bytes, fewer than the 8-byte header length")
    (n,) = struct.unpack("<Q", read(0, 8))
    if n == 0:
        raise Invalid("header length is 0")
    if n > MAX_HEADER:
        raise Invalid(f"header length {n} is above the {MAX_HEADER}-byte limit")
    if 8 + n > file_size:
        raise Invalid(f"header length {n} runs past the end of the file ({file_size} bytes)")
    raw = read(8, n)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Invalid(f"header is not UTF-8 (byte {e.start})") from None
    if not text.startswith("{"):
        raise Invalid(f"header is not a JSON object (it must start with '{{'): {clip(text[:20])}")
    try:
        header = json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constant)
    except (ValueError, RecursionError) as e:
        raise Invalid(f"header is not JSON: {one_line(e)}") from None
    if not isinstance(header, dict):  # unreachable after the '{' check; kept so the invariant is local
        raise Invalid(f"header is a {type(header).__name__}, not an object")
    data_size = file_size - 8 - n
    meta = header.pop("__metadata__", None)
    if meta is not None:
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise Invalid(f"__metadata__ {clip(meta)} is not an object of strings")
        for k, v in meta.items():
            _check_text(k, "__metadata__ key")
            _check_text(v, "__metadata__ value")
    if len(header) > MAX_TENSORS:
        raise Invalid(f"{len(header)} tensors (at most {MAX_TENSORS})")
    entries = [_entry(name, m, data_size) for name, m in header.items()]
    pos, previous = 0, None
    for t in sorted(entries, key=lambda t: (t.begin, t.end)):  # the reference's order: by offsets
        if t.begin < pos:
            raise Invalid(f"tensor {clip(t.name)} (bytes {t.begin}..{t.end}) overlaps tensor "
                           f"{clip(previous)} (which ends at byte {pos})")
        if t.begin > pos:
            raise Invalid(f"bytes {pos}..{t.begin} of the data, before tensor {clip(t.name)}, belong to no tensor")
        pos, previous = t.end, t.name
    if pos != data_size:
        raise Invalid(f"the tensors cover {pos} of the {data_size} data bytes; the rest belongs to no tensor")
    return entries, 8 + n


def parse_safetensors_header(read: Callable[[int, int], bytes], file_size: int,
                             where: str) -> tuple[list[HeaderEntry], int]:
    """The one safetensors header validator, for local files and Hub headers alike: (entries, offset of the
    data section). `read(offset, length)` returns exactly those bytes of the file (it is asked only for the
    length prefix and the header); `where` names the file. Every violation is one ModelError line
    `<where>: invalid safetensors header: <reason>`."""
    try:
        return _parse(read, file_size)
    except Invalid as e:
        raise ModelError(f"{where}: invalid safetensors header: {e}") from None


def read_safetensors_header(path: Path, where: str | None = None) -> tuple[list[HeaderEntry], int, int]:
    """(validated entries, data offset, file size) of a local file that `confine.inside` accepted."""
    where = where or path.name
    fd = open_regular(path, where)
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


def open_regular(path: Path, where: str) -> int:
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


def read_weight_map(directory: Path, index_name: str, label: str) -> dict[str, str]:
    """The weight_map of a `*.index.json`: an object of tensor name -> plain relative file name (no `..`, not
    absolute); where each file points is checked when it is opened (`confine.inside`)."""
    text = confine.read_text(directory, index_name, label)
    if text is None:
        raise ModelError(f"{label}: {index_name} is missing")
    try:
        index = json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constant)
    except Invalid as e:
        raise ModelError(f"{label}: {index_name}: invalid index: {e}") from None
    except (ValueError, RecursionError) as e:
        raise ModelError(f"{label}: {index_name}: invalid index: not JSON: {one_line(e)}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelError(f"{label}: {index_name}: invalid index: no weight_map object of tensor name -> file")
    for tensor, file in weight_map.items():
        if not isinstance(file, str) or not file or "\x00" in file or file.startswith(("/", "\\")) \
                or ".." in re.split(r"[/\\]", file) or not file.isprintable():
            raise ModelError(f"{label}: {index_name}: invalid index: tensor {clip(tensor)} is in {clip(file)}, "
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
        raise ModelError(f"{where}: cannot read it safely (weights_only): {one_line(e)}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]  # a training checkpoint: its weights only
    if not isinstance(sd, dict):
        raise ModelError(f"{where}: the pickle holds type {type(sd).__name__}, not a dict of name -> tensor")
    if not sd:
        raise ModelError(f"{where}: holds no tensors")
    for key, t in sd.items():
        if not isinstance(key, str):
            raise ModelError(f"{where}: key {clip(key)} is not a tensor name")
        try:
            check_name(key)
        except Invalid as e:
            raise ModelError(f"{where}: {e}") from None
        if type(t) not in (torch.Tensor, torch.nn.Parameter):
            raise ModelError(f"{where}: {clip(key)} holds type {type(t).__name__}, not a tensor")
        if t.layout != torch.strided or t.device.type != "cpu" or t.dtype not in DTYPE_NAMES or t.dim() > MAX_RANK:
            raise ModelError(f"{where}: {clip(key)} is a {t.layout} {t.dtype} tensor of rank {t.dim()}, "
                             "not a dense tensor of a supported dtype")
    return real, {k: t.detach() for k, t in sd.items()}
