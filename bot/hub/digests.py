"""What a merge read from each Hub parent, by content: the digests the Hub reports, recorded in the lock.

A parent's commit moves for many reasons (a README typo, a new eval table); only some change what a merge
produces. So the lock records, per Hub parent, two things beside the commit sha:
- `files`: every file the merge read (safetensors shards and index or `.bin`, config and tokenizer files; the
  same selection `mergebot.hub.fetch.resolve` downloads) with the Hub's digest: the LFS sha256 for LFS files, the
  git blob id for the others. When these change, the merge is stale.
- `card`: what the card and the license analysis read: a digest of the license-relevant front matter fields
  (and the Hub's `license:` tags and gating), and the blob ids of LICENSE/USE_POLICY/NOTICE files. When only
  these change, the card is stale but the weights are not.
and once per lock, `card_inputs`: mergebot's version and the digest of the card template that rendered it.

One `model_info(files_metadata=True)` per parent gives all of it (sha, siblings with digests, card data).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from mergebot import __version__
from mergebot.config.refs import split_ref
from mergebot.errors import MergebotError
from mergebot.hub import errors
from mergebot.hub.client import client, resolve_endpoint
from mergebot.io.filenames import ADAPTER_BIN, ADAPTER_CONFIG, ADAPTER_SAFETENSORS
from mergebot.io.lockfile import read_lock, write_lock

# what a merge reads besides the weights (mergebot.hub.fetch.MODEL_FILES without the card's license files)
MERGE_FILES = ("*.json", "tokenizer.model", "merges.txt", "*.jinja")
CARD_FILES = ("LICENSE*", "LICENCE*", "USE_POLICY*", "NOTICE*")
CARD_FIELDS = ("license", "license_name", "license_link", "language", "pipeline_tag", "base_model")
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_SAFETENSORS, ADAPTER_BIN)


class DigestError(MergebotError):
    """The Hub could not list a parent's files with their digests."""


@dataclass(frozen=True)
class ParentState:
    """A Hub parent at one commit, as far as a merge and its card are concerned."""

    repo_id: str
    sha: str
    files: dict[str, str]  # path -> LFS sha256 or git blob id, of the files a merge reads
    card: dict[str, Any] = field(default_factory=dict)  # {"metadata": sha256, "files": {path: blob id}}

    def record(self) -> dict[str, Any]:
        return {"files": dict(sorted(self.files.items())), "card": self.card}


def _matches(path: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch(path, p) for p in patterns)


def merge_inputs(names: list[str], *, adapter: bool = False) -> list[str]:
    """The paths a merge reads of a repo holding `names` (mergebot.hub.fetch.resolve's selection)."""
    if adapter:
        wanted = [ADAPTER_CONFIG, ADAPTER_SAFETENSORS if ADAPTER_SAFETENSORS in names else ADAPTER_BIN]
        return [n for n in names if n in wanted]
    weights = ("*.safetensors", "*.safetensors.index.json") if any(n.endswith(".safetensors") for n in names) \
        else ("*.bin", "*.bin.index.json")
    return [n for n in names if _matches(n, weights + MERGE_FILES)]


def metadata_digest(card_data: dict[str, Any], tags: list[str] | None, gated: Any) -> str:
    """sha256 of what the license analysis and the card read of a parent's metadata (not its prose)."""
    subset = {k: card_data.get(k) for k in CARD_FIELDS if card_data.get(k) is not None}
    subset["hub_license_tags"] = sorted(t for t in (tags or []) if t.startswith("license:"))
    subset["gated"] = gated or False
    return hashlib.sha256(json.dumps(subset, sort_keys=True, default=str).encode()).hexdigest()


def state_from_info(repo_id: str, info: Any, *, adapter: bool = False) -> ParentState:
    """The ParentState of a `model_info(files_metadata=True)` answer."""
    digests: dict[str, str] = {}
    for s in info.siblings or []:
        lfs = getattr(s, "lfs", None)
        sha256 = (lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)) if lfs else None
        digest = sha256 or getattr(s, "blob_id", None)
        if digest:
            digests[s.rfilename] = digest
    if not info.sha:
        raise DigestError(f"parent {repo_id}: the Hub returned no commit sha")
    if info.siblings and not digests:
        raise DigestError(f"parent {repo_id}@{info.sha[:12]}: the Hub returned no file digests")
    files = {p: digests[p] for p in merge_inputs(sorted(digests), adapter=adapter)}
    card_data = info.card_data.to_dict() if info.card_data is not None else {}
    card = {"metadata": metadata_digest(card_data, info.tags, info.gated),
            "files": {p: d for p, d in sorted(digests.items()) if _matches(p, CARD_FILES)}}
    return ParentState(repo_id, info.sha, files, card)


def parent_state(api: Any, repo_id: str, revision: str | None, *, adapter: bool = False,
                 endpoint: str = "") -> ParentState:
    """A Hub parent's state at `revision` (a sha pins it), from one model_info call."""
    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as e:  # HTTP or connection errors: one line naming the parent, not the request
        raise DigestError(errors.message("current", e, where=where, repo=repo_id, endpoint=endpoint)
                          or f"parent {where}: {type(e).__name__}") from None
    return state_from_info(repo_id, info, adapter=adapter)


def is_hub_entry(entry: dict[str, Any]) -> bool:
    return not entry.get("local") and bool(entry.get("sha"))


def entry_repo(entry: dict[str, Any]) -> tuple[str, bool]:
    """(repo id, is an adapter) of a lock parent entry."""
    return split_ref(str(entry["ref"]))[0], entry.get("role") == "lora"


# ----------------------------------------------------------------------------------------- card inputs

def template_digest(template: Path | None = None) -> tuple[str, str]:
    """(name, sha256) of the card templates a render uses: the built-in ones (a user template may extend
    them), plus the user's own when given."""
    from mergebot.card.render import TEMPLATES_DIR

    h = hashlib.sha256()
    for path in sorted(TEMPLATES_DIR.glob("*.j2")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    if template is None:
        return "builtin", h.hexdigest()
    h.update(b"custom\0" + Path(template).read_bytes())
    return "custom", h.hexdigest()


def card_inputs(template: Path | None = None) -> dict[str, str]:
    """mergebot's own inputs to a card: its version and its templates."""
    name, digest = template_digest(template)
    return {"mergebot_version": __version__, "template": name, "template_sha256": digest}


# ----------------------------------------------------------------------------------------- the lock

def record_digests(out_dir: Path, *, endpoint: str | None = None, token: str | None = None,
                   template: Path | None = None, api: Any = None) -> dict[str, Any]:
    """Add `files` and `card` to every Hub parent of `out_dir`'s lock (at its pinned sha), and `card_inputs`.

    A parent whose digests cannot be listed keeps only its sha (staleness then compares commits, as for a
    lock written before digests existed) and a warning says so: a finished merge is not thrown away for it."""
    out_dir = Path(out_dir)
    lock = read_lock(out_dir)
    endpoint = resolve_endpoint(endpoint)
    hub_entries = [entry for entry in lock["parents"] if is_hub_entry(entry)]
    # a client only for Hub parents: importing huggingface_hub's HfApi costs a local merge ~1 s
    hf = (api or client(endpoint, token or None)) if hub_entries else None
    for entry in hub_entries:
        repo_id, adapter = entry_repo(entry)
        try:
            entry.update(parent_state(hf, repo_id, entry["sha"], adapter=adapter, endpoint=endpoint).record())
        except DigestError as e:
            warnings.warn(f"{e}; staleness of this parent falls back to its commit sha", stacklevel=2)
    lock["card_inputs"] = card_inputs(template)
    write_lock(out_dir, lock)
    return lock


def changed_paths(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """Paths added, removed or with another digest, sorted."""
    return sorted(p for p in set(old) | set(new) if old.get(p) != new.get(p))
