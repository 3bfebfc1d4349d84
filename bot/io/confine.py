"""The one place where files of a model directory (or of the workspace) are opened.

A parent directory is input from strangers: a `LICENSE` that is a symlink to `/proc/self/environ`, an index
whose weight_map names `../../etc/passwd`, a tokenizer that is a FIFO. Every read of a model's files goes
through `open_inside`, which accepts a file only if it is a regular file and its real path lies inside the
directory's root; nothing outside is read, echoed in an error or published.

The root is the directory itself, except for Hugging Face cache snapshots, whose files are symlinks into the
same repo's `blobs/` (`models--org--name/snapshots/<sha>/x -> ../../blobs/<hash>`): there it is the repo's cache
folder. In Action mode a workspace root also bounds every local model and config reference (`set_workspace`).
"""

from __future__ import annotations

import json
import os
import stat
from contextvars import ContextVar
from pathlib import Path

from mergebot.errors import ModelError

_WORKSPACE: ContextVar[Path | None] = ContextVar("workspace", default=None)

MAX_SMALL_FILE = 64 << 20  # json, tokenizer, license and card files: far above any real one


def set_workspace(root: Path | None):
    """Bound local references to `root` (the Action's checkout); returns a token for `reset_workspace`."""
    return _WORKSPACE.set(root.resolve() if root is not None else None)


def reset_workspace(token) -> None:
    _WORKSPACE.reset(token)


def workspace() -> Path | None:
    return _WORKSPACE.get()


def root_of(directory: Path) -> Path:
    """The directory files of `directory` must resolve into (see the module docstring)."""
    real = directory.resolve()
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith(("models--", "datasets--")):
        return real.parent.parent
    return real


def is_inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def inside(directory: Path, name: str, label: str) -> Path | None:
    """The real path of `directory/name` if it is a regular file inside the directory's root; None if there is
    no such file; ModelError for anything that escapes or is not a regular file (named by `name`, never by
    where it points)."""
    if not name or "\x00" in name or Path(name).is_absolute():
        raise ModelError(f"{label}: refusing file name {name[:80]!r}: not a plain relative name")
    candidate = directory / name
    if not os.path.lexists(candidate):
        return None
    real = candidate.resolve()
    if not is_inside(real, root_of(directory)):
        raise ModelError(f"{label}: refusing {name}: it points outside the model directory")
    try:
        st = os.stat(real)
    except OSError:
        return None  # a dangling link
    if not stat.S_ISREG(st.st_mode):
        raise ModelError(f"{label}: refusing {name}: not a regular file")
    return real


def read_bytes(directory: Path, name: str, label: str, limit: int = MAX_SMALL_FILE) -> bytes | None:
    """A small file's bytes (None: absent), confined as `inside` says and at most `limit` bytes."""
    real = inside(directory, name, label)
    if real is None:
        return None
    fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ModelError(f"{label}: refusing {name}: not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ModelError(f"{label}: {name} is larger than {limit >> 20} MiB")
    return data


def read_text(directory: Path, name: str, label: str, limit: int = MAX_SMALL_FILE) -> str | None:
    data = read_bytes(directory, name, label, limit)
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ModelError(f"{label}: {name} is not UTF-8 text") from None


def copy_file(directory: Path, name: str, dest: Path, label: str, limit: int = MAX_SMALL_FILE) -> bool:
    """Copy a confined small file to `dest` (a new regular file); False when the source is absent."""
    data = read_bytes(directory, name, label, limit)
    if data is None:
        return False
    dest.write_bytes(data)
    return True


def local_reference(path: str, label: str) -> None:
    """In Action mode, a local model or config reference must stay inside the workspace: no absolute path, no
    `~`, no `..` that climbs out. Raises ModelError naming the reference (never what lies outside)."""
    root = workspace()
    if root is None:
        return
    if path.startswith("~") or Path(path).is_absolute():
        raise ModelError(f"{label}: {path[:200]!r} is outside the workspace: in the Action, local models must be "
                         "paths relative to the repository")
    if not is_inside((root / path).resolve(), root):
        raise ModelError(f"{label}: {path[:200]!r} leads outside the workspace")


class NotJsonObject(ValueError):
    """`parse_object`'s refusal; its message says why, to follow a file name ("is not valid JSON: ...")."""

    def __init__(self, reason: str, parsed: bool):
        super().__init__(reason)
        self.parsed = parsed  # valid JSON, but not an object


def parse_object(text: str, detail: int = 0) -> dict:
    """`text` as a JSON object, or NotJsonObject: "is not valid JSON" (with up to `detail` characters of the
    parser's reason; nesting too deep for json counts as invalid) or "is a JSON list, not an object"."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        reason = "is not valid JSON" + (f": {str(e)[:detail]}" if detail else "")
        raise NotJsonObject(reason, parsed=False) from None
    if not isinstance(data, dict):
        raise NotJsonObject(f"is a JSON {type(data).__name__}, not an object", parsed=True)
    return data


def json_object(directory: Path, name: str, label: str) -> dict | None:
    """A model's optional JSON object file (tokenizer_config.json, ...): None when absent or not a JSON object
    (a broken optional file is treated as missing); confined as `inside` says."""
    text = read_text(directory, name, label)
    if text is None:
        return None
    try:
        return parse_object(text)
    except NotJsonObject:
        return None


def audit(directory: Path, label: str) -> None:
    """Refuse a model directory any of whose entries escapes it: a symlink whose target lies outside the
    directory's root, or a file that is not regular (FIFO, device, socket). Run once when a model is resolved,
    so that libraries reading the directory themselves (tokenizers, transformers) read only what lies inside."""
    root = root_of(directory)
    try:
        entries = list(os.scandir(directory))
    except OSError as e:
        raise ModelError(f"{label}: cannot list the model directory: {e.strerror}") from None
    for entry in entries:
        if entry.is_symlink():
            target = Path(entry.path).resolve()
            if not is_inside(target, root):
                raise ModelError(f"{label}: refusing {entry.name[:120]!r}: a symlink that points outside the model "
                                 "directory")
            if not target.exists():
                continue
            mode = os.stat(target).st_mode
        else:
            mode = entry.stat(follow_symlinks=False).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise ModelError(f"{label}: refusing {entry.name[:120]!r}: not a regular file")


def audit_tree(directory: Path, label: str) -> None:
    """`audit` for a whole tree (an output directory about to be published, which someone else may have
    assembled): every entry at any depth that is a link leading out of `directory`, or not a regular file or
    directory, is one ModelError naming it relative to `directory` (never where it points)."""
    root = directory.resolve()
    for current, dirs, files in os.walk(directory, followlinks=False):
        for name in dirs + files:
            path = Path(current) / name
            rel = path.relative_to(directory).as_posix()
            if path.is_symlink() and not is_inside(path.resolve(), root):
                raise ModelError(f"{label}: refusing {rel[:200]!r}: a symlink that points outside the directory")
            try:
                mode = os.stat(path).st_mode
            except OSError:
                continue  # a dangling link inside: nothing to read (publishing skips it)
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise ModelError(f"{label}: refusing {rel[:200]!r}: not a regular file")
