"""Talking to the runner: the job summary table, step outputs, annotations and secret masking.

Formats (GitHub "workflow commands"): `::add-mask::VALUE` hides VALUE in every later log line;
`::error file=F,line=N,title=T::MESSAGE` annotates a file in the run and the PR diff; outputs are appended to
the `$GITHUB_OUTPUT` file as `name=value`, or `name<<DELIM ... DELIM` for multiline values such as JSON; the
Markdown appended to `$GITHUB_STEP_SUMMARY` is shown on the run's page.
"""

from __future__ import annotations

import json
import secrets
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

STATUS_ICON = {"published": "✅", "unchanged": "✅", "up-to-date": "💤", "planned": "📝", "blocked": "⛔",
               "failed": "❌"}
FAILED = ("failed", "blocked")


@dataclass
class Result:
    """One config's outcome: a row of the summary and an item of the `results` output."""

    config: str
    repo: str | None
    status: str  # published | unchanged | up-to-date | planned | blocked | failed
    commit: str | None = None
    parents_changed: str = ""
    license: str = ""
    seconds: float = 0.0
    link: str | None = None
    error: str | None = None
    details: list[str] = field(default_factory=list)  # dry-run plan lines

    @property
    def failed(self) -> bool:
        return self.status in FAILED

    def output(self) -> dict[str, str | None]:
        return {"config": self.config, "repo": self.repo, "status": self.status, "commit": self.commit}


# ------------------------------------------------------------------------------------------ workflow commands

def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def annotation(level: str, message: str, *, file: str | None = None, line: int | None = None,
               title: str | None = None) -> str:
    """`::error file=…,line=…,title=…::message` (level: error | warning | notice)."""
    props = []
    if file:
        props.append(f"file={_escape_property(file)}")
    if line:
        props.append(f"line={int(line)}")
    if title:
        props.append(f"title={_escape_property(title)}")
    return f"::{level}{' ' + ','.join(props) if props else ''}::{_escape_data(message)}"


def mask(value: str | None, out: TextIO | None = None) -> None:
    """Ask the runner to hide `value` in all later output (each line of a multiline secret separately)."""
    if not value:
        return
    out = out or sys.stdout
    for line in value.splitlines():
        if line.strip():
            print(f"::add-mask::{line}", file=out, flush=True)


def scrub(text: str, secret: str | None) -> str:
    """`text` with the secret replaced: messages from libraries may echo request details."""
    return text.replace(secret, "***") if secret else text


# ------------------------------------------------------------------------------------------------ outputs

def format_output(name: str, value: str) -> str:
    """One `$GITHUB_OUTPUT` entry; multiline values use a random delimiter that cannot occur in them."""
    if "\n" not in value and "\r" not in value:
        return f"{name}={value}\n"
    delim = f"ghadelimiter_{secrets.token_hex(8)}"
    while delim in value:
        delim = f"ghadelimiter_{secrets.token_hex(8)}"
    return f"{name}<<{delim}\n{value}\n{delim}\n"


def write_outputs(path: str | Path | None, outputs: dict[str, str]) -> None:
    if not path:
        return
    with open(path, "a", encoding="utf-8") as f:
        for name, value in outputs.items():
            f.write(format_output(name, value))


def action_outputs(results: list[Result]) -> dict[str, str]:
    """`results`: JSON list of {config, repo, status, commit} (pretty, hence the multiline form);
    `count`: how many configs were merged (or planned, in a dry run)."""
    done = [r for r in results if r.status in ("published", "unchanged", "planned")]
    return {"results": json.dumps([r.output() for r in results], indent=2), "count": str(len(done))}


# ------------------------------------------------------------------------------------------------ summary

def _cell(text: str | None) -> str:
    if not text:
        return "—"
    return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def summary_markdown(results: list[Result], *, title: str, notes: list[str]) -> str:
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    tally = ", ".join(f"{n} {s}" for s, n in counts.items()) or "nothing to do"
    lines = [f"## {title}", "", f"{len(results)} config(s): {tally}", ""]
    lines += [f"> {_cell(n)}" for n in notes]
    if notes:
        lines.append("")
    if results:
        lines += ["| Config | Target repo | Status | Parents changed | License | Time | Link |",
                  "|---|---|---|---|---|---|---|"]
        for r in results:
            link = f"[{(r.commit or 'repo')[:7]}]({r.link})" if r.link else "—"
            lines.append(" | ".join([
                f"| `{_cell(r.config)}`", f"`{r.repo}`" if r.repo else "—",
                f"{STATUS_ICON.get(r.status, '')} {r.status}", _cell(r.parents_changed), _cell(r.license),
                f"{r.seconds:.1f} s", link + " |"]))
        lines.append("")
    for r in results:
        if r.error:
            lines += [f"**{_cell(r.config)}**: {r.status}", "", "```", r.error.replace("```", "'''"), "```", ""]
        if r.details:
            lines += [f"<details open><summary>Plan for <code>{_cell(r.config)}</code></summary>", ""]
            lines += [f"- {d}" for d in r.details] + ["", "</details>", ""]
    return "\n".join(lines) + "\n"


def append_summary(path: str | Path | None, markdown: str) -> None:
    if not path:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(markdown)


def results_json(results: list[Result]) -> str:
    """Every field of every result (for logs and tests; the output keeps only config/repo/status/commit)."""
    return json.dumps([asdict(r) for r in results], indent=2)
