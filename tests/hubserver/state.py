"""The loopback Hub's state: repos -> refs -> commits -> {path: file}, in memory, and the errors it answers."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

import yaml

LFS_EXTENSIONS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".msgpack", ".gguf", ".model",
                  ".zip", ".tar", ".gz", ".npy", ".npz", ".pkl")
DEFAULT_GITATTRIBUTES = b"".join(
    f"*{ext} filter=lfs diff=lfs merge=lfs -text\n".encode() for ext in LFS_EXTENSIONS
)
POINTER_SIZE_HINT = 134


def git_blob_oid(data: bytes) -> str:
    """Git's blob id: sha1 of 'blob <size>\\0' + content (what the Hub reports for regular files)."""
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class StoredFile:
    data: bytes
    lfs: bool

    @property
    def size(self) -> int:
        return len(self.data)

    @cached_property
    def sha256(self) -> str:  # cached: every range request of a big file names it (X-Linked-Etag)
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return lfs_pointer(self.sha256, self.size)

    @property
    def oid(self) -> str:
        """Git blob oid: of the pointer file for LFS files, of the content otherwise."""
        return git_blob_oid(self.pointer if self.lfs else self.data)


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    author: str
    date: str
    files: dict[str, StoredFile]


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    gated: str | bool = False  # "auto" | "manual" | False
    gated_allowed: set[str] = field(default_factory=set)  # users who accepted the terms
    refs: dict[str, str] = field(default_factory=dict)  # "main" or "refs/pr/1" -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    created_at: str = ""
    pr_count: int = 0

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]


@dataclass
class Token:
    user: str
    write: bool = True
    orgs: tuple[str, ...] = ()


class HubError(Exception):
    """An HTTP error answer: status, message, optional X-Error-Code."""

    def __init__(self, status: int, message: str, code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}



def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def front_matter(text: str) -> dict[str, Any]:
    """README front matter as the Hub parses it for `cardData` (raises HubError 400 on invalid YAML)."""
    lines = text.lstrip("\ufeff").splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    end = next((i for i in range(1, len(lines)) if lines[i].strip() == "---"), None)
    if end is None:
        raise HubError(400, "front matter is not closed")
    try:
        data = yaml.safe_load("\n".join(lines[1:end]))
    except yaml.YAMLError as e:
        raise HubError(400, f"Error parsing YAML metadata: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise HubError(400, "YAML metadata must be a mapping")
    return data
