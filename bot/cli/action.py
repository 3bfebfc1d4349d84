"""`mergebot action`: the GitHub Action's entrypoint (also runnable locally with flags instead of INPUT_*).

In the container GitHub passes the inputs as `INPUT_*` variables and the event as GITHUB_EVENT_NAME /
GITHUB_EVENT_PATH / GITHUB_WORKSPACE; flags given here override them. The token is read only from
INPUT_HF_TOKEN or HF_TOKEN, never from a flag, so it cannot appear in a process list or a shell history.
"""

from __future__ import annotations

import argparse
import os
import sys

from mergebot.action.events import Event, read_event
from mergebot.action.inputs import LICENSE_POLICIES, MODES, ActionInputs, read_inputs
from mergebot.action.runner_log import RunnerLog
from mergebot.errors import MergebotError


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared with `mergebot plan`; each overrides the matching INPUT_* / GITHUB_* variable."""
    p.add_argument("--configs", default=None, metavar="GLOBS",
                   help="config paths or globs, comma/space separated (INPUT_CONFIGS; default merges/**/*.y*ml)")
    p.add_argument("--namespace", default=None, help="Hub user/org for configs without hub_repo: (INPUT_NAMESPACE)")
    p.add_argument("--mode", choices=MODES, default=None, help="auto | all | changed | stale | dry-run (INPUT_MODE)")
    p.add_argument("--force", action="store_const", const="true", default=None,
                   help="re-merge configs even when up to date (INPUT_FORCE)")
    p.add_argument("--event-name", default=None, help="push | pull_request | schedule | workflow_dispatch "
                   "(GITHUB_EVENT_NAME)")
    p.add_argument("--event-path", default=None, help="event payload JSON (GITHUB_EVENT_PATH)")
    p.add_argument("--workspace", default=None, help="repository checkout (GITHUB_WORKSPACE; default: cwd)")


def inputs_and_event(args: argparse.Namespace) -> tuple[ActionInputs, Event]:
    env = dict(os.environ)
    for flag, name in (("configs", "CONFIGS"), ("namespace", "NAMESPACE"), ("mode", "MODE"), ("force", "FORCE"),
                       ("device", "DEVICE"), ("private", "PRIVATE"), ("license_policy", "LICENSE_POLICY")):
        value = getattr(args, flag, None)
        if value is not None:
            env[f"INPUT_{name}"] = value
    inputs = read_inputs(env)
    event = read_event(env, name=args.event_name, event_path=args.event_path, workspace=args.workspace)
    return inputs, event


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("action", help="run as the GitHub Action: merge and publish what the event asks for",
                       description="Pick the configs the event asks for (push: changed; pull_request: dry run; "
                                   "schedule: parents changed since the published lock; workflow_dispatch: the "
                                   "chosen ones), merge and publish each, and write the job summary and outputs. "
                                   "Exit 1 when any config failed.")
    add_common_arguments(p)
    p.add_argument("--device", default=None, help="auto | cpu | cuda[:N] (INPUT_DEVICE; default auto)")
    p.add_argument("--private", action="store_const", const="true", default=None,
                   help="create new target repos private (INPUT_PRIVATE)")
    p.add_argument("--license-policy", choices=LICENSE_POLICIES, default=None,
                   help="strict: a blocking license verdict stops that config; warn: publish anyway, flagged "
                        "(INPUT_LICENSE_POLICY)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mergebot import startup
    from mergebot.action.run import report_stopped, run_action

    startup.settle()  # imports done: a run that only publishes or refreshes cards collects as usual from here
    try:
        inputs, event = inputs_and_event(args)
    except MergebotError as e:  # a bad input or event: annotation, summary and outputs, then the one-line error
        report_stopped(str(e), title="mergebot: bad input")
        raise
    done = run_action(inputs, event)
    err = RunnerLog(sys.stderr, secrets=[inputs.token], workspace=event.workspace)
    if not os.environ.get("GITHUB_STEP_SUMMARY"):  # a local run: show the table on the terminal
        from mergebot.action.report import summary_markdown

        title = f"mergebot: {done.selection.event if done.selection else 'stopped'}"
        notes = done.notes + (done.selection.notes if done.selection else []) + ([done.error] if done.error else [])
        RunnerLog(sys.stdout, secrets=[inputs.token]).markdown(
            summary_markdown(done.results, title=title, notes=notes, redact=err.redact))
    failed = [r.config for r in done.results if r.failed]
    if failed:
        err.line(f"error: {len(failed)} config(s) failed: {', '.join(failed)}")
    if done.error:
        err.line(f"error: {done.error}")
    return done.exit_code
