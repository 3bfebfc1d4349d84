"""Hub webhooks on the parents of the configured merges, so a parent's new commit starts a run within minutes
instead of at the next weekly cron.

One webhook per Hub parent (watched: that model; domains: repo), all sending to one target URL: a small relay
that turns the Hub's POST into a GitHub `repository_dispatch` (README, "Re-merge when a parent changes").
Several parents moving together send several events; the relay or the workflow's `concurrency` group collapses
them, and each run re-merges only what is stale, so a duplicate run commits nothing.

Idempotent: the webhooks already sending to the target are listed first; one that watches exactly the parent
is kept (updated when its domains, secret or disabled state differ), one that watches the parent among others is
narrowed to it, and only a parent without one gets a new webhook. Webhooks to the target that watch no configured
parent any more are reported, and deleted with `prune`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from mergebot.errors import MergebotError

DOMAINS = ["repo"]


class WebhookError(MergebotError):
    """The Hub refused to list, create or update a webhook."""


@dataclass
class WatchResult:
    """What `ensure_webhooks` did (or, in a dry run, would do): parent ids, and ids of unused webhooks."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)  # webhook ids to the target that watch no parent
    pruned: list[str] = field(default_factory=list)
    ids: dict[str, str] = field(default_factory=dict)  # parent -> webhook id


def _models(hook: Any) -> list[str]:
    return [w.name for w in hook.watched or [] if w.type == "model"]


def _needs_update(hook: Any, secret: str | None) -> bool:
    return (sorted(hook.domains or []) != DOMAINS or bool(hook.disabled)
            or (secret is not None and hook.secret != secret))


def _call(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - HTTP/network: one line naming what failed
        status = getattr(getattr(e, "response", None), "status_code", None)
        raise WebhookError(f"{what}: {type(e).__name__}" + (f" (HTTP {status})" if status else "")) from None


def ensure_webhooks(api: Any, parents: Iterable[str], target: str, *, secret: str | None = None,
                    prune: bool = False, dry_run: bool = False) -> WatchResult:
    """One webhook per parent to `target`, creating only what is missing (see the module's docstring)."""
    if not target.startswith(("https://", "http://")):
        raise WebhookError(f"--target {target!r}: expected an http(s) URL")
    wanted = list(dict.fromkeys(parents))
    ours = [h for h in _call("listing webhooks", api.list_webhooks) if h.url == target]
    used: set[str] = set()
    done = WatchResult()
    for parent in wanted:
        exact = next((h for h in ours if h.id not in used and _models(h) == [parent]
                      and len(h.watched) == 1), None)
        hook = exact or next((h for h in ours if h.id not in used and parent in _models(h)), None)
        if hook is None:
            done.created.append(parent)
            if not dry_run:
                made = _call(f"creating the webhook for {parent}", api.create_webhook, url=target,
                             watched=[{"type": "model", "name": parent}], domains=DOMAINS, secret=secret)
                done.ids[parent] = made.id
            continue
        used.add(hook.id)
        done.ids[parent] = hook.id
        if exact is not None and not _needs_update(hook, secret):
            done.kept.append(parent)
            continue
        done.updated.append(parent)
        if not dry_run:
            _call(f"updating webhook {hook.id} for {parent}", api.update_webhook, hook.id, url=target,
                  watched=[{"type": "model", "name": parent}], domains=DOMAINS, secret=secret)
            if hook.disabled:
                _call(f"enabling webhook {hook.id}", api.enable_webhook, hook.id)
    done.unused = [h.id for h in ours if h.id not in used]
    if prune and not dry_run:
        for webhook_id in done.unused:
            _call(f"deleting webhook {webhook_id}", api.delete_webhook, webhook_id)
        done.pruned = list(done.unused)
    return done
