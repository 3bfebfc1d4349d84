"""`mergebot watch --target URL`: Hub webhooks on every Hub parent of the configured merges (mergebot.hub.webhooks).

Reads the configs as the Action does (the `configs` globs, default merges/**/*.y*ml, inside the workspace) and
registers one webhook per Hub parent sending to URL, a relay to GitHub's `repository_dispatch` (README). Run it
again after adding a config: it creates only what is missing. Invalid configs are reported and skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mergebot.action.inputs import split_patterns
from mergebot.action.runner_log import safe_line
from mergebot.action.select import discover, load_entry
from mergebot.action.staleness import hub_refs
from mergebot.config.refs import is_repo_id
from mergebot.errors import MergebotError
from mergebot.hub.client import client, resolve_endpoint, resolve_token
from mergebot.hub.webhooks import ensure_webhooks
from mergebot.io.local import is_local


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("watch", help="register Hub webhooks on the parents of the configured merges",
                       description="Create one Hub webhook per Hub parent of the configs, sending to --target (a "
                                   "relay to GitHub repository_dispatch). Idempotent: existing webhooks to the "
                                   "target are kept or updated, never duplicated. Token from HF_TOKEN.")
    p.add_argument("--target", required=True, metavar="URL", help="where the Hub sends the events (the relay)")
    p.add_argument("--configs", default=None, metavar="GLOBS",
                   help="config paths or globs, comma/space separated (default merges/**/*.y*ml)")
    p.add_argument("--workspace", type=Path, default=None, help="the repository checkout (default: cwd)")
    p.add_argument("--secret-env", default="MERGEBOT_WEBHOOK_SECRET", metavar="NAME",
                   help="environment variable holding the secret the Hub sends in X-Webhook-Secret "
                        "(default MERGEBOT_WEBHOOK_SECRET; unset: no secret)")
    p.add_argument("--prune", action="store_true", help="delete webhooks to the target that watch no parent now")
    p.add_argument("--dry-run", action="store_true", help="say what would change, change nothing")
    p.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or https://huggingface.co)")
    p.set_defaults(run=run)


def configured_parents(workspace: Path, patterns: list[str]) -> tuple[list[str], list[str]]:
    """(Hub repo ids of every parent and LoRA adapter of the configs, sorted; problems, one line each)."""
    paths, missing, notes = discover(workspace, patterns)
    problems = [e.error or e.path for e in missing] + notes
    found: set[str] = set()
    for path in paths:
        entry = load_entry(workspace, path, None)
        if entry.cfg is None:
            problems.append(entry.error or f"{path}: invalid config")
            continue
        search = [entry.file.resolve().parent]
        for ref in hub_refs(entry.cfg):
            found.add(ref.path)
            if ref.lora is not None and is_repo_id(ref.lora.path) and is_local(ref.lora, search) is None:
                found.add(ref.lora.path)
    return sorted(found), problems


def run(args: argparse.Namespace) -> int:
    workspace = (args.workspace or Path(os.environ.get("GITHUB_WORKSPACE") or Path.cwd())).resolve()
    parents, problems = configured_parents(workspace, split_patterns(args.configs))
    for line in problems:
        print(safe_line(f"warning: {line}"), file=sys.stderr)
    if not parents:
        raise MergebotError(f"{workspace}: no Hub parents in the configs ({args.configs or 'merges/**/*.y*ml'})")
    token = resolve_token(None)
    if not token:
        raise MergebotError("no Hugging Face token: set HF_TOKEN (webhooks belong to the token's user)")
    endpoint = resolve_endpoint(args.endpoint)
    secret = os.environ.get(args.secret_env) or None
    done = ensure_webhooks(client(endpoint, token), parents, args.target, secret=secret, prune=args.prune,
                           dry_run=args.dry_run)
    would = "would " if args.dry_run else ""
    for verb, items in (("create", done.created), ("update", done.updated)):
        for parent in items:
            print(safe_line(f"{would}{verb}: {parent}"))
    for parent in done.kept:
        print(safe_line(f"ok: {parent} (webhook {done.ids[parent]})"))
    for webhook_id in done.unused:
        gone = webhook_id in done.pruned
        print(safe_line(f"{'deleted' if gone else 'unused'}: webhook {webhook_id} to {args.target}"
                        + ("" if gone else " watches no configured parent (--prune deletes it)")))
    return 0
