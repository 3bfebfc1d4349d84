"""The action's loop: for each selected config, check staleness, then merge+publish (or plan), and report.

One config failing never stops the others: any exception in one config (RecursionError and MemoryError from
a hostile file included) is that config's `failed` result with a one-line message. The job summary and the
`results`/`count` outputs are always written, also when the selection itself fails or the run is
interrupted; the exit code is 1 when any config failed or the run could not look at its configs. The token
is masked before anything else is printed and scrubbed from every message; on pull-request events it is
not used at all (`credentials`). Config files and local model references are bounded by the workspace
(`mergebot.io.confine.set_workspace`) for the whole run. Each merge goes to its own temporary directory (under
RUNNER_TEMP when there is one) that is removed right after its publish, so a runner's disk holds one output
at a time. Everything printed goes through `runner_log`.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TextIO

from mergebot.action.credentials import has_credentials, token_note, without_hub_credentials
from mergebot.action.dryrun import dry_run, read_parents
from mergebot.action.events import Event
from mergebot.action.inputs import ActionInputs, workspace_file
from mergebot.action.refresh import refresh_in_action
from mergebot.action.report import Result, action_outputs, failure_markdown, summary_markdown
from mergebot.action.runner_log import RunnerLog, append_summary, exception_message, one_line, write_outputs
from mergebot.action.select import ConfigEntry, Selection, select
from mergebot.action.staleness import Decision, StalenessChecker, decide
from mergebot.builds.base import MergeOptions, seed_from_env
from mergebot.card.licenses import LicensePolicy, analyze
from mergebot.check.gate import GateOptions, QualityGateError
from mergebot.errors import MergebotError
from mergebot.hub.client import resolve_endpoint
from mergebot.hub.publish import LicenseGateError
from mergebot.io.confine import reset_workspace, set_workspace
from mergebot.pipeline import run as pipeline_run


@dataclass
class ActionRun:
    selection: Selection | None  # None: the run stopped before its configs were known
    results: list[Result] = field(default_factory=list)
    error: str | None = None  # what stopped the run as a whole (the selection failed, a report not written)
    notes: list[str] = field(default_factory=list)  # the run's own notes, before the selection's

    @property
    def exit_code(self) -> int:
        return 1 if self.error is not None or any(r.failed for r in self.results) else 0


class Runner:
    """Holds what every config needs: inputs, endpoint, the log."""

    def __init__(self, inputs: ActionInputs, event: Event, log: RunnerLog, env: Mapping[str, str]):
        self.inputs, self.event, self.log, self.env = inputs, event, log, env
        self.endpoint = resolve_endpoint(None)
        # the card template input, already confined to the workspace (_select_and_run): every card of the run
        self.template = event.workspace / inputs.card_template if inputs.card_template else None

    def say(self, line: str) -> None:
        self.log.line(line)

    def clean(self, text: str) -> str:
        """One line, token out, workspace paths shortened to what the repo shows: a result's message."""
        return one_line(self.log.redact(text))

    def fail(self, result: Result, message: str, *, line: int | None = None, status: str = "failed") -> Result:
        result.status, result.error = status, self.clean(message)
        self.log.annotate("error", result.error, file=result.config, line=line, title=f"mergebot: {status}")
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
            self.log.annotate("warning", self.clean(w), file=entry.path)
        if decision.refresh_card and selection.publish:  # weights up to date, card inputs changed: no merge
            return refresh_in_action(self, entry, result)
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
            result.details = [self.log.redact(d) for d in plan.lines]
            if plan.report is not None:
                result.license = f"{plan.report.verdict} ({plan.report.license})"
            if plan.problems:
                return self.fail(result, "; ".join(plan.problems))
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
                                    endpoint=self.endpoint, check=self.gate(), stream=self.inputs.stream,
                                    template=self.template)
            except LicenseGateError as e:
                result.license = "block"
                return self.fail(result, str(e), status="blocked")
            except QualityGateError as e:  # nothing committed: what is on the Hub stays as it was
                result.check = _cell(e.outcome.line())
                return self.fail(result, str(e), status="rejected")
        result.license = f"{done.report.verdict} ({done.report.license})"
        if done.streamed is not None:
            result.streamed = done.streamed.line()
        if done.check is not None:
            result.check = _cell(done.check.line())
        if done.report.verdict == "block":
            self.log.annotate("warning", self.clean("published although the license check says block "
                                                    "(license_policy: warn): " + "; ".join(done.report.reasons)),
                              file=entry.path)
        pub = done.published
        assert pub is not None
        result.status = "published" if pub.changed else "unchanged"
        result.commit = pub.commit
        result.link = f"{pub.endpoint}/{entry.repo}/commit/{pub.commit}"
        return result

    def gate(self) -> GateOptions:
        """The quality gate every publish of this run goes through (inputs check, max_perplexity_ratio,
        eval_text); its progress goes to the log."""
        i = self.inputs
        return GateOptions(mode="off" if i.check == "off" else "on", max_perplexity_ratio=i.max_perplexity_ratio,
                           eval_text=Path(i.eval_text) if i.eval_text else None, device=i.device,
                           log=lambda msg: self.say(f"check: {msg}"))

    def guarded(self, entry: ConfigEntry, selection: Selection, checker: StalenessChecker) -> Result:
        """`decide` + `one`, with every error turned into a failed result so the loop goes on."""
        start = time.monotonic()
        self.log.group(f"{entry.path} → {entry.repo or '?'}")
        note = ""
        try:
            decision = decide(entry, selection, checker)
            note = decision.note
            result = self.one(decision, selection)
        except MergebotError as e:
            result = self.fail(Result(entry.path, entry.repo, "failed", parents_changed=note), str(e))
        except Exception as e:  # a bug, a library error or a hostile file: keep going, traceback in the log
            self.log.traceback(e)
            result = self.fail(Result(entry.path, entry.repo, "failed", parents_changed=note),
                               exception_message(e))
        result.seconds = time.monotonic() - start
        self.say(f"{result.status}: {entry.path}" + (f" → {result.repo}" if result.repo else "")
                 + (f" @ {result.commit}" if result.commit else ""))
        self.log.endgroup()
        return result


def run_action(inputs: ActionInputs, event: Event, *, out: TextIO | None = None,
               env: Mapping[str, str] | None = None) -> ActionRun:
    """Select, decide, merge/publish or plan each config; the summary and the outputs are written whatever
    happened before (a failed selection, an interrupt)."""
    env = os.environ if env is None else env
    log = RunnerLog(out, secrets=[inputs.token], workspace=event.workspace)
    log.mask(inputs.token)
    done = ActionRun(None)
    credentials: AbstractContextManager[None] = nullcontext()
    if event.is_pull_request:
        if inputs.token or has_credentials(os.environ):
            done.notes.append(token_note(event.name))
        inputs = replace(inputs, token=None)
        credentials = without_hub_credentials()
    bound = set_workspace(event.workspace)
    try:
        with credentials, warnings.catch_warnings():
            warnings.showwarning = partial(_show_warning, log)  # library warnings quote server and card text
            _select_and_run(done, inputs, event, log, env)
    finally:
        reset_workspace(bound)
        _report(done, event, log, env)
    return done


def _show_warning(log: RunnerLog, message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    log.line(f"warning: {category.__name__}: {message}")


def _select_and_run(done: ActionRun, inputs: ActionInputs, event: Event, log: RunnerLog,
                    env: Mapping[str, str]) -> None:
    for note in done.notes:
        log.annotate("notice", note)
    for name, value in (("eval_text", inputs.eval_text), ("card_template", inputs.card_template)):
        if value is None:
            continue
        try:
            workspace_file(name, value, event.workspace)
        except MergebotError as e:  # before any merge: a bad input stops the run, as a bad `configs` would
            _stopped(done, log, "bad input", e)
            return
    try:
        runner = Runner(inputs, event, log, env)
        selection = select(event, inputs)
    except Exception as e:  # noqa: BLE001 - a hostile file or a bug: say so in the summary, fail the step
        _stopped(done, log, "selecting the configs failed", e)
        return
    done.selection = selection
    for note in selection.notes:
        log.annotate("notice", one_line(note))
    try:
        checker = StalenessChecker(runner.endpoint, inputs.token, template=runner.template)
    except Exception as e:  # noqa: BLE001
        _stopped(done, log, "cannot talk to the Hub", e)
        return
    for entry in selection.entries:
        try:
            done.results.append(runner.guarded(entry, selection, checker))
        except Exception as e:  # noqa: BLE001 - a fault in the guard itself: still only this config's failure
            done.results.append(Result(entry.path, entry.repo, "failed", error=runner.clean(exception_message(e))))


def _cell(line: str) -> str:
    """The gate's line as the summary's cell: `passed: merge perplexity ...` (the column says what it is)."""
    return line.removeprefix("quality check ")


def _stopped(done: ActionRun, log: RunnerLog, what: str, e: Exception) -> None:
    if not isinstance(e, MergebotError):
        log.traceback(e)
    done.error = one_line(log.redact(f"{what}: {e if isinstance(e, MergebotError) else exception_message(e)}"))
    log.annotate("error", done.error, title="mergebot: run failed")


def _report(done: ActionRun, event: Event, log: RunnerLog, env: Mapping[str, str]) -> None:
    """The job summary and the outputs, each written even when the other cannot be."""
    sel = done.selection
    what = "stopped" if sel is None else ("dry run" if not sel.publish else sel.which)
    title = f"mergebot: {sel.event if sel else event.name or 'local'} ({what})"
    notes = done.notes + (sel.notes if sel else [])
    try:
        if sel is None:
            markdown = failure_markdown(log.redact(title), done.error or "the run stopped before any config was "
                                        "looked at", [log.redact(n) for n in notes])
        else:
            markdown = summary_markdown(done.results, title=title, redact=log.redact,
                                        notes=notes + ([done.error] if done.error else []))
        append_summary(env.get("GITHUB_STEP_SUMMARY"), log.redact(markdown))
    except Exception as e:  # noqa: BLE001 - e.g. the summary file cannot be written
        done.error = done.error or one_line(f"cannot write the job summary: {exception_message(e)}")
        log.annotate("error", f"cannot write the job summary: {exception_message(e)}", title="mergebot: run failed")
    try:
        write_outputs(env.get("GITHUB_OUTPUT"), action_outputs(done.results))
    except Exception as e:  # noqa: BLE001
        done.error = done.error or one_line(f"cannot write the step outputs: {exception_message(e)}")
        log.annotate("error", f"cannot write the step outputs: {exception_message(e)}", title="mergebot: run failed")


def report_stopped(message: str, *, title: str, env: Mapping[str, str] | None = None,
                   out: TextIO | None = None) -> None:
    """A run that cannot start (a bad input, an unreadable event): annotation, summary and empty outputs,
    so the workflow sees the same shape as after any other run."""
    env = os.environ if env is None else env
    log = RunnerLog(out, secrets=[env.get(k) for k in ("INPUT_HF_TOKEN", "INPUT_HF-TOKEN", "HF_TOKEN")])
    message = one_line(log.redact(message))
    log.annotate("error", message, title=title)
    done = ActionRun(None, error=message)
    _report(done, Event(env.get("GITHUB_EVENT_NAME", ""), {}, Path(".")), log, env)
