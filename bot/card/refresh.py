"""Card-only refresh: re-render a published merge's README.md and NOTICE without downloading or merging weights.

When a parent changes its license metadata or LICENSE file, or mergebot's card template changes, the weights of a
merge are still right but its card is not. Everything the card needs is on the Hub already: the published
`mergebot.lock.json` and merge config (read back into a scratch directory that `card_context_from_output`
reads as it reads a fresh merge's output), and the parents' metadata. The license analysis is re-run on the
parents as they are now; a `block` verdict stops the refresh before anything is committed, as it stops a merge.

The refresh is one commit guarded by `parent_commit` (a concurrent push makes it fail with PublishConflict),
holding only what changed among README.md, NOTICE and the lock, whose change is confined to the card records
(`card`, `card_sha` per parent and `card_inputs`) so the next scheduled run sees the card as up to date. A parent
whose merged files changed since the lock cannot have its card refreshed alone: that is a re-merge.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergebot.card.licenses import LicenseOverride, LicensePolicy, LicenseReport, analyze
from mergebot.card.render import CONFIG_FILES, card_context_from_output, write_card
from mergebot.config.refs import RefSyntaxError, parse_ref_text, split_ref
from mergebot.errors import MergebotError
from mergebot.hub.client import client, resolve_endpoint, resolve_token
from mergebot.hub.digests import DigestError, card_inputs, changed_paths, entry_repo, parent_state
from mergebot.hub.parents import ParentInfo, parent_from_hub, parent_from_local
from mergebot.hub.publish import (
    LicenseGateError,
    PublishAuthError,
    PublishConflict,
    Publisher,
    PublishError,
    RetryPolicy,
)
from mergebot.io.local import is_local
from mergebot.io.lockfile import LOCK_FILE, read_lock, write_lock

CARD_PATHS = ("README.md", "NOTICE")


class RefreshError(MergebotError):
    """The card of a published merge cannot be refreshed on its own (not a mergebot repo, weights changed)."""


@dataclass
class CardRefresh:
    """What a refresh found and did. `changed` lists the repo paths whose bytes differ from the head's."""

    repo_id: str
    head: str
    report: LicenseReport
    changed: list[str] = field(default_factory=list)
    commit: str | None = None  # the new commit; None for a dry run or when nothing changed
    files: dict[str, bytes] = field(default_factory=dict)  # the rendered README.md, NOTICE and lock
    old: dict[str, bytes] = field(default_factory=dict)  # the head's README.md and NOTICE (for a diff)
    endpoint: str = ""

    @property
    def card_changed(self) -> bool:
        return any(p in self.changed for p in CARD_PATHS)


def _git_oid(data: bytes) -> str:
    import hashlib

    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def _download(hf: Any, repo_id: str, path: str, head: str) -> bytes:
    try:
        return Path(hf.hf_hub_download(repo_id, path, revision=head)).read_bytes()
    except Exception as e:  # noqa: BLE001 - any HTTP or network failure: name the file
        raise RefreshError(f"{repo_id}@{head[:12]}: cannot download {path} ({type(e).__name__})") from None


def _parent_info(hf: Any, entry: dict[str, Any], *, endpoint: str, token: str | None,
                 search: Sequence[Path]) -> ParentInfo:
    """A lock parent's metadata as it is now; its card record in `entry` brought up to date.

    A Hub parent whose merged files are unchanged is read at its current commit; one whose lock has no
    digests (an older lock) at the commit the lock pins; one whose files changed is a RefreshError."""
    ref, role = str(entry["ref"]), entry.get("role")
    if entry.get("local"):
        try:
            local = is_local(parse_ref_text(ref), list(search))
        except RefSyntaxError as e:
            raise RefreshError(f"{LOCK_FILE}: parent {ref!r}: {e}") from None
        if local is None:
            raise RefreshError(f"parent {ref} is a local directory that is not here; run where the merge's "
                               "config is, or pass its path (--config)")
        return parent_from_local(local, ref=ref, role=role)
    repo_id, adapter = entry_repo(entry)
    revision = entry.get("revision") or split_ref(ref)[1]
    if not isinstance(entry.get("files"), dict):
        return parent_from_hub(repo_id, revision=revision, sha=entry.get("sha"), endpoint=endpoint, token=token,
                               role=role, ref=ref)
    try:
        now = parent_state(hf, repo_id, revision, adapter=adapter, endpoint=endpoint)
    except DigestError as e:
        raise RefreshError(str(e)) from None
    moved = changed_paths(entry["files"], now.files)
    if moved:
        raise RefreshError(f"weights changed in {ref} since the merge ({', '.join(moved[:3])}): re-merge instead "
                           "of refreshing the card")
    entry["card"], entry["card_sha"] = now.card, now.sha
    return parent_from_hub(repo_id, revision=revision, sha=now.sha, endpoint=endpoint, token=token, role=role,
                           ref=ref)


def refresh_card(repo_id: str, *, endpoint: str | None = None, token: str | None = None,
                 template: Path | None = None, license_id: str | None = None, allow_license_risk: bool = False,
                 policy: LicensePolicy | None = None, search: Sequence[Path] = (), dry_run: bool = False,
                 revision: str = "main", api: Any = None) -> CardRefresh:
    """Re-render `repo_id`'s card from its published lock and config and its parents' metadata now; commit
    what changed (unless `dry_run`). Raises LicenseGateError on a `block` verdict without `allow_license_risk`."""
    endpoint = resolve_endpoint(endpoint)
    token = resolve_token(token) or None
    hf = api or client(endpoint, token)
    try:
        info = hf.model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as e:  # noqa: BLE001
        raise RefreshError(f"{repo_id}: cannot read it on {endpoint} ({type(e).__name__})") from None
    head = info.sha
    remote = {s.rfilename: s.blob_id for s in info.siblings or []}
    if not head or LOCK_FILE not in remote:
        raise RefreshError(f"{repo_id}: no {LOCK_FILE} on {endpoint}: not a merge mergebot published")
    config = next((c for c in CONFIG_FILES if c in remote), None)
    if config is None:
        raise RefreshError(f"{repo_id}: no {' or '.join(CONFIG_FILES)} on {endpoint}: cannot render its card")

    scratch = Path(tempfile.mkdtemp(prefix="mergebot-card-"))
    try:
        for path in (LOCK_FILE, config):
            (scratch / path).write_bytes(_download(hf, repo_id, path, head))
        lock = read_lock(scratch)
        parents = [_parent_info(hf, e, endpoint=endpoint, token=token, search=search) for e in lock["parents"]]
        report = analyze(parents, repo_name=repo_id.split("/")[-1], policy=policy or LicensePolicy(),
                         override=LicenseOverride(license_id) if license_id else None)
        if report.verdict == "block" and not allow_license_risk:
            raise LicenseGateError(f"license check blocks the card refresh of {repo_id} (nothing committed): "
                                   + "; ".join(report.reasons))
        write_card(scratch, card_context_from_output(scratch, parents, report, repo_id), template)
        lock["card_inputs"] = card_inputs(template)
        write_lock(scratch, lock)
        files = {p: (scratch / p).read_bytes() for p in (*CARD_PATHS, LOCK_FILE)}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    changed = [p for p, data in files.items() if remote.get(p) != _git_oid(data)]
    done = CardRefresh(repo_id, head, report, changed, files=files, endpoint=endpoint)
    if dry_run or not changed:
        if dry_run:
            done.old = {p: _download(hf, repo_id, p, head) for p in CARD_PATHS if p in remote}
        return done
    done.commit = _commit(hf, repo_id, head, revision, {p: files[p] for p in changed}, report, token, endpoint)
    return done


def _commit(hf: Any, repo_id: str, head: str, revision: str, files: dict[str, bytes], report: LicenseReport,
            token: str | None, endpoint: str) -> str:
    """One commit of `files` on top of `head` (412 from the Hub: someone pushed since, nothing committed)."""
    from huggingface_hub import CommitOperationAdd

    if not token:
        raise PublishAuthError(f"no Hugging Face token for {endpoint}: set HF_TOKEN to refresh {repo_id}'s card")
    pub = Publisher(hf, token, endpoint, repo_id, RetryPolicy(attempts=1))
    ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=data) for p, data in sorted(files.items())]
    description = json.dumps({"license": report.license, "verdict": report.verdict, "files": sorted(files)})
    try:
        info = hf.create_commit(repo_id, ops, commit_message="mergebot: refresh the model card (no re-merge)",
                                commit_description=description, revision=revision, parent_commit=head,
                                token=token)
    except Exception as e:
        if pub.status(e) in (409, 412):
            raise PublishConflict(f"{repo_id}@{revision} moved since {head[:12]} was read: someone else committed; "
                                  "card not refreshed, re-run to refresh on top of it") from None
        mapped = pub.translate(e, "refreshing the card")
        if mapped is not None:
            raise mapped from None
        raise PublishError(f"card refresh commit to {repo_id}@{revision} on {endpoint} failed: "
                           f"{pub.describe(e)}") from None
    return str(info.oid)
