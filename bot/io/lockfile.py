"""`mergebot.lock.json`: what a merge was made of (parents at their resolved shas, config hash, seed).

One record for every build: a dense merge, a mergekit-moe build (its own keys in `details`) and a mergekit-multi
file (the result's record, with the leaf parents of every stage and each stage's method, parents and seed). No
timestamp: an unchanged re-merge gives identical files, hence no new Hub commit. The schedule compares the
published lock with the parents' current shas (mergebot.action.staleness); the card and the commit message
read it back (`read_lock`).
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergebot import __version__
from mergebot.errors import MergebotError

LOCK_FILE = "mergebot.lock.json"
MAX_LOCK_BYTES = 64 << 20  # far above any real lock (a few KB)


class LockFileError(MergebotError):
    """`mergebot.lock.json` is missing or malformed (the output directory is not a mergebot output)."""


class _Absent:
    """A key a kind of build does not record (MoE builds have no `rng`)."""


ABSENT: Any = _Absent()


@dataclass(frozen=True)
class ParentPin:
    """One parent: the reference as written, the revision asked for, the commit it resolved to."""

    ref: str
    revision: str | None
    sha: str | None
    local: bool
    role: str  # base | input | lora | expert | shared_expert | tokenizer
    of: str | None = None  # lora: the parent it is folded into

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"ref": self.ref, "revision": self.revision, "sha": self.sha, "local": self.local,
                             "role": self.role}
        if self.of is not None:
            d["of"] = self.of
        return d


@dataclass(frozen=True)
class Lock:
    config_sha256: str
    kind: str  # merge | moe | multi
    merge_method: str
    base_model: str | None
    parents: list[dict[str, Any]]  # ParentPin.as_dict() each
    dtype: str | None
    out_dtype: str | None
    random_seed: int | None
    device: str
    rng: str | None = ABSENT  # dense merges: which randomness drew the masks (None: the method draws none)
    details: dict[str, Any] = field(default_factory=dict)  # the build kind's own keys, after the common ones
    stages: list[dict[str, Any]] | None = None  # mergekit-multi: every stage's method, parents and seed
    mergebot_version: str = __version__

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "mergebot_version": self.mergebot_version,
            "config_sha256": self.config_sha256,
            "kind": self.kind,
            "merge_method": self.merge_method,
            "base_model": self.base_model,
            "parents": self.parents,
            "dtype": self.dtype,
            "out_dtype": self.out_dtype,
            "random_seed": self.random_seed,
        }
        if self.rng is not ABSENT:
            d["rng"] = self.rng
        d["device"] = self.device
        d.update(self.details)
        if self.stages is not None:
            d["stages"] = self.stages
        return d

    @classmethod
    def of(cls, d: dict[str, Any]) -> Lock:
        """The record of a lock mergebot wrote (a build's own `as_dict()`)."""
        common = ("mergebot_version", "config_sha256", "kind", "merge_method", "base_model", "parents", "dtype",
                  "out_dtype", "random_seed", "device", "stages")
        return cls(**{k: d[k] for k in common if k in d}, rng=d.get("rng", ABSENT),
                   details={k: v for k, v in d.items() if k not in common and k != "rng"})


def write_lock(directory: Path, lock: dict[str, Any]) -> None:
    """The lock file of an output directory, replaced atomically (a failed write leaves the old lock and no
    temporary file)."""
    tmp = directory / f".{LOCK_FILE}.tmp"
    try:
        tmp.write_text(json.dumps(lock, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, directory / LOCK_FILE)
    finally:
        tmp.unlink(missing_ok=True)


def read_lock(out_dir: Path) -> dict[str, Any]:
    """The engine's `mergebot.lock.json`, checked for the keys the card and the commit message need."""
    path = Path(out_dir) / LOCK_FILE
    try:  # a regular file only (a FIFO would block the read forever), bounded, strict UTF-8
        if not stat.S_ISREG(path.stat().st_mode):
            raise LockFileError(f"{path}: not a regular file")
        with open(path, "rb") as f:
            data = f.read(MAX_LOCK_BYTES + 1)
        if len(data) > MAX_LOCK_BYTES:
            raise LockFileError(f"{path}: larger than {MAX_LOCK_BYTES >> 20} MiB")
        lock = json.loads(data.decode("utf-8"))
    except FileNotFoundError:
        raise LockFileError(f"{path}: missing; is {out_dir} a mergebot output directory?") from None
    except UnicodeDecodeError:
        raise LockFileError(f"{path}: not UTF-8 text") from None
    except (ValueError, RecursionError) as e:
        raise LockFileError(f"{path}: not valid JSON: {str(e)[:200] or type(e).__name__}") from None
    except OSError as e:
        raise LockFileError(f"{path}: cannot read: {e.strerror or e}") from None
    if not isinstance(lock, dict):
        raise LockFileError(f"{path}: must be a JSON object")
    for key in ("config_sha256", "merge_method", "parents"):
        if key not in lock:
            raise LockFileError(f"{path}: key {key!r} is missing")
    if not isinstance(lock["parents"], list) or not all(
            isinstance(p, dict) and isinstance(p.get("ref"), str) and p["ref"] for p in lock["parents"]):
        raise LockFileError(f"{path}: key 'parents' must be a list of objects with a 'ref' (a non-empty string)")
    return lock
