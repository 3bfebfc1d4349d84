"""`mergebot validate CONFIG...`: the config language alone, no models, no network (PR checks, editors)."""

from __future__ import annotations

import argparse
import sys

from mergebot.action.runner_log import safe_line
from mergebot.cli._output import warn
from mergebot.config.configfile import load
from mergebot.errors import MergebotError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check merge configs (no models, no network)",
                       description="Check the config language of each file. Exit 0 only when every file is valid.")
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="merge YAML files")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    bad = 0
    for path in args.configs:
        try:
            cfg = load(path)
        except MergebotError as e:
            print(safe_line(f"error: {e}"), file=sys.stderr)  # file names come from the pull request
            bad += 1
            continue
        warn(cfg.warnings)
        note = f" (merge will refuse for now: {', '.join(cfg.pending)} not supported yet)" if cfg.pending else ""
        print(safe_line(f"ok: {path}: {cfg.label()}, {cfg.model_count()} model(s){note}"))
    return 1 if bad else 0
