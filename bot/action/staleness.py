"""Is a published merge out of date? Compare the target repo's `mergebot.lock.json` with the world now.

A merge is stale when it was never published (no repo, or no lock in it), when the config text changed (its
sha256 differs from the lock's `config_sha256`), or when a file a merge reads from a Hub parent changed: the
lock records each file's Hub digest (mergebot.hub.digests), so a parent commit that only edits its README is no
reason to download and re-merge. Locks written before digests existed fall back to comparing commit shas.

When no weights changed but what the card reads did (a parent's license metadata or LICENSE file, mergebot's
version or card template), only the card is stale: `Staleness.card_stale`, refreshed without a merge
(mergebot.card.refresh). Local parents have no commit to compare and are taken as unchanged. Parents shared by
several configs are looked up once per run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergebot.action.select import ConfigEntry, Selection
from mergebot.config.configfile import Config
from mergebot.config.refs import ModelRef, is_repo_id, split_ref
from mergebot.errors import MergebotError
from mergebot.hub.client import client
from mergebot.hub.digests import DigestError, ParentState, card_inputs, changed_paths, parent_state
from mergebot.io.local import is_local
from mergebot.io.lockfile import LOCK_FILE


class StalenessError(MergebotError):
    """The Hub could not tell whether a merge is up to date (network, auth, bad lock)."""


@dataclass
class ParentChange:
    ref: str
    old: str | None  # sha in the published lock (None: not in the lock)
    new: str
    files: list[str] | None = None  # the merge's files whose digest changed (None: a lock without digests)

    def __str__(self) -> str:
        moved = f"{self.ref} ({(self.old or 'new')[:7]} → {self.new[:7]})"
        if not self.files:
            return moved
        shown = ", ".join(self.files[:3]) + (f" and {len(self.files) - 3} more" if len(self.files) > 3 else "")
        return f"weights changed in {moved}: {shown}"


@dataclass
class Staleness:
    stale: bool
    published: bool
    config_changed: bool = False
    changed: list[ParentChange] = field(default_factory=list)
    head: str | None = None  # the target repo's current commit, when it exists
    lock: dict[str, Any] | None = None
    license: str | None = None  # what the published card declares
    card: list[str] = field(default_factory=list)  # why the card is out of date ("card inputs changed in X: ...")

    @property
    def card_stale(self) -> bool:
        """Only the card is out of date: refresh README.md and NOTICE, no merge."""
        return self.published and not self.stale and bool(self.card)

    def describe(self) -> str:
        """The summary's "parents changed" cell: why the config was re-merged, refreshed or left alone."""
        if not self.published:
            return "never published"
        parts = [str(c) for c in self.changed]
        if self.config_changed:
            parts.append("config changed")
        if not self.stale:
            parts += self.card
        return ", ".join(parts) if parts else "none"


def hub_refs(cfg: Config) -> list[ModelRef]:
    """The config's parents that live on the Hub (local directories, as the engine finds them, excluded)."""
    search = [Path(cfg.file).resolve().parent]
    return [r for r in cfg.referenced_models() if is_local(r, search) is None and is_repo_id(r.path)]


class StalenessChecker:
    """One per run: holds the HfApi and the parents' current states (sha + digests), each looked up once."""

    def __init__(self, endpoint: str, token: str | None, *, template: Path | None = None):
        self.endpoint = endpoint
        self.api = client(endpoint, token or None)
        self.template = template  # the card template this run renders with (None: the built-in one)
        self._states: dict[tuple[str, str | None, bool], ParentState] = {}

    def state(self, repo_id: str, revision: str | None, *, adapter: bool = False) -> ParentState:
        """A Hub parent now: the commit its revision (default: main) points at, and its files' digests."""
        key = (repo_id, revision, adapter)
        if key not in self._states:
            try:
                self._states[key] = parent_state(self.api, repo_id, revision, adapter=adapter,
                                                 endpoint=self.endpoint)
            except DigestError as e:
                raise StalenessError(str(e)) from None
        return self._states[key]

    def parent_sha(self, ref: ModelRef) -> str:
        """The commit `ref`'s revision (default: main) points at now."""
        return self.state(ref.path, ref.revision).sha

    def compare(self, key: str, repo_id: str, revision: str | None, entry: dict[str, Any] | None,
                *, adapter: bool = False) -> tuple[ParentChange | None, list[str]]:
        """(weights change, card reasons) of one Hub parent against its lock entry."""
        now = self.state(repo_id, revision, adapter=adapter)
        if entry is None:
            return ParentChange(key, None, now.sha), []
        old = entry.get("sha")
        if not isinstance(entry.get("files"), dict):  # a lock written before digests: commits decide
            return (ParentChange(key, old, now.sha) if old != now.sha else None), []
        files = changed_paths(entry["files"], now.files)
        if files:
            return ParentChange(key, old, now.sha, files), []
        card: dict[str, Any] = entry["card"] if isinstance(entry.get("card"), dict) else {}
        what = ["license metadata"] if card.get("metadata") != now.card["metadata"] else []
        what += changed_paths(card.get("files") or {}, now.card["files"])
        return None, ([f"card inputs changed in {key}: {', '.join(what)}"] if what else [])

    def own_card_inputs(self, lock: dict[str, Any]) -> list[str]:
        """Why mergebot's own card inputs differ from the lock's (none for a lock that did not record them,
        or a card rendered with a user template this run does not have)."""
        old = lock.get("card_inputs")
        if not isinstance(old, dict) or old.get("template") != ("custom" if self.template else "builtin"):
            return []
        now = card_inputs(self.template)
        out = []
        if old.get("template_sha256") != now["template_sha256"]:
            out.append("card template changed")
        if old.get("mergebot_version") != now["mergebot_version"]:
            out.append(f"mergebot {old.get('mergebot_version')} → {now['mergebot_version']}")
        return out

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
        entries = {str(p.get("ref")): p for p in lock["parents"] if isinstance(p, dict)}
        changed: list[ParentChange] = []
        card: list[str] = []
        targets = [(str(ref), ref.path, ref.revision, False) for ref in hub_refs(cfg)]
        for key, e in entries.items():  # LoRA adapters on the Hub: compared by digest when the lock has them
            if e.get("role") == "lora" and not e.get("local") and isinstance(e.get("files"), dict):
                repo_id, revision, _ = split_ref(key)
                targets.append((key, repo_id, revision, True))
        for key, repo_id, revision, adapter in targets:
            change, why = self.compare(key, repo_id, revision, entries.get(key), adapter=adapter)
            if change is not None:
                changed.append(change)
            card += why
        card += self.own_card_inputs(lock)
        return Staleness(stale=config_changed or bool(changed), published=True, config_changed=config_changed,
                         changed=changed, head=head, lock=lock, license=license_id, card=card)


@dataclass
class Decision:
    """What to do with one selected config before any merge: run it (and why) or report it."""

    entry: ConfigEntry
    run: bool
    staleness: Staleness | None = None
    note: str = ""  # "parents changed" cell
    error: str | None = None
    refresh_card: bool = False  # not merged, but the card's inputs changed: refresh README.md and NOTICE


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
        return Decision(entry, run=False, staleness=st, note=st.describe(), refresh_card=st.card_stale)
    return Decision(entry, run=True, staleness=st, note=st.describe())
