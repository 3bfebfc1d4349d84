"""`mergebot card --refresh REPO`: re-render a published merge's README.md and NOTICE from its lock, its config
and its parents' metadata now, and commit only them (mergebot.card.refresh): no download of weights, no merge.
What a scheduled Action run does by itself when only a card input changed, by hand."""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from mergebot.card.licenses import LicensePolicy
from mergebot.card.refresh import CARD_PATHS, refresh_card
from mergebot.cli._output import warn
from mergebot.cli.publish import _license_id
from mergebot.errors import MergebotError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("card", help="refresh the model card of a published merge (no re-merge)",
                       description="Re-render README.md and NOTICE of a merge mergebot published, from its "
                                   "mergebot.lock.json and config on the Hub and its parents' metadata now; the "
                                   "license check runs again and can block. One commit, only if the card changed. "
                                   "Token from HF_TOKEN.")
    p.add_argument("--refresh", required=True, metavar="REPO", help="the merge's Hub repo (ORG/NAME)")
    p.add_argument("--dry-run", action="store_true", help="show the new card's diff, commit nothing")
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="the merge's config file: local parents are found next to it (default: cwd)")
    p.add_argument("--card-template", type=Path, default=None, metavar="PATH", help="your own Jinja2 card template")
    p.add_argument("--license", type=_license_id, default=None, metavar="SPDX",
                   help="declare this Hub license id instead of the computed one (obligations still apply)")
    p.add_argument("--allow-license-risk", action="store_true",
                   help="refresh even when the license check says block (after a human review)")
    p.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or https://huggingface.co)")
    p.add_argument("--revision", default="main", help="branch to commit to (default: main)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    repo: str = args.refresh
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise MergebotError(f"--refresh {repo!r}: expected ORG/NAME")
    search = [args.config.resolve().parent] if args.config else []
    done = refresh_card(repo, endpoint=args.endpoint, template=args.card_template, license_id=args.license,
                        allow_license_risk=args.allow_license_risk, policy=LicensePolicy(), search=search,
                        dry_run=args.dry_run, revision=args.revision)
    report = done.report
    print(f"license: {report.license}, check: {report.verdict}", file=sys.stderr)
    warn(report.reasons if report.verdict != "ok" else [])
    if args.dry_run:
        for path in CARD_PATHS:
            old = done.old.get(path, b"").decode("utf-8", "replace").splitlines(keepends=True)
            new = done.files[path].decode("utf-8", "replace").splitlines(keepends=True)
            sys.stdout.writelines(difflib.unified_diff(old, new, f"a/{path}", f"b/{path}"))
        print(f"would commit: {', '.join(done.changed)}" if done.changed else "card is up to date", file=sys.stderr)
    elif done.commit:
        print(f"refreshed: {done.endpoint}/{repo} commit {done.commit} ({', '.join(done.changed)})")
    else:
        print(f"unchanged: {done.endpoint}/{repo} is already at {done.head}")
    return 0
