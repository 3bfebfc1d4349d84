"""GitHub's side of a Docker container action, for scripts/container/test-image.sh.

    ghaction.py env --event push [--input name=value]... [--env NAME=value]... > ENV_FILE
        The environment the runner gives the container (`docker run --env-file`): GITHUB_* pointing into the
        mounted /github/{workspace,workflow,file_commands,home}, HOME, RUNNER_*, the action's `runs.env`, and one
        INPUT_<NAME> per input of action.yml (its default unless --input sets it; the name upper-cased, spaces
        as _, hyphens kept), as the runner does. Values come from the command line or, for --input-env
        name=VAR, from the environment variable VAR (secrets stay off command lines).

    ghaction.py check --log LOG --output OUT --summary SUMMARY [expectations]
        Reads what one run left behind and checks it; prints each check, exits 1 on the first failure.

Standard library plus PyYAML (to read action.yml).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WS, WORKFLOW, FILE_COMMANDS, HOME = "/github/workspace", "/github/workflow", "/github/file_commands", "/github/home"


# ------------------------------------------------------------------------------------------------ env

def pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"ghaction.py: {what} {item!r}: expected NAME=VALUE")
        out[name] = value
    return out


def github_env(event: str, run_id: str, inputs: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    import yaml

    action = yaml.safe_load((ROOT / "action.yml").read_text())
    values = {name: "" if spec.get("default") is None else str(spec["default"])
              for name, spec in (action.get("inputs") or {}).items()}
    unknown = sorted(set(inputs) - set(values))
    if unknown:
        raise SystemExit(f"ghaction.py: not inputs of action.yml: {', '.join(unknown)}")
    values.update(inputs)

    env = {
        # what the runner sets for a container action (paths translated into the container)
        "HOME": HOME,
        "CI": "true",
        "GITHUB_ACTIONS": "true",
        "GITHUB_EVENT_NAME": event,
        "GITHUB_EVENT_PATH": f"{WORKFLOW}/event.json",
        "GITHUB_WORKSPACE": WS,
        "GITHUB_OUTPUT": f"{FILE_COMMANDS}/set_output_{run_id}",
        "GITHUB_STEP_SUMMARY": f"{FILE_COMMANDS}/step_summary_{run_id}",
        "GITHUB_ENV": f"{FILE_COMMANDS}/set_env_{run_id}",
        "GITHUB_PATH": f"{FILE_COMMANDS}/add_path_{run_id}",
        "GITHUB_STATE": f"{FILE_COMMANDS}/save_state_{run_id}",
        "GITHUB_REPOSITORY": "mergebot-ci/merges",
        "GITHUB_REPOSITORY_OWNER": "mergebot-ci",
        "GITHUB_REF": "refs/heads/main",
        "GITHUB_SERVER_URL": "https://github.com",
        "GITHUB_API_URL": "https://api.github.com",
        "GITHUB_WORKFLOW": "mergebot",
        "GITHUB_JOB": "merge",
        "GITHUB_ACTION": "mergebot",
        "GITHUB_ACTOR": "mergebot-ci",
        "GITHUB_RUN_ID": "1",
        "GITHUB_RUN_NUMBER": "1",
        "GITHUB_RUN_ATTEMPT": "1",
        "RUNNER_OS": "Linux",
        "RUNNER_ARCH": "X64",
        "RUNNER_NAME": "mergebot-ci",
        # the runner passes its own (host) temp path, which does not exist inside the container
        "RUNNER_TEMP": "/home/runner/work/_temp",
    }
    env.update({k: str(v) for k, v in ((action.get("runs") or {}).get("env") or {}).items()})
    for name, value in values.items():
        env["INPUT_" + name.replace(" ", "_").upper()] = value
    env.update(extra)
    for k, v in env.items():
        if "\n" in v or "\r" in v:
            raise SystemExit(f"ghaction.py: {k}: a value with a newline cannot go in an env file")
    return env


def cmd_env(args: argparse.Namespace) -> int:
    inputs = pairs(args.input, "--input")
    for name, var in pairs(args.input_env, "--input-env").items():
        if var not in os.environ:
            raise SystemExit(f"ghaction.py: --input-env {name}={var}: ${var} is not set")
        inputs[name] = os.environ[var]
    env = github_env(args.event, args.run_id, inputs, pairs(args.env, "--env"))
    sys.stdout.write("".join(f"{k}={v}\n" for k, v in env.items()))
    return 0


# ------------------------------------------------------------------------------------------------ check

def parse_outputs(text: str) -> dict[str, str]:
    """GITHUB_OUTPUT: `name=value` lines and `name<<DELIM` ... `DELIM` blocks."""
    out, lines, i = {}, text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if "<<" in line and "=" not in line.split("<<")[0]:
            name, delim = line.split("<<", 1)
            j = lines.index(delim, i + 1)
            out[name] = "\n".join(lines[i + 1:j])
            i = j + 1
        else:
            name, _, value = line.partition("=")
            out[name] = value
            i += 1
    return out


class Checker:
    def __init__(self, label: str, log: str):
        self.label, self.log = label, log

    def __call__(self, cond: bool, what: str) -> None:
        if not cond:
            tail = "\n".join(self.log.splitlines()[-40:])
            print(f"FAIL [{self.label}]: {what}\n--- container output (last 40 lines) ---\n{tail}", file=sys.stderr)
            raise SystemExit(1)
        print(f"  ok [{self.label}]: {what}")


def cmd_check(args: argparse.Namespace) -> int:
    log = Path(args.log).read_text(errors="replace")
    ok = Checker(args.label, log)
    ok(args.rc == args.expect_rc, f"exit status {args.rc} (expected {args.expect_rc})")
    for text in args.log_has:
        ok(text in log, f"output contains {text!r}")
    if not args.output:
        return 0

    outputs = parse_outputs(Path(args.output).read_text())
    summary = Path(args.summary).read_text()
    ok("results" in outputs and "count" in outputs, f"GITHUB_OUTPUT has results and count ({sorted(outputs)})")
    results = {r["config"]: r for r in json.loads(outputs["results"])}
    want = pairs(args.status, "--status")
    got = {k: v["status"] for k, v in results.items()}
    ok(got == want, f"results {got}")
    if args.count is not None:
        ok(outputs["count"] == args.count, f"count = {outputs['count']}")
    for config, repo in pairs(args.repo, "--repo").items():
        ok(results[config]["repo"] == repo, f"{config} -> {results[config]['repo']}")
    for text in args.summary_has:
        ok(text in summary, f"step summary contains {text!r}")

    if args.secret_env:
        secret = os.environ[args.secret_env]
        ok(secret not in summary and secret not in outputs["results"], "the token is not in the summary or outputs")
        leaked = [line for line in log.splitlines() if secret in line and not line.startswith("::add-mask::")]
        ok(not leaked and f"::add-mask::{secret}" in log,
           "the token is masked (::add-mask::) and printed nowhere else")

    if args.hub_state:
        state = json.loads(Path(args.hub_state).read_text())
        ok(not state["crashes"], f"loopback Hub: no handler crashes ({len(state['crashes'])})")
        published = [r for r in results.values() if r["status"] == "published"]
        ok(bool(published), f"{len(published)} config(s) published")
        for r in published:
            repo = state["repos"].get(r["repo"])
            ok(repo is not None, f"the Hub has {r['repo']} ({sorted(state['repos'])})")
            ok(r["commit"] == repo["head"], f"{r['repo']}: outputs' commit {r['commit'][:12]} is the Hub's head")
            missing = sorted(set(args.hub_files) - set(repo["files"]))
            have = ", ".join(f"{f} ({size} B)" for f, size in repo["files"].items() if f in args.hub_files)
            ok(not missing, f"{r['repo']}@main has {have}" + (f"; missing {missing}" if missing else ""))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("env")
    e.add_argument("--event", required=True)
    e.add_argument("--run-id", default="0")
    e.add_argument("--input", action="append", default=[])
    e.add_argument("--input-env", action="append", default=[])
    e.add_argument("--env", action="append", default=[])
    e.set_defaults(run=cmd_env)
    c = sub.add_parser("check")
    c.add_argument("--label", required=True)
    c.add_argument("--log", required=True)
    c.add_argument("--rc", type=int, required=True)
    c.add_argument("--expect-rc", type=int, default=0)
    c.add_argument("--log-has", action="append", default=[])
    c.add_argument("--output")
    c.add_argument("--summary")
    c.add_argument("--status", action="append", default=[], help="CONFIG=STATUS; the results must be exactly these")
    c.add_argument("--repo", action="append", default=[], help="CONFIG=REPO")
    c.add_argument("--count")
    c.add_argument("--summary-has", action="append", default=[])
    c.add_argument("--secret-env", help="variable holding the token that must not leak")
    c.add_argument("--hub-state", help="fakehub.py --state-file")
    c.add_argument("--hub-files", nargs="*", default=[])
    c.set_defaults(run=cmd_check)
    args = p.parse_args()
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
