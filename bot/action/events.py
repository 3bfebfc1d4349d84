"""The triggering event (GITHUB_EVENT_NAME / GITHUB_EVENT_PATH / GITHUB_WORKSPACE) and the files it changed.

Changed files come from plain `git diff --name-only` in the checked-out workspace (no third-party "changed
files" action: those have leaked runner secrets before). When the range cannot be diffed (a new branch, whose
`before` is all zeros; a force push or a shallow clone whose old commit is not here) the answer is None, which
callers read as "every matching config".
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergebot.errors import MergebotError

ZERO_SHA = "0" * 40
PR_EVENTS = ("pull_request", "pull_request_target")


class EventError(MergebotError):
    """The event payload or the workspace cannot be read."""


@dataclass
class Event:
    """What GitHub tells the action about this run; `name` is "" for a run outside Actions."""

    name: str
    payload: dict[str, Any]
    workspace: Path
    notes: list[str] = field(default_factory=list)

    @property
    def is_pull_request(self) -> bool:
        return self.name in PR_EVENTS

    def diff_range(self) -> tuple[str, str, bool] | None:
        """(old, new, use merge-base) for events that describe a change, None for the others."""
        if self.name == "push":
            before, after = self.payload.get("before"), self.payload.get("after")
            if isinstance(before, str) and isinstance(after, str):
                return before, after, False
            return None
        if self.is_pull_request:
            pr = self.payload.get("pull_request") or {}
            base = (pr.get("base") or {}).get("sha")
            head = (pr.get("head") or {}).get("sha")
            if isinstance(base, str) and isinstance(head, str):
                return base, head, True
        return None


def read_event(env: Mapping[str, str] | None = None, *, name: str | None = None,
               event_path: str | None = None, workspace: str | None = None) -> Event:
    """The event from the environment (explicit arguments win, for local runs and tests)."""
    env = os.environ if env is None else env
    name = name if name is not None else env.get("GITHUB_EVENT_NAME", "")
    path = event_path if event_path is not None else env.get("GITHUB_EVENT_PATH")
    ws = Path(workspace or env.get("GITHUB_WORKSPACE") or os.getcwd())
    if not ws.is_dir():
        raise EventError(f"GITHUB_WORKSPACE {ws}: not a directory (did the workflow run actions/checkout?)")
    payload: dict[str, Any] = {}
    if path:
        try:
            payload = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise EventError(f"GITHUB_EVENT_PATH {path}: no such file") from None
        except (OSError, ValueError) as e:
            raise EventError(f"GITHUB_EVENT_PATH {path}: cannot read the event payload: {e}") from None
        if not isinstance(payload, dict):
            raise EventError(f"GITHUB_EVENT_PATH {path}: the event payload is not a JSON object")
    return Event(name=name, payload=payload, workspace=ws.resolve())


def git(workspace: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """git in the workspace; safe.directory=* because the container's root does not own the mounted checkout.
    Output is decoded as the file system names are (surrogateescape), so a file name that is not UTF-8
    matches the walk's name and is refused as a config, instead of stopping the run with a decode error."""
    try:
        return subprocess.run(["git", "-c", "safe.directory=*", "-C", str(workspace), *args],
                              capture_output=True, text=True, encoding="utf-8", errors="surrogateescape",
                              timeout=120)
    except FileNotFoundError:
        raise EventError("git is not installed; it is needed to find the configs an event changed") from None


def has_commit(workspace: Path, sha: str) -> bool:
    return git(workspace, "cat-file", "-e", f"{sha}^{{commit}}").returncode == 0


def changed_files(event: Event) -> list[str] | None:
    """Paths (relative to the workspace, POSIX) changed by the event; None when every config should be taken.

    The reason for a None is appended to `event.notes` so the summary can say why everything ran.
    """
    rng = event.diff_range()
    if rng is None:
        event.notes.append(f"the {event.name or 'local'} event names no commit range: taking every matching config")
        return None
    old, new, merge_base = rng
    if old == ZERO_SHA:
        event.notes.append("new branch (before = 000…0): taking every matching config")
        return None
    for sha in (old, new):
        if not has_commit(event.workspace, sha):
            why = "force push" if event.payload.get("forced") else "shallow checkout or rewritten history"
            event.notes.append(f"commit {sha[:12]} is not in the checkout ({why}; use actions/checkout with "
                               "fetch-depth: 0): taking every matching config")
            return None
    spec = f"{old}...{new}" if merge_base else f"{old}..{new}"
    done = git(event.workspace, "diff", "--name-only", "--no-renames", "--relative", "-z", spec)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        event.notes.append(f"git diff {spec} failed ({last}): taking every matching config")
        return None
    return [p for p in done.stdout.split("\0") if p]
