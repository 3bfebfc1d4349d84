"""The action's loop: for each selected config, check staleness, then merge+publish (or plan), and report.

One config failing never stops the others; the exit code is 1 when any failed. The token is masked before
anything else is printed and scrubbed from every message that reaches the log or the summary. Each merge
goes to its own temporary directory (under RUNNER_TEMP when there is one) that is removed right after its
publish, so a runner's disk holds one output at a time.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ..errors import MergebotError
from ..licenses import LicensePolicy, analyze
from ..merge import MergeOptions, seed_from_env
from ..parents import resolve_endpoint
from ..pipeline import run as pipeline_run
from ..publish import LicenseGateError
from .dryrun import dry_run, read_parents
from .events import Event
from .inputs import ActionInputs
from .report import Result, action_outputs, annotation, append_summary, mask, scrub, summary_markdown, write_outputs
from .select import ConfigEntry, Selection, select
from .staleness import Staleness, StalenessChecker, StalenessError


@dataclass
class ActionRun:
    selection: Selection
    results: list[Result]

    @property
    def exit_code(self) -> int:
        return 1 if any(r.failed for r in self.results) else 0


@dataclass
class Decision:
    """What to do with one selected config before any merge: run it (and why) or report it."""

    entry: ConfigEntry
    run: bool
    staleness: Staleness | None = None
    note: str = ""  # "parents changed" cell
    error: str | None = None


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
        return Decision(entry, run=False, staleness=st, note=st.describe())
    return Decision(entry, run=True, staleness=st, note=st.describe())


class Runner:
    """Holds what every config needs: inputs, endpoint, where to log."""

    def __init__(self, inputs: ActionInputs, event: Event, out: TextIO, env: Mapping[str, str]):
        self.inputs, self.event, self.out, self.env = inputs, event, out, env
        self.endpoint = resolve_endpoint(None)

    def say(self, line: str) -> None:
        print(self.clean(line), file=self.out, flush=True)

    def clean(self, text: str) -> str:
        """Token out; workspace paths shortened to what the repo shows."""
        return scrub(text, self.inputs.token).replace(str(self.event.workspace) + os.sep, "")

    def fail(self, result: Result, message: str, *, line: int | None = None, status: str = "failed") -> Result:
        result.status, result.error = status, self.clean(message)
        self.say(annotation("error", result.error, file=result.config, line=line, title=f"mergebot: {status}"))
        return result

    def workdir(self) -> tempfile.TemporaryDirectory[str]:
        root = self.env.get("MERGEBOT_WORKDIR") or self.env.get("RUNNER_TEMP")
        return tempfile.TemporaryDirectory(prefix="mergebot-", dir=root if root and Path(root).is_dir() else None)

    def one(self, decision: Decision, selection: Selection) -> Result:
        entry = decision.entry
        result = Result(config=entry.path, repo=entry.repo, status="failed", parents_changed=decision.note)
        if decision.error is not None:
            return self.fail(result, decision.error, line=entry.line)
        assert entry.cfg is not None and entry.repo is not None
        for w in entry.cfg.warnings:
            self.say(annotation("warning", self.clean(w), file=entry.path))
        if not decision.run:
            result.status = "up-to-date"
            if decision.staleness and decision.staleness.license:
                result.license = f"published as {decision.staleness.license}"
            if decision.staleness and decision.staleness.head:
                result.commit = decision.staleness.head
                result.link = f"{self.endpoint}/{entry.repo}/commit/{result.commit}"
            return result
        if not selection.publish:
            plan = dry_run(entry.cfg, entry.repo, endpoint=self.endpoint, token=self.inputs.token,
                           device=self.inputs.device)
            result.details = [self.clean(d) for d in plan.lines]
            if plan.report is not None:
                result.license = f"{plan.report.verdict} ({plan.report.license})"
            if plan.problems:
                return self.fail(result, "\n".join(plan.problems))
            if plan.report is not None and plan.report.verdict == "block" and self.inputs.license_policy == "strict":
                return self.fail(result, "license check would block publishing: " + "; ".join(plan.report.reasons),
                                 status="blocked")
            result.status = "planned"
            return result
        return self.merge(entry, result)

    def merge(self, entry: ConfigEntry, result: Result) -> Result:
        assert entry.cfg is not None and entry.repo is not None
        if self.inputs.license_policy == "strict":  # fail before hours of GPU time, not after
            early = analyze(read_parents(entry.cfg, endpoint=self.endpoint, token=self.inputs.token),
                            repo_name=entry.repo.split("/")[-1], policy=LicensePolicy())
            if early.verdict == "block":
                result.license = f"block ({early.license})"
                return self.fail(result, f"license check blocks publishing to {entry.repo} (not merged): "
                                 + "; ".join(early.reasons), status="blocked")
        options = MergeOptions(device=self.inputs.device, progress=False, token=self.inputs.token, force=True,
                               random_seed=seed_from_env())
        with self.workdir() as tmp:
            try:
                done = pipeline_run(entry.cfg, Path(tmp) / "out", options, push_to=entry.repo,
                                    private=self.inputs.private,
                                    allow_license_risk=self.inputs.license_policy == "warn",
                                    endpoint=self.endpoint)
            except LicenseGateError as e:
                result.license = "block"
                return self.fail(result, str(e), status="blocked")
        result.license = f"{done.report.verdict} ({done.report.license})"
        if done.report.verdict == "block":
            self.say(annotation("warning", "published although the license check says block "
                                "(license_policy: warn): " + "; ".join(done.report.reasons), file=entry.path))
        pub = done.published
        assert pub is not None
        result.status = "published" if pub.changed else "unchanged"
        result.commit = pub.commit
        result.link = f"{pub.endpoint}/{entry.repo}/commit/{pub.commit}"
        return result

    def guarded(self, entry: ConfigEntry, selection: Selection, checker: StalenessChecker) -> Result:
        """`decide` + `one`, with every error turned into a failed result so the loop goes on."""
        start = time.monotonic()
        self.say(f"::group::{entry.path} → {entry.repo or '?'}")
        note = ""
        try:
            decision = decide(entry, selection, checker)
            note = decision.note
            result = self.one(decision, selection)
        except MergebotError as e:
            result = self.fail(Result(entry.path, entry.repo, "failed", parents_changed=note), str(e))
        except Exception as e:  # a bug or a library error: keep going, keep the traceback in the log
            self.say(self.clean("".join(traceback.format_exception(e))))
            result = self.fail(Result(entry.path, entry.repo, "failed", parents_changed=note),
                               f"{type(e).__name__}: {e}")
        result.seconds = time.monotonic() - start
        self.say(f"{result.status}: {entry.path}" + (f" → {result.repo}" if result.repo else "")
                 + (f" @ {result.commit}" if result.commit else ""))
        self.say("::endgroup::")
        return result


def run_action(inputs: ActionInputs, event: Event, *, out: TextIO | None = None,
               env: Mapping[str, str] | None = None) -> ActionRun:
    """Select, decide, merge/publish or plan each config, then write the summary and the outputs."""
    env = os.environ if env is None else env
    out = out or sys.stdout
    mask(inputs.token, out)
    runner = Runner(inputs, event, out, env)
    selection = select(event, inputs)
    for note in selection.notes:
        runner.say(annotation("notice", note))
    checker = StalenessChecker(runner.endpoint, inputs.token)
    results = [runner.guarded(e, selection, checker) for e in selection.entries]

    what = "dry run" if not selection.publish else selection.which
    title = f"mergebot: {selection.event} ({what})"
    append_summary(env.get("GITHUB_STEP_SUMMARY"), runner.clean(summary_markdown(results, title=title,
                                                                                 notes=selection.notes)))
    write_outputs(env.get("GITHUB_OUTPUT"), action_outputs(results))
    return ActionRun(selection, results)
