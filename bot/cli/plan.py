"""`mergebot plan`: the configs the current event would merge, e.g. as JSON for a `strategy.matrix` job.

Same selection as `mergebot action` (changed files for push/pull_request, staleness for schedule and
workflow_dispatch), without merging. Invalid configs are listed too, so the matrix job that runs them fails
with an annotation instead of the problem going unnoticed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from mergebot.action.hfjobs import submit
from mergebot.action.report import mask, write_outputs
from mergebot.action.runner_log import safe_line
from mergebot.action.select import select
from mergebot.action.staleness import StalenessChecker, decide
from mergebot.cli.action import add_common_arguments, inputs_and_event
from mergebot.errors import MergebotError
from mergebot.hub.client import resolve_endpoint


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="list the configs the current event would merge",
                       description="Print the configs `mergebot action` would merge for this event. With --json, "
                                   "a JSON list of {config, repo, reason} for `strategy.matrix.include`.")
    add_common_arguments(p)
    p.add_argument("--json", action="store_true", help="print one line of JSON")
    p.add_argument("--github-output", action="store_true",
                   help="also write `configs` (the JSON list) and `count` to $GITHUB_OUTPUT")
    p.add_argument("--backend", choices=("none", "hf-jobs"), default="none",
                   help="hf-jobs: submit one Hugging Face Job per config to merge (needs --image; token from HF_TOKEN)")
    p.add_argument("--image", default=None, help="container image with mergebot for --backend hf-jobs")
    p.add_argument("--flavor", default="cpu-upgrade", help="HF Jobs hardware flavor (e.g. a10g-large, a100-large)")
    p.add_argument("--job-timeout", default="2h", help="HF Jobs timeout (e.g. 30m, 2h)")
    p.set_defaults(run=run)


def matrix_name(path: str) -> str:
    """An invalid config's name as the matrix job's `configs` input can carry it. That input splits on blanks and
    commas and strips a leading `-`: `merges/q,merges/b.yml` would run merges/b.yml in that job (another config,
    outside its concurrency group). Such a name becomes one starting with `#`, which names no config (file
    names with `#` are refused), so the job fails on it with the plan's reason beside it."""
    if not re.search(r"[\s,]|^-", path):
        return path
    return "#refused:" + re.sub(r"[\s,]+", "_", path).lstrip("-")


def plan_items(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """The configs to merge as {config, repo, reason}, and the selection's notes."""
    inputs, event = inputs_and_event(args)
    mask(inputs.token, sys.stderr)  # stdout may be captured by the workflow; the runner reads stderr too
    selection = select(event, inputs)
    checker = StalenessChecker(resolve_endpoint(None), inputs.token)
    items = []
    for entry in selection.entries:
        d = decide(entry, selection, checker)
        if d.error is not None:
            items.append({"config": matrix_name(entry.path), "repo": entry.repo, "reason": f"invalid: {d.error}"})
        elif d.run:
            why = entry.reason if not d.staleness else f"{entry.reason}; parents changed: {d.note}"
            items.append({"config": entry.path, "repo": entry.repo, "reason": why})
    return items, selection.notes


def run(args: argparse.Namespace) -> int:
    items, notes = plan_items(args)
    for n in notes:
        print(f"note: {safe_line(n)}", file=sys.stderr)
    if args.github_output:
        write_outputs(os.environ.get("GITHUB_OUTPUT"), {"configs": json.dumps(items), "count": str(len(items))})
    if args.backend == "hf-jobs":
        if not args.image:
            raise MergebotError("--backend hf-jobs needs --image (a container image with mergebot installed)")
        inputs, event = inputs_and_event(args)
        jobs = submit(items, Path(event.workspace), image=args.image, flavor=args.flavor, token=inputs.token,
                      endpoint=resolve_endpoint(None), timeout=args.job_timeout)
        for j in jobs:
            print(safe_line(f"submitted: {j.config} -> {j.repo}: job {j.job_id} {j.url}"))
        return 0
    if args.json:
        print(json.dumps(items))
    else:
        for it in items:
            print("\t".join(safe_line(v) for v in (it["config"], it["repo"] or "?", it["reason"])))
        if not items:
            print("nothing to merge", file=sys.stderr)
    return 0
