"""Is a published merge out of date? Compare the target repo's `mergebot.lock.json` with the world now.

A merge is stale when it was never published (no repo, or no lock in it), when the config text changed (its
sha256 differs from the lock's `config_sha256`), or when a Hub parent's revision now resolves to a different
commit than the one the lock recorded. Local parents have no commit to compare and are taken as unchanged.
Parents shared by several configs are resolved once per run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergebot.action.select import ConfigEntry, Selection
from mergebot.config.configfile import Config
from mergebot.config.refs import ModelRef, is_repo_id
from mergebot.errors import MergebotError
from mergebot.hub import errors
from mergebot.hub.client import client
from mergebot.io.local import is_local
from mergebot.io.lockfile import LOCK_FILE


class StalenessError(MergebotError):
    """The Hub could not tell whether a merge is up to date (network, auth, bad lock)."""


@dataclass
class ParentChange:
    ref: str
    old: str | None  # sha in the published lock (None: not in the lock)
    new: str

    def __str__(self) -> str:
        return f"{self.ref} ({(self.old or 'new')[:7]} → {self.new[:7]})"


@dataclass
class Staleness:
    stale: bool
    published: bool
    config_changed: bool = False
    changed: list[ParentChange] = field(default_factory=list)
    head: str | None = None  # the target repo's current commit, when it exists
    lock: dict[str, Any] | None = None
    license: str | None = None  # what the published card declares

    def describe(self) -> str:
        """The summary's "parents changed" cell."""
        if not self.published:
            return "never published"
        parts = [str(c) for c in self.changed]
        if self.config_changed:
            parts.append("config changed")
        return ", ".join(parts) if parts else "none"


def hub_refs(cfg: Config) -> list[ModelRef]:
    """The config's parents that live on the Hub (local directories, as the engine finds them, excluded)."""
    search = [Path(cfg.file).resolve().parent]
    return [r for r in cfg.referenced_models() if is_local(r, search) is None and is_repo_id(r.path)]


class StalenessChecker:
    """One per run: holds the HfApi and the parent sha cache."""

    def __init__(self, endpoint: str, token: str | None):
        self.endpoint = endpoint
        self.api = client(endpoint, token or None)
        self._shas: dict[tuple[str, str | None], str] = {}

    def parent_sha(self, ref: ModelRef) -> str:
        """The commit `ref`'s revision (default: main) points at now."""
        key = (ref.path, ref.revision)
        if key not in self._shas:
            where = f"{ref.path}@{ref.revision}" if ref.revision else ref.path
            try:
                info = self.api.model_info(ref.path, revision=ref.revision)
            except Exception as e:  # HTTP errors, connection errors: say what failed, not the request
                raise StalenessError(errors.message("current", e, where=where, repo=ref.path,
                                                    endpoint=self.endpoint)) from None
            if not info.sha:
                raise StalenessError(f"parent {where}: {self.endpoint} returned no commit sha")
            self._shas[key] = info.sha
        return self._shas[key]

    def published_lock(self, repo: str) -> tuple[str | None, dict[str, Any] | None]:
        """(head commit, lock) of the target repo; (None, None) when the repo does not exist."""
        head, lock, _ = self.published(repo)
        return head, lock

    def published(self, repo: str) -> tuple[str | None, dict[str, Any] | None, str | None]:
        """(head commit, lock, declared license) of the target repo; all None when the repo does not exist."""
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

        try:
            info = self.api.model_info(repo)
        except RepositoryNotFoundError:
            return None, None, None
        except Exception as e:
            raise StalenessError(f"target {repo}: cannot read it on {self.endpoint} ({type(e).__name__})") from None
        license_id = info.card_data.get("license") if info.card_data is not None else None
        names = {s.rfilename for s in (info.siblings or [])}
        if LOCK_FILE not in names:
            return info.sha, None, license_id
        try:
            path = self.api.hf_hub_download(repo, LOCK_FILE, revision=info.sha)
            lock = json.loads(Path(path).read_text(encoding="utf-8"))
        except EntryNotFoundError:
            return info.sha, None, license_id
        except ValueError as e:
            raise StalenessError(f"target {repo}: {LOCK_FILE} is not valid JSON ({e})") from None
        except Exception as e:
            raise StalenessError(f"target {repo}: cannot download {LOCK_FILE} ({type(e).__name__})") from None
        if not isinstance(lock, dict) or not isinstance(lock.get("parents"), list):
            raise StalenessError(f"target {repo}: {LOCK_FILE} has no 'parents' list")
        return info.sha, lock, license_id

    def check(self, cfg: Config, repo: str) -> Staleness:
        head, lock, license_id = self.published(repo)
        if lock is None:
            return Staleness(stale=True, published=False, head=head)
        config_changed = lock.get("config_sha256") != cfg.sha256
        recorded = {p.get("ref"): p.get("sha") for p in lock["parents"] if isinstance(p, dict)}
        changed = []
        for ref in hub_refs(cfg):
            now = self.parent_sha(ref)
            old = recorded.get(str(ref))
            if old != now:
                changed.append(ParentChange(str(ref), old, now))
        return Staleness(stale=config_changed or bool(changed), published=True, config_changed=config_changed,
                         changed=changed, head=head, lock=lock, license=license_id)


@dataclass
class Decision:
    """What to do with one selected config before any merge: run it (and why) or report it."""

    entry: ConfigEntry
    run: bool
    staleness: Staleness | None = None
    note: str = ""  # "parents changed" cell
    error: str | None = None


def decide(entry: ConfigEntry, selection: Selection, checker: StalenessChecker) -> Decision:
    """Staleness matters for the choice only in stale mode; elsewhere it is information for the summary.

    When the Hub cannot tell, a publishing stale-mode run fails that config rather than spend GPU time on a
    merge that may be up to date; other modes go ahead and show "unknown"."""
    if entry.error is not None or entry.cfg is None or entry.repo is None:
        return Decision(entry, run=False, error=entry.error or f"{entry.path}: invalid config")
    try:
        st = checker.check(entry.cfg, entry.repo)
    except StalenessError as e:
        if selection.skip_up_to_date and selection.publish:  # a dry run plans anyway
            return Decision(entry, run=False, error=f"{entry.path}: cannot tell whether it is up to date: {e}")
        return Decision(entry, run=True, note=f"unknown ({e})")
    if selection.skip_up_to_date and not st.stale:
        return Decision(entry, run=False, staleness=st, note=st.describe())
    return Decision(entry, run=True, staleness=st, note=st.describe())
