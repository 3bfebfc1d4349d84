"""What a run reports: each config's `Result`, the job summary Markdown and the step outputs.

How text reaches the runner (workflow commands, escaping, the outputs file) is `runner_log`'s job; the names
it exports are re-exported here for the callers that import them from `report`. The summary is appended to
`$GITHUB_STEP_SUMMARY` and shown on the run's page; outputs are `results` (JSON) and `count`.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TextIO
from urllib.parse import quote

from mergebot.action.runner_log import (
    MAX_MESSAGE,
    RunnerLog,
    annotation,
    append_summary,
    format_output,
    md_code,
    md_text,
    write_outputs,
)

__all__ = ["Result", "STATUS_ICON", "action_outputs", "annotation", "append_summary", "failure_markdown",
           "format_output", "mask", "results_json", "scrub", "summary_markdown", "write_outputs"]

STATUS_ICON = {"published": "✅", "unchanged": "✅", "up-to-date": "💤", "planned": "📝", "blocked": "⛔",
               "failed": "❌", "card-refreshed": "📇", "rejected": "🚫"}
FAILED = ("failed", "blocked", "rejected")
_HEX = re.compile(r"[0-9a-f]{7,64}")


@dataclass
class Result:
    """One config's outcome: a row of the summary and an item of the `results` output."""

    config: str
    repo: str | None
    status: str  # published | unchanged | card-refreshed | up-to-date | planned | blocked | rejected | failed
    commit: str | None = None
    parents_changed: str = ""
    license: str = ""
    seconds: float = 0.0
    link: str | None = None
    error: str | None = None
    details: list[str] = field(default_factory=list)  # dry-run plan lines
    check: str | None = None  # the quality gate's line with its numbers (mergebot.check.gate.summary_line)
    streamed: str | None = None  # a streamed merge's bytes fetched/uploaded and peak disk (mergebot.hub.stream)

    @property
    def failed(self) -> bool:
        return self.status in FAILED

    def output(self) -> dict[str, str | None]:
        return {"config": self.config, "repo": self.repo, "status": self.status, "commit": self.commit,
                "check": self.check}


# ------------------------------------------------------------------------------------------ runner text

def mask(value: str | None, out: TextIO | None = None) -> None:
    """Ask the runner to hide `value` in all later output (each line of a multiline secret separately)."""
    RunnerLog(out or sys.stdout).mask(value)


def scrub(text: str, secret: str | None) -> str:
    """`text` with the secret replaced: messages from libraries may echo request details."""
    return RunnerLog(secrets=[secret]).redact(text)


# ------------------------------------------------------------------------------------------------ outputs

def action_outputs(results: list[Result]) -> dict[str, str]:
    """`results`: JSON list of {config, repo, status, commit} (pretty, hence the multiline form);
    `count`: how many configs were merged (or planned, in a dry run)."""
    done = [r for r in results if r.status in ("published", "unchanged", "planned")]
    return {"results": json.dumps([r.output() for r in results], indent=2), "count": str(len(done))}


# ------------------------------------------------------------------------------------------------ summary

def _link(r: Result) -> str:
    """`[abc1234](url)` for a commit the Hub named; the URL is percent-encoded so it cannot leave `(...)`."""
    if not r.link or not r.commit or not _HEX.fullmatch(r.commit):
        return "—"
    return f"[{r.commit[:7]}]({quote(r.link, safe=':/?#=&%@+,;.-_~')})"


def summary_markdown(results: list[Result], *, title: str, notes: list[str],
                     redact: Callable[[str], str] = lambda s: s) -> str:
    """The job summary. Every user-derived value goes through `md_text`/`md_code` after `redact`, so file
    names, Hub ids, licenses and error messages are shown as text and never become Markdown or HTML.
    `Result.details` are Markdown that `dryrun` built with the same escaping."""

    def text(value: str | None, limit: int = MAX_MESSAGE) -> str:
        return md_text(redact(value), limit) if value else "—"

    def code(value: str | None) -> str:
        return md_code(redact(value)) if value else "—"

    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    tally = ", ".join(f"{n} {text(s)}" for s, n in counts.items()) or "nothing to do"
    lines = [f"## {text(title)}", "", f"{len(results)} config(s): {tally}", ""]
    lines += [f"> {text(n)}" for n in notes]
    if notes:
        lines.append("")
    if results:
        lines += ["| Config | Target repo | Status | Parents changed | License | Quality check | Time | Link |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in results:
            lines.append(" | ".join([
                f"| {code(r.config)}", code(r.repo), f"{STATUS_ICON.get(r.status, '')} {text(r.status)}",
                text(r.parents_changed), text(r.license), text(r.check), f"{r.seconds:.1f} s", _link(r) + " |"]))
        lines.append("")
    streamed = [r for r in results if r.streamed]
    if streamed:  # merged by HTTP range on a disk smaller than the parents (issue 15)
        lines += ["### Streamed merges", ""] + [f"- {code(r.config)}: {text(r.streamed)}" for r in streamed] + [""]
    errors = [r for r in results if r.error]
    if errors:
        lines += ["### Problems", ""]
        lines += [f"- {code(r.config)} ({text(r.status)}): {text(r.error)}" for r in errors]
        lines.append("")
    for r in results:
        if r.details:
            lines += [f"<details open><summary>Plan for {code(r.config)}</summary>", ""]
            lines += [f"- {redact(d)}" for d in r.details] + ["", "</details>", ""]
    return "\n".join(lines) + "\n"


def failure_markdown(title: str, message: str, notes: Sequence[str] = ()) -> str:
    """The summary of a run that stopped before its configs could be looked at (bad input, selection error)."""
    lines = [f"## {md_text(title)}", "", f"❌ {md_text(message)}", ""]
    lines += [f"> {md_text(n)}" for n in notes]
    return "\n".join(lines) + "\n"


def results_json(results: list[Result]) -> str:
    """Every field of every result (for logs and tests; the output keeps only config/repo/status/commit)."""
    return json.dumps([asdict(r) for r in results], indent=2)
