"""`mergebot publish OUT_DIR --repo ORG/NAME`: license check, quality gate, model card, one atomic commit to the Hub."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mergebot.action.runner_log import safe_line
from mergebot.card.license_table import LICENSES
from mergebot.card.licenses import LicenseOverride, LicensePolicy, analyze
from mergebot.card.render import card_context_from_output, write_card
from mergebot.cli._output import warn
from mergebot.cli.check import add_gate_arguments, gate_options
from mergebot.cli.merge import TOKEN_FLAG_WARNING
from mergebot.errors import OutputError
from mergebot.hub.client import resolve_endpoint, resolve_token
from mergebot.hub.parents import parents_from_lock
from mergebot.hub.publish import LicenseGateError, publish
from mergebot.io import confine
from mergebot.io.lockfile import read_lock

_KNOWN_IDS = sorted({s.hub_id for s in LICENSES.values()} | {"other", "unknown"})


def _license_id(text: str) -> str:
    value = text.strip().lower()
    if value not in _KNOWN_IDS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a Hub license id (e.g. apache-2.0, mit, llama3, other)")
    return value


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "publish", help="write the model card and publish a merge output directory to the Hub",
        description="Check the parents' licenses, write README.md and NOTICE into OUT_DIR, then publish every file "
                    "of OUT_DIR to the Hub in one commit (no commit when nothing changed). The token comes from "
                    "--token, HF_TOKEN or `hf auth login`, and is never printed.")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="a merge output directory (with mergebot.lock.json)")
    p.add_argument("--repo", required=True, metavar="ORG/NAME", help="target model repo (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo is unchanged)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to main")
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN, then the stored login)")
    p.add_argument("--allow-license-risk", action="store_true",
                   help="publish even when the license check says block (after a human review)")
    p.add_argument("--license", type=_license_id, default=None, metavar="SPDX",
                   help="declare this Hub license id instead of the computed one (obligations still apply)")
    p.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or https://huggingface.co)")
    p.add_argument("--revision", default="main", help="branch to commit to (default: main)")
    p.add_argument("--card-template", type=Path, default=None, metavar="PATH",
                   help="Jinja2 template for README.md (may extend the built-in card.md.j2)")
    p.add_argument("--models-dir", type=Path, default=None, metavar="DIR",
                   help="directory that local parent paths in the lock are relative to (default: cwd)")
    p.add_argument("--device", default="auto", help="device of the quality check: auto | cpu | cuda[:N] (default auto)")
    add_gate_arguments(p, "on")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    out_dir: Path = args.out_dir
    repo_id: str = args.repo
    if out_dir.is_dir():  # before the lock, config and card are read or written through a link out of OUT_DIR
        confine.audit_tree(out_dir, str(out_dir))
    lock = read_lock(out_dir)
    endpoint = resolve_endpoint(args.endpoint)
    if args.token:
        warn([TOKEN_FLAG_WARNING])
    token = resolve_token(args.token)

    parents = parents_from_lock(lock, base_dir=args.models_dir, endpoint=endpoint, token=token or None)
    override = LicenseOverride(args.license) if args.license else None
    report = analyze(parents, repo_name=repo_id.split("/")[-1], policy=LicensePolicy(), override=override)

    label = report.license + (f" ({report.license_name})" if report.license_name else "")
    print(f"license: {label}, check: {report.verdict}", file=sys.stderr)
    warn(report.reasons)
    if report.verdict == "block" and not args.allow_license_risk:
        raise LicenseGateError(
            f"license check blocks publishing {out_dir} to {repo_id}; fix the parents or the name, or pass "
            "--allow-license-risk after a human review")

    from mergebot.check.gate import raise_if_rejected, run_gate  # torch: only once a check runs
    from mergebot.pipeline import lock_check_parents

    gate = gate_options(args, True, args.device)
    assert gate is not None  # publishing: only --check off turns the check off
    try:  # the gate's record in the lock, then the card: both renamed over complete files only
        outcome = run_gate(out_dir, lambda: lock_check_parents(lock, args.models_dir, token or None), gate)
        print(safe_line(outcome.line()), file=sys.stderr)
        ctx = card_context_from_output(out_dir, parents, report, repo_id)  # after the gate: the card shows it
        write_card(out_dir, ctx, args.card_template)
    except OSError as e:  # a full disk: the previous lock and card stay whole
        raise OutputError(f"{out_dir}: cannot write the lock or the model card: {e.strerror or e}; nothing was "
                          "published") from None
    raise_if_rejected(outcome, repo_id)

    result = publish(out_dir, repo_id, token=token, private=args.private, create_pr=args.create_pr,
                     revision=args.revision, endpoint=endpoint, license_report=report,
                     allow_license_risk=args.allow_license_risk)
    if not result.changed:
        print(f"unchanged: {result.repo_url} is already at {result.commit}")
    elif result.pr_url:
        print(f"opened {result.pr_url} (commit {result.commit})")
    else:
        print(f"published: {result.repo_url} commit {result.commit} "
              f"({len(result.uploaded)} file(s) uploaded, {len(result.deleted)} deleted)")
    return 0
